"""Key maps: one explicit table per checkpoint source, and its inverse where this package writes that layout.

This project's parameter names follow detectron2's Mask2Former (``pixel_decoder.*``, with its
``sem_seg_head.predictor.*`` as ``transformer_decoder.*``), the original Swin release for Swin backbones and
torchvision for ResNet. Each source layout is converted to those names by a table of regular expressions;
tensors whose layout differs (mmdet's ``nn.Unfold`` patch merging) are permuted, not just renamed. Each rule is
(pattern, replacement); the first matching rule renames a key; keys matching no rule are kept as they are (and
strict loading then names them if the model lacks them).
"""
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from modelscope_plugin.errors import CheckpointError
from modelscope_plugin.modeling.backbones.swin import relative_position_index

Rule = Tuple[str, str]


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule]) -> Dict[str, torch.Tensor]:
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in compiled:
            if pattern.match(key):
                new_key = pattern.sub(replacement, key, count=1)
                break
        if new_key in renamed:
            raise CheckpointError(f"two checkpoint entries map to {new_key!r}")
        renamed[new_key] = value
    return renamed


MMDET_SWIN_RULES: List[Rule] = [
    (r"^backbone\.patch_embed\.projection\.", r"backbone.patch_embed.proj."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.", r"backbone.layers.\1.blocks.\2.attn."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.", r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (r"^backbone\.stages\.", r"backbone.layers."),
]

MMDET_HEAD_RULES: List[Rule] = [
    (r"^panoptic_head\.pixel_decoder\.input_convs\.(\d+)\.conv\.", r"pixel_decoder.input_proj.\1.0."),
    (r"^panoptic_head\.pixel_decoder\.input_convs\.(\d+)\.gn\.", r"pixel_decoder.input_proj.\1.1."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.attentions\.0\.",
     r"pixel_decoder.transformer.encoder.layers.\1.self_attn."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.",
     r"pixel_decoder.transformer.encoder.layers.\1.linear1."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.",
     r"pixel_decoder.transformer.encoder.layers.\1.linear2."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.norms\.0\.",
     r"pixel_decoder.transformer.encoder.layers.\1.norm1."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.norms\.1\.",
     r"pixel_decoder.transformer.encoder.layers.\1.norm2."),
    (r"^panoptic_head\.pixel_decoder\.level_encoding\.weight$", r"pixel_decoder.transformer.level_embed"),
    # mmdet builds its FPN convs coarse to fine, detectron2 names them fine to coarse from 1; the releases have one
    (r"^panoptic_head\.pixel_decoder\.lateral_convs\.0\.conv\.", r"pixel_decoder.adapter_1."),
    (r"^panoptic_head\.pixel_decoder\.lateral_convs\.0\.gn\.", r"pixel_decoder.adapter_1.norm."),
    (r"^panoptic_head\.pixel_decoder\.output_convs\.0\.conv\.", r"pixel_decoder.layer_1."),
    (r"^panoptic_head\.pixel_decoder\.output_convs\.0\.gn\.", r"pixel_decoder.layer_1.norm."),
    (r"^panoptic_head\.pixel_decoder\.mask_feature\.", r"pixel_decoder.mask_features."),
    # decoder layer operation order: cross_attn, norm, self_attn, norm, ffn, norm
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.0\.attn\.",
     r"transformer_decoder.transformer_cross_attention_layers.\1.multihead_attn."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.1\.attn\.",
     r"transformer_decoder.transformer_self_attention_layers.\1.self_attn."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.0\.",
     r"transformer_decoder.transformer_cross_attention_layers.\1.norm."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.1\.",
     r"transformer_decoder.transformer_self_attention_layers.\1.norm."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.2\.",
     r"transformer_decoder.transformer_ffn_layers.\1.norm."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.",
     r"transformer_decoder.transformer_ffn_layers.\1.linear1."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.",
     r"transformer_decoder.transformer_ffn_layers.\1.linear2."),
    (r"^panoptic_head\.transformer_decoder\.post_norm\.", r"transformer_decoder.decoder_norm."),
    (r"^panoptic_head\.decoder_input_projs\.", r"transformer_decoder.input_proj."),
    (r"^panoptic_head\.cls_embed\.", r"transformer_decoder.class_embed."),
    (r"^panoptic_head\.mask_embed\.0\.", r"transformer_decoder.mask_embed.layers.0."),
    (r"^panoptic_head\.mask_embed\.2\.", r"transformer_decoder.mask_embed.layers.1."),
    (r"^panoptic_head\.mask_embed\.4\.", r"transformer_decoder.mask_embed.layers.2."),
    (r"^panoptic_head\.(query_embed|query_feat|level_embed)\.", r"transformer_decoder.\1."),
]

EASYCV_RULES: List[Rule] = [
    (r"^head\.pixel_decoder\.", r"pixel_decoder."),
    (r"^head\.predictor\.", r"transformer_decoder."),
]

DETECTRON2_RULES: List[Rule] = [
    (r"^sem_seg_head\.pixel_decoder\.", r"pixel_decoder."),
    (r"^sem_seg_head\.predictor\.", r"transformer_decoder."),
    # detectron2 ResNet -> torchvision ResNet
    (r"^backbone\.stem\.conv1\.norm\.", r"backbone.bn1."),
    (r"^backbone\.stem\.conv1\.", r"backbone.conv1."),
    (r"^backbone\.res(\d)\.(\d+)\.shortcut\.norm\.",
     lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.downsample.1."),
    (r"^backbone\.res(\d)\.(\d+)\.shortcut\.",
     lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.downsample.0."),
    (r"^backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.",
     lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.bn{match.group(3)}."),
    (r"^backbone\.res(\d)\.(\d+)\.conv(\d)\.",
     lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.conv{match.group(3)}."),
]

# this package's names -> detectron2's (the inverse of DETECTRON2_RULES), for writing hub-layout directories
NATIVE_TO_DETECTRON2_RULES = [
    (r"^backbone\.conv1\.", r"backbone.stem.conv1."),
    (r"^backbone\.bn1\.", r"backbone.stem.conv1.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0\.",
     lambda match: f"backbone.res{int(match.group(1)) + 1}.{match.group(2)}.shortcut."),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.1\.",
     lambda match: f"backbone.res{int(match.group(1)) + 1}.{match.group(2)}.shortcut.norm."),
    (r"^backbone\.layer(\d)\.(\d+)\.conv(\d)\.",
     lambda match: f"backbone.res{int(match.group(1)) + 1}.{match.group(2)}.conv{match.group(3)}."),
    (r"^backbone\.layer(\d)\.(\d+)\.bn(\d)\.",
     lambda match: f"backbone.res{int(match.group(1)) + 1}.{match.group(2)}.conv{match.group(3)}.norm."),
    (r"^pixel_decoder\.", r"sem_seg_head.pixel_decoder."),
    (r"^transformer_decoder\.", r"sem_seg_head.predictor."),
]

# entries the sources save that carry no weights of this model
_NON_WEIGHT_KEYS = re.compile(
    r"(relative_position_index$|^criterion\.|^__drop__\.|\.pe_layer\.|^pixel_mean$|^pixel_std$|^data_preprocessor\.)"
)


def unfold_to_swin_order(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """mmdet's ``nn.Unfold`` patch merging orders the 4C input channels channel-major (c*4 + k, k over
    (0,0), (0,1), (1,0), (1,1)); the original Swin concatenates neighbour-major (k*C + c, k over (0,0), (1,0), (0,1),
    (1,1)). ``dim`` is the axis of size 4C."""
    channels = weight.shape[dim] // 4
    moved = weight.movedim(dim, 0)
    # (C, 4 unfold positions, ...) -> (4 swin positions, C, ...)
    reordered = moved.reshape(channels, 4, *moved.shape[1:]).transpose(0, 1)[[0, 2, 1, 3]]
    return reordered.reshape(4 * channels, *moved.shape[1:]).movedim(0, dim).contiguous()


def swin_to_unfold_order(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of ``unfold_to_swin_order`` (used to write mmdet-layout checkpoints)."""
    channels = weight.shape[dim] // 4
    moved = weight.movedim(dim, 0)
    reordered = moved.reshape(4, channels, *moved.shape[1:])[[0, 2, 1, 3]].transpose(0, 1)
    return reordered.reshape(4 * channels, *moved.shape[1:]).movedim(0, dim).contiguous()


def check_relative_position_indices(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Saved Swin index buffers must equal the computed ones (a different convention would need a remap)."""
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            window_size = int(round(value.shape[0] ** 0.5))
            if not torch.equal(value.long(), relative_position_index(window_size)):
                raise CheckpointError(f"{key} differs from the standard Swin relative position index")


def convert_mmdet(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmdet 2.x ``Mask2Former`` detector (``backbone.*``, ``panoptic_head.*``) -> this project's names."""
    converted = rename_keys(state_dict, MMDET_SWIN_RULES + MMDET_HEAD_RULES)
    for key in list(converted):
        if re.match(r"^backbone\.layers\.\d+\.downsample\.reduction\.weight$", key):
            converted[key] = unfold_to_swin_order(converted[key], dim=1)
        elif re.match(r"^backbone\.layers\.\d+\.downsample\.norm\.(weight|bias)$", key):
            converted[key] = unfold_to_swin_order(converted[key], dim=0)
    return converted


def convert_easycv(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EasyCV ``Mask2Former`` (``backbone.*`` torchvision-style ResNet, ``head.pixel_decoder.*``,
    ``head.predictor.*``)."""
    return rename_keys(state_dict, EASYCV_RULES)


def convert_detectron2(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """facebookresearch/Mask2Former release (detectron2 names; Swin in the original layout)."""
    return rename_keys(state_dict, DETECTRON2_RULES)


def detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(key.startswith("panoptic_head.") for key in keys):
        return "mmdet"
    if any(key.startswith("head.predictor.") for key in keys):
        return "easycv"
    if any(key.startswith("sem_seg_head.") for key in keys):
        return "detectron2"
    if any(key.startswith("model.pixel_level_module.") for key in keys):
        return "hf"
    if any(key.startswith("transformer_decoder.") for key in keys):
        return "native"
    raise CheckpointError("unrecognised checkpoint layout (expected mmdet, EasyCV, detectron2, Hugging Face "
                          "or native keys)")


CONVERTERS: Dict[str, Callable[[Mapping[str, torch.Tensor]], Dict[str, torch.Tensor]]] = {
    "mmdet": convert_mmdet,
    "easycv": convert_easycv,
    "detectron2": convert_detectron2,
    "native": dict,
}


def convert_to_native(state_dict: Mapping[str, torch.Tensor], source: Optional[str] = None) -> Dict[str, torch.Tensor]:
    source = source or detect_source(state_dict)
    if source == "hf":
        raise CheckpointError("Hugging Face checkpoints are loaded through load_hf_model_dir")
    if source not in CONVERTERS:
        raise CheckpointError(f"unknown checkpoint source {source!r}; expected one of {sorted(CONVERTERS)}")
    check_relative_position_indices(state_dict)
    converted = CONVERTERS[source](state_dict)
    return {key: value for key, value in converted.items() if not _NON_WEIGHT_KEYS.search(key)}
