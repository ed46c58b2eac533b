"""Typed training settings, read once from the ModelScope trainer configuration (``train.loss``,
``train.augmentation``, ``train.optimizer.paramwise_options``). Defaults are Mask2Former's COCO recipe."""
from dataclasses import dataclass, fields
from typing import Any, Mapping, Tuple, Type, TypeVar, get_args, get_origin, get_type_hints

from ..errors import TrainingConfigError

Settings = TypeVar("Settings")


@dataclass
class LossConfig:
    class_weight: float = 2.0
    """Weight of the cross-entropy term, in the loss and in the matching cost."""
    mask_weight: float = 5.0
    """Weight of the point-sampled binary cross-entropy, in the loss and in the matching cost."""
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    """Cross-entropy weight of the "no object" class."""
    num_points: int = 12544
    """Points per mask (112 x 112), for matching and for the loss."""
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    location_weight: float = 1000.0
    """FastInst only: weight of the location cost in the matching (a query matches only instances it lies in)."""
    proposal_weight: float = 20.0
    """FastInst only: weight of the instance-activation (proposal) cross-entropy."""
    contrastive_weight: float = 0.5
    """OneFormer only: weight of the query-text contrastive term."""
    contrastive_temperature: float = 0.07
    """OneFormer only: initial temperature of the contrastive term (its logit scale, log(1 / temperature), learns)."""


@dataclass
class AugmentationConfig:
    """``kind`` "large_scale_jitter" (Mask2Former): detectron2's ``ResizeScale`` + ``FixedSizeCrop`` and a horizontal
    flip. ``kind`` "fastinst" (official FastInst's instance mapper): with probability ``crop_probability`` a
    ``ResizeShortestEdge`` to one of ``crop_short_sides`` and an ``absolute_range`` ``RandomCrop`` of
    ``crop_size_range``, then ``ResizeShortestEdge`` to one of ``short_sides`` (long side at most ``long_side_max``)
    and the flip; the result is padded to the square ``image_size`` canvas, so batches do not depend on the ranks."""

    image_size: int = 1024
    """Side of the square training crop / canvas (a multiple of 32; "fastinst": at least ``long_side_max``)."""
    kind: str = "large_scale_jitter"
    min_scale: float = 0.1
    max_scale: float = 2.0
    """The image is resized to fit image_size * s, s uniform in [min_scale, max_scale]."""
    crop_size: int = 0
    """"large_scale_jitter": side of the square crop (detectron2's ``FixedSizeCrop``, a multiple of 32); 0: image_size.
    Smaller than image_size, it trains on windows of the jittered images at their test-time scale."""
    flip_probability: float = 0.5
    pad_value: int = 128
    """Image value of the padding below / right of a crop smaller than image_size (before normalisation)."""
    short_sides: Tuple[int, ...] = (416, 448, 480, 512, 544, 576, 608, 640)
    """"fastinst": the shorter side is resized to one of these (detectron2 MIN_SIZE_TRAIN, "choice")."""
    long_side_max: int = 853
    crop_probability: float = 0.5
    crop_short_sides: Tuple[int, ...] = (400, 500, 600)
    crop_size_range: Tuple[int, int] = (384, 600)
    """"fastinst": crop height and width, each uniform in this range (clipped to the image), before the resize."""


@dataclass
class ParameterGroupConfig:
    """detectron2 Mask2Former's ``build_optimizer`` rules."""

    backbone_lr_multiplier: float = 0.1
    norm_weight_decay: float = 0.0
    """Weight decay of every normalisation layer's parameters."""
    embedding_weight_decay: float = 0.0
    """Weight decay of ``nn.Embedding`` weights (queries, level embeddings) and of Swin's position bias tables."""


def settings_from(settings_class: Type[Settings], values: Mapping[str, Any], where: str) -> Settings:
    """A dataclass from a config mapping; one ``TrainingConfigError`` names every unknown key and every value whose
    type is not its field's annotation (ints are accepted for floats, lists for tuples, bools only for bools)."""
    values = dict(values or {})
    annotations = get_type_hints(settings_class)
    known = {field.name for field in fields(settings_class)}
    problems = []
    unknown = sorted(set(values) - known)
    if unknown:
        problems.append(f"unknown {where} keys {unknown}; known: {sorted(known)}")
    settings = {}
    for name in sorted(set(values) & known):
        value, annotation = values[name], annotations[name]
        if get_origin(annotation) is tuple:
            item_type = get_args(annotation)[0]
            if not isinstance(value, (list, tuple)) or not all(_fits(item, item_type) for item in value):
                problems.append(f"{where}.{name} = {value!r} is not a list of {item_type.__name__} values")
                continue
            value = tuple(value)
        elif not _fits(value, annotation):
            problems.append(f"{where}.{name} = {value!r} is not of type {annotation.__name__}")
            continue
        settings[name] = float(value) if annotation is float else value
    if problems:
        raise TrainingConfigError("; ".join(problems))
    return settings_class(**settings)


def _fits(value: Any, expected: type) -> bool:
    """Whether a config value may stand for a field of type ``expected`` (a bool is never a number here)."""
    if isinstance(value, bool) or expected is bool:
        return isinstance(value, bool) and expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)
