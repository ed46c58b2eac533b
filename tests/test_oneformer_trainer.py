"""Finetuning OneFormer through ModelScope's build_trainer: a tiny random OneFormer with a text mapper written as a
Hugging Face folder (this package's writer, no transformers), two synthetic 64 x 64 scenes; per-image tasks and
text lists, the contrastive term and its learned scale, class-head re-initialisation, the output folder in
``pipeline()``; a folder without a text mapper trains without the contrastive term. The writer
(``to_hf_oneformer``, ``write_hub_oneformer_dir``) reads back exactly, and its names equal transformers'."""
import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_oracle
from modelscope.trainers import build_trainer
from modelscope.trainers.hooks.hook import Hook
from PIL import Image
from safetensors.torch import load_file
from test_oneformer_model import tiny_oneformer_config

from modelscope_plugin.builders import build_oneformer
from modelscope_plugin.checkpoints.oneformer import to_hf_oneformer
from modelscope_plugin.config import DinatConfig, OneFormerConfig, OneFormerTextMapperConfig, SwinConfig
from modelscope_plugin.data.datasets import as_ms_dataset
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, SyntheticSplit, write_dataset
from modelscope_plugin.errors import KeymapError, TrainingConfigError
from modelscope_plugin.model_dirs.load import load_model
from modelscope_plugin.model_dirs.oneformer import (
    load_hf_oneformer_dir,
    write_hf_oneformer_dir,
    write_hub_oneformer_dir,
)
from modelscope_plugin.modeling.oneformer.clip_tokenizer import END_OF_TEXT, START_OF_TEXT, clip_tokenizer

SWIN = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
DINAT = DinatConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), kernel_size=3,
                    dilations=((2,), (1,), (1, 2), (2,)), mlp_ratio=2.0, layer_scale_init=0.5)
TEXT_MAPPER = OneFormerTextMapperConfig(context_length=8, width=64, num_layers=1, projector_layers=2, num_context=2)


def tiny_config(backbone=SWIN, text_mapper=TEXT_MAPPER):
    """5 classes (3 things), 6 queries, width 64 (the text mapper's heads are width // 64), CLIP's vocabulary."""
    config = replace(tiny_oneformer_config(backbone), hidden_dim=64, text_mapper=text_mapper,
                     class_names=("cat", "dog", "car", "grass", "sky"), category_ids=(3, 5, 7, 11, 13),
                     num_things_classes=3, num_stuff_classes=2)
    return config


@pytest.mark.parametrize("backbone", [SWIN, DINAT], ids=["swin", "dinat"])
@pytest.mark.parametrize("with_text_mapper", [True, False], ids=["text_mapper", "inference"])
def test_writer_round_trip_is_exact(tmp_path, backbone, with_text_mapper):
    config = tiny_config(backbone, TEXT_MAPPER if with_text_mapper else None)
    config.preprocess.short_side, config.preprocess.long_side_max = 96, 160
    config.task = "instance"
    torch.manual_seed(0)
    network = build_oneformer(config)
    written = write_hub_oneformer_dir(tmp_path / "out", config, network, logit_scale=torch.tensor(2.5))
    loaded_config, loaded = load_model(written)
    original, read_back = network.state_dict(), loaded.state_dict()
    assert set(read_back) == set(original)
    assert any(key.startswith("text_mapper.") for key in read_back) == with_text_mapper
    for key, tensor in original.items():
        assert torch.equal(read_back[key], tensor), key
    assert loaded_config == config
    # the HF folder alone keeps the network, the text mapper and the preprocessing (classes: by count only)
    hf_config, hf_network = load_hf_oneformer_dir(written)
    assert hf_config.text_mapper == config.text_mapper and hf_config.preprocess == config.preprocess
    assert hf_config.class_names == config.class_names and hf_config.category_ids == (0, 1, 2, 3, 4)
    weights = load_file(written / "model.safetensors")
    assert float(weights["criterion.logit_scale"]) == 2.5
    assert json.loads((written / "config.json").read_text())["is_training"] == with_text_mapper


def test_writer_refuses_a_key_it_has_no_name_for():
    network = build_oneformer(tiny_config())
    state_dict = dict(network.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(KeymapError, match="extra.weight"):
        to_hf_oneformer(state_dict, "swin")


@pytest.mark.oracle
@pytest.mark.parametrize("backbone", ["swin", "dinat"])
def test_written_folder_has_transformers_names_and_values(tmp_path, backbone):
    """A transformers-made training folder (text mapper saved), read and written back: every tensor of the
    original under the same name, except the loss's empty-class weights, which the network does not hold."""
    pixels = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels)
    arguments = ["--backbone", backbone, "--training", "--layer-scale", "0.5"] if backbone == "dinat" \
        else ["--training"]
    run_oracle("oneformer_oracle.py", "make", *arguments, "--calibration-pixels", tmp_path / "pixels.npz",
               "--out-dir", tmp_path / "hf")
    config, network = load_model(tmp_path / "hf")
    assert config.text_mapper is not None
    original = load_file(tmp_path / "hf" / "model.safetensors")
    written = load_file(write_hub_oneformer_dir(tmp_path / "out", config, network,
                                                original["criterion.logit_scale"]) / "model.safetensors")
    assert set(original) - set(written) == {"criterion.empty_weight"} and set(written) <= set(original)
    for key, tensor in written.items():
        if "swin.layernorm" not in key:  # never applied by the backbone; written with its initial values
            assert torch.equal(tensor, original[key]), key


CATEGORIES = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES]
CLASS_NAMES = [c.name for c in SYNTHETIC_CATEGORIES]
THING_INDICES = {index for index, c in enumerate(SYNTHETIC_CATEGORIES) if c.isthing}
OPTIONS = {
    "train.max_epochs": 2, "train.dataloader.batch_size_per_gpu": 2, "train.optimizer.lr": 1e-3,
    "train.augmentation": {"image_size": 64, "min_scale": 1.0, "max_scale": 1.0, "flip_probability": 0.0},
    "train.preprocess": {"short_side": 64, "long_side_max": 64},
    "train.loss": {"num_points": 64}, "train.logging": {"interval": 1},
    "train.checkpoint.period": {"interval": 1, "by_epoch": False},
}
PADDING = {"a semantic photo", "an instance photo", "an panoptic photo"}


class BatchRecorder(Hook):
    """Each training iteration's batch (tasks, targets, text tokens)."""

    def __init__(self):
        self.batches = []

    def before_train_iter(self, trainer):
        self.batches.append(trainer.data_batch)


def tiny_hf_oneformer(directory: Path, text_mapper=TEXT_MAPPER) -> Path:
    torch.manual_seed(0)
    config = tiny_config(text_mapper=text_mapper)
    return write_hf_oneformer_dir(directory, config, build_oneformer(config).eval())


def make_trainer(model_dir, data_root, work_dir, options=OPTIONS, callbacks=(), rows="panoptic"):
    split = SyntheticSplit(Path(data_root), "train")
    return build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=as_ms_dataset(getattr(split, f"{rows}_rows")()),
        work_dir=str(work_dir), categories=CATEGORIES, cfg_options=dict(options), callbacks=list(callbacks),
        seed=7))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("oneformer_training")
    model_dir = tiny_hf_oneformer(root / "hf_oneformer")
    write_dataset(root / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    recorder = BatchRecorder()
    trainer = make_trainer(model_dir, root / "data", root / "work", callbacks=[recorder])
    network = trainer.unwrap_module(trainer.model)
    before = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    losses = []
    criterion_forward = trainer.criterion.forward
    trainer.criterion.forward = lambda *arguments: losses.append(criterion_forward(*arguments)) or losses[-1]
    trainer.train()
    return dict(trainer=trainer, root=root, model_dir=model_dir, before=before, losses=losses,
                batches=recorder.batches)


def decoded_texts(tokens: torch.Tensor):
    """(num_text, L) CLIP ids -> the texts among the candidates whose tokens they are."""
    candidates = [f"a photo with a {name}" for name in CLASS_NAMES] + sorted(PADDING)
    by_tokens = {tuple(row.tolist()): text
                 for text, row in zip(candidates, clip_tokenizer().tokenize(candidates, tokens.shape[1]))}
    return [by_tokens.get(tuple(row.tolist())) for row in tokens]


def test_two_iterations_with_the_contrastive_term_and_the_output_in_the_pipeline(trained):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    trainer = trained["trainer"]
    assert isinstance(trainer.model_config, OneFormerConfig) and trainer.iter == 2
    assert len(trained["losses"]) == 2
    for losses in trained["losses"]:
        # 2 masked-attention layers: the final prediction and 2 earlier stages, plus the contrastive term
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_1", "loss_contrastive"} <= set(losses)
        assert "loss_ce_2" not in losses and torch.isfinite(losses["loss_contrastive"])
    output = trained["root"] / "work" / "output"
    configuration = json.loads((output / "configuration.json").read_text())
    assert configuration["model"]["type"] == "oneformer"
    assert configuration["model"]["config"]["category_ids"] == [c.id for c in SYNTHETIC_CATEGORIES]
    assert json.loads((output / "config.json").read_text())["is_training"] is True
    segmenter = pipeline(Tasks.image_segmentation, model=str(output), device="cpu")
    trained_weights = trainer.unwrap_module(trainer.model).state_dict()
    loaded_weights = segmenter.model.network.state_dict()
    assert trained_weights.keys() == loaded_weights.keys()
    assert any(key.startswith("text_mapper.") for key in loaded_weights)
    assert all(torch.equal(trained_weights[key], value) for key, value in loaded_weights.items())
    assert any(not torch.equal(trained["before"][key], trained_weights[key]) for key in trained_weights)
    # the text mapper and the learned logit scale trained too
    assert any(not torch.equal(trained["before"][key], trained_weights[key]) for key in trained_weights
               if key.startswith("text_mapper."))
    logit_scale = float(load_file(output / "model.safetensors")["criterion.logit_scale"])
    assert logit_scale == pytest.approx(float(trainer.criterion.logit_scale.detach()))
    assert abs(logit_scale - math.log(1 / 0.07)) > 1e-4
    assert segmenter.model.config.class_names == tuple(CLASS_NAMES)
    result = segmenter(str(trained["root"] / "data" / "train" / "000001.png"))
    assert set(result["labels"]) <= set(CLASS_NAMES)


def test_each_image_gets_its_task_its_targets_and_its_text_list(trained):
    num_text = 6 - TEXT_MAPPER.num_context
    for batch in trained["batches"]:
        assert batch.text_tokens.shape == (2, num_text, TEXT_MAPPER.context_length)
        for task, target, tokens in zip(batch.tasks, batch.targets, batch.text_tokens):
            assert task in ("panoptic", "semantic", "instance")
            labels = target.labels.tolist()
            if task == "instance":
                assert set(labels) <= THING_INDICES
            if task == "semantic":
                assert len(labels) == len(set(labels))
            texts = decoded_texts(tokens)
            # one text per segment, grouped by class in class order, at most num_text, then the task's padding
            named = [f"a photo with a {CLASS_NAMES[label]}" for label in sorted(labels)][:num_text]
            assert texts[:len(named)] == named
            padding = {"panoptic": "an panoptic photo", "semantic": "a semantic photo",
                       "instance": "an instance photo"}[task]
            assert texts[len(named):] == [padding] * (num_text - len(named))
            assert tokens[:, 0].eq(START_OF_TEXT).all() and tokens.eq(END_OF_TEXT).sum() == num_text


def test_tasks_depend_on_seed_epoch_and_image_only(trained):
    dataset = trained["trainer"].train_dataset
    first = [dataset[index].task for index in range(len(dataset))]
    again = [dataset[index].task for index in reversed(range(len(dataset)))][::-1]
    assert first == again
    tasks_by_epoch = []
    for epoch in range(12):
        dataset.set_epoch(epoch)
        tasks_by_epoch.append(tuple(dataset[index].task for index in range(len(dataset))))
    assert {task for tasks in tasks_by_epoch for task in tasks} == {"panoptic", "semantic", "instance"}


def test_a_new_class_set_reinitialises_the_class_head_only(trained):
    trainer, before = trained["trainer"], trained["before"]
    num_classes = len(SYNTHETIC_CATEGORIES)
    assert any(f"class head re-initialised for a new class set: 5 classes -> {num_classes}" in note
               and f"transformer_decoder.class_embed (6, 64) -> ({num_classes + 1}, 64)" in note
               for note in trainer._notes)
    _, original = load_model(trained["model_dir"])
    original_weights = original.state_dict()
    torch.manual_seed(7)
    expected_head = torch.nn.Linear(64, num_classes + 1)
    assert torch.equal(before["transformer_decoder.class_embed.weight"], expected_head.weight)
    assert torch.equal(before["transformer_decoder.class_embed.bias"], expected_head.bias)
    others = [key for key in original_weights if not key.startswith("transformer_decoder.class_embed.")]
    assert [key for key in others if not torch.equal(original_weights[key], before[key])] == []


def test_a_folder_without_text_mapper_trains_without_the_contrastive_term(tmp_path):
    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer", text_mapper=None)
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    trainer = make_trainer(model_dir, tmp_path / "data", tmp_path / "work", dict(OPTIONS, **{"train.max_epochs": 1}))
    assert any("trains without the query-text contrastive term" in note for note in trainer._notes)
    losses = []
    criterion_forward = trainer.criterion.forward
    trainer.criterion.forward = lambda *arguments: losses.append(criterion_forward(*arguments)) or losses[-1]
    trainer.train()
    assert len(losses) == 1 and "loss_ce" in losses[0] and "loss_contrastive" not in losses[0]
    output = tmp_path / "work" / "output"
    assert json.loads((output / "config.json").read_text())["is_training"] is False
    assert "criterion.logit_scale" not in load_file(output / "model.safetensors")


@pytest.mark.parametrize("rows", ["semantic", "instance"])
def test_instance_and_label_rows_train_their_one_task(tmp_path, rows):
    """Label rows train the semantic task on every image, instance rows the instance task (its class head: the
    thing classes); each becomes the default task, and the log names it."""
    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    recorder = BatchRecorder()
    trainer = make_trainer(model_dir, tmp_path / "data", tmp_path / "work", callbacks=[recorder], rows=rows)
    assert trainer.oneformer_tasks == (rows,) and trainer.model_config.task == rows
    assert any(f"OneFormer trains on {rows} rows" in note and f"every image's task is {rows}" in note
               for note in trainer._notes)
    expected_classes = len(THING_INDICES) if rows == "instance" else len(SYNTHETIC_CATEGORIES)
    assert trainer.model_config.num_classes == expected_classes
    losses = []
    criterion_forward = trainer.criterion.forward
    trainer.criterion.forward = lambda *arguments: losses.append(criterion_forward(*arguments)) or losses[-1]
    trainer.train()
    assert trainer.iter == 2 and len(recorder.batches) == 2
    assert all(torch.isfinite(trainer.criterion.total(terms)) and "loss_contrastive" in terms for terms in losses)
    padding = {"semantic": "a semantic photo", "instance": "an instance photo"}[rows]
    num_text = 6 - TEXT_MAPPER.num_context
    for batch in recorder.batches:
        assert batch.tasks == [rows, rows]
        for target, tokens in zip(batch.targets, batch.text_tokens):
            labels = target.labels.tolist()
            assert labels and (set(labels) <= THING_INDICES if rows == "instance" else len(set(labels)) == len(labels))
            named = [f"a photo with a {CLASS_NAMES[label]}" for label in sorted(labels)][:num_text]
            assert decoded_texts(tokens) == named + [padding] * (num_text - len(named))
    assert json.loads((tmp_path / "work" / "output" / "configuration.json").read_text())["model"]["config"]["task"] \
        == rows


@pytest.mark.parametrize("rows, asked", [("semantic", "panoptic"), ("instance", "semantic")])
def test_a_task_the_rows_cannot_train_is_refused_when_the_trainer_is_built(tmp_path, rows, asked):
    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    with pytest.raises(TrainingConfigError, match=f"train.task '{asked}'.* {rows} rows .*the {rows} task only"):
        make_trainer(model_dir, tmp_path / "data", tmp_path / "work", dict(OPTIONS, **{"train.task": asked}),
                     rows=rows)


def processor_segment_map(dataset, row, rows):
    """The row's annotation as OneFormerImageProcessor reads it: (H, W) class indices (void 255) for label rows,
    (H, W) object numbers (void 0) and number -> class index for instance rows."""
    from pycocotools import mask as mask_utils

    if rows == "semantic":
        with Image.open(row["label_path"]) as image:
            values = np.asarray(image).astype(np.int64)
        class_map = np.full(values.shape, 255, np.int64)
        for category_id, class_index in dataset.class_index_of.items():
            class_map[values == category_id] = class_index
        return class_map, None, 255
    objects = np.zeros((int(row["height"]), int(row["width"])), np.int64)
    classes = {}
    for number, annotation in enumerate(json.loads(row["annotations_json"]), start=1):
        rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode("ascii"))
        mask = mask_utils.decode(rle).astype(bool)
        assert not (objects[mask] != 0).any()  # one map holds them: no overlaps in the synthetic scenes
        objects[mask] = number
        classes[number] = dataset.class_index_of[int(annotation["category_id"])]
    return objects, classes, 0


@pytest.mark.oracle
@pytest.mark.parametrize("rows", ["semantic", "instance"])
def test_instance_and_label_targets_equal_transformers_processor(tmp_path, rows):
    """Without augmentation (64 x 64 scenes kept whole), each image's target and text list equal
    OneFormerImageProcessor's for the rows' one task."""
    from modelscope_plugin.training.config import AugmentationConfig
    from modelscope_plugin.training.data import contiguous_categories
    from modelscope_plugin.training.oneformer import OneFormerTrainingDataset

    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    split_rows = getattr(SyntheticSplit(tmp_path / "data", "train"), f"{rows}_rows")()
    config = tiny_config()
    augmentation = AugmentationConfig(image_size=64, min_scale=1.0, max_scale=1.0, flip_probability=0.0)
    dataset = OneFormerTrainingDataset(split_rows, contiguous_categories(CATEGORIES), config, augmentation)
    num_text = dataset.num_text
    for index, row in enumerate(split_rows):
        sample = dataset[index]
        assert sample.task == rows
        segment_map, classes, ignore_index = processor_segment_map(dataset, row, rows)
        arrays = dict(segment_map=segment_map, class_names=np.array(CLASS_NAMES),
                      thing_ids=np.array(sorted(THING_INDICES)), num_text=num_text, tasks=np.array([rows]),
                      ignore_index=ignore_index)
        if classes is not None:
            arrays.update(segment_ids=np.array(sorted(classes)),
                          segment_classes=np.array([classes[number] for number in sorted(classes)]))
        np.savez(tmp_path / "input.npz", **arrays)
        run_oracle("oneformer_training_oracle.py", "targets", tmp_path / "input.npz", tmp_path / "result.npz")
        reference = np.load(tmp_path / "result.npz")
        assert sample.target.labels.tolist() == reference[f"labels_{rows}"].tolist()
        assert torch.equal(sample.target.masks, torch.from_numpy(reference[f"masks_{rows}"]).float())
        texts = reference[f"texts_{rows}"].tolist()
        assert torch.equal(sample.text_tokens, clip_tokenizer().tokenize(texts, config.text_mapper.context_length))
        assert any(text.startswith("a photo with a") for text in texts)


def test_a_resumed_run_continues_tasks_weights_and_logit_scale(tmp_path):
    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    options = dict(OPTIONS, **{"train.max_epochs": 4, "train.checkpoint.period": {"interval": 2, "by_epoch": False}})
    uninterrupted_recorder, resumed_recorder = BatchRecorder(), BatchRecorder()
    uninterrupted = make_trainer(model_dir, tmp_path / "data", tmp_path / "uninterrupted", options,
                                 [uninterrupted_recorder])
    uninterrupted.train()
    resumed = make_trainer(model_dir, tmp_path / "data", tmp_path / "resumed", options, [resumed_recorder])
    resumed.train(checkpoint_path=str(tmp_path / "uninterrupted" / "iter_2"))
    assert resumed.iter == 4 and len(resumed_recorder.batches) == 2
    assert [batch.tasks for batch in resumed_recorder.batches] == \
        [batch.tasks for batch in uninterrupted_recorder.batches[2:]]
    expected = uninterrupted.unwrap_module(uninterrupted.model).state_dict()
    actual = resumed.unwrap_module(resumed.model).state_dict()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []
    assert torch.equal(resumed.criterion.logit_scale.detach(), uninterrupted.criterion.logit_scale.detach())


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """torchrun with 2 ranks of 1 image = 1 process of 2 images: the same tasks per image (drawn from seed, epoch and
    image, whichever rank reads it), the same weights and logit scale (the contrastive loss over the global batch)."""
    from oneformer_training_worker import TaskRecorder
    from oneformer_training_worker import make_trainer as make_worker_trainer

    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer")
    write_dataset(tmp_path / "data", "train", 4, seed=0, config=SceneConfig.scaled(64))
    # 2 epochs of 2 global batches of 2 images, flips; SGD with momentum, whose update is linear in the gradient
    # (AdamW's first steps move each weight by +-lr whatever the size of its gradient, rounding noise included), the
    # gradient clipped at norm 0.01 (the default); no weight decay, so that the text mapper moves through the
    # contrastive term alone
    options = dict(OPTIONS, **{"train.optimizer.type": "SGD", "train.optimizer.lr": 0.5,
                               "train.optimizer.momentum": 0.9, "train.optimizer.weight_decay": 0.0,
                               "train.augmentation": dict(OPTIONS["train.augmentation"], flip_probability=0.5)})
    one_recorder = TaskRecorder()
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN's convolution algorithm depends on the batch size
        one = make_worker_trainer(model_dir, tmp_path / "data", tmp_path / "one", options, [one_recorder])
        one.train()
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    two_options = dict(options, **{"train.dataloader.batch_size_per_gpu": 1})
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         str(REPO / "tests" / "oneformer_training_worker.py"), str(model_dir), str(tmp_path / "data"),
         str(tmp_path / "two"), json.dumps(two_options)],
        capture_output=True, text=True, timeout=900, env=environment, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # the ranks stayed in sync
    assert ranks[0]["logit_scale"] == ranks[1]["logit_scale"]

    # per iteration, rank r trained the r-th image of the one-process batch, told the same task
    assert len(one_recorder.iterations) == 4 == len(ranks[0]["iterations"])
    tasks_seen = set()
    for step, one_step in enumerate(one_recorder.iterations):
        for rank in range(2):
            rank_step = ranks[rank]["iterations"][step]
            assert rank_step["epoch"] == one_step["epoch"]
            assert rank_step["indices"] == one_step["indices"][rank:rank + 1]
            assert rank_step["tasks"] == one_step["tasks"][rank:rank + 1]
        tasks_seen.update(one_step["tasks"])
    # an image read by both ranks (in different epochs) gets the task of its (seed, epoch, index) either way
    dataset = one.train_dataset
    for step in ranks[0]["iterations"] + ranks[1]["iterations"]:
        dataset.set_epoch(step["epoch"])
        assert step["tasks"] == [dataset.task_of(index) for index in step["indices"]]
    assert len(tasks_seen) > 1

    expected = one.unwrap_module(one.model).state_dict()
    _, two_network = load_model(tmp_path / "two" / "output")
    actual = two_network.state_dict()
    _, initial_network = load_model(model_dir)
    initial = initial_network.state_dict()
    differences = {key: (expected[key].double() - actual[key].double()).abs().max().item() for key in expected}
    movements = {key: (expected[key].double() - initial[key].double()).abs().max().item() for key in expected
                 if expected[key].shape == initial[key].shape}  # the class head was re-initialised
    # measured: largest difference 1.5e-8, at most 1e-4 of how far a tensor moved; the text mapper (moved 1e-4, through
    # the contrastive term alone, which needs the other rank's image and text) within 1e-8
    relative = {key: differences[key] / movements[key] for key in movements if movements[key] > 1e-5}
    worst = max(relative, key=relative.get)
    text_mapper_keys = [key for key in movements if key.startswith("text_mapper.")]
    assert max(movements.values()) > 5e-4  # training moved the weights
    assert max(movements[key] for key in text_mapper_keys) > 5e-5
    assert max(differences.values()) < 1e-6 and relative[worst] < 1e-3, (worst, relative[worst], differences[worst])
    two_scale = float(load_file(tmp_path / "two" / "output" / "model.safetensors")["criterion.logit_scale"])
    one_scale = float(one.criterion.logit_scale.detach())
    assert abs(two_scale - one_scale) < 1e-5 < abs(one_scale - math.log(1 / 0.07))


def test_evaluation_runs_the_network_on_its_default_task(tmp_path):
    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    write_dataset(tmp_path / "data", "val", 1, seed=1, config=SceneConfig.scaled(64))
    trainer = build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=as_ms_dataset(SyntheticSplit(tmp_path / "data", "train").panoptic_rows()),
        eval_dataset=as_ms_dataset(SyntheticSplit(tmp_path / "data", "val").panoptic_rows()),
        work_dir=str(tmp_path / "work"), categories=CATEGORIES,
        cfg_options=dict(OPTIONS, **{"train.max_epochs": 1, "train.task": "panoptic"}), seed=7))
    assert trainer.model_config.task == "panoptic"
    trainer.train()
    values = trainer.evaluate()
    assert "PQ" in json.dumps(values), values


@pytest.mark.oracle
def test_transformers_runs_the_written_folder_as_this_package_does(tmp_path):
    """An inference folder written here (no transformers) loads in OneFormerForUniversalSegmentation, which predicts
    what this package's network does for each task."""
    config = tiny_config(text_mapper=None)
    torch.manual_seed(3)
    network = build_oneformer(config).eval()
    written = write_hub_oneformer_dir(tmp_path / "out", config, network)
    pixels = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 3, 64, 96)).astype(np.float32))
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels.numpy())
    run_oracle("oneformer_oracle.py", "run", "--model-dir", written, "--pixels", tmp_path / "pixels.npz",
               "--result", tmp_path / "result.npz")
    reference = np.load(tmp_path / "result.npz")
    for task in ("panoptic", "semantic", "instance"):
        with torch.no_grad():
            output = network(pixels, task)
        theirs_class = torch.from_numpy(reference[f"class_{task}"])
        theirs_masks = torch.from_numpy(reference[f"masks_{task}"])
        assert theirs_class.shape == output.class_logits.shape and theirs_masks.shape == output.mask_logits.shape
        assert (output.class_logits - theirs_class).abs().max() < 1e-4 * max(1.0, theirs_class.abs().max()), task
        assert (output.mask_logits - theirs_masks).abs().max() < 1e-4 * max(1.0, theirs_masks.abs().max()), task


def test_the_train_command_finetunes_a_oneformer_folder(tmp_path):
    from modelscope_plugin.apps.cli import main

    model_dir = tiny_hf_oneformer(tmp_path / "hf_oneformer")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    write_dataset(tmp_path / "data", "val", 1, seed=1, config=SceneConfig.scaled(64))
    code = main(["train", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--work-dir",
                 str(tmp_path / "work"), "--epochs", "1", "--batch-size", "1", "--image-size", "64", "--workers", "0",
                 "--num-points", "64", "--min-scale", "1", "--max-scale", "1"])
    assert code == 0
    config, network = load_model(tmp_path / "work" / "output")
    assert isinstance(config, OneFormerConfig) and config.category_ids == tuple(c.id for c in SYNTHETIC_CATEGORIES)
    assert network.text_mapper is not None
    report = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert report["task"] == "panoptic" and "PQ" in report["metrics"]
