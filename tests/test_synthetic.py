"""Synthetic COCO-format scenes: determinism, the spec's ranges, and files that COCO tools and our readers accept."""
import filecmp
import json
import math

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from modelscope_plugin.data.datasets import as_ms_dataset, load_label_map, rgb_to_id
from modelscope_plugin.data.ground_truth_outputs import instance_outputs, panoptic_outputs
from modelscope_plugin.data.synthetic import (
    STUFF_CATEGORIES,
    SYNTHETIC_CATEGORIES,
    THING_CATEGORIES,
    SceneConfig,
    generate_scene,
    rasterize_shape,
    write_dataset,
)
from modelscope_plugin.evaluation import evaluate_rows

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"), "train", NUM_IMAGES, seed=3)


def test_same_seed_same_bytes_other_seed_other_images(dataset, tmp_path):
    again = write_dataset(tmp_path / "again", "train", NUM_IMAGES, seed=3)
    for name in ("image_folder", "panoptic_folder", "semantic_folder"):
        first, second = getattr(dataset, name), getattr(again, name)
        names = sorted(path.name for path in first.iterdir())
        assert len(names) == NUM_IMAGES and names == sorted(path.name for path in second.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
        assert mismatch == [] and errors == []
    for name in ("instances_json", "panoptic_json"):
        assert getattr(dataset, name).read_bytes() == getattr(again, name).read_bytes()
    other = write_dataset(tmp_path / "other", "train", 2, seed=4)
    assert not filecmp.cmp(dataset.image_folder / "000001.png", other.image_folder / "000001.png", shallow=False)
    # image i depends only on (seed, i), not on how many are written
    assert filecmp.cmp(dataset.image_folder / "000002.png", again.image_folder / "000002.png", shallow=False)
    fewer = write_dataset(tmp_path / "fewer", "train", 2, seed=3)
    assert filecmp.cmp(dataset.image_folder / "000002.png", fewer.image_folder / "000002.png", shallow=False)


def test_scenes_follow_the_specification():
    config = SceneConfig()
    repeated_class_everywhere = True
    for index in range(12):
        scene = generate_scene(np.random.default_rng([11, index]), config)
        assert scene.image.shape == (256, 256, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.polylines) <= 3
        assert 2 <= len(scene.things) <= 12
        for thing in scene.things:
            assert 10 <= thing.size <= 90
            hidden = 1 - (thing.visible_mask & thing.amodal_mask).sum() / thing.amodal_mask.sum()
            assert hidden <= 0.4 + 1e-9
            assert not (thing.visible_mask & ~thing.amodal_mask).any()
        counts = np.bincount([thing.category_id for thing in scene.things])
        repeated_class_everywhere &= bool(counts.max() >= 2)
        assert set(np.unique(scene.stuff_class)) <= set(range(len(STUFF_CATEGORIES)))
    assert repeated_class_everywhere


def test_every_class_occurs_and_occlusion_happens():
    seen, occluded = set(), 0
    for index in range(12):
        scene = generate_scene(np.random.default_rng([12, index]))
        seen |= {thing.category_id for thing in scene.things}
        seen |= {STUFF_CATEGORIES[value].id for value in np.unique(scene.stuff_class)}
        occluded += sum(int(thing.visible_mask.sum() < thing.amodal_mask.sum()) for thing in scene.things)
    assert seen == {category.id for category in SYNTHETIC_CATEGORIES}
    assert occluded >= 5  # overlaps are part of the task


def test_shapes_have_their_geometric_areas():
    # disc of diameter d: pi d^2 / 4; square inscribed in it: d^2 / 2; equilateral triangle: 3 sqrt(3) d^2 / 16;
    # pentagram: 5 R r sin(36 deg) with r / R = sin 18 / sin 54
    diameter = 80.0
    ratio = math.sin(math.radians(18)) / math.sin(math.radians(54))
    expected = {"disc": math.pi * diameter ** 2 / 4, "square": diameter ** 2 / 2,
                "triangle": 3 * math.sqrt(3) * diameter ** 2 / 16,
                "star": 5 * (diameter / 2) ** 2 * ratio * math.sin(math.radians(36))}
    for name, area in expected.items():
        mask = rasterize_shape(name, (100.3, 120.7), diameter, 0.3, 256)
        assert abs(mask.sum() / area - 1) < 0.005, name


def test_coco_files_validate(dataset):
    instances = COCO(str(dataset.instances_json))
    assert sorted(instances.getCatIds()) == [c.id for c in THING_CATEGORIES]
    assert len(instances.getImgIds()) == NUM_IMAGES
    panoptic = json.loads(dataset.panoptic_json.read_text())
    assert [c["id"] for c in panoptic["categories"]] == [c.id for c in SYNTHETIC_CATEGORIES]
    index_of = {c.id: index for index, c in enumerate(SYNTHETIC_CATEGORIES)}
    for annotation in panoptic["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(dataset.panoptic_folder / annotation["file_name"]).convert("RGB")))
        segments = {segment["id"]: segment for segment in annotation["segments_info"]}
        present, counts = np.unique(ids, return_counts=True)
        # every pixel belongs to a listed segment, every listed segment has its stated area and bbox
        assert set(present.tolist()) == set(segments)
        for segment_id, count in zip(present.tolist(), counts.tolist()):
            segment = segments[segment_id]
            assert segment["area"] == count
            rows, columns = np.nonzero(ids == segment_id)
            assert segment["bbox"] == [columns.min(), rows.min(), columns.max() - columns.min() + 1,
                                       rows.max() - rows.min() + 1]
        # the instance RLEs are the thing segments of the panoptic PNG, in the same order
        annotations = instances.loadAnns(instances.getAnnIds(imgIds=[annotation["image_id"]]))
        things = [segment for segment in annotation["segments_info"] if segment["category_id"] <= 4]
        assert len(annotations) == len(things)
        for instance, segment in zip(annotations, things):
            assert instance["category_id"] == segment["category_id"]
            assert np.array_equal(instances.annToMask(instance).astype(bool), ids == segment["id"])
            assert instance["area"] / instance["amodal_area"] >= 0.6  # occlusion bound, as written
        # the semantic PNG is the panoptic map's classes (index + 1)
        semantic = np.asarray(Image.open(dataset.semantic_folder / annotation["file_name"]))
        expected = np.zeros_like(semantic)
        for segment in annotation["segments_info"]:
            expected[ids == segment["id"]] = index_of[segment["category_id"]] + 1
        assert np.array_equal(semantic, expected)


def test_read_back_through_the_readers_and_scored_by_the_metrics(dataset):
    panoptic_rows = dataset.panoptic_rows()
    instance_rows = dataset.instance_rows()
    semantic_rows = dataset.semantic_rows()
    assert len(panoptic_rows) == len(instance_rows) == len(semantic_rows) == NUM_IMAGES
    ms_dataset = as_ms_dataset(panoptic_rows)
    assert len(ms_dataset) == NUM_IMAGES and ms_dataset[0]["image_path"] == panoptic_rows[0]["image_path"]
    # the ground truth in the pipeline's output format scores perfectly; a shuffled one does not
    outputs = [panoptic_outputs(row, SYNTHETIC_CATEGORIES) for row in panoptic_rows]
    assert evaluate_rows(panoptic_rows, outputs, "panoptic", categories=SYNTHETIC_CATEGORIES)["PQ"] == pytest.approx(100)
    shuffled = evaluate_rows(panoptic_rows, outputs[1:] + outputs[:1], "panoptic", categories=SYNTHETIC_CATEGORIES)
    assert shuffled["PQ"] < 50
    instance_results = [instance_outputs(row, THING_CATEGORIES) for row in instance_rows]
    ap = evaluate_rows(instance_rows, instance_results, "instance", categories=THING_CATEGORIES)
    assert ap["segm"]["AP"] == pytest.approx(1.0)
    semantic = [{"sem_seg": load_label_map(row)} for row in semantic_rows]
    miou = evaluate_rows(semantic_rows, semantic, "semantic", class_names=[c.name for c in SYNTHETIC_CATEGORIES],
                         categories=SYNTHETIC_CATEGORIES)
    assert miou["mIoU"] == pytest.approx(100)


def test_refuses_to_overwrite_and_rejects_bad_arguments(dataset):
    before = dataset.panoptic_json.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        write_dataset(dataset.root, "train", 1, seed=0)
    assert dataset.panoptic_json.read_bytes() == before
    with pytest.raises(ValueError, match="num_images"):
        write_dataset(dataset.root, "val", 0, seed=0)
    with pytest.raises(ValueError, match="split"):
        write_dataset(dataset.root, "annotations", 1, seed=0)


def test_scene_config_is_checked_and_scales():
    with pytest.raises(ValueError, match="thing sizes"):
        SceneConfig(image_size=64)  # 90-pixel shapes cannot fit
    with pytest.raises(ValueError, match="things per image"):
        SceneConfig(min_things=1)
    small = SceneConfig.scaled(64)
    assert (small.min_thing_size, small.max_thing_size) == (2.5, 22.5)
    scene = generate_scene(np.random.default_rng(0), small)
    assert scene.image.shape == (64, 64, 3) and 2 <= len(scene.things) <= 12
