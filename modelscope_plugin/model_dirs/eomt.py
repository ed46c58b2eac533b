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
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from modelscope_plugin.builders import build_eomt
from modelscope_plugin.checkpoints.eomt import convert_hf_eomt, to_hf_eomt
from modelscope_plugin.checkpoints.io import load_strict, read_checkpoint
from modelscope_plugin.config import EomtConfig, PreprocessConfig
from modelscope_plugin.data.categories import coco_split_of_count
from modelscope_plugin.errors import CheckpointError, ModelDirError
from modelscope_plugin.model_dirs.hf import read_hf_config, with_recorded_fields

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


CLASS_FIELDS = ("class_names", "category_ids", "num_things_classes", "num_stuff_classes", "task", "semantic_windows")
"""``EomtConfig`` fields a hub-layout ``configuration.json`` (``model.config``) records beside the HF files: what
``config.json``'s id2label cannot say (things / stuff, dataset ids, task), plus ``preprocess``."""


def hf_config_of_eomt(config: EomtConfig) -> Dict[str, Any]:
    """The HF ``config.json`` ``config_from_hf_eomt`` reads back as ``config``'s network."""
    values: Dict[str, Any] = {
        "architectures": ["EomtDinov3ForUniversalSegmentation" if config.rope_theta is not None
                          else "EomtForUniversalSegmentation"],
        "model_type": "eomt_dinov3" if config.rope_theta is not None else "eomt",
        "hidden_size": config.hidden_dim, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "hidden_act": "gelu", "layer_norm_eps": config.layer_norm_eps,
        "layerscale_value": config.layer_scale_init, "image_size": config.image_size,
        "patch_size": config.patch_size, "num_register_tokens": config.num_register_tokens,
        "num_blocks": config.num_query_blocks, "num_upscale_blocks": config.num_upscale_blocks,
        "num_queries": config.num_queries,
        "id2label": {str(index): name for index, name in enumerate(config.class_names)},
        "label2id": {name: index for index, name in enumerate(config.class_names)},
    }
    if config.rope_theta is not None:
        values.update(intermediate_size=config.mlp_dim, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": config.rope_theta},
                      **_DINOV3_FIXED)
    else:
        # transformers' EomtConfig types mlp_ratio as int
        ratio = config.mlp_dim // config.hidden_dim if config.mlp_dim % config.hidden_dim == 0 \
            else config.mlp_dim / config.hidden_dim
        values.update(mlp_ratio=ratio, use_swiglu_ffn=config.swiglu_mlp)
    return values


def write_hf_eomt_dir(directory, config: EomtConfig, network: torch.nn.Module) -> Path:
    """``network`` as a Hugging Face EoMT folder (``config.json`` + ``model.safetensors`` in HF key names), the
    inverse of ``load_hf_eomt_dir`` (which reads the classes from id2label alone)."""
    from safetensors.torch import save_file

    if config.num_classes != len(config.class_names):
        raise ModelDirError(f"{config.num_classes} classes but {len(config.class_names)} class names to write")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_values = hf_config_of_eomt(config)
    state_dict = to_hf_eomt(network.state_dict(), hf_values["model_type"])
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()},
              str(directory / WEIGHT_FILES[0]))
    (directory / "config.json").write_text(json.dumps(hf_values, indent=2), encoding="utf-8")
    return directory


def write_hub_eomt_dir(directory, config: EomtConfig, network: torch.nn.Module) -> Path:
    """``network`` as a hub-layout EoMT directory ``load_model`` / ``pipeline()`` read: the HF files
    (``config.json`` + ``model.safetensors``, HF key names) and a ``configuration.json`` of model type "eomt" whose
    ``model.config`` records the ``CLASS_FIELDS`` and preprocessing. Rewrites the files of an earlier write."""
    directory = write_hf_eomt_dir(directory, config, network)
    recorded = {key: value for key, value in asdict(config).items() if key in CLASS_FIELDS}
    recorded["preprocess"] = asdict(config.preprocess)
    (directory / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "eomt", "config": recorded},
        "pipeline": {"type": "mask2former-segmentation"}}, indent=2), encoding="utf-8")
    return directory


def load_hf_eomt_dir(model_dir, task: Optional[str] = None, configuration: Optional[Dict[str, Any]] = None):
    """(config, network) from a ``save_pretrained`` folder; weights strictly loaded. ``configuration``: the
    ``model.config`` of a hub-layout ``configuration.json`` beside the HF files (``hf.with_recorded_fields``)."""
    model_dir = Path(model_dir)
    values = read_hf_config(model_dir)
    config = config_from_hf_eomt(values)
    weights = next((model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has none of {', '.join(WEIGHT_FILES)}")
    split = read_split_image(model_dir)
    # by the checkpoint's own task, not a task asked for at load
    config.semantic_windows = config.task == "semantic" if split is None else split
    if configuration:
        config = with_recorded_fields(config, configuration, CLASS_FIELDS, model_dir, "EoMT")
    if task:
        config.task = task
    state_dict, _ = convert_hf_eomt(read_checkpoint(weights), values["model_type"])
    network = build_eomt(config)
    load_strict(network, state_dict, checkpoint_name=str(weights))
    return config, network.eval()


def is_eomt_dir(path) -> bool:
    """Whether ``path`` is an EoMT directory: hub layout (``configuration.json`` model type "eomt") or an HF folder
    (``config.json`` model_type of ``VARIANTS``)."""
    path = Path(path)
    if (path / "configuration.json").is_file():
        from modelscope_plugin.model_dirs.configuration import read_configuration_json

        return read_configuration_json(path).get("model", {}).get("type") == "eomt"
    return (path / "config.json").is_file() and read_hf_config(path).get("model_type") in VARIANTS
