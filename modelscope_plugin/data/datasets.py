"""Dataset readers: COCO panoptic, COCO instances, ADE20K folders -> rows of file paths and annotations.

Rows hold paths and small annotation records only; images and label maps are decoded when evaluated. Rows whose
files are missing or unreadable, or whose annotations name unknown categories, are reported by image id and then
skipped (``on_error="skip"``) or raise one error listing them all (``on_error="raise"``). With ``check_images``
(the default) the readers also decode every image and annotation PNG and compare their sizes, so that a label map
of the wrong size is found here rather than during training.

Checks per reader: unknown category ids; missing, unreadable or mis-sized files; COCO instances: polygons with fewer
than 3 points are dropped (detectron2's rule) and an object left with no polygon rejects its image, RLE sizes must be
the image's. Empty images (no non-crowd object) are kept, or left out with ``filter_empty=True``, as detectron2's
``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` does for training (left out silently, not listed as problems).

``as_ms_dataset`` wraps rows in ModelScope's ``MsDataset``: ``MsDataset.to_ms_dataset`` accepts a Hugging Face
``datasets.Dataset`` (modelscope/msdatasets/ms_dataset.py), built here with ``Dataset.from_list``. Nested fields
whose structure varies between rows (COCO instance segmentations: polygons or RLE) are stored as JSON strings,
since Arrow needs one schema per column.
"""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image

from modelscope_plugin.errors import DatasetProblemsError

logger = logging.getLogger(__name__)
IGNORE_LABEL = 255


def rgb_to_id(color_image: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) -> segment ids ``R + 256 G + 256^2 B`` (panopticapi ``rgb2id``)."""
    if color_image.dtype == np.uint8:
        # shifts on int32 (ids < 2^24), a third of the memory traffic of int64 multiplies
        ids = color_image[..., 0].astype(np.int32)
        ids |= color_image[..., 1].astype(np.int32) << 8
        ids |= color_image[..., 2].astype(np.int32) << 16
        return ids.astype(np.int64)
    color_image = color_image.astype(np.int64)
    return color_image[..., 0] + 256 * color_image[..., 1] + 256 * 256 * color_image[..., 2]


def read_panoptic_png(path: str) -> np.ndarray:
    """COCO panoptic PNG file -> (H, W) int64 segment ids, as PIL's ``convert("RGB")`` + ``rgb_to_id``.

    8-bit RGB(A) files (every COCO panoptic PNG) are decoded by OpenCV, about twice as fast as PIL here; anything
    else (grayscale, palette, 16-bit, unreadable) goes through PIL, whose errors name the problem."""
    decoded = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if decoded is not None and decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] in (3, 4):
        return rgb_to_id(decoded[..., 2::-1])  # BGR(A) -> RGB
    with Image.open(path) as image:
        return rgb_to_id(np.asarray(image.convert("RGB")))


def id_to_rgb(id_map: np.ndarray) -> np.ndarray:
    """Segment ids (H, W) -> COCO panoptic PNG colours (H, W, 3) uint8 (panopticapi ``id2rgb``)."""
    id_map = id_map.astype(np.int64)
    return np.stack([id_map % 256, id_map // 256 % 256, id_map // (256 * 256) % 256], axis=-1).astype(np.uint8)


@dataclass
class RowProblem:
    """One rejected row: the image id and why."""
    image_id: Any
    reason: str


def _finish(rows: List[Dict[str, Any]], problems: List[RowProblem],
            on_error: str) -> Tuple[List[Dict[str, Any]], List[RowProblem]]:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
    if problems and on_error == "raise":
        raise DatasetProblemsError(problems)
    for problem in problems:
        logger.warning("skipping image %s: %s", problem.image_id, problem.reason)
    return rows, problems


def _readable_image(path: str) -> Optional[str]:
    """None if the file exists and decodes, else the reason."""
    return _decoded_size(path)[0]


EXIF_ORIENTATION = 0x0112
EXIF_TRANSPOSED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height (a portrait photo stored landscape)."""


def _decoded_size(path: str) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """(None, (height, width)) if the file exists and decodes, else (the reason, None). The size is the one after
    the EXIF orientation, the frame training and inference see (``inference.preprocess.load_image``) and annotation
    tools draw in, as detectron2's ``check_image_size`` does."""
    if not os.path.isfile(path):
        return f"missing file {path}", None
    try:
        with Image.open(path) as image:
            image.load()  # full decode: verify() misses truncated pixel data
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in EXIF_TRANSPOSED:
                width, height = height, width
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError) for corrupt files
        return f"unreadable file {path}: {type(error).__name__}: {error}", None
    return None, (height, width)


def _readable_pair(image_path: str, label_path: str, what: str,
                   declared_size: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """None if both files decode and have one size (and ``declared_size``, (height, width), if given), else why."""
    reason, image_size = _decoded_size(image_path)
    if reason:
        return reason
    reason, label_size = _decoded_size(label_path)
    if reason:
        return reason
    if label_size != image_size:
        return (f"{what} {label_path} is {label_size[1]}x{label_size[0]}, "
                f"the image {image_path} {image_size[1]}x{image_size[0]}")
    if declared_size is not None and tuple(declared_size) != image_size:
        return (f"image {image_path} is {image_size[1]}x{image_size[0]}, the annotation file says "
                f"{declared_size[1]}x{declared_size[0]}")
    return None


class ImageFinder:
    """A JSON's ``file_name`` -> its path under ``folder``: ``folder/file_name``, else the one file of that base name
    anywhere under ``folder`` (exports whose ``file_name`` keeps the exporter's subfolder, such as labelme2coco's
    ``JPEGImages/x.jpg``; Cityscapes' per-city folders). The folder is walked once, at the first miss."""

    def __init__(self, folder: str):
        self.folder = folder
        self._paths_of_name: Optional[Dict[str, List[str]]] = None

    def __call__(self, file_name: str) -> str:
        direct = os.path.join(self.folder, file_name)
        if os.path.isfile(direct):
            return direct
        if self._paths_of_name is None:
            self._paths_of_name = {}
            for parent, _, names in os.walk(self.folder):
                for name in names:
                    self._paths_of_name.setdefault(name, []).append(os.path.join(parent, name))
        found = self._paths_of_name.get(os.path.basename(file_name), [])
        return found[0] if len(found) == 1 else direct


def _integer_image_ids(images: List[Dict[str, Any]]) -> Dict[str, int]:
    """The JSON's image ids (as text) -> int image ids: the ids themselves where every one is an integer, else 1, 2,
    ... in the ``images`` order (Cityscapes' panoptic JSON names its images by strings such as
    ``frankfurt_000000_000294``)."""
    raw_ids = [str(image["id"]) for image in images]
    if all(raw_id.isdigit() for raw_id in raw_ids):
        return {raw_id: int(raw_id) for raw_id in raw_ids}
    return {raw_id: position for position, raw_id in enumerate(raw_ids, start=1)}


def read_coco_panoptic(annotation_file: str, panoptic_folder: str, image_folder: str,
                       on_error: str = "skip", check_images: bool = True,
                       filter_empty: bool = False) -> Tuple[List[Dict[str, Any]], List[RowProblem]]:
    """COCO panoptic JSON + PNG folder -> (rows, problems).

    Row: ``image_id, file_name, image_path, height, width, panoptic_path, segments_info`` (``id, category_id,
    iscrowd, area, bbox``). ``check_images`` decodes every image and PNG up front (catches corrupt files early)
    and checks that image, PNG and the JSON's height / width agree. ``filter_empty``: leave out images without a
    non-crowd segment.
    """
    with open(annotation_file) as handle:
        data = json.load(handle)
    known_categories = {int(category["id"]) for category in data["categories"]}
    integer_id = _integer_image_ids(data["images"])
    images = {integer_id[str(image["id"])]: image for image in data["images"]}
    find_image = ImageFinder(image_folder)
    rows, problems = [], []
    for annotation in data["annotations"]:
        image_id = integer_id.get(str(annotation["image_id"]), annotation["image_id"])
        image = images.get(image_id)
        if image is None:
            problems.append(RowProblem(image_id, "annotation for an image not listed in 'images'"))
            continue
        image_path = find_image(image["file_name"])
        panoptic_path = os.path.join(panoptic_folder, annotation["file_name"])
        unknown = sorted({int(s["category_id"]) for s in annotation["segments_info"]} - known_categories)
        reason = None
        if unknown:
            reason = f"unknown category ids {unknown}"
        elif check_images:
            reason = _readable_pair(image_path, panoptic_path, "panoptic PNG",
                                    (int(image["height"]), int(image["width"])))
        elif not (os.path.isfile(image_path) and os.path.isfile(panoptic_path)):
            reason = f"missing file {image_path if not os.path.isfile(image_path) else panoptic_path}"
        if reason:
            problems.append(RowProblem(image_id, reason))
            continue
        row = {
            "image_id": int(image_id), "file_name": image["file_name"], "image_path": image_path,
            "height": int(image["height"]), "width": int(image["width"]), "panoptic_path": panoptic_path,
            "segments_info": [{"id": int(s["id"]), "category_id": int(s["category_id"]),
                               "iscrowd": int(s.get("iscrowd", 0)), "area": int(s.get("area", 0)),
                               "bbox": [int(v) for v in s.get("bbox", [0, 0, 0, 0])]}
                              for s in annotation["segments_info"]],
        }
        if not filter_empty or _any_not_crowd(row["segments_info"]):
            rows.append(row)
    return _finish(rows, problems, on_error)


def _any_not_crowd(objects: Sequence[Dict[str, Any]]) -> bool:
    """Whether any of the segments or annotations is not a crowd region (the readers' ``filter_empty`` rule)."""
    return not all(item.get("iscrowd", 0) for item in objects)


def has_objects(row: Dict[str, Any]) -> bool:
    """Whether a reader row holds a non-crowd segment (panoptic rows) or object (instance rows); label rows do."""
    if row.get("segments_info") is not None:
        return _any_not_crowd(row["segments_info"])
    if row.get("annotations_json") is not None:
        return _any_not_crowd(json.loads(row["annotations_json"]))
    return True


def compressed_rle(segmentation: Any, height: int, width: int) -> Dict[str, Any]:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> one compressed RLE ``{"size": [height,
    width], "counts": str}``. Polygons with fewer than 3 points are dropped (detectron2's rule); raises
    ``ValueError`` when none is left or an RLE's size is not (height, width)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if segmentation and not isinstance(segmentation[0], (list, tuple)):  # one flat polygon, not nested
            segmentation = [segmentation]
        polygons = [[float(value) for value in polygon] for polygon in segmentation
                    if len(polygon) >= 6 and len(polygon) % 2 == 0]
        if not polygons:
            raise ValueError(f"no polygon with 3 points or more ({len(segmentation)} given)")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(side) for side in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE size {list(segmentation['size'])} is not the image's [{height}, {width}]")
        if isinstance(segmentation["counts"], list):  # uncompressed
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": segmentation["counts"]}
    else:
        raise ValueError(f"segmentation is neither polygons nor RLE: {str(segmentation)[:80]}")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def read_coco_instances(annotation_file: str, image_folder: str, on_error: str = "skip",
                        check_images: bool = True,
                        filter_empty: bool = False) -> Tuple[List[Dict[str, Any]], List[RowProblem]]:
    """COCO instances JSON -> (rows, problems). Row: ``image_id, file_name, image_path, height, width,
    annotations_json`` (the image's annotations, JSON text, each ``segmentation`` converted once to compressed RLE
    by ``compressed_rle``). ``check_images`` decodes every image and checks its size against the JSON's.
    ``filter_empty``: leave out images without a non-crowd object (else they are kept)."""
    with open(annotation_file) as handle:
        data = json.load(handle)
    known_categories = {int(category["id"]) for category in data["categories"]}
    annotations_of: Dict[int, List[Dict[str, Any]]] = {}
    for annotation in data.get("annotations", []):
        annotations_of.setdefault(int(annotation["image_id"]), []).append(annotation)
    find_image = ImageFinder(image_folder)
    rows, problems = [], []
    for image in data["images"]:
        image_id = int(image["id"])
        image_path = find_image(image["file_name"])
        # some exporters leave out the image size: the decoded image's is taken then
        declared = (int(image["height"]), int(image["width"])) if "height" in image and "width" in image else None
        height, width = declared or (0, 0)
        annotations = annotations_of.get(image_id, [])
        unknown = sorted({int(a["category_id"]) for a in annotations} - known_categories)
        if unknown:
            reason = f"unknown category ids {unknown}"
        elif check_images or declared is None:
            reason, size = _decoded_size(image_path)
            if reason is None and declared is None:
                height, width = size
            elif reason is None and size != declared:
                reason = f"image {image_path} is {size[1]}x{size[0]}, the annotation file says {width}x{height}"
        else:
            reason = None if os.path.isfile(image_path) else f"missing file {image_path}"
        converted = []
        for annotation in annotations if reason is None else ():
            if "segmentation" not in annotation:
                reason = f"annotation {annotation.get('id')}: no segmentation"
                break
            try:
                rle = compressed_rle(annotation["segmentation"], height, width)
            except ValueError as error:
                reason = f"annotation {annotation.get('id')}: {error}"
                break
            converted.append(dict(annotation, segmentation=rle))
        if reason:
            problems.append(RowProblem(image_id, reason))
            continue
        if not filter_empty or _any_not_crowd(converted):
            rows.append({"image_id": image_id, "file_name": image["file_name"], "image_path": image_path,
                         "height": height, "width": width, "annotations_json": json.dumps(converted)})
    return _finish(rows, problems, on_error)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def read_label_folders(image_folder: str, label_folder: str, number_of_classes: int, on_error: str = "skip",
                       check_images: bool = True, label_suffix: str = ".png", reduce_zero_label: bool = True,
                       ignore_value: int = IGNORE_LABEL) -> Tuple[List[Dict[str, Any]], List[RowProblem]]:
    """ADE20K-style image + label-PNG folders (every image of ``image_folder``, paired by file stem) -> (rows,
    problems); see ``read_label_pairs``."""
    pairs = []
    for file_name in sorted(os.listdir(image_folder)):
        stem, extension = os.path.splitext(file_name)
        if extension.lower() in IMAGE_EXTENSIONS:
            pairs.append((stem, os.path.join(image_folder, file_name), os.path.join(label_folder, stem + label_suffix)))
    return read_label_pairs(pairs, number_of_classes, on_error, check_images, reduce_zero_label, ignore_value)


def read_label_pairs(pairs: Sequence[Tuple[str, str, str]], number_of_classes: int, on_error: str = "skip",
                     check_images: bool = True, reduce_zero_label: bool = True,
                     ignore_value: int = IGNORE_LABEL) -> Tuple[List[Dict[str, Any]], List[RowProblem]]:
    """(image id, image path, label PNG path) triples -> (rows, problems).

    Row: ``image_id``, ``file_name``, ``image_path``, ``label_path``, ``reduce_zero_label``, ``ignore_value``. Label
    values: ``ignore_value`` (255 unless declared) is ignored; with ``reduce_zero_label`` (ADE20K) 0 is ignored too
    and value v is class v - 1, else value v is class v. ``check_images`` decodes both files, checks their sizes
    agree, that the label map holds one value per pixel (grayscale or palette, not a colour rendering) and that no
    value names a class beyond ``number_of_classes``."""
    rows, problems = [], []
    largest_allowed = number_of_classes if reduce_zero_label else number_of_classes - 1
    for image_id, image_path, label_path in pairs:
        image_path, label_path = str(image_path), str(label_path)
        if check_images:
            reason = _readable_pair(image_path, label_path, "label map")
            if reason is None:
                with Image.open(label_path) as label_image:
                    mode, labels = label_image.mode, np.asarray(label_image)
                values = np.unique(labels)
                values = values[values != ignore_value]
                if labels.ndim != 2:
                    reason = (f"label map {label_path} is a {mode} image: expected one label value per pixel "
                              "(a grayscale or palette PNG), not a colour rendering")
                elif values.size and int(values.max()) > largest_allowed:
                    reason = (f"label value {int(values.max())} is beyond the {number_of_classes} classes "
                              f"(ignore value {ignore_value}, reduce_zero_label {reduce_zero_label})")
        else:
            missing = [p for p in (image_path, label_path) if not os.path.isfile(p)]
            reason = f"missing file {missing[0]}" if missing else None
        if reason:
            problems.append(RowProblem(image_id, reason))
            continue
        rows.append({"image_id": image_id, "file_name": os.path.basename(image_path), "image_path": image_path,
                     "label_path": label_path, "reduce_zero_label": bool(reduce_zero_label),
                     "ignore_value": int(ignore_value)})
    return _finish(rows, problems, on_error)


def as_ms_dataset(rows: Sequence[Dict[str, Any]]):
    """Rows -> ModelScope ``MsDataset`` over a Hugging Face ``datasets.Dataset``."""
    import datasets
    from modelscope.msdatasets import MsDataset

    return MsDataset.to_ms_dataset(datasets.Dataset.from_list(list(rows)))


# ---------------------------------------------------------------- ground truth decoding (per row, on demand)

def load_panoptic_ground_truth(row: Dict[str, Any]) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """(H, W) int64 segment ids (0 = void) and the row's segments."""
    return read_panoptic_png(row["panoptic_path"]), list(row["segments_info"])


def panoptic_to_semantic(ids: np.ndarray, segments: Sequence[Dict[str, Any]], class_index_of_category: Dict[int, int],
                         ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Panoptic ids -> (H, W) contiguous class map (void and unknown categories -> ``ignore_label``); crowd
    segments keep their class, as detectron2/Mask2Former's panoptic -> semantic conversion does."""
    # lookup table over the segment ids present: sorted ids -> class index
    segment_ids = np.array([0] + [int(s["id"]) for s in segments], dtype=np.int64)
    classes = np.array([ignore_label] + [class_index_of_category.get(int(s["category_id"]), ignore_label)
                                         for s in segments], dtype=np.int64)
    order = np.argsort(segment_ids)
    positions = np.searchsorted(segment_ids[order], ids)
    positions = np.clip(positions, 0, len(order) - 1)
    found = segment_ids[order][positions] == ids
    return np.where(found, classes[order][positions], ignore_label)


def label_values_to_classes(row: Dict[str, Any]) -> Tuple[int, int]:
    """(offset, ignore value) of a label row: class = value - offset (1 with ``reduce_zero_label``, its default)."""
    return (1 if row.get("reduce_zero_label", True) else 0), int(row.get("ignore_value", IGNORE_LABEL))


def load_label_map(row: Dict[str, Any], ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """ADE20K-style label PNG -> (H, W) class map; the row's ignore value (and 0 with ``reduce_zero_label``) ->
    ``ignore_label``; other values: value - 1 with ``reduce_zero_label``, else the value."""
    with Image.open(row["label_path"]) as image:
        labels = np.asarray(image).astype(np.int64)
    offset, ignore_value = label_values_to_classes(row)
    ignored = (labels == ignore_value) | (labels < offset)
    return np.where(ignored, ignore_label, labels - offset)


def load_instance_annotations(row: Dict[str, Any]) -> List[Dict[str, Any]]:
    return json.loads(row["annotations_json"])
