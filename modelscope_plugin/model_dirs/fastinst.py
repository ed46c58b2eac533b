"""FastInst model directories and checkpoints -> (FastInstConfig, network with strictly loaded weights).

Layouts:
- the hub (``damo/cv_resnet50_fast-instance-segmentation_coco``): ``configuration.json`` whose ``model`` carries
  ModelScope's ``FastInst`` constructor arguments (``backbone``, ``encoder``, ``decoder``, ``classes``,
  ``pretrained``) + ``pytorch_model.pt`` holding ``{"model": state_dict}`` with detectron2 names;
- the official FastInst releases (detectron2 ``.pth`` with the weights under ``model``), whose architecture is
  read from the weights' shapes.
This package's extension of the hub layout: ``model.backbone = {"type": "swin", <SwinConfig fields>}`` puts a Swin
backbone under FastInst (the small demo models); ModelScope's own FastInst cannot load those directories.
Weights are renamed by ``keymaps.DETECTRON2_RULES`` (the same table as detectron2 Mask2Former:
``sem_seg_head.pixel_decoder.*`` -> ``pixel_decoder.*``, ``sem_seg_head.predictor.*`` -> ``transformer_decoder.*``,
detectron2 ResNet -> torchvision ResNet) and loaded strictly.
"""
import json
import logging
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from modelscope_plugin.builders import build_fastinst
from modelscope_plugin.checkpoints.io import extract_state_dict, load_strict, read_checkpoint
from modelscope_plugin.checkpoints.keymaps import NATIVE_TO_DETECTRON2_RULES, convert_to_native, rename_keys
from modelscope_plugin.config import (
    FastInstConfig,
    PreprocessConfig,
    ResNetConfig,
    SwinConfig,
    fastinst_r50_d3_coco,
    fastinst_release,
)
from modelscope_plugin.data.categories import COCO_THING_CATEGORIES, default_category_ids, default_class_names
from modelscope_plugin.errors import CheckpointError, FastInstConfigError
from modelscope_plugin.model_dirs.configuration import check_config, reading_values
from modelscope_plugin.modeling.backbones.resnet import RESNET_BLOCKS
from modelscope_plugin.modeling.fastinst.model import FastInst

logger = logging.getLogger(__name__)

# official FastInst assigns its SetCriterion to the predictor, so releases also hold its class-weight buffer there
_FASTINST_NON_WEIGHT_KEYS = re.compile(r"^(sem_seg_head\.predictor\.)?criterion\.")


# configuration.json's name of each FastInstConfig field (for messages)
CONFIGURATION_NAMES = {
    "backbone": "model.backbone", "model.backbone.width": "model.backbone.stem_out_channels",
    "num_classes": "model.decoder.num_classes", "num_queries": "model.decoder.num_queries",
    "num_aux_queries": "model.decoder.num_aux_queries", "hidden_dim": "model.decoder.hidden_dim",
    "mask_dim": "model.decoder.mask_dim", "num_heads": "model.decoder.nheads",
    "feedforward_dim": "model.decoder.dim_feedforward", "decoder_layers": "model.decoder.dec_layers",
    "class_names": "model.classes", "category_ids": "model.category_ids", "preprocess": "model.preprocess",
}
# ModelScope arguments that are lists: (section, key, whether null is allowed)
LIST_ARGUMENTS = (("", "classes", True), ("", "category_ids", False), ("backbone", "out_features", False),
                  ("encoder", "in_features", False))


def _require(values: Mapping[str, Any], key: str, allowed, where: str) -> None:
    if key in values and values[key] not in allowed:
        raise FastInstConfigError(f"{where}.{key} = {values[key]!r} is not supported (supported: {allowed})")


def config_from_modelscope(model: Mapping[str, Any], base: FastInstConfig,
                           where: str = "configuration.json model") -> FastInstConfig:
    """ModelScope ``FastInst(backbone=..., encoder=..., decoder=..., classes=...)`` arguments over ``base``."""
    for section, key, nullable in LIST_ARGUMENTS:
        values = model.get(section, {}) if section else model
        if isinstance(values, Mapping) and key in values and not isinstance(values[key], list) \
                and not (nullable and values[key] is None):
            name = f"{section}.{key}" if section else key
            raise FastInstConfigError(f"{where}.{name} = {values[key]!r} is not a list")
    for section in ("backbone", "encoder", "decoder", "preprocess"):
        if not isinstance(model.get(section) or {}, Mapping):
            raise FastInstConfigError(f"{where}.{section} = {model[section]!r} is not an object")
    backbone = dict(model.get("backbone") or {})
    encoder = dict(model.get("encoder") or {})
    decoder = dict(model.get("decoder") or {})
    if backbone.get("type") == "swin":
        backbone_config = swin_from_values(backbone, f"{where}.backbone")
        backbone = {}
    else:
        backbone_config = resnet_from_values(backbone, base.backbone, f"{where}.backbone")
    _require(backbone, "num_groups", (1,), f"{where}.backbone")
    _require(backbone, "stride_in_1x1", (False,), f"{where}.backbone")
    _require(backbone, "res4_dilation", (1,), f"{where}.backbone")
    _require(backbone, "res5_dilation", (1,), f"{where}.backbone")
    _require(backbone, "norm", ("BN", "FrozenBN", "SyncBN", "nnSyncBN"), f"{where}.backbone")
    _require(encoder, "norm", ("GN",), f"{where}.encoder")
    _require(decoder, "pre_norm", (False,), f"{where}.decoder")
    if "out_features" in backbone and not {"res3", "res4", "res5"} <= set(backbone["out_features"]):
        raise FastInstConfigError(f"{where}.backbone.out_features must include res3, res4 and res5; "
                                  f"got {backbone['out_features']}")
    if "in_features" in encoder and sorted(encoder["in_features"]) != ["res3", "res4", "res5"]:
        raise FastInstConfigError(f"{where}.encoder.in_features must be res3, res4, res5; got {encoder['in_features']}")
    hidden_dim = decoder.get("hidden_dim", base.hidden_dim)
    if encoder.get("convs_dim", hidden_dim) != hidden_dim:
        raise FastInstConfigError(f"{where}: encoder.convs_dim ({encoder['convs_dim']}) must equal decoder.hidden_dim "
                                  f"({hidden_dim}); FastInst's queries are pixel-decoder features")
    classes = model.get("classes")
    config = replace(
        base,
        backbone=backbone_config,
        num_classes=decoder.get("num_classes", len(classes) if classes else base.num_classes),
        num_queries=decoder.get("num_queries", base.num_queries),
        num_aux_queries=decoder.get("num_aux_queries", base.num_aux_queries),
        hidden_dim=hidden_dim,
        mask_dim=decoder.get("mask_dim", base.mask_dim),
        num_heads=decoder.get("nheads", base.num_heads),
        feedforward_dim=decoder.get("dim_feedforward", base.feedforward_dim),
        decoder_layers=decoder.get("dec_layers", base.decoder_layers),
        class_names=tuple(classes) if classes else base.class_names,
    )
    if config.class_names and len(config.class_names) != config.num_classes:
        raise FastInstConfigError(f"{where}: {len(config.class_names)} classes for "
                                  f"decoder.num_classes = {config.num_classes}")
    return config


def resnet_from_values(values: Mapping[str, Any], base, where: str) -> ResNetConfig:
    """detectron2's ResNet arguments (``depth``, ``stem_out_channels``, ``width_per_group``, ``res2_out_channels``)
    -> ResNetConfig. One ``width`` scales the whole network, so the three channel counts must agree with it (the
    releases: 64, 64, 256); detectron2's ResNet-18/34 have res2 = stem channels."""
    _require(values, "depth", tuple(RESNET_BLOCKS), where)
    depth = values.get("depth", getattr(base, "depth", 50))
    width = values.get("stem_out_channels", getattr(base, "width", 64))
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise FastInstConfigError(f"{where}.stem_out_channels = {width!r} is not a whole number of at least 1")
    expected = {"stem_out_channels": width, "width_per_group": width,
                "res2_out_channels": width * (1 if depth < 50 else 4)}
    for key, value in expected.items():
        if key in values and values[key] != value:
            raise FastInstConfigError(f"{where}.{key} = {values[key]!r} does not fit a ResNet-{depth} of stem width "
                                      f"{width} (expected {value})")
    return ResNetConfig(depth=depth, width=width)


def swin_from_values(values: Mapping[str, Any], where: str) -> SwinConfig:
    """``{"type": "swin", <SwinConfig fields>}`` -> SwinConfig; unknown fields raise."""
    values = {key: value for key, value in values.items() if key != "type"}
    unknown = sorted(set(values) - set(SwinConfig.__dataclass_fields__))
    if unknown:
        raise FastInstConfigError(f"{where} has unknown Swin fields {unknown}")
    return SwinConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def backbone_section(backbone) -> Dict[str, Any]:
    """configuration.json ``model.backbone`` for a ResNet (ModelScope's arguments) or a Swin (this package's)."""
    if isinstance(backbone, SwinConfig):
        return {"type": "swin", **{key: list(value) if isinstance(value, tuple) else value
                                   for key, value in asdict(backbone).items()}}
    return {"out_features": ["res3", "res4", "res5"], "depth": backbone.depth, "num_groups": 1,
            "width_per_group": backbone.width, "norm": "BN", "stem_out_channels": backbone.width,
            "res2_out_channels": backbone.width * (1 if backbone.depth < 50 else 4), "stride_in_1x1": False,
            "res4_dilation": 1, "res5_dilation": 1, "res5_multi_grid": [1, 1, 1]}


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str) -> FastInstConfig:
    """The architecture of a detectron2-named FastInst state dict, read from its keys and shapes."""
    predictor = "sem_seg_head.predictor."
    try:
        num_layers = len({key.split(".")[3] for key in state_dict
                          if key.startswith(predictor + "transformer_query_ffn_layers.")})
        res4_blocks = len({key.split(".")[2] for key in state_dict if key.startswith("backbone.res4.")})
        class_head = state_dict[f"{predictor}class_embed_layers.{num_layers}.layers.2.weight"]
        mask_head = state_dict[f"{predictor}mask_features_layers.0.weight"]
        feedforward = state_dict[f"{predictor}transformer_query_ffn_layers.0.linear1.weight"]
        meta_position = state_dict[f"{predictor}meta_pos_embed"]
        aux = state_dict.get(f"{predictor}empty_query_features.weight")
    except KeyError as error:
        raise FastInstConfigError(f"{name} is not a FastInst checkpoint: it lacks {error}") from error
    depths = {6: 50, 23: 101}
    if res4_blocks not in depths:
        raise FastInstConfigError(f"{name}: a ResNet with {res4_blocks} res4 blocks is neither R50 nor R101")
    meta_size = meta_position.shape[-1]
    config = fastinst_release(depth=depths[res4_blocks], decoder_layers=num_layers)
    return replace(config, num_classes=class_head.shape[0] - 1, hidden_dim=class_head.shape[1],
                   mask_dim=mask_head.shape[0], feedforward_dim=feedforward.shape[0],
                   num_aux_queries=0 if aux is None else aux.shape[0],
                   # the meta position map is round(sqrt(queries)) wide: 100 queries (all releases) when it is 10 wide
                   num_queries=100 if meta_size == 10 else meta_size * meta_size)


def _with_categories(config: FastInstConfig, task: Optional[str]) -> FastInstConfig:
    return replace(config,
                   class_names=config.class_names or default_class_names(config.num_classes, COCO_THING_CATEGORIES),
                   category_ids=config.category_ids or default_category_ids(config.num_classes, COCO_THING_CATEGORIES),
                   task=task or config.task)


def _native_state_dict(checkpoint: Any, name: str) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{name} does not hold a state dict")
    state_dict = extract_state_dict(checkpoint)
    state_dict = {key: value for key, value in state_dict.items() if not _FASTINST_NON_WEIGHT_KEYS.match(key)}
    return convert_to_native(state_dict, "detectron2")


def finetuned_extras(config: FastInstConfig) -> Dict[str, Any]:
    """This package's additions to the hub configuration's ``model`` for a finetuned model (ModelScope's FastInst
    ignores them): the dataset id of each class and the test-time preprocessing it was trained for."""
    preprocess = {name: list(value) if isinstance(value, tuple) else value
                  for name, value in asdict(config.preprocess).items()}
    return {"category_ids": list(config.category_ids), "preprocess": preprocess}


def _with_finetuned_extras(model: Mapping[str, Any], config: FastInstConfig, where: str) -> FastInstConfig:
    if "category_ids" in model:
        if len(model["category_ids"]) != config.num_classes:
            raise FastInstConfigError(f"{where}.category_ids has {len(model['category_ids'])} ids "
                                      f"for {config.num_classes} classes")
        config = replace(config, category_ids=tuple(int(value) for value in model["category_ids"]))
    if "preprocess" in model:
        values = dict(model["preprocess"])
        unknown = sorted(set(values) - set(PreprocessConfig.__dataclass_fields__))
        if unknown:
            raise FastInstConfigError(f"{where}.preprocess has unknown keys {unknown}")
        config = replace(config, preprocess=PreprocessConfig(**{
            name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}))
    return config


def load_fastinst_dir(model_dir, configuration: Dict[str, Any],
                      task: Optional[str] = None) -> Tuple[FastInstConfig, FastInst]:
    """A hub-layout FastInst directory (configuration.json ``model.type`` = "fastinst" + pytorch_model.pt)."""
    model_dir = Path(model_dir)
    model = configuration.get("model", {})
    where = f"{model_dir}/configuration.json model"
    with reading_values(f"{model_dir}/configuration.json"):
        config = _with_finetuned_extras(model, config_from_modelscope(model, fastinst_r50_d3_coco(), where), where)
    check_config(config, f"{model_dir}/configuration.json", CONFIGURATION_NAMES)
    config = _with_categories(config, task)
    network = build_fastinst(config)
    if model.get("pretrained", True):
        weights_path = model_dir / "pytorch_model.pt"
        if not weights_path.is_file():
            raise CheckpointError(f"{model_dir} has no pytorch_model.pt (configuration.json model.pretrained is set)")
        state_dict = _native_state_dict(read_checkpoint(weights_path), str(weights_path))
        load_strict(network, state_dict, checkpoint_name=str(weights_path))
    else:
        logger.warning("%s: configuration.json model.pretrained is false, so (as ModelScope) no weights are loaded",
                       model_dir)
    return config, network.eval()


def is_fastinst_state_dict(checkpoint: Any) -> bool:
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
    return isinstance(state, Mapping) and any(str(key).startswith("sem_seg_head.predictor.query_proposal.")
                                              for key in state)


def load_fastinst_checkpoint(path, checkpoint: Optional[dict] = None,
                             task: Optional[str] = None) -> Tuple[FastInstConfig, FastInst]:
    """An official FastInst release file (``{"model": state_dict}``); architecture and test size from its weights."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    raw = extract_state_dict(checkpoint) if isinstance(checkpoint, dict) else {}
    config = _with_categories(config_from_state_dict(raw, str(path)), task)
    network = build_fastinst(config)
    load_strict(network, _native_state_dict(checkpoint, str(path)), checkpoint_name=str(path))
    return config, network.eval()


def hub_configuration(config: FastInstConfig) -> Dict[str, Any]:
    """``configuration.json`` of a hub-layout directory for ``config`` (ModelScope's FastInst arguments)."""
    return {
        "framework": "pytorch", "task": "image-segmentation", "pipeline": {"type": "fast-instance-segmentation"},
        "model": {
            "type": "fastinst", "pretrained": True, "classes": list(config.class_names) or None,
            "backbone": backbone_section(config.backbone),
            "encoder": {"in_features": ["res3", "res4", "res5"], "convs_dim": config.hidden_dim,
                        "mask_dim": config.mask_dim, "norm": "GN"},
            "decoder": {"num_classes": config.num_classes, "hidden_dim": config.hidden_dim,
                        "num_queries": config.num_queries,
                        "num_aux_queries": config.num_aux_queries, "nheads": config.num_heads,
                        "dim_feedforward": config.feedforward_dim, "dec_layers": config.decoder_layers,
                        "pre_norm": False, "mask_dim": config.mask_dim},
        },
    }


def write_hub_dir(directory, config: FastInstConfig, network: FastInst, finetuned: bool = False) -> Path:
    """Writes ``network`` as the hub publishes FastInst (configuration.json + pytorch_model.pt {"model": detectron2
    names}); refuses a directory that already holds either file, unless ``finetuned`` (the trainer's own output
    folder, rewritten at every checkpoint), which also records ``finetuned_extras``."""
    if config.num_groups != 32:
        raise FastInstConfigError("the hub layout has no GroupNorm group count; "
                                  f"ModelScope always uses 32, not {config.num_groups}")
    directory = Path(directory)
    for name in ("configuration.json", "pytorch_model.pt"):
        if (directory / name).exists() and not finetuned:
            raise FileExistsError(f"{directory / name} exists; nothing is overwritten")
    directory.mkdir(parents=True, exist_ok=True)
    configuration = hub_configuration(_with_categories(config, None))
    if finetuned:
        configuration["model"].update(finetuned_extras(_with_categories(config, None)))
    (directory / "configuration.json").write_text(json.dumps(configuration, indent=2), encoding="utf-8")
    state_dict = rename_keys(network.state_dict(), NATIVE_TO_DETECTRON2_RULES)
    torch.save({"model": state_dict}, directory / "pytorch_model.pt")
    return directory
