"""Evaluation: panoptic quality (panopticapi rules), COCO instance AP (pycocotools), semantic mIoU — streamed.

Importing this package registers the metrics with ModelScope's METRICS under
``segmentation-panoptic-quality``, ``segmentation-coco-instance-ap`` and ``segmentation-semantic-miou``.
"""
from .evaluate import evaluate, evaluate_rows
from .instance_ap import InstanceAccumulator, detections_from_outputs, encode_mask, run_cocoeval
from .metrics import (COCO_INSTANCE_METRIC, PANOPTIC_QUALITY_METRIC, SEMANTIC_METRIC, CocoInstanceMetric,
                      PanopticQualityMetric, SemanticSegmentationMetric, register_metrics)
from .panoptic_quality import PanopticQualityAccumulator, id_to_rgb, match_image, rgb_to_id
from .semantic import ConfusionMatrix

register_metrics()
