"""The ModelScope pipeline on a tiny random-weight model directory: output contract, batching, inputs, hub ids."""
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATA
from modelscope.outputs import OutputKeys
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image

IMAGE = str(SHARED_DATA / "coco" / "val2017" / "000000142238.jpg")


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir):
    return pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu")


def test_panoptic_output_contract(segmenter):
    result = segmenter(IMAGE)
    height, width = 427, 640
    masks = result[OutputKeys.MASKS]
    assert len(masks) >= 3, "shaped random weights should give several segments"
    assert all(mask.shape == (height, width) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} for mask in masks)
    # segments do not overlap and panoptic_seg agrees with the masks
    assert np.stack(masks).sum(0).max() == 1
    for index, (mask, info) in enumerate(zip(masks, result["segments_info"]), start=1):
        assert np.array_equal(result["panoptic_seg"] == index, mask.astype(bool))
        assert info["area"] == int(mask.sum())
        x1, y1, x2, y2 = result[OutputKeys.BOXES][index - 1]
        rows, columns = np.nonzero(mask)
        assert (x1, y1, x2, y2) == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
        assert info["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    # things (label id < 80) come before stuff, as ModelScope's built-ins order them
    isthing = [info["isthing"] for info in result["segments_info"]]
    assert isthing == sorted(isthing, reverse=True)
    assert all(0.8 < score <= 1.0 for score in result[OutputKeys.SCORES])
    assert all(name == segmenter.config.class_names[label] for name, label in zip(result[OutputKeys.LABELS], result["label_ids"]))


def test_semantic_and_instance_from_a_panoptic_model(segmenter):
    semantic = segmenter(IMAGE, task="semantic")
    assert semantic["sem_seg"].shape == (427, 640)
    assert np.stack(semantic[OutputKeys.MASKS]).sum(0).min() == 1  # every pixel has exactly one class
    assert semantic["label_ids"] == sorted(semantic["label_ids"], reverse=True)
    instance = segmenter(IMAGE, task="instance", score_thr=0.0)
    scores = instance[OutputKeys.SCORES]
    assert scores == sorted(scores, reverse=True) and len(scores) > 0
    assert all(label < 80 for label in instance["label_ids"])


def test_batch_of_mixed_sizes_equals_single_images(segmenter):
    rgb = np.asarray(Image.open(IMAGE).convert("RGB"))
    images = [IMAGE, rgb[:301, :333, ::-1].copy(), rgb[:200, :517, ::-1].copy(), IMAGE]
    batched = segmenter(images, batch_size=4)
    for image, batch_result in zip(images, batched):
        single = segmenter(image)
        assert batch_result[OutputKeys.LABELS] == single[OutputKeys.LABELS]
        assert np.allclose(batch_result[OutputKeys.SCORES], single[OutputKeys.SCORES], rtol=0, atol=1e-5)
        # oneDNN picks convolution algorithms by batch size, so logits differ by rounding and a pixel whose logit is at
        # the threshold can flip (seen on an AVX-512 CPU: 1 pixel of a 38905-pixel mask); on AVX2 they were identical
        assert all(np.count_nonzero(a != b) <= 10 for a, b in zip(batch_result[OutputKeys.MASKS], single[OutputKeys.MASKS]))


def test_input_types_agree(segmenter):
    rgb = np.asarray(Image.open(IMAGE).convert("RGB"))
    from_path = segmenter(IMAGE)
    from_pil = segmenter(Image.fromarray(rgb))
    from_bgr_array = segmenter(rgb[:, :, ::-1].copy())
    for other in (from_pil, from_bgr_array):
        assert other[OutputKeys.LABELS] == from_path[OutputKeys.LABELS]
        assert all(np.array_equal(a, b) for a, b in zip(other[OutputKeys.MASKS], from_path[OutputKeys.MASKS]))
    gray = segmenter(rgb[:, :, 0].copy())
    assert gray[OutputKeys.MASKS][0].shape == (427, 640)


def fresh_hub_config(monkeypatch):
    """modelscope_hub keeps one process-wide config with MODELSCOPE_CACHE / MODELSCOPE_ENDPOINT as they were when it
    was first used; each hub-id test starts from none (monkeypatch restores the previous one afterwards)."""
    import modelscope_hub.config

    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)


def test_cached_hub_id_resolves_without_network(tiny_model_dir, tmp_path, monkeypatch):
    import socket

    for owner in ("damo", "iic"):
        cache = tmp_path / owner
        snapshot = cache / "models" / f"{owner}--cv_swinL_panoptic-segmentation_cocopan" / "snapshots" / "master"
        shutil.copytree(tiny_model_dir, snapshot)
        monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
        fresh_hub_config(monkeypatch)
        from modelscope_plugin.integration import hub

        hub.resolve_model_dir.cache_clear()

        def no_network(*args, **kwargs):
            raise AssertionError("network access attempted")

        monkeypatch.setattr(socket, "getaddrinfo", no_network)
        monkeypatch.setattr(socket.socket, "connect", no_network)
        # both owner spellings resolve from the cache of either
        for model_id in ("damo/cv_swinL_panoptic-segmentation_cocopan", "iic/cv_swinL_panoptic-segmentation_cocopan"):
            result = pipeline(Tasks.image_segmentation, model=model_id, device="cpu")(IMAGE)
            assert len(result[OutputKeys.MASKS]) >= 3
        monkeypatch.undo()


def test_uncached_hub_id_fails_naming_id_and_cache(tmp_path, monkeypatch):
    from modelscope_plugin.integration import hub

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    fresh_hub_config(monkeypatch)
    hub.resolve_model_dir.cache_clear()
    with pytest.raises(hub.ModelNotAvailableError) as error:
        hub.resolve_model_dir("damo/cv_r50_panoptic-segmentation_cocopan")
    message = str(error.value)
    assert "damo/cv_r50_panoptic-segmentation_cocopan" in message and str(tmp_path) in message


def test_other_model_type_under_shared_pipeline_name_never_runs_mask2former(tmp_path):
    """damo/cv_vitadapter_semantic-segmentation_cocostuff164k shares 'image-semantic-segmentation'."""
    import json

    (tmp_path / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation",
        "model": {"type": "vitadapter-semantic-segmentation"}, "pipeline": {"type": "image-semantic-segmentation"}}))
    with pytest.raises(Exception) as error:
        pipeline(Tasks.image_segmentation, model=str(tmp_path), device="cpu")
    assert "vitadapter-semantic-segmentation" in str(error.value) and "built-in" in str(error.value)
    from modelscope.pipelines.builder import PIPELINES

    ours = PIPELINES.get("image-semantic-segmentation", Tasks.image_segmentation)
    assert ours.__module__.startswith("modelscope_plugin")


def test_file_modes_and_exif_orientation(segmenter, tmp_path):
    rgb = np.asarray(Image.open(IMAGE).convert("RGB"))[:200, :300]
    sixteen_bit = tmp_path / "gray16.png"
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(sixteen_bit)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(rgba)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise for display
    Image.fromarray(rgb).save(rotated, exif=exif)
    for path, size in ((sixteen_bit, (200, 300)), (rgba, (200, 300)), (rotated, (300, 200))):
        result = segmenter(str(path))
        assert all(mask.shape == size for mask in result[OutputKeys.MASKS]), path.name
    # RGBA: alpha dropped, same answer as the RGB image
    from_rgba = segmenter(str(rgba))
    from_rgb = segmenter(rgb[:, :, ::-1].copy())
    assert from_rgba[OutputKeys.LABELS] == from_rgb[OutputKeys.LABELS]


def test_bad_inputs_raise_one_clear_error(segmenter, tmp_path):
    from modelscope_plugin.errors import ImageInputError

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [(str(tmp_path / "missing.jpg"), "does not exist"), (str(corrupt), "not a readable image"),
             (np.full((4, 4, 3), np.nan, np.float32), "NaN"), (np.zeros((4, 4, 3), np.int8), "dtype")]
    for bad, reason in cases:
        with pytest.raises(ImageInputError, match=reason):
            segmenter(bad)


def test_bf16_precision_agrees_with_fp32_and_fp16_needs_cuda(tiny_model_dir, segmenter):
    half = pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu", precision="bf16")
    full_result, half_result = segmenter(IMAGE), half(IMAGE)
    assert len(full_result[OutputKeys.MASKS]) >= 3

    def segment_labels(result):
        # (H, W) label of the segment covering each pixel, -1 where none
        label_map = np.full(result["panoptic_seg"].shape, -1)
        for mask, label_id in zip(result[OutputKeys.MASKS], result["label_ids"]):
            label_map[mask.astype(bool)] = label_id
        return label_map

    assert (segment_labels(full_result) == segment_labels(half_result)).mean() >= 0.98
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu", precision="int8")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch, caplog, native):
    import torch

    from modelscope_plugin.inference import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    precision._warn_slow_bf16.cache_clear()
    caplog.set_level("WARNING", logger="modelscope_plugin.precision")
    for _ in range(2):
        precision.check_precision("bf16", torch.device("cpu"))
    precision.check_precision("fp32", torch.device("cpu"))
    warnings = [record for record in caplog.records if "native bfloat16" in record.getMessage()]
    assert len(warnings) == (0 if native else 1)
    precision._warn_slow_bf16.cache_clear()


def test_model_directory_with_invalid_configuration_names_it(tmp_path):
    from modelscope_plugin.errors import ModelDirError

    (tmp_path / "configuration.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="configuration.json is not valid JSON"):
        pipeline(Tasks.image_segmentation, model=str(tmp_path))


def test_model_directory_without_configuration_names_it(tmp_path):
    from modelscope_plugin.errors import ModelDirError

    (tmp_path / "pytorch_model.pt").write_bytes(b"")
    with pytest.raises(ModelDirError, match=f"{tmp_path} has no configuration.json"):
        pipeline(Tasks.image_segmentation, model=str(tmp_path))
