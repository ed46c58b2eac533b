"""The readers check rows before training: image / annotation sizes, RLE sizes, degenerate polygons, label values,
empty images (kept, or left out with ``filter_empty``); bad rows are listed once and skipped, or raise."""
import json

import numpy as np
import pytest
from PIL import Image

from modelscope_plugin.data.datasets import (
    DatasetProblemsError,
    read_coco_instances,
    read_coco_panoptic,
    read_label_folders,
)
from modelscope_plugin.data.synthetic import SceneConfig, write_dataset

SCENES = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)


@pytest.fixture
def split(tmp_path):
    return write_dataset(tmp_path / "data", "train", 3, seed=0, config=SCENES)


def panoptic_arguments(split):
    return str(split.panoptic_json), str(split.panoptic_folder), str(split.image_folder)


def test_a_panoptic_png_of_the_wrong_size_is_found_by_the_reader(split):
    png = split.panoptic_folder / "000002.png"
    Image.open(png).resize((48, 64), Image.NEAREST).save(png)
    rows, problems = read_coco_panoptic(*panoptic_arguments(split))
    assert [row["image_id"] for row in rows] == [1, 3]
    assert [problem.image_id for problem in problems] == [2]
    assert "panoptic PNG" in problems[0].reason and "is 48x64, the image" in problems[0].reason
    with pytest.raises(DatasetProblemsError, match="1 dataset rows rejected: 2: panoptic PNG"):
        read_coco_panoptic(*panoptic_arguments(split), on_error="raise")


def test_image_sizes_are_checked_against_the_annotation_file(split):
    for path in (split.panoptic_json, split.instances_json):
        data = json.loads(path.read_text())
        data["images"][0]["height"] = 80
        path.write_text(json.dumps(data))
    _, problems = read_coco_panoptic(*panoptic_arguments(split))
    assert [(p.image_id, "the annotation file says 64x80" in p.reason) for p in problems] == [(1, True)]
    _, problems = read_coco_instances(str(split.instances_json), str(split.image_folder))
    # the decoded image (64 rows) disagrees with the declared 80
    assert [(p.image_id, "the annotation file says 64x80" in p.reason) for p in problems] == [(1, True)]
    # an exporter that leaves the size out: the decoded image's
    del data["images"][0]["height"], data["images"][1]["width"]
    split.instances_json.write_text(json.dumps(data))
    for check_images in (True, False):
        rows, problems = read_coco_instances(str(split.instances_json), str(split.image_folder),
                                             check_images=check_images)
        assert problems == [] and [(row["height"], row["width"]) for row in rows] == [(64, 64)] * 3
        assert all(json.loads(row["annotations_json"])[0]["segmentation"]["size"] == [64, 64] for row in rows[:2])


def test_a_photo_with_an_exif_rotation_is_checked_in_the_frame_it_was_annotated_in(split, tmp_path):
    """A portrait phone photo stored landscape (EXIF orientation 6): annotation tools, training and inference see it
    rotated, so the JSON's width and height are the rotated ones (detectron2's check_image_size does the same)."""
    from modelscope_plugin.inference.preprocess import load_image

    data = json.loads(split.instances_json.read_text())
    stored = Image.fromarray(np.zeros((40, 64, 3), np.uint8))  # 64 wide, 40 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(split.image_folder / "portrait.jpg", exif=exif)
    assert load_image(str(split.image_folder / "portrait.jpg")).shape[:2] == (64, 40)
    data["images"].append({"id": 4, "file_name": "portrait.jpg", "height": 64, "width": 40})
    data["annotations"].append({"id": 99, "image_id": 4, "category_id": 1, "iscrowd": 0, "area": 100,
                                "bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]})
    split.instances_json.write_text(json.dumps(data))
    rows, problems = read_coco_instances(str(split.instances_json), str(split.image_folder))
    assert problems == [] and [row["image_id"] for row in rows] == [1, 2, 3, 4]
    # the stored (unrotated) size is the wrong one
    data["images"][-1].update(height=40, width=64)
    split.instances_json.write_text(json.dumps(data))
    _, problems = read_coco_instances(str(split.instances_json), str(split.image_folder))
    assert [(p.image_id, "is 40x64, the annotation file says 64x40" in p.reason) for p in problems] == [(4, True)]


def test_rle_of_another_size_and_degenerate_polygons_reject_their_image(split):
    data = json.loads(split.instances_json.read_text())
    by_image = {}
    for annotation in data["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    by_image[1][0]["segmentation"]["size"] = [32, 64]
    by_image[2][0]["segmentation"] = [[10, 10, 20, 20], [5, 5]]  # no polygon with 3 points
    by_image[3][0]["segmentation"] = [[10, 10, 20, 10, 20, 20], [5, 5]]  # one valid polygon: kept
    split.instances_json.write_text(json.dumps(data))
    rows, problems = read_coco_instances(str(split.instances_json), str(split.image_folder))
    assert [row["image_id"] for row in rows] == [3]
    reasons = {problem.image_id: problem.reason for problem in problems}
    assert f"annotation {by_image[1][0]['id']}: RLE size [32, 64] is not the image's [64, 64]" == reasons[1]
    assert f"annotation {by_image[2][0]['id']}: no polygon with 3 points or more (2 given)" == reasons[2]
    with pytest.raises(DatasetProblemsError) as raised:
        read_coco_instances(str(split.instances_json), str(split.image_folder), on_error="raise")
    assert [problem.image_id for problem in raised.value.problems] == [1, 2]


def test_empty_images_are_kept_or_left_out(split):
    data = json.loads(split.instances_json.read_text())
    # image 1: no annotation left; image 2: crowd objects only
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    for annotation in data["annotations"]:
        if annotation["image_id"] == 2:
            annotation["iscrowd"] = 1
    split.instances_json.write_text(json.dumps(data))
    arguments = (str(split.instances_json), str(split.image_folder))
    assert [row["image_id"] for row in read_coco_instances(*arguments)[0]] == [1, 2, 3]
    rows, problems = read_coco_instances(*arguments, filter_empty=True)
    assert [row["image_id"] for row in rows] == [3] and problems == []

    panoptic = json.loads(split.panoptic_json.read_text())
    for segment in panoptic["annotations"][0]["segments_info"]:
        segment["iscrowd"] = 1
    split.panoptic_json.write_text(json.dumps(panoptic))
    assert len(read_coco_panoptic(*panoptic_arguments(split))[0]) == 3
    assert [row["image_id"] for row in read_coco_panoptic(*panoptic_arguments(split), filter_empty=True)[0]] == [2, 3]


def test_label_folders_check_sizes_values_and_accept_the_ignore_value(split):
    labels = split.semantic_folder
    first, second, third = sorted(labels.iterdir())
    values = np.asarray(Image.open(first)).copy()
    values[:4] = 255  # ignored, not a class beyond the 7
    values[4, 0] = 7  # the last class
    Image.fromarray(values).save(first)
    Image.fromarray(np.zeros((64, 40), np.uint8)).save(second)
    values = np.asarray(Image.open(third)).copy()
    values[0, 0] = 8
    Image.fromarray(values).save(third)
    rows, problems = read_label_folders(str(split.image_folder), str(labels), 7)
    assert [row["image_id"] for row in rows] == ["000001"]
    reasons = {problem.image_id: problem.reason for problem in problems}
    assert "is 40x64, the image" in reasons["000002"]
    assert "label value 8 is beyond the 7 classes" in reasons["000003"]
    # values counted from 0: value 7 is the 8th class
    _, problems = read_label_folders(str(split.image_folder), str(labels), 7, reduce_zero_label=False)
    assert "label value 7 is beyond the 7 classes" in {p.image_id: p.reason for p in problems}["000001"]
    rows, _ = read_label_folders(str(split.image_folder), str(labels), 8, reduce_zero_label=False)
    assert [row["image_id"] for row in rows] == ["000001"]
    # a declared ignore value replaces 255
    rows, problems = read_label_folders(str(split.image_folder), str(labels), 8, reduce_zero_label=False, ignore_value=8)
    assert [row["image_id"] for row in rows] == ["000003"]
    assert "label value 255 is beyond the 8 classes" in {p.image_id: p.reason for p in problems}["000001"]


def test_segmentation_forms_become_one_compressed_rle():
    from pycocotools import mask as mask_utils

    from modelscope_plugin.data.datasets import compressed_rle

    square = [2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]
    nested = compressed_rle([square], 10, 12)
    assert compressed_rle(square, 10, 12) == nested  # a flat polygon, as some exporters write it
    decoded = mask_utils.decode(dict(nested, counts=nested["counts"].encode("ascii")))
    assert decoded.shape == (10, 12) and 30 <= decoded.sum() <= 50  # the 6 x 6 square, up to its boundary
    # uncompressed RLE: column-major runs, zeros first; here rows 0-1 of column 0 and rows 0-1 of column 1
    uncompressed = compressed_rle({"size": [10, 12], "counts": [0, 2, 8, 2, 108]}, 10, 12)
    expected = np.zeros((10, 12), np.uint8)
    expected[:2, :2] = 1
    np.testing.assert_array_equal(mask_utils.decode(dict(uncompressed, counts=uncompressed["counts"].encode())), expected)
    with pytest.raises(ValueError, match="neither polygons nor RLE"):
        compressed_rle({"points": []}, 10, 12)
