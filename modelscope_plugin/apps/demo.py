"""``make demo``: segment synthetic sample scenes and the sample photos; write overlays and JSON.

The demo models live in ``model_cards/demo/*`` once trained (a small Mask2Former for panoptic segmentation and a
small FastInst for instance segmentation, trained from random weights on the synthetic shapes of
``modelscope_plugin.data.synthetic``; their cards say how and what they reach). The demo writes a few new scenes
(a seed neither model was trained or evaluated on), segments them with each model and scores them against their
ground truth, then segments the sample photos: there the labels name synthetic shapes and textures, not objects.
``--model`` runs one model directory or hub id instead; without any trained model the demo falls back to a
Mask2Former with seeded RANDOM weights (real pipeline output, meaningless labels).
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from modelscope_plugin.inference.precision import APP_PRECISION, PRECISION_CHOICES
from modelscope_plugin.model_dirs.native import write_model_dir

REPOSITORY = Path(__file__).resolve().parents[2]
DEMO_MODELS = REPOSITORY / "model_cards" / "demo"
DEMO_TASKS = {"mask2former_synthetic-shapes": "panoptic", "fastinst_synthetic-shapes": "instance"}
SCENE_SEED = 2
"""The demo scenes' seed: the demo models were trained on seed 0 and evaluated on seed 1."""
NUM_SCENES = 4
SAMPLES = ["coco/val2017/000000142238.jpg", "coco/val2017/000000439180.jpg", "coco/val2017/000000039769.png",
           "photos/astronaut.png", "photos/mmdet_demo.jpg"]


def tiny_config():
    """A small Swin Mask2Former (133 COCO classes, 20 queries) for the demo and the unit tests."""
    from modelscope_plugin.config import Mask2FormerConfig, SwinConfig

    return Mask2FormerConfig(
        backbone=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                            drop_path_rate=0.0),
        num_queries=20, hidden_dim=64, num_heads=4, encoder_layers=2, encoder_feedforward_dim=128, decoder_layers=3,
        decoder_feedforward_dim=128, task="panoptic")


def shape_random_weights(network, seed: int = 0) -> None:
    """Random weights with non-degenerate outputs (plain random weights make every query alike and every mask cover
    the image): distinct queries with confident, different classes (spread query features and class head, small
    decoder residual branches) and sparse masks (a constant mask-feature channel whose coefficient is a negative
    offset)."""
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


def build_random_model_dir(directory: Path) -> Path:
    from modelscope_plugin.builders import build_mask2former

    config = tiny_config()
    torch.manual_seed(0)
    network = build_mask2former(config).eval()
    shape_random_weights(network)
    return write_model_dir(directory, config, network)


def shipped_demo_models() -> Dict[str, Tuple[Path, str]]:
    """name -> (model directory, task) of the trained demo models present in this checkout."""
    return {name: (DEMO_MODELS / name, task) for name, task in DEMO_TASKS.items()
            if (DEMO_MODELS / name / "pytorch_model.pt").is_file()}


def demo_scenes(folder: Path, count: int = NUM_SCENES, seed: int = SCENE_SEED, split_name: str = "scenes"):
    """``count`` 256 x 256 synthetic scenes of ``seed`` as split ``split_name`` under ``folder`` (written once, then
    reused): the demo's scenes by default, the demo models' held-out scenes with seed 1."""
    from modelscope_plugin.data.synthetic import SceneConfig, SyntheticSplit, write_dataset

    split = SyntheticSplit(folder, split_name)
    if not split.panoptic_json.is_file():
        write_dataset(folder, split_name, count, seed, SceneConfig.scaled(256))
    return split


def segment_images(segmenter, images: List[Path], output: Path) -> None:
    """Writes ``{stem}_overlay.png`` and ``{stem}.json`` into ``output`` for each image."""
    from PIL import Image

    from modelscope_plugin import visualization

    output.mkdir(parents=True, exist_ok=True)
    for path in images:
        result = segmenter(str(path))
        rgb = np.asarray(Image.open(path).convert("RGB"))
        visualization.draw_overlay(rgb, result).save(output / f"{path.stem}_overlay.png")
        (output / f"{path.stem}.json").write_text(json.dumps(visualization.segments_to_json(result), indent=1))
        print(f"  {path.name}: {len(result['masks'])} segments -> {output / (path.stem + '_overlay.png')}")


def score_scenes(model: Any, task: str, scenes, output: Path) -> Dict[str, Any]:
    """PQ (panoptic) or mask AP (instance) of ``model`` (a model directory, hub id or built pipeline) on synthetic
    ``scenes`` (a ``SyntheticSplit``)."""
    from modelscope_plugin.evaluation import evaluate

    if task == "panoptic":
        rows, annotation_file = scenes.panoptic_rows(), scenes.panoptic_json
    else:
        rows, annotation_file = scenes.instance_rows(), scenes.instances_json
    results = evaluate(model, rows, task, output_dir=str(output), annotation_file=str(annotation_file), progress=False)
    return {key: value for key, value in results.items() if key != "per_class"}


def score_summary(scores: Dict[str, Any]) -> str:
    """The headline numbers of ``score_scenes``: PQ / SQ / RQ (percent), or mask AP / AP50 / AP75 (COCO's fractions,
    shown in percent)."""
    if "PQ" in scores:
        return ", ".join(f"{key} {scores[key]:.1f}" for key in ("PQ", "SQ", "RQ"))
    mask = scores["segm"]
    return ", ".join(f"mask {key} {100 * mask[key]:.1f}" for key in ("AP", "AP50", "AP75"))


def main(argv=None) -> Dict[str, Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/demo", help="folder for overlays and JSON")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the shipped demo models)")
    parser.add_argument("--data", default=str(REPOSITORY.parent / "shared" / "data"),
                        help="folder of the sample photos")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=APP_PRECISION,
                        help="fp32, bf16, fp16 (CUDA) or auto (bf16 where the CPU has native bf16 units, else fp32); "
                             f"default {APP_PRECISION}")
    arguments = parser.parse_args(argv)

    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    output = Path(arguments.output)
    output.mkdir(parents=True, exist_ok=True)
    if arguments.model is not None:
        models = {Path(arguments.model).name or "model": (Path(arguments.model), None)}
    else:
        models = shipped_demo_models()
        if not models:
            directory = build_random_model_dir(output / "random_weight_model").resolve()
            print(f"NOTE: no trained demo model in {DEMO_MODELS}; "
                  f"using a Mask2Former with RANDOM weights ({directory}). "
                  "Segments are real pipeline output, labels are meaningless.")
            models = {"random_weight_model": (directory, None)}
    scenes = demo_scenes(output)
    photos = []
    for path in (Path(arguments.data) / relative for relative in SAMPLES):
        if path.is_file():
            photos.append(path)
        else:
            print(f"skipping missing sample {path}")
    scores = {}
    for name, (directory, task) in models.items():
        segmenter = pipeline(Tasks.image_segmentation, model=str(directory), device="cpu",
                             precision=arguments.precision)
        precision = getattr(getattr(segmenter, "predictor", None), "precision", arguments.precision)  # as resolved
        print(f"{name}: synthetic scenes (seed {SCENE_SEED}), precision {precision}")
        segment_images(segmenter, sorted(scenes.image_folder.glob("*.png")), output / name / "scenes")
        if task is not None:
            scores[name] = score_scenes(segmenter, task, scenes, output / name / "scores")
            print(f"  {task} scores on these {NUM_SCENES} scenes: {score_summary(scores[name])}")
        print(f"{name}: sample photos" + (" (a model trained on synthetic shapes only: its labels name shapes and "
                                          "textures, not the objects in the photos)" if task is not None else ""))
        segment_images(segmenter, photos, output / name / "photos")
    return scores


if __name__ == "__main__":
    main()
