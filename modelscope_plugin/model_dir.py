"""Model directories as the hub publishes them -> (configuration, network with strictly loaded weights).

Layouts:
- mmdet 2.x (the Swin-L ids): ``configuration.json`` + ``config.py`` (panoptic) or ``mmcv_config.py`` (semantic) +
  ``pytorch_model.pt`` holding ``state_dict`` (``backbone.*``, ``panoptic_head.*``) and ``meta.CLASSES``.
- EasyCV (the r50 id): ``configuration.json`` in EasyCV's ``to_ms_config`` format + exactly one ``*.pt``;
  EasyCV's ``mask2former_*_export.pth`` files too.
- detectron2 Mask2Former releases (``model_final_*.pkl``), Hugging Face folders (``config.json`` + safetensors).
The directory's own config wins over this repository's defaults; class names come from the checkpoint when it has them.
"""
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import checkpoint as checkpoint_io
from .builders import build_mask2former
from .config import (InferenceConfig, Mask2FormerConfig, PreprocessConfig, ResNetConfig, SwinConfig, fastinst_r50_d3_coco,
                     resnet50_coco_panoptic, swin_large_coco_panoptic, swin_large_coco_semantic)
from .data.categories import COCO_PANOPTIC_CATEGORIES, MMDET_COCO_PANOPTIC_CLASSES
from .mmcv_config import read_mmcv_config
from .modeling.mask2former.model import Mask2Former

# configuration.json model types this package runs, and the defaults each starts from
MODEL_TYPES = {
    "swinL-panoptic-segmentation": swin_large_coco_panoptic,
    "swinL-semantic-segmentation": swin_large_coco_semantic,
    "r50-panoptic-segmentation": resnet50_coco_panoptic,
    "mask2former": swin_large_coco_panoptic,
    "fastinst": fastinst_r50_d3_coco,
}


class ModelDirError(ValueError):
    """A model directory is missing files or holds a layout this package cannot run."""


def read_configuration_json(model_dir: Path) -> Dict[str, Any]:
    path = model_dir / "configuration.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no configuration.json")
    try:
        return decode_easycv_tuples(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise ModelDirError(f"{path} is not valid JSON: {error}") from error


def decode_easycv_tuples(value):
    """EasyCV's ``to_ms_config`` writes tuples as {"__class__": "tuple", "__value__": [...]}."""
    if isinstance(value, dict):
        if value.get("__class__") == "tuple" and "__value__" in value:
            return tuple(decode_easycv_tuples(item) for item in value["__value__"])
        return {key: decode_easycv_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_easycv_tuples(item) for item in value]
    return value


def _find_pipeline_step(pipeline: List[dict], *types: str) -> Optional[dict]:
    for step in pipeline or []:
        if not isinstance(step, dict):
            continue
        if step.get("type") in types:
            return step
        found = _find_pipeline_step(step.get("transforms", []), *types)
        if found:
            return found
    return None


def _preprocess_from_pipeline(pipeline: List[dict], default: PreprocessConfig) -> PreprocessConfig:
    """mmdet / EasyCV test pipeline -> PreprocessConfig (cv2 resize, as those pipelines do)."""
    result = replace(default, resize_backend="cv2")
    multi_scale = _find_pipeline_step(pipeline, "MultiScaleFlipAug", "MMMultiScaleFlipAug")
    if multi_scale and multi_scale.get("img_scale"):
        scale = multi_scale["img_scale"]
        scale = scale[0] if isinstance(scale, list) and isinstance(scale[0], (list, tuple)) else scale
        result = replace(result, short_side=int(min(scale)), long_side_max=int(max(scale)))
    normalize = _find_pipeline_step(pipeline, "Normalize", "MMNormalize")
    if normalize:
        if normalize.get("to_rgb") is False:
            raise ModelDirError("test pipelines that normalise BGR images (to_rgb=False) are not supported")
        result = replace(result, mean=tuple(normalize.get("mean", result.mean)), std=tuple(normalize.get("std", result.std)))
    pad = _find_pipeline_step(pipeline, "Pad", "MMPad")
    if pad and pad.get("size_divisor"):
        result = replace(result, size_divisor=int(pad["size_divisor"]))
    return result


def inference_from_test_cfg(test_values: Dict[str, Any], base: InferenceConfig) -> InferenceConfig:
    """mmdet / EasyCV ``test_cfg`` names -> InferenceConfig."""
    return replace(
        base,
        object_mask_threshold=test_values.get("object_mask_thr", base.object_mask_threshold),
        overlap_threshold=test_values.get("iou_thr", base.overlap_threshold),
        filter_low_score=test_values.get("filter_low_score", base.filter_low_score),
        max_per_image=test_values.get("max_per_image", base.max_per_image),
    )


def config_from_mmdet(values: Dict[str, Any], base: Mask2FormerConfig) -> Mask2FormerConfig:
    """mmdet 2.x Mask2Former config values (read from config.py) over ``base``."""
    model = values.get("model", {})
    backbone_values = model.get("backbone", {})
    backbone = base.backbone
    if backbone_values.get("type") == "SwinTransformer":
        default = base.backbone if isinstance(base.backbone, SwinConfig) else SwinConfig()
        backbone = SwinConfig(
            embed_dim=backbone_values.get("embed_dims", default.embed_dim),
            depths=tuple(backbone_values.get("depths", default.depths)),
            num_heads=tuple(backbone_values.get("num_heads", default.num_heads)),
            window_size=backbone_values.get("window_size", default.window_size),
            patch_size=backbone_values.get("patch_size", default.patch_size),
            mlp_ratio=backbone_values.get("mlp_ratio", default.mlp_ratio),
        )
    elif backbone_values.get("type") == "ResNet":
        backbone = ResNetConfig(depth=backbone_values.get("depth", 50))
    head = model.get("panoptic_head", {})
    encoder = head.get("pixel_decoder", {}).get("encoder", {})
    encoder_layer = encoder.get("transformerlayers", {})
    decoder = head.get("transformer_decoder", {})
    decoder_layer = decoder.get("transformerlayers", {})
    decoder_ffn = decoder_layer.get("ffn_cfgs", {})
    decoder_attention = decoder_layer.get("attn_cfgs", {})
    encoder_ffn = encoder_layer.get("ffn_cfgs", {})
    inference = inference_from_test_cfg(model.get("test_cfg") or values.get("test_cfg") or {}, base.inference)
    test_pipeline = values.get("data", {}).get("test", {}).get("pipeline") or values.get("test_pipeline")
    return replace(
        base,
        backbone=backbone,
        num_things_classes=head.get("num_things_classes", base.num_things_classes),
        num_stuff_classes=head.get("num_stuff_classes", base.num_stuff_classes),
        num_queries=head.get("num_queries", base.num_queries),
        hidden_dim=head.get("feat_channels", base.hidden_dim),
        num_heads=decoder_attention.get("num_heads", base.num_heads),
        encoder_layers=encoder.get("num_layers", base.encoder_layers),
        encoder_feedforward_dim=encoder_ffn.get("feedforward_channels", encoder_layer.get("feedforward_channels", base.encoder_feedforward_dim)),
        decoder_layers=decoder.get("num_layers", base.decoder_layers),
        decoder_feedforward_dim=decoder_ffn.get("feedforward_channels", decoder_layer.get("feedforward_channels", base.decoder_feedforward_dim)),
        source="mmdet",
        preprocess=_preprocess_from_pipeline(test_pipeline, base.preprocess) if test_pipeline else base.preprocess,
        inference=inference,
    )


def config_from_easycv(configuration: Dict[str, Any], base: Mask2FormerConfig) -> Mask2FormerConfig:
    """EasyCV Mask2Former config (the ``model`` of its configuration.json, or an export's meta.config) over ``base``."""
    model = configuration.get("model", {})
    backbone_values = model.get("backbone", {})
    backbone = ResNetConfig(depth=backbone_values.get("depth", 50)) if backbone_values.get("type", "ResNet") == "ResNet" else base.backbone
    head = model.get("head", {})
    pixel_decoder = head.get("pixel_decoder", {})
    decoder = head.get("transformer_decoder", {})
    inference = inference_from_test_cfg(model.get("test_cfg", {}), base.inference)
    dataset = configuration.get("dataset", configuration.get("data", {}))
    test_pipeline = (dataset.get("val") or dataset.get("test") or {}).get("pipeline") or configuration.get("test_pipeline")
    return replace(
        base,
        backbone=backbone,
        num_things_classes=head.get("num_things_classes", base.num_things_classes),
        num_stuff_classes=head.get("num_stuff_classes", base.num_stuff_classes),
        num_queries=decoder.get("num_queries", base.num_queries),
        hidden_dim=decoder.get("hidden_dim", pixel_decoder.get("conv_dim", base.hidden_dim)),
        num_heads=decoder.get("nheads", base.num_heads),
        encoder_layers=pixel_decoder.get("transformer_enc_layers", base.encoder_layers),
        encoder_feedforward_dim=pixel_decoder.get("transformer_dim_feedforward", base.encoder_feedforward_dim),
        decoder_layers=decoder.get("dec_layers", base.decoder_layers),
        decoder_feedforward_dim=decoder.get("dim_feedforward", base.decoder_feedforward_dim),
        source="easycv",
        preprocess=_preprocess_from_pipeline(test_pipeline, base.preprocess) if test_pipeline else base.preprocess,
        inference=inference,
    )


def config_from_native(values: Dict[str, Any], base: Mask2FormerConfig) -> Mask2FormerConfig:
    """This package's own ``configuration.json`` ``model.config``: the fields of ``Mask2FormerConfig``."""
    values = dict(values)
    backbone_values = dict(values.pop("backbone", {}))
    backbone_type = backbone_values.pop("type", "swin")
    backbone = SwinConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in backbone_values.items()}) \
        if backbone_type == "swin" else ResNetConfig(**backbone_values)
    preprocess = replace(base.preprocess, **{key: tuple(value) if isinstance(value, list) else value
                                             for key, value in values.pop("preprocess", {}).items()})
    inference = replace(base.inference, **values.pop("inference", {}))
    for key in ("class_names", "category_ids"):
        if key in values:
            values[key] = tuple(values[key])
    return replace(base, backbone=backbone, preprocess=preprocess, inference=inference, **values)


def _weights_file(model_dir: Path) -> Path:
    preferred = model_dir / "pytorch_model.pt"
    if preferred.is_file():
        return preferred
    candidates = sorted(model_dir.glob("*.pt")) or sorted(model_dir.glob("*.pth")) or sorted(model_dir.glob("*.pkl"))
    if len(candidates) != 1:
        raise ModelDirError(
            f"{model_dir} must hold exactly one weights file (pytorch_model.pt, or one *.pt / *.pth / *.pkl); found "
            + (", ".join(path.name for path in candidates) or "none")
        )
    return candidates[0]


def _class_names(checkpoint: dict, config_values: Dict[str, Any], config: Mask2FormerConfig) -> Tuple[str, ...]:
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    if isinstance(meta, dict) and meta.get("CLASSES"):
        return tuple(meta["CLASSES"])
    if config_values.get("CLASSES"):
        return tuple(config_values["CLASSES"])
    if config.num_classes == len(COCO_PANOPTIC_CATEGORIES):
        if config.source == "mmdet":
            return MMDET_COCO_PANOPTIC_CLASSES
        return tuple(category.name for category in COCO_PANOPTIC_CATEGORIES)
    return tuple(f"class_{index}" for index in range(config.num_classes))


def load_model_dir(model_dir, task: Optional[str] = None) -> Tuple[Mask2FormerConfig, Mask2Former]:
    """Builds the network a model directory describes and loads its weights strictly."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    configuration = read_configuration_json(model_dir)
    model_type = configuration.get("model", {}).get("type")
    if model_type not in MODEL_TYPES:
        raise ModelDirError(f"{model_dir}: model type {model_type!r} is not a model this package runs "
                            f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    if model_type == "fastinst":
        from .model_dir_fastinst import load_fastinst_dir

        return load_fastinst_dir(model_dir, configuration, task=task)
    base = MODEL_TYPES[model_type]()
    config_values: Dict[str, Any] = {}
    if model_type == "r50-panoptic-segmentation":
        config = config_from_easycv(configuration, base)
        config_values = configuration
    elif model_type == "mask2former":
        config = config_from_native(configuration["model"].get("config", {}), base)
    else:
        config_file = next((model_dir / name for name in ("config.py", "mmcv_config.py") if (model_dir / name).is_file()), None)
        if config_file is not None:
            config_values = read_mmcv_config(config_file)
            config = config_from_mmdet(config_values, base)
        else:
            config = base
    weights_path = _weights_file(model_dir)
    checkpoint = checkpoint_io.read_checkpoint(weights_path)
    if not isinstance(checkpoint, dict):
        raise ModelDirError(f"{weights_path} does not hold a state dict")
    state_dict = checkpoint_io.convert_to_native(checkpoint_io.extract_state_dict(checkpoint))
    class_names = config.class_names or _class_names(checkpoint, config_values, config)
    if len(class_names) != config.num_classes:
        raise ModelDirError(f"{model_dir}: {len(class_names)} class names for {config.num_classes} classes")
    category_ids = config.category_ids or (tuple(category.id for category in COCO_PANOPTIC_CATEGORIES)
                                           if config.num_classes == len(COCO_PANOPTIC_CATEGORIES) else tuple(range(config.num_classes)))
    config = replace(config, class_names=class_names, category_ids=category_ids, task=task or config.task)
    network = build_mask2former(config)
    checkpoint_io.load_strict(network, state_dict, checkpoint_name=str(weights_path))
    return config, network.eval()


def load_easycv_export(path, task: Optional[str] = None, checkpoint: Optional[dict] = None) -> Tuple[Mask2FormerConfig, Mask2Former]:
    """EasyCV ``mask2former_*_export.pth``: weights plus the training config pickled in ``meta.config``."""
    checkpoint = checkpoint_io.read_checkpoint(path) if checkpoint is None else checkpoint
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    configuration = decode_easycv_tuples(dict(meta.get("config") or {}))
    if configuration.get("model", {}).get("type") != "Mask2Former":
        raise ModelDirError(f"{path} is not an EasyCV Mask2Former export (meta.config.model.type is "
                            f"{configuration.get('model', {}).get('type')!r})")
    config = config_from_easycv(configuration, resnet50_coco_panoptic())
    state_dict = checkpoint_io.convert_to_native(checkpoint_io.extract_state_dict(checkpoint), "easycv")
    class_names = _class_names(checkpoint, configuration, config)
    config = replace(config, class_names=class_names, category_ids=tuple(c.id for c in COCO_PANOPTIC_CATEGORIES)
                     if config.num_classes == len(COCO_PANOPTIC_CATEGORIES) else tuple(range(config.num_classes)),
                     task=task or config.task)
    network = build_mask2former(config)
    checkpoint_io.load_strict(network, state_dict, checkpoint_name=str(path))
    return config, network.eval()


def load_model(path, task: Optional[str] = None) -> Tuple[Mask2FormerConfig, Mask2Former]:
    """Any supported layout: a hub-layout directory (Mask2Former or FastInst), a Hugging Face folder, an EasyCV
    export file or an official FastInst release file."""
    path = Path(path)
    if path.is_dir() and (path / "configuration.json").is_file():
        return load_model_dir(path, task=task)
    if path.is_dir() and (path / "config.json").is_file():
        from .checkpoint_hf import load_hf_model_dir

        config, network = load_hf_model_dir(path)
        return (replace(config, task=task) if task else config), network
    if path.is_file():
        from .model_dir_fastinst import is_fastinst_state_dict, load_fastinst_checkpoint

        checkpoint = checkpoint_io.read_checkpoint(path)
        if is_fastinst_state_dict(checkpoint):
            return load_fastinst_checkpoint(path, checkpoint, task=task)
        return load_easycv_export(path, task=task, checkpoint=checkpoint)
    raise ModelDirError(f"{path} is neither a model directory (configuration.json or config.json) nor a checkpoint file")
