"""Pretraining (training.pretrain): per-pixel class maps from semantic targets, the backbone and pixel decoder learn a
repeated batch while the transformer decoder is untouched, the finetune script starts the query-based training from
the pretrained weights; the classification pretraining's windows hold each thing, centred, and a ResNet learns them
with trainable batch norm that is frozen again afterwards."""
from dataclasses import replace

import numpy as np
import torch

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.config import ResNetConfig
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, write_dataset
from modelscope_plugin.demo import tiny_config
from modelscope_plugin.model_dir import load_model_dir
from modelscope_plugin.modeling.matcher import SegmentationTarget
from modelscope_plugin.training.finetune import initial_model_dir
from modelscope_plugin.training.pretrain import IGNORE_INDEX, pretrain_dense, semantic_label_map

CATEGORIES = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES]


def test_semantic_label_map_paints_each_class_and_ignores_the_rest():
    masks = torch.zeros(2, 3, 4)
    masks[0, 0, :2] = 1
    masks[1, 2, 1:] = 1
    label_map = semantic_label_map([SegmentationTarget(torch.tensor([5, 2]), masks),
                                    SegmentationTarget(torch.tensor([], dtype=torch.int64), torch.zeros(0, 3, 4))], (3, 4))
    expected = torch.full((2, 3, 4), IGNORE_INDEX)
    expected[0, 0, :2] = 5
    expected[0, 2, 1:] = 2
    assert torch.equal(label_map, expected)


def test_dense_pretraining_learns_a_repeated_batch_and_leaves_the_decoder_untouched(tmp_path):
    split = write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    model_dir = initial_model_dir(tmp_path / "model", "tiny", CATEGORIES, 64, seed=0)
    config, network = load_model_dir(model_dir)
    before = {name: value.clone() for name, value in network.state_dict().items()}
    # the two images, no jitter or flip: every step sees the same batch
    augmentation = {"image_size": 64, "min_scale": 1.0, "max_scale": 1.0, "flip_probability": 0.0}
    losses = pretrain_dense(network, config.preprocess, split.panoptic_rows(), CATEGORIES, augmentation, epochs=40,
                            batch_size=2, lr=1e-3, seed=0, log_every=1000)
    assert len(losses) == 40
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    after = network.state_dict()
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"backbone", "pixel_decoder"}


def test_the_finetune_script_starts_from_the_pretrained_weights(tmp_path, monkeypatch):
    import modelscope.trainers

    from modelscope_plugin.training import pretrain
    from modelscope_plugin.training.finetune import main

    started_from, stages = [], []
    build_trainer = modelscope.trainers.build_trainer

    def recording_build_trainer(name, arguments):
        started_from.append(arguments["model"])
        return build_trainer(name, arguments)

    def recording(stage):
        function = getattr(pretrain, stage)

        def recorded(network, preprocess, rows, categories, *arguments, **keywords):
            stages.append((stage, len(rows)))
            return function(network, preprocess, rows, categories, *arguments, **keywords)
        return recorded

    monkeypatch.setattr(modelscope.trainers, "build_trainer", recording_build_trainer)
    monkeypatch.setattr(pretrain, "pretrain_classification", recording("pretrain_classification"))
    monkeypatch.setattr(pretrain, "pretrain_dense", recording("pretrain_dense"))
    main(["--data", str(tmp_path / "data"), "--generate", "4", "--architecture", "tiny", "--work-dir", str(tmp_path / "work"),
          "--epochs", "1", "--batch-size", "2", "--image-size", "64", "--num-points", "64", "--workers", "0",
          "--classification-pretrain-epochs", "1", "--pretrain-epochs", "1", "--evaluate-every", "5"])
    assert stages == [("pretrain_classification", 4), ("pretrain_dense", 4)]
    assert started_from == [str(tmp_path / "work" / "pretrained_model")]
    initial = torch.load(tmp_path / "work" / "initial_model" / "pytorch_model.pt", weights_only=True)["state_dict"]
    pretrained = torch.load(tmp_path / "work" / "pretrained_model" / "pytorch_model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(initial["backbone.patch_embed.proj.weight"], pretrained["backbone.patch_embed.proj.weight"])
    assert torch.equal(initial["transformer_decoder.query_feat.weight"], pretrained["transformer_decoder.query_feat.weight"])


def test_thing_windows_centre_each_thing_with_its_pixels_and_label(tmp_path):
    from modelscope_plugin.data.datasets import load_panoptic_ground_truth
    from modelscope_plugin.preprocessing import load_image
    from modelscope_plugin.training.pretrain import thing_windows

    split = write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    rows = split.panoptic_rows()
    window = 48
    crops, masks, labels = thing_windows(rows, CATEGORIES, window)
    thing_ids = [c["id"] for c in CATEGORIES if c["isthing"]]
    index = 0
    for row in rows:
        rgb, (ids, segments) = load_image(row["image_path"]), load_panoptic_ground_truth(row)
        for segment in segments:
            if segment["category_id"] not in thing_ids or not (ids == segment["id"]).any():
                continue
            ys, xs = np.nonzero(ids == segment["id"])
            window_ys, window_xs = np.nonzero(masks[index])
            # the visible box's centre is the window's centre (to the pixel), the mask and pixels are the thing's
            assert abs((window_ys.min() + window_ys.max() + 1) / 2 - window / 2) <= 0.5
            assert abs((window_xs.min() + window_xs.max() + 1) / 2 - window / 2) <= 0.5
            assert len(window_ys) == len(ys)
            offset_y, offset_x = ys.min() - window_ys.min(), xs.min() - window_xs.min()
            assert np.array_equal(crops[index][window_ys, window_xs], rgb[window_ys + offset_y, window_xs + offset_x])
            assert labels[index] == thing_ids.index(segment["category_id"])
            index += 1
    assert index == len(crops) == len(masks) == len(labels) > 4


def test_classification_pretraining_learns_the_things_trains_batch_norm_then_freezes_it(tmp_path):
    from modelscope_plugin.training.pretrain import pretrain_classification

    split = write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    config = replace(tiny_config(), backbone=ResNetConfig(depth=18, width=8), num_things_classes=4, num_stuff_classes=3)
    torch.manual_seed(0)
    network = build_mask2former(config)
    before = {name: value.clone() for name, value in network.state_dict().items()}
    losses = pretrain_classification(network, config.preprocess, split.panoptic_rows(), CATEGORIES, epochs=20,
                                     batch_size=4, lr=3e-3, seed=0, window=48, log_every=1000)
    assert sum(losses[-8:]) / 8 < 0.3 * sum(losses[:4]) / 4, losses
    after = network.state_dict()
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"backbone"}
    assert not torch.equal(before["backbone.bn1.running_var"], after["backbone.bn1.running_var"])
    assert not torch.equal(before["backbone.layer1.0.bn1.weight"], after["backbone.layer1.0.bn1.weight"])
    assert network.backbone.freeze_batch_norm and not network.backbone.bn1.weight.requires_grad
