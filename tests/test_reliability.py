"""Issue 24's reliability items: each bad or unusual input that used to escape as a raw Python error, a traceback
or a wait now gets its answer or the package's own one-line error."""
import json
import logging
import shutil
import sys
import types
import zipfile
from pathlib import Path
from unittest import mock

import bad_inputs
import numpy as np
import pytest
import torch
from conftest import REPO
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image

from modelscope_plugin import errors
from modelscope_plugin.apps import cli, export
from modelscope_plugin.checkpoints.io import read_checkpoint
from modelscope_plugin.errors import CheckpointError, ExportError, ImageInputError, ModelDirError
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.inference.preprocess import padded_size
from modelscope_plugin.model_dirs.load import load_model
from modelscope_plugin.training.checkpoint import latest_checkpoint, read_trainer_state

DEMO_MODELS = sorted((REPO / "model_cards" / "demo").iterdir())


@pytest.fixture(scope="module", params=DEMO_MODELS, ids=lambda path: path.name)
def demo_segmenter(request):
    return pipeline(Tasks.image_segmentation, model=str(request.param), device="cpu")


@pytest.fixture(scope="module")
def demo_fastinst():
    return pipeline(Tasks.image_segmentation, model=str(bad_inputs.DEMO_FASTINST), device="cpu")


def banner(height: int, width: int) -> np.ndarray:
    """An elongated BGR image: a white disc on grey at each end."""
    image = np.full((height, width, 3), 96, np.uint8)
    rows, columns = np.ogrid[:height, :width]
    radius = min(height, width) // 3
    for row, column in ((height // 2, width // 2), (radius + 1, radius + 1), (height - radius - 2, width - radius - 2)):
        image[(rows - row) ** 2 + (columns - column) ** 2 <= radius ** 2] = 255
    return image


ELONGATED_SIZES = [(100, 1200), (1200, 100), (10, 3000), (3000, 8)]


@pytest.mark.parametrize("size", ELONGATED_SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_elongated_images_are_answered_at_their_size(demo_segmenter, size):
    """FastInst picks its queries among stride-16 pixels: an 11:1 banner used to leave fewer pixels than queries."""
    result = demo_segmenter(banner(*size), score_thr=0.0)
    assert result["masks"], "every query scores above 0"
    assert all(mask.shape == size for mask in result["masks"])


def test_elongated_images_and_a_tensor_inside_a_list_with_on_error_return(demo_segmenter):
    items = [banner(100, 1200), torch.zeros(3, 64, 64), banner(1200, 100)]
    results = demo_segmenter(items, on_error="return", score_thr=0.0)
    assert "error" not in results[0] and "error" not in results[2]
    assert results[0]["masks"][0].shape == (100, 1200) and results[2]["masks"][0].shape == (1200, 100)
    error = results[1]["error"]
    assert error["type"] == "ImageInputError" and error["index"] == 1
    name = "Tensor((3, 64, 64), torch.float32)"
    assert name in error["input"] and name in error["message"]


def test_a_tensor_alone_is_one_image_error_naming_it(demo_segmenter):
    with pytest.raises(ImageInputError, match=r"Tensor\(\(64, 64, 3\), torch.uint8\).*tensor: convert it"):
        demo_segmenter(torch.zeros(64, 64, 3, dtype=torch.uint8))


@pytest.mark.parametrize("resized_size, divisor, minimum, expected", [
    ((29, 352), 32, 50, (64, 352)),  # 2 x 22 = 44 stride-16 pixels < 50: the short side grows by one divisor
    ((352, 29), 32, 50, (352, 64)),
    ((29, 352), 32, 0, (32, 352)),   # Mask2Former: only the size divisor
    ((1, 1), 1, 4, (32, 32)),
    ((800, 1333), 32, 100, (800, 1344)),  # a normal image is padded as before
])
def test_padded_size_leaves_a_stride_16_pixel_per_query(resized_size, divisor, minimum, expected):
    assert padded_size(resized_size, divisor, minimum) == expected


def configuration_leaves(value, path=()):
    """Every (path, value) under a configuration.json section, depth first."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from configuration_leaves(item, path + (key,))
    else:
        yield path, value


def model_dir_with(tmp_path: Path, source: Path, path, value) -> Path:
    """A copy of ``source`` (weights linked) whose configuration.json has ``value`` at ``path``."""
    directory = tmp_path / "_".join(map(str, path)) / str(abs(hash(repr(value))))
    directory.mkdir(parents=True)
    (directory / "pytorch_model.pt").symlink_to((source / "pytorch_model.pt").resolve())
    configuration = json.loads((source / "configuration.json").read_text())
    section = configuration
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    (directory / "configuration.json").write_text(json.dumps(configuration))
    return directory


WRONG_VALUES = ["high", -1, 0, 2.5, None, [], {}, True]


@pytest.mark.parametrize("source", DEMO_MODELS, ids=lambda path: path.name)
def test_every_configuration_field_of_a_wrong_type_or_sign_fails_at_load_naming_file_and_field(source, tmp_path):
    """Each field of the demo cards' configuration.json set to each wrong value: the model either loads and segments,
    or loading raises one ModelDirError naming the file and the field; nothing raw, nothing deferred to segmentation."""
    image = np.zeros((40, 50, 3), np.uint8)
    configuration = json.loads((source / "configuration.json").read_text())
    refused = 0
    for path, original in configuration_leaves(configuration["model"], ("model",)):
        if path[-1] == "type":
            continue
        for value in WRONG_VALUES:
            directory = model_dir_with(tmp_path, source, path, value)
            try:
                config, network = load_model(directory)
            except ModelDirError as error:
                refused += 1
                message = str(error)
                assert str(directory / "configuration.json") in message, message
                named = path[-1] in message or (path[-1].endswith("classes") and "class_names" in message)
                assert named, f"{'.'.join(path)} = {value!r}: {message}"
                continue
            except CheckpointError:  # a field that changes the network (e.g. no auxiliary queries): the weights differ
                continue
            Predictor(network, config)(image)
    assert refused > 100


@pytest.mark.parametrize("path, value, reason", [
    (("model", "config", "inference", "object_mask_threshold"), "high",
     r"inference.object_mask_threshold = 'high' is not a number"),
    (("model", "config", "preprocess", "size_divisor"), 0, r"preprocess.size_divisor = 0 must be at least 1"),
    (("model", "config", "inference", "score_threshold"), 1.5, r"score_threshold = 1.5 must lie in \[0.0, 1.0\]"),
    (("model", "config", "preprocess", "std"), [58.0, 0, 57.0], r"preprocess.std\[1\] = 0 must be above 0"),
    (("model", "config", "task"), "panoptik", r"task = 'panoptik' is not one of"),
    (("model", "config", "hidden_dim"), 136, r"hidden_dim \(136\) is not divisible by num_groups \(32\)"),
    (("model", "config", "foo"), 1, r"foo"),
])
def test_mask2former_configuration_values_are_checked_when_the_model_loads(tmp_path, path, value, reason):
    source = REPO / "model_cards" / "demo" / "mask2former_synthetic-shapes"
    with pytest.raises(ModelDirError, match=reason):
        load_model(model_dir_with(tmp_path, source, path, value))


@pytest.mark.parametrize("path, value, reason", [
    (("model", "decoder", "nheads"), "8", r"model.decoder.nheads = '8' is not a whole number"),
    (("model", "decoder", "num_queries"), -5, r"model.decoder.num_queries = -5 must be at least 1"),
    (("model", "preprocess", "short_side"), 0, r"model.preprocess.short_side = 0 must be at least 1"),
    (("model", "backbone", "stem_out_channels"), "wide", r"stem_out_channels = 'wide' is not a whole number"),
    (("model", "classes"), "disc", r"model.classes = 'disc' is not a list"),
])
def test_fastinst_configuration_values_name_their_configuration_json_key(tmp_path, path, value, reason):
    source = REPO / "model_cards" / "demo" / "fastinst_synthetic-shapes"
    with pytest.raises(ModelDirError, match=reason):
        load_model(model_dir_with(tmp_path, source, path, value))


def easycv_export_without_a_storage_record(path: Path) -> Path:
    """An EasyCV-style export (its config pickled as an mmcv ConfigDict, which torch's weights-only unpickler cannot
    fill) whose zip lacks the record of one tensor's storage."""
    class ConfigDict(dict):
        pass

    ConfigDict.__module__, ConfigDict.__qualname__ = "mmcv.utils.config", "ConfigDict"
    modules = {"mmcv": types.ModuleType("mmcv"), "mmcv.utils": types.ModuleType("mmcv.utils"),
               "mmcv.utils.config": types.ModuleType("mmcv.utils.config")}
    modules["mmcv.utils.config"].ConfigDict = ConfigDict
    complete = path.with_name("complete.pth")
    with mock.patch.dict(sys.modules, modules):
        torch.save({"meta": {"config": ConfigDict(model={"type": "Mask2Former"})},
                    "state_dict": {"weight": torch.ones(3)}}, complete)
    with zipfile.ZipFile(complete) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith("/data/0"):
                target.writestr(item, source.read(item.filename))
    return path


def test_easycv_export_with_a_missing_storage_record_is_a_checkpoint_error(tmp_path):
    path = easycv_export_without_a_storage_record(tmp_path / "mask2former_r50_export.pth")
    assert read_checkpoint(tmp_path / "complete.pth")["meta"]["config"]["model"]["type"] == "Mask2Former"
    with pytest.raises(CheckpointError, match=r"mask2former_r50_export.pth is truncated or corrupt: .*data/0"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="mask2former_r50_export.pth"):
        load_model(path)


@pytest.mark.parametrize("content", [b'{"num_queries": 10,', b"\xff\xfe{}", b"[1, 2]", b"{}"])
def test_hugging_face_config_that_is_not_a_mask2former_json_object_is_a_checkpoint_error(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_resume_latest_skips_a_truncated_trainer_state_and_logs_it(tmp_path, caplog):
    for iteration in (2, 4, 6):
        torch.save({"state_dict": {"weight": torch.ones(3)}}, tmp_path / f"iter_{iteration}.pth")
        torch.save({"meta": {"iter": iteration}}, tmp_path / f"iter_{iteration}_trainer_state.pth")
    state_file = tmp_path / "iter_6_trainer_state.pth"
    state_file.write_bytes(state_file.read_bytes()[:100])  # killed while writing past the atomic rename
    model_file = tmp_path / "iter_4.pth"
    model_file.write_bytes(model_file.read_bytes()[:-30])
    with caplog.at_level(logging.WARNING, logger="modelscope_plugin.training.checkpoint"):
        assert Path(latest_checkpoint(tmp_path)).name == "iter_2"
    assert "iter_6" in caplog.text and "trainer state" in caplog.text and "iter_4.pth is truncated" in caplog.text
    with pytest.raises(CheckpointError, match="iter_6_trainer_state.pth is truncated or corrupt"):
        read_trainer_state(state_file)


def test_export_of_the_demo_fastinst_passes_its_own_onnxruntime_check(tmp_path, capsys):
    """float32 rounding grows with the logits (0.00013 on mask logits of range ~20 here): the check is relative."""
    output = tmp_path / "fastinst.onnx"
    arguments = ["export", "--model", str(DEMO_MODELS[0]), "--output", str(output), "--example-size", "352x352",
                 "--check-size", "384x352"]
    assert cli.main(arguments) == 0, capsys.readouterr().err
    assert "of the logit range" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fastinst.onnx"]


def test_a_failed_export_leaves_no_partial_files(tmp_path, capsys):
    output = tmp_path / "mask2former.onnx"
    arguments = ["export", "--model", str(DEMO_MODELS[1]), "--output", str(output), "--example-size", "64x64"]
    with mock.patch.object(export, "check_onnx", side_effect=ExportError("disagrees")):
        assert cli.main(arguments) == 1
    assert "disagrees" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the .partial graph nor its external .partial.data weights


@pytest.mark.parametrize("place", ["under a file", "the file itself", "unwritable"])
def test_segment_output_that_cannot_be_written_is_one_line_before_the_model_loads(tmp_path, capsys, place):
    image = tmp_path / "scene.png"
    Image.fromarray(banner(64, 64)).save(image)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    output = {"under a file": blocker / "outputs", "the file itself": blocker,
              "unwritable": Path("/proc/modelscope-seg-test/outputs")}[place]
    with mock.patch.object(cli, "build_pipeline", side_effect=AssertionError("the model was loaded")):
        assert cli.main(["segment", str(image), "--model", str(DEMO_MODELS[0]), "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"modelscope-seg segment: error: cannot write outputs to {output}")
    assert error.count("\n") == 1


def test_card_validate_reports_a_string_model_and_a_non_utf8_readme_in_one_line_each(tmp_path, capsys):
    card = tmp_path / "someone" / "card"
    shutil.copytree(REPO / "model_cards" / "damo" / "cv_resnet50_fast-instance-segmentation_coco", card)
    configuration = json.loads((card / "configuration.json").read_text())
    (card / "configuration.json").write_text(json.dumps({**configuration, "model": "fastinst"}))
    (card / "README.md").write_bytes("---\ntasks: [image-segmentation]\n---\nCaf\xe9\n".encode("latin1"))
    assert cli.main(["card", "validate", str(card)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert any("configuration.json model must be an object, not str" in line for line in lines), lines
    assert any("README.md is not UTF-8 text" in line for line in lines), lines
    assert all(line.startswith(f"{card}: ") for line in lines) and len(lines) == 2


def test_model_from_pretrained_resolves_a_cached_hub_id_without_the_network(tmp_path, monkeypatch):
    import socket

    import modelscope_hub.config
    from modelscope.models import Model

    from modelscope_plugin.integration import hub

    snapshot = tmp_path / "models" / "damo--cv_resnet50_fast-instance-segmentation_coco" / "snapshots" / "master"
    shutil.copytree(DEMO_MODELS[0], snapshot)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)  # its process-wide config keeps the old cache
    hub.resolve_model_dir.cache_clear()

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    for owner in ("damo", "iic"):
        model_id = f"{owner}/cv_resnet50_fast-instance-segmentation_coco"
        model = Model.from_pretrained(model_id)
        assert model.config.num_queries == 50 and model.config.class_names == ("disc", "triangle", "square", "star")
    hub.resolve_model_dir.cache_clear()


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=lambda case: case.input)
def test_bad_input_table_case(case, demo_fastinst, tmp_path):
    if case.outcome == bad_inputs.ANSWERED:
        case.run(demo_fastinst, tmp_path)
    else:
        with pytest.raises(getattr(errors, case.outcome)):
            case.run(demo_fastinst, tmp_path)


def test_readme_holds_the_generated_bad_input_table():
    assert bad_inputs.render_table() in (REPO / "README.md").read_text(), "run python tests/bad_inputs.py"


def test_hugging_face_config_field_of_the_wrong_type_is_a_model_dir_error_at_load(tmp_path):
    values = {"backbone_config": {"model_type": "swin", "embed_dim": 32, "depths": [2, 2, 2, 2],
                                  "num_heads": [1, 2, 4, 8], "window_size": 7},
              "id2label": {"0": "disc", "1": "square"}, "num_queries": "ten", "hidden_dim": 64,
              "num_attention_heads": 4, "encoder_layers": 2, "decoder_layers": 4, "dim_feedforward": 128}
    (tmp_path / "config.json").write_text(json.dumps(values))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelDirError, match=r"config.json: num_queries = 'ten' is not a whole number"):
        load_model(tmp_path)


ERROR_CLASSES = [value for value in vars(errors).values()
                 if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == errors.__name__]


@pytest.mark.parametrize("error_class", ERROR_CLASSES, ids=lambda error_class: error_class.__name__)
def test_errors_keep_their_type_through_modelscope_build_from_cfg(error_class):
    """ModelScope's ``build_from_cfg`` re-raises a constructor's error as ``type(error)(f"{class}: {error}")``; each
    of the package's errors must survive that with its type and message (``DatasetProblemsError`` once raised an
    AttributeError there)."""
    from modelscope.utils.registry import Registry, build_from_cfg

    from modelscope_plugin.data.datasets import RowProblem

    if error_class is errors.DatasetProblemsError:
        original = error_class([RowProblem(image_id=7, reason="panoptic PNG missing")])
    else:
        original = error_class("seven is not a folder")

    registry = Registry("reliability_test")

    @registry.register_module(module_name="Failing")
    class Failing:
        def __init__(self):
            raise original

    with pytest.raises(error_class) as raised:
        build_from_cfg({"type": "Failing"}, registry)
    assert str(raised.value).startswith("Failing: ")
    assert str(original) in str(raised.value)
    assert raised.value.__cause__ is original
