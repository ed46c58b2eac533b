"""``make demo``: segment the sample images and write overlays and JSON.

No trained weights ship yet, so the demo builds a small Mask2Former with seeded RANDOM weights (shaped so it
outputs several segments) in this package's model-directory layout and runs the real pipeline on it. Its
labels are meaningless; the point is the end-to-end path. Pass ``--model`` for a real model directory or hub id.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

SAMPLES = ["coco/val2017/000000142238.jpg", "coco/val2017/000000439180.jpg", "coco/val2017/000000039769.png",
           "photos/astronaut.png", "photos/mmdet_demo.jpg"]


def tiny_config():
    """A small Swin Mask2Former (133 COCO classes, 20 queries) for the demo and the unit tests."""
    from .config import Mask2FormerConfig, SwinConfig

    return Mask2FormerConfig(
        backbone=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.0),
        num_queries=20, hidden_dim=64, num_heads=4, encoder_layers=2, encoder_feedforward_dim=128, decoder_layers=3,
        decoder_feedforward_dim=128, task="panoptic")


def shape_random_weights(network, seed: int = 0) -> None:
    """Random weights with non-degenerate outputs (DESIGN.md's advice): distinct queries with confident, different
    classes (spread query features and class head, small decoder residual branches) and sparse masks (a constant
    mask-feature channel whose coefficient is a negative offset)."""
    generator = torch.Generator().manual_seed(seed)
    decoder = network.transformer_decoder
    with torch.no_grad():
        decoder.query_feat.weight.copy_(torch.randn(decoder.query_feat.weight.shape, generator=generator) * 2)
        for layer in decoder.transformer_cross_attention_layers:
            layer.multihead_attn.out_proj.weight.mul_(0.1)
        for layer in decoder.transformer_self_attention_layers:
            layer.self_attn.out_proj.weight.mul_(0.1)
        for layer in decoder.transformer_ffn_layers:
            layer.linear2.weight.mul_(0.1)
        decoder.class_embed.weight.copy_(torch.randn(decoder.class_embed.weight.shape, generator=generator) * 2.0)
        network.pixel_decoder.mask_features.weight[-1] = 0
        network.pixel_decoder.mask_features.bias[-1] = 1.0
        decoder.mask_embed.layers[-1].weight.mul_(4)
        decoder.mask_embed.layers[-1].weight[-1] = 0
        decoder.mask_embed.layers[-1].bias[-1] = -3.0


def write_model_dir(directory: Path, config, network) -> Path:
    """A model directory in this package's own layout (configuration.json type "mask2former" + pytorch_model.pt)."""
    from dataclasses import asdict

    from .config import SwinConfig

    values = asdict(config)
    values["backbone"]["type"] = "swin" if isinstance(config.backbone, SwinConfig) else "resnet"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "mask2former", "config": values},
        "pipeline": {"type": "mask2former-segmentation"}}, indent=2))
    torch.save({"state_dict": network.state_dict()}, directory / "pytorch_model.pt")
    return directory


def build_random_model_dir(directory: Path) -> Path:
    from .builders import build_mask2former

    config = tiny_config()
    torch.manual_seed(0)
    network = build_mask2former(config).eval()
    shape_random_weights(network)
    return write_model_dir(directory, config, network)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/demo", help="folder for overlays and JSON")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: a random-weight demo model)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    arguments = parser.parse_args(argv)

    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    from PIL import Image

    from . import visualization

    output = Path(arguments.output)
    output.mkdir(parents=True, exist_ok=True)
    model = arguments.model
    if model is None:
        model = str(build_random_model_dir(output / "random_weight_model").resolve())
        print("NOTE: no trained demo model ships yet; using a Mask2Former with RANDOM weights "
              f"({model}). Segments are real pipeline output, labels are meaningless.")
    segmenter = pipeline(Tasks.image_segmentation, model=model, device="cpu")
    for relative in SAMPLES:
        path = Path(arguments.data) / relative
        if not path.is_file():
            print(f"skipping missing sample {path}")
            continue
        result = segmenter(str(path))
        rgb = np.asarray(Image.open(path).convert("RGB"))
        stem = path.stem
        visualization.draw_overlay(rgb, result).save(output / f"{stem}_overlay.png")
        (output / f"{stem}.json").write_text(json.dumps(visualization.segments_to_json(result), indent=1))
        print(f"{path.name}: {len(result['masks'])} segments -> {output / (stem + '_overlay.png')}, {output / (stem + '.json')}")


if __name__ == "__main__":
    main()
