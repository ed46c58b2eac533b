"""The key tables of Hugging Face EoMT folders (``EomtForUniversalSegmentation`` / ``EomtDinov3ForUniversal
Segmentation.save_pretrained``, the ``tue-mps/*eomt*`` hub files) -> this package's ``modeling/eomt`` names.

One rule per HF key pattern; every key is renamed, fused (q/k/v rows stacked in that order into ``qkv``), split
(the older SwiGLU ``weights_in``, gate rows then up rows) or dropped for a stated reason, and anything else raises.
DINOv3 has no key bias: its part of the fused bias is zeros, which does not change attention (see
``modeling/eomt/vit.py``).
"""
import re
from typing import Callable, Dict, List, Tuple

import torch

from modelscope_plugin.errors import KeymapError

_WB = r"(weight|bias)"
_BLOCK = r"layers\.(\d+)\."
_QKV_PART = {"q_proj": 0, "k_proj": 1, "v_proj": 2}

# (regex over the HF key, action builder). Actions: ("rename", target), ("fuse", target, part of 3),
# ("split", (first target, second target)), ("drop", reason).
Rule = Tuple[str, Callable[[re.Match], tuple]]
HF_EOMT_RULES: List[Rule] = [
    (r"embeddings\.cls_token", lambda m: ("rename", "embeddings.class_token")),
    (r"embeddings\.register_tokens", lambda m: ("rename", "embeddings.register_tokens")),
    (_BLOCK + r"norm([12])\." + _WB, lambda m: ("rename", f"blocks.{m[1]}.norm{m[2]}.{m[3]}")),
    (_BLOCK + r"attention\.(q_proj|k_proj|v_proj)\." + _WB,
     lambda m: ("fuse", f"blocks.{m[1]}.attention.qkv.{m[3]}", _QKV_PART[m[2]])),
    (_BLOCK + r"attention\.(?:out_proj|o_proj)\." + _WB,
     lambda m: ("rename", f"blocks.{m[1]}.attention.projection.{m[2]}")),
    (_BLOCK + r"layer_scale([12])\.lambda1", lambda m: ("rename", f"blocks.{m[1]}.layer_scale{m[2]}")),
    (r"layernorm\." + _WB, lambda m: ("rename", f"norm.{m[1]}")),
    (r"query\.weight", lambda m: ("rename", "queries.weight")),
    (r"upscale_block\.block\.(\d+)\.conv1\." + _WB,
     lambda m: ("rename", f"upscale_layers.{m[1]}.transposed_conv.{m[2]}")),
    (r"upscale_block\.block\.(\d+)\.conv2\.weight",
     lambda m: ("rename", f"upscale_layers.{m[1]}.depthwise_conv.weight")),
    (r"upscale_block\.block\.(\d+)\.layernorm2d\." + _WB, lambda m: ("rename", f"upscale_layers.{m[1]}.norm.{m[2]}")),
    (r"mask_head\.(fc1|fc2|fc3)\." + _WB, lambda m: ("rename", f"mask_head.{m[1]}.{m[2]}")),
    (r"class_predictor\." + _WB, lambda m: ("rename", f"class_head.{m[1]}")),
    (r"attn_mask_probs", lambda m: ("rename", "attention_mask_probabilities")),
    (r"criterion\.empty_weight",
     lambda m: ("drop", "loss buffer (the no-object class weight), not part of the network")),
    (r"embeddings\.position_ids", lambda m: ("drop", "arange buffer, recomputed")),
    (r"embeddings\.mask_token", lambda m: ("drop", "DINOv2's masked-image-modelling token, unused for segmentation")),
]
# DINOv2 (model_type "eomt"): learned position embeddings; fc1/fc2 MLP or SwiGLU (both spellings of its weights)
DINOV2_RULES: List[Rule] = [
    (r"embeddings\.patch_embeddings\.projection\." + _WB,
     lambda m: ("rename", f"embeddings.patch_projection.{m[1]}")),
    (r"embeddings\.position_embeddings\.weight", lambda m: ("rename", "embeddings.position_embeddings")),
    (_BLOCK + r"mlp\.(fc1|fc2)\." + _WB, lambda m: ("rename", f"blocks.{m[1]}.mlp.{m[2]}.{m[3]}")),
    (_BLOCK + r"mlp\.gate_proj\." + _WB, lambda m: ("rename", f"blocks.{m[1]}.mlp.gate.{m[2]}")),
    (_BLOCK + r"mlp\.up_proj\." + _WB, lambda m: ("rename", f"blocks.{m[1]}.mlp.up.{m[2]}")),
    (_BLOCK + r"mlp\.(?:down_proj|weights_out)\." + _WB, lambda m: ("rename", f"blocks.{m[1]}.mlp.down.{m[2]}")),
    (_BLOCK + r"mlp\.weights_in\." + _WB,
     lambda m: ("split", (f"blocks.{m[1]}.mlp.gate.{m[2]}", f"blocks.{m[1]}.mlp.up.{m[2]}"))),
]
# DINOv3 (model_type "eomt_dinov3"): rotary embeddings (nothing stored), up/down MLP
DINOV3_RULES: List[Rule] = [
    (r"embeddings\.patch_embeddings\." + _WB, lambda m: ("rename", f"embeddings.patch_projection.{m[1]}")),
    (_BLOCK + r"mlp\.up_proj\." + _WB, lambda m: ("rename", f"blocks.{m[1]}.mlp.fc1.{m[2]}")),
    (_BLOCK + r"mlp\.down_proj\." + _WB, lambda m: ("rename", f"blocks.{m[1]}.mlp.fc2.{m[2]}")),
]
_COMPILED = {variant: [(re.compile(pattern), action) for pattern, action in HF_EOMT_RULES + rules]
             for variant, rules in (("eomt", DINOV2_RULES), ("eomt_dinov3", DINOV3_RULES))}


def convert_hf_eomt(state_dict: Dict[str, torch.Tensor],
                    variant: str = "eomt") -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """HF EoMT state dict of ``variant`` (config.json's model_type) -> (this package's state dict, dropped HF key ->
    reason). Raises ``KeymapError`` on a key no rule claims, a target produced twice or an incomplete q/k/v triple."""
    if variant not in _COMPILED:
        raise KeymapError(f"unknown EoMT variant {variant!r} (one of {sorted(_COMPILED)})")
    converted: Dict[str, torch.Tensor] = {}
    dropped: Dict[str, str] = {}
    fused: Dict[str, Dict[int, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        actions = [action(match) for regex, action in _COMPILED[variant] if (match := regex.fullmatch(key))]
        if not actions:
            unknown.append(key)
            continue
        action = actions[0]
        if action[0] == "drop":
            dropped[key] = action[1]
            continue
        if action[0] == "fuse":
            parts = fused.setdefault(action[1], {})
            if action[2] in parts:
                raise KeymapError(f"{key}: part {action[2]} of {action[1]} given twice")
            parts[action[2]] = tensor
            continue
        if action[0] == "split":
            # (2 * hidden, ...) -> gate rows, then up rows
            pieces = dict(zip(action[1], tensor.chunk(2, dim=0)))
        else:
            pieces = {action[1]: tensor}
        for target, piece in pieces.items():
            if target in converted:
                raise KeymapError(f"{key} -> {target}: target already produced")
            converted[target] = piece
    if unknown:
        raise KeymapError(f"{len(unknown)} EoMT keys with no rule: {unknown[:10]}")
    for target, parts in fused.items():
        if variant == "eomt_dinov3" and target.endswith(".bias") and sorted(parts) == [0, 2]:
            parts[1] = torch.zeros_like(parts[0])
        if sorted(parts) != [0, 1, 2]:
            raise KeymapError(f"{target}: q/k/v parts {sorted(parts)} present, need all three")
        # rows [0, D) query, [D, 2D) key, [2D, 3D) value
        converted[target] = torch.cat([parts[index] for index in range(3)], dim=0)
    return converted, dropped


# this package's names -> HF names, the inverse of the tables above (the HF spelling transformers writes today:
# DINOv2 ``out_proj`` and ``gate_proj`` / ``up_proj`` / ``down_proj``, DINOv3 ``o_proj`` and ``up_proj`` /
# ``down_proj``); the fused ``qkv`` is split back into q / k / v rows
_OWN_COMMON: List[Tuple[str, Callable[[re.Match], str]]] = [
    (r"embeddings\.class_token", lambda m: "embeddings.cls_token"),
    (r"embeddings\.register_tokens", lambda m: "embeddings.register_tokens"),
    (r"blocks\.(\d+)\.norm([12])\." + _WB, lambda m: f"layers.{m[1]}.norm{m[2]}.{m[3]}"),
    (r"blocks\.(\d+)\.layer_scale([12])", lambda m: f"layers.{m[1]}.layer_scale{m[2]}.lambda1"),
    (r"norm\." + _WB, lambda m: f"layernorm.{m[1]}"),
    (r"queries\.weight", lambda m: "query.weight"),
    (r"upscale_layers\.(\d+)\.transposed_conv\." + _WB, lambda m: f"upscale_block.block.{m[1]}.conv1.{m[2]}"),
    (r"upscale_layers\.(\d+)\.depthwise_conv\.weight", lambda m: f"upscale_block.block.{m[1]}.conv2.weight"),
    (r"upscale_layers\.(\d+)\.norm\." + _WB, lambda m: f"upscale_block.block.{m[1]}.layernorm2d.{m[2]}"),
    (r"mask_head\.(fc1|fc2|fc3)\." + _WB, lambda m: f"mask_head.{m[1]}.{m[2]}"),
    (r"class_head\." + _WB, lambda m: f"class_predictor.{m[1]}"),
    (r"attention_mask_probabilities", lambda m: "attn_mask_probs"),
]
_OWN_DINOV2 = [
    (r"embeddings\.patch_projection\." + _WB, lambda m: f"embeddings.patch_embeddings.projection.{m[1]}"),
    (r"embeddings\.position_embeddings", lambda m: "embeddings.position_embeddings.weight"),
    (r"blocks\.(\d+)\.attention\.projection\." + _WB, lambda m: f"layers.{m[1]}.attention.out_proj.{m[2]}"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\." + _WB, lambda m: f"layers.{m[1]}.mlp.{m[2]}.{m[3]}"),
    (r"blocks\.(\d+)\.mlp\.(gate|up|down)\." + _WB, lambda m: f"layers.{m[1]}.mlp.{m[2]}_proj.{m[3]}"),
]
_OWN_DINOV3 = [
    (r"embeddings\.patch_projection\." + _WB, lambda m: f"embeddings.patch_embeddings.{m[1]}"),
    (r"blocks\.(\d+)\.attention\.projection\." + _WB, lambda m: f"layers.{m[1]}.attention.o_proj.{m[2]}"),
    (r"blocks\.(\d+)\.mlp\.fc1\." + _WB, lambda m: f"layers.{m[1]}.mlp.up_proj.{m[2]}"),
    (r"blocks\.(\d+)\.mlp\.fc2\." + _WB, lambda m: f"layers.{m[1]}.mlp.down_proj.{m[2]}"),
]
_OWN_COMPILED = {variant: [(re.compile(pattern), name) for pattern, name in _OWN_COMMON + rules]
                 for variant, rules in (("eomt", _OWN_DINOV2), ("eomt_dinov3", _OWN_DINOV3))}
_QKV = re.compile(r"blocks\.(\d+)\.attention\.qkv\." + _WB)


def to_hf_eomt(state_dict: Dict[str, torch.Tensor], variant: str = "eomt") -> Dict[str, torch.Tensor]:
    """This package's EoMT state dict -> the HF state dict of ``variant`` that ``convert_hf_eomt`` reads back
    key for key and value for value. DINOv3 has no key bias: the key rows of the fused bias are left out (read
    back as zeros; a bias on the keys adds one amount to all of a query's scores, which softmax ignores, so the
    network computes the same). Raises ``KeymapError`` on a key no rule claims."""
    if variant not in _OWN_COMPILED:
        raise KeymapError(f"unknown EoMT variant {variant!r} (one of {sorted(_OWN_COMPILED)})")
    converted: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = _QKV.fullmatch(key)
        if match:
            # rows [0, D) query, [D, 2D) key, [2D, 3D) value
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                if variant == "eomt_dinov3" and part == "k_proj" and match[2] == "bias":
                    continue
                converted[f"layers.{match[1]}.attention.{part}.{match[2]}"] = piece.clone()
            continue
        names = [name(found) for regex, name in _OWN_COMPILED[variant] if (found := regex.fullmatch(key))]
        if not names:
            unknown.append(key)
            continue
        converted[names[0]] = tensor
    if unknown:
        raise KeymapError(f"{len(unknown)} EoMT keys with no HF name: {unknown[:10]}")
    return converted
