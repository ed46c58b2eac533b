"""Hugging Face EoMT folders (``config.json`` with ``model_type`` "eomt" + ``model.safetensors`` or
``pytorch_model.bin``) -> (EomtConfig, network with strictly loaded weights); the key table is
``checkpoints/eomt.py``.

Classes: 133 are taken as COCO panoptic (80 things then 53 stuff, COCO's category ids, task panoptic), 80 as COCO
things (task instance); any other count as that many classes with ids 0..K-1, all stuff, task semantic.
"""
import json
from pathlib import Path
from typing import Optional

from modelscope_plugin.builders import build_eomt
from modelscope_plugin.checkpoints.eomt import convert_hf_eomt
from modelscope_plugin.checkpoints.io import load_strict, read_checkpoint
from modelscope_plugin.config import EomtConfig, PreprocessConfig
from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES, COCO_THING_CATEGORIES
from modelscope_plugin.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def config_from_hf_eomt(values: dict) -> EomtConfig:
    """HF ``config.json`` of EomtForUniversalSegmentation -> this package's ``EomtConfig``."""
    if values.get("model_type") != "eomt":
        raise CheckpointError(f"config.json model_type {values.get('model_type')!r} is not 'eomt'")
    if values.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"EoMT activation {values['hidden_act']!r} is not supported (gelu)")
    image_size, patch_size = values.get("image_size", 640), values.get("patch_size", 16)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise CheckpointError(f"non-square image_size {image_size!r} / patch_size {patch_size!r} are not supported")
    id2label = {int(key): value for key, value in values.get("id2label", {}).items()}
    num_classes = len(id2label)
    if num_classes == len(COCO_PANOPTIC_CATEGORIES):
        categories, task, num_things = COCO_PANOPTIC_CATEGORIES, "panoptic", len(COCO_THING_CATEGORIES)
    elif num_classes == len(COCO_THING_CATEGORIES):
        categories, task, num_things = COCO_THING_CATEGORIES, "instance", num_classes
    else:
        categories, task, num_things = None, "semantic", 0
    category_ids = tuple(c.id for c in categories) if categories else tuple(range(num_classes))
    return EomtConfig(
        hidden_dim=values.get("hidden_size", 1024), num_layers=values.get("num_hidden_layers", 24),
        num_heads=values.get("num_attention_heads", 16), mlp_ratio=float(values.get("mlp_ratio", 4)),
        swiglu_mlp=bool(values.get("use_swiglu_ffn", False)), layer_norm_eps=values.get("layer_norm_eps", 1e-6),
        layer_scale_init=values.get("layerscale_value", 1.0), image_size=image_size, patch_size=patch_size,
        num_register_tokens=values.get("num_register_tokens", 4), num_query_blocks=values.get("num_blocks", 4),
        num_upscale_blocks=values.get("num_upscale_blocks", 2), num_queries=values.get("num_queries", 200),
        num_things_classes=num_things, num_stuff_classes=num_classes - num_things,
        class_names=tuple(id2label[index] for index in sorted(id2label)), category_ids=category_ids, task=task,
        preprocess=PreprocessConfig(short_side=image_size, long_side_max=image_size, size_divisor=image_size,
                                    resize_backend="pil", divide_by_std=True),
    )


def load_hf_eomt_dir(model_dir, task: Optional[str] = None):
    """(config, network) from a ``save_pretrained`` folder; weights strictly loaded."""
    model_dir = Path(model_dir)
    values = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    weights = next((model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has none of {', '.join(WEIGHT_FILES)}")
    config = config_from_hf_eomt(values)
    if task:
        config.task = task
    state_dict, _ = convert_hf_eomt(read_checkpoint(weights))
    network = build_eomt(config)
    load_strict(network, state_dict, checkpoint_name=str(weights))
    return config, network.eval()
