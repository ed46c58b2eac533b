"""COCO instance AP (segm and bbox) with pycocotools' COCOeval; detections are kept as compressed RLE only.

Mask AP is computed without the ``bbox`` field and box AP without ``segmentation`` (as detectron2 does):
pycocotools' ``loadRes`` sets a detection's ``area`` from its box whenever a box is present, which would change
the small / medium / large split of mask AP.
"""
import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
    """(H, W) 0/1 -> COCO compressed RLE with ``counts`` as text (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def detections_from_outputs(outputs: Mapping[str, Any], image_id: Any) -> List[Dict[str, Any]]:
    """Pipeline outputs (``masks``, ``scores``, ``category_ids``, optional ``boxes`` x1, y1, x2, y2 with x2 = last
    column + 1) -> COCO result dicts: ``image_id, category_id, score, segmentation`` (RLE), ``bbox`` [x, y, w, h]."""
    detections = []
    boxes = outputs.get("boxes")
    for index, (mask, score, category_id) in enumerate(zip(outputs["masks"], outputs["scores"],
                                                           outputs["category_ids"])):
        rle = encode_mask(np.asarray(mask))
        if boxes is not None and len(boxes) > index and boxes[index] is not None:
            x1, y1, x2, y2 = (float(value) for value in boxes[index])
            box = [x1, y1, x2 - x1, y2 - y1]
        else:
            box = [float(value) for value in mask_utils.toBbox(rle)]
        detections.append({"image_id": image_id, "category_id": int(category_id), "score": float(score),
                           "segmentation": rle, "bbox": box})
    return detections


def coco_from_dict(dataset: Dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def run_cocoeval(ground_truth: COCO, detections: Sequence[Dict[str, Any]], iou_type: str,
                 image_ids: Optional[Sequence[Any]] = None) -> COCOeval:
    """COCOeval for ``iou_type`` ('segm' | 'bbox') over ``image_ids`` (default: all GT images); quiet."""
    field_to_drop = "bbox" if iou_type == "segm" else "segmentation"
    results = [{key: value for key, value in detection.items() if key != field_to_drop} for detection in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        prediction = ground_truth.loadRes(results) if results else COCO()
        if not results:
            prediction.dataset = {"images": ground_truth.dataset["images"], "annotations": [],
                                  "categories": ground_truth.dataset["categories"]}
            prediction.createIndex()
        evaluator = COCOeval(ground_truth, prediction, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def per_class_ap(evaluator: COCOeval, categories: Sequence[Mapping[str, Any]]) -> Dict[str, Optional[float]]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) per category name; None where the GT has none."""
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, classes, areas, max detections)
    name_of = {int(category["id"]): category["name"] for category in categories}
    result = {}
    for index, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        result[name_of.get(int(category_id), str(category_id))] = float(values.mean()) if values.size else None
    return result


@dataclass
class InstanceAccumulator:
    """Streams detections (RLE) and, unless an annotation file is given, the GT rows seen; COCOeval at the end."""
    categories: List[Dict[str, Any]]
    annotation_file: Optional[str] = None
    iou_types: Sequence[str] = ("segm", "bbox")
    images: List[Dict[str, Any]] = field(default_factory=list)
    ground_truth_annotations: List[Dict[str, Any]] = field(default_factory=list)
    detections: List[Dict[str, Any]] = field(default_factory=list)

    def add_image(self, image_id: Any, height: int, width: int, outputs: Mapping[str, Any],
                  ground_truth_annotations: Optional[Sequence[Dict[str, Any]]] = None) -> None:
        self.images.append({"id": image_id, "height": int(height), "width": int(width)})
        if ground_truth_annotations is not None:
            self.ground_truth_annotations.extend(ground_truth_annotations)
        self.detections.extend(detections_from_outputs(outputs, image_id))

    def merge(self, other: "InstanceAccumulator") -> None:
        self.images.extend(other.images)
        self.ground_truth_annotations.extend(other.ground_truth_annotations)
        self.detections.extend(other.detections)

    def ground_truth(self) -> COCO:
        if self.annotation_file is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                return COCO(self.annotation_file)
        return coco_from_dict({"images": self.images, "annotations": self.ground_truth_annotations,
                               "categories": self.categories})

    def summarize(self) -> Dict[str, Any]:
        """{'segm': {AP, AP50, AP75, APs, APm, APl, per_class}, 'bbox': {...}} — fractions as COCOeval's stats."""
        ground_truth = self.ground_truth()
        image_ids = sorted({image["id"] for image in self.images})
        results: Dict[str, Any] = {}
        for iou_type in self.iou_types:
            evaluator = run_cocoeval(ground_truth, self.detections, iou_type, image_ids)
            results[iou_type] = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats[:6])}
            results[iou_type]["per_class"] = per_class_ap(evaluator, ground_truth.dataset["categories"])
        return results
