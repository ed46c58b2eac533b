"""EoMT training: the loss equals transformers' EomtForUniversalSegmentation loss (every query block's prediction
and the final one) on the same weights, inputs and random points; the masked-attention annealing schedule, the
layer-wise learning rates and the optimiser against hand-computed values."""
import numpy as np
import pytest
import torch
from conftest import run_oracle
from test_criterion import RecordingSampler, transformers_draw_order

from modelscope_plugin.builders import build_eomt
from modelscope_plugin.config import EomtConfig
from modelscope_plugin.modeling.criterion import Mask2FormerCriterion
from modelscope_plugin.modeling.matcher import HungarianMatcher, SegmentationTarget
from modelscope_plugin.model_dirs.load import load_model
from modelscope_plugin.training.eomt import (
    EomtTrainingConfig,
    anneal_masks,
    annealing_steps,
    build_eomt_optimizer,
    build_eomt_scheduler,
    eomt_parameter_groups,
    learning_rate_factor,
    mask_probability,
)


def tiny_network(**overrides):
    values = dict(hidden_dim=64, num_layers=4, num_heads=4, mlp_dim=256, image_size=64, patch_size=16,
                  num_register_tokens=2, num_query_blocks=2, num_queries=10, num_things_classes=3, num_stuff_classes=2)
    values.update(overrides)
    torch.manual_seed(0)
    return build_eomt(EomtConfig(**values))


def test_mask_probability_by_hand():
    # block annealing over steps [100, 200) with power 0.9
    assert mask_probability(0, 100, 200) == 1.0
    assert mask_probability(99, 100, 200) == 1.0
    assert mask_probability(100, 100, 200) == 1.0
    assert mask_probability(150, 100, 200) == pytest.approx(0.5358867312681466, abs=1e-12)  # 0.5 ** 0.9
    assert mask_probability(175, 100, 200) == pytest.approx(0.2871745887492587, abs=1e-12)  # 0.25 ** 0.9
    assert mask_probability(199, 100, 200) == pytest.approx(0.01 ** 0.9, abs=1e-12)
    assert mask_probability(200, 100, 200) == 0.0
    assert mask_probability(150, 100, 200, power=1.0) == 0.5
    with pytest.raises(ValueError, match="after its start"):
        mask_probability(0, 200, 100)


def test_annealing_steps_and_the_buffer_follow_the_blocks_in_turn():
    # 88716 steps (COCO, 12 epochs of 7393), 4 blocks: unit 88716 // 6 = 14786
    starts, ends = annealing_steps(88716, 4)
    assert starts == [14786, 29572, 44358, 59144] and ends == [29572, 44358, 59144, 73930]
    network = tiny_network(num_query_blocks=2)
    starts, ends = [10, 20], [20, 30]
    assert anneal_masks(network, 0, starts, ends) == [1.0, 1.0]
    values = anneal_masks(network, 15, starts, ends)
    assert values[0] == pytest.approx(0.5358867312681466, abs=1e-12) and values[1] == 1.0
    assert network.attention_mask_probabilities.tolist() == pytest.approx(values, abs=1e-7)
    assert anneal_masks(network, 25, starts, ends)[0] == 0.0
    assert anneal_masks(network, 30, starts, ends) == [0.0, 0.0]
    # annealed away: inference runs unmasked
    assert network.eval().masked_blocks() == [False, False]
    with pytest.raises(ValueError, match="2 query blocks"):
        anneal_masks(network, 0, [1], [2])


def test_given_mask_draws_decide_which_queries_keep_their_masks():
    from modelscope_plugin.training.eomt import mask_draw_seed, seeded_mask_draws

    network = tiny_network(num_query_blocks=2).train()
    network.attention_mask_probabilities.fill_(0.5)
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 64, 64)
    # the draws torch.rand would make, block by block: the same outputs
    torch.manual_seed(5)
    draws = torch.stack([torch.rand(2, 10), torch.rand(2, 10)], dim=1)
    torch.manual_seed(5)
    drawn_inside = network(pixels)
    given = network(pixels, mask_draws=draws)
    assert torch.equal(drawn_inside.mask_logits, given.mask_logits)
    assert torch.equal(drawn_inside.class_logits, given.class_logits)
    # draws of 1 exceed the probability 0.5 everywhere: no query keeps its mask, as if both blocks ran unmasked
    unmasked = network(pixels, mask_draws=torch.ones(2, 2, 10))
    network.attention_mask_probabilities.fill_(0.0)
    torch.testing.assert_close(unmasked.mask_logits, network(pixels).mask_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(given.mask_logits, unmasked.mask_logits, atol=1e-3)
    with pytest.raises(ValueError, match=r"mask_draws of shape \(2, 10\); expected \(batch 2, 2 query blocks, 10"):
        network(pixels, mask_draws=torch.rand(2, 10))
    # seeded per image: an image's draws do not depend on the batch it is in, and differ between images and steps
    one_batch = seeded_mask_draws([mask_draw_seed(7, 4, 0), mask_draw_seed(7, 4, 1)], 2, 10)
    assert torch.equal(one_batch[1:], seeded_mask_draws([mask_draw_seed(7, 4, 1)], 2, 10))
    assert not torch.equal(one_batch[0], one_batch[1])
    assert not torch.equal(one_batch[0], seeded_mask_draws([mask_draw_seed(7, 5, 0)], 2, 10)[0])


def test_layer_wise_learning_rates_and_adamw():
    network = tiny_network(num_layers=4)
    groups = eomt_parameter_groups(network, lr=1e-4, layer_decay=0.8, weight_decay=0.05)
    lr_of = {name: group["lr"] for group in groups for name in group["names"]}
    assert sorted(lr_of) == sorted(name for name, _ in network.named_parameters())  # each parameter once
    # block b of 4: 1e-4 * 0.8 ** (3 - b)
    expected_blocks = {3: 1e-4, 2: 8e-5, 1: 6.4e-5, 0: 5.12e-5}
    for name, lr in lr_of.items():
        if name.startswith("blocks."):
            assert lr == pytest.approx(expected_blocks[int(name.split(".")[1])], rel=1e-12), name
        elif name.startswith("embeddings."):
            assert lr == pytest.approx(5.12e-5, rel=1e-12), name
        else:
            assert lr == 1e-4, name
    for name in ("norm.weight", "queries.weight", "class_head.weight", "mask_head.fc1.weight",
                 "upscale_layers.0.transposed_conv.weight", "embeddings.position_embeddings",
                 "embeddings.register_tokens", "blocks.0.attention.qkv.weight"):
        assert name in lr_of, name
    # the heads (outside the ViT) first, then the ViT's groups: 1e-4 (final norm, block 3), 8e-5, 6.4e-5, 5.12e-5
    assert [(group["vit"], group["lr"]) for group in groups] == [
        (False, 1e-4), (True, 1e-4), (True, pytest.approx(8e-5)), (True, pytest.approx(6.4e-5)),
        (True, pytest.approx(5.12e-5))]
    assert "norm.weight" in groups[1]["names"] and "queries.weight" in groups[0]["names"]
    optimizer = build_eomt_optimizer(network, EomtTrainingConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["lr"] for group in optimizer.param_groups] == [group["lr"] for group in groups]
    assert all(group["weight_decay"] == 0.05 for group in optimizer.param_groups)
    network.queries.weight.requires_grad_(False)
    assert "queries.weight" not in {name for group in eomt_parameter_groups(network, 1e-4, 0.8, 0.05)
                                    for name in group["names"]}


def test_two_stage_warmup_and_polynomial_decay_by_hand():
    # 3000 steps, warm-up 500 (heads) then 1000 (ViT), power 0.9
    head = [learning_rate_factor(step, False, 3000) for step in (0, 250, 500, 1750, 3000)]
    assert head == pytest.approx([0.0, 0.5, 1.0, 0.5358867312681466, 0.0], abs=1e-12)
    vit = [learning_rate_factor(step, True, 3000) for step in (250, 499, 1000, 1500, 2250, 3000)]
    assert vit == pytest.approx([0.0, 0.0, 0.5, 1.0, 0.5358867312681466, 0.0], abs=1e-12)
    network = tiny_network()
    optimizer = build_eomt_optimizer(network, EomtTrainingConfig(lr=1e-4))
    scheduler = build_eomt_scheduler(optimizer, total_steps=3000)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0] * len(optimizer.param_groups)
    for _ in range(1000):
        optimizer.step()
        scheduler.step()
    # step 1000: heads decayed to (1 - 500 / 2500) ** 0.9 = 0.8 ** 0.9, the ViT half warmed up
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.8180521460508584, rel=1e-9)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.5e-4, rel=1e-9)
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.5 * 5.12e-5, rel=1e-9)


def random_targets(generator, batch_size, num_classes, size):
    """Per image 2-3 blob masks at the input size with random classes."""
    targets = []
    for count in (3, 2)[:batch_size]:
        masks = (torch.nn.functional.interpolate(torch.randn(count, 1, 8, 8, generator=generator), size=(size, size),
                                                 mode="bilinear", align_corners=False)[:, 0] > 0.3).float()
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        targets.append(SegmentationTarget(labels=labels, masks=masks))
    return targets


@pytest.mark.oracle
@pytest.mark.parametrize("probabilities", ["1,1", "1,0"])
def test_loss_equals_transformers_on_the_same_points(tmp_path, probabilities):
    """Our network in training mode with Mask2Former's criterion vs transformers' model computing its own loss:
    the same weights, pixels, targets and points (our draws handed to transformers in its call order: blocks first,
    the final prediction last). "1,0": the second query block is annealed away yet still predicts (deep
    supervision) in both."""
    num_points = 12544
    model_dir = tmp_path / "hf_eomt"
    run_oracle("eomt_oracle.py", "make", "--hidden-size", "64", "--layers", "4", "--heads", "4", "--image-size", "64",
               "--registers", "2", "--num-blocks", "2", "--queries", "12", "--labels", "5", "--seed", "1",
               "--attn-mask-probs", probabilities, "--out-dir", model_dir)
    config, network = load_model(model_dir)
    network.train()
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 64, 64, generator=generator)
    targets = random_targets(generator, 2, config.num_classes, 64)
    criterion = Mask2FormerCriterion(config.num_classes, HungarianMatcher(num_points=num_points),
                                     num_points=num_points)
    sampler = RecordingSampler([10, 20])
    output = network(pixels)
    assert len(output.auxiliary_mask_logits) == 2
    losses = criterion(output, targets, sampler)
    total = criterion.total(losses)
    # our stages: final, block 0, block 1; transformers': block 0, block 1, final (3 draws per image per stage)
    per_stage = 3 * 2
    log = sampler.log[per_stage:] + sampler.log[:per_stage]
    draws = transformers_draw_order(log, batch_size=2, num_stages=3)
    arrays = {"batch_size": 2, "num_draws": len(draws), "pixel_values": pixels.numpy()}
    for image, target in enumerate(targets):
        arrays[f"mask_labels_{image}"] = target.masks.numpy()
        arrays[f"class_labels_{image}"] = target.labels.numpy()
    for index, draw in enumerate(draws):
        arrays[f"draw_{index}"] = draw.numpy()
    np.savez(tmp_path / "inputs.npz", **arrays)
    run_oracle("eomt_oracle.py", "loss", "--model-dir", model_dir, "--inputs", tmp_path / "inputs.npz",
               "--result", tmp_path / "result.npz")
    reference = float(np.load(tmp_path / "result.npz")["loss"])
    assert abs(total.item() - reference) <= 1e-5 * reference, (total.item(), reference)
    # not degenerate: the stages' losses differ, so dropping or repeating one would show
    assert len({round(losses[f"loss_dice{suffix}"].item(), 4) for suffix in ("", "_0", "_1")}) == 3


def test_a_tiny_eomt_learns_a_repeated_batch_of_synthetic_scenes(tmp_path):
    """A tiny EoMT from random weights, 100 steps of the recipe (annealing, layer-wise rates, AdamW) on one
    repeated batch of 4 synthetic 64x64 scenes: the loss falls, and held-out scenes of another seed score a panoptic
    quality the untrained network does not reach (measured: untrained 0.0, trained 2.2 on held-out scenes)."""
    from dataclasses import replace

    from modelscope.metrics import build_metric

    from modelscope_plugin.data.datasets import read_coco_panoptic
    from modelscope_plugin.data.synthetic import SceneConfig, write_dataset
    from modelscope_plugin.modeling.point_sampling import PointSampler
    from modelscope_plugin.training.config import AugmentationConfig
    from modelscope_plugin.training.data import SegmentationTrainingDataset, collate, contiguous_categories
    from modelscope_plugin.training.eomt import training_step
    from modelscope_plugin.training.evaluation import evaluate_network
    from modelscope_plugin.training.finetune import dataset_categories

    size = 64
    train = write_dataset(tmp_path, "train", 4, seed=0, config=SceneConfig.scaled(size))
    held_out = write_dataset(tmp_path, "val", 8, seed=1, config=SceneConfig.scaled(size))
    categories = dataset_categories(train.panoptic_json)
    ordered = [c for c in categories if c["isthing"]] + [c for c in categories if not c["isthing"]]
    num_things = sum(c["isthing"] for c in categories)
    config = EomtConfig(hidden_dim=64, num_layers=4, num_heads=4, mlp_dim=128, image_size=size, patch_size=8,
                        num_register_tokens=0, num_query_blocks=2, num_queries=16, num_things_classes=num_things,
                        num_stuff_classes=len(ordered) - num_things, class_names=tuple(c["name"] for c in ordered),
                        category_ids=tuple(c["id"] for c in ordered))
    config = replace(config, preprocess=replace(config.preprocess, short_side=size, long_side_max=size,
                                                size_divisor=size))
    torch.manual_seed(0)
    network = build_eomt(config)
    rows, _ = read_coco_panoptic(str(train.panoptic_json), str(train.panoptic_folder), str(train.image_folder))
    held_out_rows, _ = read_coco_panoptic(str(held_out.panoptic_json), str(held_out.panoptic_folder),
                                          str(held_out.image_folder))
    dataset = SegmentationTrainingDataset(rows, contiguous_categories(ordered), "panoptic", config.preprocess,
                                          AugmentationConfig(image_size=size, min_scale=1.0, max_scale=1.0,
                                                             flip_probability=0.0), seed=0)
    batch = collate([(dataset[index], index) for index in range(len(dataset))])

    def held_out_pq():
        metric = build_metric({"type": "segmentation-panoptic-quality", "categories": ordered})
        return evaluate_network(network, config, held_out_rows, [metric], ["panoptic"], torch.device("cpu"),
                                thresholds={"panoptic": {"object_mask_threshold": 0.5}})["PQ"]

    untrained = held_out_pq()
    criterion = Mask2FormerCriterion(config.num_classes, HungarianMatcher(num_points=1024), num_points=1024)
    optimizer = build_eomt_optimizer(network, EomtTrainingConfig(lr=3e-4))
    steps, starts, ends = 100, [25, 50], [50, 75]
    losses = [training_step(network, criterion, optimizer, batch.images, batch.targets,
                            PointSampler.from_seeds([10 * step + image for image in range(4)]), step, starts, ends)
              for step in range(steps)]
    # annealed away by the end: the network runs unmasked, as a released checkpoint
    assert network.attention_mask_probabilities.tolist() == [0.0, 0.0]
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    trained = held_out_pq()
    print("held-out PQ untrained", untrained, "trained", trained)
    assert untrained < 0.5 and trained > 1.0 and trained > untrained + 1.0, (untrained, trained)


@pytest.mark.oracle
def test_a_transformers_eomt_in_the_hub_layout_trains_and_its_output_runs_in_transformers(tmp_path):
    """A transformers-written EoMT folder with a ModelScope configuration.json (the hub layout of
    model_cards/tue-mps) trains 2 iterations through the ModelScope trainer; transformers loads the output folder's
    HF files and gives the trained network's logits."""
    import json

    from modelscope.trainers import build_trainer

    from modelscope_plugin.data.datasets import as_ms_dataset
    from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, SyntheticSplit, write_dataset

    model_dir = tmp_path / "hf_eomt"
    run_oracle("eomt_oracle.py", "make", "--hidden-size", "64", "--layers", "4", "--heads", "4", "--image-size", "64",
               "--registers", "2", "--num-blocks", "2", "--queries", "12", "--labels", "5", "--seed", "0",
               "--out-dir", model_dir)
    (model_dir / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "eomt"},
        "pipeline": {"type": "image-panoptic-segmentation"}}))
    write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    trainer = build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=as_ms_dataset(SyntheticSplit(tmp_path / "data", "train").panoptic_rows()),
        work_dir=str(tmp_path / "work"), seed=3,
        categories=[{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES],
        cfg_options={"train.task": "panoptic", "train.max_epochs": 2, "train.loss": {"num_points": 64},
                     "train.preprocess": {"short_side": 64, "long_side_max": 64},
                     # annealed away from iteration 1 on: the saved network runs without masks, as transformers'
                     "train.mask_annealing": {"starts": [0, 0], "ends": [1, 1]},
                     "train.checkpoint.period": {"interval": 1, "by_epoch": False}}))
    trainer.train()
    network = trainer.unwrap_module(trainer.model).eval()
    assert network.attention_mask_probabilities.tolist() == [0.0, 0.0]
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels.numpy())
    run_oracle("eomt_oracle.py", "run", "--model-dir", tmp_path / "work" / "output", "--pixels",
               tmp_path / "pixels.npz", "--result", tmp_path / "result.npz")
    with torch.no_grad():
        output = network(pixels)
    with np.load(tmp_path / "result.npz") as reference:
        torch.testing.assert_close(output.class_logits, torch.from_numpy(reference["class_queries_logits"]),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(output.mask_logits, torch.from_numpy(reference["masks_queries_logits"]),
                                   rtol=1e-4, atol=1e-4)
