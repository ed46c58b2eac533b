"""Source layouts that need no oracle: EasyCV-format directories (and their pip-free loading), detectron2 names."""
import json
import re
import subprocess

import torch
from conftest import SHARED_DATA, shape_weights

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints import io as checkpoint
from modelscope_plugin.checkpoints import keymaps
from modelscope_plugin.config import Mask2FormerConfig, ResNetConfig


def small_resnet_config() -> Mask2FormerConfig:
    return Mask2FormerConfig(backbone=ResNetConfig(depth=50), num_queries=20, hidden_dim=64, num_heads=4, encoder_layers=1,
                             encoder_feedforward_dim=64, decoder_layers=2, decoder_feedforward_dim=64, source="easycv")


def to_detectron2_names(state_dict):
    """Independent inverse of the detectron2 map: torchvision ResNet -> detectron2 ResNet, heads under sem_seg_head."""
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue  # detectron2's FrozenBatchNorm2d has no counter
        key = re.sub(r"^backbone\.conv1\.", "backbone.stem.conv1.", key)
        key = re.sub(r"^backbone\.bn1\.", "backbone.stem.conv1.norm.", key)
        key = re.sub(r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.", key)
        key = re.sub(r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.", key)
        key = re.sub(r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.", key)
        key = re.sub(r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.", lambda m: f"backbone.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.", key)
        key = re.sub(r"^pixel_decoder\.", "sem_seg_head.pixel_decoder.", key)
        key = re.sub(r"^transformer_decoder\.", "sem_seg_head.predictor.", key)
        renamed[key] = value
    return renamed


def test_detectron2_layout_loads_into_the_same_network():
    torch.manual_seed(0)
    source = build_mask2former(small_resnet_config())
    target = build_mask2former(small_resnet_config())
    converted = keymaps.convert_to_native(to_detectron2_names(source.state_dict()))
    checkpoint.load_strict(target, converted, "model_final.pkl")
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, target.state_dict()[key]), key


def test_easycv_directory_builds_without_pip(tmp_path, monkeypatch):
    """The r50 card lists plugins: ["pai-easycv"]; ModelScope would pip-install it at every build."""
    torch.manual_seed(0)
    network = build_mask2former(small_resnet_config()).eval()
    shape_weights(network)  # plain random weights keep no query: the output would be empty
    state_dict = {re.sub(r"^pixel_decoder\.", "head.pixel_decoder.", re.sub(r"^transformer_decoder\.", "head.predictor.", key)): value
                  for key, value in network.state_dict().items()}
    torch.save({"state_dict": state_dict, "meta": {"easycv_version": "0.11.7"}}, tmp_path / "epoch_50.pt")
    tuple_of = lambda *values: {"__class__": "tuple", "__value__": list(values)}  # EasyCV's to_ms_config encoding
    (tmp_path / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "plugins": ["pai-easycv"], "preprocessor": {},
        "model": {"type": "r50-panoptic-segmentation", "backbone": {"type": "ResNet", "depth": 50},
                  "head": {"num_things_classes": 80, "num_stuff_classes": 53,
                           "pixel_decoder": {"conv_dim": 64, "mask_dim": 64, "transformer_enc_layers": 1,
                                             "transformer_dim_feedforward": 64, "transformer_nheads": 4},
                           "transformer_decoder": {"hidden_dim": 64, "num_queries": 20, "nheads": 4, "dim_feedforward": 64,
                                                   "dec_layers": 2, "mask_dim": 64}},
                  "test_cfg": {"panoptic_on": True, "max_per_image": 100, "filter_low_score": True}},
        "dataset": {"val": {"pipeline": [{"type": "MMMultiScaleFlipAug", "img_scale": tuple_of(1333, 800), "flip": False,
                                          "transforms": [{"type": "MMResize", "keep_ratio": True},
                                                         {"type": "MMNormalize", "mean": [123.675, 116.28, 103.53],
                                                          "std": [58.395, 57.12, 57.375], "to_rgb": True},
                                                         {"type": "MMPad", "size_divisor": 32}]}]}},
        "pipeline": {"type": "image-panoptic-segmentation-easycv",
                     "predictor_config": {"type": "Mask2formerPredictor", "task_mode": "panoptic"}}}))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args[0] if args else kwargs}")

    for name in ("run", "Popen", "check_call", "check_output", "call"):
        monkeypatch.setattr(subprocess, name, refuse)
    from modelscope.pipelines import pipeline

    segmenter = pipeline("image-segmentation", model=str(tmp_path), device="cpu")
    result = segmenter(str(SHARED_DATA / "coco" / "val2017" / "000000142238.jpg"))
    assert segmenter.config.num_queries == 20 and segmenter.config.hidden_dim == 64
    assert len(result["masks"]) > 0 and all(mask.shape == (427, 640) for mask in result["masks"])
