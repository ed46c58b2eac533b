"""Semantic segmentation metrics (aAcc, mIoU, mAcc, per-class IoU / Acc) from a streamed confusion matrix.

Definitions as mmsegmentation's ``total_area_to_metrics`` (what ModelScope's semantic models were scored with):
IoU_c = TP / (GT_c + Pred_c - TP), Acc_c = TP / GT_c, both NaN for a class absent from ground truth and prediction
(IoU) or from ground truth (Acc) and left out of the means; pixels whose ground truth is the ignore label are not
counted. A (C, C) int64 matrix is the only state.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np


@dataclass
class ConfusionMatrix:
    """rows = ground-truth class, columns = predicted class."""
    number_of_classes: int
    ignore_label: int = 255
    matrix: Optional[np.ndarray] = field(default=None)
    # per ground-truth class: pixels predicted outside [0, C) (e.g. 255 = "no class"), counted as misses
    missed_out_of_range: Optional[np.ndarray] = field(default=None)

    def __post_init__(self) -> None:
        if self.matrix is None:
            self.matrix = np.zeros((self.number_of_classes, self.number_of_classes), dtype=np.int64)
        if self.missed_out_of_range is None:
            self.missed_out_of_range = np.zeros(self.number_of_classes, dtype=np.int64)

    def add_image(self, ground_truth: np.ndarray, prediction: np.ndarray) -> None:
        """(H, W) class maps. Predicted values outside [0, C) count as wrong for their pixel's class."""
        if ground_truth.shape != prediction.shape:
            raise ValueError(f"ground truth {ground_truth.shape} and prediction {prediction.shape} differ in size")
        ground_truth = ground_truth.astype(np.int64).ravel()
        prediction = prediction.astype(np.int64).ravel()
        valid = (ground_truth != self.ignore_label) & (ground_truth >= 0) & (ground_truth < self.number_of_classes)
        ground_truth, prediction = ground_truth[valid], prediction[valid]
        in_range = (prediction >= 0) & (prediction < self.number_of_classes)
        classes = self.number_of_classes
        self.matrix += np.bincount(ground_truth[in_range] * classes + prediction[in_range],
                                   minlength=classes * classes).reshape(classes, classes)
        self.missed_out_of_range += np.bincount(ground_truth[~in_range], minlength=classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix
        self.missed_out_of_range += other.missed_out_of_range

    def summarize(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """aAcc, mIoU, mAcc in percent; ``per_class`` {name: {IoU, Acc}} in percent (NaN -> None)."""
        true_positive = np.diag(self.matrix).astype(np.float64)
        ground_truth_area = self.matrix.sum(axis=1).astype(np.float64) + self.missed_out_of_range
        prediction_area = self.matrix.sum(axis=0).astype(np.float64)
        union = ground_truth_area + prediction_area - true_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = true_positive / union
            accuracy = true_positive / ground_truth_area
        total = ground_truth_area.sum()
        names = (list(class_names) if class_names is not None
                 else [str(index) for index in range(self.number_of_classes)])
        return {
            "aAcc": 100 * float(true_positive.sum() / total) if total > 0 else 0.0,
            "mIoU": 100 * float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "mAcc": 100 * float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else 0.0,
            "per_class": {name: {"IoU": None if np.isnan(i) else 100 * float(i),
                                 "Acc": None if np.isnan(a) else 100 * float(a)}
                          for name, i, a in zip(names, iou, accuracy)},
        }
