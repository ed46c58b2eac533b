"""``BatchSegmenter``: batches of paths in, the CLI's JSON documents out; as a Ray Data callable on a local
two-worker cluster the results equal one process's."""
import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image
from pycocotools import mask as mask_utils

from modelscope_plugin.inference.batch import BatchSegmenter

IMAGES = [SHARED_DATA / "coco" / "val2017" / "000000142238.jpg", SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"]


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch_images")
    paths = []
    for index in range(4):
        path = folder / f"image_{index}.png"
        Image.open(IMAGES[index % 2]).convert("RGB").resize((160 + 16 * index, 120)).save(path)
        paths.append(str(path))
    return paths


def assert_document_equals_result(document, result):
    segments = document["segments"]
    assert len(segments) == len(result["masks"]) >= 1
    assert [segment["label"] for segment in segments] == result["labels"]
    assert [segment["score"] for segment in segments] == pytest.approx(result["scores"], abs=1e-6)
    for segment, mask in zip(segments, result["masks"]):
        rle = {"size": segment["rle"]["size"], "counts": segment["rle"]["counts"].encode("ascii")}
        assert np.array_equal(mask_utils.decode(rle), mask)


def test_batches_of_paths_give_the_pipeline_results_and_an_error_per_bad_path(tiny_model_dir, small_images, tmp_path):
    segmenter = BatchSegmenter(str(tiny_model_dir), task="panoptic")
    missing = str(tmp_path / "missing.jpg")
    output = segmenter({"path": np.asarray([small_images[0], missing, small_images[1]], dtype=object)})
    assert list(output["path"]) == [small_images[0], missing, small_images[1]]
    assert output["error"][0] == output["error"][2] == "" and "does not exist" in output["error"][1]
    assert json.loads(output["result"][1]) == {"segments": []}
    reference = pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu")
    for index in (0, 2):
        assert_document_equals_result(json.loads(output["result"][index]), reference(output["path"][index]))


def test_ray_data_map_batches_on_two_workers_equals_one_process(tiny_model_dir, small_images):
    import ray  # a test-only extra (modelscope-plugin-seg[test])
    one_process = BatchSegmenter(str(tiny_model_dir))({"path": np.asarray(small_images, dtype=object)})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        rows = ray.data.from_items([{"path": path} for path in small_images]).map_batches(
            BatchSegmenter, fn_constructor_kwargs={"model": str(tiny_model_dir)}, batch_size=1, concurrency=2,
            num_cpus=1).take_all()
    finally:
        ray.shutdown()
    by_path = {row["path"]: row for row in rows}
    assert sorted(by_path) == sorted(small_images)
    for path, document, error in zip(one_process["path"], one_process["result"], one_process["error"]):
        assert by_path[path]["error"] == error == ""
        ours, theirs = json.loads(by_path[path]["result"]), json.loads(document)
        assert [segment["rle"] for segment in ours["segments"]] == [segment["rle"] for segment in theirs["segments"]]
        assert [segment["label"] for segment in ours["segments"]] == [segment["label"] for segment in theirs["segments"]]
        assert [segment["score"] for segment in ours["segments"]] == pytest.approx(
            [segment["score"] for segment in theirs["segments"]], abs=1e-5)
