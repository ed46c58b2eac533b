"""Hugging Face Mask2Former state dict -> detectron2 Mask2Former layout (without ``sem_seg_head.``).

``hf_to_detectron2(state_dict, config)`` is a pure function (no transformers import needed) that
turns the weights of a ``Mask2FormerForUniversalSegmentation`` (Swin or ResNet backbone) into::

    backbone.*            original Swin / D2SwinTransformer names (fused attn.qkv, norm{i}), or
                          detectron2 ResNet names (stem.conv1, res{2..5}.{b}.conv{1..3}, shortcut)
    pixel_decoder.*       detectron2 ``sem_seg_head.pixel_decoder.*`` (MSDeformAttnPixelDecoder)
    transformer_decoder.* detectron2 ``sem_seg_head.predictor.*``
                          (MultiScaleMaskedTransformerDecoder, class_embed included)

It accepts both key spellings HF uses for the Swin backbone: the in-memory names of transformers
5.x (``swin.encoder.layers.{i}.blocks.{j}.attention.q_proj``, ``mlp.fc1`` ...) and the on-disk
names that ``save_pretrained`` still writes and that the published ``facebook/mask2former-*``
safetensors use (``encoder.layers.{i}.blocks.{j}.attention.self.query``, ``intermediate.dense``,
``attention.self.relative_position_index`` ...), with or without the leading ``model.``.

Every input key is consumed exactly once: it is renamed, fused (q/k/v) or dropped for a stated
reason; an unknown key, a key two rules claim, two keys landing on one target or an incomplete
q/k/v triple raise ``KeymapError``. ``convert_hf_to_detectron2`` also returns the report.

See ``hf_keys.md`` beside this file for the tables and the behavioural notes.

Self-check (oracle venv, needs transformers; torchvision for the ResNet part)::

    .venv-oracle/bin/python tests/oracles/hf_keymap.py --self-check [--model-dir DIR ...]
"""
from __future__ import annotations

import re

import torch

from modelscope_plugin.checkpoints.hf import (  # noqa: F401
    KeymapError,
    KeymapReport,
    _config_get,
    convert_hf_to_detectron2,
    hf_to_detectron2,
    relative_position_index,
)


# --------------------------------------------------------------------------------------
def _reference_swin(weights, x, *, window, heads, depths, eps=1e-5):
    """D2SwinTransformer / original Swin forward (patch_norm, no ape, eval) from d2-layout weights.

    Returns {'res2'..'res5'} after norm{i}. Mirrors the original code: pad to the patch size,
    pad each block to a multiple of the window (after norm1), shifted blocks (odd index) always
    roll by window // 2 with the -100 region mask, whatever the feature size; patch merging
    pads odd sizes and concatenates x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2].
    """
    import torch.nn.functional as F
    w = weights
    patch = w['backbone.patch_embed.proj.weight'].shape[-1]
    height, width = x.shape[-2:]
    x = F.pad(x, (0, (-width) % patch, 0, (-height) % patch))
    x = F.conv2d(x, w['backbone.patch_embed.proj.weight'], w['backbone.patch_embed.proj.bias'], stride=patch)
    batch, channels, height, width = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (channels,), w['backbone.patch_embed.norm.weight'], w['backbone.patch_embed.norm.bias'], eps)
    index = relative_position_index(window).view(-1)
    shift = window // 2

    def partition(t):  # [B, H, W, C] -> [B * nW, window * window, C]
        b, h, w_, c = t.shape
        t = t.view(b, h // window, window, w_ // window, window, c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(-1, window * window, c)

    def merge(t, h, w_):  # inverse of partition
        c = t.shape[-1]
        t = t.view(-1, h // window, w_ // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(-1, h, w_, c)

    outputs = {}
    for stage, depth in enumerate(depths):
        padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
        region = torch.zeros(1, padded_h, padded_w, 1, dtype=x.dtype)
        count = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[:, hs, ws, :] = count
                count += 1
        region = partition(region).squeeze(-1)
        shift_mask = (region[:, None, :] - region[:, :, None]).ne(0).to(x.dtype) * -100.0
        num_heads = heads[stage]
        for block in range(depth):
            p = f'backbone.layers.{stage}.blocks.{block}.'
            shortcut = x
            x = F.layer_norm(x, (channels,), w[p + 'norm1.weight'], w[p + 'norm1.bias'], eps)
            x = F.pad(x.view(batch, height, width, channels), (0, 0, 0, padded_w - width, 0, padded_h - height))
            shifted = block % 2 == 1
            if shifted:
                x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            windows = partition(x)
            tokens = windows.shape[1]
            qkv = F.linear(windows, w[p + 'attn.qkv.weight'], w[p + 'attn.qkv.bias'])
            qkv = qkv.view(-1, tokens, 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4)
            query, key, value = qkv[0] * (channels // num_heads) ** -0.5, qkv[1], qkv[2]
            attention = query @ key.transpose(-2, -1)
            table = w[p + 'attn.relative_position_bias_table']
            attention = attention + table[index].view(tokens, tokens, -1).permute(2, 0, 1)[None]
            if shifted:
                num_windows = shift_mask.shape[0]
                attention = attention.view(-1, num_windows, num_heads, tokens, tokens) + shift_mask[None, :, None]
                attention = attention.view(-1, num_heads, tokens, tokens)
            attended = (attention.softmax(-1) @ value).transpose(1, 2).reshape(-1, tokens, channels)
            attended = F.linear(attended, w[p + 'attn.proj.weight'], w[p + 'attn.proj.bias'])
            x = merge(attended, padded_h, padded_w)
            if shifted:
                x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
            x = shortcut + x[:, :height, :width, :].reshape(batch, height * width, channels)
            hidden = F.layer_norm(x, (channels,), w[p + 'norm2.weight'], w[p + 'norm2.bias'], eps)
            hidden = F.linear(F.gelu(F.linear(hidden, w[p + 'mlp.fc1.weight'], w[p + 'mlp.fc1.bias'])),
                              w[p + 'mlp.fc2.weight'], w[p + 'mlp.fc2.bias'])
            x = x + hidden
        out = F.layer_norm(x, (channels,), w[f'backbone.norm{stage}.weight'], w[f'backbone.norm{stage}.bias'], eps)
        outputs[f'res{stage + 2}'] = out.view(batch, height, width, channels).permute(0, 3, 1, 2)
        if stage < len(depths) - 1:
            p = f'backbone.layers.{stage}.downsample.'
            grid = F.pad(x.view(batch, height, width, channels), (0, 0, 0, width % 2, 0, height % 2))
            grid = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], -1)
            height, width = grid.shape[1], grid.shape[2]
            x = grid.view(batch, -1, 4 * channels)
            x = F.layer_norm(x, (4 * channels,), w[p + 'norm.weight'], w[p + 'norm.bias'], eps)
            x = F.linear(x, w[p + 'reduction.weight'])
            channels *= 2
    return outputs


def _detectron2_resnet_to_torchvision(weights):
    renamed = {}
    for key, tensor in weights.items():
        if not key.startswith('backbone.'):
            continue
        name = key[len('backbone.'):]
        name = name.replace('stem.conv1.norm.', 'bn1.').replace('stem.conv1.', 'conv1.')
        name = re.sub(r'^res(\d)\.', lambda m: f'layer{int(m[1]) - 1}.', name)
        name = re.sub(r'\.conv(\d)\.norm\.', r'.bn\1.', name)
        name = name.replace('.shortcut.norm.', '.downsample.1.').replace('.shortcut.', '.downsample.0.')
        renamed[name] = tensor
    return renamed


def _randomize(model, seed):
    """Non-trivial values for every parameter and BatchNorm statistic (norms included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith('running_var'):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif tensor.dim() <= 1:
                tensor.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * noise)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(noise * fan_in ** -0.5)
        for name, module in model.named_modules():
            if hasattr(module, 'relative_position_bias_table'):
                module.relative_position_bias_table.copy_(
                    torch.randn(module.relative_position_bias_table.shape, generator=generator) * 0.5)


def self_check(model_dirs=()):
    """Conversion of in-memory and saved keys, q/k/v order, Swin and ResNet numerics."""
    import sys
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import hf_oracle
    from transformers import Mask2FormerForUniversalSegmentation

    torch.manual_seed(0)
    checks = []

    def build(preset, **overrides):
        args = type('Args', (), dict(backbone=preset, **overrides))()
        options = hf_oracle.resolve_options(args)
        config = hf_oracle.build_config(options)
        model = Mask2FormerForUniversalSegmentation(config).eval()
        _randomize(model, 1)
        return model

    swin = build('swin-tiny-test')
    resnet = build('r50', resnet_depths=[1, 2, 1, 1], hidden_dim=64, encoder_layers=1, decoder_layers=2,
                   num_queries=10, dim_feedforward=64, encoder_feedforward_dim=64)
    for label, model in (('swin', swin), ('resnet', resnet)):
        memory, report = convert_hf_to_detectron2(model.state_dict(), model.config)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            saved_state = load_file(str(Path(folder) / 'model.safetensors'))
        saved, saved_report = convert_hf_to_detectron2(saved_state, model.config.to_dict())
        assert set(memory) == set(saved), set(memory) ^ set(saved)
        assert all(torch.equal(memory[k], saved[k]) for k in memory)
        consumed = sum(len(v) for v in report.sources.values()) + len(report.dropped)
        assert consumed == len(model.state_dict())
        checks.append(f'{label}: {len(model.state_dict())} in-memory keys and {len(saved_state)} saved keys '
                      f'-> the same {len(memory)} detectron2 keys; dropped: {sorted(set(report.dropped.values()))}')

    # Decoder self-attention: nn.MultiheadAttention with the fused in_proj == HF's q/k/v module.
    converted = hf_to_detectron2(swin.state_dict(), swin.config)
    layer = swin.model.transformer_module.decoder.layers[1]
    dims, heads = swin.config.hidden_dim, swin.config.num_attention_heads
    attention = torch.nn.MultiheadAttention(dims, heads)
    prefix = 'transformer_decoder.transformer_self_attention_layers.1.self_attn.'
    attention.load_state_dict({k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)})
    queries, position = torch.randn(7, 2, dims), torch.randn(7, 2, dims)
    with torch.no_grad():
        ours = attention(queries + position, queries + position, queries)[0]
        theirs = layer.self_attn(hidden_states=queries, position_embeddings=position)[0]
    error = (ours - theirs).abs().max().item()
    assert error < 1e-5, error
    checks.append(f'decoder self-attention, fused in_proj vs HF q/k/v: max abs diff {error:.1e}')

    # Swin backbone, odd input size (padding everywhere) and late stages smaller than the window.
    pixels = torch.randn(2, 3, 100, 134, dtype=torch.float64)
    for model in (swin, build('swin-tiny-test', window_size=12)):
        model = model.double()
        weights = hf_to_detectron2(model.state_dict(), model.config)
        with torch.no_grad():
            hf_maps = model.model.pixel_level_module.encoder(pixels).feature_maps
        bc = model.config.backbone_config
        ref_maps = _reference_swin(weights, pixels, window=bc.window_size, heads=bc.num_heads, depths=bc.depths)
        for name, hf_map in zip(('res2', 'res3', 'res4', 'res5'), hf_maps):
            error = (ref_maps[name] - hf_map).abs().max().item()
            assert ref_maps[name].shape == hf_map.shape and error < 1e-9, (name, error)
        checks.append(f'Swin (window {bc.window_size}) on 100x134 float64, reference original-Swin '
                      f'forward from converted keys vs HF SwinBackbone: equal to <1e-9 at '
                      f'{[tuple(m.shape[-2:]) for m in hf_maps]}')

    # ResNet: torchvision Bottleneck (stride in the 3x3 = detectron2 STRIDE_IN_1X1 False) + BN stats.
    try:
        import torchvision
    except ImportError:
        checks.append('resnet numerics skipped (no torchvision)')
    else:
        from torchvision.models.resnet import Bottleneck, ResNet
        reference = ResNet(Bottleneck, list(resnet.config.backbone_config.depths)).eval().double()
        tv_weights = _detectron2_resnet_to_torchvision(hf_to_detectron2(resnet.state_dict(), resnet.config))
        missing, unexpected = reference.load_state_dict(tv_weights, strict=False)
        assert not unexpected and all(k.endswith('num_batches_tracked') or k.startswith('fc.') for k in missing)
        resnet_backbone = resnet.model.pixel_level_module.encoder.double().eval()
        pixels = torch.randn(1, 3, 96, 128, dtype=torch.float64)
        with torch.no_grad():
            hf_maps = resnet_backbone(pixels).feature_maps
            x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(pixels.double()))))
            tv_maps = []
            for stage in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
                x = stage(x)
                tv_maps.append(x)
        for hf_map, tv_map in zip(hf_maps, tv_maps):
            error = (hf_map - tv_map).abs().max().item()
            assert error < 1e-9, error
        checks.append(f'ResNet: torchvision Bottleneck ResNet from converted keys vs HF ResNetBackbone: '
                      f'equal to <1e-9 (torchvision {torchvision.__version__})')

    for model_dir in model_dirs:
        import json
        state = load_file(str(Path(model_dir) / 'model.safetensors'))
        with open(Path(model_dir) / 'config.json') as f:
            config = json.load(f)
        converted, report = convert_hf_to_detectron2(state, config)
        checks.append(f'{model_dir}: {len(state)} keys -> {len(converted)} detectron2 keys, '
                      f'{len(report.dropped)} dropped')
    return checks


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description='self-check of hf_to_detectron2')
    parser.add_argument('--self-check', action='store_true', required=True)
    parser.add_argument('--model-dir', nargs='*', default=[], help='also convert these saved HF folders')
    arguments = parser.parse_args()
    for line in self_check(arguments.model_dir):
        print('ok:', line)

