"""Finetuning FastInst through ModelScope's build_trainer: a tiny FastInst learns a repeated batch of synthetic scenes,
its class heads are re-initialised for the new class set (logged), the output folder is a hub-layout FastInst
directory that pipeline() runs with the trained weights, and evaluation scores it with COCO mask AP."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from modelscope.trainers import build_trainer
from PIL import Image
from test_training import LossRecorder, make_trainer, run_script

from modelscope_plugin.builders import build_fastinst
from modelscope_plugin.config import FastInstConfig
from modelscope_plugin.data.datasets import as_ms_dataset
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, SyntheticSplit, write_dataset
from modelscope_plugin.model_dirs.fastinst import write_hub_dir
from modelscope_plugin.modeling.fastinst.criterion import FastInstCriterion

CATEGORIES = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES]
THING_NAMES = [c.name for c in SYNTHETIC_CATEGORIES if c.isthing]
# 64 x 64 inputs: the stride-16 map has 16 pixels for the 12 queries
OPTIONS = {
    "train.max_epochs": 8, "train.dataloader.batch_size_per_gpu": 2, "train.optimizer.lr": 1e-3,
    # FastInst's augmentation at the scenes' own size without crops or flips: the same batch every iteration
    "train.augmentation": {"kind": "fastinst", "image_size": 64, "short_sides": [64], "long_side_max": 64,
                           "crop_probability": 0.0, "flip_probability": 0.0},
    "train.preprocess": {"short_side": 64, "long_side_max": 64},
    "train.loss": {"num_points": 256}, "train.logging": {"interval": 1},
    "train.checkpoint.period": {"interval": 8, "by_epoch": False},
}


def tiny_fastinst_and_scenes(root: Path, hidden_dim: int = 32):
    """A tiny FastInst in the hub layout and 4 synthetic 64 x 64 training scenes under ``root``."""
    config = FastInstConfig(num_classes=5, num_queries=12, num_aux_queries=3, hidden_dim=hidden_dim, mask_dim=24,
                            num_heads=4, feedforward_dim=48, decoder_layers=2,
                            class_names=tuple(f"thing_{i}" for i in range(5)))
    torch.manual_seed(0)
    model_dir = write_hub_dir(root / "model", config, build_fastinst(config).eval())
    write_dataset(root / "data", "train", 4, seed=0, config=SceneConfig.scaled(64))
    return model_dir, root / "data"


def output_weights(work_dir: Path):
    return torch.load(work_dir / "output" / "pytorch_model.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("fastinst_training")
    config = FastInstConfig(num_classes=5, num_queries=12, num_aux_queries=3, hidden_dim=32, mask_dim=24, num_heads=4,
                            feedforward_dim=48, decoder_layers=2, class_names=tuple(f"thing_{i}" for i in range(5)))
    torch.manual_seed(0)
    model_dir = write_hub_dir(root / "model", config, build_fastinst(config).eval())
    # two images, one batch, no augmentation: every iteration sees the same batch
    write_dataset(root / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    write_dataset(root / "data", "val", 2, seed=1, config=SceneConfig.scaled(64))
    recorder = LossRecorder()
    trainer = build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=as_ms_dataset(SyntheticSplit(root / "data", "train").panoptic_rows()),
        eval_dataset=as_ms_dataset(SyntheticSplit(root / "data", "val").instance_rows()), work_dir=str(root / "work"),
        categories=CATEGORIES, cfg_options=dict(OPTIONS), callbacks=[recorder], seed=7))
    return trainer, recorder, root


def test_fastinst_learns_a_repeated_batch(trained, caplog):
    trainer, recorder, _ = trained
    caplog.set_level("INFO", logger="modelscope")
    assert isinstance(trainer.criterion, FastInstCriterion)
    assert any("class head re-initialised for a new class set: 5 classes -> 4 (4 things, 0 stuff" in note
               and "conv_proposal_cls_logits.2 (6, 32, 1, 1) -> (5, 32, 1, 1)" in note for note in trainer._notes)
    network = trainer.unwrap_module(trainer.model)
    decoder = network.transformer_decoder
    # every stage's class MLP and the instance-activation head now predict the 4 synthetic things + "no object"
    assert {mlp.layers[-1].out_features for mlp in decoder.class_embed_layers} == {5}
    assert decoder.query_proposal.conv_proposal_cls_logits[-1].out_channels == 5
    # official FastInst's solver: no gradient clipping, steps at 88.9 % / 96.3 % of the run
    assert "grad_clip" not in (trainer.cfg.train.optimizer.get("options") or {})
    assert trainer.train_dataset.augmentation.kind == "fastinst"
    trainer.train()
    losses = recorder.losses
    assert len(losses) == 8 and all(np.isfinite(losses))
    # a trend, not every step (one step may rise by float rounding or an unlucky point sample): the least-squares
    # slope is negative, the second half lower than the first, the last loss well below the first
    slope = np.polyfit(np.arange(len(losses)), losses, 1)[0]
    assert slope < 0 and np.mean(losses[4:]) < np.mean(losses[:4]), losses
    assert losses[-1] < 0.85 * losses[0], losses
    assert trainer.lr_scheduler.milestones == {7: 2}  # int(0.889 * 8) = int(0.963 * 8) = 7: x 0.01 from iteration 7
    log = caplog.text
    assert "loss_proposal:" in log and "eta:" in log


def test_the_output_folder_runs_in_the_pipeline_with_the_trained_weights(trained):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    trainer, _, root = trained
    if trainer.iter == 0:
        trainer.train()
    output = root / "work" / "output"
    configuration = json.loads((output / "configuration.json").read_text())
    assert configuration["model"]["type"] == "fastinst"
    assert configuration["model"]["classes"] == THING_NAMES
    assert configuration["model"]["category_ids"] == [c.id for c in SYNTHETIC_CATEGORIES if c.isthing]
    assert configuration["model"]["preprocess"]["short_side"] == 64
    segmenter = pipeline(Tasks.image_segmentation, model=str(output), device="cpu")
    trained_weights = trainer.unwrap_module(trainer.model).state_dict()
    assert all(torch.equal(trained_weights[key], value) for key, value in segmenter.model.network.state_dict().items())
    result = segmenter(str(root / "data" / "train" / "000001.png"), score_thr=0.0)
    assert len(result["masks"]) > 0 and result["masks"][0].shape == (64, 64)
    assert set(result["labels"]) <= set(THING_NAMES)
    assert list(result["scores"]) == sorted(result["scores"], reverse=True)
    values = trainer.evaluate()
    assert {"segm/AP", "bbox/AP"} <= set(values)


def test_fastinst_refuses_other_tasks(trained, tmp_path):
    _, _, root = trained
    with pytest.raises(ValueError, match="FastInst trains the instance task only"):
        build_trainer("mask2former-segmentation", dict(
            model=str(root / "model"), train_dataset=as_ms_dataset(SyntheticSplit(root / "data", "train").panoptic_rows()),
            work_dir=str(tmp_path / "work"), categories=CATEGORIES, cfg_options=dict(OPTIONS, **{"train.task": "panoptic"})))


def test_a_new_class_set_replaces_only_the_class_heads():
    from modelscope_plugin.training.class_head import adapt_class_head, class_head_layers
    from modelscope_plugin.training.data import contiguous_categories

    config = FastInstConfig(num_classes=5, num_queries=12, num_aux_queries=3, hidden_dim=32, mask_dim=24, num_heads=4,
                            feedforward_dim=48, decoder_layers=2, class_names=tuple(f"thing_{i}" for i in range(5)),
                            category_ids=tuple(range(5)))
    network = build_fastinst(config)
    before = {key: value.clone() for key, value in network.state_dict().items()}
    things = contiguous_categories([c for c in CATEGORIES if c["isthing"]])
    new_config, message = adapt_class_head(config, network, things, seed=0)
    assert (new_config.num_classes, new_config.class_names) == (4, tuple(THING_NAMES))
    heads = class_head_layers(network)
    assert len(heads) == 4  # three stages' class MLPs (D2) and the instance-activation head
    after = network.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key]) or before[key].shape != after[key].shape}
    assert changed == {f"{head}.{kind}" for head in heads for kind in ("weight", "bias")}
    assert network.transformer_decoder.query_proposal.num_classes == 4
    with torch.no_grad():
        output = network.eval()(torch.randn(1, 3, 64, 64))
    assert output.class_logits.shape[-1] == output.proposal_class_logits.shape[1] == 5
    with pytest.raises(ValueError, match="FastInst segments instances only"):
        adapt_class_head(new_config, network, contiguous_categories(CATEGORIES), seed=0)


def test_the_finetune_script_starts_a_fastinst_from_the_dataset_classes(tmp_path):
    from modelscope_plugin.model_dirs.load import load_model_dir
    from modelscope_plugin.training.finetune import initial_model_dir

    directory = initial_model_dir(tmp_path / "initial", "fastinst-d1", CATEGORIES, image_size=128, seed=0)
    config, network = load_model_dir(directory)
    assert isinstance(config, FastInstConfig) and config.decoder_layers == 1
    assert config.class_names == tuple(THING_NAMES)  # things only: FastInst is an instance model
    assert config.category_ids == tuple(c["id"] for c in CATEGORIES if c["isthing"])
    assert (config.preprocess.short_side, config.preprocess.long_side_max) == (128, 128)
    assert network.transformer_decoder.class_embed_layers[-1].layers[-1].out_features == 5


@pytest.mark.parametrize("architecture", ["fastinst-small", "fastinst-small-swin"])
def test_the_small_fastinst_round_trips_and_trains(tmp_path, architecture):
    from modelscope_plugin.config import ResNetConfig, SwinConfig
    from modelscope_plugin.model_dirs.load import load_model_dir
    from modelscope_plugin.training.finetune import initial_model_dir

    directory = initial_model_dir(tmp_path / "initial", architecture, CATEGORIES, image_size=128, seed=0)
    backbone = json.loads((directory / "configuration.json").read_text())["model"]["backbone"]
    if architecture == "fastinst-small":  # detectron2's ResNet arguments
        assert (backbone["depth"], backbone["stem_out_channels"], backbone["res2_out_channels"]) == (18, 32, 32)
    else:
        assert backbone["type"] == "swin" and backbone["embed_dim"] == 32
    assert (directory / "pytorch_model.pt").stat().st_size < 20 * 10 ** 6  # the demo model's size limit
    config, network = load_model_dir(directory)
    assert config.backbone == (ResNetConfig(depth=18, width=32) if architecture == "fastinst-small" else
                               SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                                          drop_path_rate=0.0))
    assert config.hidden_dim == 128 and config.num_queries == 50
    saved = torch.load(directory / "pytorch_model.pt", weights_only=True)["model"]
    assert len(saved) == len(network.state_dict())
    # one training step through the trainer; its output folder loads the trained weights
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(128))
    # 128 x 128: the stride-16 map has 64 pixels for the 50 queries
    sized = {"train.augmentation": dict(OPTIONS["train.augmentation"], image_size=128, short_sides=[128], long_side_max=128),
             "train.preprocess": {"short_side": 128, "long_side_max": 128}}
    trainer = build_trainer("mask2former-segmentation", dict(
        model=str(directory), train_dataset=as_ms_dataset(SyntheticSplit(tmp_path / "data", "train").panoptic_rows()),
        work_dir=str(tmp_path / "work"), categories=CATEGORIES,
        cfg_options=dict(OPTIONS, **sized, **{"train.max_epochs": 1, "train.checkpoint.period": {"interval": 1, "by_epoch": True}}),
        seed=7))
    trainer.train()
    _, trained_network = load_model_dir(tmp_path / "work" / "output")
    trained = trainer.unwrap_module(trainer.model).state_dict()
    assert all(torch.equal(trained[key], value) for key, value in trained_network.state_dict().items())
    assert any(not torch.equal(trained[key], value) for key, value in network.state_dict().items())


def test_fastinst_augmentation_resizes_the_short_side_caps_the_long_side_and_pads_the_canvas():
    from modelscope_plugin.training.config import AugmentationConfig
    from modelscope_plugin.training.data import fastinst_augmentation

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)
    rows, columns = np.meshgrid(np.arange(100), np.arange(200), indexing="ij")
    ids = rows * 1000 + columns + 1  # every pixel its own id: the output tells where each pixel came from
    config = AugmentationConfig(kind="fastinst", image_size=96, short_sides=(50,), long_side_max=80,
                                crop_probability=0.0, flip_probability=0.0, pad_value=128)
    image, id_map = fastinst_augmentation(rgb, ids, config, np.random.default_rng(1))
    # short side 100 -> 50 gives 50 x 100; the long side is capped at 80: 40 x 80 (sides rounded with int(x + 0.5))
    expected = np.asarray(Image.fromarray(rgb).resize((80, 40), Image.BILINEAR))
    assert image.shape == (96, 96, 3) and np.array_equal(image[:40, :80], expected)
    assert (image[40:] == 128).all() and (image[:, 80:] == 128).all()
    assert (id_map[:40, :80] > 0).all() and (id_map[40:] == 0).all() and (id_map[:, 80:] == 0).all()

    cropping = AugmentationConfig(kind="fastinst", image_size=128, short_sides=(50,), long_side_max=120,
                                  crop_probability=1.0, crop_short_sides=(100,), crop_size_range=(30, 60),
                                  flip_probability=0.0)
    sizes = set()
    for seed in range(12):
        _, id_map = fastinst_augmentation(rgb, ids, cropping, np.random.default_rng(seed))
        kept = id_map[id_map > 0] - 1
        source_rows, source_columns = kept // 1000, kept % 1000
        crop = (source_rows.max() - source_rows.min() + 1, source_columns.max() - source_columns.min() + 1)
        assert 30 <= crop[0] <= 60 and 30 <= crop[1] <= 60, crop  # RandomCrop "absolute_range"
        height, width = (id_map > 0).any(1).sum(), (id_map > 0).any(0).sum()
        assert min(height, width) == 50 or max(height, width) == 120  # then the short side to 50 (long <= 120)
        sizes.add((height, width))
    assert len(sizes) > 3
    with pytest.raises(ValueError, match="smaller than long_side_max"):
        from modelscope_plugin.config import PreprocessConfig
        from modelscope_plugin.training.data import SegmentationTrainingDataset

        SegmentationTrainingDataset([], [], "instance", PreprocessConfig(), replace(config, image_size=64))


def test_a_killed_fastinst_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    from modelscope_plugin.training.checkpoint import latest_checkpoint

    model_dir, _ = tiny_fastinst_and_scenes(tmp_path)
    # 3 epochs of 2 batches, random flips (the resumed run must restore the RNG), a checkpoint every 2 iterations
    options = dict(OPTIONS, **{"train.max_epochs": 3, "train.checkpoint.period": {"interval": 2, "by_epoch": False},
                               "train.augmentation": dict(OPTIONS["train.augmentation"], flip_probability=0.5)})
    uninterrupted = make_trainer(model_dir, tmp_path / "data", tmp_path / "uninterrupted", options)
    uninterrupted.train()
    assert uninterrupted.iter == 6
    killed = run_script([model_dir, tmp_path / "data", tmp_path / "resumed", json.dumps(options), "--kill-after", 3])
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "resumed")
    assert checkpoint is not None and Path(checkpoint).name == "iter_2"
    resumed = make_trainer(model_dir, tmp_path / "data", tmp_path / "resumed", options)
    resumed.train(checkpoint_path=checkpoint)
    assert resumed.iter == 6

    expected, actual = output_weights(tmp_path / "uninterrupted"), output_weights(tmp_path / "resumed")
    initial = torch.load(model_dir / "pytorch_model.pt", weights_only=True)["model"]
    assert expected.keys() == actual.keys() == initial.keys()
    assert any(not torch.equal(expected[key], initial[key]) for key in expected)
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_the_finetune_script_trains_the_small_fastinst_and_scores_it_with_coco_ap(tmp_path):
    from modelscope_plugin.training.finetune import fastinst_augmentation, main

    # official FastInst's values at its own 640 size, scaled for smaller square scenes
    official = fastinst_augmentation(640)
    assert official["short_sides"] == list(range(416, 641, 32))
    assert (official["crop_short_sides"], official["crop_size_range"]) == ([400, 500, 600], [384, 600])
    assert fastinst_augmentation(128)["short_sides"] == [83, 90, 96, 102, 109, 115, 122, 128]
    results = main(["--data", str(tmp_path / "data"), "--generate", "5", "--architecture", "fastinst-small",
                    "--work-dir", str(tmp_path / "work"), "--epochs", "1", "--batch-size", "2", "--image-size", "128",
                    "--num-points", "256", "--workers", "0"])
    assert {"segm/AP", "bbox/AP"} <= set(results)
    report = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert report["task"] == "instance" and report["metrics"]["segm/AP"] == results["segm/AP"]
    configuration = json.loads((tmp_path / "work" / "output" / "configuration.json").read_text())
    assert (configuration["model"]["backbone"]["depth"], configuration["model"]["backbone"]["stem_out_channels"]) == (18, 32)


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    # width 64 for the pixel decoder's 32 groups: at width 32 each group norm normalises one channel, the PPM's 1x1
    # pooled map of adapter_3's output is then its bias plus rounding noise, and AdamW turns the noise-only
    # gradients of the stage-0 projection into lr-sized steps that differ between any two summation orders
    model_dir, _ = tiny_fastinst_and_scenes(tmp_path, hidden_dim=64)
    # 3 epochs of 2 global batches of 2 images, random flips; SGD with momentum, whose update is linear in the
    # gradient: AdamW's first steps move every weight by +-lr whatever its gradient's size, so the sign of a
    # gradient element that is rounding noise (FastInst has many) would decide an lr-sized difference
    options = dict(OPTIONS, **{"train.max_epochs": 3, "train.optimizer.type": "SGD", "train.optimizer.lr": 0.02,
                               "train.optimizer.momentum": 0.9,
                               "train.augmentation": dict(OPTIONS["train.augmentation"], flip_probability=0.5)})
    # oneDNN picks its convolution algorithm by batch size, so batch 2 and batch 1 round differently (~1e-7), and on an
    # AVX-512 CPU that flipped a discrete choice (top-k query selection or matching: weights 4 % apart); both runs use torch's
    # native convolution, which handles each image alone
    with torch.backends.mkldnn.flags(enabled=False):
        one = make_trainer(model_dir, tmp_path / "data", tmp_path / "one", options)
        one.train()
    completed = run_script([model_dir, tmp_path / "data", tmp_path / "two",
                            json.dumps(dict(options, **{"train.dataloader.batch_size_per_gpu": 1})), "--no-mkldnn"],
                           launcher="pytorch")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # the ranks stayed in sync

    expected, actual = output_weights(tmp_path / "one"), output_weights(tmp_path / "two")
    initial = torch.load(model_dir / "pytorch_model.pt", weights_only=True)["model"]
    # per weight tensor: the largest difference between the runs, against how far that tensor moved in training
    differences = {key: (expected[key].double() - actual[key].double()).abs().max().item() for key in expected}
    movements = {key: (expected[key].double() - initial[key].double()).abs().max().item() for key in expected
                 if expected[key].shape == initial[key].shape}  # the class heads were re-initialised for 4 things
    relative = {key: differences[key] / max(movements[key], 1e-6) for key in movements}
    worst = max(relative, key=relative.get)
    assert max(movements.values()) > 1e-3  # training moved the weights
    assert max(differences.values()) < 5e-5 and relative[worst] < 1e-2, (worst, relative[worst], differences[worst])
