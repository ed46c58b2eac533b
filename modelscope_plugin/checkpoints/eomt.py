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
