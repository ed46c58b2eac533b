"""The bad-input table: each bad image, array, URL, checkpoint or model directory gives one error naming it and why;
odd but valid inputs (1x1, extreme aspect, CMYK, EXIF rotation, huge) give masks at the displayed input size."""
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA
from modelscope.outputs import OutputKeys
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image

from modelscope_plugin import errors
from modelscope_plugin.errors import CheckpointError, ImageInputError, ModelDirError
from modelscope_plugin.inference.outputs import postprocess_size, upsample_nearest
from modelscope_plugin.inference.preprocess import load_image

IMAGE = SHARED_DATA / "coco" / "val2017" / "000000142238.jpg"


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir):
    return pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def small_rgb():
    return np.asarray(Image.open(IMAGE).convert("RGB"))[:120, :160].copy()


def closed_local_url() -> str:
    """A URL on a localhost port nothing listens on (connection refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/image.jpg"


@pytest.fixture
def local_server(tmp_path):
    """A localhost HTTP server over tmp_path (404 for anything absent); stops after the test."""
    handler = lambda *args, **kwargs: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path), **kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def bad_files(directory: Path):
    data = IMAGE.read_bytes()
    png = directory / "good.png"
    Image.open(IMAGE).save(png)
    cases = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (data[: len(data) // 2], "truncated"),
        "truncated.png": (png.read_bytes()[: png.stat().st_size // 2], "truncated"),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0 not really a jpeg" * 4, "not a readable image"),
        "text.png": (b"hello, I am not a PNG", "not a readable image"),
    }
    for name, (content, _) in cases.items():
        (directory / name).write_bytes(content)
    return [(str(directory / name), reason) for name, (_, reason) in cases.items()]


def test_bad_files_name_the_file_and_the_reason(tmp_path):
    cases = bad_files(tmp_path) + [(str(tmp_path / "missing.jpg"), "does not exist"), (str(tmp_path), "directory")]
    for source, reason in cases:
        with pytest.raises(ImageInputError) as error:
            load_image(source)
        assert source in str(error.value) and reason in str(error.value), (source, str(error.value))


def test_decompression_bomb_guard_is_an_image_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x 1000: PIL raises, not warns
    with pytest.raises(ImageInputError, match="too many pixels") as error:
        load_image(str(path))
    assert str(path) in str(error.value)


def test_urls_unreachable_missing_and_served(tmp_path, local_server):
    url = closed_local_url()
    with pytest.raises(ImageInputError, match="cannot download") as error:
        load_image(url)
    assert url in str(error.value)
    with pytest.raises(ImageInputError, match="404") as error:
        load_image(f"{local_server}/absent.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageInputError, match="empty"):
        load_image(f"{local_server}/empty.jpg")
    shutil.copy(IMAGE, tmp_path / "served.jpg")
    assert np.array_equal(load_image(f"{local_server}/served.jpg"), load_image(str(IMAGE)))


@pytest.mark.parametrize("array, reason", [
    (np.zeros((8, 8, 3), bool), "unsupported dtype"),
    (np.zeros((8, 8, 3), np.int64), "unsupported dtype"),
    (np.zeros((8, 8, 3), np.complex64), "unsupported dtype"),
    (np.empty((8, 8, 3), object), "unsupported dtype"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8, 3), np.inf, np.float64), "infinite"),
    (np.full((8, 8, 3), 300.0), r"\[0, 255\]"),
    (np.full((8, 8, 3), -1.0), r"\[0, 255\]"),
    (np.zeros((8, 8, 2), np.uint8), "expected shape"),
    (np.zeros((8,), np.uint8), "expected shape"),
    (np.zeros((2, 8, 8, 3), np.uint8), "expected shape"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
])
def test_bad_arrays_name_shape_dtype_and_reason(array, reason):
    with pytest.raises(ImageInputError, match=reason) as error:
        load_image(array)
    assert str(array.shape) in str(error.value) and str(array.dtype) in str(error.value)


def test_bad_types_and_empty_pil_images():
    for bad in (None, 3, {"image": "x.jpg"}, b"bytes"):
        with pytest.raises(ImageInputError, match=type(bad).__name__):
            load_image(bad)
    with pytest.raises(ImageInputError, match="empty"):
        load_image(Image.new("RGB", (0, 5)))


def test_tiny_and_extreme_aspect_images_give_masks_at_input_size(segmenter):
    rng = np.random.default_rng(0)
    for height, width in ((1, 1), (1, 5000), (700, 1), (2, 3)):  # 1 x 5000 would resize to 0 rows by mmcv rounding
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for task in ("panoptic", "semantic", "instance") if height * width == 1 else ("panoptic",):
            result = segmenter(image, task=task, score_thr=0.0)
            assert all(mask.shape == (height, width) for mask in result[OutputKeys.MASKS]), (height, width, task)
            for mask, box in zip(result[OutputKeys.MASKS], result[OutputKeys.BOXES]):
                assert (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height) if mask.any() else box == [0.0] * 4


def test_cmyk_jpeg_reads_as_its_rgb_colours(segmenter, small_rgb, tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(small_rgb).convert("CMYK").save(path, quality=98)
    assert Image.open(path).mode == "CMYK"
    decoded = load_image(str(path))
    # JPEG loss only: an inverted (Adobe) CMYK reading would be off by ~100 grey levels
    assert np.abs(decoded.astype(int) - small_rgb).mean() < 3
    assert all(mask.shape == small_rgb.shape[:2] for mask in segmenter(str(path))[OutputKeys.MASKS])


@pytest.mark.parametrize("orientation, displayed", [(6, lambda rgb: np.rot90(rgb, -1)), (2, lambda rgb: rgb[:, ::-1])])
def test_exif_rotated_photo_segments_as_displayed(segmenter, small_rgb, tmp_path, orientation, displayed):
    """A lossless PNG with an EXIF orientation gives exactly the masks of the displayed-orientation pixels."""
    path = tmp_path / f"orientation{orientation}.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(small_rgb).save(path, exif=exif)
    shown = np.ascontiguousarray(displayed(small_rgb))
    from_file = segmenter(str(path))
    from_displayed = segmenter(shown[:, :, ::-1].copy())  # BGR array, ModelScope's convention
    assert from_file[OutputKeys.LABELS] == from_displayed[OutputKeys.LABELS] and len(from_file[OutputKeys.MASKS]) > 0
    for mask, expected in zip(from_file[OutputKeys.MASKS], from_displayed[OutputKeys.MASKS]):
        assert mask.shape == shown.shape[:2] and np.array_equal(mask, expected)


def test_list_inputs_raise_on_first_bad_item_or_return_error_entries(segmenter, small_rgb, tmp_path):
    missing = str(tmp_path / "missing.jpg")
    bgr = small_rgb[:, :, ::-1].copy()
    items = [bgr, missing, np.full((4, 4, 3), np.nan, np.float32), str(IMAGE)]
    with pytest.raises(ImageInputError, match="list item 1") as error:
        segmenter(items)
    assert missing in str(error.value)
    singles = {0: segmenter(bgr), 3: segmenter(str(IMAGE))}
    for batch_size in (None, 2):
        results = segmenter(items, on_error="return", **({"batch_size": batch_size} if batch_size else {}))
        assert len(results) == 4
        for index, single in singles.items():
            assert "error" not in results[index]
            assert results[index][OutputKeys.LABELS] == single[OutputKeys.LABELS]
            assert all(np.array_equal(a, b) for a, b in zip(results[index][OutputKeys.MASKS], single[OutputKeys.MASKS]))
        assert results[1]["error"]["index"] == 1 and results[1]["error"]["input"] == missing
        assert results[1]["error"]["type"] == "ImageInputError" and "does not exist" in results[1]["error"]["message"]
        assert results[2]["error"]["index"] == 2 and "NaN" in results[2]["error"]["message"]
        assert results[1][OutputKeys.MASKS] == [] and results[2][OutputKeys.LABELS] == []
    with pytest.raises(ValueError, match="on_error"):
        segmenter(items, on_error="ignore")


def test_error_types_are_exported_in_one_place():
    from modelscope_plugin.checkpoints import io as checkpoint
    from modelscope_plugin.inference import preprocess as preprocessing
    from modelscope_plugin.integration import hub
    from modelscope_plugin.model_dirs import mask2former as model_dir

    assert errors.ImageInputError is preprocessing.ImageInputError
    assert errors.CheckpointError is checkpoint.CheckpointError and errors.ModelDirError is model_dir.ModelDirError
    assert errors.ModelNotAvailableError is hub.ModelNotAvailableError
    assert set(errors.USER_ERRORS) == {errors.ImageInputError, errors.CheckpointError, errors.ModelDirError,
                                       errors.ModelNotAvailableError}


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/modelscope_plugin_inputs_pwned",))


def broken_model_dirs(tiny_model_dir: Path, root: Path):
    """(directory, expected error type, text the message must contain) for each way a model directory can be bad."""
    def copy(name):
        target = root / name
        shutil.copytree(tiny_model_dir, target)
        return target

    truncated = copy("truncated")
    weights = truncated / "pytorch_model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    mismatched = copy("mismatched")
    configuration = json.loads((mismatched / "configuration.json").read_text())
    configuration["model"]["config"]["num_queries"] = 7
    (mismatched / "configuration.json").write_text(json.dumps(configuration))
    evil = copy("evil")
    state = torch.load(evil / "pytorch_model.pt", weights_only=True)
    torch.save({"state_dict": state["state_dict"], "meta": RunsCode()}, evil / "pytorch_model.pt")
    two_weights = copy("two_weights")
    (two_weights / "pytorch_model.pt").rename(two_weights / "a.pt")
    shutil.copy(two_weights / "a.pt", two_weights / "b.pt")
    return [
        (truncated, CheckpointError, ["pytorch_model.pt", "truncated or corrupt"]),
        (mismatched, CheckpointError, ["pytorch_model.pt", "query_feat.weight", "(20, 64)"]),
        (evil, CheckpointError, ["pytorch_model.pt", "refusing", "posix.system"]),
        (two_weights, ModelDirError, ["a.pt, b.pt", "exactly one weights file"]),
    ]


def test_broken_model_directories_fail_through_the_pipeline_with_one_clear_error(tiny_model_dir, tmp_path):
    for directory, error_type, fragments in broken_model_dirs(tiny_model_dir, tmp_path):
        with pytest.raises(error_type) as error:
            pipeline(Tasks.image_segmentation, model=str(directory), device="cpu")
        message = str(error.value)
        assert all(fragment in message for fragment in fragments), (directory.name, message)
    assert not os.path.exists("/tmp/modelscope_plugin_inputs_pwned")


def test_model_directory_without_readable_configuration(tiny_model_dir, tmp_path):
    """ModelScope's own builder reads configuration.json before this package sees the directory; the package's
    loader names the directory and the reason."""
    from modelscope_plugin.model_dirs.load import load_model_dir

    missing = tmp_path / "no_config"
    shutil.copytree(tiny_model_dir, missing)
    (missing / "configuration.json").unlink()
    invalid = tmp_path / "bad_json"
    shutil.copytree(tiny_model_dir, invalid)
    (invalid / "configuration.json").write_text("{not json")
    for directory, reason in ((missing, "has no configuration.json"), (invalid, "not valid JSON"),
                              (tmp_path / "absent", "does not exist")):
        with pytest.raises(ModelDirError, match=reason) as error:
            load_model_dir(directory)
        assert str(directory) in str(error.value)


def test_upsample_nearest_matches_pil_and_torch_nearest_exact():
    """Odd input sizes: no exact ties, where PIL and torch round (i + 1/2) * in / out in floating point."""
    rng = np.random.default_rng(1)
    for (height, width), size in (((5, 7), (23, 31)), ((41, 31), (40, 293)), ((3, 3), (3, 3)), ((9, 5), (4, 9))):
        values = rng.integers(0, 250, (height, width), dtype=np.uint8)
        from_pil = np.asarray(Image.fromarray(values).resize(size[::-1], Image.NEAREST))
        from_torch = torch.nn.functional.interpolate(torch.from_numpy(values)[None, None].float(), size=size,
                                                     mode="nearest-exact")[0, 0].numpy().astype(np.uint8)
        upsampled = upsample_nearest(values, size)
        assert np.array_equal(upsampled, from_pil) and np.array_equal(upsampled, from_torch), (height, width, size)
    assert upsample_nearest(np.arange(6, dtype=np.int32).reshape(2, 3), (2, 3)).dtype == np.int32


def test_postprocess_size_cap():
    assert postprocess_size((427, 640)) == (427, 640)
    height, width = postprocess_size((12000, 9000))
    assert height * width <= 2048 * 2048 and abs(height / width - 12000 / 9000) < 1e-3 and height * width > 0.99 * 2048 ** 2
    assert postprocess_size((12000, 9000), None) == (12000, 9000)
    assert postprocess_size((1, 10 ** 7), 100) == (1, 100)
    height, width = postprocess_size((10 ** 7, 2), 100)
    assert 1 <= width <= 2 and height * width <= 100


def test_capped_postprocessing_agrees_with_full_size(segmenter):
    """The cap changes masks only along boundaries (jagged ones, with random weights): same segments, >= 90% of
    pixels in the same segment, and a transposed or shifted upsampling would fail that."""
    image = np.asarray(Image.open(IMAGE).convert("RGB"))[:, :, ::-1].copy()
    full = segmenter(image, max_postprocess_pixels=None)
    capped = segmenter(image, max_postprocess_pixels=320 * 480)  # above the 200 x 300 stride-4 logits
    assert capped[OutputKeys.LABELS] == full[OutputKeys.LABELS] and len(full[OutputKeys.MASKS]) >= 3
    assert all(mask.shape == (427, 640) for mask in capped[OutputKeys.MASKS])
    assert (capped["panoptic_seg"] == full["panoptic_seg"]).mean() > 0.9
    for mask, info in zip(capped[OutputKeys.MASKS], capped["segments_info"]):
        assert info["area"] == mask.sum() and np.array_equal(capped["panoptic_seg"] == info["id"], mask.astype(bool))


HUGE_IMAGE_SCRIPT = r"""
import json, sys
import numpy as np
import modelscope_plugin
from modelscope.pipelines import pipeline

def status_bytes(field):
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

segmenter = pipeline("image-segmentation", model=sys.argv[1], device="cpu")
height, width = int(sys.argv[2]), int(sys.argv[3])
blocks = np.random.default_rng(0).integers(0, 256, (9, 12, 3), dtype=np.uint8)
image = np.repeat(np.repeat(blocks, height // 9 + 1, 0), width // 12 + 1, 1)[:height, :width].copy()
segmenter(image[:64, :64].copy())
# reset the high-water mark (Linux clear_refs 5) so the peak covers the call alone, not building the test image
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status_bytes("VmRSS")
result = segmenter(image)
peak = status_bytes("VmHWM")
print(json.dumps({"before": before, "peak": peak, "segments": len(result["masks"]),
                  "shapes": sorted({tuple(mask.shape) for mask in result["masks"]}),
                  "panoptic_seg": list(result["panoptic_seg"].shape)}))
"""


def measure_memory(tiny_model_dir, height, width):
    completed = subprocess.run([sys.executable, "-c", HUGE_IMAGE_SCRIPT, str(tiny_model_dir), str(height), str(width)],
                               capture_output=True, text=True, timeout=600, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_huge_image_runs_at_model_resolution_within_the_documented_memory_bound(tiny_model_dir):
    """12000 x 9000 (108 MP): inference at model resolution, post-processing at 2048^2 pixels, masks at full size.

    Documented bound (integration/outputs.py): beyond the input, the full-size results cost one byte per pixel per
    mask plus 4 for ``panoptic_seg``; transient copies (RGB conversion, one mask comparison) add at most 3 more.
    Without the cap, every kept query would hold float maps of 4 bytes per pixel, several times over.

    What the interpreter, torch's allocator and the model-resolution inference cost is measured in this test, on
    this machine: the same call on a 2400 x 1800 image (above the cap too, so the same inference and post-processing
    sizes) is the baseline; the huge image may add only the documented per-pixel cost (and 25 % of the baseline)."""
    height, width = 12000, 9000
    measured = measure_memory(tiny_model_dir, height, width)
    baseline = measure_memory(tiny_model_dir, 2400, 1800)
    assert measured["segments"] >= 1 and baseline["segments"] >= 1
    assert measured["shapes"] == [[height, width]] and measured["panoptic_seg"] == [height, width]
    pixels = height * width
    baseline_growth = baseline["peak"] - baseline["before"]
    bound = 1.25 * baseline_growth + (measured["segments"] + 4 + 3) * pixels
    growth = measured["peak"] - measured["before"]
    assert growth <= bound, (f"peak grew by {growth / 2 ** 20:.0f} MiB; bound {bound / 2 ** 20:.0f} MiB "
                             f"(baseline {baseline_growth / 2 ** 20:.0f} MiB)")


# Value-level checks: each accepted input form decodes to the same RGB pixels, built here by hand from a known RGB
# image (not by the code under test), and gives the same network input.

def known_rgb() -> np.ndarray:
    """A real photo crop with distinct R, G and B (a swapped or dropped channel changes values)."""
    rgb = np.asarray(Image.open(IMAGE).convert("RGB"))[40:88, 100:164].copy()
    assert (rgb[:, :, 0] != rgb[:, :, 2]).mean() > 0.9
    return rgb


def test_bgra_array_decodes_to_its_bgr_part_alpha_ignored():
    rgb = known_rgb()
    bgr = rgb[:, :, ::-1]
    for alpha in (0, 255, np.arange(rgb.size // 3).reshape(rgb.shape[:2]) % 256):
        bgra = np.dstack([bgr, np.broadcast_to(alpha, rgb.shape[:2]).astype(np.uint8)])
        assert np.array_equal(load_image(bgra), rgb)
        assert np.array_equal(load_image(bgra), load_image(np.ascontiguousarray(bgr)))


def test_uint16_array_equals_its_8_bit_value_times_257():
    rgb = known_rgb()
    bgr16 = rgb[:, :, ::-1].astype(np.uint16) * 257
    assert np.array_equal(load_image(bgr16), rgb)
    # within half a step of v * 257 rounds to v (ModelScope/cv2 16-bit images are not exact multiples)
    offsets = np.random.default_rng(0).integers(-128, 129, bgr16.shape)
    near = np.clip(bgr16.astype(np.int64) + offsets, 0, 65535).astype(np.uint16)
    assert np.array_equal(load_image(near), rgb)
    gray16 = rgb[:, :, 1].astype(np.uint16) * 257
    assert np.array_equal(load_image(gray16), np.repeat(rgb[:, :, 1:2], 3, axis=2))
    bgra16 = np.dstack([bgr16, np.full(rgb.shape[:2], 65535, np.uint16)])
    assert np.array_equal(load_image(bgra16), rgb)


def test_gray_array_equals_its_three_channel_copy():
    gray = known_rgb()[:, :, 1].copy()
    expected = np.dstack([gray, gray, gray])
    for form in (gray, gray[:, :, None], gray.astype(np.float32), gray.astype(np.uint16) * 257):
        assert np.array_equal(load_image(form), expected), form.shape
    assert np.array_equal(load_image(Image.fromarray(gray, "L")), expected)


def test_pil_image_equals_its_bgr_array_and_float_array():
    rgb = known_rgb()
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb)
    assert np.array_equal(load_image(np.ascontiguousarray(rgb[:, :, ::-1])), rgb)
    assert np.array_equal(load_image(rgb[:, :, ::-1].astype(np.float64)), rgb)
    # an RGBA PIL image drops alpha (as ModelScope's convert('RGB')), it is not composited
    rgba = Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA")
    assert np.array_equal(load_image(rgba), rgb)


# EXIF orientation -> the displayed image, written out per the EXIF 2.3 table (not read back through PIL)
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed (mirror + 90 counter-clockwise)
    6: lambda a: np.rot90(a, -1),  # 90 clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transverse
    8: lambda a: np.rot90(a, 1),  # 90 counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_gives_the_displayed_pixels(tmp_path, orientation):
    rgb = known_rgb()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"orientation{orientation}.png"
    Image.fromarray(rgb).save(path, exif=exif)
    expected = np.ascontiguousarray(DISPLAYED[orientation](rgb))
    assert np.array_equal(load_image(str(path)), expected)
    assert np.array_equal(load_image(Image.open(path)), expected)


@pytest.mark.parametrize("backend, divide", [("cv2", False), ("pil", True)], ids=["mmdet", "fastinst"])
def test_network_input_is_the_normalised_rgb_in_channel_order(backend, divide):
    """At the image's own size (no resampling), channel c of the tensor is (R, G, B)[c] normalised with that
    channel's mean and std: catches a channel swap in either the mmcv (Mask2Former) or torchvision (FastInst) path."""
    from modelscope_plugin.config import FastInstConfig, PreprocessConfig
    from modelscope_plugin.inference.preprocess import prepare_image

    rgb = known_rgb()
    defaults = FastInstConfig().preprocess if divide else PreprocessConfig()
    assert (defaults.resize_backend, defaults.divide_by_std) == (backend, divide)
    config = PreprocessConfig(short_side=rgb.shape[0], long_side_max=10 ** 4, size_divisor=32, mean=defaults.mean,
                              std=defaults.std, resize_backend=backend, divide_by_std=divide)
    prepared = prepare_image(load_image(np.dstack([rgb[:, :, ::-1], np.zeros(rgb.shape[:2], np.uint8)])), config)
    assert prepared.resized_size == rgb.shape[:2] and prepared.padded_size == (64, 64)
    expected = (rgb.astype(np.float64) - np.asarray(defaults.mean)) / np.asarray(defaults.std)
    ours = prepared.tensor[:, : rgb.shape[0], : rgb.shape[1]].permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() < 1e-5
    assert (prepared.tensor[:, rgb.shape[0]:] == 0).all() and (prepared.tensor[:, :, rgb.shape[1]:] == 0).all()


def test_pipeline_gives_the_same_network_input_and_result_for_every_form(segmenter):
    rgb = np.asarray(Image.open(IMAGE).convert("RGB"))[:96, :128].copy()
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    forms = {"bgra": np.dstack([bgr, np.full(rgb.shape[:2], 9, np.uint8)]), "uint16": bgr.astype(np.uint16) * 257,
             "pil": Image.fromarray(rgb), "float": bgr.astype(np.float32)}
    reference_tensor = segmenter.preprocess(bgr)["image"].tensor
    reference = segmenter(bgr)
    assert len(reference[OutputKeys.MASKS]) > 0
    for name, form in forms.items():
        assert torch.equal(segmenter.preprocess(form)["image"].tensor, reference_tensor), name
        result = segmenter(form)
        assert result[OutputKeys.LABELS] == reference[OutputKeys.LABELS], name
        assert all(np.array_equal(a, b) for a, b in zip(result[OutputKeys.MASKS], reference[OutputKeys.MASKS])), name
    # a gray image's network input is the three-channel copy's
    gray = rgb[:, :, 1].copy()
    assert torch.equal(segmenter.preprocess(gray)["image"].tensor,
                       segmenter.preprocess(np.dstack([gray, gray, gray]))["image"].tensor)
    # and the channel order reaches the network: swapping R and B changes the input
    assert not torch.equal(segmenter.preprocess(rgb.copy())["image"].tensor, reference_tensor)
