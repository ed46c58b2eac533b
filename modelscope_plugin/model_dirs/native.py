"""This package's own model-directory layout: ``configuration.json`` model type "mask2former" whose
``model.config`` holds the fields of ``Mask2FormerConfig``, and ``pytorch_model.pt`` with ``{"state_dict": ...}`` in
this package's parameter names. Read by ``config_from_native``, written by ``write_model_dir``."""
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict

import torch

from modelscope_plugin.config import Mask2FormerConfig, ResNetConfig, SwinConfig


def config_from_native(values: Dict[str, Any], base: Mask2FormerConfig) -> Mask2FormerConfig:
    """This package's own ``configuration.json`` ``model.config``: the fields of ``Mask2FormerConfig`` (lists become
    tuples; ``check_config`` then checks every value)."""
    values = dict(values)
    backbone_values = dict(values.pop("backbone", {}))
    backbone_type = backbone_values.pop("type", "swin")
    backbone = SwinConfig(**{key: tuple(value) if isinstance(value, list) else value
                             for key, value in backbone_values.items()}) \
        if backbone_type == "swin" else ResNetConfig(**backbone_values)
    preprocess = replace(base.preprocess, **{key: tuple(value) if isinstance(value, list) else value
                                             for key, value in values.pop("preprocess", {}).items()})
    inference = replace(base.inference, **values.pop("inference", {}))
    for key in ("class_names", "category_ids"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    return replace(base, backbone=backbone, preprocess=preprocess, inference=inference, **values)


def write_model_dir(directory: Path, config, network) -> Path:
    """A model directory in this package's own layout (configuration.json type "mask2former" + pytorch_model.pt)."""
    values = asdict(config)
    values["backbone"]["type"] = "swin" if isinstance(config.backbone, SwinConfig) else "resnet"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "mask2former", "config": values},
        "pipeline": {"type": "mask2former-segmentation"}}, indent=2))
    torch.save({"state_dict": network.state_dict()}, directory / "pytorch_model.pt")
    return directory
