"""Dense pretraining (training.pretrain): per-pixel class maps from semantic targets, the backbone and pixel
decoder learn a repeated batch while the transformer decoder is untouched, and the finetune script starts the
query-based training from the pretrained weights."""
import torch

from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, write_dataset
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


def test_the_finetune_script_starts_from_the_densely_pretrained_weights(tmp_path, monkeypatch):
    import modelscope.trainers

    from modelscope_plugin.training.finetune import main

    started_from = []
    build_trainer = modelscope.trainers.build_trainer

    def recording_build_trainer(name, arguments):
        started_from.append(arguments["model"])
        return build_trainer(name, arguments)

    monkeypatch.setattr(modelscope.trainers, "build_trainer", recording_build_trainer)
    main(["--data", str(tmp_path / "data"), "--generate", "4", "--architecture", "tiny", "--work-dir", str(tmp_path / "work"),
          "--epochs", "1", "--batch-size", "2", "--image-size", "64", "--num-points", "64", "--workers", "0",
          "--pretrain-epochs", "1", "--evaluate-every", "5"])
    assert started_from == [str(tmp_path / "work" / "pretrained_model")]
    initial = torch.load(tmp_path / "work" / "initial_model" / "pytorch_model.pt", weights_only=True)["state_dict"]
    pretrained = torch.load(tmp_path / "work" / "pretrained_model" / "pytorch_model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(initial["backbone.patch_embed.proj.weight"], pretrained["backbone.patch_embed.proj.weight"])
    assert torch.equal(initial["transformer_decoder.query_feat.weight"], pretrained["transformer_decoder.query_feat.weight"])
