"""Reference ("oracle") outputs of Hugging Face transformers' Mask2Former with random weights.

Runs inside the oracle venv (``.venv-oracle``, transformers >= 4.40 on the runtime venv's torch).
Two subcommands:

``make``  builds a ``Mask2FormerForUniversalSegmentation`` whose configuration mirrors a
          published ``facebook/mask2former-*-coco-panoptic`` model (or a tiny test variant), gives
          it seeded random weights shaped so that its outputs are not degenerate (see
          ``shape_weights``) and writes it with ``save_pretrained`` (config.json +
          model.safetensors) plus ``oracle_meta.json`` (preset, options, query roles, versions).
``run``   loads such a folder (or any HF Mask2Former folder) and stores, for the images in an
          ``.npz`` (``pixel_values`` float32 [B,3,H,W], already normalized and padded), the
          last-layer logits, the per-layer logits and the intermediate tensors of every stage.
``keys``  prints, for a preset, the HF -> detectron2 key table (patterns, counts, shapes) as
          markdown, from ``hf_keymap.convert_hf_to_detectron2`` (used to write ``hf_keys.md``).

Examples::

    .venv-oracle/bin/python tests/oracles/hf_oracle.py make --backbone swin-tiny-test --seed 0 \\
        --out-dir /tmp/hf_tiny
    .venv-oracle/bin/python tests/oracles/hf_oracle.py run --model-dir /tmp/hf_tiny \\
        --pixels /tmp/in.npz --result /tmp/out.npz [--dtype float64]

Presets (``--backbone``)::

    swin-tiny-test  Swin embed 32, depths 2-2-2-2, heads 1-2-4-8, window 7; hidden = mask = pixel
                    decoder dim 64, 4 heads, 2 encoder layers, 3 masked-attention decoder layers,
                    20 queries, FFN 128 (decoder and encoder) -- the tiny_config of tests/conftest.py
    swin-t          = facebook/mask2former-swin-tiny-coco-panoptic  (96, 2-2-6-2, 3-6-12-24, w7, 100 q)
    swin-b          = facebook/mask2former-swin-base-coco-panoptic  (128, 2-2-18-2, 4-8-16-32, w12, 100 q)
    swin-l          = facebook/mask2former-swin-large-coco-panoptic (192, 2-2-18-2, 6-12-24-48, w12, 200 q)
    r50             = detectron2 maskformer2_R50_bs16_50ep (COCO panoptic): HF ResNetBackbone
                      (bottleneck 3-4-6-3, stride in the 3x3 conv) with 100 queries. transformers
                      lists only "swin" in Mask2FormerConfig.backbones_supported and logs a
                      warning, but the model builds and runs with a ResNet backbone.
    All full presets: 133 COCO panoptic labels, hidden 256, 8 heads, 6 deformable encoder layers
    (FFN 1024), 9 masked-attention decoder layers (HF ``decoder_layers=10`` = detectron2
    ``DEC_LAYERS=10``: both build DEC_LAYERS - 1 layers), FFN 2048.

``--decoder-layers N`` always means N masked-attention layers (the HF config gets N + 1).

NPZ written by ``run`` (B images, Q queries, C labels, L decoder layers, D hidden dim,
M mask dim; arrays in the run dtype, float32 by default)::

    class_queries_logits            [B,Q,C+1]        last layer (== HF output.class_queries_logits)
    masks_queries_logits            [B,Q,H/4,W/4]    last layer (== HF output.masks_queries_logits)
    class_queries_logits_per_layer  [L+1,B,Q,C+1]    entry 0: heads applied to the learnable queries
                                                     before decoder layer 0 (detectron2
                                                     predictions_class[0]); entry l: after layer l-1
    masks_queries_logits_per_layer  [L+1,B,Q,H/4,W/4] same indexing (absent with --no-per-layer-masks)
    decoder_query_states            [L+1,B,Q,D]      raw query states: 0 = query_feat, l = output of
                                                     decoder layer l-1 (before decoder_norm)
    decoder_normed_states           [L+1,B,Q,D]      decoder_norm(decoder_query_states): the input of
                                                     class_embed and mask_embed
    backbone_res2 .. backbone_res5  [B,C_s,H/s,W/s]  backbone feature maps, s = 4, 8, 16, 32 (Swin:
                                                     after the per-stage norm{i}; ResNet: raw)
    pixel_decoder_input_proj_res5/_res4/_res3  [B,D,h,w]  input_proj outputs (GroupNorm'd), the
                                                     deformable encoder's inputs (level 0 = res5)
    pixel_decoder_multi_scale_0/_1/_2          [B,D,h,w]  multi_scale_features in detectron2 order:
                                                     0 = 1/32, 1 = 1/16, 2 = 1/8 (the encoder output)
    pixel_decoder_fpn_res2          [B,D,H/4,W/4]    output of layer_1 (input of mask_features)
    pixel_decoder_mask_features     [B,M,H/4,W/4]    mask_features conv output
    meta_json                       str scalar       model_dir, dtype, device, input shape,
                                                     versions, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
CATEGORIES_JSON = REPO_ROOT.parent / 'shared' / 'data' / 'coco' / 'panoptic_coco_categories.json'
STAGE_STRIDES = {'res2': 4, 'res3': 8, 'res4': 16, 'res5': 32}

# Values of the published models (config.json of facebook/mask2former-swin-*-coco-panoptic and
# detectron2's configs/coco/panoptic-segmentation/*.yaml).
_FULL_HEAD = dict(hidden_dim=256, num_attention_heads=8, encoder_layers=6, decoder_layers=9,
                  dim_feedforward=2048, encoder_feedforward_dim=1024, num_labels=133)
PRESETS = {
    'swin-tiny-test': dict(backbone='swin', embed_dim=32, depths=[2, 2, 2, 2], swin_heads=[1, 2, 4, 8],
                           window_size=7, image_size=224, drop_path_rate=0.0, hidden_dim=64,
                           num_attention_heads=4, encoder_layers=2, decoder_layers=3,
                           dim_feedforward=128, encoder_feedforward_dim=128, num_queries=20,
                           num_labels=133),
    'swin-t': dict(backbone='swin', embed_dim=96, depths=[2, 2, 6, 2], swin_heads=[3, 6, 12, 24],
                   window_size=7, image_size=224, drop_path_rate=0.3, num_queries=100, **_FULL_HEAD),
    'swin-b': dict(backbone='swin', embed_dim=128, depths=[2, 2, 18, 2], swin_heads=[4, 8, 16, 32],
                   window_size=12, image_size=384, drop_path_rate=0.3, num_queries=100, **_FULL_HEAD),
    'swin-l': dict(backbone='swin', embed_dim=192, depths=[2, 2, 18, 2], swin_heads=[6, 12, 24, 48],
                   window_size=12, image_size=384, drop_path_rate=0.3, num_queries=200, **_FULL_HEAD),
    'r50': dict(backbone='resnet', resnet_depths=[3, 4, 6, 3], num_queries=100, **_FULL_HEAD),
}
SHAPING_DEFAULTS = dict(residual_scale=0.15, class_margin=14.0, mask_logit_std=4.0, mask_bias=3.0,
                        mask_bias_spread=1.0)


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def coco_panoptic_id2label(num_labels):
    """Contiguous index -> name, the id2label of the facebook/*-coco-panoptic configs."""
    if num_labels == 133 and CATEGORIES_JSON.is_file():
        with open(CATEGORIES_JSON) as f:
            categories = json.load(f)
        return {index: category['name'] for index, category in enumerate(categories)}, 80
    if num_labels == 133:
        print(f'warning: {CATEGORIES_JSON} not found, using LABEL_i names', file=sys.stderr)
    return {index: f'LABEL_{index}' for index in range(num_labels)}, round(0.6 * num_labels)


def resolve_options(args):
    """Preset values, overridden by the CLI options that were given."""
    options = dict(PRESETS[args.backbone])
    for key in ('embed_dim', 'depths', 'swin_heads', 'window_size', 'image_size', 'hidden_dim',
                'num_attention_heads', 'encoder_layers', 'decoder_layers', 'dim_feedforward',
                'encoder_feedforward_dim', 'num_queries', 'num_labels', 'resnet_depths'):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    for key, default in SHAPING_DEFAULTS.items():
        value = getattr(args, key, None)
        options[key] = default if value is None else value
    options['preset'] = args.backbone
    return options


def build_config(options):
    from transformers import Mask2FormerConfig, ResNetConfig, SwinConfig
    stages = ['stage1', 'stage2', 'stage3', 'stage4']
    if options['backbone'] == 'swin':
        backbone_config = SwinConfig(
            image_size=options['image_size'], patch_size=4, num_channels=3,
            embed_dim=options['embed_dim'], depths=list(options['depths']),
            num_heads=list(options['swin_heads']), window_size=options['window_size'],
            mlp_ratio=4.0, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            drop_path_rate=options['drop_path_rate'], hidden_act='gelu',
            use_absolute_embeddings=False, layer_norm_eps=1e-5, out_features=stages)
    else:
        # detectron2 R50 as used by Mask2Former: torchvision-style bottleneck (stride in the 3x3
        # conv, STRIDE_IN_1X1=False), basic stem (7x7/2 conv + 3x3/2 max pool), FrozenBN.
        backbone_config = ResNetConfig(
            num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
            depths=list(options['resnet_depths']), layer_type='bottleneck', hidden_act='relu',
            downsample_in_first_stage=False, downsample_in_bottleneck=False, out_features=stages)
    id2label, _ = coco_panoptic_id2label(options['num_labels'])
    dim = options['hidden_dim']
    return Mask2FormerConfig(
        backbone_config=backbone_config,
        feature_size=dim, mask_feature_size=dim, hidden_dim=dim,
        encoder_feedforward_dim=options['encoder_feedforward_dim'],
        activation_function='relu',
        encoder_layers=options['encoder_layers'],
        decoder_layers=options['decoder_layers'] + 1,  # HF builds decoder_layers - 1 layers
        num_attention_heads=options['num_attention_heads'],
        dropout=0.0, dim_feedforward=options['dim_feedforward'], pre_norm=False,
        enforce_input_projection=False, common_stride=4, ignore_value=255,
        num_queries=options['num_queries'], no_object_weight=0.1, class_weight=2.0,
        mask_weight=5.0, dice_weight=5.0, train_num_points=12544, oversample_ratio=3.0,
        importance_sample_ratio=0.75, init_std=0.02, init_xavier_std=1.0,
        use_auxiliary_loss=True, feature_strides=[4, 8, 16, 32],
        id2label=id2label, label2id={name: index for index, name in id2label.items()})


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
def _normal(shape, generator, std=1.0):
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


def calibration_pixels(generator, height=256, width=256):
    """A smooth synthetic image, normalized like ImageNet-normalized pixels (about N(0,1))."""
    coarse = _normal((1, 3, height // 32, width // 32), generator)
    medium = _normal((1, 3, height // 8, width // 8), generator) * 0.5
    image = (nn.functional.interpolate(coarse, size=(height, width), mode='bicubic', align_corners=False)
             + nn.functional.interpolate(medium, size=(height, width), mode='bilinear', align_corners=False))
    image = image + _normal(image.shape, generator, 0.1)
    return (image - image.mean()) / image.std()


@torch.no_grad()
def jitter_affine_and_biases(model, generator):
    """Moves norm affine parameters and all-zero biases away from 1 / 0.

    HF initialises every LayerNorm/GroupNorm/BatchNorm to weight 1, bias 0 and most biases to 0:
    a re-implementation that swaps two norms, drops a bias or splits q/k/v biases wrongly would
    still match. BatchNorm running statistics are left alone (see calibrate_batch_norms).
    """
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            if module.weight is not None:
                module.weight.copy_(1.0 + _normal(module.weight.shape, generator, 0.1))
                module.bias.copy_(_normal(module.bias.shape, generator, 0.1))
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            if torch.count_nonzero(module.bias) == 0:
                module.bias.copy_(_normal(module.bias.shape, generator, 0.02))
        elif isinstance(module, nn.MultiheadAttention) and torch.count_nonzero(module.in_proj_bias) == 0:
            module.in_proj_bias.copy_(_normal(module.in_proj_bias.shape, generator, 0.02))


@torch.no_grad()
def shape_swin(backbone, generator):
    """LeCun-normal linear layers and a non-zero relative position bias table.

    HF's Swin init (normal std 0.02, zero bias table) makes every attention uniform and every
    residual branch ~1e-3 of the stream, so errors in q/k/v, the bias table index or the MLP
    would be invisible.
    """
    for module in backbone.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(_normal(module.weight.shape, generator, module.in_features ** -0.5))
        if isinstance(getattr(module, 'relative_position_bias_table', None), nn.Parameter):
            table = module.relative_position_bias_table
            table.copy_(_normal(table.shape, generator, 0.5))


@torch.no_grad()
def calibrate_batch_norms(backbone, pixels):
    """Sets BatchNorm running statistics from one forward pass (cumulative average).

    With HF's init (running mean 0, var 1) a random ResNet-50 is not normalized at all and its
    activations grow by orders of magnitude per stage, which ruins absolute tolerances.
    """
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    backbone(pixels)
    for norm in norms:
        norm.momentum = 0.1
        norm.eval()


@torch.no_grad()
def shape_deformable_attention(pixel_decoder, generator):
    """Query-dependent sampling offsets / attention weights; LeCun-normal encoder FFNs.

    HF (like Deformable DETR) initialises sampling_offsets.weight and attention_weights to zero:
    fixed offsets and uniform weights would hide errors in those projections.
    """
    for layer in pixel_decoder.encoder.layers:
        attention = layer.self_attn
        fan_in = attention.sampling_offsets.in_features
        attention.sampling_offsets.weight.copy_(
            _normal(attention.sampling_offsets.weight.shape, generator, 0.5 / fan_in ** 0.5))
        attention.sampling_offsets.bias.add_(_normal(attention.sampling_offsets.bias.shape, generator, 0.2))
        attention.attention_weights.weight.copy_(
            _normal(attention.attention_weights.weight.shape, generator, 1.0 / fan_in ** 0.5))
        attention.attention_weights.bias.copy_(_normal(attention.attention_weights.bias.shape, generator, 0.3))
        for linear in (layer.fc1, layer.fc2):
            linear.weight.copy_(_normal(linear.weight.shape, generator, linear.in_features ** -0.5))


@torch.no_grad()
def shrink_decoder_residuals(decoder, scale):
    """Scales every masked-attention decoder sub-layer's output projection by ``scale``.

    The decoder is post-norm (x = LN(x + f(x))); with xavier-sized branches each of the 3 x L
    sub-layers replaces the query instead of refining it and all queries end up alike.
    """
    for layer in decoder.layers:
        for linear in (layer.self_attn.out_proj, layer.cross_attn.out_proj, layer.fc2):
            linear.weight.mul_(scale)
            linear.bias.mul_(scale)


def assign_query_roles(num_queries, num_labels, num_things, generator):
    """Intended outcome per query: 'thing'/'stuff' (one confident class), 'unsure' (two
    classes, score about 0.5, below the usual 0.8 object threshold) or 'void' (no-object)."""
    num_stuff_classes = num_labels - num_things
    counts = {'thing': max(1, round(0.35 * num_queries)), 'stuff': max(1, round(0.3 * num_queries)),
              'unsure': max(1, round(0.1 * num_queries))}
    counts['void'] = num_queries - sum(counts.values())
    # Small pools, so several queries share a class (instances / stuff to merge).
    thing_pool = torch.randperm(num_things, generator=generator)[:max(2, counts['thing'] // 2)]
    stuff_pool = num_things + torch.randperm(num_stuff_classes, generator=generator)[:max(2, counts['stuff'] // 2)]

    def draw(pool):
        return int(pool[int(torch.randint(len(pool), (1,), generator=generator))])

    roles = ([('thing', [draw(thing_pool)]) for _ in range(counts['thing'])]
             + [('stuff', [draw(stuff_pool)]) for _ in range(counts['stuff'])]
             + [('unsure', torch.randperm(num_labels, generator=generator)[:2].tolist())
                for _ in range(counts['unsure'])]
             + [('void', [num_labels]) for _ in range(counts['void'])])
    order = torch.randperm(num_queries, generator=generator).tolist()
    return [roles[index] for index in order]


@torch.no_grad()
def shape_queries_and_class_head(model, roles, class_margin, generator):
    """Class head row c = margin / sqrt(D) * u_c (u_c zero-mean unit vectors); query_feat of a
    query meant for classes S points along sum_{c in S} u_c. After the decoder LayerNorms a
    query has norm ~sqrt(D): its own class logit is ~margin, the others ~N(0, margin^2 / D)."""
    head = model.class_predictor
    queries = model.model.transformer_module.queries_features
    dims = queries.embedding_dim
    prototypes = _normal((head.out_features, dims), generator)
    prototypes -= prototypes.mean(dim=1, keepdim=True)
    prototypes /= prototypes.norm(dim=1, keepdim=True)
    head.weight.copy_(prototypes * class_margin / dims ** 0.5)
    head.bias.copy_(_normal((head.out_features,), generator, 0.1))
    directions = torch.stack([prototypes[classes].sum(dim=0) for _, classes in roles])
    directions /= directions.norm(dim=1, keepdim=True)
    noise = _normal(directions.shape, generator, 0.15 / dims ** 0.5)
    queries.weight.copy_((directions + noise) * dims ** 0.5)


@torch.no_grad()
def shape_mask_branch(model, options, calibration, generator):
    """Mask logit(q, pixel) = offset_q + m_q . F(pixel) with zero-mean F: sparse, content-driven masks.

    * mask_features (1x1 conv): the last output channel is the constant 1 (zero weights, bias 1);
      the other rows are zero-sum, so the common mode of their non-negative (GroupNorm + ReLU)
      inputs cancels, and their biases cancel the remaining mean on a calibration image: those
      channels have about zero mean over any image.
    * mask_embed's last linear layer: the rows of the non-constant channels are rescaled so the
      image-dependent part has a spatial std of about ``mask_logit_std`` (measured on a synthetic
      calibration image); the constant channel's row gives each query an offset of mean
      ``-mask_bias`` and spread ``mask_bias_spread`` across queries.
    """
    pixel_decoder = model.model.pixel_level_module.decoder
    conv = pixel_decoder.mask_projection
    out_channels, in_channels = conv.weight.shape[:2]
    const = out_channels - 1
    weight = _normal((out_channels, in_channels), generator, in_channels ** -0.5)
    weight -= weight.mean(dim=1, keepdim=True)
    weight[const] = 0.0
    conv.weight.copy_(weight.view_as(conv.weight))
    bias = torch.zeros(out_channels)
    bias[const] = 1.0
    conv.bias.copy_(bias)

    # The zero-sum rows remove most of the common mode; the bias removes the rest as measured on
    # the calibration image (so F has exactly zero mean there, about zero mean elsewhere).
    features = model.model.pixel_level_module(calibration).decoder_last_hidden_state[0]  # [M, h, w]
    means = features.flatten(1).mean(dim=1)
    means[const] = 0.0
    conv.bias.sub_(means)
    features = features - means[:, None, None]
    # Measure the spatial spread of m_q . F on the calibration image.
    decoder = model.model.transformer_module.decoder
    hidden = decoder.layernorm(model.model.transformer_module.queries_features.weight)    # [Q, D]
    embedder = decoder.mask_predictor.mask_embedder
    last = embedder.layers[-1].layers[0]
    penultimate = hidden
    for block in embedder.layers[:-1]:
        penultimate = block(penultimate)
    embeddings = last(penultimate)                                                         # [Q, M]
    logits = torch.einsum('qm,mhw->qhw', embeddings[:, :const], features[:const])
    spread = logits.flatten(1).std(dim=1).mean()
    last.weight[:const].mul_(options['mask_logit_std'] / spread)
    last.bias[:const].mul_(options['mask_logit_std'] / spread)
    # Constant channel: offset_q = w . penultimate_q + b, mean -mask_bias, spread across queries.
    direction = _normal((last.in_features,), generator)
    offsets = penultimate @ direction
    scale = options['mask_bias_spread'] / offsets.std().clamp_min(1e-6)
    last.weight[const] = direction * scale
    last.bias[const] = -options['mask_bias'] - offsets.mean() * scale


def shape_weights(model, options, seed):
    """Seeded changes to HF's random init so that outputs are not degenerate (module docstring)."""
    generator = torch.Generator().manual_seed(seed + 1)
    calibration = calibration_pixels(generator)
    backbone = model.model.pixel_level_module.encoder
    jitter_affine_and_biases(model, generator)
    if options['backbone'] == 'swin':
        shape_swin(backbone, generator)
    else:
        calibrate_batch_norms(backbone, calibration)
    shape_deformable_attention(model.model.pixel_level_module.decoder, generator)
    shrink_decoder_residuals(model.model.transformer_module.decoder, options['residual_scale'])
    _, num_things = coco_panoptic_id2label(options['num_labels'])
    roles = assign_query_roles(options['num_queries'], options['num_labels'], num_things, generator)
    shape_queries_and_class_head(model, roles, options['class_margin'], generator)
    shape_mask_branch(model, options, calibration, generator)
    return roles


# --------------------------------------------------------------------------------------
# make
# --------------------------------------------------------------------------------------
def make_model(options, seed, shaping=True):
    from transformers import Mask2FormerForUniversalSegmentation
    config = build_config(options)
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    roles = shape_weights(model, options, seed) if shaping else None
    return model, roles


def output_statistics(model, pixels):
    """Numbers that show whether outputs are degenerate (printed by ``make``)."""
    with torch.no_grad():
        output = model(pixels)
    classes = output.class_queries_logits[0].softmax(-1)
    scores, labels = classes.max(-1)
    masks = output.masks_queries_logits[0]
    coverage = (masks > 0).float().flatten(1).mean(1)
    no_object = classes.shape[-1] - 1
    return dict(
        distinct_argmax_labels=int(labels.unique().numel()),
        queries_no_object=int((labels == no_object).sum()),
        queries_score_above_0_8=int(((scores > 0.8) & (labels != no_object)).sum()),
        mask_coverage_min=float(coverage.min()), mask_coverage_median=float(coverage.median()),
        mask_coverage_max=float(coverage.max()),
        mask_logit_std=float(masks.flatten(1).std(1).mean()),
        distinct_pixel_argmax=int(masks.argmax(0).unique().numel()))


def command_make(args):
    import transformers
    from transformers import Mask2FormerForUniversalSegmentation
    options = resolve_options(args)
    start = time.time()
    model, roles = make_model(options, args.seed, shaping=not args.no_shaping)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    meta = dict(options=options, seed=args.seed, shaping=not args.no_shaping,
                roles=[dict(kind=kind, classes=classes) for kind, classes in roles] if roles else None,
                transformers_version=transformers.__version__, torch_version=torch.__version__,
                parameters=sum(p.numel() for p in model.parameters()))
    with open(out_dir / 'oracle_meta.json', 'w') as f:
        json.dump(meta, f, indent=1)
    # Round trip: the saved folder must load back to exactly these weights.
    reloaded = Mask2FormerForUniversalSegmentation.from_pretrained(out_dir).eval()
    ours, theirs = model.state_dict(), reloaded.state_dict()
    if set(ours) != set(theirs) or any(not torch.equal(ours[k], theirs[k]) for k in ours):
        raise AssertionError('save_pretrained/from_pretrained round trip changed the weights')
    generator = torch.Generator().manual_seed(args.seed + 2)
    stats = output_statistics(model, calibration_pixels(generator, 128, 160))
    print(json.dumps(dict(out_dir=str(out_dir), preset=options['preset'],
                          parameters=meta['parameters'], seconds=round(time.time() - start, 1),
                          statistics=stats), indent=1))


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------
def load_model(model_dir, dtype=torch.float32, device='cpu'):
    from transformers import Mask2FormerForUniversalSegmentation
    try:
        model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir, attn_implementation='eager')
    except (TypeError, ValueError):
        model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir)
    return model.to(device=device, dtype=dtype).eval()


def _numpy(tensor):
    return tensor.detach().cpu().numpy()


@torch.no_grad()
def run_model(model, pixel_values, per_layer_masks=True):
    """All outputs of one forward pass as a dict of numpy arrays (see the module docstring)."""
    captured = {}
    pixel_decoder = model.model.pixel_level_module.decoder
    hooks = []
    for level, projection in enumerate(pixel_decoder.input_projections):
        name = f'pixel_decoder_input_proj_res{5 - level}'
        hooks.append(projection.register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output)))
    hooks.append(pixel_decoder.mask_projection.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__('pixel_decoder_fpn_res2', inputs[0])))
    try:
        output = model.model(pixel_values, output_hidden_states=True, return_dict=True)
    finally:
        for hook in hooks:
            hook.remove()

    result = {}
    # [L+1] x (Q, B, D) -> [L+1, B, Q, D]
    normed = torch.stack([state.transpose(0, 1) for state in output.transformer_decoder_intermediate_states])
    raw = torch.stack([state.transpose(0, 1) for state in output.transformer_decoder_hidden_states])
    class_logits = model.class_predictor(normed)
    masks = output.masks_queries_logits
    result['class_queries_logits'] = _numpy(class_logits[-1])
    result['masks_queries_logits'] = _numpy(masks[-1])
    result['class_queries_logits_per_layer'] = _numpy(class_logits)
    if per_layer_masks:
        result['masks_queries_logits_per_layer'] = _numpy(torch.stack(masks))
    result['decoder_query_states'] = _numpy(raw)
    result['decoder_normed_states'] = _numpy(normed)
    for name, feature in zip(('res2', 'res3', 'res4', 'res5'), output.encoder_hidden_states):
        result[f'backbone_{name}'] = _numpy(feature)
    for key, value in captured.items():
        result[key] = _numpy(value)
    for level, feature in enumerate(output.pixel_decoder_hidden_states):
        result[f'pixel_decoder_multi_scale_{level}'] = _numpy(feature)
    result['pixel_decoder_mask_features'] = _numpy(output.pixel_decoder_last_hidden_state)
    return result


def command_run(args):
    import transformers
    dtype = {'float32': torch.float32, 'float64': torch.float64}[args.dtype]
    start = time.time()
    model = load_model(args.model_dir, dtype, args.device)
    with np.load(args.pixels) as data:
        pixel_values = torch.from_numpy(np.ascontiguousarray(data['pixel_values']))
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f'pixel_values must be [B,3,H,W], got {tuple(pixel_values.shape)}')
    pixel_values = pixel_values.to(device=args.device, dtype=dtype)
    loaded = time.time()
    result = run_model(model, pixel_values, per_layer_masks=not args.no_per_layer_masks)
    done = time.time()
    result['meta_json'] = np.array(json.dumps(dict(
        model_dir=str(args.model_dir), dtype=args.dtype, device=args.device,
        pixel_values_shape=list(pixel_values.shape), transformers_version=transformers.__version__,
        torch_version=torch.__version__, load_seconds=round(loaded - start, 3),
        forward_seconds=round(done - loaded, 3))))
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.result, **result)
    print(json.dumps(dict(result=str(args.result), load_seconds=round(loaded - start, 2),
                          forward_seconds=round(done - loaded, 2),
                          arrays={k: list(v.shape) for k, v in result.items() if k != 'meta_json'})))


# --------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------
def key_pattern(key):
    """Abstracts layer / block / stage indices: '.3.' -> '.{n}.', 'backbone.norm2' ->
    'backbone.norm{n}', 'stage4' -> 'stage{n}', 'res4' -> 'res{n}' (norm1, fc2, conv3 stay)."""
    import re
    key = re.sub(r'(?<=\.)\d+(?=\.|$)', '{n}', key)
    key = re.sub(r'^backbone\.norm\d+', 'backbone.norm{n}', key)
    return re.sub(r'\b(stage|res)\d+', r'\1{n}', key)


def _join_parts(keys):
    """['a.q_proj.w', 'a.k_proj.w', 'a.v_proj.w'] -> 'a.{q_proj,k_proj,v_proj}.w'."""
    if len(keys) == 1:
        return keys[0]
    prefix = os.path.commonprefix(keys)
    prefix = prefix[:prefix.rfind('.') + 1]
    suffix = os.path.commonprefix([k[::-1] for k in keys])[::-1]
    suffix = suffix[suffix.find('.'):]
    middles = [k[len(prefix):len(k) - len(suffix)] for k in keys]
    return prefix + '{' + ','.join(middles) + '}' + suffix


def _shapes(tensors):
    return ', '.join(str(list(shape)) for shape in sorted({tuple(t.shape) for t in tensors}, key=lambda s: (len(s), s)))


def command_keys(args):
    """Markdown tables: detectron2 key <- HF keys (in memory and as saved), with shapes."""
    import tempfile

    from safetensors.torch import load_file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_keymap import convert_hf_to_detectron2
    options = resolve_options(args)
    model, _ = make_model(options, 0, shaping=False)
    memory = model.state_dict()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        saved = load_file(str(Path(folder) / 'model.safetensors'))
    converted, memory_report = convert_hf_to_detectron2(memory, model.config)
    _, saved_report = convert_hf_to_detectron2(saved, model.config)
    rows = {}
    for target, tensor in converted.items():
        memory_keys = [k.replace('model.pixel_level_module.', 'model.plm.') for k in memory_report.sources[target]]
        saved_keys = [k.replace('model.pixel_level_module.', 'model.plm.') for k in saved_report.sources[target]]
        row = (key_pattern(target), _join_parts([key_pattern(k) for k in memory_keys]),
               _join_parts([key_pattern(k) for k in saved_keys]))
        entry = rows.setdefault(row, dict(count=0, target=[], sources=[]))
        entry['count'] += 1
        entry['target'].append(tensor)
        entry['sources'].append(memory[memory_report.sources[target][0]])
    print(f'<!-- generated: hf_oracle.py keys --backbone {args.backbone}; transformers '
          f'{__import__("transformers").__version__}; {len(memory)} HF keys in memory, {len(saved)} saved, '
          f'{len(converted)} detectron2 keys; model.plm. = model.pixel_level_module. -->')
    print('| detectron2 key | HF key, transformers 5 in memory | HF key as saved (hub files) | n | d2 shape(s) | HF shape(s) |')
    print('|---|---|---|---:|---|---|')
    for (target, in_memory, in_file), entry in rows.items():
        in_file = '(same)' if in_file == in_memory else f'`{in_file}`'
        print(f'| `{target}` | `{in_memory}` | {in_file} | {entry["count"]} | {_shapes(entry["target"])} | '
              f'{_shapes(entry["sources"])} |')
    dropped = {}
    for report, state in ((memory_report, memory), (saved_report, saved)):
        for key, reason in report.dropped.items():
            dropped.setdefault((key_pattern(key.replace('model.pixel_level_module.', 'model.plm.')), reason), set()).add(key)
    print()
    print('| dropped HF key | n | reason |')
    print('|---|---:|---|')
    for (pattern, reason), keys in dropped.items():
        print(f'| `{pattern}` | {len(keys)} | {reason} |')


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def _int_list(text):
    return [int(item) for item in text.replace(',', ' ').split()]


def add_model_options(parser):
    parser.add_argument('--backbone', default='swin-tiny-test', choices=sorted(PRESETS))
    group = parser.add_argument_group('overrides of the preset')
    group.add_argument('--embed-dim', type=int, help='Swin patch embedding channels')
    group.add_argument('--depths', type=_int_list, help='Swin blocks per stage, e.g. 2,2,6,2')
    group.add_argument('--swin-heads', type=_int_list, help='Swin attention heads per stage')
    group.add_argument('--window-size', type=int, help='Swin window size')
    group.add_argument('--image-size', type=int, help='SwinConfig.image_size (no effect on outputs)')
    group.add_argument('--resnet-depths', type=_int_list, help='ResNet bottlenecks per stage')
    group.add_argument('--hidden-dim', type=int, help='pixel decoder, mask and decoder dims (one value)')
    group.add_argument('--num-attention-heads', type=int, help='heads of deformable and decoder attention')
    group.add_argument('--encoder-layers', type=int, help='deformable encoder layers')
    group.add_argument('--decoder-layers', type=int,
                       help='masked-attention decoder layers (detectron2 DEC_LAYERS - 1)')
    group.add_argument('--dim-feedforward', type=int, help='decoder FFN width')
    group.add_argument('--encoder-feedforward-dim', type=int, help='deformable encoder FFN width')
    group.add_argument('--num-queries', type=int)
    group.add_argument('--num-labels', type=int)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)

    make = commands.add_parser('make', help='write a random-weight HF Mask2Former folder')
    add_model_options(make)
    make.add_argument('--seed', type=int, default=0)
    make.add_argument('--out-dir', required=True)
    shaping = make.add_argument_group('weight shaping')
    shaping.add_argument('--residual-scale', type=float,
                         help=f'factor on decoder attention/FFN output projections '
                              f'(default {SHAPING_DEFAULTS["residual_scale"]})')
    shaping.add_argument('--class-margin', type=float,
                         help=f'class logit of a query aligned with its class prototype '
                              f'(default {SHAPING_DEFAULTS["class_margin"]})')
    shaping.add_argument('--mask-logit-std', type=float,
                         help=f'spatial spread of the mask logits (default {SHAPING_DEFAULTS["mask_logit_std"]})')
    shaping.add_argument('--mask-bias', type=float,
                         help=f'mean negative mask-logit offset (default {SHAPING_DEFAULTS["mask_bias"]})')
    shaping.add_argument('--mask-bias-spread', type=float,
                         help=f'spread of that offset across queries (default {SHAPING_DEFAULTS["mask_bias_spread"]})')
    shaping.add_argument('--no-shaping', action='store_true', help="keep HF's init (degenerate outputs)")
    make.set_defaults(func=command_make)

    run = commands.add_parser('run', help='run a model folder on pixel_values from an npz')
    run.add_argument('--model-dir', required=True)
    run.add_argument('--pixels', required=True, help='npz with pixel_values float32 [B,3,H,W]')
    run.add_argument('--result', required=True, help='output npz')
    run.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    run.add_argument('--device', default='cpu')
    run.add_argument('--no-per-layer-masks', action='store_true',
                     help='omit masks_queries_logits_per_layer (large for big inputs)')
    run.set_defaults(func=command_run)

    keys = commands.add_parser('keys', help='print the HF -> detectron2 key table of a preset as markdown')
    add_model_options(keys)
    keys.set_defaults(func=command_keys)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == '__main__':
    main()
