"""OneFormer's per-image training targets: the task drawn for the image, the segments that task keeps, and the text
list the contrastive loss embeds (SHI-Labs' unified dataset mapper, transformers' ``OneFormerImageProcessor``).

Per task, from the image's segments (each a class and a mask; empty masks skipped):
- panoptic: every segment;
- instance: the segments of thing classes;
- semantic: one segment per class (masks of a class merged), in the order the classes first appear.
The text list has ``num_text`` entries: "a photo with a {class name}" once per kept segment, grouped by class in
class-index order (at most ``num_text`` of them), then the task's padding sentence, spelled as the reference
spells it ("a semantic photo", "an instance photo", "an panoptic photo"). Tasks are drawn as the reference does:
u ~ U[0, 1), semantic below 0.33, instance below 0.66, panoptic otherwise.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from modelscope_plugin.errors import TaskError
from modelscope_plugin.modeling.matcher import SegmentationTarget

PADDING_TEXT = {"semantic": "a semantic photo", "instance": "an instance photo", "panoptic": "an panoptic photo"}
SEMANTIC_PROBABILITY = 0.33
INSTANCE_PROBABILITY = 0.66
"""Upper bounds of the uniform draw choosing semantic, then instance (the reference's TASK_PROB defaults)."""


def sample_task(generator: torch.Generator) -> str:
    """One task for one image, from its own generator."""
    draw = float(torch.rand((), generator=generator))
    if draw < SEMANTIC_PROBABILITY:
        return "semantic"
    if draw < INSTANCE_PROBABILITY:
        return "instance"
    return "panoptic"


def segments_from_map(segment_map: torch.Tensor, segment_classes: Optional[Dict[int, int]] = None,
                      ignore_index: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H, W) segment ids -> (labels (T,) int64, masks (T, H, W) float), one per id in increasing order,
    ``ignore_index`` left out; labels are ``segment_classes[id]`` or, without a mapping, the ids themselves."""
    segment_ids = torch.unique(segment_map)
    if ignore_index is not None:
        segment_ids = segment_ids[segment_ids != ignore_index]
    # (T, 1, 1) == (1, H, W) -> (T, H, W)
    masks = (segment_map[None] == segment_ids[:, None, None]).float()
    if segment_classes is None:
        return segment_ids.long(), masks
    labels = torch.tensor([segment_classes[int(segment_id)] for segment_id in segment_ids], dtype=torch.int64)
    return labels, masks


def task_target(labels: torch.Tensor, masks: torch.Tensor, task: str, class_names: Sequence[str],
                thing_classes: Sequence[int], num_text: int) -> Tuple[SegmentationTarget, List[str]]:
    """Segments (labels (T,), masks (T, H, W)) -> (the task's target, its ``num_text`` texts)."""
    if task not in PADDING_TEXT:
        raise TaskError(f"task must be one of {tuple(PADDING_TEXT)}, got {task!r}")
    things = set(int(index) for index in thing_classes)
    kept_labels: List[int] = []
    kept_masks: List[torch.Tensor] = []
    for label, mask in zip(labels.tolist(), masks):
        if not bool(mask.any()):
            continue
        if task == "instance" and label not in things:
            continue
        if task == "semantic" and label in kept_labels:
            position = kept_labels.index(label)
            kept_masks[position] = torch.clamp(kept_masks[position] + mask, 0, 1)
            continue
        kept_labels.append(label)
        kept_masks.append(mask)
    counts = torch.bincount(torch.tensor(kept_labels, dtype=torch.int64), minlength=len(class_names)).tolist()
    texts = [f"a photo with a {class_names[index]}" for index, count in enumerate(counts) for _ in range(count)]
    texts = texts[:num_text] + [PADDING_TEXT[task]] * max(0, num_text - len(texts))
    height, width = masks.shape[-2:]
    target_masks = torch.stack(kept_masks) if kept_masks else masks.new_zeros((0, height, width))
    return SegmentationTarget(torch.tensor(kept_labels, dtype=torch.int64), target_masks.float()), texts
