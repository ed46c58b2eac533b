"""Training data: dataset rows -> augmented, normalised images and per-segment targets, in a rank-independent order.

Rows are those of the ``modelscope_plugin.data.datasets`` readers (or their ``MsDataset``), of three kinds:

==============  ===============================================  ================================================
row kind        reader                                           tasks it can train
==============  ===============================================  ================================================
``panoptic``    ``read_coco_panoptic``: PNG + ``segments_info``  panoptic, instance, semantic
``instance``    ``read_coco_instances``: ``annotations_json``    instance (no stuff, so no panoptic or semantic)
``semantic``    ``read_label_folders``: ``label_path``           semantic (no instances)
==============  ===============================================  ================================================

Every kind is decoded to an id map (0 = void) and its segments, so that augmentation and targets are shared:
instance masks (compressed RLE, decoded per item, never cached) are painted into as few id-map layers as keep
overlapping objects apart, (H, W, L); a label map's value v becomes id v + 1 of category id v (ignored values: 0).
Targets per task, as Mask2Former's dataset mappers build them: panoptic = every non-crowd segment, instance = the
non-crowd thing segments, semantic = one mask per class present. Crowd objects never become targets: their pixels
belong to no target mask (detectron2 and mmdet drop crowd annotations the same way).

Randomness never comes from a global generator: the augmentation of dataset item ``i`` in epoch ``e`` draws from
``numpy.random.default_rng([seed, e, i])`` and the epoch order from ``torch.Generator().manual_seed(seed + e)``, so
what an item becomes does not depend on the rank or worker that loads it, nor on a resume.
"""
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from modelscope_plugin.config import TASKS, PreprocessConfig
from modelscope_plugin.data.datasets import (
    label_values_to_classes,
    load_instance_annotations,
    load_panoptic_ground_truth,
)
from modelscope_plugin.errors import TrainingDataError
from modelscope_plugin.inference.preprocess import load_image, normalize_pixels
from modelscope_plugin.modeling.matcher import SegmentationTarget
from modelscope_plugin.training.config import AugmentationConfig

# row kind -> (the tasks it can train, why not the others)
TASKS_OF_ROW_KIND = {
    "panoptic": (TASKS, ""),
    "instance": (("instance",), "COCO instance annotations hold things only, no stuff regions"),
    "semantic": (("semantic",), "label maps hold one class per pixel, no separate objects"),
}



def row_kind(row: Mapping[str, Any]) -> str:
    """'panoptic', 'instance' or 'semantic' from a row's fields (see the module docstring)."""
    if row.get("panoptic_path") is not None and row.get("segments_info") is not None:
        return "panoptic"
    if row.get("annotations_json") is not None:
        return "instance"
    if row.get("label_path") is not None:
        return "semantic"
    raise TrainingDataError(f"training row {row.get('image_id', '?')} has none of panoptic_path + segments_info, "
                            f"annotations_json, label_path (fields: {sorted(row)}): not a row of the "
                            "modelscope_plugin.data.datasets readers")


def rows_kind(rows) -> str:
    """The rows' one kind; raises ``TrainingDataError`` when there are none or they mix kinds. Reads every row's
    fields once (a Hugging Face dataset, one schema for all rows: the first row's non-empty fields)."""
    column_names = getattr(rows, "column_names", None)
    if column_names is not None:  # one schema for all rows: the first row with its None columns dropped
        first = {key: value for key, value in dict(rows[0]).items() if value is not None} if len(rows) else None
        kinds = {row_kind(first)} if first is not None else set()
    else:
        kinds = {row_kind(row) for row in rows}
    if len(kinds) > 1:
        raise TrainingDataError(f"training rows mix annotation kinds {sorted(kinds)}; use one reader's rows")
    if not kinds:
        raise TrainingDataError("no training rows")
    return kinds.pop()


def check_rows_support_task(rows, task: str) -> str:
    """The rows' one kind (``rows_kind``); raises ``TrainingDataError`` naming the kind and the reason when they
    cannot train ``task``."""
    kind = rows_kind(rows)
    supported, reason = TASKS_OF_ROW_KIND[kind]
    if task not in supported:
        first = dict(rows[0])
        named = first.get("label_path") or first.get("image_path") or first.get("image_id")
        raise TrainingDataError(f"training rows of kind {kind!r} ({len(rows)} rows, the first {named}) cannot "
                                f"train the {task} task ({reason}); they can train: {', '.join(supported)}")
    return kind


def row_category_ids(row: Mapping[str, Any], kind: str) -> List[int]:
    """Category ids a row's annotations name (label rows: none, their values are checked when decoded)."""
    if kind == "panoptic":
        return [int(segment["category_id"]) for segment in row["segments_info"]]
    if kind == "instance":
        return [int(annotation["category_id"]) for annotation in load_instance_annotations(row)]
    return []


def _instance_ground_truth(row: Mapping[str, Any]):
    """Instance row -> (H, W, L) int64 id layers and segments (``id``, ``category_id``, ``iscrowd``, ``layer``).

    Each non-crowd object's RLE is decoded and painted with id k + 1 into the first layer where it overlaps no
    earlier object (one layer when nothing overlaps). Crowd objects are not decoded: they never become targets."""
    from pycocotools import mask as mask_utils

    height, width = int(row["height"]), int(row["width"])
    layers: List[np.ndarray] = []
    segments = []
    for number, annotation in enumerate(load_instance_annotations(row), start=1):
        if annotation.get("iscrowd", 0):
            continue
        rle = dict(annotation["segmentation"])
        rle["counts"] = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        mask = mask_utils.decode(rle).astype(bool)
        for layer_index, layer in enumerate(layers):
            if not (layer[mask] != 0).any():
                break
        else:
            layers.append(np.zeros((height, width), np.int64))
            layer_index = len(layers) - 1
        layers[layer_index][mask] = number
        segments.append({"id": number, "category_id": int(annotation["category_id"]), "iscrowd": 0,
                         "layer": layer_index})
    if not layers:
        layers.append(np.zeros((height, width), np.int64))
    return np.stack(layers, axis=-1), segments


def _semantic_ground_truth(row: Mapping[str, Any]):
    """Label row -> (H, W) int64 ids (value v -> v + 1, ignored -> 0) and one segment per value present, of
    category id v (label value = category id: ``read_label_folders``' classes are numbered by value)."""
    with Image.open(row["label_path"]) as image:
        values = np.asarray(image).astype(np.int64)
    offset, ignore_value = label_values_to_classes(row)
    ignored = (values == ignore_value) | (values < offset)
    ids = np.where(ignored, 0, values + 1)
    present = np.unique(values[~ignored])
    segments = [{"id": int(value) + 1, "category_id": int(value), "iscrowd": 0} for value in present]
    return ids, segments


def load_training_ground_truth(row: Mapping[str, Any], kind: str):
    """(H, W) or (H, W, L) int64 ids (0 = void) and the segments they index, for a row of ``kind``."""
    if kind == "panoptic":
        return load_panoptic_ground_truth(row)
    if kind == "instance":
        return _instance_ground_truth(row)
    return _semantic_ground_truth(row)


@dataclass
class TrainingCategory:
    id: int
    name: str
    isthing: bool


def contiguous_categories(categories: Sequence[Any]) -> List[TrainingCategory]:
    """Categories (``Category`` tuples or COCO dicts) in the network's class order: things first, then stuff,
    each in the given order (Mask2Former's labels < num_things_classes are the things)."""
    parsed = []
    for category in categories:
        if isinstance(category, Mapping):
            parsed.append(TrainingCategory(int(category["id"]), str(category["name"]),
                                           bool(category.get("isthing", 1))))
        else:
            parsed.append(TrainingCategory(int(category.id), str(category.name), bool(category.isthing)))
    ids = [category.id for category in parsed]
    if len(set(ids)) != len(ids):
        raise ValueError(f"category ids repeat: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    return [c for c in parsed if c.isthing] + [c for c in parsed if not c.isthing]


def _resize(rgb: np.ndarray, ids: np.ndarray, height: int, width: int):
    """Image: PIL bilinear; ids ((H, W), or (H, W, L): each layer alike): nearest."""
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.BILINEAR))
    layers = ids[..., None] if ids.ndim == 2 else ids
    resized_layers = [np.asarray(Image.fromarray(np.ascontiguousarray(layers[..., index]).astype(np.int32), mode="I")
                                 .resize((width, height), Image.NEAREST)).astype(np.int64)
                      for index in range(layers.shape[-1])]
    resized_ids = resized_layers[0] if ids.ndim == 2 else np.stack(resized_layers, axis=-1)
    return resized, resized_ids


def large_scale_jitter(rgb: np.ndarray, ids: np.ndarray, config: AugmentationConfig, rng: np.random.Generator):
    """detectron2's RandomFlip + ResizeScale + FixedSizeCrop on an image and its panoptic id map.

    Returns the (C, C, 3) uint8 image (padding = ``pad_value``) and the (C, C) int64 ids (padding = 0, void), C the
    crop size (``crop_size``, else ``image_size``). Image: PIL bilinear; ids: nearest. (H, W, L) id layers give
    (C, C, L).
    """
    if rng.uniform() < config.flip_probability:
        rgb, ids = rgb[:, ::-1], ids[:, ::-1]
    height, width = rgb.shape[:2]
    # ResizeScale: fit the (image_size * s) square, keeping the aspect ratio
    random_scale = rng.uniform(config.min_scale, config.max_scale)
    scale = min(config.image_size * random_scale / height, config.image_size * random_scale / width)
    size = config.crop_size or config.image_size
    new_height, new_width = max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)
    resized, resized_ids = _resize(rgb, ids, new_height, new_width)
    # FixedSizeCrop: one uniform fraction of the largest offset in both directions, then pad bottom / right
    fraction = rng.uniform(0.0, 1.0)
    top = int(round(max(new_height - size, 0) * fraction))
    left = int(round(max(new_width - size, 0) * fraction))
    cropped = resized[top:top + size, left:left + size]
    cropped_ids = resized_ids[top:top + size, left:left + size]
    image = np.full((size, size, 3), config.pad_value, dtype=np.uint8)
    image[:cropped.shape[0], :cropped.shape[1]] = cropped
    id_map = np.zeros((size, size) + ids.shape[2:], dtype=np.int64)
    id_map[:cropped_ids.shape[0], :cropped_ids.shape[1]] = cropped_ids
    return image, id_map


def _resize_shortest_edge(rgb: np.ndarray, ids: np.ndarray, short_sides: Sequence[int], long_side_max: float,
                          rng: np.random.Generator):
    """detectron2's ``ResizeShortestEdge`` ("choice"): short side to a random one of ``short_sides``, the long side
    capped at ``long_side_max``, sides rounded with int(x + 0.5)."""
    height, width = rgb.shape[:2]
    short_side = short_sides[int(rng.integers(len(short_sides)))]
    scale = short_side / min(height, width)
    new_height, new_width = height * scale, width * scale
    if max(new_height, new_width) > long_side_max:
        shrink = long_side_max / max(new_height, new_width)
        new_height, new_width = new_height * shrink, new_width * shrink
    return _resize(rgb, ids, max(int(new_height + 0.5), 1), max(int(new_width + 0.5), 1))


def fastinst_augmentation(rgb: np.ndarray, ids: np.ndarray, config: AugmentationConfig, rng: np.random.Generator):
    """Official FastInst's instance mapper (see ``AugmentationConfig``) on an image and its panoptic id map.

    Returns the (S, S, 3) uint8 image (padding = ``pad_value``) and the (S, S) int64 ids (padding = 0, void)."""
    if rng.uniform() < config.crop_probability:
        rgb, ids = _resize_shortest_edge(rgb, ids, config.crop_short_sides, float("inf"), rng)
        # RandomCrop("absolute_range"): crop sides uniform in the range (clipped to the image), uniform offset
        height, width = rgb.shape[:2]
        low, high = config.crop_size_range
        crop_height = int(rng.integers(min(height, low), min(height, high) + 1))
        crop_width = int(rng.integers(min(width, low), min(width, high) + 1))
        top, left = int(rng.integers(height - crop_height + 1)), int(rng.integers(width - crop_width + 1))
        rgb, ids = (rgb[top:top + crop_height, left:left + crop_width],
                    ids[top:top + crop_height, left:left + crop_width])
    rgb, ids = _resize_shortest_edge(rgb, ids, config.short_sides, config.long_side_max, rng)
    if rng.uniform() < config.flip_probability:
        rgb, ids = rgb[:, ::-1], ids[:, ::-1]
    size = config.image_size
    image = np.full((size, size, 3), config.pad_value, dtype=np.uint8)
    image[:rgb.shape[0], :rgb.shape[1]] = rgb
    id_map = np.zeros((size, size) + ids.shape[2:], dtype=np.int64)
    id_map[:ids.shape[0], :ids.shape[1]] = ids
    return image, id_map


AUGMENTATIONS = {"large_scale_jitter": large_scale_jitter, "fastinst": fastinst_augmentation}


def normalise(rgb: np.ndarray, preprocess: PreprocessConfig) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, normalised as at inference (``preprocessing.normalize_pixels``)."""
    return normalize_pixels(rgb, preprocess)


def _segment_mask(ids: np.ndarray, segment: Mapping[str, Any]) -> np.ndarray:
    """(H, W) bool: the segment's pixels in an (H, W) id map or in its ``layer`` of (H, W, L) id layers."""
    if ids.ndim == 3:
        return ids[..., int(segment["layer"])] == int(segment["id"])
    return ids == int(segment["id"])


def build_target(ids: np.ndarray, segments: Sequence[Mapping[str, Any]], class_index_of: Mapping[int, int],
                 thing_ids: Sequence[int], task: str) -> SegmentationTarget:
    """Id map ((H, W), or (H, W, L) layers whose segments name their ``layer``) + segments -> labels and (T, H, W)
    masks; segments with no pixel left are dropped."""
    labels, masks = [], []
    things = set(thing_ids)
    if task == "semantic":
        by_class: Dict[int, np.ndarray] = {}
        for segment in segments:
            label = class_index_of[int(segment["category_id"])]
            mask = _segment_mask(ids, segment)
            by_class[label] = by_class[label] | mask if label in by_class else mask
        items = sorted(by_class.items())
    else:
        items = [(class_index_of[int(segment["category_id"])], _segment_mask(ids, segment)) for segment in segments
                 if not segment.get("iscrowd", 0) and (task == "panoptic" or int(segment["category_id"]) in things)]
    for label, mask in items:
        if mask.any():
            labels.append(label)
            masks.append(mask)
    height, width = ids.shape[:2]
    return SegmentationTarget(
        labels=torch.as_tensor(labels, dtype=torch.int64),
        masks=torch.from_numpy(np.stack(masks)).float() if masks else torch.zeros((0, height, width)))


@dataclass
class TrainingSample:
    image: torch.Tensor
    """(3, S, S) normalised."""
    target: SegmentationTarget
    index: int
    """Dataset index."""
    task: Optional[str] = None
    """OneFormer: the task drawn for the image (``target`` is that task's)."""
    text_tokens: Optional[torch.Tensor] = None
    """OneFormer with a text mapper: (num_text, context_length) CLIP ids of the image's text list."""


class SegmentationTrainingDataset(Dataset):
    """Rows (a list, an ``MsDataset`` or any indexable of row dicts) of one kind -> augmented ``TrainingSample``s.
    Rows that cannot train ``task`` raise ``TrainingDataError`` here, before any item is loaded."""

    def __init__(self, rows, categories: Sequence[TrainingCategory], task: str, preprocess: PreprocessConfig,
                 augmentation: AugmentationConfig, seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        for name in ("image_size", "crop_size"):
            if getattr(augmentation, name) % preprocess.size_divisor:
                raise ValueError(f"augmentation {name} {getattr(augmentation, name)} is not a multiple of "
                                 f"{preprocess.size_divisor}")
        if augmentation.kind not in AUGMENTATIONS:
            raise ValueError(f"train.augmentation.kind must be one of {sorted(AUGMENTATIONS)}, "
                             f"got {augmentation.kind!r}")
        if augmentation.kind == "fastinst" and augmentation.image_size < augmentation.long_side_max:
            raise ValueError(f"train.augmentation.image_size {augmentation.image_size} is smaller than long_side_max "
                             f"{augmentation.long_side_max}: the resized image would not fit the canvas")
        self.kind = check_rows_support_task(rows, task)
        self.rows = rows
        self.task = task
        self.preprocess = preprocess
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0
        self.class_index_of = {category.id: index for index, category in enumerate(categories)}
        self.thing_ids = [category.id for category in categories if category.isthing]

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> TrainingSample:
        row = dict(self.rows[index])
        image_id = row.get("image_id", index)
        try:
            unknown = sorted(set(row_category_ids(row, self.kind)) - set(self.class_index_of))
            if not unknown:
                rgb = load_image(row["image_path"])
                ids, segments = load_training_ground_truth(row, self.kind)
                unknown = sorted({int(s["category_id"]) for s in segments} - set(self.class_index_of))
        except (OSError, ValueError) as error:
            raise TrainingDataError(f"training image {image_id}: {error}") from error
        if unknown:
            raise TrainingDataError(f"training image {image_id}: category ids {unknown} are not in the training "
                                    f"class set {sorted(self.class_index_of)}")
        if ids.shape[:2] != rgb.shape[:2]:
            annotation = row.get("panoptic_path") or row.get("label_path") or "annotations_json"
            raise TrainingDataError(f"training image {image_id}: annotation {annotation} is "
                                    f"{ids.shape[1]}x{ids.shape[0]}, the image {rgb.shape[1]}x{rgb.shape[0]}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, id_map = AUGMENTATIONS[self.augmentation.kind](rgb, ids, self.augmentation, rng)
        target = build_target(id_map, segments, self.class_index_of, self.thing_ids, self.task)
        return TrainingSample(normalise(image, self.preprocess), target, index)


@dataclass
class TrainingBatch:
    images: torch.Tensor
    """(B, 3, S, S)."""
    targets: List[SegmentationTarget]
    indices: List[int]
    """Dataset index of each image."""
    positions: List[int]
    """Position of each image in the global batch (the same for any number of ranks)."""
    tasks: Optional[List[str]] = None
    """OneFormer: each image's task."""
    text_tokens: Optional[torch.Tensor] = None
    """OneFormer with a text mapper: (B, num_text, context_length) CLIP ids."""

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(self.images.to(device), [SegmentationTarget(t.labels.to(device), t.masks.to(device))
                                                      for t in self.targets], self.indices, self.positions,
                             self.tasks, None if self.text_tokens is None else self.text_tokens.to(device))


class GlobalBatchSampler(Sampler):
    """Batches of dataset indices for one rank: the epoch's permutation (seed + epoch) cut into global batches of
    ``global_batch_size`` (the last incomplete one dropped); rank r takes the r-th slice of each.

    Yields lists of (dataset index, position in the global batch)."""

    def __init__(self, dataset_size: int, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if global_batch_size % world_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by {world_size} ranks")
        if dataset_size < global_batch_size:
            raise ValueError(f"the training set has {dataset_size} images, fewer than one global batch "
                             f"({global_batch_size})")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.dataset_size // self.global_batch_size

    def __iter__(self) -> Iterator[List[tuple]]:
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.dataset_size)
        for batch in range(self.start_batch, len(self)):
            first = batch * self.global_batch_size + self.rank * self.per_rank
            yield [(int(order[first + offset]), self.rank * self.per_rank + offset) for offset in range(self.per_rank)]


class PositionedDataset(Dataset):
    """Lets a DataLoader's batch sampler hand (index, position) pairs to the dataset."""

    def __init__(self, dataset: SegmentationTrainingDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, position = item
        return self.dataset[index], position


def collate(items: Sequence[tuple]) -> TrainingBatch:
    samples = [sample for sample, _ in items]
    tasks = [sample.task for sample in samples] if samples[0].task is not None else None
    text_tokens = (torch.stack([sample.text_tokens for sample in samples]) if samples[0].text_tokens is not None
                   else None)
    return TrainingBatch(torch.stack([sample.image for sample in samples]), [sample.target for sample in samples],
                         [sample.index for sample in samples], [position for _, position in items], tasks,
                         text_tokens)


def point_seed(seed: int, step: int, position: int) -> int:
    """Seed of the point sampler of the image at ``position`` of the global batch of ``step``."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1, np.uint64)[0] % (2 ** 63))

