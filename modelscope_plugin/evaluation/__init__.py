"""Evaluation: panoptic quality (panopticapi rules), COCO instance AP (pycocotools), semantic mIoU — streamed.

Importing ``evaluation.metrics`` registers the metrics with ModelScope's METRICS under
``segmentation-panoptic-quality``, ``segmentation-coco-instance-ap`` and ``segmentation-semantic-miou``.
"""
from modelscope_plugin.evaluation.evaluate import evaluate, evaluate_rows
from modelscope_plugin.evaluation.instance_ap import (
    InstanceAccumulator,
    detections_from_outputs,
    encode_mask,
    run_cocoeval,
)
from modelscope_plugin.evaluation.metrics import (
    COCO_INSTANCE_METRIC,
    PANOPTIC_QUALITY_METRIC,
    SEMANTIC_METRIC,
    CocoInstanceMetric,
    PanopticQualityMetric,
    SemanticSegmentationMetric,
)
from modelscope_plugin.evaluation.panoptic_quality import PanopticQualityAccumulator, id_to_rgb, match_image, rgb_to_id
from modelscope_plugin.evaluation.semantic import ConfusionMatrix

__all__ = [
    "evaluate", "evaluate_rows", "InstanceAccumulator", "detections_from_outputs", "encode_mask", "run_cocoeval",
    "COCO_INSTANCE_METRIC", "PANOPTIC_QUALITY_METRIC", "SEMANTIC_METRIC", "CocoInstanceMetric", "PanopticQualityMetric",
    "SemanticSegmentationMetric", "PanopticQualityAccumulator", "id_to_rgb", "match_image", "rgb_to_id",
    "ConfusionMatrix",
]
