"""Finetuning through ModelScope's build_trainer: a short run that learns, kill-and-resume, 2-process gloo = 1 process,
each gloo rank's own drop path masks, continued exactly on resume.

Also runnable as a script (the killed and the torchrun runs are separate processes):
    python tests/test_training.py MODEL_DIR DATA_ROOT WORK_DIR OPTIONS_JSON [--kill-after N] [--launcher pytorch]
        [--resume CHECKPOINT]
"""
import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, shape_weights, tiny_config, write_native_model_dir  # noqa: E402
from modelscope.trainers import build_trainer  # noqa: E402
from modelscope.trainers.hooks.hook import Hook  # noqa: E402
from torchvision.ops import StochasticDepth  # noqa: E402

from modelscope_plugin.builders import build_mask2former  # noqa: E402
from modelscope_plugin.data.datasets import as_ms_dataset  # noqa: E402
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, SyntheticSplit, write_dataset  # noqa: E402
from modelscope_plugin.training.checkpoint import latest_checkpoint  # noqa: E402

CATEGORIES = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES]
SMALL_SCENES = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)
# 64 x 64 crops, 256 points per mask, poly lr decay by iteration, a checkpoint every 2 iterations
RUN_OPTIONS = {
    "train.max_epochs": 3, "train.dataloader.batch_size_per_gpu": 2, "train.optimizer.lr": 5e-4,
    "train.augmentation": {"image_size": 64, "min_scale": 0.5, "max_scale": 1.5},
    "train.preprocess": {"short_side": 64, "long_side_max": 64},
    "train.loss": {"num_points": 256}, "train.logging": {"interval": 1},
    "train.checkpoint.period": {"interval": 2, "by_epoch": False},
}


class LossRecorder(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, trainer):
        self.losses.append(trainer.train_outputs["loss"].item())


class KillAfter(Hook):
    """Simulates a crash: SIGKILL right after iteration ``iterations`` (no clean-up, no save)."""

    def __init__(self, iterations):
        self.iterations = iterations

    def after_train_iter(self, trainer):
        if trainer.iter + 1 == self.iterations:
            os.kill(os.getpid(), 9)


class IterationRecorder(Hook):
    """Per training iteration: the learning rate of each optimiser group and, for an EoMT, its masked-attention
    probabilities."""

    def __init__(self):
        self.iterations = {}

    def before_train_iter(self, trainer):
        network = trainer.unwrap_module(trainer.model)
        probabilities = getattr(network, "attention_mask_probabilities", None)
        self.iterations[trainer.iter] = {
            "learning_rates": [group["lr"] for group in trainer.optimizer.param_groups],
            "probabilities": probabilities.tolist() if probabilities is not None else None}


class RandomMaskRecorder(Hook):
    """Per training iteration: a digest of the global torch RNG state before it, and which images (rows) each drop
    path of the network kept."""

    def __init__(self):
        self.rng_digests = {}
        self.kept_rows = {}

    def before_run(self, trainer):
        network = trainer.unwrap_module(trainer.model)
        for module in network.modules():
            if isinstance(module, StochasticDepth) and module.p > 0:
                module.register_forward_hook(lambda module, inputs, output: self.kept_rows[trainer.iter].append(
                    output.flatten(1).ne(0).any(1).tolist()))

    def before_train_iter(self, trainer):
        self.rng_digests[trainer.iter] = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()
        self.kept_rows[trainer.iter] = []


def make_trainer(model_dir, data_root, work_dir, options, callbacks=(), instance_rows=False, **kwargs):
    train = as_ms_dataset(SyntheticSplit(Path(data_root), "train").panoptic_rows())
    val_split = SyntheticSplit(Path(data_root), "val")
    evaluation = None
    if val_split.panoptic_json.is_file():
        evaluation = as_ms_dataset(val_split.instance_rows() if instance_rows else val_split.panoptic_rows())
    return build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=train, eval_dataset=evaluation, work_dir=str(work_dir),
        categories=CATEGORIES, cfg_options=dict(options), callbacks=list(callbacks), seed=7, **kwargs))


def final_weights(work_dir):
    return torch.load(Path(work_dir) / "output" / "pytorch_model.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    torch.manual_seed(0)
    config = tiny_config()
    network = build_mask2former(config).eval()
    shape_weights(network)
    model_dir = write_native_model_dir(root / "model", config, network)
    write_dataset(root / "data", "train", 4, seed=0, config=SMALL_SCENES)
    write_dataset(root / "data", "val", 2, seed=1, config=SMALL_SCENES)
    return model_dir, root / "data", root


def run_script(arguments, launcher=None, timeout=900):
    # the same thread count as this process: float reductions then run in the same order
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    if launcher:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                   __file__, *map(str, arguments), "--launcher", "pytorch"]
    else:
        command = [sys.executable, __file__, *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)


def test_finetune_learns_a_repeated_batch_and_the_output_runs_in_the_pipeline(setup, tmp_path, caplog):
    model_dir, data_root, _ = setup
    caplog.set_level("INFO", logger="modelscope")
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    # two images, one batch, no augmentation: every iteration sees the same batch
    rows_root = tmp_path / "data"
    write_dataset(rows_root, "train", 2, seed=0, config=SMALL_SCENES)
    recorder = LossRecorder()
    options = dict(RUN_OPTIONS, **{"train.max_epochs": 8, "train.optimizer.lr": 1e-3,
                                   "train.augmentation": {"image_size": 64, "min_scale": 1.0, "max_scale": 1.0,
                                                          "flip_probability": 0.0}})
    trainer = make_trainer(model_dir, rows_root, tmp_path / "work", options, callbacks=[recorder])
    trainer.train()
    losses = recorder.losses
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
    log = caplog.text
    assert "class head re-initialised for a new class set: 133 classes -> 7" in log
    assert "eta:" in log and "lr:" in log and "loss_dice:" in log
    # the output folder is a model directory in the native layout, with the new classes
    output = tmp_path / "work" / "output"
    configuration = json.loads((output / "configuration.json").read_text())
    assert configuration["model"]["type"] == "mask2former"
    assert configuration["model"]["config"]["class_names"] == [c.name for c in SYNTHETIC_CATEGORIES]
    segmenter = pipeline(Tasks.image_segmentation, model=str(output), device="cpu")
    result = segmenter(str(rows_root / "train" / "000001.png"))
    assert result["panoptic_seg"].shape == (64, 64)
    assert set(result["labels"]) <= {c.name for c in SYNTHETIC_CATEGORIES}
    # the trained weights are what the pipeline runs
    trained = trainer.unwrap_module(trainer.model).state_dict()
    assert all(torch.equal(trained[key], value) for key, value in segmenter.model.network.state_dict().items())


class TrainingDtypeRecorder(Hook):
    """The dtype of the first linear layer's output in every training forward."""

    def __init__(self):
        self.dtypes = []

    def before_run(self, trainer):
        network = trainer.unwrap_module(trainer.model)
        linear = next(module for module in network.modules() if isinstance(module, torch.nn.Linear))
        linear.register_forward_hook(lambda module, inputs, output: self.dtypes.append(output.dtype) if module.training else None)


def test_use_fp16_trains_in_bfloat16_autocast_on_cpu(setup, tmp_path):
    model_dir, data_root, _ = setup
    recorder, dtypes = LossRecorder(), TrainingDtypeRecorder()
    options = dict(RUN_OPTIONS, **{"train.max_epochs": 1})
    trainer = make_trainer(model_dir, data_root, tmp_path / "work", options, callbacks=[recorder, dtypes], use_fp16=True)
    initial = {key: value.clone() for key, value in trainer.unwrap_module(trainer.model).state_dict().items()}
    trainer.train()
    hook_types = [type(hook).__name__ for hook in trainer.hooks]
    assert "SegmentationAMPOptimizerHook" in hook_types and "TorchAMPOptimizerHook" not in hook_types
    assert dtypes.dtypes and set(dtypes.dtypes) == {torch.bfloat16}, dtypes.dtypes  # ModelScope's hook: float32 on CPU
    assert len(recorder.losses) == 2 and all(np.isfinite(recorder.losses))
    trained = final_weights(tmp_path / "work")
    assert any(not torch.equal(trained[key], initial[key]) for key in trained)
    assert all(value.dtype == initial[key].dtype for key, value in trained.items())  # weights stay float32


def test_evaluation_uses_the_package_metrics(setup, tmp_path, monkeypatch):
    model_dir, data_root, _ = setup

    attempts = []

    def no_network(*arguments, **kwargs):
        attempts.append(arguments)
        raise OSError("network blocked by the test")

    # the stock trainer asks the hub whether a local model directory is the latest (and swallows the failure)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    trainer = make_trainer(model_dir, data_root, tmp_path / "work", RUN_OPTIONS)
    monkeypatch.undo()
    assert attempts == []
    values = trainer.evaluate()
    assert {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"} <= set(values)
    assert trainer.evaluation_results["per_class"].keys() == {c.name for c in SYNTHETIC_CATEGORIES}
    # the synthetic class set (classes present in these 2 images), not COCO's 133
    assert values["n_th"] <= 4 and values["n_st"] <= 3 and values["n"] >= 4


def test_instance_task_learns_things_only_and_is_scored_with_coco_ap(setup, tmp_path, caplog):
    model_dir, data_root, _ = setup
    caplog.set_level("INFO", logger="modelscope")
    options = dict(RUN_OPTIONS, **{"train.task": "instance", "train.max_epochs": 1, "train.train_iters_per_epoch": 1})
    trainer = make_trainer(model_dir, data_root, tmp_path / "work", options, instance_rows=True)
    assert trainer.unwrap_module(trainer.model).transformer_decoder.class_embed.out_features == 5  # 4 things + void
    assert "133 classes -> 4 (4 things, 0 stuff" in caplog.text
    trainer.train()
    assert trainer.iter == 1
    values = trainer.evaluate()
    assert {"segm/AP", "bbox/AP"} <= set(values)


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(setup, tmp_path):
    model_dir, data_root, _ = setup
    uninterrupted = make_trainer(model_dir, data_root, tmp_path / "uninterrupted", RUN_OPTIONS)
    uninterrupted.train()
    assert uninterrupted.iter == 6

    killed = run_script([model_dir, data_root, tmp_path / "resumed", json.dumps(RUN_OPTIONS), "--kill-after", 3])
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "resumed")
    assert checkpoint is not None and Path(checkpoint).name == "iter_2"
    # the trainer state loads without executing pickled code
    state = torch.load(checkpoint + "_trainer_state.pth", map_location="cpu", weights_only=True)
    assert state["meta"]["iter"] == 2 and state["meta"]["inner_iter"] == 2

    resumed = make_trainer(model_dir, data_root, tmp_path / "resumed", RUN_OPTIONS)
    resumed.train(checkpoint_path=checkpoint)
    assert resumed.iter == 6
    expected, actual = final_weights(tmp_path / "uninterrupted"), final_weights(tmp_path / "resumed")
    assert expected.keys() == actual.keys()
    initial = torch.load(Path(model_dir) / "pytorch_model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(expected["pixel_decoder.mask_features.weight"], initial["pixel_decoder.mask_features.weight"])
    mismatched = {key: (expected[key] - actual[key]).abs().max().item() for key in expected
                  if not torch.equal(expected[key], actual[key])}
    assert mismatched == {}
    assert resumed.optimizer.state_dict()["state"].keys() == uninterrupted.optimizer.state_dict()["state"].keys()
    assert resumed.lr_scheduler.last_epoch == uninterrupted.lr_scheduler.last_epoch == 6


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(setup, tmp_path):
    model_dir, data_root, _ = setup
    one = make_trainer(model_dir, data_root, tmp_path / "one", RUN_OPTIONS)
    one.train()
    options = dict(RUN_OPTIONS, **{"train.dataloader.batch_size_per_gpu": 1})
    completed = run_script([model_dir, data_root, tmp_path / "two", json.dumps(options)], launcher="pytorch")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # the ranks stayed in sync
    expected, actual = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    worst = max((expected[key] - actual[key]).abs().max().item() for key in expected)
    initial = torch.load(Path(model_dir) / "pytorch_model.pt", weights_only=True)["state_dict"]
    moved = max((expected[key] - initial[key]).abs().max().item() for key in expected
                if initial[key].shape == expected[key].shape)
    assert worst < 1e-5 < 1e-4 < moved, (worst, moved)


def test_two_gloo_processes_evaluate_and_keep_the_best_checkpoint_with_both_ranks_rng_states(setup, tmp_path):
    """Evaluation every 2 iterations and ModelScope's best-checkpoint saver (``train.checkpoint.best``, replaced by
    SegmentationBestCheckpointHook) under torchrun: every rank gathers its RNG state in the saver, so a rank that
    skipped it would hang the run; rank 0 writes the best checkpoint with both ranks' states."""
    model_dir, data_root, _ = setup
    options = dict(RUN_OPTIONS, **{"train.dataloader.batch_size_per_gpu": 1,
                                   "evaluation.period": {"interval": 2, "by_epoch": False},
                                   "train.checkpoint.best": {"metric_key": "PQ", "rule": "max", "by_epoch": False,
                                                             "interval": 2}})
    completed = run_script([model_dir, data_root, tmp_path / "two", json.dumps(options)], launcher="pytorch",
                           timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    best_states = sorted((tmp_path / "two").glob("best_iter*_trainer_state.pth"))
    assert len(best_states) == 1, best_states
    best_state = torch.load(best_states[0], map_location="cpu", weights_only=True)
    rng_states = best_state["meta"]["rng_states"]
    assert len(rng_states) == 2
    assert not torch.equal(rng_states[0]["cpu"], rng_states[1]["cpu"])  # rank 1 seeds seed + 1
    iteration = best_state["meta"]["iter"]
    regular = torch.load(tmp_path / "two" / f"iter_{iteration}_trainer_state.pth", map_location="cpu",
                         weights_only=True)
    assert [state["cpu"].tolist() for state in regular["meta"]["rng_states"]] == [
        state["cpu"].tolist() for state in rng_states]
    best_weights = torch.load(str(best_states[0])[: -len("_trainer_state.pth")] + ".pth", map_location="cpu",
                              weights_only=True)["state_dict"]
    regular_weights = torch.load(tmp_path / "two" / f"iter_{iteration}.pth", map_location="cpu",
                                 weights_only=True)["state_dict"]
    assert best_weights.keys() == regular_weights.keys()
    assert all(torch.equal(best_weights[key], regular_weights[key]) for key in best_weights)


# one image per rank, 2 iterations per epoch over the 4 scenes; checkpoints at iterations 2, 4 and 6
DROP_PATH_OPTIONS = dict(RUN_OPTIONS, **{"train.dataloader.batch_size_per_gpu": 1})


@pytest.fixture(scope="module")
def drop_path_model_dir(setup):
    """The tiny network with drop path on (rates 0 to 0.5 over its 8 Swin blocks)."""
    _, _, root = setup
    torch.manual_seed(0)
    base = tiny_config()
    config = tiny_config(backbone=replace(base.backbone, drop_path_rate=0.5))
    network = build_mask2former(config).eval()
    shape_weights(network)
    return write_native_model_dir(root / "drop_path_model", config, network)


@pytest.fixture(scope="module")
def two_gloo_ranks_with_drop_path(setup, drop_path_model_dir):
    """An uninterrupted 2-process gloo run with drop path on: (work dir, each rank's record)."""
    _, data_root, root = setup
    work_dir = root / "two_drop_path"
    completed = run_script([drop_path_model_dir, data_root, work_dir, json.dumps(DROP_PATH_OPTIONS)],
                           launcher="pytorch")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return work_dir, [json.loads((work_dir / f"rank_{rank}.json").read_text()) for rank in range(2)]


def test_two_gloo_ranks_draw_their_own_drop_path_masks_and_rank_0_draws_what_one_process_draws(
        setup, drop_path_model_dir, two_gloo_ranks_with_drop_path, tmp_path):
    _, data_root, _ = setup
    _, ranks = two_gloo_ranks_with_drop_path
    assert [len(rank["kept_rows"]) for rank in ranks] == [6, 6]
    assert all(len(rank["kept_rows"][iteration]) == 14 for rank in ranks for iteration in rank["kept_rows"])
    for iteration in ranks[0]["kept_rows"]:
        assert ranks[0]["rng_digests"][iteration] != ranks[1]["rng_digests"][iteration]
    assert ranks[0]["kept_rows"] != ranks[1]["kept_rows"]
    # both keep and drop: the masks are real draws
    decisions = [kept for rank in ranks for forward in rank["kept_rows"].values() for kept in forward]
    assert [True] in decisions and [False] in decisions
    # one process, one image per iteration: the same global stream as rank 0 (seed 7)
    masks = RandomMaskRecorder()
    one = make_trainer(drop_path_model_dir, data_root, tmp_path / "one",
                       dict(DROP_PATH_OPTIONS, **{"train.max_epochs": 1, "train.train_iters_per_epoch": 2}),
                       callbacks=[masks])
    one.train()
    assert [masks.rng_digests[iteration] for iteration in (0, 1)] == [ranks[0]["rng_digests"][key] for key in "01"]
    assert [masks.kept_rows[iteration] for iteration in (0, 1)] == [ranks[0]["kept_rows"][key] for key in "01"]


def test_a_two_process_run_resumed_from_its_checkpoint_continues_every_rank_s_drop_path_masks(
        setup, drop_path_model_dir, two_gloo_ranks_with_drop_path, tmp_path):
    _, data_root, _ = setup
    uninterrupted_dir, uninterrupted = two_gloo_ranks_with_drop_path
    # the uninterrupted run's checkpoint after iteration 2, resumed in a work dir of its own
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    for path in uninterrupted_dir.glob("iter_2*.pth"):
        shutil.copy(path, resumed_dir / path.name)
    state = torch.load(resumed_dir / "iter_2_trainer_state.pth", map_location="cpu", weights_only=True)
    assert len(state["meta"]["rng_states"]) == 2 and "rng_state" not in state["meta"]
    completed = run_script([drop_path_model_dir, data_root, resumed_dir, json.dumps(DROP_PATH_OPTIONS), "--resume",
                            resumed_dir / "iter_2"], launcher="pytorch")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    resumed = [json.loads((resumed_dir / f"rank_{rank}.json").read_text()) for rank in range(2)]
    for rank in range(2):
        assert sorted(resumed[rank]["kept_rows"]) == ["2", "3", "4", "5"]
        for iteration in resumed[rank]["kept_rows"]:
            assert resumed[rank]["rng_digests"][iteration] == uninterrupted[rank]["rng_digests"][iteration]
            assert resumed[rank]["kept_rows"][iteration] == uninterrupted[rank]["kept_rows"][iteration]
        assert resumed[rank]["checksums"] == uninterrupted[rank]["checksums"]
    expected, actual = final_weights(uninterrupted_dir), final_weights(resumed_dir)
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_a_checkpoint_with_one_rng_state_resumes_one_process_exactly(setup, drop_path_model_dir, tmp_path):
    """A checkpoint written before there was one RNG state per rank (``meta['rng_state']``)."""
    _, data_root, _ = setup
    uninterrupted = make_trainer(drop_path_model_dir, data_root, tmp_path / "uninterrupted", RUN_OPTIONS)
    uninterrupted.train()
    assert uninterrupted.iter == 6
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "uninterrupted" / "iter_2.pth", resumed_dir / "iter_2.pth")
    state = torch.load(tmp_path / "uninterrupted" / "iter_2_trainer_state.pth", map_location="cpu", weights_only=True)
    assert len(state["meta"]["rng_states"]) == 1
    state["meta"]["rng_state"] = state["meta"].pop("rng_states")[0]
    torch.save(state, resumed_dir / "iter_2_trainer_state.pth")
    resumed = make_trainer(drop_path_model_dir, data_root, resumed_dir, RUN_OPTIONS)
    resumed.train(checkpoint_path=str(resumed_dir / "iter_2"))
    assert resumed.iter == 6
    expected, actual = final_weights(tmp_path / "uninterrupted"), final_weights(resumed_dir)
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_a_resume_with_another_world_size_restores_the_saved_ranks_and_re_seeds_the_others(
        setup, drop_path_model_dir, two_gloo_ranks_with_drop_path, tmp_path, caplog):
    _, data_root, _ = setup
    uninterrupted_dir, uninterrupted = two_gloo_ranks_with_drop_path
    options = dict(DROP_PATH_OPTIONS, **{"train.max_epochs": 2, "train.train_iters_per_epoch": 2})
    # two saved states, one process: rank 0 restores state 0 (logged)
    caplog.set_level("WARNING", logger="modelscope")
    fewer_dir = tmp_path / "fewer"
    fewer_dir.mkdir()
    for path in uninterrupted_dir.glob("iter_2*.pth"):
        shutil.copy(path, fewer_dir / path.name)
    masks = RandomMaskRecorder()
    one = make_trainer(drop_path_model_dir, data_root, fewer_dir, options, callbacks=[masks])
    one.train(checkpoint_path=str(fewer_dir / "iter_2"))
    assert masks.rng_digests[2] == uninterrupted[0]["rng_digests"]["2"]
    assert "holds the RNG states of 2 ranks, this run has 1" in caplog.text
    # one saved state, two processes: rank 0 restores it, rank 1 re-seeds with seed + 1 (seed 7)
    more_dir = tmp_path / "more"
    more_dir.mkdir()
    shutil.copy(fewer_dir / "iter_2.pth", more_dir / "iter_2.pth")
    state = torch.load(fewer_dir / "iter_2_trainer_state.pth", map_location="cpu", weights_only=True)
    state["meta"]["rng_states"] = state["meta"]["rng_states"][:1]
    torch.save(state, more_dir / "iter_2_trainer_state.pth")
    completed = run_script([drop_path_model_dir, data_root, more_dir, json.dumps(options), "--resume",
                            more_dir / "iter_2"], launcher="pytorch")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    assert "holds the RNG states of 1 ranks, this run has 2" in completed.stdout + completed.stderr
    ranks = [json.loads((more_dir / f"rank_{rank}.json").read_text()) for rank in range(2)]
    seeded = hashlib.sha256(torch.Generator().manual_seed(8).get_state().numpy().tobytes()).hexdigest()
    assert ranks[0]["rng_digests"]["2"] == uninterrupted[0]["rng_digests"]["2"]
    assert ranks[1]["rng_digests"]["2"] == seeded


@pytest.fixture
def run_finetune_script(setup, monkeypatch):
    """``run(arguments)``: the finetune script on the module's scenes with the tiny network, building the trainer
    without training or evaluating it; returns the trainer."""
    from modelscope_plugin.integration.trainer import SegmentationTrainer
    from modelscope_plugin.training import finetune

    _, data_root, _ = setup
    built = []
    monkeypatch.setattr(SegmentationTrainer, "train", lambda self, checkpoint_path=None: built.append(self))
    monkeypatch.setattr(SegmentationTrainer, "evaluate", lambda self, *arguments, **kwargs: {})
    monkeypatch.setattr(SegmentationTrainer, "evaluation_results", {}, raising=False)

    def run(arguments):
        finetune.main(["--data", str(data_root), "--architecture", "tiny", "--image-size", "64", "--batch-size", "2",
                       "--workers", "0", *arguments])
        return built[-1]

    return run


def test_the_finetune_script_trains_the_backbone_at_full_lr_from_random_weights_and_at_a_tenth_from_a_model(
        run_finetune_script, tmp_path):
    def backbone_and_head_lrs(arguments):
        trainer = run_finetune_script(["--lr", "2e-4", *arguments])
        trainer.train_dataloader = trainer.get_train_dataloader()  # the schedule's length needs it
        optimizer, *_ = trainer.create_optimizer_and_scheduler()
        network = trainer.unwrap_module(trainer.model)
        lr_of = {id(parameter): group["lr"] for group in optimizer.param_groups for parameter in group["params"]}
        return lr_of[id(network.backbone.patch_embed.proj.weight)], lr_of[id(network.transformer_decoder.query_feat.weight)]

    assert backbone_and_head_lrs(["--work-dir", str(tmp_path / "scratch")]) == (pytest.approx(2e-4), pytest.approx(2e-4))
    pretrained = str(tmp_path / "scratch" / "initial_model")
    assert backbone_and_head_lrs(["--work-dir", str(tmp_path / "finetune"), "--model", pretrained]) == (
        pytest.approx(2e-5), pytest.approx(2e-4))
    assert backbone_and_head_lrs(["--work-dir", str(tmp_path / "chosen"), "--model", pretrained,
                                  "--backbone-lr-multiplier", "0.5"])[0] == pytest.approx(1e-4)


def test_the_finetune_script_trains_on_crops_smaller_than_the_test_size(run_finetune_script, tmp_path):
    trainer = run_finetune_script(["--crop-size", "32", "--work-dir", str(tmp_path / "work")])
    batch = next(iter(trainer.get_train_dataloader()))
    assert tuple(batch.images.shape) == (2, 3, 32, 32)
    # the model directory (what evaluation and pipeline() run) keeps the whole-scene test size
    configuration = json.loads((tmp_path / "work" / "initial_model" / "configuration.json").read_text())
    preprocess = configuration["model"]["config"]["preprocess"]
    assert (preprocess["short_side"], preprocess["long_side_max"]) == (64, 64)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data_root")
    parser.add_argument("work_dir")
    parser.add_argument("options")
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--launcher", default=None)
    parser.add_argument("--resume", default=None, help="a checkpoint prefix to resume from")
    parser.add_argument("--no-mkldnn", action="store_true", help="batch-size-independent convolution kernels")
    arguments = parser.parse_args(argv)
    torch.backends.mkldnn.enabled = not arguments.no_mkldnn
    recorder, masks = IterationRecorder(), RandomMaskRecorder()
    callbacks = [recorder, masks, *([KillAfter(arguments.kill_after)] if arguments.kill_after else [])]
    extra = {"launcher": arguments.launcher} if arguments.launcher else {}
    trainer = make_trainer(arguments.model_dir, arguments.data_root, arguments.work_dir, json.loads(arguments.options),
                           callbacks=callbacks, **extra)
    trainer.train(checkpoint_path=arguments.resume)
    rank = int(os.environ.get("RANK", 0))
    network = trainer.unwrap_module(trainer.model)
    checksums = {key: float(value.double().sum()) for key, value in network.state_dict().items()}
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    (Path(arguments.work_dir) / f"rank_{rank}.json").write_text(json.dumps({
        "world_size": world_size, "checksums": checksums, "iterations": recorder.iterations,
        "rng_digests": masks.rng_digests, "kept_rows": masks.kept_rows}))


if __name__ == "__main__":
    main()

