"""Dataset folder layouts the finetune script recognises, and their rows.

==================  ==========================================================================================
format              layout under the root (``{train}`` / ``{val}``: the split names)
==================  ==========================================================================================
``coco-panoptic``   ``annotations/panoptic_{train}.json``; PNGs in ``annotations/panoptic_{train}/`` (beside the
                    JSON) or ``panoptic_{train}/``; images in ``{train}/``, ``images/{train}/`` or ``images/``.
                    The synthetic generator's layout (``modelscope_plugin.data.synthetic``) is this one. Also
                    Mask2Former's ADE20K preparation: ``ade20k_panoptic_{train}.json`` and
                    ``ade20k_panoptic_{train}/`` at the root, images in ``images/training/`` (``val``:
                    ``images/validation/``).
``coco-instances``  ``annotations/instances_{train}.json``; images in ``{train}/``, ``images/{train}/`` or
                    ``images/`` (ModelScope's ``ImageInstanceSegmentationCocoDataset`` layout; CVAT's COCO
                    export). Or Roboflow's COCO export: ``{train}/_annotations.coco.json`` with the images
                    beside it, splits ``train`` and ``valid``. Or ``ade20k_instance_{train}.json`` at the root
                    (Mask2Former's ADE20K preparation), images as for its panoptic JSON. Or labelme2coco's
                    ``annotations.json`` at the root (no held-out split).
``semantic-folders`` ``images/{train}/`` and ``annotations/{train}/`` label PNGs paired by file stem (ADE20K's
                    ``ADEChallengeData2016``); class names from a file, one per line.
``pascal-voc``      ``ImageSets/Segmentation/{train}.txt`` (one stem per line) naming images in ``JPEGImages/``
                    and label PNGs (palette or grayscale) in ``SegmentationClass/`` (or ``SegmentationClassAug/``,
                    ``SegmentationClassPNG/``); value 0 is the background class, 255 is ignored; class names from
                    a file, else ``class_names.txt`` at the root (labelme's ``labelme2voc``), else PASCAL VOC's 21.
``cityscapes``      ``leftImg8bit/{train}/{city}/*_leftImg8bit.png`` and
                    ``gtFine/{train}/{city}/*_gtFine_labelTrainIds.png`` (the 19 train ids, 255 ignored). With
                    ``gtFine/cityscapes_panoptic_{train}.json`` and its PNG folder (cityscapesscripts'
                    ``csCreatePanopticImgs``) the root is read as ``coco-panoptic``.
==================  ==========================================================================================

Split names default to the JSON files whose split part starts with ``train`` / ``val`` in any case (COCO),
``train`` / ``valid`` or ``val`` (Roboflow), ``training`` / ``validation`` (semantic folders) and ``train`` / ``val``
(PASCAL VOC, Cityscapes). A root holding both panoptic and instance annotations (COCO itself) is read as
``coco-panoptic``, whose rows carry instance and semantic targets too; ``forced_format`` forces one.
"""
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from modelscope_plugin.data.datasets import (
    IGNORE_LABEL,
    IMAGE_EXTENSIONS,
    compressed_rle,
    read_coco_instances,
    read_coco_panoptic,
    read_label_folders,
    read_label_pairs,
    read_panoptic_png,
)
from modelscope_plugin.errors import DatasetLayoutError

logger = logging.getLogger(__name__)
FORMATS = ("coco-panoptic", "coco-instances", "semantic-folders", "pascal-voc", "cityscapes")
# the task a format trains by default
DEFAULT_TASK = {"coco-panoptic": "panoptic", "coco-instances": "instance", "semantic-folders": "semantic",
                "pascal-voc": "semantic", "cityscapes": "semantic"}
# the kind of the rows a format's reader gives (``training.data.row_kind``)
ROW_KIND_OF_FORMAT = {"coco-panoptic": "panoptic", "coco-instances": "instance", "semantic-folders": "semantic",
                      "pascal-voc": "semantic", "cityscapes": "semantic"}
# label-map formats: whether label value 0 is ignored (ADE20K's reduce-zero-label) unless the caller says
REDUCE_ZERO_LABEL = {"semantic-folders": True, "pascal-voc": False, "cityscapes": False}
SEMANTIC_SPLITS = {"train": "training", "val": "validation"}
ROBOFLOW_ANNOTATIONS = "_annotations.coco.json"
ROBOFLOW_SPLITS = {"train": ("train",), "val": ("valid", "val")}
VOC_LABEL_FOLDERS = ("SegmentationClass", "SegmentationClassAug", "SegmentationClassPNG")
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
# Cityscapes' 19 train ids (cityscapesscripts' labels.py)
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")



@dataclass
class LayoutSplit:
    """Where one split of a layout lies."""

    name: str
    image_folder: Path
    annotation_file: Optional[Path] = None
    """The COCO JSON (COCO formats)."""
    label_folder: Optional[Path] = None
    """Panoptic PNGs (coco-panoptic) or label PNGs (semantic-folders, pascal-voc)."""
    pairs: Optional[List[Tuple[str, Path, Path]]] = None
    """pascal-voc, cityscapes: (image id, image, label PNG) of each image, in the split's order."""


@dataclass
class DatasetLayout:
    root: Path
    format: str
    train: LayoutSplit
    val: Optional[LayoutSplit]
    categories: List[Dict[str, Any]]
    """COCO category dicts (``id``, ``name``, ``isthing``); semantic folders: id = label value."""
    reduce_zero_label: bool = True
    ignore_value: int = IGNORE_LABEL
    instances_val_file: Optional[Path] = field(default=None, repr=False)
    """coco-panoptic: the instances JSON of the val split, when the root has one (COCO AP ground truth)."""

    @property
    def default_task(self) -> str:
        return DEFAULT_TASK[self.format]

    def rows(self, split: LayoutSplit, on_error: str = "skip", filter_empty: bool = False) -> List[Dict[str, Any]]:
        """The split's rows (``modelscope_plugin.data.datasets`` readers); bad rows are listed once and skipped
        (``on_error="raise"``: one error listing them)."""
        if self.format == "coco-panoptic":
            return read_coco_panoptic(str(split.annotation_file), str(split.label_folder), str(split.image_folder),
                                      on_error=on_error, filter_empty=filter_empty)[0]
        if self.format == "coco-instances":
            return read_coco_instances(str(split.annotation_file), str(split.image_folder), on_error=on_error,
                                       filter_empty=filter_empty)[0]
        if split.pairs is not None:
            return read_label_pairs(split.pairs, len(self.categories), on_error=on_error,
                                    reduce_zero_label=self.reduce_zero_label, ignore_value=self.ignore_value)[0]
        return read_label_folders(str(split.image_folder), str(split.label_folder), len(self.categories),
                                  on_error=on_error, reduce_zero_label=self.reduce_zero_label,
                                  ignore_value=self.ignore_value)[0]

    def instance_evaluation_rows(self, split: LayoutSplit, on_error: str = "skip") -> List[Dict[str, Any]]:
        """Rows with ``annotations_json`` (COCO AP's ground truth) for ``split``: coco-panoptic: the instances JSON
        of the split when the root has one, else ``as_instance_rows`` of the split's rows."""
        if self.format == "coco-panoptic" and split is self.val and self.instances_val_file is not None:
            return read_coco_instances(str(self.instances_val_file), str(split.image_folder), on_error=on_error)[0]
        return self.as_instance_rows(self.rows(split, on_error))

    def as_instance_rows(self, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """This layout's rows as rows with ``annotations_json``: coco-instances rows themselves, coco-panoptic rows
        with their thing segments as RLE."""
        if self.format == "coco-instances":
            return rows
        if self.format != "coco-panoptic":
            raise DatasetLayoutError(f"{self.root}: {self.format} data holds no instances to score with COCO AP")
        return [panoptic_row_as_instance_row(row, self.categories) for row in rows]


def panoptic_row_as_instance_row(row: Dict[str, Any], categories: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A panoptic row with its thing segments as COCO instance annotations (compressed RLE) in ``annotations_json``."""
    from pycocotools import mask as mask_utils

    things = {int(c["id"]) for c in categories if c.get("isthing", True)}
    ids = read_panoptic_png(row["panoptic_path"])
    annotations = []
    for segment in row["segments_info"]:
        if int(segment["category_id"]) not in things:
            continue
        rle = mask_utils.encode(np.asfortranarray((ids == int(segment["id"])).astype(np.uint8)))
        annotations.append({"id": int(segment["id"]), "image_id": row["image_id"],
                            "category_id": int(segment["category_id"]), "iscrowd": int(segment.get("iscrowd", 0)),
                            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                            "segmentation": compressed_rle(rle, ids.shape[0], ids.shape[1])})
    instance_row = {key: row[key] for key in ("image_id", "file_name", "image_path", "height", "width")}
    instance_row["annotations_json"] = json.dumps(annotations)
    return instance_row


def _coco_split(root: Path, kind: str, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    """The ``annotations/{kind}_{name}.json`` split (``name`` None: the one JSON whose split part starts with
    ``prefix`` in any case: ``train2017``, CVAT's ``Train``)."""
    annotations = root / "annotations"
    if name is None:
        candidates = sorted(path for path in annotations.glob(f"{kind}_*.json")
                            if path.stem[len(kind) + 1:].lower().startswith(prefix))
        if not candidates:
            return None
        if len(candidates) > 1:
            raise DatasetLayoutError(f"{root}: several {kind} {prefix} annotation files "
                                     f"({', '.join(c.name for c in candidates)}); name one with --{prefix}-split")
        name = candidates[0].stem[len(kind) + 1:]
    annotation_file = annotations / f"{kind}_{name}.json"
    if not annotation_file.is_file():
        return None
    image_folder = next((folder for folder in (root / name, root / "images" / name, root / "images")
                         if folder.is_dir()), None)
    if image_folder is None:
        raise DatasetLayoutError(f"{root}: {annotation_file.name} found but no image folder {name}/, images/{name}/ "
                                 "or images/")
    split = LayoutSplit(name, image_folder, annotation_file)
    if kind == "panoptic":
        split.label_folder = next((folder for folder in (annotations / f"panoptic_{name}", root / f"panoptic_{name}")
                                   if folder.is_dir()), None)
        if split.label_folder is None:
            raise DatasetLayoutError(f"{root}: {annotation_file.name} found but no PNG folder "
                                     f"annotations/panoptic_{name}/ or panoptic_{name}/")
    return split


def _json_split(root: Path, name: str, annotation_file: Path, image_folder: Path,
                label_folder: Optional[Path] = None) -> Optional[LayoutSplit]:
    """The split of ``annotation_file``, None where there is no such file; its folders must exist then."""
    if not annotation_file.is_file():
        return None
    for folder in (image_folder, label_folder):
        if folder is not None and not folder.is_dir():
            raise DatasetLayoutError(f"{root}: {annotation_file.relative_to(root)} found but no folder "
                                     f"{folder.relative_to(root)}/")
    return LayoutSplit(name, image_folder, annotation_file, label_folder=label_folder)


def _roboflow_split(root: Path, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    """Roboflow's COCO export: ``{name}/_annotations.coco.json`` with the split's images beside it."""
    for candidate in ([name] if name else ROBOFLOW_SPLITS[prefix]):
        split = _json_split(root, candidate, root / candidate / ROBOFLOW_ANNOTATIONS, root / candidate)
        if split is not None:
            return split
    return None


def _labelme_split(root: Path, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    """labelme's ``labelme2coco`` output: one ``annotations.json`` at the root whose ``file_name`` s are relative to
    the root (``JPEGImages/x.jpg``); a training split only (hold out images with ``--val-fraction``)."""
    if prefix != "train" or name not in (None, "annotations"):
        return None
    return _json_split(root, "annotations", root / "annotations.json", root)


def _semantic_split(root: Path, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    name = name or SEMANTIC_SPLITS[prefix]
    image_folder, label_folder = root / "images" / name, root / "annotations" / name
    if image_folder.is_dir() and label_folder.is_dir():
        return LayoutSplit(name, image_folder, label_folder=label_folder)
    return None


def _voc_split(root: Path, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    """``ImageSets/Segmentation/{name}.txt``: one stem per line (or DeepLab's ``train_aug.txt`` pairs of paths, whose
    first names the image); the label folder is the first of ``VOC_LABEL_FOLDERS`` holding every listed stem's PNG
    (else the one holding most: the reader lists the missing ones)."""
    name = name or prefix
    list_file = root / "ImageSets" / "Segmentation" / f"{name}.txt"
    if not (list_file.is_file() and (root / "JPEGImages").is_dir()):
        return None
    stems = [Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()]
    label_folders = [root / folder for folder in VOC_LABEL_FOLDERS if (root / folder).is_dir()]
    if not label_folders:
        raise DatasetLayoutError(f"{root}: {list_file.relative_to(root)} found but no label folder "
                                 f"{'/, '.join(VOC_LABEL_FOLDERS)}/")
    held = [sum((folder / f"{stem}.png").is_file() for stem in stems) for folder in label_folders]
    label_folder = label_folders[held.index(max(held))]
    image_folder = root / "JPEGImages"
    pairs = [(stem, next((image_folder / f"{stem}{extension}" for extension in IMAGE_EXTENSIONS
                          if (image_folder / f"{stem}{extension}").is_file()), image_folder / f"{stem}.jpg"),
              label_folder / f"{stem}.png") for stem in stems]
    return LayoutSplit(name, image_folder, label_folder=label_folder, pairs=pairs)


def _cityscapes_split(root: Path, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    """``leftImg8bit/{name}/{city}/*_leftImg8bit.png`` with ``gtFine/{name}/{city}/*_gtFine_labelTrainIds.png`` (the
    19 train classes, 255 ignored: what cityscapesscripts' ``csCreateTrainIdLabelImgs`` writes)."""
    name = name or prefix
    image_folder, label_folder = root / "leftImg8bit" / name, root / "gtFine" / name
    if not (image_folder.is_dir() and label_folder.is_dir()):
        return None
    pairs = []
    for image_path in sorted(image_folder.glob("*/*_leftImg8bit.png")):
        base = image_path.name[:-len("_leftImg8bit.png")]
        pairs.append((base, image_path, label_folder / image_path.parent.name / f"{base}_gtFine_labelTrainIds.png"))
    if pairs and not any(label_path.is_file() for _, _, label_path in pairs):
        raise DatasetLayoutError(f"{label_folder} holds no *_gtFine_labelTrainIds.png: write them with "
                                 "cityscapesscripts (pip install cityscapesscripts; "
                                 f"CITYSCAPES_DATASET={root} csCreateTrainIdLabelImgs)")
    return LayoutSplit(name, image_folder, label_folder=label_folder, pairs=pairs)


def _cityscapes_panoptic_split(root: Path, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    """``gtFine/cityscapes_panoptic_{name}.json`` and its PNG folder beside it (cityscapesscripts'
    ``csCreatePanopticImgs``), images under ``leftImg8bit/{name}/`` (found in their city folders)."""
    name = name or prefix
    return _json_split(root, name, root / "gtFine" / f"cityscapes_panoptic_{name}.json", root / "leftImg8bit" / name,
                       root / "gtFine" / f"cityscapes_panoptic_{name}")


def read_class_names(classes_file: str) -> List[str]:
    """One class name per line (blank lines at the end ignored)."""
    names = Path(classes_file).read_text().rstrip("\n").split("\n")
    if not names or any(not name.strip() for name in names):
        raise DatasetLayoutError(f"{classes_file}: expected one class name per line, with no blank line")
    return [name.strip() for name in names]


def _ade20k_split(root: Path, kind: str, prefix: str, name: Optional[str]) -> Optional[LayoutSplit]:
    """Mask2Former's ADE20K preparation in ``ADEChallengeData2016`` (``prepare_ade20k_pan_seg.py`` /
    ``prepare_ade20k_ins_seg.py``): ``ade20k_{kind}_{name}.json`` at the root, the panoptic PNGs in
    ``ade20k_panoptic_{name}/``, images in ``images/training/`` and ``images/validation/``."""
    name = name or prefix
    return _json_split(root, name, root / f"ade20k_{kind}_{name}.json",
                       root / "images" / {"train": "training", "val": "validation"}.get(name, name),
                       root / f"ade20k_panoptic_{name}" if kind == "panoptic" else None)


# each format's split finders (root, "train" or "val", the split's name or None), tried in this order: the first that
# finds a training split gives both splits
SPLIT_FINDERS = {
    "coco-panoptic": (lambda root, prefix, name: _coco_split(root, "panoptic", prefix, name),
                      _cityscapes_panoptic_split,
                      lambda root, prefix, name: _ade20k_split(root, "panoptic", prefix, name)),
    "coco-instances": (lambda root, prefix, name: _coco_split(root, "instances", prefix, name),
                       _roboflow_split,
                       lambda root, prefix, name: _ade20k_split(root, "instance", prefix, name),
                       _labelme_split),
    "semantic-folders": (_semantic_split,),
    "pascal-voc": (_voc_split,),
    "cityscapes": (_cityscapes_split,),
}


def _find_splits(root: Path, candidate: str, train_split: Optional[str],
                 val_split: Optional[str]) -> Tuple[Optional[LayoutSplit], Optional[LayoutSplit]]:
    """(train, val) splits of ``candidate`` under ``root``; (None, None) where the format is not there."""
    for find in SPLIT_FINDERS[candidate]:
        train = find(root, "train", train_split)
        if train is not None:
            return train, find(root, "val", val_split)
    return None, None


def _coco_categories(layout: DatasetLayout) -> List[Dict[str, Any]]:
    """The train JSON's categories, less Roboflow's project-level category (``supercategory`` "none", the
    supercategory of the others, used by no annotation of either split: it names the dataset, not a class)."""
    with open(layout.train.annotation_file) as handle:
        train = json.load(handle)
    categories = train["categories"]
    parents = {category.get("supercategory") for category in categories}
    unused = [category for category in categories
              if category.get("supercategory") == "none" and category["name"] in parents]
    if unused:
        used = {int(annotation["category_id"]) for annotation in train.get("annotations", [])}
        if layout.val is not None:
            with open(layout.val.annotation_file) as handle:
                used |= {int(annotation["category_id"]) for annotation in json.load(handle).get("annotations", [])}
        dropped = [category for category in unused if int(category["id"]) not in used]
        if dropped:
            logger.info("dataset %s: category %s left out (the supercategory of the others, never annotated)",
                        layout.root, ", ".join(f"{c['id']} {c['name']!r}" for c in dropped))
            categories = [category for category in categories if category not in dropped]
    return [{"id": int(c["id"]), "name": c["name"], "isthing": bool(c.get("isthing", 1))} for c in categories]


def detect_layout(root, forced_format: Optional[str] = None, train_split: Optional[str] = None,
                  val_split: Optional[str] = None, classes_file: Optional[str] = None,
                  reduce_zero_label: Optional[bool] = None, ignore_value: int = IGNORE_LABEL) -> DatasetLayout:
    """The layout of ``root`` (see the module docstring); ``forced_format`` forces one of ``FORMATS``.

    ``classes_file`` (semantic folders: required; PASCAL VOC: optional): line i names label value i, counted from 1
    with ``reduce_zero_label`` (value 0 is ignored), else from 0; ``reduce_zero_label`` None: the format's
    convention (ADE20K-style folders: True, PASCAL VOC: False). Raises ``DatasetLayoutError`` naming what was
    looked for when nothing matches."""
    root = Path(root)
    if forced_format is not None and forced_format not in FORMATS:
        raise DatasetLayoutError(f"format must be one of {FORMATS}, not {forced_format!r}")
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    for candidate in ([forced_format] if forced_format else list(FORMATS)):
        train, val = _find_splits(root, candidate, train_split, val_split)
        if train is None:
            continue
        reduce = REDUCE_ZERO_LABEL.get(candidate, True) if reduce_zero_label is None else reduce_zero_label
        layout = DatasetLayout(root, candidate, train, val, [], reduce, ignore_value)
        if candidate in REDUCE_ZERO_LABEL:
            if classes_file is not None:
                names = read_class_names(classes_file)
            elif candidate == "pascal-voc":
                labelme_names = root / "class_names.txt"
                names = read_class_names(str(labelme_names)) if labelme_names.is_file() else list(VOC_CLASSES)
            elif candidate == "cityscapes":
                names = list(CITYSCAPES_CLASSES)
            else:
                raise DatasetLayoutError(f"{root}: semantic label folders need --classes FILE (one class name per "
                                         "line, line i = label value i)")
            first_value = 1 if reduce else 0
            layout.categories = [{"id": first_value + index, "name": name, "isthing": False}
                                 for index, name in enumerate(names)]
        else:
            layout.categories = _coco_categories(layout)
            if candidate == "coco-panoptic" and val is not None:
                instances = root / "annotations" / f"instances_{val.name}.json"
                layout.instances_val_file = instances if instances.is_file() else None
        logger.info("dataset %s: %s, train split %s, val split %s", root, candidate, train.name,
                    val.name if val else None)
        return layout
    looked_for = {
        "coco-panoptic": f"annotations/panoptic_{train_split or 'train*'}.json + PNG folder + images, or "
                         f"gtFine/cityscapes_panoptic_{train_split or 'train'}.json (Cityscapes), or "
                         f"ade20k_panoptic_{train_split or 'train'}.json (ADE20K)",
        "coco-instances": f"annotations/instances_{train_split or 'train*'}.json + images, or "
                          f"{train_split or 'train'}/{ROBOFLOW_ANNOTATIONS} (Roboflow), or "
                          f"ade20k_instance_{train_split or 'train'}.json (ADE20K), or annotations.json (labelme)",
        "semantic-folders": f"images/{train_split or 'training'}/ + annotations/{train_split or 'training'}/",
        "pascal-voc": f"ImageSets/Segmentation/{train_split or 'train'}.txt + JPEGImages/ + SegmentationClass/",
        "cityscapes": f"leftImg8bit/{train_split or 'train'}/ + gtFine/{train_split or 'train'}/",
    }
    expected = "; ".join(f"{name}: {looked_for[name]}" for name in ([forced_format] if forced_format else FORMATS))
    raise DatasetLayoutError(f"no known dataset layout under {root} (looked for {expected})")
