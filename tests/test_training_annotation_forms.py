"""Training targets from every annotation form: COCO instances (compressed / uncompressed RLE, polygons, multi-polygon
objects, crowd), semantic label folders (reduce-zero-label, 255, a declared ignore value) give the targets of the
COCO panoptic path on the same synthetic scenes; rows that cannot train a task are refused before training."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from modelscope_plugin.config import PreprocessConfig
from modelscope_plugin.data.datasets import read_coco_instances, read_coco_panoptic, read_label_folders
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, write_dataset
from modelscope_plugin.training.config import AugmentationConfig
from modelscope_plugin.training.data import SegmentationTrainingDataset, TrainingDataError, contiguous_categories

CATEGORIES = contiguous_categories(SYNTHETIC_CATEGORIES)
SCENE_SIZE = 128
# scale 1, no flip, a canvas of the scene's size: the targets keep the scene's pixel grid
IDENTITY = AugmentationConfig(image_size=SCENE_SIZE, min_scale=1.0, max_scale=1.0, flip_probability=0.0)
AUGMENTATIONS = {
    "large_scale_jitter": AugmentationConfig(image_size=96, min_scale=0.5, max_scale=1.5),
    "fastinst": AugmentationConfig(kind="fastinst", image_size=128, short_sides=(64, 96), long_side_max=128,
                                   crop_probability=0.5, crop_short_sides=(96, 128), crop_size_range=(48, 96)),
}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("forms"), "train", 4, seed=3, config=SceneConfig.scaled(SCENE_SIZE))


def samples(rows, task, augmentation, categories=CATEGORIES, seed=11):
    dataset = SegmentationTrainingDataset(rows, categories, task, PreprocessConfig(), augmentation, seed=seed)
    return [dataset[index] for index in range(len(dataset))]


def assert_same_targets(expected, actual):
    assert len(expected) == len(actual)
    for first, second in zip(expected, actual):
        assert torch.equal(first.image, second.image)
        assert first.target.labels.tolist() == second.target.labels.tolist()
        assert torch.equal(first.target.masks, second.target.masks)


def rewrite_instances(split, path: Path, change) -> Path:
    """A copy of the split's instances JSON with ``change(annotation, decoded mask)`` applied to every object."""
    data = json.loads(split.instances_json.read_text())
    for annotation in data["annotations"]:
        rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode("ascii"))
        change(annotation, mask_utils.decode(rle).astype(bool))
    path.write_text(json.dumps(data))
    return path


def uncompressed_counts(mask: np.ndarray):
    """COCO's uncompressed RLE of a mask: run lengths in column-major order, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return counts if flat[0] == 0 else [0] + counts


def contour_polygons(mask: np.ndarray):
    """Outer contours of every connected part as COCO polygons, or None when the object has a hole (a polygon
    cannot express it) or a part with fewer than 3 contour points."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if (hierarchy[0][:, 3] >= 0).any() or any(len(contour) < 3 for contour in contours):
        return None
    # (P, 1, 2) contour points (x, y) -> [x0, y0, x1, y1, ...]
    return [contour.reshape(-1).astype(float).tolist() for contour in contours]


@pytest.mark.parametrize("augmentation", sorted(AUGMENTATIONS))
def test_compressed_and_uncompressed_rle_give_the_panoptic_targets_exactly(split, tmp_path, augmentation):
    config = AUGMENTATIONS[augmentation]
    expected = samples(split.panoptic_rows(), "instance", config)
    assert sum(len(sample.target.labels) for sample in expected) > 10
    assert_same_targets(expected, samples(split.instance_rows(), "instance", config))

    def to_uncompressed(annotation, mask):
        annotation["segmentation"] = {"size": list(mask.shape), "counts": uncompressed_counts(mask)}

    uncompressed = rewrite_instances(split, tmp_path / "uncompressed.json", to_uncompressed)
    rows, _ = read_coco_instances(str(uncompressed), str(split.image_folder), on_error="raise")
    assert_same_targets(expected, samples(rows, "instance", config))


def test_polygons_and_multi_polygon_objects_match_up_to_boundary_pixels(split, tmp_path):
    kinds = {"polygon": 0, "multi-polygon": 0, "rle": 0}

    def to_polygons(annotation, mask):
        polygons = contour_polygons(mask)
        if polygons is None:
            kinds["rle"] += 1  # left as RLE: one file mixes both forms
            return
        kinds["multi-polygon" if len(polygons) > 1 else "polygon"] += 1
        annotation["segmentation"] = polygons

    polygon_file = rewrite_instances(split, tmp_path / "polygons.json", to_polygons)
    assert kinds["polygon"] > 10, kinds
    rows, _ = read_coco_instances(str(polygon_file), str(split.image_folder), on_error="raise")
    # converted to RLE once, by the reader
    assert all(isinstance(a["segmentation"]["counts"], str) for row in rows for a in json.loads(row["annotations_json"]))
    expected = samples(split.panoptic_rows(), "instance", IDENTITY)
    actual = samples(rows, "instance", IDENTITY)
    for first, second in zip(expected, actual):
        assert first.target.labels.tolist() == second.target.labels.tolist()
        for truth, polygon_mask in zip(first.target.masks.numpy() > 0, second.target.masks.numpy() > 0):
            assert_equal_up_to_boundary_pixels(truth, polygon_mask)


def assert_equal_up_to_boundary_pixels(truth: np.ndarray, actual: np.ndarray):
    kernel = np.ones((3, 3), np.uint8)
    truth_bytes = truth.astype(np.uint8)
    # pixels within one pixel of the true mask's boundary
    band = cv2.dilate(truth_bytes, kernel).astype(bool) & ~cv2.erode(truth_bytes, kernel).astype(bool)
    assert not ((truth ^ actual) & ~band).any()
    assert (truth & actual).sum() >= 0.4 * truth.sum()


def test_a_multi_polygon_object_is_one_target_of_all_its_parts(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    # a square and a triangle, one object; a 2-point polygon part is dropped (detectron2's rule)
    square = [10, 10, 30, 10, 30, 30, 10, 30]
    triangle = [40, 40, 60, 40, 40, 60]
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,
                         "segmentation": [square, triangle, [5, 5, 6, 6]]}],
        "categories": [{"id": c.id, "name": c.name} for c in SYNTHETIC_CATEGORIES if c.isthing]}))
    rows, _ = read_coco_instances(str(tmp_path / "instances.json"), str(tmp_path), on_error="raise")
    identity = AugmentationConfig(image_size=64, min_scale=1.0, max_scale=1.0, flip_probability=0.0)
    target = samples(rows, "instance", identity)[0].target
    rows_grid, columns_grid = np.mgrid[:64, :64] + 0.5  # pixel centres
    expected = ((rows_grid > 10) & (rows_grid < 30) & (columns_grid > 10) & (columns_grid < 30)) | (
        (rows_grid > 40) & (columns_grid > 40) & (rows_grid + columns_grid < 100))
    assert target.labels.tolist() == [2]
    assert_equal_up_to_boundary_pixels(expected, target.masks[0].numpy() > 0)


def test_crowd_objects_never_become_targets(split, tmp_path):
    crowd = {}

    def mark_crowd(annotation, mask):
        if annotation["image_id"] == 1 and not crowd:
            annotation["iscrowd"] = 1
            crowd["mask"], crowd["id"] = mask, annotation["id"]

    crowd_file = rewrite_instances(split, tmp_path / "crowd.json", mark_crowd)
    rows, _ = read_coco_instances(str(crowd_file), str(split.image_folder), on_error="raise")
    all_objects = samples(split.instance_rows(), "instance", IDENTITY)[0].target
    with_crowd = samples(rows, "instance", IDENTITY)[0].target
    assert len(with_crowd.labels) == len(all_objects.labels) - 1
    # the crowd object's pixels belong to no target mask
    assert with_crowd.masks[:, torch.from_numpy(crowd["mask"])].sum() == 0
    # the panoptic path with the same segment marked crowd gives the same targets
    panoptic = json.loads(split.panoptic_json.read_text())
    first_thing = panoptic["annotations"][0]["segments_info"][0]
    first_thing["iscrowd"] = 1
    panoptic_file = tmp_path / "panoptic_crowd.json"
    panoptic_file.write_text(json.dumps(panoptic))
    panoptic_rows, _ = read_coco_panoptic(str(panoptic_file), str(split.panoptic_folder), str(split.image_folder),
                                          on_error="raise")
    assert_same_targets(samples(panoptic_rows, "instance", IDENTITY)[:1], samples(rows, "instance", IDENTITY)[:1])


def test_overlapping_objects_keep_their_whole_masks(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    first, second = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    first[10:40, 10:40] = True
    second[30:50, 20:60] = True  # overlaps the first in rows 30-39, columns 20-39

    def rle(mask):
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}

    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 64, "width": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "segmentation": rle(first), "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 4, "segmentation": rle(second), "iscrowd": 0}],
        "categories": [{"id": c.id, "name": c.name} for c in SYNTHETIC_CATEGORIES if c.isthing]}))
    rows, _ = read_coco_instances(str(tmp_path / "instances.json"), str(tmp_path), on_error="raise")
    identity = AugmentationConfig(image_size=64, min_scale=1.0, max_scale=1.0, flip_probability=0.0)
    target = samples(rows, "instance", identity)[0].target
    assert target.labels.tolist() == [1, 3]  # contiguous indices of category ids 2 and 4
    np.testing.assert_array_equal(target.masks[0].numpy() > 0, first)
    np.testing.assert_array_equal(target.masks[1].numpy() > 0, second)


@pytest.mark.parametrize("augmentation", sorted(AUGMENTATIONS))
def test_label_folders_give_the_panoptic_semantic_targets(split, augmentation):
    config = AUGMENTATIONS[augmentation]
    expected = samples(split.panoptic_rows(), "semantic", config)
    assert_same_targets(expected, samples(split.semantic_rows(), "semantic", config))


@pytest.mark.parametrize("ignore_value", [255, 100])
def test_label_values_from_zero_with_255_or_a_declared_ignore_value(split, tmp_path, ignore_value):
    # the synthetic maps hold class index + 1 (0 = void): rewritten as class index, void = the ignore value
    labels = tmp_path / "labels"
    labels.mkdir()
    for path in sorted(split.semantic_folder.iterdir()):
        values = np.asarray(Image.open(path)).astype(np.int64)
        Image.fromarray(np.where(values == 0, ignore_value, values - 1).astype(np.uint8)).save(labels / path.name)
    rows, _ = read_label_folders(str(split.image_folder), str(labels), len(SYNTHETIC_CATEGORIES), on_error="raise",
                                 reduce_zero_label=False, ignore_value=ignore_value)
    # label value = category id: categories 0..6 in the synthetic order
    from_zero = contiguous_categories([{"id": index, "name": c.name, "isthing": c.isthing}
                                       for index, c in enumerate(SYNTHETIC_CATEGORIES)])
    config = AUGMENTATIONS["large_scale_jitter"]
    assert_same_targets(samples(split.panoptic_rows(), "semantic", config),
                        samples(rows, "semantic", config, categories=from_zero))


def test_void_pixels_are_in_no_semantic_target(split):
    target = samples(split.semantic_rows(), "semantic", IDENTITY)[0].target
    void = np.asarray(Image.open(sorted(split.semantic_folder.iterdir())[0])) == 0
    covered = target.masks.sum(0).numpy()
    assert (covered[~void] == 1).all() and (covered[void] == 0).all()


def test_rows_that_cannot_train_the_task_are_refused_at_once(split):
    for rows, task, kind in ((split.semantic_rows(), "instance", "semantic"),
                             (split.semantic_rows(), "panoptic", "semantic"),
                             (split.instance_rows(), "panoptic", "instance"),
                             (split.instance_rows(), "semantic", "instance")):
        refused = f"training rows of kind '{kind}' \\(4 rows, the first .*\\) cannot train the {task} task"
        with pytest.raises(TrainingDataError, match=refused):
            SegmentationTrainingDataset(rows, CATEGORIES, task, PreprocessConfig(), IDENTITY)
    with pytest.raises(TrainingDataError, match="mix annotation kinds"):
        SegmentationTrainingDataset(split.semantic_rows()[:1] + split.instance_rows()[:1], CATEGORIES, "semantic",
                                    PreprocessConfig(), IDENTITY)


# ------------------------------------------------------------------------------------ through build_trainer

TRAINER_OPTIONS = {
    "train.max_epochs": 1, "train.train_iters_per_epoch": 1, "train.dataloader.batch_size_per_gpu": 2,
    "train.augmentation": {"image_size": 64, "min_scale": 0.5, "max_scale": 1.5},
    "train.preprocess": {"short_side": 64, "long_side_max": 64},
    "train.loss": {"num_points": 256}, "train.logging": {"interval": 1},
    "train.checkpoint.period": {"interval": 1, "by_epoch": False},
}
CATEGORY_DICTS = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES]


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer_forms")
    scenes = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)
    return write_dataset(root, "train", 2, seed=0, config=scenes), write_dataset(root, "val", 2, seed=1, config=scenes)


def build(model_dir, train_rows, eval_rows, work_dir, task, options=TRAINER_OPTIONS, categories=CATEGORY_DICTS):
    from modelscope.trainers import build_trainer

    from modelscope_plugin.data.datasets import as_ms_dataset

    return build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=as_ms_dataset(train_rows), eval_dataset=as_ms_dataset(eval_rows),
        work_dir=str(work_dir), categories=categories, cfg_options=dict(options, **{"train.task": task}), seed=7))


@pytest.mark.parametrize("task", ["instance", "semantic"])
def test_mask2former_trains_and_evaluates_from_instance_and_label_rows(tiny_model_dir, small_scenes, tmp_path, task):
    train, val = small_scenes
    # instance task: read_coco_instances rows; semantic: read_label_folders rows
    trainer = build(tiny_model_dir, getattr(train, f"{task}_rows")(), getattr(val, f"{task}_rows")(),
                    tmp_path / "work", task)
    trainer.train()
    assert trainer.iter == 1 and np.isfinite(trainer.train_outputs["loss"].item())
    values = trainer.evaluate()
    assert ({"segm/AP", "bbox/AP"} if task == "instance" else {"mIoU"}) <= set(values), values


def test_fastinst_trains_from_instance_rows(small_scenes, tmp_path):
    from modelscope_plugin.builders import build_fastinst
    from modelscope_plugin.config import FastInstConfig
    from modelscope_plugin.model_dirs.fastinst import write_hub_dir

    train, val = small_scenes
    config = FastInstConfig(num_classes=5, num_queries=12, num_aux_queries=3, hidden_dim=32, mask_dim=24, num_heads=4,
                            feedforward_dim=48, decoder_layers=2, class_names=tuple(f"thing_{i}" for i in range(5)))
    torch.manual_seed(0)
    model_dir = write_hub_dir(tmp_path / "model", config, build_fastinst(config).eval())
    options = dict(TRAINER_OPTIONS, **{"train.augmentation": {
        "kind": "fastinst", "image_size": 64, "short_sides": [64], "long_side_max": 64, "crop_size_range": [32, 64],
        "crop_short_sides": [64]}})
    trainer = build(model_dir, train.instance_rows(), val.instance_rows(), tmp_path / "work", "instance", options)
    trainer.train()
    assert trainer.iter == 1 and np.isfinite(trainer.train_outputs["loss"].item())
    assert {"segm/AP"} <= set(trainer.evaluate())


def test_build_trainer_refuses_rows_that_cannot_train_the_task(tiny_model_dir, small_scenes, tmp_path):
    train, val = small_scenes
    refused = r"rows of kind 'semantic' \(2 rows, the first .*semantic_train/000001.png\) cannot train the instance task"
    with pytest.raises(TrainingDataError, match=refused):
        build(tiny_model_dir, train.semantic_rows(), val.semantic_rows(), tmp_path / "work", "instance")

