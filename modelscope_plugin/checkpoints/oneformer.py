"""The key table of Hugging Face OneFormer folders (``OneFormerForUniversalSegmentation.save_pretrained``, the
``shi-labs/oneformer_*`` hub files) -> this package's ``modeling/oneformer`` names.

The Swin backbone and the pixel decoder are keyed as in HF Mask2Former and share its rules (``checkpoints/hf.py``);
the DiNAT backbone, the task MLP, the query transformer and the masked-attention decoder have their own below. Every
key is renamed, fused (q/k/v rows stacked in that order) or dropped for a stated reason; anything else raises.
``to_hf_oneformer`` is the inverse (for the HF folders the trainer writes).
"""
import re
from typing import Dict, Tuple

import torch
from torch import Tensor

from modelscope_plugin.checkpoints.hf import KeymapReport, apply_rules, pixel_decoder_rules, swin_rules
from modelscope_plugin.errors import KeymapError

_WB = r"(weight|bias)"
_QKV_PART = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "query": 0, "key": 1, "value": 2}


def dinat_rules():
    """HF's DinatBackbone (``pixel_level_module.encoder.*``) -> ``modeling/backbones/dinat.py``."""
    prefix = r"pixel_level_module\.encoder\."
    block = prefix + r"encoder\.levels\.(\d+)\.layers\.(\d+)\."

    def target(match):
        return f"backbone.layers.{match[1]}.blocks.{match[2]}."

    block_names = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                   "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    return [
        (prefix + r"embeddings\.patch_embeddings\.projection\.([01])\." + _WB,
         lambda m: ("rename", f"backbone.patch_embed.conv{int(m[1]) + 1}.{m[2]}")),
        (prefix + r"embeddings\.norm\." + _WB, lambda m: ("rename", f"backbone.patch_embed.norm.{m[1]}")),
        (block + r"(layernorm_before|layernorm_after|attention\.output\.dense|intermediate\.dense|output\.dense)\."
         + _WB, lambda m: ("rename", target(m) + f"{block_names[m[3]]}.{m[4]}")),
        (block + r"attention\.self\.(query|key|value)\." + _WB,
         lambda m: ("fuse", target(m) + f"attn.qkv.{m[4]}", _QKV_PART[m[3]])),
        (block + r"attention\.self\.rpb", lambda m: ("rename", target(m) + "attn.relative_position_bias")),
        (block + r"layer_scale_parameters", lambda m: ("rename", target(m) + "layer_scale")),
        (prefix + r"encoder\.levels\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
         lambda m: ("rename", f"backbone.layers.{m[1]}.downsample.{m[2]}")),
        (prefix + r"hidden_states_norms\.stage(\d+)\." + _WB,
         lambda m: ("rename", f"backbone.norm{int(m[1]) - 1}.{m[2]}")),
    ]


def oneformer_head_rules():
    """Task MLP, query transformer and masked-attention decoder."""
    module = r"transformer_module\."
    layer = module + r"decoder\.layers\.(\d+)\."
    query_layer = module + r"decoder\.query_transformer\.decoder\.layers\.(\d+)\."
    self_attention = "transformer_decoder.transformer_self_attention_layers."
    cross_attention = "transformer_decoder.transformer_cross_attention_layers."
    feedforward = "transformer_decoder.transformer_ffn_layers."
    # the query transformer's DETR layer: its norms 1 / 2 / 3 follow self-attention, cross-attention, feed-forward
    query_names = {"self_attn": "self_attention_layers.{}.self_attn",
                   "multihead_attn": "cross_attention_layers.{}.multihead_attn",
                   "norm1": "self_attention_layers.{}.norm", "norm2": "cross_attention_layers.{}.norm",
                   "norm3": "ffn_layers.{}.norm", "linear1": "ffn_layers.{}.linear1",
                   "linear2": "ffn_layers.{}.linear2"}
    return [
        (r"task_encoder\.task_mlp\.layers\.(\d+)\.0\." + _WB, lambda m: ("rename", f"task_mlp.layers.{m[1]}.{m[2]}")),
        (module + r"queries_embedder\.weight", lambda m: ("rename", "transformer_decoder.query_embed.weight")),
        (module + r"level_embed\.weight", lambda m: ("rename", "transformer_decoder.level_embed.weight")),
        (module + r"input_projections\.(\d+)\." + _WB,
         lambda m: ("rename", f"transformer_decoder.input_proj.{m[1]}.{m[2]}")),
        (layer + r"cross_attn\.multihead_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         lambda m: ("rename", f"{cross_attention}{m[1]}.multihead_attn.{m[2]}")),
        (layer + r"cross_attn\.norm\." + _WB, lambda m: ("rename", f"{cross_attention}{m[1]}.norm.{m[2]}")),
        (layer + r"self_attn\.self_attn\.(q_proj|k_proj|v_proj)\." + _WB,
         lambda m: ("fuse", f"{self_attention}{m[1]}.self_attn.in_proj_{m[3]}", _QKV_PART[m[2]])),
        (layer + r"self_attn\.self_attn\.out_proj\." + _WB,
         lambda m: ("rename", f"{self_attention}{m[1]}.self_attn.out_proj.{m[2]}")),
        (layer + r"self_attn\.norm\." + _WB, lambda m: ("rename", f"{self_attention}{m[1]}.norm.{m[2]}")),
        (layer + r"ffn\.(linear1|linear2|norm)\." + _WB, lambda m: ("rename", f"{feedforward}{m[1]}.{m[2]}.{m[3]}")),
        (module + r"decoder\.(decoder_norm|class_embed)\." + _WB,
         lambda m: ("rename", f"transformer_decoder.{m[1]}.{m[2]}")),
        (module + r"decoder\.mask_embed\.layers\.(\d+)\.0\." + _WB,
         lambda m: ("rename", f"transformer_decoder.mask_embed.layers.{m[1]}.{m[2]}")),
        (module + r"decoder\.query_input_projection\." + _WB, lambda m: ("rename", f"query_input_projection.{m[1]}")),
        (query_layer + r"(self_attn|multihead_attn)\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
         lambda m: ("rename", "query_transformer." + query_names[m[2]].format(m[1]) + f".{m[3]}")),
        (query_layer + r"(norm1|norm2|norm3|linear1|linear2)\." + _WB,
         lambda m: ("rename", "query_transformer." + query_names[m[2]].format(m[1]) + f".{m[3]}")),
        (module + r"decoder\.query_transformer\.decoder\.norm\." + _WB,
         lambda m: ("rename", f"query_transformer.norm.{m[1]}")),
        (r"criterion\.(empty_weight|logit_scale)", lambda m: ("drop", "loss buffer, not part of the network")),
    ]


def text_mapper_rules(keep: bool):
    """The training checkpoints' text mapper (``modeling/oneformer/text_mapper.py``, named as transformers' but for
    the projector's Sequential wrappers), kept for a network built with one, else dropped."""
    if not keep:
        return [(r"text_mapper\..*", lambda m: ("drop", "text encoder of the training-only contrastive loss"))]
    return [
        (r"text_mapper\.text_projector\.layers\.(\d+)\.0\." + _WB,
         lambda m: ("rename", f"text_mapper.text_projector.layers.{m[1]}.{m[2]}")),
        (r"text_mapper\.(text_encoder\..+|prompt_ctx\.weight)", lambda m: ("rename", f"text_mapper.{m[1]}")),
    ]


def convert_hf_oneformer(state_dict: Dict[str, Tensor], backbone_model_type: str,
                         keep_text_mapper: bool = False) -> Tuple[Dict[str, Tensor], KeymapReport]:
    """HF OneFormer state dict with a "swin" or "dinat" backbone -> (this package's state dict, report of sources
    and dropped keys); a training checkpoint's text mapper is converted with ``keep_text_mapper``, else dropped.
    Raises ``KeymapError`` on a key no rule claims or a conversion that is not one-to-one."""
    backbone_rules = {"swin": swin_rules, "dinat": dinat_rules}.get(backbone_model_type)
    if backbone_rules is None:
        raise KeymapError(f"OneFormer backbone {backbone_model_type!r} is not supported (swin or dinat)")
    return apply_rules(state_dict, backbone_rules() + pixel_decoder_rules() + oneformer_head_rules()
                       + text_mapper_rules(keep_text_mapper))


# This package's names -> HF names, the inverse of the rules above (one HF spelling: transformers 5's
# ``save_pretrained``); an entry with three names splits a fused q/k/v tensor into its query, key and value rows.
def _inverse_rules(backbone_model_type: str):
    swin = r"backbone\.layers\.(\d+)\.blocks\.(\d+)\."
    swin_block = "pixel_level_module.encoder.encoder.layers.{}.blocks.{}."
    dinat_block = "pixel_level_module.encoder.encoder.levels.{}.layers.{}."
    block = swin_block if backbone_model_type == "swin" else dinat_block
    stage = "pixel_level_module.encoder.encoder.layers.{}." if backbone_model_type == "swin" \
        else "pixel_level_module.encoder.encoder.levels.{}."
    block_names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
                   "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
                   "attn.relative_position_bias_table": "attention.self.relative_position_bias_table",
                   "attn.relative_position_bias": "attention.self.rpb", "layer_scale": "layer_scale_parameters"}
    pixel_encoder_names = {"norm1": "self_attn_layer_norm", "linear1": "fc1", "linear2": "fc2",
                           "norm2": "final_layer_norm"}
    query_names = {"self_attention_layers.{}.self_attn": "self_attn", "cross_attention_layers.{}.multihead_attn":
                   "multihead_attn", "self_attention_layers.{}.norm": "norm1", "cross_attention_layers.{}.norm":
                   "norm2", "ffn_layers.{}.norm": "norm3", "ffn_layers.{}.linear1": "linear1",
                   "ffn_layers.{}.linear2": "linear2"}
    query_pattern = r"query_transformer\.(self_attention_layers|cross_attention_layers|ffn_layers)\.(\d+)\." \
                    r"(self_attn|multihead_attn|norm|linear1|linear2)\.(.+)"
    decoder = "transformer_module.decoder."
    return [
        (r"backbone\.patch_embed\.proj\." + _WB,
         lambda m: ["pixel_level_module.encoder.embeddings.patch_embeddings.projection." + m[1]]),
        (r"backbone\.patch_embed\.conv([12])\." + _WB,
         lambda m: [f"pixel_level_module.encoder.embeddings.patch_embeddings.projection.{int(m[1]) - 1}.{m[2]}"]),
        (r"backbone\.patch_embed\.norm\." + _WB, lambda m: ["pixel_level_module.encoder.embeddings.norm." + m[1]]),
        (swin + r"attn\.qkv\." + _WB, lambda m: [block.format(m[1], m[2]) + f"attention.self.{part}.{m[3]}"
                                                   for part in ("query", "key", "value")]),
        (swin + r"(norm1|norm2|attn\.proj|mlp\.fc1|mlp\.fc2)\." + _WB,
         lambda m: [block.format(m[1], m[2]) + f"{block_names[m[3]]}.{m[4]}"]),
        (swin + r"(attn\.relative_position_bias_table|attn\.relative_position_bias|layer_scale)",
         lambda m: [block.format(m[1], m[2]) + block_names[m[3]]]),
        (r"backbone\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)",
         lambda m: [stage.format(m[1]) + f"downsample.{m[2]}"]),
        (r"backbone\.norm(\d+)\." + _WB,
         lambda m: [f"pixel_level_module.encoder.hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"]),
        (r"pixel_decoder\.transformer\.level_embed", lambda m: ["pixel_level_module.decoder.level_embed"]),
        (r"pixel_decoder\.input_proj\.(\d+)\.([01])\." + _WB,
         lambda m: [f"pixel_level_module.decoder.input_projections.{m[1]}.{m[2]}.{m[3]}"]),
        (r"pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)",
         lambda m: [f"pixel_level_module.decoder.encoder.layers.{m[1]}.self_attn.{m[2]}"]),
        (r"pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.(norm1|linear1|linear2|norm2)\." + _WB,
         lambda m: [f"pixel_level_module.decoder.encoder.layers.{m[1]}.{pixel_encoder_names[m[2]]}.{m[3]}"]),
        (r"pixel_decoder\.mask_features\." + _WB, lambda m: ["pixel_level_module.decoder.mask_projection." + m[1]]),
        (r"pixel_decoder\.(adapter|layer)_(\d+)\.weight",
         lambda m: [f"pixel_level_module.decoder.{m[1]}_{m[2]}.0.weight"]),
        (r"pixel_decoder\.(adapter|layer)_(\d+)\.norm\." + _WB,
         lambda m: [f"pixel_level_module.decoder.{m[1]}_{m[2]}.1.{m[3]}"]),
        (r"task_mlp\.layers\.(\d+)\." + _WB, lambda m: [f"task_encoder.task_mlp.layers.{m[1]}.0.{m[2]}"]),
        (r"transformer_decoder\.query_embed\.weight", lambda m: ["transformer_module.queries_embedder.weight"]),
        (r"transformer_decoder\.level_embed\.weight", lambda m: ["transformer_module.level_embed.weight"]),
        (r"transformer_decoder\.input_proj\.(\d+)\." + _WB,
         lambda m: [f"transformer_module.input_projections.{m[1]}.{m[2]}"]),
        (r"transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.(multihead_attn\..+|norm\..+)",
         lambda m: [f"{decoder}layers.{m[1]}.cross_attn.{m[2]}"]),
        (r"transformer_decoder\.transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_" + _WB,
         lambda m: [f"{decoder}layers.{m[1]}.self_attn.self_attn.{part}.{m[2]}"
                    for part in ("q_proj", "k_proj", "v_proj")]),
        (r"transformer_decoder\.transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\." + _WB,
         lambda m: [f"{decoder}layers.{m[1]}.self_attn.self_attn.out_proj.{m[2]}"]),
        (r"transformer_decoder\.transformer_self_attention_layers\.(\d+)\.norm\." + _WB,
         lambda m: [f"{decoder}layers.{m[1]}.self_attn.norm.{m[2]}"]),
        (r"transformer_decoder\.transformer_ffn_layers\.(\d+)\.(linear1|linear2|norm)\." + _WB,
         lambda m: [f"{decoder}layers.{m[1]}.ffn.{m[2]}.{m[3]}"]),
        (r"transformer_decoder\.(decoder_norm|class_embed)\." + _WB, lambda m: [f"{decoder}{m[1]}.{m[2]}"]),
        (r"transformer_decoder\.mask_embed\.layers\.(\d+)\." + _WB,
         lambda m: [f"{decoder}mask_embed.layers.{m[1]}.0.{m[2]}"]),
        (r"query_input_projection\." + _WB, lambda m: [f"{decoder}query_input_projection.{m[1]}"]),
        (query_pattern, lambda m: [f"{decoder}query_transformer.decoder.layers.{m[2]}."
                                   f"{query_names[m[1] + '.{}.' + m[3]]}.{m[4]}"]),
        (r"query_transformer\.norm\." + _WB, lambda m: [f"{decoder}query_transformer.decoder.norm.{m[1]}"]),
        (r"text_mapper\.text_projector\.layers\.(\d+)\." + _WB,
         lambda m: [f"text_mapper.text_projector.layers.{m[1]}.0.{m[2]}"]),
        (r"text_mapper\.(text_encoder\..+|prompt_ctx\.weight)", lambda m: [f"text_mapper.{m[1]}"]),
    ]


def to_hf_oneformer(state_dict: Dict[str, Tensor], backbone_model_type: str) -> Dict[str, Tensor]:
    """This package's OneFormer state dict (text mapper included when the network has one) -> the state dict of
    ``OneFormerForUniversalSegmentation`` ("model."-prefixed HF names) that ``convert_hf_oneformer`` reads back key
    for key and value for value; checked by converting it back. Raises ``KeymapError`` on a key no rule claims or a
    round trip that differs."""
    if backbone_model_type not in ("swin", "dinat"):
        raise KeymapError(f"OneFormer backbone {backbone_model_type!r} is not supported (swin or dinat)")
    rules = [(re.compile(pattern), names) for pattern, names in _inverse_rules(backbone_model_type)]
    converted: Dict[str, Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        hf_names = next((names(match) for regex, names in rules if (match := regex.fullmatch(key))), None)
        if hf_names is None:
            unknown.append(key)
            continue
        # one name: the tensor itself; three: rows [0, D) query, [D, 2D) key, [2D, 3D) value
        pieces = [tensor] if len(hf_names) == 1 else tensor.chunk(3, dim=0)
        for name, piece in zip(hf_names, pieces):
            converted["model." + name] = piece.detach().clone()
    if unknown:
        raise KeymapError(f"{len(unknown)} OneFormer keys with no HF name: {unknown[:10]}")
    keep_text_mapper = any(key.startswith("text_mapper.") for key in state_dict)
    back, _ = convert_hf_oneformer(converted, backbone_model_type, keep_text_mapper=keep_text_mapper)
    if set(back) != set(state_dict) or any(not torch.equal(back[key], state_dict[key]) for key in state_dict):
        raise KeymapError(f"the HF names of {sorted(set(state_dict) ^ set(back))[:10] or 'some tensors'} do not "
                          "convert back to this package's")
    return converted
