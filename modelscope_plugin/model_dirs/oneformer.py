"""Hugging Face OneFormer folders (``config.json`` with ``model_type`` "oneformer", a Swin or DiNAT backbone, plus
``model.safetensors`` or ``pytorch_model.bin``; an optional ``preprocessor_config.json``) -> (OneFormerConfig,
network with strictly loaded weights); the key table is ``checkpoints/oneformer.py``.

Options the published models do not use and this package does not build are refused with the field's name
(pre-norm decoders, forced input projections, widths that differ between the pixel decoder and the decoders).
Classes: 133 are taken as COCO panoptic (80 things then 53 stuff, COCO's category ids, task panoptic), 80 as COCO
things (task instance); any other count as that many classes with ids 0..K-1, all stuff, task semantic (the
panoptic and instance post-processing here takes the things to be the first classes, which ADE20K's and
Cityscapes' orders are not); a configuration.json beside the HF files (``write_hub_oneformer_dir``, the trainer's
output) records the classes, dataset ids, task and preprocessing (``hf.with_recorded_fields``).
"""
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from modelscope_plugin.builders import build_oneformer
from modelscope_plugin.checkpoints.io import load_strict, read_checkpoint
from modelscope_plugin.checkpoints.oneformer import convert_hf_oneformer, to_hf_oneformer
from modelscope_plugin.config import (
    DinatConfig,
    OneFormerConfig,
    OneFormerTextMapperConfig,
    PreprocessConfig,
    SwinConfig,
)
from modelscope_plugin.data.categories import coco_split_of_count
from modelscope_plugin.errors import CheckpointError, ModelDirError
from modelscope_plugin.model_dirs.configuration import check_config
from modelscope_plugin.model_dirs.hf import read_hf_config, with_recorded_fields

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# config.json fields whose other values this package does not implement, with the value they must have
_FIXED = {"pre_norm": False, "enforce_input_proj": False, "norm": "GN", "common_stride": 4, "layer_norm_eps": 1e-5}
_FIXED_BACKBONE = {"patch_size": 4, "qkv_bias": True, "hidden_act": "gelu", "use_absolute_embeddings": False,
                   "layer_norm_eps": 1e-5}


def backbone_from_hf(values: dict):
    """The ``backbone_config`` of a OneFormer config.json -> SwinConfig or DinatConfig."""
    model_type = values.get("model_type")
    for name, required in _FIXED_BACKBONE.items():
        if values.get(name, required) != required:
            raise CheckpointError(f"backbone_config.{name} = {values[name]!r} is not supported ({required!r})")
    if model_type == "swin":
        return SwinConfig(embed_dim=values["embed_dim"], depths=tuple(values["depths"]),
                          num_heads=tuple(values["num_heads"]), window_size=values["window_size"],
                          mlp_ratio=float(values.get("mlp_ratio", 4.0)),
                          drop_path_rate=float(values.get("drop_path_rate", 0.3)))
    if model_type == "dinat":
        dilations = tuple(tuple(stage) for stage in values["dilations"])
        depths = tuple(values["depths"])
        if tuple(len(stage) for stage in dilations) != depths:
            raise CheckpointError(f"backbone_config.dilations {values['dilations']} do not give one dilation per "
                                  f"block of depths {list(depths)}")
        if values["kernel_size"] % 2 == 0:
            raise CheckpointError(f"backbone_config.kernel_size {values['kernel_size']} is even (odd kernels only)")
        return DinatConfig(embed_dim=values["embed_dim"], depths=depths, num_heads=tuple(values["num_heads"]),
                           kernel_size=values["kernel_size"], dilations=dilations,
                           mlp_ratio=float(values.get("mlp_ratio", 3.0)),
                           layer_scale_init=float(values.get("layer_scale_init_value", 0.0)),
                           drop_path_rate=float(values.get("drop_path_rate", 0.1)))
    raise CheckpointError(f"backbone_config.model_type {model_type!r} is not supported (swin or dinat)")


def preprocess_from_hf(model_dir: Path) -> PreprocessConfig:
    """OneFormerImageProcessor's resizing and normalisation, from ``preprocessor_config.json`` where there is one
    (else the processor's defaults: short side 800, long side at most 1333, ImageNet mean and std)."""
    preprocess = OneFormerConfig().preprocess
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return preprocess
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        size = values.get("size") or {}
        if "shortest_edge" in size:
            preprocess.short_side = int(size["shortest_edge"])
            preprocess.long_side_max = int(size.get("longest_edge") or values.get("max_size") or 1333)
        if "image_mean" in values:
            preprocess.mean = tuple(255.0 * float(value) for value in values["image_mean"])
            preprocess.std = tuple(255.0 * float(value) for value in values["image_std"])
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path} cannot be read as OneFormer preprocessing ({type(error).__name__}: "
                              f"{error})") from error
    return preprocess


def config_from_hf_oneformer(values: dict, preprocess: PreprocessConfig) -> OneFormerConfig:
    """HF ``config.json`` of OneFormerForUniversalSegmentation -> this package's ``OneFormerConfig``."""
    for name, required in _FIXED.items():
        if values.get(name, required) != required:
            raise CheckpointError(f"OneFormer {name} = {values[name]!r} is not supported ({required!r})")
    hidden_dim = values.get("hidden_dim", 256)
    for name in ("conv_dim", "mask_dim"):
        if values.get(name, 256) != hidden_dim:
            raise CheckpointError(f"OneFormer {name} = {values[name]!r} differs from hidden_dim {hidden_dim} "
                                  "(one width throughout is supported)")
    id2label = {int(key): value for key, value in values.get("id2label", {}).items()}
    num_classes = len(id2label)
    category_ids, task, num_things = coco_split_of_count(num_classes)
    return OneFormerConfig(
        backbone=backbone_from_hf(values.get("backbone_config") or {}), num_things_classes=num_things,
        num_stuff_classes=num_classes - num_things, num_queries=values.get("num_queries", 150), hidden_dim=hidden_dim,
        num_heads=values.get("num_attention_heads", 8), encoder_layers=values.get("encoder_layers", 6),
        encoder_feedforward_dim=values.get("encoder_feedforward_dim", 1024),
        # HF's decoder_layers counts the prediction before the first layer
        decoder_layers=values.get("decoder_layers", 10) - 1,
        decoder_feedforward_dim=values.get("dim_feedforward", 2048),
        query_transformer_layers=values.get("query_dec_layers", 2), task_seq_len=values.get("task_seq_len", 77),
        use_task_norm=values.get("use_task_norm", True),
        class_names=tuple(id2label[index] for index in sorted(id2label)),
        category_ids=category_ids, task=task,
        preprocess=preprocess,
        text_mapper=OneFormerTextMapperConfig(
            context_length=values.get("text_encoder_context_length", 77),
            width=values.get("text_encoder_width", 256), num_layers=values.get("text_encoder_num_layers", 6),
            vocab_size=values.get("text_encoder_vocab_size", 49408),
            projector_layers=values.get("text_encoder_proj_layers", 2),
            num_context=values.get("text_encoder_n_ctx", 16)) if values.get("is_training", False) else None,
    )


def load_hf_oneformer_dir(model_dir, task: Optional[str] = None, configuration: Optional[Dict[str, Any]] = None):
    """(config, network) from a ``save_pretrained`` folder; weights strictly loaded. ``configuration``: the
    ``model.config`` of a hub-layout ``configuration.json`` beside the HF files (``hf.with_recorded_fields``)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    values = read_hf_config(model_dir)
    try:
        config = config_from_hf_oneformer(values, preprocess_from_hf(model_dir))
    except CheckpointError as error:
        raise CheckpointError(f"{config_path}: {error}") from error
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{config_path} lacks or mistypes a OneFormer field ({type(error).__name__}: "
                              f"{error})") from error
    if configuration:
        config = with_recorded_fields(config, configuration, CLASS_FIELDS, model_dir, "OneFormer")
    if task:
        config.task = task
    check_config(config, str(config_path))
    weights = next((model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has none of {', '.join(WEIGHT_FILES)}")
    state_dict, _ = convert_hf_oneformer(read_checkpoint(weights), values["backbone_config"]["model_type"],
                                         keep_text_mapper=config.text_mapper is not None)
    network = build_oneformer(config)
    load_strict(network, state_dict, checkpoint_name=str(weights))
    return config, network.eval()


CLASS_FIELDS = ("class_names", "category_ids", "num_things_classes", "num_stuff_classes", "task")
"""``OneFormerConfig`` fields a hub-layout ``configuration.json`` (``model.config``) records beside the HF files: what
``config.json``'s id2label cannot say (things / stuff, dataset ids, task), plus ``preprocess``."""


def hf_backbone_config(backbone) -> Dict[str, Any]:
    """SwinConfig / DinatConfig -> the ``backbone_config`` of a OneFormer config.json (``backbone_from_hf``'s
    inverse, with the fixed fields transformers needs to build the backbone)."""
    stages = [f"stage{index + 1}" for index in range(len(backbone.depths))]
    values: Dict[str, Any] = {"embed_dim": backbone.embed_dim, "depths": list(backbone.depths),
                              "num_heads": list(backbone.num_heads), "mlp_ratio": backbone.mlp_ratio,
                              "drop_path_rate": backbone.drop_path_rate, "out_features": stages,
                              "out_indices": list(range(1, len(stages) + 1)), **_FIXED_BACKBONE}
    if isinstance(backbone, SwinConfig):
        values.update(model_type="swin", window_size=backbone.window_size)
    else:
        values.update(model_type="dinat", kernel_size=backbone.kernel_size,
                      dilations=[list(stage) for stage in backbone.dilations],
                      layer_scale_init_value=backbone.layer_scale_init)
    return values


def hf_config_of_oneformer(config: OneFormerConfig) -> Dict[str, Any]:
    """The HF ``config.json`` ``config_from_hf_oneformer`` reads back as ``config``'s network (``is_training`` and
    the ``text_encoder_*`` fields when it has a text mapper)."""
    values: Dict[str, Any] = {
        "architectures": ["OneFormerForUniversalSegmentation"], "model_type": "oneformer",
        "backbone_config": hf_backbone_config(config.backbone), **_FIXED,
        "hidden_dim": config.hidden_dim, "conv_dim": config.hidden_dim, "mask_dim": config.hidden_dim,
        "num_queries": config.num_queries, "num_attention_heads": config.num_heads,
        "encoder_layers": config.encoder_layers, "encoder_feedforward_dim": config.encoder_feedforward_dim,
        "decoder_layers": config.decoder_layers + 1, "dim_feedforward": config.decoder_feedforward_dim,
        "query_dec_layers": config.query_transformer_layers, "task_seq_len": config.task_seq_len,
        "use_task_norm": config.use_task_norm,
        "id2label": {str(index): name for index, name in enumerate(config.class_names)},
        "label2id": {name: index for index, name in enumerate(config.class_names)},
        "is_training": config.text_mapper is not None,
    }
    mapper = config.text_mapper
    if mapper is not None:
        values.update(text_encoder_context_length=mapper.context_length, text_encoder_width=mapper.width,
                      text_encoder_num_layers=mapper.num_layers, text_encoder_vocab_size=mapper.vocab_size,
                      text_encoder_proj_layers=mapper.projector_layers, text_encoder_n_ctx=mapper.num_context)
    return values


def write_hf_oneformer_dir(directory, config: OneFormerConfig, network: torch.nn.Module,
                           logit_scale: Optional[torch.Tensor] = None) -> Path:
    """``network`` as a Hugging Face OneFormer folder (``config.json`` + ``model.safetensors`` in HF key names, the
    text mapper included when there is one, ``preprocessor_config.json`` with the resizing and normalisation), the
    inverse of ``load_hf_oneformer_dir`` (which reads the classes from id2label alone). ``logit_scale``: the
    contrastive loss's learned scale, saved as transformers' ``criterion.logit_scale``."""
    from safetensors.torch import save_file

    if config.num_classes != len(config.class_names):
        raise ModelDirError(f"{config.num_classes} classes but {len(config.class_names)} class names to write")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_values = hf_config_of_oneformer(config)
    state_dict = to_hf_oneformer(network.state_dict(), hf_values["backbone_config"]["model_type"])
    if isinstance(config.backbone, SwinConfig):
        # SwinModel's final LayerNorm, which the backbone never applies (dropped when read): its initial values
        width = config.backbone.embed_dim * 2 ** (len(config.backbone.depths) - 1)
        state_dict["model.pixel_level_module.encoder.swin.layernorm.weight"] = torch.ones(width)
        state_dict["model.pixel_level_module.encoder.swin.layernorm.bias"] = torch.zeros(width)
    if logit_scale is not None:
        state_dict["criterion.logit_scale"] = logit_scale.detach().reshape(())
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in state_dict.items()},
              str(directory / WEIGHT_FILES[0]))
    (directory / "config.json").write_text(json.dumps(hf_values, indent=2), encoding="utf-8")
    preprocess = config.preprocess
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "OneFormerImageProcessor",
        "size": {"shortest_edge": preprocess.short_side, "longest_edge": preprocess.long_side_max},
        "image_mean": [value / 255.0 for value in preprocess.mean],
        "image_std": [value / 255.0 for value in preprocess.std]}, indent=2), encoding="utf-8")
    return directory


def write_hub_oneformer_dir(directory, config: OneFormerConfig, network: torch.nn.Module,
                            logit_scale: Optional[torch.Tensor] = None) -> Path:
    """``network`` as a hub-layout OneFormer directory ``load_model`` / ``pipeline()`` read: the HF files
    (``write_hf_oneformer_dir``) and a ``configuration.json`` of model type "oneformer" whose ``model.config``
    records the ``CLASS_FIELDS`` and preprocessing. Rewrites the files of an earlier write."""
    directory = write_hf_oneformer_dir(directory, config, network, logit_scale)
    recorded = {key: value for key, value in asdict(config).items() if key in CLASS_FIELDS}
    recorded["preprocess"] = asdict(config.preprocess)
    (directory / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "oneformer", "config": recorded},
        "pipeline": {"type": "mask2former-segmentation"}}, indent=2), encoding="utf-8")
    return directory
