"""Training building blocks: augmentation, targets, rank-independent batches, parameter groups, class head, checkpoints."""
import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.config import PreprocessConfig
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, write_dataset
from modelscope_plugin.errors import TrainingConfigError
from modelscope_plugin.training.checkpoint import portable_rng_state, restore_rng_state
from modelscope_plugin.training.class_head import adapt_class_head
from modelscope_plugin.training.config import AugmentationConfig, LossConfig, ParameterGroupConfig, settings_from
from modelscope_plugin.training.data import (
    GlobalBatchSampler,
    SegmentationTrainingDataset,
    TrainingDataError,
    build_target,
    contiguous_categories,
    large_scale_jitter,
)
from modelscope_plugin.training.optimizer import build_optimizer, parameter_groups


def test_jitter_flips_image_and_ids_together_and_pads():
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, :40] = 200  # left half bright
    ids = np.zeros((40, 80), np.int64)
    ids[:, :40] = 5
    config = AugmentationConfig(image_size=64, min_scale=1.0, max_scale=1.0, flip_probability=1.0, pad_value=128)
    image, id_map = large_scale_jitter(rgb, ids, config, np.random.default_rng(0))
    # 80 x 40 fits the 64 square at scale 0.8 -> 64 x 32, flipped: the bright half and id 5 on the right
    assert image.shape == (64, 64, 3) and id_map.shape == (64, 64)
    assert (image[:32, 34:64] == 200).all() and (image[:32, :30] == 0).all()
    assert (id_map[:32, 34:64] == 5).all() and (id_map[:32, :30] == 0).all()
    assert (image[32:] == 128).all() and (id_map[32:] == 0).all()


def test_jitter_scale_range_and_crop():
    rgb = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    ids = np.arange(100 * 100).reshape(100, 100)
    config = AugmentationConfig(image_size=64, min_scale=1.5, max_scale=2.0, flip_probability=0.0)
    for seed in range(5):
        image, id_map = large_scale_jitter(rgb, ids, config, np.random.default_rng(seed))
        assert image.shape == (64, 64, 3)
        # scaled up 1.5-2x and cropped: no padding, neighbouring ids stay neighbours
        assert (id_map > 0).sum() >= 64 * 64 - 1
        assert len(np.unique(id_map)) < 64 * 64



def test_jitter_crop_smaller_than_image_size_keeps_the_scale():
    # ids = row * 1000 + column, so a crop's ids give the scale and the offset it came from
    rows, columns = np.mgrid[:128, :128]
    ids = rows * 1000 + columns
    rgb = np.zeros((128, 128, 3), np.uint8)
    config = AugmentationConfig(image_size=128, crop_size=64, min_scale=1.0, max_scale=1.0, flip_probability=0.0)
    offsets = set()
    for seed in range(6):
        image, id_map = large_scale_jitter(rgb, ids, config, np.random.default_rng(seed))
        assert image.shape == (64, 64, 3) and id_map.shape == (64, 64)
        top, left = divmod(int(id_map[0, 0]), 1000)
        # scale 1 relative to image_size (128), not to the crop: a 64 x 64 window of the unscaled ids
        np.testing.assert_array_equal(id_map, ids[top:top + 64, left:left + 64])
        offsets.add(top)
    assert len(offsets) > 1  # the window moves
    with pytest.raises(ValueError, match="crop_size 48 is not a multiple of 32"):
        SegmentationTrainingDataset([], [], "panoptic", PreprocessConfig(), AugmentationConfig(image_size=64, crop_size=48))

def test_targets_per_task():
    ids = np.zeros((8, 8), np.int64)
    ids[:4, :4], ids[4:, :4], ids[:, 4:] = 1001, 1002, 5000
    ids[0, 0] = 2001
    segments = [{"id": 1001, "category_id": 1}, {"id": 1002, "category_id": 1}, {"id": 5000, "category_id": 5},
                {"id": 2001, "category_id": 2, "iscrowd": 1}, {"id": 3001, "category_id": 3}]  # 3001: cropped away
    class_index = {1: 0, 2: 1, 3: 2, 5: 3}
    panoptic = build_target(ids, segments, class_index, [1, 2, 3], "panoptic")
    assert panoptic.labels.tolist() == [0, 0, 3]  # crowd and empty segments dropped
    assert panoptic.masks.shape == (3, 8, 8) and panoptic.masks.sum().item() == 63
    assert build_target(ids, segments, class_index, [1, 2, 3], "instance").labels.tolist() == [0, 0]
    semantic = build_target(ids, segments, class_index, [1, 2, 3], "semantic")
    assert semantic.labels.tolist() == [0, 1, 3]  # one mask per class; crowd pixels keep their class
    assert semantic.masks[0].sum().item() == 31


def test_global_batches_do_not_depend_on_the_number_of_ranks():
    single = list(GlobalBatchSampler(10, 4, seed=3))
    split = [list(GlobalBatchSampler(10, 4, seed=3, rank=rank, world_size=2)) for rank in range(2)]
    assert len(single) == 2
    for step, batch in enumerate(single):
        assert sorted(split[0][step] + split[1][step], key=lambda item: item[1]) == batch
    sampler = GlobalBatchSampler(10, 4, seed=3)
    sampler.set_epoch(1, start_batch=1)
    other_epoch = list(sampler)
    assert len(other_epoch) == 1 and other_epoch[0] != single[1]
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(10, 3, seed=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(3, 4, seed=0)


def test_parameter_groups_follow_detectron2_mask2former():
    network = build_mask2former(tiny_config())
    rules = ParameterGroupConfig()
    groups = parameter_groups(network, lr=1e-4, weight_decay=0.05, rules=rules)
    assert groups[0]["lr"] == 1e-4 and groups[0]["weight_decay"] == 0.05
    setting = {name: (group["lr"], group["weight_decay"]) for group in groups for name in group["names"]}
    trainable = [name for name, parameter in network.named_parameters() if parameter.requires_grad]
    assert sorted(setting) == sorted(trainable)  # every trainable parameter exactly once
    assert setting["backbone.patch_embed.proj.weight"] == pytest.approx((1e-5, 0.05))
    assert setting["backbone.patch_embed.norm.weight"] == pytest.approx((1e-5, 0.0))
    assert setting["backbone.layers.0.blocks.0.attn.relative_position_bias_table"][1] == 0.0
    assert setting["transformer_decoder.query_feat.weight"] == (1e-4, 0.0)
    assert setting["transformer_decoder.level_embed.weight"] == (1e-4, 0.0)
    assert setting["pixel_decoder.transformer.level_embed"] == (1e-4, 0.05)  # an nn.Parameter, not an Embedding
    assert setting["transformer_decoder.class_embed.weight"] == (1e-4, 0.05)
    assert setting["transformer_decoder.decoder_norm.weight"] == (1e-4, 0.0)
    optimizer = build_optimizer(network, {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05, "betas": (0.9, 0.999)}, rules)
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == len(groups)
    with pytest.raises(ValueError, match="not a torch.optim optimizer"):
        build_optimizer(network, {"type": "Adamm", "lr": 1e-4}, rules)


def test_new_class_set_replaces_only_the_class_head():
    config = tiny_config(class_names=tuple(f"c{i}" for i in range(133)), category_ids=tuple(range(133)))
    network = build_mask2former(config)
    before = {key: value.clone() for key, value in network.state_dict().items()}
    categories = contiguous_categories([{"id": 9, "name": "sky", "isthing": 0}, {"id": 3, "name": "car", "isthing": 1}])
    assert [c.name for c in categories] == ["car", "sky"]  # things first
    new_config, message = adapt_class_head(config, network, categories, seed=0)
    assert new_config.num_things_classes == 1 and new_config.num_stuff_classes == 1
    assert new_config.class_names == ("car", "sky") and new_config.category_ids == (3, 9)
    assert "133 classes -> 2" in message
    after = network.state_dict()
    assert after["transformer_decoder.class_embed.weight"].shape == (3, 64)
    assert all(torch.equal(before[key], after[key]) for key in before if not key.startswith("transformer_decoder.class_embed"))
    assert adapt_class_head(new_config, network, categories, seed=0) == (new_config, None)


def test_unknown_settings_and_bad_rows_are_named(tmp_path):
    with pytest.raises(TrainingConfigError, match=r"unknown train.loss keys \['num_point'\]"):
        settings_from(LossConfig, {"num_point": 3}, "train.loss")
    # every wrong value in one error, each named with its key (before: a string reached the criterion mid-run)
    with pytest.raises(TrainingConfigError) as raised:
        settings_from(AugmentationConfig, {"image_size": "512", "flip_probability": True, "short_sides": [480, "x"]},
                      "train.augmentation")
    assert str(raised.value).split("; ") == [
        "train.augmentation.flip_probability = True is not of type float",
        "train.augmentation.image_size = '512' is not of type int",
        "train.augmentation.short_sides = [480, 'x'] is not a list of int values"]
    accepted = settings_from(AugmentationConfig, {"min_scale": 1, "short_sides": [480, 512]}, "train.augmentation")
    assert accepted.min_scale == 1.0 and isinstance(accepted.min_scale, float) and accepted.short_sides == (480, 512)
    split = write_dataset(tmp_path, "train", 1, seed=0, config=SceneConfig(image_size=64, max_thing_size=30))
    rows = split.panoptic_rows()
    things_only = contiguous_categories([c for c in SYNTHETIC_CATEGORIES if c.isthing])
    dataset = SegmentationTrainingDataset(rows, things_only, "panoptic", PreprocessConfig(), AugmentationConfig(image_size=64))
    with pytest.raises(TrainingDataError, match="training image 1: category ids .* are not in the training class set"):
        dataset[0]
    with pytest.raises(ValueError, match="not a multiple of 32"):
        SegmentationTrainingDataset(rows, things_only, "panoptic", PreprocessConfig(), AugmentationConfig(image_size=60))


def test_augmented_items_depend_on_seed_epoch_and_index_only(tmp_path):
    split = write_dataset(tmp_path, "train", 2, seed=0, config=SceneConfig(image_size=64, max_thing_size=30))
    categories = contiguous_categories(SYNTHETIC_CATEGORIES)
    make = lambda: SegmentationTrainingDataset(split.panoptic_rows(), categories, "panoptic", PreprocessConfig(),  # noqa: E731
                                               AugmentationConfig(image_size=64), seed=5)
    first, second = make(), make()
    torch.manual_seed(123)
    np.random.seed(123)
    assert torch.equal(first[1].image, second[1].image)
    second.set_epoch(1)
    assert not torch.equal(first[1].image, second[1].image)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = portable_rng_state()
    torch.save(state, tmp_path / "state.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(torch.load(tmp_path / "state.pth", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
