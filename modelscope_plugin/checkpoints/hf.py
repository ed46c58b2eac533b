"""Hugging Face ``Mask2FormerForUniversalSegmentation`` folders (config.json + safetensors) -> this package.

``hf_to_detectron2`` turns HF weights into detectron2 Mask2Former names (original Swin names with fused
``attn.qkv``, or detectron2 ResNet names; ``pixel_decoder.*``, ``transformer_decoder.*``), which
``keymaps.convert_detectron2`` then maps onto this package. Both HF key spellings are accepted: transformers
5's in-memory names (``swin.encoder...attention.q_proj``) and the on-disk names that ``save_pretrained`` and the
published ``facebook/mask2former-*`` files use (``attention.self.query``, ``intermediate.dense``). Every HF key is
consumed exactly once: renamed, fused (q/k/v, concatenated in that order along dim 0) or dropped for a stated
reason; anything else raises.

HF's Mask2Former Swin backbone keeps the shift and the full window at every size and pads bottom/right, like
detectron2 and mmdet, so no behaviour switch is needed; its image processor and post-processing differ from the
references (stretching instead of padding, 384x384 masks) and are not followed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from modelscope_plugin.errors import KeymapError
from modelscope_plugin.modeling.backbones.swin import relative_position_index


@dataclass
class KeymapReport:
    """sources: target key -> the HF key(s) it was built from (3 for fused q/k/v);
    dropped: HF key -> reason it has no detectron2 counterpart."""
    sources: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


# A rule: (regex over the HF key with the leading "model." removed, action builder).
# An action is ('rename', target) | ('fuse', target, part_index) | ('drop', reason).
_WB = r'(weight|bias)'
_BN = r'(weight|bias|running_mean|running_var)'


def swin_rules():
    """HF's Swin backbone (``pixel_level_module.encoder.*``), either key spelling, to the original Swin names."""
    prefix = r'pixel_level_module\.encoder\.(?:swin\.)?'
    block = prefix + r'encoder\.layers\.(\d+)\.blocks\.(\d+)\.'

    def blk(m):
        return f'backbone.layers.{m[1]}.blocks.{m[2]}.'

    qkv_part = {'q_proj': 0, 'self.query': 0, 'k_proj': 1, 'self.key': 1, 'v_proj': 2, 'self.value': 2}
    return [
        (prefix + r'embeddings\.patch_embeddings\.projection\.' + _WB,
         lambda m: ('rename', f'backbone.patch_embed.proj.{m[1]}')),
        (prefix + r'embeddings\.norm\.' + _WB, lambda m: ('rename', f'backbone.patch_embed.norm.{m[1]}')),
        (block + r'layernorm_before\.' + _WB, lambda m: ('rename', blk(m) + f'norm1.{m[3]}')),
        (block + r'layernorm_after\.' + _WB, lambda m: ('rename', blk(m) + f'norm2.{m[3]}')),
        (block + r'attention\.(q_proj|k_proj|v_proj|self\.query|self\.key|self\.value)\.' + _WB,
         lambda m: ('fuse', blk(m) + f'attn.qkv.{m[4]}', qkv_part[m[3]])),
        (block + r'attention\.(?:o_proj|output\.dense)\.' + _WB, lambda m: ('rename', blk(m) + f'attn.proj.{m[3]}')),
        (block + r'attention\.(?:relative_position_bias|self)\.relative_position_bias_table',
         lambda m: ('rename', blk(m) + 'attn.relative_position_bias_table')),
        (block + r'attention\.(?:relative_position_bias|self)\.relative_position_index',
         lambda m: ('drop', 'buffer computed from window_size (non-persistent in transformers 5)')),
        (block + r'(?:mlp\.fc1|intermediate\.dense)\.' + _WB, lambda m: ('rename', blk(m) + f'mlp.fc1.{m[3]}')),
        (block + r'(?:mlp\.fc2|output\.dense)\.' + _WB, lambda m: ('rename', blk(m) + f'mlp.fc2.{m[3]}')),
        (prefix + r'encoder\.layers\.(\d+)\.downsample\.reduction\.weight',
         lambda m: ('rename', f'backbone.layers.{m[1]}.downsample.reduction.weight')),
        (prefix + r'encoder\.layers\.(\d+)\.downsample\.norm\.' + _WB,
         lambda m: ('rename', f'backbone.layers.{m[1]}.downsample.norm.{m[2]}')),
        (r'pixel_level_module\.encoder\.hidden_states_norms\.stage(\d+)\.' + _WB,
         lambda m: ('rename', f'backbone.norm{int(m[1]) - 1}.{m[2]}')),
        (prefix + r'layernorm\.' + _WB,
         lambda m: ('drop', "SwinModel's final LayerNorm; SwinBackbone never applies it")),
        (prefix + r'embeddings\.position_embeddings',
         lambda m: ('error', 'absolute position embeddings (use_absolute_embeddings=True) are not supported')),
    ]


def _resnet_rules():
    prefix = r'pixel_level_module\.encoder\.'
    layer = prefix + r'encoder\.stages\.(\d+)\.layers\.(\d+)\.'

    def blk(m):
        return f'backbone.res{int(m[1]) + 2}.{m[2]}.'

    return [
        (prefix + r'embedder\.embedder\.convolution\.weight', lambda m: ('rename', 'backbone.stem.conv1.weight')),
        (prefix + r'embedder\.embedder\.normalization\.' + _BN,
         lambda m: ('rename', f'backbone.stem.conv1.norm.{m[1]}')),
        (layer + r'shortcut\.convolution\.weight', lambda m: ('rename', blk(m) + 'shortcut.weight')),
        (layer + r'shortcut\.normalization\.' + _BN, lambda m: ('rename', blk(m) + f'shortcut.norm.{m[3]}')),
        (layer + r'layer\.(\d+)\.convolution\.weight',
         lambda m: ('rename', blk(m) + f'conv{int(m[3]) + 1}.weight')),
        (layer + r'layer\.(\d+)\.normalization\.' + _BN,
         lambda m: ('rename', blk(m) + f'conv{int(m[3]) + 1}.norm.{m[4]}')),
        (prefix + r'.*\.num_batches_tracked',
         lambda m: ('drop', 'BatchNorm counter; detectron2 FrozenBatchNorm2d has none')),
    ]


def pixel_decoder_rules():
    """The MSDeformAttn pixel decoder (``pixel_level_module.decoder.*``), the same in HF Mask2Former and OneFormer."""
    pd = r'pixel_level_module\.decoder\.'
    enc = pd + r'encoder\.layers\.(\d+)\.'
    encoder_names = {'self_attn_layer_norm': 'norm1', 'fc1': 'linear1', 'fc2': 'linear2',
                     'final_layer_norm': 'norm2'}
    return [
        (pd + r'level_embed', lambda m: ('rename', 'pixel_decoder.transformer.level_embed')),
        (pd + r'input_projections\.(\d+)\.([01])\.' + _WB,
         lambda m: ('rename', f'pixel_decoder.input_proj.{m[1]}.{m[2]}.{m[3]}')),
        (enc + r'self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.' + _WB,
         lambda m: ('rename', f'pixel_decoder.transformer.encoder.layers.{m[1]}.self_attn.{m[2]}.{m[3]}')),
        (enc + r'(self_attn_layer_norm|fc1|fc2|final_layer_norm)\.' + _WB,
         lambda m: ('rename', f'pixel_decoder.transformer.encoder.layers.{m[1]}.{encoder_names[m[2]]}.{m[3]}')),
        (pd + r'mask_projection\.' + _WB, lambda m: ('rename', f'pixel_decoder.mask_features.{m[1]}')),
        (pd + r'(adapter|layer)_(\d+)\.0\.weight', lambda m: ('rename', f'pixel_decoder.{m[1]}_{m[2]}.weight')),
        (pd + r'(adapter|layer)_(\d+)\.1\.' + _WB,
         lambda m: ('rename', f'pixel_decoder.{m[1]}_{m[2]}.norm.{m[3]}')),
    ]


def _transformer_decoder_rules():
    tm = r'transformer_module\.'
    dec = tm + r'decoder\.layers\.(\d+)\.'
    ffn_names = {'fc1': 'linear1', 'fc2': 'linear2', 'final_layer_norm': 'norm'}
    qkv_part = {'q_proj': 0, 'k_proj': 1, 'v_proj': 2}
    sa = 'transformer_decoder.transformer_self_attention_layers.'
    ca = 'transformer_decoder.transformer_cross_attention_layers.'
    ffn = 'transformer_decoder.transformer_ffn_layers.'
    return [
        (tm + r'queries_embedder\.weight', lambda m: ('rename', 'transformer_decoder.query_embed.weight')),
        (tm + r'queries_features\.weight', lambda m: ('rename', 'transformer_decoder.query_feat.weight')),
        (tm + r'level_embed\.weight', lambda m: ('rename', 'transformer_decoder.level_embed.weight')),
        (tm + r'input_projections\.(\d+)\.' + _WB,
         lambda m: ('rename', f'transformer_decoder.input_proj.{m[1]}.{m[2]}')),
        (dec + r'self_attn\.(q_proj|k_proj|v_proj)\.' + _WB,
         lambda m: ('fuse', f'{sa}{m[1]}.self_attn.in_proj_{m[3]}', qkv_part[m[2]])),
        (dec + r'self_attn\.(?:out_proj|o_proj)\.' + _WB,
         lambda m: ('rename', f'{sa}{m[1]}.self_attn.out_proj.{m[2]}')),
        (dec + r'self_attn_layer_norm\.' + _WB, lambda m: ('rename', f'{sa}{m[1]}.norm.{m[2]}')),
        (dec + r'cross_attn\.(in_proj_weight|in_proj_bias)',
         lambda m: ('rename', f'{ca}{m[1]}.multihead_attn.{m[2]}')),
        (dec + r'cross_attn\.out_proj\.' + _WB,
         lambda m: ('rename', f'{ca}{m[1]}.multihead_attn.out_proj.{m[2]}')),
        (dec + r'cross_attn_layer_norm\.' + _WB, lambda m: ('rename', f'{ca}{m[1]}.norm.{m[2]}')),
        (dec + r'(fc1|fc2|final_layer_norm)\.' + _WB,
         lambda m: ('rename', f'{ffn}{m[1]}.{ffn_names[m[2]]}.{m[3]}')),
        (tm + r'decoder\.layernorm\.' + _WB, lambda m: ('rename', f'transformer_decoder.decoder_norm.{m[1]}')),
        (tm + r'decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.' + _WB,
         lambda m: ('rename', f'transformer_decoder.mask_embed.layers.{m[1]}.{m[2]}')),
        (r'class_predictor\.' + _WB, lambda m: ('rename', f'transformer_decoder.class_embed.{m[1]}')),
        (r'criterion\.empty_weight',
         lambda m: ('drop', 'loss buffer (detectron2 keeps it as criterion.empty_weight, outside sem_seg_head)')),
    ]


def _config_get(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def backbone_type(config):
    backbone = _config_get(config, 'backbone_config')
    model_type = _config_get(backbone, 'model_type') if backbone is not None else None
    if model_type not in ('swin', 'resnet'):
        raise KeymapError(f'unsupported backbone model_type {model_type!r} (swin or resnet)')
    return model_type, backbone


def apply_rules(state_dict: dict[str, Tensor], rule_table) -> tuple[dict[str, Tensor], KeymapReport]:
    """Every key of ``state_dict`` (a leading ``model.`` removed) through the one rule that claims it: renamed,
    fused (q/k/v rows stacked in that order) or dropped; a key no rule claims, a key two rules claim, a target
    produced twice or an incomplete q/k/v triple raises ``KeymapError``. Returns (converted, report)."""
    rules = [(re.compile(pattern), action) for pattern, action in rule_table]
    report = KeymapReport()
    converted: dict[str, Tensor] = {}
    fused: dict[str, dict[int, tuple[str, Tensor]]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        name = key[len('model.'):] if key.startswith('model.') else key
        actions = [action(match) for regex, action in rules if (match := regex.fullmatch(name))]
        if not actions:
            unknown.append(key)
            continue
        if len(actions) > 1:
            raise KeymapError(f'{key}: claimed by {len(actions)} rules: {actions}')
        action = actions[0]
        if action[0] == 'error':
            raise KeymapError(f'{key}: {action[1]}')
        if action[0] == 'drop':
            report.dropped[key] = action[1]
        elif action[0] == 'rename':
            target = action[1]
            if target in converted or target in fused:
                raise KeymapError(f'{key} -> {target}: target already produced by {report.sources[target]}')
            converted[target] = tensor
            report.sources[target] = [key]
        else:
            _, target, part = action
            parts = fused.setdefault(target, {})
            if part in parts or target in converted:
                raise KeymapError(f'{key} -> {target}[{part}]: already produced by {parts.get(part, (target,))[0]}')
            parts[part] = (key, tensor)
    if unknown:
        raise KeymapError(f'{len(unknown)} HF keys with no rule: {unknown[:10]}')
    for target, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise KeymapError(f'{target}: q/k/v parts {sorted(parts)} present, need all three')
        # PyTorch / original Swin packing: rows [0:C) query, [C:2C) key, [2C:3C) value.
        converted[target] = torch.cat([parts[index][1] for index in range(3)], dim=0)
        report.sources[target] = [parts[index][0] for index in range(3)]
    return converted, report


def convert_hf_to_detectron2(state_dict: dict[str, Tensor], config, *,
                             emit_relative_position_index: bool = False):
    """Returns (detectron2-layout state dict, KeymapReport). ``config``: Mask2FormerConfig or the
    dict of its config.json. ``emit_relative_position_index`` adds the Swin
    ``attn.relative_position_index`` buffers that detectron2 checkpoints carry."""
    source_backbone_type, backbone_config = backbone_type(config)
    converted, report = apply_rules(
        state_dict, (swin_rules() if source_backbone_type == 'swin' else _resnet_rules()) + pixel_decoder_rules()
        + _transformer_decoder_rules())
    if emit_relative_position_index and source_backbone_type == 'swin':
        window = int(_config_get(backbone_config, 'window_size'))
        index = relative_position_index(window)
        for target in list(converted):
            if target.endswith('.attn.relative_position_bias_table'):
                converted[target.replace('_bias_table', '_index')] = index.clone()
    _check_complete(converted, config, source_backbone_type, backbone_config)
    return converted, report


def hf_to_detectron2(state_dict: dict[str, Tensor], config, **options) -> dict[str, Tensor]:
    """HF Mask2Former state dict -> detectron2 layout (see the module docstring)."""
    return convert_hf_to_detectron2(state_dict, config, **options)[0]


def _count(converted, pattern):
    regex = re.compile(pattern)
    return len({match[1] for key in converted if (match := regex.match(key))})


def _check_complete(converted, config, backbone_type, backbone_config):
    """Layer counts and sizes implied by the config are all present."""
    problems = []
    num_layers = int(_config_get(config, 'decoder_layers')) - 1
    expectations = [
        (r'transformer_decoder\.transformer_self_attention_layers\.(\d+)\.', num_layers),
        (r'transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.', num_layers),
        (r'transformer_decoder\.transformer_ffn_layers\.(\d+)\.', num_layers),
        (r'pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.', int(_config_get(config, 'encoder_layers'))),
    ]
    depths = list(_config_get(backbone_config, 'depths'))
    if backbone_type == 'swin':
        expectations += [(rf'backbone\.layers\.{stage}\.blocks\.(\d+)\.', depth) for stage, depth in enumerate(depths)]
        expectations.append((r'backbone\.norm(\d+)\.', len(depths)))
    else:
        expectations += [(rf'backbone\.res{stage + 2}\.(\d+)\.', depth) for stage, depth in enumerate(depths)]
    for pattern, expected in expectations:
        found = _count(converted, pattern)
        if found != expected:
            problems.append(f'{pattern}: {found} indices, config says {expected}')
    queries = converted.get('transformer_decoder.query_feat.weight')
    if queries is None or queries.shape[0] != int(_config_get(config, 'num_queries')):
        problems.append('transformer_decoder.query_feat.weight missing or not num_queries rows')
    id2label = _config_get(config, 'id2label')
    classes = converted.get('transformer_decoder.class_embed.weight')
    if classes is None or (id2label and classes.shape[0] != len(id2label) + 1):
        problems.append('transformer_decoder.class_embed.weight missing or not num_labels + 1 rows')
    if problems:
        raise KeymapError('incomplete conversion: ' + '; '.join(problems))
