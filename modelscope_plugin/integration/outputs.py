"""Raw segments -> the output contract shared by every task (see DESIGN.md, "Output contract")."""
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from modelscope.outputs import OutputKeys

from ..postprocessing import Segment, mask_to_box


def build_outputs(task: str, segments: Sequence[Segment], class_names: Sequence[str], category_ids: Sequence[int],
                  original_size: Tuple[int, int], semantic_map=None) -> Dict[str, Any]:
    """masks (uint8 0/1, input size), labels, real scores, label_ids, category_ids, boxes (x1, y1, x2+1, y2+1),
    plus ``panoptic_seg`` + ``segments_info`` (panoptic) or ``sem_seg`` (semantic)."""
    masks = [segment.mask.cpu().numpy().astype(np.uint8) for segment in segments]
    boxes = [mask_to_box(mask) for mask in masks]
    outputs: Dict[str, Any] = {
        OutputKeys.MASKS: masks,
        OutputKeys.LABELS: [class_names[segment.label] for segment in segments],
        OutputKeys.SCORES: [float(segment.score) for segment in segments],
        "label_ids": [int(segment.label) for segment in segments],
        "category_ids": [int(category_ids[segment.label]) for segment in segments],
        OutputKeys.BOXES: boxes,
    }
    if task == "panoptic":
        panoptic_seg = np.zeros(original_size, dtype=np.int32)
        segments_info: List[Dict[str, Any]] = []
        for segment_id, (segment, mask, box) in enumerate(zip(segments, masks, boxes), start=1):
            panoptic_seg[mask.astype(bool)] = segment_id
            segments_info.append({
                "id": segment_id, "category_id": int(category_ids[segment.label]), "label_id": int(segment.label),
                "isthing": bool(segment.isthing), "score": float(segment.score), "area": int(mask.sum()),
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            })
        outputs["panoptic_seg"] = panoptic_seg
        outputs["segments_info"] = segments_info
    elif task == "semantic":
        outputs["sem_seg"] = semantic_map.cpu().numpy().astype(np.int32)
    return outputs
