"""ModelScope ``Metric`` adapters (add / evaluate / merge, picklable) over the streaming accumulators.

``add(outputs, inputs)``: ``outputs`` = one pipeline result dict (see integration/outputs.py) or a list of them;
``inputs`` = the matching dataset row(s) from ``modelscope_plugin.data`` readers (paths + annotations).
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence

from modelscope.metrics.base import Metric
from modelscope.metrics.builder import METRICS
from modelscope.utils.registry import default_group

from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES, COCO_THING_CATEGORIES
from modelscope_plugin.data.datasets import (
    IGNORE_LABEL,
    load_instance_annotations,
    load_label_map,
    load_panoptic_ground_truth,
    panoptic_to_semantic,
)
from modelscope_plugin.evaluation.instance_ap import InstanceAccumulator
from modelscope_plugin.evaluation.panoptic_quality import PanopticQualityAccumulator, categories_as_dicts
from modelscope_plugin.evaluation.semantic import ConfusionMatrix

PANOPTIC_QUALITY_METRIC = "segmentation-panoptic-quality"
COCO_INSTANCE_METRIC = "segmentation-coco-instance-ap"
SEMANTIC_METRIC = "segmentation-semantic-miou"


def _as_list(value: Any) -> List[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class PanopticQualityMetric(Metric):
    """PQ / SQ / RQ (percent) over ``panoptic_seg`` + ``segments_info`` outputs against COCO panoptic rows."""

    def __init__(self, categories: Optional[Sequence[Any]] = None, **kwargs):
        super().__init__()
        self.accumulator = PanopticQualityAccumulator(categories_as_dicts(categories or COCO_PANOPTIC_CATEGORIES))

    def add(self, outputs: Any, inputs: Any) -> None:
        for output, row in zip(_as_list(outputs), _as_list(inputs)):
            ground_truth_ids, ground_truth_segments = load_panoptic_ground_truth(row)
            self.accumulator.add_image(ground_truth_ids, ground_truth_segments, output["panoptic_seg"],
                                       output["segments_info"], row.get("image_id"))

    def evaluate(self) -> Dict[str, Any]:
        return self.accumulator.summarize()

    def merge(self, other: "PanopticQualityMetric") -> None:
        self.accumulator.merge(other.accumulator)


class SemanticSegmentationMetric(Metric):
    """aAcc / mIoU / mAcc (percent) over ``sem_seg`` outputs (contiguous class indices).

    Ground truth per row: ``panoptic_path`` rows (COCO panoptic, e.g. for cocopanmerge) map each segment's
    category to its index in ``categories`` (void / unknown -> ignore); ``label_path`` rows (ADE20K) use
    label value - 1 with 0 -> ignore.
    """

    def __init__(self, class_names: Optional[Sequence[str]] = None, categories: Optional[Sequence[Any]] = None,
                 ignore_label: int = IGNORE_LABEL, **kwargs):
        super().__init__()
        category_dicts = categories_as_dicts(categories or COCO_PANOPTIC_CATEGORIES)
        self.class_names = list(class_names) if class_names is not None else [c["name"] for c in category_dicts]
        self.class_index_of_category = {c["id"]: index for index, c in enumerate(category_dicts)}
        self.ignore_label = ignore_label
        self.confusion = ConfusionMatrix(len(self.class_names), ignore_label)

    def ground_truth(self, row: Mapping[str, Any]):
        if row.get("label_path"):
            return load_label_map(row, self.ignore_label)
        ids, segments = load_panoptic_ground_truth(row)
        return panoptic_to_semantic(ids, segments, self.class_index_of_category, self.ignore_label)

    def add(self, outputs: Any, inputs: Any) -> None:
        for output, row in zip(_as_list(outputs), _as_list(inputs)):
            self.confusion.add_image(self.ground_truth(row), output["sem_seg"])

    def evaluate(self) -> Dict[str, Any]:
        return self.confusion.summarize(self.class_names)

    def merge(self, other: "SemanticSegmentationMetric") -> None:
        self.confusion.merge(other.confusion)


class CocoInstanceMetric(Metric):
    """COCO mask and box AP (pycocotools COCOeval, fractions) over ``masks`` / ``scores`` / ``category_ids``.
    Ground truth: ``annotation_file`` if given, else the ``annotations_json`` of the rows added."""

    def __init__(self, annotation_file: Optional[str] = None, categories: Optional[Sequence[Any]] = None,
                 iou_types: Sequence[str] = ("segm", "bbox"), **kwargs):
        super().__init__()
        self.accumulator = InstanceAccumulator(categories_as_dicts(categories or COCO_THING_CATEGORIES),
                                               annotation_file, tuple(iou_types))

    def add(self, outputs: Any, inputs: Any) -> None:
        for output, row in zip(_as_list(outputs), _as_list(inputs)):
            annotations = load_instance_annotations(row) if self.accumulator.annotation_file is None else None
            self.accumulator.add_image(row["image_id"], row["height"], row["width"], output, annotations)

    def evaluate(self) -> Dict[str, Any]:
        return self.accumulator.summarize()

    def merge(self, other: "CocoInstanceMetric") -> None:
        self.accumulator.merge(other.accumulator)


def register_metrics() -> None:
    """Adds the three metrics to ModelScope's METRICS (default group) under this package's own type names."""
    for name, metric_class in ((PANOPTIC_QUALITY_METRIC, PanopticQualityMetric),
                               (COCO_INSTANCE_METRIC, CocoInstanceMetric),
                               (SEMANTIC_METRIC, SemanticSegmentationMetric)):
        METRICS.register_module(group_key=default_group, module_name=name, module_cls=metric_class, force=True)


register_metrics()
