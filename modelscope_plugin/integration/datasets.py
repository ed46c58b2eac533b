"""ModelScope custom dataset for the ``DetDataset`` / ``DetSourceCocoPanoptic`` data the r50 card's EasyCV
configuration describes, read from the folder a hub dataset archive was extracted to.

``MsDataset.load(name, namespace=..., split=...)`` of a dataset shipped as an archive returns an ``MsDataset`` over an
``ExternalDataset`` whose ``config_kwargs`` carry ``split_config`` (``{split: extracted folder}``) and the dataset's
meta arguments. ModelScope's ``to_custom_dataset`` then builds ``CUSTOM_DATASETS[task][dataset.{train,val}.type]``
with the ``dataset.{train,val}`` section, ``mode``, ``preprocessor`` and those ``config_kwargs``. This package's
trainer names this class's type there (``DATASET_TYPE``) in place of ``DetDataset``, so EasyCV's own ``DetDataset``
(registered under the same group where pai-easycv is installed) keeps serving EasyCV's models.

``${data_root}`` in the data source's paths is replaced by the split folder (the first value of ``split_config``,
trailing separator removed), as ModelScope's ``EasyCVBaseDataset`` does. Rows are ``read_coco_panoptic``'s (every
row checked, bad ones listed once and skipped); categories come from the panoptic annotation file.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from modelscope.msdatasets.dataset_cls.custom_datasets.builder import CUSTOM_DATASETS
from modelscope.utils.constant import ModeKeys, Tasks
from torch.utils.data import Dataset

from modelscope_plugin.data.datasets import read_coco_panoptic
from modelscope_plugin.errors import TrainingConfigError, TrainingDataError
from modelscope_plugin.integration.registry import DATASET_TYPE

DATA_ROOT_PATTERN = "${data_root}"
DATA_SOURCE_TYPE = "DetSourceCocoPanoptic"


@dataclass
class PanopticDataSource:
    """A ``DetSourceCocoPanoptic`` section (paths with ``${data_root}`` resolved)."""

    pan_ann_file: str
    img_prefix: str
    seg_prefix: str
    ann_file: Optional[str] = None
    """COCO instances JSON of the same images: ground truth of box and mask AP."""
    thing_classes: Optional[List[str]] = None
    stuff_classes: Optional[List[str]] = None
    filter_empty_gt: bool = False
    """Leave out images without a thing segment (crowd or not), as EasyCV does outside test mode."""
    iscrowd: bool = False
    test_mode: bool = False
    pipeline: List[Dict[str, Any]] = field(default_factory=list)
    outfile_prefix: Optional[str] = None


def replace_data_root(values: Any, data_root: str) -> Any:
    """``values`` (nested dicts / lists) with ``${data_root}`` in every string replaced by ``data_root``."""
    if isinstance(values, str):
        return values.replace(DATA_ROOT_PATTERN, data_root)
    if isinstance(values, Mapping):
        return {key: replace_data_root(value, data_root) for key, value in values.items()}
    if isinstance(values, (list, tuple)):
        return type(values)(replace_data_root(value, data_root) for value in values)
    return values


def data_root_of(split_config: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The extracted folder of a hub dataset's ``split_config`` (its first value), without a trailing separator."""
    if not split_config:
        return None
    return str(next(iter(split_config.values()))).rstrip(os.sep)


def panoptic_data_source(values: Mapping[str, Any], data_root: Optional[str], where: str) -> PanopticDataSource:
    """A ``data_source`` section -> ``PanopticDataSource``; one ``TrainingConfigError`` naming every problem."""
    values = dict(values or {})
    problems = []
    source_type = values.pop("type", DATA_SOURCE_TYPE)
    if source_type != DATA_SOURCE_TYPE:
        problems.append(f"type {source_type!r} is not {DATA_SOURCE_TYPE}")
    known = set(PanopticDataSource.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        problems.append(f"unknown keys {unknown} (known: {sorted(known)})")
    missing = sorted(name for name in ("pan_ann_file", "img_prefix", "seg_prefix") if not values.get(name))
    if missing:
        problems.append(f"missing {missing}")
    if data_root is not None:
        values = replace_data_root(values, data_root)
    unresolved = sorted(name for name, value in values.items() if isinstance(value, str) and DATA_ROOT_PATTERN in value)
    if unresolved:
        problems.append(f"{unresolved} hold {DATA_ROOT_PATTERN} but the dataset has no split_config (it is not an "
                        "MsDataset of an extracted hub archive); give the paths")
    if problems:
        raise TrainingConfigError(f"{where}: " + "; ".join(problems))
    return PanopticDataSource(**{key: value for key, value in values.items() if key in known})


def annotation_categories(annotation_file: str) -> List[Dict[str, Any]]:
    """The ``categories`` of a COCO JSON (``id``, ``name``, ``isthing``)."""
    with open(annotation_file) as handle:
        categories = json.load(handle)["categories"]
    return [{"id": int(c["id"]), "name": str(c["name"]), "isthing": bool(c.get("isthing", 1))} for c in categories]


def class_list_difference(categories: List[Dict[str, Any]], thing_classes: Optional[List[str]],
                          stuff_classes: Optional[List[str]], where: str) -> Optional[str]:
    """A note when the configuration's class lists differ from the annotation file's categories, else None."""
    if thing_classes is None and stuff_classes is None:
        return None
    things = [c["name"] for c in categories if c["isthing"]]
    stuff = [c["name"] for c in categories if not c["isthing"]]
    if list(thing_classes or []) == things and list(stuff_classes or []) == stuff:
        return None
    return (f"{where}: thing_classes / stuff_classes ({len(thing_classes or [])} + {len(stuff_classes or [])} "
            f"names) differ from the annotation file's categories ({len(things)} things + {len(stuff)} stuff, "
            f"e.g. {', '.join((things + stuff)[:5])}); the annotation file's categories are used")


class CocoPanopticDetDataset(Dataset):
    """Rows of a ``DetSourceCocoPanoptic`` data source (``read_coco_panoptic``'s rows), with its categories.

    Accepts what ModelScope's ``to_custom_dataset`` passes: ``split_config``, ``preprocessor`` and ``mode``, the
    ``dataset.{train,val}`` section (``data_source``, ``pipeline``; ``imgs_per_gpu`` / ``workers_per_gpu``), and the
    hub dataset's meta arguments (logged, not used: this class reads the folder itself). The ``pipeline`` is read by
    the trainer, which turns it into its own augmentation; items are rows, not transformed images. ``notes`` lists
    what was ignored or left out (the trainer logs them).
    """

    def __init__(self, split_config: Optional[Dict[str, Any]] = None, preprocessor: Any = None,
                 mode: Optional[str] = None, data_source: Optional[Mapping[str, Any]] = None,
                 pipeline: Optional[List[Mapping[str, Any]]] = None, imgs_per_gpu: Optional[int] = None,
                 workers_per_gpu: Optional[int] = None, **meta_arguments: Any):
        where = f"dataset.{'train' if mode == ModeKeys.TRAIN else 'val'}.data_source"
        self.data_root = data_root_of(split_config)
        self.source = panoptic_data_source(data_source or {}, self.data_root, where)
        self.mode = mode
        self.pipeline = list(pipeline or [])
        self.notes: List[str] = []
        if preprocessor is not None:
            self.notes.append(f"{where}: the preprocessor {type(preprocessor).__name__} is not used (the trainer "
                              "prepares images itself)")
        if meta_arguments:
            self.notes.append(f"{where}: hub dataset arguments not used: {sorted(meta_arguments)}")
        self.rows, self.categories = self._read(where)

    def _read(self, where: str) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        source = self.source
        for name, is_folder in (("pan_ann_file", False), ("seg_prefix", True), ("img_prefix", True),
                                ("ann_file", False)):
            path = getattr(source, name)
            if path is None:
                continue
            exists = os.path.isdir(path) if is_folder else os.path.isfile(path)
            if not exists:
                raise TrainingDataError(f"{where}.{name}: {'folder' if is_folder else 'file'} {path} does not exist"
                                        + (f" (data root {self.data_root})" if self.data_root else ""))
        try:
            categories = annotation_categories(source.pan_ann_file)
            rows, _ = read_coco_panoptic(source.pan_ann_file, source.seg_prefix, source.img_prefix, on_error="skip")
        except (OSError, ValueError, KeyError) as error:
            raise TrainingDataError(f"{where}.pan_ann_file {source.pan_ann_file}: {type(error).__name__}: "
                                    f"{error}") from error
        difference = class_list_difference(categories, source.thing_classes, source.stuff_classes, where)
        if difference:
            self.notes.append(difference)
        if source.filter_empty_gt and not source.test_mode:
            thing_ids = {c["id"] for c in categories if c["isthing"]}
            kept = [row for row in rows if any(s["category_id"] in thing_ids for s in row["segments_info"])]
            if len(kept) < len(rows):
                self.notes.append(f"{where}: filter_empty_gt left out {len(rows) - len(kept)} images without a thing")
            rows = kept
        if not rows:
            raise TrainingDataError(f"{where}: no usable image in {source.pan_ann_file}")
        return rows, categories

    @property
    def instances_file(self) -> Optional[str]:
        return self.source.ann_file

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.rows[index]


CUSTOM_DATASETS.register_module(group_key=Tasks.image_segmentation, module_name=DATASET_TYPE,
                                module_cls=CocoPanopticDetDataset, force=True)
