"""Pretraining (training.pretrain): per-pixel class maps from semantic targets, the backbone and pixel decoder learn a
repeated batch while the transformer decoder is untouched, the finetune script starts the query-based training from
the pretrained weights; the classification pretraining marks each thing of a scene with its label, pools each mask over
its own image, and a ResNet learns the things with trainable batch norm that is frozen again afterwards."""
from dataclasses import replace

import numpy as np
import torch

from modelscope_plugin.apps.demo import tiny_config
from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.config import ResNetConfig
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, write_dataset
from modelscope_plugin.model_dirs.load import load_model_dir
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


def test_scene_things_mark_each_visible_thing_with_its_label(tmp_path):
    from modelscope_plugin.data.datasets import load_panoptic_ground_truth
    from modelscope_plugin.inference.preprocess import load_image
    from modelscope_plugin.training.pretrain import scene_things

    split = write_dataset(tmp_path / "data", "train", 3, seed=0, config=SceneConfig.scaled(64))
    rows = split.panoptic_rows()
    scenes = scene_things(rows, CATEGORIES)
    thing_ids = [c["id"] for c in CATEGORIES if c["isthing"]]
    assert len(scenes) == len(rows)
    for row, scene in zip(rows, scenes):
        ids, segments = load_panoptic_ground_truth(row)
        assert np.array_equal(scene.image, load_image(row["image_path"]))
        visible = [s for s in segments if s["category_id"] in thing_ids and (ids == s["id"]).any()]
        assert len(scene.labels) == len(visible) > 0
        masks = scene.masks()[:, 0].bool().numpy()  # (K, H, W)
        for index, segment in enumerate(visible):
            assert np.array_equal(masks[index], ids == segment["id"])
            assert scene.labels[index] == thing_ids.index(segment["category_id"])
        assert not masks.any(0)[scene.thing_map == 0].any()
        flipped = scene.flipped()
        assert np.array_equal(flipped.masks()[:, 0].bool().numpy(), masks[:, :, ::-1])


def test_mask_pooled_logits_pool_each_mask_over_its_own_image():
    from modelscope_plugin.modeling.backbones.resnet import ResNet
    from modelscope_plugin.training.pretrain import mask_pooled_logits

    torch.manual_seed(0)
    backbone = ResNet(depth=18, width=8).eval()
    head = torch.nn.Linear(16 + 32 + 64, 4)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(3, 1, 64, 64)
    masks[0, 0, :20, :30] = 1
    masks[1, 0, 30:, 10:] = 1
    masks[2, 0, 5:50, 5:9] = 1
    image_index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        logits = mask_pooled_logits(backbone, head, images, masks, image_index)
        for index in range(3):
            features = backbone(images[image_index[index]][None])
            pooled = []
            for level in ("res3", "res4", "res5"):
                weights = torch.nn.functional.interpolate(masks[index][None], size=features[level].shape[-2:],
                                                          mode="area")
                pooled.append((features[level] * weights).sum((2, 3)) / weights.sum())
            torch.testing.assert_close(logits[index], head(torch.cat(pooled, 1))[0], rtol=1e-5, atol=1e-6)


def test_classification_pretraining_learns_the_things_trains_batch_norm_then_freezes_it(tmp_path):
    from modelscope_plugin.training.pretrain import pretrain_classification

    split = write_dataset(tmp_path / "data", "train", 2, seed=0, config=SceneConfig.scaled(64))
    config = replace(tiny_config(), backbone=ResNetConfig(depth=18, width=8), num_things_classes=4, num_stuff_classes=3)
    torch.manual_seed(0)
    network = build_mask2former(config)
    before = {name: value.clone() for name, value in network.state_dict().items()}
    losses = pretrain_classification(network, config.preprocess, split.panoptic_rows(), CATEGORIES, epochs=60,
                                     batch_size=2, lr=3e-3, seed=0, log_every=1000)
    assert sum(losses[-8:]) / 8 < 0.3 * sum(losses[:4]) / 4, losses
    after = network.state_dict()
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"backbone"}
    assert not torch.equal(before["backbone.bn1.running_var"], after["backbone.bn1.running_var"])
    assert not torch.equal(before["backbone.layer1.0.bn1.weight"], after["backbone.layer1.0.bn1.weight"])
    assert network.backbone.freeze_batch_norm and not network.backbone.bn1.weight.requires_grad
