"""``modelscope-seg``: run in-process through ``main(argv)`` (and once as the installed console script)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA
from modelscope.outputs import OutputKeys
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image
from pycocotools import mask as mask_utils

from modelscope_plugin.apps import cards
from modelscope_plugin.apps.cli import main

COCO = SHARED_DATA / "coco"
IMAGES = [COCO / "val2017" / "000000142238.jpg", COCO / "val2017" / "000000439180.jpg"]
CARD = REPO / "model_cards" / "damo" / "cv_swinL_panoptic-segmentation_cocopan"


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir):
    return pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu")


@pytest.fixture
def image_folder(tmp_path):
    """Small copies of two COCO images (the tiny model still sees them at 800 px)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in IMAGES:
        Image.open(path).convert("RGB").resize((160, 120)).save(folder / f"{path.stem}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("command", [[], ["segment"], ["evaluate"], ["export"], ["card"], ["card", "validate"],
                                     ["card", "push"], ["serve"]])
def test_help_everywhere(command, capsys):
    assert main(command + ["--help"]) == 0
    output = capsys.readouterr().out
    assert output.startswith(f"usage: modelscope-seg {' '.join(command)}".rstrip())
    if command == []:
        assert "Exit codes" in output


@pytest.mark.parametrize("argv", [[], ["bogus"], ["segment", "x.jpg"], ["segment", "x.jpg", "--model", "m", "--batch-size", "0"],
                                  ["segment", "x.jpg", "--model", "m", "--task", "depth"], ["card"], ["card", "push", "c"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_segment_folder_and_glob_write_overlays_masks_and_rle(tiny_model_dir, segmenter, image_folder, tmp_path, capsys):
    output = tmp_path / "out"
    first, second = sorted(image_folder.glob("*.png"))
    code = main(["segment", str(first), str(image_folder / "0000004391*.png"), "--model", str(tiny_model_dir),
                 "--output", str(output), "--batch-size", "2", "--quiet", "--object-mask-threshold", "0.5"])
    assert code == 0, capsys.readouterr().err
    for image in (first, second):
        expected = segmenter(str(image), object_mask_threshold=0.5)
        overlay = np.asarray(Image.open(output / f"{image.stem}_overlay.png").convert("RGB"))
        original = np.asarray(Image.open(image).convert("RGB"))
        assert overlay.shape[0] >= original.shape[0] and overlay.shape[1] > original.shape[1]  # image + legend
        assert np.abs(overlay[:120, :160].astype(int) - original).mean() > 5  # tinted
        document = json.loads((output / f"{image.stem}.json").read_text())
        assert document["image"] == str(image) and (document["height"], document["width"]) == (120, 160)
        segments = document["segments"]
        assert [segment["label"] for segment in segments] == expected[OutputKeys.LABELS] and len(segments) >= 2
        assert [segment["score"] for segment in segments] == pytest.approx(expected[OutputKeys.SCORES])
        for segment, mask in zip(segments, expected[OutputKeys.MASKS]):
            rle = {"size": segment["rle"]["size"], "counts": segment["rle"]["counts"].encode("ascii")}
            assert np.array_equal(mask_utils.decode(rle), mask)
            assert np.array_equal(np.asarray(Image.open(output / segment["mask_png"])) // 255, mask)


def test_segment_never_overwrites_silently(tiny_model_dir, image_folder, tmp_path, capsys):
    output = tmp_path / "out"
    image = sorted(image_folder.glob("*.png"))[0]
    arguments = ["segment", str(image), "--model", str(tiny_model_dir), "--output", str(output), "--quiet", "--task", "semantic"]
    assert main(arguments) == 0
    written = output / f"{image.stem}.json"
    written.write_text("user's own edits")
    assert main(arguments) == 1
    assert "already exist" in capsys.readouterr().err and written.read_text() == "user's own edits"
    assert main(arguments + ["--overwrite"]) == 0
    assert json.loads(written.read_text())["task"] == "semantic"
    # two inputs with one stem would write the same files
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(image, other / image.name)
    assert main(["segment", str(image), str(other / image.name), "--model", str(tiny_model_dir),
                 "--output", str(tmp_path / "fresh"), "--quiet"]) == 1
    assert "same outputs" in capsys.readouterr().err and not (tmp_path / "fresh").exists()


def test_segment_bad_inputs_exit_1_and_the_rest_are_written(tiny_model_dir, image_folder, tmp_path, capsys):
    corrupt = image_folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    output = tmp_path / "out"
    assert main(["segment", str(image_folder), str(tmp_path / "missing.jpg"), "--model", str(tiny_model_dir),
                 "--output", str(output), "--quiet"]) == 1
    errors = capsys.readouterr().err
    assert "corrupt.png" in errors and "not a readable image" in errors and "missing.jpg" in errors and "does not exist" in errors
    assert sorted(path.name for path in output.glob("*.json")) == sorted(f"{path.stem}.json" for path in IMAGES)
    for argv, reason in (([str(tmp_path / "*.nothing")], "matches no file"), ([str(tmp_path / "empty")], "holds no image")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert main(["segment", *argv, "--model", str(tiny_model_dir), "--output", str(tmp_path / "o2")]) == 1
        assert reason in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def written_files(folder: Path):
    """{relative path: bytes} of everything in ``folder``."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


def test_segment_under_torchrun_shards_the_images_and_writes_what_one_process_writes(tiny_model_dir, image_folder,
                                                                                      tmp_path):
    for index in range(3):  # five images: the ranks get three and two
        Image.open(sorted(image_folder.glob("*.png"))[index % 2]).rotate(90 * (index + 1), expand=True).save(
            image_folder / f"rotated_{index}.png")
    def run(launcher, output):
        """The command in fresh processes at one thread each, so both sides compute alike."""
        return subprocess.run([sys.executable, *launcher, "-m", "modelscope_plugin.apps.cli", "segment",
                               str(image_folder), "--model", str(tiny_model_dir), "--output", str(output), "--quiet"],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=600)

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    one_process = run([], single)
    assert one_process.returncode == 0, one_process.stderr[-3000:]
    two_ranks = run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"], sharded)
    assert two_ranks.returncode == 0, two_ranks.stderr[-3000:]
    assert one_process.stdout.count("images segmented") == 1 and "5 of 5 images segmented" in one_process.stdout
    assert two_ranks.stdout.count("images segmented") == 1 and "5 of 5 images segmented" in two_ranks.stdout
    single_files, sharded_files = written_files(single), written_files(sharded)
    assert len(single_files) > 10 and sorted(single_files) == sorted(sharded_files)
    for name, content in single_files.items():
        if name.endswith(".json"):
            assert json.loads(content) == json.loads(sharded_files[name]), name
        else:
            assert content == sharded_files[name], name


def test_segment_resume_segments_only_the_images_without_json_and_touches_nothing_else(tiny_model_dir, image_folder,
                                                                                        tmp_path, capsys):
    output = tmp_path / "out"
    arguments = ["segment", str(image_folder), "--model", str(tiny_model_dir), "--output", str(output), "--quiet"]
    assert main(arguments) == 0
    first, second = sorted(image_folder.glob("*.png"))
    (output / f"{second.stem}.json").unlink()  # as if the run had stopped while writing the second image
    (output / f"{second.stem}_overlay.png").write_bytes(b"half written")
    kept = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in output.rglob("*")
            if path.is_file() and path.name.startswith(first.stem)}
    capsys.readouterr()
    assert main(arguments + ["--resume"]) == 0
    assert "1 of 2 images segmented" in capsys.readouterr().out
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in kept} == kept
    assert json.loads((output / f"{second.stem}.json").read_text())["image"] == str(second)
    assert (output / f"{second.stem}_overlay.png").read_bytes().startswith(b"\x89PNG")
    assert main(arguments + ["--resume"]) == 0 and "0 of 2 images segmented" in capsys.readouterr().out


def test_segment_bad_model_exits_1_naming_it(tmp_path, image_folder, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "configuration.json").write_text(json.dumps({"framework": "pytorch", "task": "image-segmentation",
                                                          "model": {"type": "mask2former"}, "pipeline": {"type": "mask2former-segmentation"}}))
    assert main(["segment", str(image_folder), "--model", str(model), "--output", str(tmp_path / "out"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert str(model) in error and "weights file" in error


def test_evaluate_writes_the_metrics_of_evaluation_evaluate(tiny_model_dir, segmenter, tmp_path, capsys):
    from modelscope_plugin.data.datasets import read_coco_panoptic
    from modelscope_plugin.evaluation import evaluate

    arguments = ["evaluate", "--model", str(tiny_model_dir), "--task", "panoptic", "--images", str(COCO / "val2017"),
                 "--annotations", str(COCO / "annotations" / "panoptic_val2017_subset.json"),
                 "--panoptic-folder", str(COCO / "panoptic_val2017"), "--limit", "1", "--output", str(tmp_path / "eval"), "--quiet"]
    assert main(arguments) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows, _ = read_coco_panoptic(str(COCO / "annotations" / "panoptic_val2017_subset.json"), str(COCO / "panoptic_val2017"),
                                 str(COCO / "val2017"))
    direct = evaluate(segmenter, rows, "panoptic", limit=1, progress=False)
    direct = json.loads(json.dumps(direct))
    # with random weights PQ is about 0; the per-class tp / fp / fn counts still tell predictions apart
    assert {key: value for key, value in written.items() if key != "task"} == direct
    assert sum(values["fp"] for values in direct["per_class"].values()) > 0
    assert printed == {key: value for key, value in direct.items() if key != "per_class"}
    assert main(arguments) == 1 and "already exists" in capsys.readouterr().err
    assert main(arguments[:-3] + ["--output", str(tmp_path / "e2"), "--task", "semantic"]) == 1
    assert "--labels" in capsys.readouterr().err


def test_evaluate_semantic_label_values_from_zero(tiny_model_dir, segmenter, tmp_path, capsys):
    """--no-reduce-zero-label: label value v is class v (PASCAL VOC, Cityscapes train ids), not v - 1 (ADE20K)."""
    from modelscope_plugin.data.datasets import read_label_folders
    from modelscope_plugin.evaluation import evaluate

    images, labels = SHARED_DATA / "ade20k" / "images" / "validation", SHARED_DATA / "ade20k" / "annotations" / "validation"
    arguments = ["evaluate", "--model", str(tiny_model_dir), "--task", "semantic", "--images", str(images),
                 "--labels", str(labels), "--num-classes", "151", "--limit", "1", "--quiet"]
    assert main(arguments + ["--no-reduce-zero-label", "--output", str(tmp_path / "from_zero")]) == 0
    assert main(arguments + ["--output", str(tmp_path / "ade")]) == 0
    capsys.readouterr()
    from_zero = json.loads((tmp_path / "from_zero" / "metrics.json").read_text())
    ade = json.loads((tmp_path / "ade" / "metrics.json").read_text())
    rows, _ = read_label_folders(str(images), str(labels), 151, reduce_zero_label=False)
    direct = json.loads(json.dumps(evaluate(segmenter, rows, "semantic", limit=1, progress=False)))
    assert {key: value for key, value in from_zero.items() if key != "task"} == direct
    assert from_zero["per_class"] != ade["per_class"]


def test_card_push_dry_run_writes_a_loadable_folder_naming_this_package(tiny_model_dir, tmp_path, monkeypatch, capsys):
    destination = tmp_path / "upload"
    assert main(["card", "push", str(CARD), "--weights", str(tiny_model_dir), "--model-id", "someone/my-panoptic",
                 "--dry-run", str(destination)]) == 0, capsys.readouterr().err
    configuration = json.loads((destination / "configuration.json").read_text())
    assert configuration["plugins"] == [cards.PACKAGE_NAME]
    assert sorted(path.name for path in destination.iterdir()) == ["README.md", "configuration.json", "pytorch_model.pt"]
    readme = (destination / "README.md").read_text()
    assert "someone/my-panoptic" in readme and "damo/cv_swinL_panoptic-segmentation_cocopan" not in readme
    # refuses to overwrite, and a damo/iic id is refused
    marker = destination / "README.md"
    before = marker.read_text()
    assert main(["card", "push", str(CARD), "--weights", str(tiny_model_dir), "--model-id", "someone/x", "--dry-run", str(destination)]) == 1
    assert "already exists" in capsys.readouterr().err and marker.read_text() == before
    assert main(["card", "push", str(CARD), "--weights", str(tiny_model_dir), "--model-id", "damo/x", "--dry-run", str(tmp_path / "d")]) == 1
    assert "own namespace" in capsys.readouterr().err
    # the published folder loads through ModelScope without pip (its plugins key names this package)

    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args[0] if args else kwargs}")

    for name in ("run", "Popen", "check_call", "check_output", "call"):
        monkeypatch.setattr(subprocess, name, refuse)
    result = pipeline(Tasks.image_segmentation, model=str(destination), device="cpu")(str(IMAGES[0]))
    assert len(result[OutputKeys.MASKS]) >= 2


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_card_push_without_network_fails_at_once(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import modelscope_hub.config

    # HubApi() creates modelscope_hub's process-wide config, which keeps the endpoint and MODELSCOPE_CACHE of that
    # moment; start from none and drop this one afterwards, so later tests see their own environment
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    arguments = ["card", "push", str(CARD), "--weights", str(tiny_model_dir), "--model-id", "someone/my-panoptic"]
    monkeypatch.delenv(cards.TOKEN_VARIABLE, raising=False)
    assert main(arguments) == 1 and cards.TOKEN_VARIABLE in capsys.readouterr().err
    monkeypatch.setenv(cards.TOKEN_VARIABLE, "not-a-real-token")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    # "at once": no waiting between retries (sleeps are recorded, not slept; no wall-clock bound)
    requested_sleeps = []
    monkeypatch.setattr(time, "sleep", requested_sleeps.append)
    assert main(arguments) == 1
    assert sum(requested_sleeps) < 1, requested_sleeps
    error = capsys.readouterr().err
    assert "cannot reach the ModelScope hub" in error and "--dry-run" in error


def test_card_push_uploads_under_the_token_owner_namespace(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """HubApi replaced by a recorder; the endpoint is a local listening socket, so the reachability check passes."""
    import modelscope.hub.api as hub_api

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    threading.Thread(target=lambda: listener.accept(), daemon=True).start()
    calls = []

    class RecordingHubApi:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def login(self, token):
            calls.append(("login", token))

        @staticmethod
        def get_user_info():
            return "someone", None

        def repo_exists(self, model_id):
            return False

        def create_model(self, model_id, **kwargs):
            calls.append(("create_model", model_id, kwargs))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            calls.append(("upload_folder", repo_id, sorted(path.name for path in folder.iterdir()),
                          json.loads((folder / "configuration.json").read_text())["plugins"]))

        def get_model_url(self, model_id):
            return f"{self.endpoint}/models/{model_id}"

    monkeypatch.setattr(hub_api, "HubApi", RecordingHubApi)
    monkeypatch.setenv(cards.TOKEN_VARIABLE, "token-123")
    base = ["card", "push", str(CARD), "--weights", str(tiny_model_dir)]
    assert main(base + ["--model-id", "someone/my-panoptic"]) == 0, capsys.readouterr().err
    assert calls[0] == ("login", "token-123")
    assert calls[1] == ("create_model", "someone/my-panoptic", {"visibility": 1, "license": "apache-2.0"})
    assert calls[2] == ("upload_folder", "someone/my-panoptic", ["README.md", "configuration.json", "pytorch_model.pt"],
                        [cards.PACKAGE_NAME])
    assert "published someone/my-panoptic" in capsys.readouterr().out
    calls.clear()
    assert main(base + ["--model-id", "somebody-else/my-panoptic"]) == 1
    assert "belongs to 'someone'" in capsys.readouterr().err and not any(call[0] == "upload_folder" for call in calls)
    listener.close()


def test_console_script_runs_as_a_subprocess(tiny_model_dir, image_folder, tmp_path):
    script = Path(sys.executable).parent / "modelscope-seg"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "modelscope_plugin.apps.cli"]
    image = sorted(image_folder.glob("*.png"))[0]
    completed = subprocess.run(command + ["segment", str(image), "--model", str(tiny_model_dir), "--output", str(tmp_path / "out")],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "1 of 1 images segmented" in completed.stdout and "segmenting" in completed.stderr  # tqdm bar on stderr
    assert json.loads((tmp_path / "out" / f"{image.stem}.json").read_text())["segments"]
    usage = subprocess.run(command + ["segment"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "required" in usage.stderr


def write_small_fastinst_dir(directory: Path) -> Path:
    """The FastInst card's hub layout (configuration.json + detectron2-named pytorch_model.pt), narrowed decoder."""
    import torch
    from test_layouts_offline import to_detectron2_names

    from modelscope_plugin.builders import build_fastinst
    from modelscope_plugin.config import fastinst_r50_d3_coco
    from modelscope_plugin.model_dirs.fastinst import config_from_modelscope

    configuration = json.loads((REPO / "model_cards" / "damo" / "cv_resnet50_fast-instance-segmentation_coco" / "configuration.json").read_text())
    configuration["model"]["encoder"].update(convs_dim=64, mask_dim=64)
    configuration["model"]["decoder"].update(hidden_dim=64, nheads=4, dim_feedforward=128, dec_layers=1, num_queries=16,
                                             num_aux_queries=4, mask_dim=64)
    torch.manual_seed(0)
    network = build_fastinst(config_from_modelscope(configuration["model"], fastinst_r50_d3_coco())).eval()
    directory.mkdir(parents=True)
    (directory / "configuration.json").write_text(json.dumps(configuration))
    torch.save({"model": to_detectron2_names(network.state_dict())}, directory / "pytorch_model.pt")
    return directory


def test_export_fastinst_to_onnx_checked_with_onnxruntime(tiny_model_dir, tmp_path, capsys):
    import onnxruntime
    import torch

    from modelscope_plugin.model_dirs.load import load_model

    model = write_small_fastinst_dir(tmp_path / "fastinst")
    output = tmp_path / "onnx" / "fastinst.onnx"
    arguments = ["export", "--model", str(model), "--output", str(output), "--example-size", "128x128", "--check-size", "96x160"]
    assert main(arguments) == 0, capsys.readouterr().err
    assert "onnxruntime agrees" in capsys.readouterr().out
    _, network = load_model(model)
    images = torch.randn(1, 3, 160, 96, generator=torch.Generator().manual_seed(3))
    class_logits, mask_logits = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()})
    with torch.no_grad():
        reference = network(images)
    assert np.abs(class_logits - reference.class_logits.numpy()).max() < 1e-4
    assert np.abs(mask_logits - reference.mask_logits.numpy()).max() < 1e-4 and mask_logits.shape[-2:] == (20, 12)  # stride 8
    # an existing file is kept unless --overwrite; a failed export (too small for the queries) leaves it intact
    before = output.read_bytes()
    assert main(arguments) == 1 and "already exists" in capsys.readouterr().err
    assert main(arguments[:-4] + ["--overwrite", "--example-size", "32x32"]) == 1
    assert "export of" in capsys.readouterr().err and output.read_bytes() == before
    assert not list(output.parent.glob(".*.partial"))
    assert main(arguments[:-4] + ["--example-size", "100x128"]) == 2


def test_export_mask2former_at_a_fixed_size_checked_with_onnxruntime(tiny_model_dir, tmp_path, capsys):
    import onnxruntime
    import torch

    from modelscope_plugin.model_dirs.load import load_model

    output = tmp_path / "mask2former.onnx"
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(output), "--example-size", "64x96"]) == 0, \
        capsys.readouterr().err
    assert "onnxruntime agrees" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 96]
    _, network = load_model(tiny_model_dir)
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    class_logits, mask_logits = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        reference = network(images)
    assert np.abs(class_logits - reference.class_logits.numpy()).max() < 1e-4
    assert np.abs(mask_logits - reference.mask_logits.numpy()).max() < 1e-4 and mask_logits.shape[-2:] == (16, 24)


def test_export_oneformer_bakes_the_task_into_the_graph_checked_with_onnxruntime(tiny_model_dir, tmp_path, capsys):
    """A OneFormer folder exports for its default task, or the one --task names; each graph gives that task's logits
    (within 1e-5 of the logit range), and the two tasks' graphs differ; --task on a Mask2Former is refused."""
    import onnxruntime
    import torch
    from test_oneformer_trainer import tiny_hf_oneformer

    from modelscope_plugin.model_dirs.load import load_model

    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer", text_mapper=None)
    config, network = load_model(model_dir)
    default, other = config.task, "panoptic" if config.task != "panoptic" else "semantic"
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    logits = {}
    for task, extra in ((default, []), (other, ["--task", other])):
        output = tmp_path / f"oneformer_{task}.onnx"
        assert main(["export", "--model", str(model_dir), "--output", str(output), "--example-size", "64x96",
                     *extra]) == 0, capsys.readouterr().err
        assert f"(task {task}); onnxruntime agrees" in capsys.readouterr().out
        session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map["task"] == task
        assert session.get_inputs()[0].shape == [1, 3, 64, 96]
        class_logits, mask_logits = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            reference = network(images, task)
        for theirs, ours in ((class_logits, reference.class_logits), (mask_logits, reference.mask_logits)):
            logit_range = max(1.0, float(ours.abs().max()))
            assert np.abs(theirs - ours.numpy()).max() <= 1e-5 * logit_range, task
        logits[task] = (class_logits, mask_logits)
    # the task is in the graph: the two graphs' outputs differ far beyond the tolerance
    assert np.abs(logits[default][0] - logits[other][0]).max() > 1e-2
    assert np.abs(logits[default][1] - logits[other][1]).max() > 1e-2
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(tmp_path / "m2f.onnx"),
                 "--task", "semantic"]) == 1
    assert "--task is for OneFormer" in capsys.readouterr().err and not (tmp_path / "m2f.onnx").exists()


def test_train_hands_its_options_to_the_finetune_script(capsys):
    assert main(["train", "--help"]) == 0
    assert "--work-dir" in capsys.readouterr().out
    assert main(["train", "--epochs", "1"]) == 2  # --data and --work-dir are required
    assert "required" in capsys.readouterr().err
    assert main(["--help"]) == 0 and "train" in capsys.readouterr().out


def test_evaluate_scores_a_custom_dataset_with_its_own_classes(tmp_path, capsys):
    from modelscope_plugin.data.synthetic import SceneConfig, write_dataset
    from modelscope_plugin.training.finetune import dataset_categories, initial_model_dir

    split = write_dataset(tmp_path / "data", "val", 3, seed=1, config=SceneConfig.scaled(64))
    categories = dataset_categories(split.panoptic_json)
    model = initial_model_dir(tmp_path / "model", "tiny", categories, 64, seed=0)
    for task, annotations, extra in (("panoptic", split.panoptic_json, ["--panoptic-folder", str(split.panoptic_folder)]),
                                     ("instance", split.instances_json, [])):
        output = tmp_path / f"eval_{task}"
        assert main(["evaluate", "--model", str(model), "--task", task, "--images", str(split.image_folder),
                     "--annotations", str(annotations), *extra, "--output", str(output), "--quiet"]) == 0
        capsys.readouterr()
        written = json.loads((output / "metrics.json").read_text())
        if task == "panoptic":  # PQ over the synthetic classes, split into its 4 things and 3 stuff
            assert {name: values["isthing"] for name, values in written["per_class"].items()} == {
                category["name"]: category["isthing"] for category in categories}
            assert written["n_th"] <= 4 and written["n_st"] <= 3 and written["n"] == written["n_th"] + written["n_st"]
        else:  # AP over the 4 thing classes, ranking every detection (score_thr 0: the network's top 100 per image)
            assert sorted(written["segm"]["per_class"]) == sorted(c["name"] for c in categories if c["isthing"])


@pytest.mark.oracle
def test_export_eomt_at_its_input_size_checked_with_onnxruntime(tmp_path, capsys):
    """An HF EoMT folder exports at its own square input (64x64 here) by default, any other size is refused, and
    the graph reproduces the network's logits relative to their range, masked attention (probabilities 1) included:
    the masked graph differs from the unmasked network, so the check could fail."""
    import onnxruntime
    import torch
    from conftest import run_oracle

    from modelscope_plugin.apps.export import export_onnx
    from modelscope_plugin.errors import ExportError
    from modelscope_plugin.model_dirs.load import load_model

    model_dir = tmp_path / "hf_eomt"
    run_oracle("eomt_oracle.py", "make", "--hidden-size", "64", "--layers", "4", "--heads", "4", "--image-size", "64",
               "--registers", "2", "--num-blocks", "2", "--queries", "12", "--labels", "7", "--seed", "0",
               "--attn-mask-probs", "1,1", "--out-dir", model_dir)
    output = tmp_path / "eomt.onnx"
    assert main(["export", "--model", str(model_dir), "--output", str(output)]) == 0, capsys.readouterr().err
    assert "onnxruntime agrees" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 64, 64]
    _, network = load_model(model_dir)
    assert network.masked_blocks() == [True, True]
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    class_logits, mask_logits = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        masked = network(images)
        network.attention_mask_probabilities.zero_()
        unmasked = network(images)
    for ours, theirs in ((masked.class_logits, class_logits), (masked.mask_logits, mask_logits)):
        logit_range = float(ours.abs().max())
        assert np.abs(theirs - ours.numpy()).max() <= 1e-5 * logit_range
    assert np.abs(mask_logits - unmasked.mask_logits.numpy()).max() > 1e-2
    # the unmasked network exports its own graph; another input size is refused with the package's error
    unmasked_file = export_onnx(network, tmp_path / "unmasked.onnx")
    session = onnxruntime.InferenceSession(str(unmasked_file), providers=["CPUExecutionProvider"])
    _, mask_logits = session.run(None, {"images": images.numpy()})
    assert np.abs(mask_logits - unmasked.mask_logits.numpy()).max() <= 1e-5 * float(unmasked.mask_logits.abs().max())
    with pytest.raises(ExportError, match="64x64 input"):
        export_onnx(network, tmp_path / "other.onnx", example_size=(96, 96))
    assert not (tmp_path / "other.onnx").exists()
    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "cli.onnx"),
                 "--example-size", "96x96"]) == 1
    assert "64x64 input" in capsys.readouterr().err and not (tmp_path / "cli.onnx").exists()


def test_precision_option_takes_auto_and_refuses_an_unknown_value(tiny_model_dir, image_folder, tmp_path, monkeypatch,
                                                                   capsys):
    from modelscope_plugin.apps import cli
    from modelscope_plugin.inference.precision import APP_PRECISION, cpu_has_native_bf16

    resolved = []

    def build_pipeline(*arguments):
        built = original(*arguments)
        resolved.append(built.predictor.precision)
        return built

    original = cli.build_pipeline
    monkeypatch.setattr(cli, "build_pipeline", build_pipeline)
    image = sorted(image_folder.glob("*.png"))[0]
    documents = {}
    for precision in ("auto", "fp32"):
        output = tmp_path / precision
        assert main(["segment", str(image), "--model", str(tiny_model_dir), "--output", str(output), "--quiet",
                     "--precision", precision]) == 0, capsys.readouterr().err
        documents[precision] = json.loads((output / f"{image.stem}.json").read_text())["segments"]
    native = cpu_has_native_bf16()
    assert resolved == ["bf16" if native else "fp32", "fp32"]
    if not native:  # "auto" is fp32 on this CPU: the same outputs
        assert documents["auto"] == documents["fp32"]
    for command in (["segment", "x.jpg", "--model", "m"], ["evaluate", "--model", "m", "--task", "panoptic",
                                                           "--images", "i"], ["serve"]):
        assert cli.build_parser().parse_args(command).precision == APP_PRECISION
        assert cli.build_parser().parse_args(command + ["--precision", "auto"]).precision == "auto"
        assert main(command + ["--precision", "int8"]) == 2
        assert "invalid choice: 'int8'" in capsys.readouterr().err
