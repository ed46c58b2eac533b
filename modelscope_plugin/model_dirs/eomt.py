"""Hugging Face EoMT folders (``config.json`` with ``model_type`` "eomt" (DINOv2) or "eomt_dinov3", plus
``model.safetensors`` or ``pytorch_model.bin``) -> (EomtConfig, network with strictly loaded weights); the key table
is ``checkpoints/eomt.py``.

The official DINOv3 EoMT weights are published as differences from DINOv3's own weights, which come under Meta's
DINOv3 licence: this package does not assemble them. Add the two with the official tue-mps/eomt scripts, convert the
result with transformers' EoMT-DINOv3 conversion and ``save_pretrained`` it; that folder loads here.

Classes: 133 are taken as COCO panoptic (80 things then 53 stuff, COCO's category ids, task panoptic), 80 as COCO
things (task instance); any other count as that many classes with ids 0..K-1, all stuff, task semantic.

Semantic inference runs on sliding windows (``EomtConfig.semantic_windows``) when the folder's
``preprocessor_config.json`` sets ``do_split_image``; without that file, when the task is semantic (the official
semantic checkpoints are trained and evaluated on windows).
"""
import json
from pathlib import Path
from typing import Optional

from modelscope_plugin.builders import build_eomt
from modelscope_plugin.checkpoints.eomt import convert_hf_eomt
from modelscope_plugin.checkpoints.io import load_strict, read_checkpoint
from modelscope_plugin.config import EomtConfig, PreprocessConfig
from modelscope_plugin.data.categories import coco_split_of_count
from modelscope_plugin.errors import CheckpointError
from modelscope_plugin.model_dirs.hf import read_hf_config

VARIANTS = ("eomt", "eomt_dinov3")
# DINOv3 options this package's blocks implement, with the value they must have
_DINOV3_FIXED = {"query_bias": True, "value_bias": True, "proj_bias": True, "mlp_bias": True, "use_gated_mlp": False}

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILE = "preprocessor_config.json"


def read_split_image(model_dir: Path) -> Optional[bool]:
    """``do_split_image`` of the folder's ``preprocessor_config.json`` (None: no such file or field)."""
    path = model_dir / PROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(values).__name__}")
    split = values.get("do_split_image")
    if split is not None and not isinstance(split, bool):
        raise CheckpointError(f"{path}: do_split_image must be true or false, not {split!r}")
    return split


def config_from_hf_eomt(values: dict) -> EomtConfig:
    """HF ``config.json`` of EomtForUniversalSegmentation -> this package's ``EomtConfig``."""
    variant = values.get("model_type")
    if variant not in VARIANTS:
        raise CheckpointError(f"config.json model_type {variant!r} is not one of {VARIANTS}")
    if values.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"EoMT activation {values['hidden_act']!r} is not supported (gelu)")
    image_size, patch_size = values.get("image_size", 640), values.get("patch_size", 16)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise CheckpointError(f"non-square image_size {image_size!r} / patch_size {patch_size!r} are not supported")
    hidden_dim = values.get("hidden_size", 1024)
    rope_theta = None
    if variant == "eomt_dinov3":
        for name, required in _DINOV3_FIXED.items():
            if values.get(name, required) != required:
                raise CheckpointError(f"EoMT-DINOv3 with {name}={values[name]!r} is not supported ({required})")
        rope = values.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"EoMT-DINOv3 RoPE type {rope['rope_type']!r} is not supported (default)")
        rope_theta = float(rope.get("rope_theta", 100.0))
        mlp_dim = values.get("intermediate_size", 4096)
    else:
        mlp_dim = int(hidden_dim * values.get("mlp_ratio", 4))
    id2label = {int(key): value for key, value in values.get("id2label", {}).items()}
    num_classes = len(id2label)
    category_ids, task, num_things = coco_split_of_count(num_classes)
    return EomtConfig(
        hidden_dim=hidden_dim, num_layers=values.get("num_hidden_layers", 24),
        num_heads=values.get("num_attention_heads", 16), mlp_dim=mlp_dim, rope_theta=rope_theta,
        swiglu_mlp=bool(values.get("use_swiglu_ffn", False)), layer_norm_eps=values.get("layer_norm_eps", 1e-6),
        layer_scale_init=values.get("layerscale_value", 1.0), image_size=image_size, patch_size=patch_size,
        num_register_tokens=values.get("num_register_tokens", 4), num_query_blocks=values.get("num_blocks", 4),
        num_upscale_blocks=values.get("num_upscale_blocks", 2), num_queries=values.get("num_queries", 200),
        num_things_classes=num_things, num_stuff_classes=num_classes - num_things,
        class_names=tuple(id2label[index] for index in sorted(id2label)), category_ids=category_ids, task=task,
        preprocess=PreprocessConfig(short_side=image_size, long_side_max=image_size, size_divisor=image_size,
                                    resize_backend="torchvision", divide_by_std=True, pad_black=True),
    )


def load_hf_eomt_dir(model_dir, task: Optional[str] = None):
    """(config, network) from a ``save_pretrained`` folder; weights strictly loaded."""
    model_dir = Path(model_dir)
    values = read_hf_config(model_dir)
    config = config_from_hf_eomt(values)
    weights = next((model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has none of {', '.join(WEIGHT_FILES)}")
    split = read_split_image(model_dir)
    # by the checkpoint's own task, not a task asked for at load
    config.semantic_windows = config.task == "semantic" if split is None else split
    if task:
        config.task = task
    state_dict, _ = convert_hf_eomt(read_checkpoint(weights), values["model_type"])
    network = build_eomt(config)
    load_strict(network, state_dict, checkpoint_name=str(weights))
    return config, network.eval()
