"""Panoptic quality (PQ, SQ, RQ), streamed per image, following cocodataset/panopticapi ``evaluation.py``.

No library on PyPI exposes panopticapi's per-image matching as a function (panopticapi itself is not published
and reads PNG folders), so the matching is written here, line for line with ``pq_compute_single_core``:
void = id 0, a (ground truth, prediction) pair matches when same category, GT not crowd and IoU > 0.5 where the
union leaves out the prediction's void pixels; unmatched non-crowd GT segments are false negatives; an unmatched
prediction is a false positive unless more than half of it lies on void plus the (last listed) crowd segment of
its category. Only per-class tp / fp / fn / IoU sums are kept, never masks.
"""
import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from modelscope_plugin.data.datasets import id_to_rgb, read_panoptic_png, rgb_to_id  # noqa: F401  (re-exported)

VOID_ID = 0
# panopticapi's pair encoding offset: ids of both maps stay below it (ids are R + 256 G + 256^2 B < 256^3)
PAIR_OFFSET = 256 * 256 * 256


@dataclass
class ClassStatistics:
    """Counts for one category, summed over images."""
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    iou_sum: float = 0.0

    def add(self, other: "ClassStatistics") -> None:
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.false_negatives += other.false_negatives
        self.iou_sum += other.iou_sum


# Ids below this (every id a COCO panoptic PNG can hold) are compacted through a lookup table: a zeroed table of
# this size is allocated lazily by the OS, so only the pages of the listed ids are ever touched.
LOOKUP_TABLE_IDS = 256 * 256 * 256


def _compact_indices(id_map: np.ndarray, known_ids: np.ndarray, what: str, image_id: Any) -> np.ndarray:
    """(H, W) segment ids -> (H*W,) positions in the sorted ``known_ids``; an id not listed raises ``KeyError``.

    A lookup table (or, for larger ids, a binary search over the few listed ids) replaces the sort of every pixel
    that ``np.unique`` would do."""
    flat = id_map.ravel()
    if (flat.size and 0 <= known_ids[0] and known_ids[-1] < LOOKUP_TABLE_IDS and 0 <= flat.min()
            and flat.max() < LOOKUP_TABLE_IDS):
        # position + 1, so that 0 marks an id that is not listed
        table = np.zeros(LOOKUP_TABLE_IDS, dtype=np.int32)
        table[known_ids] = np.arange(1, len(known_ids) + 1, dtype=np.int32)
        positions = table[flat].astype(np.int64) - 1
        unknown = positions < 0
    else:
        positions = np.searchsorted(known_ids, flat)
        unknown = known_ids[np.minimum(positions, len(known_ids) - 1)] != flat
    if unknown.any():
        segment_id = int(flat[np.flatnonzero(unknown)[0]])
        raise KeyError(f"image {image_id}: segment {segment_id} is in the {what} map but not in its segments")
    return positions


def match_image(ground_truth_ids: np.ndarray, ground_truth_segments: Sequence[Mapping[str, Any]],
                prediction_ids: np.ndarray, prediction_segments: Sequence[Mapping[str, Any]],
                image_id: Any = None) -> Dict[int, ClassStatistics]:
    """Per-category statistics of one image.

    ``*_ids``: (H, W) integer segment-id maps (0 = void); ``*_segments``: dicts with ``id``, ``category_id`` and,
    for ground truth, ``iscrowd``. Areas are counted from the maps, as panopticapi does. A predicted segment listed
    with no pixels is dropped (panopticapi raises for it); pixels of an unlisted non-void id raise ``KeyError``.
    """
    if ground_truth_ids.shape != prediction_ids.shape:
        raise ValueError(f"image {image_id}: ground truth {ground_truth_ids.shape} and prediction "
                         f"{prediction_ids.shape} differ in size")
    ground_truth = {int(segment["id"]): segment for segment in ground_truth_segments}
    listed_prediction = {int(segment["id"]): segment for segment in prediction_segments}
    ground_truth_known = np.unique(np.array([VOID_ID, *ground_truth], dtype=np.int64))
    prediction_known = np.unique(np.array([VOID_ID, *listed_prediction], dtype=np.int64))
    ground_truth_index = _compact_indices(ground_truth_ids, ground_truth_known, "ground truth", image_id)
    prediction_index = _compact_indices(prediction_ids, prediction_known, "prediction", image_id)
    # (number of gt ids, number of prediction ids) pixel counts of every intersection, in one bincount
    intersection_matrix = np.bincount(ground_truth_index * len(prediction_known) + prediction_index,
                                      minlength=len(ground_truth_known) * len(prediction_known))
    intersection_matrix = intersection_matrix.reshape(len(ground_truth_known), len(prediction_known))
    ground_truth_areas = {int(segment_id): int(area) for segment_id, area
                          in zip(ground_truth_known, intersection_matrix.sum(1)) if area > 0}
    prediction_areas = {int(segment_id): int(area) for segment_id, area
                        in zip(prediction_known, intersection_matrix.sum(0)) if area > 0}
    prediction = {segment_id: segment for segment_id, segment in listed_prediction.items()
                  if prediction_areas.get(segment_id, 0) > 0}
    rows, columns = np.nonzero(intersection_matrix)
    intersections: Dict[Tuple[int, int], int] = {
        (int(ground_truth_known[row]), int(prediction_known[column])): int(intersection_matrix[row, column])
        for row, column in zip(rows, columns)}

    statistics: Dict[int, ClassStatistics] = {}

    def of(category_id: int) -> ClassStatistics:
        return statistics.setdefault(int(category_id), ClassStatistics())

    matched_ground_truth, matched_prediction = set(), set()
    for (ground_truth_id, prediction_id), intersection in intersections.items():
        if ground_truth_id not in ground_truth or prediction_id not in prediction:
            continue
        ground_truth_segment, prediction_segment = ground_truth[ground_truth_id], prediction[prediction_id]
        if int(ground_truth_segment.get("iscrowd", 0)) == 1:
            continue
        if int(ground_truth_segment["category_id"]) != int(prediction_segment["category_id"]):
            continue
        union = (prediction_areas[prediction_id] + ground_truth_areas[ground_truth_id] - intersection
                 - intersections.get((VOID_ID, prediction_id), 0))
        iou = intersection / union
        if iou > 0.5:
            category = of(ground_truth_segment["category_id"])
            category.true_positives += 1
            category.iou_sum += iou
            matched_ground_truth.add(ground_truth_id)
            matched_prediction.add(prediction_id)

    crowd_segment_of_category: Dict[int, int] = {}
    for ground_truth_id, segment in ground_truth.items():
        if ground_truth_id in matched_ground_truth:
            continue
        if int(segment.get("iscrowd", 0)) == 1:
            crowd_segment_of_category[int(segment["category_id"])] = ground_truth_id
            continue
        of(segment["category_id"]).false_negatives += 1

    for prediction_id, segment in prediction.items():
        if prediction_id in matched_prediction:
            continue
        ignored = intersections.get((VOID_ID, prediction_id), 0)
        crowd_id = crowd_segment_of_category.get(int(segment["category_id"]))
        if crowd_id is not None:
            ignored += intersections.get((crowd_id, prediction_id), 0)
        if ignored / prediction_areas[prediction_id] > 0.5:
            continue
        of(segment["category_id"]).false_positives += 1
    return statistics


@dataclass
class PanopticQualityAccumulator:
    """Streaming PQ: ``add_image`` per image, ``merge`` across workers, ``summarize`` at the end.

    ``categories``: dicts or objects with ``id``, ``name``, ``isthing`` — the classes averaged over (panopticapi
    averages over the dataset's categories, skipping those with no tp, fp or fn).
    """
    categories: List[Dict[str, Any]]
    per_class: Dict[int, ClassStatistics] = field(default_factory=dict)
    image_count: int = 0

    def add_image(self, ground_truth_ids: np.ndarray, ground_truth_segments: Sequence[Mapping[str, Any]],
                  prediction_ids: np.ndarray, prediction_segments: Sequence[Mapping[str, Any]],
                  image_id: Any = None) -> None:
        for category_id, statistics in match_image(ground_truth_ids, ground_truth_segments, prediction_ids,
                                                   prediction_segments, image_id).items():
            self.per_class.setdefault(category_id, ClassStatistics()).add(statistics)
        self.image_count += 1

    def merge(self, other: "PanopticQualityAccumulator") -> None:
        for category_id, statistics in other.per_class.items():
            self.per_class.setdefault(category_id, ClassStatistics()).add(statistics)
        self.image_count += other.image_count

    def _average(self, isthing: Optional[bool]) -> Tuple[Dict[str, float], Dict[int, Dict[str, float]]]:
        pq_total, sq_total, rq_total, counted = 0.0, 0.0, 0.0, 0
        per_class: Dict[int, Dict[str, float]] = {}
        for category in self.categories:
            if isthing is not None and bool(category["isthing"]) != isthing:
                continue
            statistics = self.per_class.get(int(category["id"]), ClassStatistics())
            tp, fp, fn = statistics.true_positives, statistics.false_positives, statistics.false_negatives
            if tp + fp + fn == 0:
                per_class[int(category["id"])] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            counted += 1
            pq = statistics.iou_sum / (tp + 0.5 * fp + 0.5 * fn)
            sq = statistics.iou_sum / tp if tp != 0 else 0.0
            rq = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[int(category["id"])] = {"pq": pq, "sq": sq, "rq": rq}
            pq_total, sq_total, rq_total = pq_total + pq, sq_total + sq, rq_total + rq
        if counted == 0:  # panopticapi divides by zero here
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq_total / counted, "sq": sq_total / counted, "rq": rq_total / counted, "n": counted}, per_class

    def summarize(self) -> Dict[str, Any]:
        """PQ/SQ/RQ in percent for All/Things/Stuff plus ``per_class`` (keyed by category name, fractions as
        panopticapi's ``per_class`` results, plus tp/fp/fn)."""
        results: Dict[str, Any] = {}
        for group, isthing in (("All", None), ("Things", True), ("Stuff", False)):
            average, per_class = self._average(isthing)
            suffix = {"All": "", "Things": "_th", "Stuff": "_st"}[group]
            results[f"PQ{suffix}"] = 100 * average["pq"]
            results[f"SQ{suffix}"] = 100 * average["sq"]
            results[f"RQ{suffix}"] = 100 * average["rq"]
            results[f"n{suffix}"] = average["n"]
            if group == "All":
                results["per_class"] = {}
                for category in self.categories:
                    statistics = self.per_class.get(int(category["id"]), ClassStatistics())
                    results["per_class"][category["name"]] = dict(
                        per_class[int(category["id"])], category_id=int(category["id"]),
                        isthing=bool(category["isthing"]), tp=statistics.true_positives,
                        fp=statistics.false_positives, fn=statistics.false_negatives)
        return results


def categories_as_dicts(categories: Iterable[Any]) -> List[Dict[str, Any]]:
    """``Category`` tuples or COCO category dicts -> dicts with id, name, isthing."""
    result = []
    for category in categories:
        if isinstance(category, Mapping):
            result.append({"id": int(category["id"]), "name": str(category["name"]),
                           "isthing": bool(category.get("isthing", 1))})
        else:
            result.append({"id": int(category.id), "name": str(category.name), "isthing": bool(category.isthing)})
    return result


def accumulate_folders(ground_truth_json: str, prediction_json: str, ground_truth_folder: str, prediction_folder: str,
                       use_hotcoco: Optional[bool] = None) -> PanopticQualityAccumulator:
    """PQ statistics of two COCO panoptic results (JSON + PNG folder each), panopticapi's ``pq_compute`` inputs.

    Files on disk are what hotcoco's Rust ``PanopticEval`` reads fastest (parallel PNG decoding, ~3 ms per 640x480
    pair, far below what two PNG decodes cost in Python), so it does the matching when installed
    (``use_hotcoco=None``); its per-class tp / fp / fn / IoU sums fill the same accumulator as the streamed path,
    which ``use_hotcoco=False`` runs instead. The categories are the ground truth's, as in panopticapi."""
    with open(ground_truth_json) as handle:
        ground_truth = json.load(handle)
    accumulator = PanopticQualityAccumulator(categories_as_dicts(ground_truth["categories"]))
    if use_hotcoco is None:
        use_hotcoco = importlib.util.find_spec("hotcoco") is not None
    if use_hotcoco:
        import hotcoco.panoptic

        evaluation = hotcoco.panoptic.PanopticEval(ground_truth_json, prediction_json, gt_folder=ground_truth_folder,
                                                   pred_folder=prediction_folder)
        evaluation.evaluate()
        for category_id, counts in evaluation.results()["per_class"].items():
            if counts["tp"] + counts["fp"] + counts["fn"]:
                accumulator.per_class[int(category_id)] = ClassStatistics(
                    int(counts["tp"]), int(counts["fp"]), int(counts["fn"]), float(counts["iou"]))
        accumulator.image_count = len(ground_truth["annotations"])
        return accumulator
    with open(prediction_json) as handle:
        predictions = {annotation["image_id"]: annotation for annotation in json.load(handle)["annotations"]}
    for ground_truth_entry in ground_truth["annotations"]:
        image_id = ground_truth_entry["image_id"]
        if image_id not in predictions:
            raise KeyError(f"{prediction_json}: no prediction for image {image_id}")
        prediction_entry = predictions[image_id]
        accumulator.add_image(read_panoptic_png(os.path.join(ground_truth_folder, ground_truth_entry["file_name"])),
                              ground_truth_entry["segments_info"],
                              read_panoptic_png(os.path.join(prediction_folder, prediction_entry["file_name"])),
                              prediction_entry["segments_info"], image_id)
    return accumulator
