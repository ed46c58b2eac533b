"""Ground truth rendered in the pipeline output contract (integration/outputs.py), score 1.0.

Scoring these against their own ground truth must give PQ = 100, AP = 1.0, mIoU = 100; tests perturb them.
"""
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES
from modelscope_plugin.data.datasets import load_instance_annotations, load_panoptic_ground_truth, panoptic_to_semantic


def mask_box(mask: np.ndarray) -> List[int]:
    """x1, y1, x2, y2 with x2 = last column + 1 (the output contract's box convention)."""
    rows, columns = np.nonzero(mask)
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1]


def panoptic_outputs(row: Mapping[str, Any], categories: Sequence[Any] = COCO_PANOPTIC_CATEGORIES) -> Dict[str, Any]:
    """A COCO panoptic row as a panoptic pipeline result (segments renumbered 1..N, crowd segments included)."""
    index_of = {int(category.id): index for index, category in enumerate(categories)}
    ids, segments = load_panoptic_ground_truth(dict(row))
    masks = [(ids == int(segment["id"])).astype(np.uint8) for segment in segments]
    panoptic_seg = np.zeros(ids.shape, dtype=np.int32)
    segments_info, boxes = [], []
    for new_id, (segment, mask) in enumerate(zip(segments, masks), start=1):
        panoptic_seg[mask.astype(bool)] = new_id
        box = mask_box(mask)
        boxes.append(box)
        category = categories[index_of[int(segment["category_id"])]]
        segments_info.append({"id": new_id, "category_id": int(segment["category_id"]),
                              "label_id": index_of[int(segment["category_id"])], "isthing": bool(category.isthing),
                              "score": 1.0, "area": int(mask.sum()),
                              "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    return {"masks": masks, "labels": [categories[s["label_id"]].name for s in segments_info],
            "scores": [1.0] * len(masks), "label_ids": [s["label_id"] for s in segments_info],
            "category_ids": [s["category_id"] for s in segments_info], "boxes": boxes,
            "panoptic_seg": panoptic_seg, "segments_info": segments_info}


def semantic_outputs_from_panoptic(row: Mapping[str, Any], categories: Sequence[Any] = COCO_PANOPTIC_CATEGORIES,
                                   ignore_label: int = 255) -> Dict[str, Any]:
    """A COCO panoptic row as a semantic result (``sem_seg``; void pixels keep ``ignore_label``)."""
    index_of = {int(category.id): index for index, category in enumerate(categories)}
    ids, segments = load_panoptic_ground_truth(dict(row))
    return {"sem_seg": panoptic_to_semantic(ids, segments, index_of, ignore_label).astype(np.int32)}


def instance_outputs(row: Mapping[str, Any], categories: Sequence[Any], include_crowd: bool = False) -> Dict[str, Any]:
    """A COCO instances row as an instance result; boxes from the annotations' ``bbox``."""
    height, width = int(row["height"]), int(row["width"])
    index_of = {int(category.id): index for index, category in enumerate(categories)}
    masks, boxes, category_ids = [], [], []
    for annotation in load_instance_annotations(dict(row)):
        if annotation.get("iscrowd", 0) and not include_crowd:
            continue
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        masks.append(mask_utils.decode(rle).astype(np.uint8))
        x, y, w, h = annotation["bbox"]
        boxes.append([x, y, x + w, y + h])
        category_ids.append(int(annotation["category_id"]))
    return {"masks": masks, "labels": [categories[index_of[c]].name for c in category_ids],
            "scores": [1.0] * len(masks), "label_ids": [index_of[c] for c in category_ids],
            "category_ids": category_ids, "boxes": boxes}
