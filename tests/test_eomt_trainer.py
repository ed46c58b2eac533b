"""Finetuning EoMT through ModelScope's build_trainer: a tiny random EoMT written as a Hugging Face folder (this
package's writer, no transformers), two synthetic 64 x 64 scenes; deep supervision, class-head re-initialisation,
layer-wise learning rates, mask annealing by iteration (and after a resume), the output folder in ``pipeline()``, two
gloo processes under torchrun equal to one process on the same global batch."""
import json
from pathlib import Path

import pytest
import torch
from modelscope.trainers import build_trainer
from modelscope.trainers.hooks.hook import Hook
from test_eomt_model import tiny_eomt_config

from modelscope_plugin.builders import build_eomt
from modelscope_plugin.config import EomtConfig
from modelscope_plugin.data.datasets import as_ms_dataset
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, SyntheticSplit, write_dataset
from modelscope_plugin.errors import TrainingConfigError
from modelscope_plugin.model_dirs.eomt import write_hf_eomt_dir, write_hub_eomt_dir
from modelscope_plugin.model_dirs.load import load_model

CATEGORIES = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES]
# the tiny EoMT (tests/test_eomt_model.py): 64 x 64 input, 4 ViT blocks of width 64, the last 2 with 10 queries
OPTIONS = {
    "train.task": "panoptic", "train.max_epochs": 2, "train.dataloader.batch_size_per_gpu": 2,
    "train.optimizer.lr": 1e-3,
    "train.optimizer.layer_decay": 0.5,
    "train.augmentation": {"image_size": 64, "min_scale": 1.0, "max_scale": 1.0, "flip_probability": 0.0},
    "train.preprocess": {"short_side": 64, "long_side_max": 64},
    "train.loss": {"num_points": 64}, "train.logging": {"interval": 1},
    "train.checkpoint.period": {"interval": 1, "by_epoch": False},
    "train.mask_annealing": {"starts": [0, 1], "ends": [2, 3]},
}


class Recorder(Hook):
    """Per training iteration: the network's masked-attention probabilities and the learning rates of ``WATCHED``
    parameters; each parameter's base learning rate (before the schedule's factor) at the start of the run."""

    WATCHED = ("class_head.weight", "blocks.3.attention.qkv.weight", "blocks.2.mlp.fc1.weight")

    def __init__(self):
        self.probabilities = {}
        self.base_learning_rates = {}
        self.iteration_learning_rates = {}

    def learning_rate_of(self, trainer, key):
        network = trainer.unwrap_module(trainer.model)
        lr_of = {id(parameter): group[key] for group in trainer.optimizer.param_groups
                 for parameter in group["params"]}
        return {name: lr_of[id(parameter)] for name, parameter in network.named_parameters()}

    def before_run(self, trainer):
        self.base_learning_rates = self.learning_rate_of(trainer, "initial_lr")

    def before_train_iter(self, trainer):
        rates = self.learning_rate_of(trainer, "lr")
        self.iteration_learning_rates[trainer.iter] = {name: rates[name] for name in self.WATCHED}

    def after_train_iter(self, trainer):
        network = trainer.unwrap_module(trainer.model)
        self.probabilities[trainer.iter] = network.attention_mask_probabilities.tolist()


def tiny_hf_eomt(directory: Path) -> Path:
    config = tiny_eomt_config(class_names=tuple("abcde"), category_ids=(0, 1, 2, 3, 4))
    torch.manual_seed(0)
    return write_hf_eomt_dir(directory, config, build_eomt(config).eval())


def make_trainer(model_dir, data_root, work_dir, options, callbacks=()):
    return build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=as_ms_dataset(SyntheticSplit(Path(data_root), "train").panoptic_rows()),
        work_dir=str(work_dir), categories=CATEGORIES, cfg_options=dict(options), callbacks=list(callbacks),
        seed=7))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eomt_training")
    model_dir = tiny_hf_eomt(root / "hf_eomt")
    write_dataset(root / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    recorder = Recorder()
    trainer = make_trainer(model_dir, root / "data", root / "work", OPTIONS, [recorder])
    network = trainer.unwrap_module(trainer.model)
    before = {name: tensor.clone() for name, tensor in network.state_dict().items()}
    losses = []
    criterion_forward = trainer.criterion.forward
    trainer.criterion.forward = lambda *arguments: losses.append(criterion_forward(*arguments)) or losses[-1]
    trainer.train()
    return dict(trainer=trainer, root=root, model_dir=model_dir, before=before,
                losses=losses, recorder=recorder)


def test_hf_writer_round_trips_state_dict_exactly(tmp_path):
    for name, overrides in (("dinov2", {}), ("swiglu", {"swiglu_mlp": True}), ("dinov3", {"rope_theta": 100.0})):
        config = tiny_eomt_config(class_names=tuple("abcde"), category_ids=(3, 5, 8, 13, 21), **overrides)
        torch.manual_seed(1)
        network = build_eomt(config)
        with torch.no_grad():
            network.attention_mask_probabilities.copy_(torch.tensor([0.25, 0.75]))
            if name == "dinov3":  # DINOv3 has no key bias: the HF files hold none (rows 64:128 of the fused bias)
                for block in network.blocks:
                    block.attention.qkv.bias[64:128] = 0
        write_hub_eomt_dir(tmp_path / name, config, network)
        assert (tmp_path / name / "config.json").is_file() and (tmp_path / name / "model.safetensors").is_file()
        loaded_config, loaded = load_model(tmp_path / name)
        expected, actual = network.state_dict(), loaded.state_dict()
        assert expected.keys() == actual.keys()
        assert [key for key in expected if not torch.equal(expected[key], actual[key])] == [], name
        # what config.json cannot say comes back from configuration.json
        assert loaded_config.category_ids == (3, 5, 8, 13, 21)
        assert (loaded_config.num_things_classes, loaded_config.num_stuff_classes) == (3, 2)
        assert loaded_config.task == "panoptic" and loaded_config.swiglu_mlp == (name == "swiglu")


def test_two_iterations_with_deep_supervision_and_the_output_in_the_pipeline(trained):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    trainer = trained["trainer"]
    assert isinstance(trainer.model_config, EomtConfig) and trainer.iter == 2
    # the final prediction and one before each of the 2 query blocks, each with its own loss terms
    assert len(trained["losses"]) == 2
    for losses in trained["losses"]:
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_ce_1", "loss_dice_1"} <= \
            set(losses)
        assert "loss_ce_2" not in losses
    output = trained["root"] / "work" / "output"
    configuration = json.loads((output / "configuration.json").read_text())
    assert configuration["model"]["type"] == "eomt"
    assert configuration["model"]["config"]["category_ids"] == [c.id for c in SYNTHETIC_CATEGORIES]
    segmenter = pipeline(Tasks.image_segmentation, model=str(output), device="cpu")
    trained_weights = trainer.unwrap_module(trainer.model).state_dict()
    loaded_weights = segmenter.model.network.state_dict()
    assert trained_weights.keys() == loaded_weights.keys()
    assert all(torch.equal(trained_weights[key], value) for key, value in loaded_weights.items())
    # training changed the weights
    assert any(not torch.equal(trained["before"][key], trained_weights[key]) for key in trained_weights)
    assert segmenter.model.config.class_names == tuple(c.name for c in SYNTHETIC_CATEGORIES)
    result = segmenter(str(trained["root"] / "data" / "train" / "000001.png"))
    assert set(result["labels"]) <= {c.name for c in SYNTHETIC_CATEGORIES}


def test_a_new_class_set_reinitialises_the_class_head_only(trained):
    trainer, before = trained["trainer"], trained["before"]
    num_classes = len(SYNTHETIC_CATEGORIES)
    assert any(f"class head re-initialised for a new class set: 5 classes -> {num_classes}" in note
               and f"class_head (6, 64) -> ({num_classes + 1}, 64)" in note for note in trainer._notes)
    _, original = load_model(trained["model_dir"])
    original_weights = original.state_dict()
    assert before["class_head.weight"].shape == (num_classes + 1, 64)
    # PyTorch's default initialisation from the trainer's seed
    torch.manual_seed(7)
    expected_head = torch.nn.Linear(64, num_classes + 1)
    assert torch.equal(before["class_head.weight"], expected_head.weight)
    assert torch.equal(before["class_head.bias"], expected_head.bias)
    others = [key for key in original_weights if not key.startswith("class_head.")]
    assert [key for key in others if not torch.equal(original_weights[key], before[key])] == []


def test_layer_wise_learning_rates(trained):
    rates = trained["recorder"].base_learning_rates
    # lr 1e-3, layer decay 0.5, 4 ViT blocks: block b at 1e-3 * 0.5 ** (3 - b), the embeddings as block 0
    assert rates["blocks.3.attention.qkv.weight"] == pytest.approx(1e-3)
    assert rates["blocks.2.mlp.fc1.weight"] == pytest.approx(5e-4)
    assert rates["blocks.0.norm1.weight"] == pytest.approx(1.25e-4)
    assert rates["embeddings.patch_projection.weight"] == pytest.approx(1.25e-4)
    assert rates["embeddings.class_token"] == pytest.approx(1.25e-4)
    for name in ("class_head.weight", "queries.weight", "mask_head.fc1.weight", "norm.weight",
                 "upscale_layers.0.transposed_conv.weight"):
        assert rates[name] == pytest.approx(1e-3), name
    assert {group["weight_decay"] for group in trained["trainer"].optimizer.param_groups} == {0.05}


def test_mask_annealing_follows_the_iteration(trained):
    # starts (0, 1), ends (2, 3), power 0.9: block 0 fades over iterations 0-2, block 1 over 1-3
    probabilities = trained["recorder"].probabilities
    assert probabilities[0] == pytest.approx([1.0, 1.0])
    assert probabilities[1] == pytest.approx([0.5 ** 0.9, 1.0])


def test_the_default_schedule_scales_the_official_warm_up_to_a_run_of_two_iterations(trained):
    trainer = trained["trainer"]
    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    # 2 iterations: the warm-ups 500 * 2 // 15000 = 0 and 1000 * 2 // 15000 = 0, so every group decays from its rate
    # (lr 1e-3, layer decay 0.5) over 2 steps: factor 1, then (1 - 1 / 2) ** 0.9
    rates = trained["recorder"].iteration_learning_rates
    assert rates[0] == pytest.approx({"class_head.weight": 1e-3, "blocks.3.attention.qkv.weight": 1e-3,
                                      "blocks.2.mlp.fc1.weight": 5e-4}, abs=1e-15)
    assert rates[1] == pytest.approx({"class_head.weight": 1e-3 * 0.5 ** 0.9,
                                      "blocks.3.attention.qkv.weight": 1e-3 * 0.5 ** 0.9,
                                      "blocks.2.mlp.fc1.weight": 5e-4 * 0.5 ** 0.9}, abs=1e-15)
    assert any("the official warm-ups [500, 1000] are scaled to [0, 0] for the run of 2 iterations" in note
               for note in trainer._notes)


def scheduled_learning_rates(model_dir, data_root, work_dir, options, steps):
    """The learning rates of class_head.weight (outside the ViT) and blocks.3.attention.qkv.weight (the last ViT
    block) at each of ``steps`` under the trainer's schedule, without training; and the trainer."""
    trainer = make_trainer(model_dir, data_root, work_dir, options)
    trainer.train_dataloader = trainer.get_train_dataloader()  # the schedule's length needs it
    optimizer, scheduler, *_ = trainer.create_optimizer_and_scheduler()
    network = trainer.unwrap_module(trainer.model)
    group_of = {id(parameter): index for index, group in enumerate(optimizer.param_groups)
                for parameter in group["params"]}
    head, last_block = group_of[id(network.class_head.weight)], group_of[id(network.blocks[3].attention.qkv.weight)]
    rates = {step: (optimizer.param_groups[head]["initial_lr"] * scheduler.lr_lambdas[head](step),
                    optimizer.param_groups[last_block]["initial_lr"] * scheduler.lr_lambdas[last_block](step))
             for step in steps}
    return rates, trainer


def test_a_short_run_scales_the_official_warm_up_and_keeps_an_explicit_one(tmp_path):
    model_dir = tiny_hf_eomt(tmp_path / "hf_eomt")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    # 90 iterations (one batch of 2 images per epoch), lr 1e-3, the default annealing (unit 90 // 4 = 22)
    options = {key: value for key, value in OPTIONS.items() if key != "train.mask_annealing"}
    options["train.max_epochs"] = 90
    steps = (0, 1, 2, 3, 4, 8, 9, 20, 89)
    rates, trainer = scheduled_learning_rates(model_dir, tmp_path / "data", tmp_path / "scaled", options, steps)
    # warm-ups 500 and 1000 scaled by 90 / 15000: 3 and 6 steps. Outside the ViT: 0, 1/3, 2/3, then decay over the
    # 87 steps from 3; the ViT: 0 until 3, then 0, 1/6, ... 5/6 over 3-8, then decay over the 81 steps from 9
    head = {0: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0, 4: (86 / 87) ** 0.9, 8: (82 / 87) ** 0.9, 9: (81 / 87) ** 0.9,
            20: (70 / 87) ** 0.9, 89: (1 / 87) ** 0.9}
    vit = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 1 / 6, 8: 5 / 6, 9: 1.0, 20: (70 / 81) ** 0.9, 89: (1 / 81) ** 0.9}
    for step in steps:
        assert rates[step][0] == pytest.approx(1e-3 * head[step], abs=1e-15), step
        assert rates[step][1] == pytest.approx(1e-3 * vit[step], abs=1e-15), step
    assert any("the official warm-ups [500, 1000] are scaled to [3, 6] for the run of 90 iterations" in note
               for note in trainer._notes)
    # the warm-up (9 steps) ends before the default annealing fades the first query block (from step 22)
    assert trainer.mask_annealing.steps(90, 2) == ((22, 44), (44, 66))

    # an explicit warm-up is kept as given, unscaled and without a note
    options["train.lr_scheduler"] = {"type": "EomtWarmupPolyLR", "warmup": [10, 20], "options": {"by_epoch": False}}
    rates, trainer = scheduled_learning_rates(model_dir, tmp_path / "data", tmp_path / "explicit", options, steps)
    head = {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 8: 0.8, 9: 0.9, 20: (70 / 80) ** 0.9, 89: (1 / 80) ** 0.9}
    vit = {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 8: 0.0, 9: 0.0, 20: 0.5, 89: (1 / 60) ** 0.9}
    for step in steps:
        assert rates[step][0] == pytest.approx(1e-3 * head[step], abs=1e-15), step
        assert rates[step][1] == pytest.approx(1e-3 * vit[step], abs=1e-15), step
    assert not any("warm-ups" in note for note in trainer._notes)

    # a run of 15000 iterations or more keeps the official warm-up: 500 + 1000 steps, then decay over 13500
    options = dict(options, **{"train.lr_scheduler": {"type": "EomtWarmupPolyLR", "total_iters": 15000,
                                                      "options": {"by_epoch": False}}})
    rates, trainer = scheduled_learning_rates(model_dir, tmp_path / "data", tmp_path / "long", options,
                                              (250, 500, 1000, 1500, 8250))
    assert [rate for rate, _ in rates.values()] == pytest.approx([5e-4, 1e-3, 1e-3 * (14000 / 14500) ** 0.9,
                                                                  1e-3 * (13500 / 14500) ** 0.9,
                                                                  1e-3 * (6750 / 14500) ** 0.9], abs=1e-15)
    assert [rate for _, rate in rates.values()] == pytest.approx([0.0, 0.0, 5e-4, 1e-3, 1e-3 * 0.5 ** 0.9],
                                                                 abs=1e-15)
    assert not any("warm-ups" in note for note in trainer._notes)


def test_two_stage_warm_up_and_default_annealing_resume_where_the_run_stopped(tmp_path):
    model_dir = tiny_hf_eomt(tmp_path / "hf_eomt")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    # 8 iterations, 2 query blocks: the official placement's unit 8 // 4 = 2, block 0 over [2, 4), block 1 [4, 6)
    options = {key: value for key, value in OPTIONS.items() if key != "train.mask_annealing"}
    options.update({"train.max_epochs": 8, "train.checkpoint.period": {"interval": 4, "by_epoch": False},
                    "train.lr_scheduler": {"type": "EomtWarmupPolyLR", "warmup": [2, 2], "power": 0.9,
                                           "options": {"by_epoch": False}}})
    uninterrupted_recorder = Recorder()
    uninterrupted = make_trainer(model_dir, tmp_path / "data", tmp_path / "uninterrupted", options,
                                 [uninterrupted_recorder])
    uninterrupted.train()
    half = 0.5 ** 0.9
    expected = [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [half, 1.0], [0.0, 1.0], [0.0, half], [0.0, 0.0], [0.0, 0.0]]
    for step, values in enumerate(expected):
        assert uninterrupted_recorder.probabilities[step] == pytest.approx(values), step
    # lr 1e-3, layer decay 0.5; the head warms up over iterations 0-1 and decays over 2-7 (6 steps), the ViT stays
    # at 0 until 2, warms up over 2-3 and decays over 4-7 (4 steps); blocks.2 at half the rate of blocks.3
    head = [0.0, 5e-4, 1e-3, 1e-3 * (5 / 6) ** 0.9, 1e-3 * (4 / 6) ** 0.9, 1e-3 * (3 / 6) ** 0.9,
            1e-3 * (2 / 6) ** 0.9, 1e-3 * (1 / 6) ** 0.9]
    last_block = [0.0, 0.0, 0.0, 5e-4, 1e-3, 1e-3 * 0.75 ** 0.9, 1e-3 * 0.5 ** 0.9, 1e-3 * 0.25 ** 0.9]
    assert head[3] == pytest.approx(8.4867e-4, rel=1e-4) and last_block[5] == pytest.approx(7.7189e-4, rel=1e-4)
    for step in range(8):
        rates = uninterrupted_recorder.iteration_learning_rates[step]
        assert rates["class_head.weight"] == pytest.approx(head[step], abs=1e-12), step
        assert rates["blocks.3.attention.qkv.weight"] == pytest.approx(last_block[step], abs=1e-12), step
        assert rates["blocks.2.mlp.fc1.weight"] == pytest.approx(last_block[step] / 2, abs=1e-12), step
    resumed_recorder = Recorder()
    resumed = make_trainer(model_dir, tmp_path / "data", tmp_path / "resumed", options, [resumed_recorder])
    resumed.train(checkpoint_path=str(tmp_path / "uninterrupted" / "iter_4"))
    assert resumed.iter == 8
    assert sorted(resumed_recorder.probabilities) == [4, 5, 6, 7]
    assert all(resumed_recorder.probabilities[step] == uninterrupted_recorder.probabilities[step]
               for step in range(4, 8))
    assert sorted(resumed_recorder.iteration_learning_rates) == [4, 5, 6, 7]
    for step in range(4, 8):
        rates = resumed_recorder.iteration_learning_rates[step]
        assert rates["class_head.weight"] == pytest.approx(head[step], abs=1e-12), step
        assert rates["blocks.3.attention.qkv.weight"] == pytest.approx(last_block[step], abs=1e-12), step
    # the masked attention's random draws included (the resumed run restores the RNG): the uninterrupted weights
    expected = load_model(tmp_path / "uninterrupted" / "output")[1].state_dict()
    actual = load_model(tmp_path / "resumed" / "output")[1].state_dict()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_a_resumed_run_continues_the_scaled_warm_up(tmp_path):
    model_dir = tiny_hf_eomt(tmp_path / "hf_eomt")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    # 30 iterations: warm-ups 30 // 30 = 1 and 30 // 15 = 2 steps; a checkpoint at 15
    options = {key: value for key, value in OPTIONS.items() if key != "train.mask_annealing"}
    options.update({"train.max_epochs": 30, "train.checkpoint.period": {"interval": 15, "by_epoch": False}})
    uninterrupted_recorder = Recorder()
    make_trainer(model_dir, tmp_path / "data", tmp_path / "uninterrupted", options, [uninterrupted_recorder]).train()
    resumed_recorder = Recorder()
    resumed = make_trainer(model_dir, tmp_path / "data", tmp_path / "resumed", options, [resumed_recorder])
    resumed.train(checkpoint_path=str(tmp_path / "uninterrupted" / "iter_15"))
    assert resumed.iter == 30 and sorted(resumed_recorder.iteration_learning_rates) == list(range(15, 30))
    # lr 1e-3: outside the ViT decaying over the 29 steps from 1, the ViT over the 27 steps from 3
    for step in (15, 29):
        rates = resumed_recorder.iteration_learning_rates[step]
        assert rates == uninterrupted_recorder.iteration_learning_rates[step], step
        assert rates["class_head.weight"] == pytest.approx(1e-3 * (1 - (step - 1) / 29) ** 0.9, abs=1e-15)
        assert rates["blocks.3.attention.qkv.weight"] == pytest.approx(1e-3 * (1 - (step - 3) / 27) ** 0.9,
                                                                       abs=1e-15)
    assert uninterrupted_recorder.iteration_learning_rates[2]["blocks.3.attention.qkv.weight"] == \
        pytest.approx(5e-4, abs=1e-15)  # the ViT half-way through its 2 warm-up steps
    expected = load_model(tmp_path / "uninterrupted" / "output")[1].state_dict()
    actual = load_model(tmp_path / "resumed" / "output")[1].state_dict()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_configuration_errors_surface_when_the_trainer_is_built(tmp_path):
    model_dir = tiny_hf_eomt(tmp_path / "hf_eomt")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    for overrides, message in (
            ({"train.optimizer.paramwise_options": {"backbone_lr_multiplier": 0.1}}, "layer_decay"),
            ({"train.augmentation": {"image_size": 128}}, "trains on its image_size 64"),
            ({"train.mask_annealing": {"starts": [0], "ends": [2]}}, "for the model's 2 query blocks"),
            ({"train.mask_annealing": {"starts": [3, 1], "ends": [2, 3]}}, "block 0 starts at 3"),
            ({"train.lr_scheduler": {"type": "EomtWarmupPolyLR", "warmup": [500]}}, "warmup must be two step"),
            ({"train.lr_scheduler": {"type": "EomtWarmupPolyLR", "options": {"by_epoch": True}}}, "by_epoch false"),
            ({"train.lr_scheduler": {"type": "EomtWarmupPolyLR", "cycles": 2}}, r"unknown train.lr_scheduler keys"),
            # the run has 2 iterations
            ({"train.lr_scheduler": {"type": "EomtWarmupPolyLR", "warmup": [1, 1]}},
             r"train.lr_scheduler.warmup \[1, 1\] \(2 steps\) does not end before the run of 2 iterations"),
            ({"train.lr_scheduler": {"type": "EomtWarmupPolyLR", "warmup": [500, 1000]}},
             r"warmup \[500, 1000\] \(1500 steps\) does not end before the run of 2 iterations")):
        with pytest.raises(TrainingConfigError, match=message):
            make_trainer(model_dir, tmp_path / "data", tmp_path / "work", dict(OPTIONS, **overrides))


def test_a_run_too_short_for_the_default_annealing_fails_when_the_trainer_is_built(tmp_path):
    model_dir = tiny_hf_eomt(tmp_path / "hf_eomt")
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    # 2 images in batches of 2 for 3 epochs: 3 iterations, fewer than the 2 query blocks + 2 the placement needs
    options = {key: value for key, value in OPTIONS.items() if key != "train.mask_annealing"}
    options["train.max_epochs"] = 3
    with pytest.raises(TrainingConfigError, match="3 iterations are too few to anneal 2 query blocks"):
        make_trainer(model_dir, tmp_path / "data", tmp_path / "work", options)
    options["train.max_epochs"] = 4  # 4 iterations: unit 1
    assert make_trainer(model_dir, tmp_path / "data", tmp_path / "work", options).iter == 0


def test_the_train_command_finetunes_an_eomt_folder(tmp_path):
    from modelscope_plugin.apps.cli import main

    model_dir = tiny_hf_eomt(tmp_path / "hf_eomt")
    # 4 iterations of one image: the default annealing's unit 4 // (2 + 2) = 1
    write_dataset(tmp_path / "data", "train", 4, seed=0, config=SceneConfig.scaled(64))
    write_dataset(tmp_path / "data", "val", 1, seed=1, config=SceneConfig.scaled(64))
    code = main(["train", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--work-dir",
                 str(tmp_path / "work"), "--epochs", "1", "--batch-size", "1", "--image-size", "64", "--workers", "0",
                 "--num-points", "64", "--min-scale", "1", "--max-scale", "1"])
    assert code == 0
    config, _ = load_model(tmp_path / "work" / "output")
    assert isinstance(config, EomtConfig) and config.category_ids == tuple(c.id for c in SYNTHETIC_CATEGORIES)
    report = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert report["task"] == "panoptic" and "PQ" in json.dumps(report["metrics"])


def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    from test_training import IterationRecorder, run_script

    model_dir = tiny_hf_eomt(tmp_path / "hf_eomt")
    write_dataset(tmp_path / "data", "train", 4, seed=0, config=SceneConfig.scaled(64))
    # 6 epochs of 2 global batches of 2 images: 12 iterations; the default annealing's unit 12 // (2 + 2) = 3, block 0
    # over [3, 6), block 1 over [6, 9), so queries keep their masks by per-image draws in between; warm-ups of 1
    # and 2 iterations; a checkpoint every 6 iterations
    options = {key: value for key, value in OPTIONS.items() if key != "train.mask_annealing"}
    options.update({"train.max_epochs": 6, "train.checkpoint.period": {"interval": 6, "by_epoch": False},
                    "train.lr_scheduler": {"type": "EomtWarmupPolyLR", "warmup": [1, 2],
                                           "options": {"by_epoch": False}}})
    recorder = IterationRecorder()
    one = make_trainer(model_dir, tmp_path / "data", tmp_path / "one", options, [recorder])
    one.train()
    assert one.iter == 12
    completed = run_script([model_dir, tmp_path / "data", tmp_path / "two",
                            json.dumps(dict(options, **{"train.dataloader.batch_size_per_gpu": 1}))],
                           launcher="pytorch")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"rank_{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["checksums"] == ranks[1]["checksums"]  # the ranks stayed in sync
    # both ranks anneal by the global iteration (12 iterations, not the 24 batches of one image a rank would count)
    two_thirds, one_third = (2 / 3) ** 0.9, (1 / 3) ** 0.9
    expected_probabilities = [[1.0, 1.0]] * 4 + [[two_thirds, 1.0], [one_third, 1.0], [0.0, 1.0],
                                                 [0.0, two_thirds], [0.0, one_third]] + [[0.0, 0.0]] * 3
    probabilities = [recorder.iterations[step]["probabilities"] for step in range(12)]
    assert probabilities == [pytest.approx(values, abs=1e-7) for values in expected_probabilities]
    for rank in ranks:
        assert sorted(rank["iterations"], key=int) == [str(step) for step in range(12)]
        assert [rank["iterations"][str(step)]["probabilities"] for step in range(12)] == probabilities
        assert [rank["iterations"][str(step)]["learning_rates"] for step in range(12)] == \
            [recorder.iterations[step]["learning_rates"] for step in range(12)]
    # one set of checkpoints and one output folder, written by rank 0
    checkpoints = sorted(path.name for path in (tmp_path / "two").iterdir() if path.name.startswith("iter_"))
    assert checkpoints == sorted(path.name for path in (tmp_path / "one").iterdir() if path.name.startswith("iter_"))
    assert {"iter_6", "iter_12"} <= {name.split("_trainer_state")[0] for name in checkpoints}

    _, expected_network = load_model(tmp_path / "one" / "output")
    _, actual_network = load_model(tmp_path / "two" / "output")
    expected, actual = expected_network.state_dict(), actual_network.state_dict()
    initial = load_model(model_dir)[1].state_dict()  # its class head is re-initialised for the scenes' classes
    movements = {key: (expected[key].double() - initial[key].double()).abs().max().item() for key in expected
                 if initial[key].shape == expected[key].shape}
    assert max(movements.values()) > 1e-4  # training moved the weights
    # the key bias (rows 64:128 of each fused qkv bias) shifts every attention logit of a query alike, so softmax
    # gives it a zero gradient; its computed gradient is rounding noise, which AdamW turns into lr-sized steps of
    # the noise's sign (1e-4 apart between the runs here): bounded by twice the steps' summed learning rates;
    # every other weight agrees
    key_biases = {key: actual[key][64:128] - expected[key][64:128] for key in expected if key.endswith("qkv.bias")}
    summed_rates = sum(max(recorder.iterations[step]["learning_rates"]) for step in range(12))
    assert len(key_biases) == 4
    assert max(bias.abs().max().item() for bias in key_biases.values()) < 2 * summed_rates
    for key in key_biases:
        expected[key], actual[key] = torch.cat([expected[key][:64], expected[key][128:]]), \
            torch.cat([actual[key][:64], actual[key][128:]])
    differences = {key: (expected[key].double() - actual[key].double()).abs().max().item() for key in expected}
    assert max(differences.values()) < 1e-5, max(differences, key=differences.get)
