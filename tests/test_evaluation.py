"""Evaluation against independent references on the real COCO / ADE20K samples in ../shared/data.

PQ: hotcoco's ``pq_compute`` (panopticapi protocol) on the exported COCO panoptic PNG + JSON.
AP: pycocotools COCOeval run here directly on the exported COCO results file.
mIoU: a per-class boolean-mask loop written here.
"""
import copy
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES, COCO_THING_CATEGORIES
from modelscope_plugin.data.datasets import (
    DatasetProblemsError,
    as_ms_dataset,
    load_label_map,
    load_panoptic_ground_truth,
    panoptic_to_semantic,
    read_coco_instances,
    read_coco_panoptic,
    read_label_folders,
    read_panoptic_png,
    rgb_to_id,
)
from modelscope_plugin.data.ground_truth_outputs import (
    instance_outputs,
    mask_box,
    panoptic_outputs,
    semantic_outputs_from_panoptic,
)
from modelscope_plugin.evaluation import COCO_INSTANCE_METRIC, PANOPTIC_QUALITY_METRIC, SEMANTIC_METRIC, evaluate
from modelscope_plugin.evaluation.panoptic_quality import accumulate_folders

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_DIR = DATA / "coco"
PANOPTIC_JSON = COCO_DIR / "annotations" / "panoptic_val2017_subset.json"
INSTANCES_JSON = COCO_DIR / "annotations" / "instances_val2017_subset.json"
ADE_DIR = DATA / "ade20k"
TOLERANCE = 1e-9

pytestmark = pytest.mark.skipif(not PANOPTIC_JSON.exists(), reason=f"test data missing: {DATA}")


def panoptic_rows():
    rows, problems = read_coco_panoptic(str(PANOPTIC_JSON), str(COCO_DIR / "panoptic_val2017"), str(COCO_DIR / "val2017"))
    assert problems == [] and len(rows) == 3
    return rows


def instance_rows():
    rows, problems = read_coco_instances(str(INSTANCES_JSON), str(COCO_DIR / "val2017"))
    assert problems == [] and len(rows) == 3
    return rows


def ade_rows():
    rows, problems = read_label_folders(str(ADE_DIR / "images" / "validation"), str(ADE_DIR / "annotations" / "validation"), 150)
    assert problems == [] and len(rows) == 3
    return rows


class LookupPipeline:
    """Stands in for a pipeline: image path -> a prepared result."""

    def __init__(self, results_by_path):
        self.results_by_path = results_by_path
        self.calls = 0

    def __call__(self, image_path):
        self.calls += 1
        return self.results_by_path[image_path]


# ------------------------------------------------------------------------------------------- panoptic perturbations

def rebuild_panoptic(panoptic_seg, segments_info):
    """Renumber to 1..N over the segments that still have pixels, recompute areas/boxes, masks in order."""
    new_seg = np.zeros_like(panoptic_seg)
    new_info = []
    for segment in segments_info:
        mask = panoptic_seg == segment["id"]
        if not mask.any():
            continue
        new_id = len(new_info) + 1
        new_seg[mask] = new_id
        box = mask_box(mask)
        new_info.append(dict(segment, id=new_id, area=int(mask.sum()), bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
    masks = [(new_seg == s["id"]).astype(np.uint8) for s in new_info]
    return {"masks": masks, "scores": [1.0] * len(masks), "category_ids": [s["category_id"] for s in new_info],
            "boxes": [mask_box(m) for m in masks], "panoptic_seg": new_seg, "segments_info": new_info}


def perturb_panoptic(outputs, row, rng):
    panoptic_seg = outputs["panoptic_seg"].copy()
    segments = copy.deepcopy(outputs["segments_info"])
    things = [s for s in segments if s["isthing"]]
    stuff = [s for s in segments if not s["isthing"]]
    # drop the largest thing
    largest = max(things, key=lambda s: s["area"])
    panoptic_seg[panoptic_seg == largest["id"]] = 0
    segments.remove(largest)
    # merge: the smallest two remaining things become one segment of the first's category
    remaining = sorted([s for s in segments if s["isthing"]], key=lambda s: s["area"])
    if len(remaining) >= 2:
        first, second = remaining[0], remaining[1]
        panoptic_seg[panoptic_seg == second["id"]] = first["id"]
        segments.remove(second)
    # shift a stuff segment 25 px right (painted over whatever is there)
    if stuff:
        shifted = stuff[0]
        mask = panoptic_seg == shifted["id"]
        panoptic_seg[mask] = 0
        panoptic_seg[np.roll(mask, 25, axis=1)] = shifted["id"]
    # shift a thing by a few pixels (still a match or not, depending on its size)
    if len(things) > 2:
        moved = sorted(things, key=lambda s: s["area"])[len(things) // 2]
        if moved in segments:
            mask = panoptic_seg == moved["id"]
            panoptic_seg[mask] = 0
            panoptic_seg[np.roll(mask, (3, 4), axis=(0, 1))] = moved["id"]
    # relabel one segment to another category
    other = segments[-1]
    other["category_id"] = 1 if other["category_id"] != 1 else 17
    other["isthing"] = True
    # a false segment: a rectangle of a random thing class
    next_id = max(s["id"] for s in segments) + 1
    height, width = panoptic_seg.shape
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    panoptic_seg[top:top + height // 5, left:left + width // 5] = next_id
    segments.append({"id": next_id, "category_id": int(rng.choice([c.id for c in COCO_THING_CATEGORIES])), "isthing": True})
    # a segment lying mostly on ground-truth void (ignored if > half is void), and one on a crowd region
    ground_truth_ids, ground_truth_segments = load_panoptic_ground_truth(row)
    void = ground_truth_ids == 0
    # grow kept segments into neighbouring void pixels (void is left out of the union, so they still match)
    for grown in segments[:4]:
        mask = panoptic_seg == grown["id"]
        border = binary_dilation(mask, iterations=10) & void & ~mask
        panoptic_seg[border] = grown["id"]
        void = void & ~border
    next_id += 1
    panoptic_seg[void] = next_id
    segments.append({"id": next_id, "category_id": 1, "isthing": True})
    crowd = [s for s in ground_truth_segments if s["iscrowd"]]
    if crowd:
        next_id += 1
        crowd_mask = ground_truth_ids == crowd[0]["id"]
        panoptic_seg[crowd_mask] = next_id
        segments.append({"id": next_id, "category_id": crowd[0]["category_id"], "isthing": True})
    return rebuild_panoptic(panoptic_seg, segments)


def hotcoco_pq(prediction_json, prediction_folder):
    hotcoco_panoptic = pytest.importorskip("hotcoco.panoptic")
    return hotcoco_panoptic.pq_compute(str(PANOPTIC_JSON), str(prediction_json), str(COCO_DIR / "panoptic_val2017"),
                                       str(prediction_folder))


def assert_pq_equal(ours, reference):
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            assert ours[f"{key.upper()}{suffix}"] == pytest.approx(100 * reference[group][key], abs=TOLERANCE), (group, key)
        assert ours[f"n{suffix}"] == reference[group]["n"]
    by_id = {values["category_id"]: values for values in ours["per_class"].values()}
    for category_id, values in reference["per_class"].items():
        mine = by_id[int(category_id)]
        assert (mine["tp"], mine["fp"], mine["fn"]) == (values["tp"], values["fp"], values["fn"]), category_id
        if values["tp"] + values["fp"] + values["fn"] > 0:
            for key in ("pq", "sq", "rq"):
                assert mine[key] == pytest.approx(values[key], abs=TOLERANCE), (category_id, key)


def test_panoptic_ground_truth_scores_100_through_ms_dataset(tmp_path):
    rows = panoptic_rows()
    dataset = as_ms_dataset(rows)
    assert type(dataset).__name__ == "MsDataset" and len(dataset) == 3
    predictor = LookupPipeline({row["image_path"]: panoptic_outputs(row) for row in rows})
    results = evaluate(predictor, dataset, "panoptic", output_dir=str(tmp_path), export_panoptic=True, progress=False)
    assert predictor.calls == 3
    assert results["PQ"] == results["SQ"] == results["RQ"] == 100.0
    assert (results["n"], results["n_th"], results["n_st"]) == (12, 7, 5)
    assert_pq_equal(results, hotcoco_pq(tmp_path / "panoptic_predictions.json", tmp_path / "panoptic"))
    assert json.loads((tmp_path / "metrics.json").read_text())["PQ"] == 100.0
    assert "person" in (tmp_path / "per_class.txt").read_text()


def test_panoptic_perturbed_equals_hotcoco(tmp_path):
    rng = np.random.default_rng(0)
    rows = panoptic_rows()
    predictor = LookupPipeline({row["image_path"]: perturb_panoptic(panoptic_outputs(row), row, rng) for row in rows})
    results = evaluate(predictor, rows, "panoptic", output_dir=str(tmp_path), export_panoptic=True, progress=False)
    reference = hotcoco_pq(tmp_path / "panoptic_predictions.json", tmp_path / "panoptic")
    assert 0 < results["PQ"] < 100
    assert sum(v["fp"] for v in results["per_class"].values()) > 0
    assert_pq_equal(results, reference)
    # folder to folder, as panopticapi's pq_compute: through hotcoco and through the streamed matcher alike
    for use_hotcoco in (True, False):
        accumulator = accumulate_folders(str(PANOPTIC_JSON), str(tmp_path / "panoptic_predictions.json"),
                                         str(COCO_DIR / "panoptic_val2017"), str(tmp_path / "panoptic"), use_hotcoco)
        assert accumulator.image_count == len(rows)
        assert_pq_equal(accumulator.summarize(), reference)


def test_panoptic_png_reading_equals_pil(tmp_path):
    rng = np.random.default_rng(1)
    colours = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    wide = colours.astype(np.int64)
    expected = wide[..., 0] + 256 * wide[..., 1] + 65536 * wide[..., 2]
    Image.fromarray(colours).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([colours, np.full((37, 53), 7, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(colours[..., 0]).save(tmp_path / "gray.png")  # PIL path: L -> RGB repeats the value
    palette = Image.fromarray(colours).quantize(16)
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(read_panoptic_png(str(tmp_path / "rgb.png")), expected)
    assert np.array_equal(read_panoptic_png(str(tmp_path / "rgba.png")), expected)
    assert np.array_equal(read_panoptic_png(str(tmp_path / "gray.png")), colours[..., 0].astype(np.int64) * 65793)
    assert np.array_equal(read_panoptic_png(str(tmp_path / "palette.png")), rgb_to_id(np.asarray(palette.convert("RGB"))))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(OSError):
        read_panoptic_png(str(tmp_path / "broken.png"))


# ------------------------------------------------------------------------------------------------------ instance AP

def perturb_instances(outputs, rng):
    count = len(outputs["masks"])
    keep = [index for index in range(count) if index % 5 != 0]  # drop every fifth
    masks = [outputs["masks"][i].copy() for i in keep]
    boxes = [list(outputs["boxes"][i]) for i in keep]
    category_ids = [outputs["category_ids"][i] for i in keep]
    scores = [float(s) for s in rng.uniform(0.3, 1.0, len(keep))]
    for index in range(0, len(masks), 3):  # shift every third by a few pixels, box along
        dy, dx = int(rng.integers(-6, 7)), int(rng.integers(-6, 7))
        masks[index] = np.roll(masks[index], (dy, dx), axis=(0, 1))
        x1, y1, x2, y2 = boxes[index]
        boxes[index] = [x1 + dx, y1 + dy, x2 + dx, y2 + dy]
    if len(masks) > 1:  # relabel one
        category_ids[1] = 1 if category_ids[1] != 1 else 18
    if len(masks) > 3:  # merge two into one detection
        masks[2] = np.maximum(masks[2], masks[3])
        boxes[2] = mask_box(masks[2])
        del masks[3], boxes[3], category_ids[3], scores[3]
    height, width = masks[0].shape
    for _ in range(3):  # false positives
        mask = np.zeros((height, width), np.uint8)
        top, left = int(rng.integers(0, height - 60)), int(rng.integers(0, width - 80))
        mask[top:top + 50, left:left + 70] = 1
        masks.append(mask)
        boxes.append(mask_box(mask))
        category_ids.append(int(rng.choice([c.id for c in COCO_THING_CATEGORIES[:20]])))
        scores.append(float(rng.uniform(0.1, 0.9)))
    return {"masks": masks, "scores": scores, "category_ids": category_ids, "boxes": boxes}


def hotcoco_stats(results_file, iou_type, scratch):
    """hotcoco's independent (Rust) COCOeval on the same exported file."""
    hotcoco = pytest.importorskip("hotcoco")
    dropped = "bbox" if iou_type == "segm" else "segmentation"
    detections = [{k: v for k, v in d.items() if k != dropped} for d in json.loads(Path(results_file).read_text())]
    filtered = Path(scratch) / f"results_{iou_type}.json"
    filtered.write_text(json.dumps(detections))
    ground_truth = hotcoco.COCO(str(INSTANCES_JSON))
    evaluator = hotcoco.COCOeval(ground_truth, ground_truth.load_res(str(filtered)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return list(evaluator.stats[:6])


def pycocotools_stats(results_file, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = json.loads(Path(results_file).read_text())
    dropped = "bbox" if iou_type == "segm" else "segmentation"
    detections = [{k: v for k, v in d.items() if k != dropped} for d in detections]
    ground_truth = COCO(str(INSTANCES_JSON))
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[:6]


@pytest.mark.parametrize("annotation_file", [None, str(INSTANCES_JSON)])
def test_instance_ground_truth_scores_ap_1(tmp_path, annotation_file):
    rows = instance_rows()
    predictor = LookupPipeline({row["image_path"]: instance_outputs(row, COCO_THING_CATEGORIES) for row in rows})
    results = evaluate(predictor, as_ms_dataset(rows), "instance", output_dir=str(tmp_path), annotation_file=annotation_file,
                       export_coco_results=True, progress=False)
    assert results["segm"]["AP"] == pytest.approx(1.0, abs=TOLERANCE)
    assert results["bbox"]["AP"] == pytest.approx(1.0, abs=TOLERANCE)
    assert results["segm"]["per_class"]["cat"] == pytest.approx(1.0)
    for iou_type in ("segm", "bbox"):
        reference = pycocotools_stats(tmp_path / "coco_instances_results.json", iou_type)
        assert [results[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(list(reference), abs=TOLERANCE)


def test_instance_perturbed_equals_pycocotools_on_exported_file(tmp_path):
    rng = np.random.default_rng(1)
    rows = instance_rows()
    predictor = LookupPipeline({row["image_path"]: perturb_instances(instance_outputs(row, COCO_THING_CATEGORIES), rng)
                                for row in rows})
    results = evaluate(predictor, rows, "instance", output_dir=str(tmp_path), export_coco_results=True, progress=False)
    exported = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert all(isinstance(d["segmentation"]["counts"], str) and len(d["bbox"]) == 4 for d in exported)
    for iou_type in ("segm", "bbox"):
        reference = pycocotools_stats(tmp_path / "coco_instances_results.json", iou_type)
        ours = [results[iou_type][k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert 0 < ours[0] < 1
        assert ours == pytest.approx(list(reference), abs=TOLERANCE), iou_type
        assert ours == pytest.approx(hotcoco_stats(tmp_path / "coco_instances_results.json", iou_type, tmp_path),
                                     abs=TOLERANCE), iou_type


# --------------------------------------------------------------------------------------------------------- semantic

def loop_semantic_reference(pairs, number_of_classes, ignore_label=255):
    """Plain per-class loop: IoU/Acc per class, mmseg's NaN rules, percent."""
    intersection = np.zeros(number_of_classes)
    ground_truth_area = np.zeros(number_of_classes)
    prediction_area = np.zeros(number_of_classes)
    for ground_truth, prediction in pairs:
        valid = ground_truth != ignore_label
        for class_index in range(number_of_classes):
            in_ground_truth = (ground_truth == class_index) & valid
            in_prediction = (prediction == class_index) & valid
            intersection[class_index] += np.count_nonzero(in_ground_truth & in_prediction)
            ground_truth_area[class_index] += np.count_nonzero(in_ground_truth)
            prediction_area[class_index] += np.count_nonzero(in_prediction)
    union = ground_truth_area + prediction_area - intersection
    iou = [intersection[c] / union[c] if union[c] > 0 else None for c in range(number_of_classes)]
    accuracy = [intersection[c] / ground_truth_area[c] if ground_truth_area[c] > 0 else None for c in range(number_of_classes)]
    present_iou = [value for value in iou if value is not None]
    present_accuracy = [value for value in accuracy if value is not None]
    return {"aAcc": 100 * intersection.sum() / ground_truth_area.sum(), "mIoU": 100 * sum(present_iou) / len(present_iou),
            "mAcc": 100 * sum(present_accuracy) / len(present_accuracy), "iou": iou}


def perturb_semantic(semantic_map, number_of_classes, rng):
    prediction = np.where(semantic_map == 255, rng.integers(0, number_of_classes), semantic_map).astype(np.int32)
    prediction = np.roll(prediction, 7, axis=1)
    present = np.unique(prediction)
    prediction[prediction == present[0]] = (present[0] + 5) % number_of_classes  # relabel one class
    noise = rng.random(prediction.shape) < 0.05
    prediction[noise] = rng.integers(0, number_of_classes, noise.sum())
    return prediction


def assert_semantic_equal(results, reference, class_names):
    for key in ("aAcc", "mIoU", "mAcc"):
        assert results[key] == pytest.approx(reference[key], abs=TOLERANCE), key
    for name, value in zip(class_names, reference["iou"]):
        mine = results["per_class"][name]["IoU"]
        assert (mine is None) == (value is None), name
        if value is not None:
            assert mine == pytest.approx(100 * value, abs=TOLERANCE), name


def test_semantic_from_coco_panoptic(tmp_path):
    rng = np.random.default_rng(2)
    rows = panoptic_rows()
    class_names = [c.name for c in COCO_PANOPTIC_CATEGORIES]
    index_of = {c.id: i for i, c in enumerate(COCO_PANOPTIC_CATEGORIES)}
    ground_truths = {r["image_path"]: panoptic_to_semantic(*load_panoptic_ground_truth(r), index_of) for r in rows}
    itself = LookupPipeline({r["image_path"]: semantic_outputs_from_panoptic(r) for r in rows})
    results = evaluate(itself, rows, "semantic", output_dir=str(tmp_path), progress=False)
    assert results["mIoU"] == results["aAcc"] == results["mAcc"] == 100.0
    predictions = {path: perturb_semantic(gt, 133, rng) for path, gt in ground_truths.items()}
    results = evaluate(LookupPipeline({p: {"sem_seg": v} for p, v in predictions.items()}), rows, "semantic", progress=False)
    reference = loop_semantic_reference([(ground_truths[p], predictions[p]) for p in ground_truths], 133)
    assert 0 < results["mIoU"] < 100
    assert_semantic_equal(results, reference, class_names)


def test_semantic_ade20k_label_folders(tmp_path):
    rng = np.random.default_rng(3)
    rows = ade_rows()
    categories = json.loads((ADE_DIR / "ade20k_150_categories.json").read_text())
    class_names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    ground_truths = {r["image_path"]: load_label_map(r) for r in rows}
    assert all(gt.max() < 150 or (gt == 255).any() for gt in ground_truths.values())
    itself = LookupPipeline({p: {"sem_seg": np.where(g == 255, 0, g)} for p, g in ground_truths.items()})
    results = evaluate(itself, as_ms_dataset(rows), "semantic", class_names=class_names, output_dir=str(tmp_path), progress=False)
    assert results["mIoU"] == results["aAcc"] == 100.0
    predictions = {p: perturb_semantic(g, 150, rng) for p, g in ground_truths.items()}
    results = evaluate(LookupPipeline({p: {"sem_seg": v} for p, v in predictions.items()}), rows, "semantic",
                       class_names=class_names, progress=False)
    assert_semantic_equal(results, loop_semantic_reference([(ground_truths[p], predictions[p]) for p in ground_truths], 150),
                          class_names)


# -------------------------------------------------------------------------------------- ModelScope Metric protocol

def test_metrics_registered_merge_and_pickle():
    from modelscope.metrics.builder import build_metric

    rng = np.random.default_rng(4)
    rows = panoptic_rows()
    outputs = [perturb_panoptic(panoptic_outputs(r), r, rng) for r in rows]
    whole = build_metric(PANOPTIC_QUALITY_METRIC)
    whole.add(outputs, rows)
    first, second = build_metric(PANOPTIC_QUALITY_METRIC), build_metric(PANOPTIC_QUALITY_METRIC)
    first.add(outputs[:1], rows[:1])
    second.add(outputs[1:], rows[1:])
    first = pickle.loads(pickle.dumps(first))
    first.merge(pickle.loads(pickle.dumps(second)))
    assert first.evaluate() == whole.evaluate()

    instance = instance_rows()
    metric = build_metric(COCO_INSTANCE_METRIC)
    halves = [build_metric(COCO_INSTANCE_METRIC), build_metric(COCO_INSTANCE_METRIC)]
    for index, row in enumerate(instance):
        result = instance_outputs(row, COCO_THING_CATEGORIES)
        metric.add(result, row)
        halves[index % 2].add([result], [row])
    halves[0].merge(pickle.loads(pickle.dumps(halves[1])))
    assert halves[0].evaluate()["segm"]["AP"] == metric.evaluate()["segm"]["AP"] == pytest.approx(1.0)

    semantic = build_metric({"type": SEMANTIC_METRIC, "ignore_label": 255})
    semantic.add([semantic_outputs_from_panoptic(r) for r in rows], rows)
    assert pickle.loads(pickle.dumps(semantic)).evaluate()["mIoU"] == 100.0


# -------------------------------------------------------------------------------------------------- dataset readers

def broken_copy(tmp_path):
    """The COCO panoptic sample with one missing image, one corrupt PNG and one unknown category."""
    folder = tmp_path / "coco"
    shutil.copytree(COCO_DIR, folder)
    (folder / "val2017" / "000000142238.jpg").unlink()
    (folder / "panoptic_val2017" / "000000439180.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    data = json.loads(PANOPTIC_JSON.read_text())
    data["annotations"][2]["segments_info"][0]["category_id"] = 9999
    annotation_file = folder / "panoptic.json"
    annotation_file.write_text(json.dumps(data))
    return folder, annotation_file, data["annotations"][2]["image_id"]


def test_readers_report_bad_rows(tmp_path):
    folder, annotation_file, unknown_id = broken_copy(tmp_path)
    arguments = (str(annotation_file), str(folder / "panoptic_val2017"), str(folder / "val2017"))
    rows, problems = read_coco_panoptic(*arguments, on_error="skip")
    assert rows == []
    assert {p.image_id for p in problems} == {142238, 439180, unknown_id}
    reasons = {p.image_id: p.reason for p in problems}
    assert "missing" in reasons[142238] and "unreadable" in reasons[439180] and "9999" in reasons[unknown_id]
    with pytest.raises(DatasetProblemsError) as raised:
        read_coco_panoptic(*arguments, on_error="raise")
    assert len(raised.value.problems) == 3 and "142238" in str(raised.value)

    instances = json.loads(INSTANCES_JSON.read_text())
    instances["annotations"][0]["category_id"] = 12345
    (folder / "instances.json").write_text(json.dumps(instances))
    rows, problems = read_coco_instances(str(folder / "instances.json"), str(folder / "val2017"))
    assert {p.image_id for p in problems} == {142238, instances["annotations"][0]["image_id"]}

    labels = tmp_path / "labels"
    shutil.copytree(ADE_DIR / "annotations" / "validation", labels)
    (labels / "ADE_val_00000002.png").unlink()
    rows, problems = read_label_folders(str(ADE_DIR / "images" / "validation"), str(labels), 150)
    assert [p.image_id for p in problems] == ["ADE_val_00000002"] and len(rows) == 2


# ------------------------------------------------------------------------------------ a real pipeline, end to end

def test_evaluate_runs_the_pipeline_and_matches_references(tiny_model_dir, tmp_path):
    """The tiny random-weight Mask2Former through ModelScope's pipeline: its outputs feed every metric, and the
    exported files give the same numbers to hotcoco / pycocotools."""
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    segmenter = pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu")
    rows = panoptic_rows()
    results = evaluate(segmenter, rows, "panoptic", output_dir=str(tmp_path / "panoptic"), export_panoptic=True,
                       progress=False)
    assert 0 <= results["PQ"] <= 100
    exported_panoptic = json.loads((tmp_path / "panoptic" / "panoptic_predictions.json").read_text())
    assert sum(len(a["segments_info"]) for a in exported_panoptic["annotations"]) > 0
    assert_pq_equal(results, hotcoco_pq(tmp_path / "panoptic" / "panoptic_predictions.json", tmp_path / "panoptic" / "panoptic"))

    instances = instance_rows()
    results = evaluate(segmenter, instances, "instance", output_dir=str(tmp_path / "instance"), export_coco_results=True,
                       progress=False, annotation_file=None)
    exported = tmp_path / "instance" / "coco_instances_results.json"
    assert json.loads(exported.read_text()), "the pipeline returned no instances"
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # the reference is pycocotools itself on the exported file (not the package's run_cocoeval wrapper)
    ground_truth = COCO(str(INSTANCES_JSON))
    # (detectron2's COCOEvaluator drops "bbox" before a segm evaluation: loadRes would take the box area otherwise)
    detections = [{key: value for key, value in detection.items() if key != "bbox"}
                  for detection in json.loads(exported.read_text())]
    reference = COCOeval(ground_truth, ground_truth.loadRes(detections), "segm")
    reference.params.imgIds = [r["image_id"] for r in instances]
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert results["segm"]["AP"] == pytest.approx(reference.stats[0], abs=TOLERANCE)

    results = evaluate(segmenter, rows, "semantic", progress=False)
    assert 0 <= results["mIoU"] <= 100 and set(results) >= {"aAcc", "mIoU", "mAcc", "per_class"}


def test_panoptic_rules_on_a_hand_built_image():
    """Void left out of the union, crowd matches skipped, predictions on void / same-class crowd ignored."""
    from modelscope_plugin.evaluation import match_image

    ground_truth = np.zeros((4, 6), np.int64)
    ground_truth[:2, :2], ground_truth[:2, 2:4], ground_truth[:2, 4:] = 1, 2, 3  # rows 2-3 void
    ground_truth_segments = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 1},
                             {"id": 3, "category_id": 5, "iscrowd": 0}]
    prediction = np.zeros((4, 6), np.int64)
    prediction[:3, :2] = 1   # GT 1 plus two void pixels: IoU 4 / (6 + 4 - 4 - 2) = 1
    prediction[:2, 2:4] = 2  # on the crowd region of its class: ignored
    prediction[:2, 4:] = 3   # wrong class on GT 3: a false positive, and GT 3 a false negative
    prediction[3, :] = 4     # all void: ignored
    prediction_segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}, {"id": 3, "category_id": 3},
                           {"id": 4, "category_id": 7}]
    statistics = match_image(ground_truth, ground_truth_segments, prediction, prediction_segments)
    counts = {c: (s.true_positives, s.false_positives, s.false_negatives, s.iou_sum) for c, s in statistics.items()}
    assert counts == {1: (1, 0, 0, 1.0), 3: (0, 1, 0, 0.0), 5: (0, 0, 1, 0.0)}
