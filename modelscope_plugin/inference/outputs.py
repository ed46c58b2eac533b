"""Raw segments -> the output contract shared by every task (README, "Output (every task)").

Huge inputs: post-processing runs at ``postprocess_size`` (at most ``DEFAULT_MAX_POSTPROCESS_PIXELS`` pixels, same
aspect ratio) and ``build_outputs`` brings the integer results to the full input size by nearest-neighbour
indexing. So the float maps of post-processing (one per query it upsamples) never exceed that many pixels, and
the full-size output costs one byte per pixel per mask plus 4 for ``panoptic_seg`` / ``sem_seg``.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from modelscope_plugin.inference.postprocess import Segment, mask_to_box

# the values of ModelScope's output keys (modelscope.outputs), written out so that the inference path (``Predictor``)
# imports without ModelScope: benchmarks/gpu_check.py runs on machines that lack it
MASKS, LABELS, SCORES, BOXES = "masks", "labels", "scores", "boxes"

# 2048 x 2048: 1080p and 1440p frames and every COCO / ADE20K image are post-processed at full size, as the references
DEFAULT_MAX_POSTPROCESS_PIXELS = 2048 * 2048


def postprocess_size(original_size: Tuple[int, int],
                     max_pixels: Optional[int] = DEFAULT_MAX_POSTPROCESS_PIXELS) -> Tuple[int, int]:
    """The size post-processing works at: ``original_size``, or the largest size of its aspect ratio within
    ``max_pixels`` (None: no cap)."""
    height, width = original_size
    if max_pixels is None or height * width <= max_pixels:
        return original_size
    scale = math.sqrt(max_pixels / (height * width))
    capped_height = max(1, int(height * scale))
    capped_width = max(1, min(width, max_pixels // capped_height))
    return max(1, min(capped_height, max_pixels // capped_width)), capped_width


def upsample_nearest(values: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(h, w) array of any dtype -> (H, W), each output pixel taking the input pixel under its centre (PIL's and
    torch's ``nearest-exact`` rule); the only full-size allocation is the result."""
    if values.shape == tuple(size):
        return values
    # source index floor((output index + 1/2) * input / output), in integers so ties do not depend on float rounding
    rows = (2 * np.arange(size[0]) + 1) * values.shape[0] // (2 * size[0])
    columns = (2 * np.arange(size[1]) + 1) * values.shape[1] // (2 * size[1])
    return values[np.ix_(rows, columns)]


def build_outputs(task: str, segments: Sequence[Segment], class_names: Sequence[str], category_ids: Sequence[int],
                  original_size: Tuple[int, int], semantic_map=None) -> Dict[str, Any]:
    """masks (uint8 0/1, input size), labels, real scores, label_ids, category_ids, boxes (x1, y1, x2+1, y2+1),
    plus ``panoptic_seg`` + ``segments_info`` (panoptic) or ``sem_seg`` (semantic).

    Segment masks (and ``semantic_map``) may be at a smaller ``postprocess_size``; they are brought to
    ``original_size``."""
    masks = [upsample_nearest(segment.mask.cpu().numpy().astype(np.uint8), original_size) for segment in segments]
    boxes = [mask_to_box(mask) for mask in masks]
    outputs: Dict[str, Any] = {
        MASKS: masks,
        LABELS: [class_names[segment.label] for segment in segments],
        SCORES: [float(segment.score) for segment in segments],
        "label_ids": [int(segment.label) for segment in segments],
        "category_ids": [int(category_ids[segment.label]) for segment in segments],
        BOXES: boxes,
    }
    if task == "panoptic":
        panoptic_seg = np.zeros(original_size, dtype=np.int32)
        segments_info: List[Dict[str, Any]] = []
        for segment_id, (segment, mask, box) in enumerate(zip(segments, masks, boxes), start=1):
            panoptic_seg[mask.view(bool)] = segment_id
            segments_info.append({
                "id": segment_id, "category_id": int(category_ids[segment.label]), "label_id": int(segment.label),
                "isthing": bool(segment.isthing), "score": float(segment.score), "area": int(mask.sum()),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            })
        outputs["panoptic_seg"] = panoptic_seg
        outputs["segments_info"] = segments_info
    elif task == "semantic":
        outputs["sem_seg"] = upsample_nearest(semantic_map.cpu().numpy().astype(np.int32), original_size)
    return outputs
