"""Training data: dataset rows -> augmented, normalised images and per-segment targets, in a rank-independent order.

Rows are those of ``modelscope_plugin.data.datasets.read_coco_panoptic`` (or their ``MsDataset``): an image, a
COCO panoptic PNG and its ``segments_info``. Targets per task, as Mask2Former's dataset mappers build them:
panoptic = every non-crowd segment, instance = the non-crowd thing segments, semantic = one mask per class present.

Randomness never comes from a global generator: the augmentation of dataset item ``i`` in epoch ``e`` draws from
``numpy.random.default_rng([seed, e, i])`` and the epoch order from ``torch.Generator().manual_seed(seed + e)``, so
what an item becomes does not depend on the rank or worker that loads it, nor on a resume.
"""
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from modelscope_plugin.config import TASKS, PreprocessConfig
from modelscope_plugin.data.datasets import load_panoptic_ground_truth
from modelscope_plugin.errors import TrainingDataError
from modelscope_plugin.inference.preprocess import load_image, normalize_pixels
from modelscope_plugin.modeling.matcher import SegmentationTarget
from modelscope_plugin.training.config import AugmentationConfig


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
            parsed.append(TrainingCategory(int(category["id"]), str(category["name"]), bool(category.get("isthing", 1))))
        else:
            parsed.append(TrainingCategory(int(category.id), str(category.name), bool(category.isthing)))
    ids = [category.id for category in parsed]
    if len(set(ids)) != len(ids):
        raise ValueError(f"category ids repeat: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    return [c for c in parsed if c.isthing] + [c for c in parsed if not c.isthing]


def _resize(rgb: np.ndarray, ids: np.ndarray, height: int, width: int):
    """Image: PIL bilinear; panoptic ids: nearest."""
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((width, height), Image.BILINEAR))
    resized_ids = np.asarray(Image.fromarray(np.ascontiguousarray(ids).astype(np.int32), mode="I")
                             .resize((width, height), Image.NEAREST)).astype(np.int64)
    return resized, resized_ids


def large_scale_jitter(rgb: np.ndarray, ids: np.ndarray, config: AugmentationConfig, rng: np.random.Generator):
    """detectron2's RandomFlip + ResizeScale + FixedSizeCrop on an image and its panoptic id map.

    Returns the (C, C, 3) uint8 image (padding = ``pad_value``) and the (C, C) int64 ids (padding = 0, void), C the
    crop size (``crop_size``, else ``image_size``). Image: PIL bilinear; ids: nearest.
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
    id_map = np.zeros((size, size), dtype=np.int64)
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
        rgb, ids = rgb[top:top + crop_height, left:left + crop_width], ids[top:top + crop_height, left:left + crop_width]
    rgb, ids = _resize_shortest_edge(rgb, ids, config.short_sides, config.long_side_max, rng)
    if rng.uniform() < config.flip_probability:
        rgb, ids = rgb[:, ::-1], ids[:, ::-1]
    size = config.image_size
    image = np.full((size, size, 3), config.pad_value, dtype=np.uint8)
    image[:rgb.shape[0], :rgb.shape[1]] = rgb
    id_map = np.zeros((size, size), dtype=np.int64)
    id_map[:ids.shape[0], :ids.shape[1]] = ids
    return image, id_map


AUGMENTATIONS = {"large_scale_jitter": large_scale_jitter, "fastinst": fastinst_augmentation}


def normalise(rgb: np.ndarray, preprocess: PreprocessConfig) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, normalised as at inference (``preprocessing.normalize_pixels``)."""
    return torch.from_numpy(normalize_pixels(rgb, preprocess)).permute(2, 0, 1).contiguous()


def build_target(ids: np.ndarray, segments: Sequence[Mapping[str, Any]], class_index_of: Mapping[int, int],
                 thing_ids: Sequence[int], task: str) -> SegmentationTarget:
    """Panoptic id map + segments -> labels and (T, H, W) masks; segments with no pixel left are dropped."""
    labels, masks = [], []
    things = set(thing_ids)
    if task == "semantic":
        by_class: Dict[int, np.ndarray] = {}
        for segment in segments:
            label = class_index_of[int(segment["category_id"])]
            mask = ids == int(segment["id"])
            by_class[label] = by_class[label] | mask if label in by_class else mask
        items = sorted(by_class.items())
    else:
        items = [(class_index_of[int(segment["category_id"])], ids == int(segment["id"])) for segment in segments
                 if not segment.get("iscrowd", 0) and (task == "panoptic" or int(segment["category_id"]) in things)]
    for label, mask in items:
        if mask.any():
            labels.append(label)
            masks.append(mask)
    height, width = ids.shape
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


class SegmentationTrainingDataset(Dataset):
    """Rows (a list, an ``MsDataset`` or any indexable of row dicts) -> augmented ``TrainingSample``s."""

    def __init__(self, rows, categories: Sequence[TrainingCategory], task: str, preprocess: PreprocessConfig,
                 augmentation: AugmentationConfig, seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        for name in ("image_size", "crop_size"):
            if getattr(augmentation, name) % preprocess.size_divisor:
                raise ValueError(f"augmentation {name} {getattr(augmentation, name)} is not a multiple of "
                                 f"{preprocess.size_divisor}")
        if augmentation.kind not in AUGMENTATIONS:
            raise ValueError(f"train.augmentation.kind must be one of {sorted(AUGMENTATIONS)}, got {augmentation.kind!r}")
        if augmentation.kind == "fastinst" and augmentation.image_size < augmentation.long_side_max:
            raise ValueError(f"train.augmentation.image_size {augmentation.image_size} is smaller than long_side_max "
                             f"{augmentation.long_side_max}: the resized image would not fit the canvas")
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
        unknown = sorted({int(s["category_id"]) for s in row["segments_info"]} - set(self.class_index_of))
        if unknown:
            raise TrainingDataError(f"training image {image_id}: category ids {unknown} are not in the training "
                                    f"class set {sorted(self.class_index_of)}")
        try:
            rgb = load_image(row["image_path"])
            ids, segments = load_panoptic_ground_truth(row)
        except (OSError, ValueError) as error:
            raise TrainingDataError(f"training image {image_id}: {error}") from error
        if ids.shape != rgb.shape[:2]:
            raise TrainingDataError(f"training image {image_id}: panoptic PNG {row['panoptic_path']} is "
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

    def to(self, device) -> "TrainingBatch":
        return TrainingBatch(self.images.to(device), [SegmentationTarget(t.labels.to(device), t.masks.to(device))
                                                      for t in self.targets], self.indices, self.positions)


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
    return TrainingBatch(torch.stack([sample.image for sample in samples]), [sample.target for sample in samples],
                         [sample.index for sample in samples], [position for _, position in items])


def point_seed(seed: int, step: int, position: int) -> int:
    """Seed of the point sampler of the image at ``position`` of the global batch of ``step``."""
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1, np.uint64)[0] % (2 ** 63))

