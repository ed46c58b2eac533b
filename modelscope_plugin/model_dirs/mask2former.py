"""Model directories as the hub publishes them -> (configuration, network with strictly loaded weights).

Layouts:
- mmdet 2.x (the Swin-L ids): ``configuration.json`` + ``config.py`` (panoptic) or ``mmcv_config.py`` (semantic) +
  ``pytorch_model.pt`` holding ``state_dict`` (``backbone.*``, ``panoptic_head.*``) and ``meta.CLASSES``.
- EasyCV (the r50 id): ``configuration.json`` in EasyCV's ``to_ms_config`` format + exactly one ``*.pt``;
  EasyCV's ``mask2former_*_export.pth`` files too.
- detectron2 Mask2Former releases (``model_final_*.pkl``), Hugging Face folders (``config.json`` + safetensors).
The directory's own config wins over this repository's defaults; class names come from the checkpoint when it has them.
"""
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints.io import extract_state_dict, load_strict, read_checkpoint
from modelscope_plugin.checkpoints.keymaps import convert_to_native
from modelscope_plugin.config import (
    InferenceConfig,
    Mask2FormerConfig,
    PreprocessConfig,
    ResNetConfig,
    SwinConfig,
    resnet50_coco_panoptic,
)
from modelscope_plugin.data.categories import (
    COCO_PANOPTIC_CATEGORIES,
    MMDET_COCO_PANOPTIC_CLASSES,
    class_table_of_count,
    default_category_ids,
    default_class_names,
    describe_class_tables,
)
from modelscope_plugin.errors import ModelDirError
from modelscope_plugin.model_dirs.configuration import check_config, decode_easycv_tuples, reading_values
from modelscope_plugin.model_dirs.mmcv_config import read_mmcv_config
from modelscope_plugin.model_dirs.native import config_from_native
from modelscope_plugin.modeling.mask2former.model import Mask2Former


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
        result = replace(result, mean=tuple(normalize.get("mean", result.mean)),
                         std=tuple(normalize.get("std", result.std)))
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
        encoder_feedforward_dim=encoder_ffn.get("feedforward_channels",
                                                encoder_layer.get("feedforward_channels",
                                                                  base.encoder_feedforward_dim)),
        decoder_layers=decoder.get("num_layers", base.decoder_layers),
        decoder_feedforward_dim=decoder_ffn.get("feedforward_channels",
                                                decoder_layer.get("feedforward_channels",
                                                                  base.decoder_feedforward_dim)),
        source="mmdet",
        preprocess=_preprocess_from_pipeline(test_pipeline, base.preprocess) if test_pipeline else base.preprocess,
        inference=inference,
    )


def config_from_easycv(configuration: Dict[str, Any], base: Mask2FormerConfig) -> Mask2FormerConfig:
    """EasyCV Mask2Former config (the ``model`` of its configuration.json, or an export's meta.config) over ``base``."""
    model = configuration.get("model", {})
    backbone_values = model.get("backbone", {})
    backbone = (ResNetConfig(depth=backbone_values.get("depth", 50))
                if backbone_values.get("type", "ResNet") == "ResNet" else base.backbone)
    head = model.get("head", {})
    pixel_decoder = head.get("pixel_decoder", {})
    decoder = head.get("transformer_decoder", {})
    inference = inference_from_test_cfg(model.get("test_cfg", {}), base.inference)
    dataset = configuration.get("dataset", configuration.get("data", {}))
    test_pipeline = ((dataset.get("val") or dataset.get("test") or {}).get("pipeline")
                     or configuration.get("test_pipeline"))
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
    if config.source == "mmdet" and config.num_classes == len(COCO_PANOPTIC_CATEGORIES):
        return MMDET_COCO_PANOPTIC_CLASSES
    return default_class_names(config.num_classes, COCO_PANOPTIC_CATEGORIES)


def load_easycv_export(path, task: Optional[str] = None, checkpoint: Optional[dict] = None,
                       class_names: Optional[Sequence[str]] = None) -> Tuple[Mask2FormerConfig, Mask2Former]:
    """EasyCV ``mask2former_*_export.pth``: weights plus the training config pickled in ``meta.config``. Class names:
    ``class_names``, else ``meta.CLASSES`` (or the config's ``CLASSES``), else the built-in class set of that many
    classes; without any, one ``ModelDirError`` asking for them."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    configuration = decode_easycv_tuples(dict(meta.get("config") or {}))
    if configuration.get("model", {}).get("type") != "Mask2Former":
        raise ModelDirError(f"{path} is not an EasyCV Mask2Former export (meta.config.model.type is "
                            f"{configuration.get('model', {}).get('type')!r})")
    where = f"{path} meta.config"
    with reading_values(where):
        config = config_from_easycv(configuration, resnet50_coco_panoptic())
    check_config(config, where)
    table = class_table_of_count(config.num_classes)
    if class_names is not None:
        if len(class_names) != config.num_classes:
            raise ModelDirError(f"{path}: {len(class_names)} class names given for its {config.num_classes} classes")
        config = replace(config, class_names=tuple(class_names))
    elif not (meta.get("CLASSES") or configuration.get("CLASSES")):
        if table is None:
            raise ModelDirError(f"{path} records no class names (meta.CLASSES) and its {config.num_classes} classes "
                                f"match no built-in class set ({describe_class_tables()}); give them: "
                                "class_names=[...] (load_model, pipeline) or --classes FILE (modelscope-seg)")
        config = replace(config, class_names=table.class_names)
    if table is not None and not config.category_ids:
        config = replace(config, category_ids=table.category_ids)
    state_dict = convert_to_native(extract_state_dict(checkpoint), "easycv")
    config = with_classes(config, checkpoint, configuration, task, where=str(path))
    network = build_mask2former(config)
    load_strict(network, state_dict, checkpoint_name=str(path))
    return config, network.eval()


def with_classes(config: Mask2FormerConfig, checkpoint: dict, config_values: Dict[str, Any], task: Optional[str],
                 where: str) -> Mask2FormerConfig:
    """``config`` with its class names (the config's, else the checkpoint's, else COCO's by count), dataset ids
    and task filled in."""
    class_names = config.class_names or _class_names(checkpoint, config_values, config)
    if len(class_names) != config.num_classes:
        raise ModelDirError(f"{where}: {len(class_names)} class names for {config.num_classes} classes")
    category_ids = config.category_ids or default_category_ids(config.num_classes, COCO_PANOPTIC_CATEGORIES)
    return replace(config, class_names=class_names, category_ids=category_ids, task=task or config.task)


def load_mask2former_dir(model_dir: Path, configuration: Dict[str, Any], base: Mask2FormerConfig,
                         task: Optional[str] = None) -> Tuple[Mask2FormerConfig, Mask2Former]:
    """A hub-layout Mask2Former directory (mmdet, EasyCV or this package's own ``mask2former`` model type)."""
    model_type = configuration["model"]["type"]
    config_values: Dict[str, Any] = {}
    config_path = model_dir / "configuration.json"
    with reading_values(str(config_path)):
        if model_type == "r50-panoptic-segmentation":
            config = config_from_easycv(configuration, base)
            config_values = configuration
        elif model_type == "mask2former":
            config = config_from_native(configuration["model"].get("config", {}), base)
        else:
            config_file = next((model_dir / name for name in ("config.py", "mmcv_config.py")
                                if (model_dir / name).is_file()), None)
            if config_file is not None:
                config_path = config_file
                config_values = read_mmcv_config(config_file)
                config = config_from_mmdet(config_values, base)
            else:
                config = base
    check_config(config, str(config_path))
    weights_path = _weights_file(model_dir)
    checkpoint = read_checkpoint(weights_path)
    if not isinstance(checkpoint, dict):
        raise ModelDirError(f"{weights_path} does not hold a state dict")
    state_dict = convert_to_native(extract_state_dict(checkpoint))
    config = with_classes(config, checkpoint, config_values, task, where=str(model_dir))
    network = build_mask2former(config)
    load_strict(network, state_dict, checkpoint_name=str(weights_path))
    return config, network.eval()
