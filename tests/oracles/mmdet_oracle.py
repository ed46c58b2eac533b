"""Reference ("oracle") outputs of ModelScope's built-in mmdet Mask2Former pipelines.

Runs inside the oracle venv (``.venv-oracle``: mmcv 1.7.2 without compiled ops, mmdet 2.28.2,
modelscope 1.40.2). It

1. builds the mmdet 2.x Mask2Former detector that the hub ids
   ``damo/cv_swinL_panoptic-segmentation_cocopan`` (panoptic) and
   ``damo/cv_swinL_semantic-segmentation_cocopanmerge`` (semantic) ship, for a chosen backbone
   size, from a self-contained config written by this script (mmdet's bundled
   ``configs/mask2former/*coco-panoptic.py`` values; checked against them for the named presets);
2. gives it seeded random weights shaped so that the outputs are not degenerate (see
   ``shape_weights``);
3. writes the hub layout into ``--model-dir`` (configuration.json, config.py or
   mmcv_config.py, pytorch_model.pt);
4. runs ModelScope's own pipeline on that directory for each ``--images`` path and stores
   the pipeline outputs plus raw tensors captured by hooks in one ``.npz``.

Example::

    .venv-oracle/bin/python tests/oracles/mmdet_oracle.py --task panoptic \
        --backbone swin-tiny-test --seed 0 --model-dir /tmp/m2f_pan \
        --images img1.jpg img2.png --result /tmp/m2f_pan.npz

NPZ schema (``i`` = index of the image in ``--images``)::

    images            str [n]        the image paths as given
    task, backbone    str scalar
    args_json         str scalar     all CLI options (after preset defaults), JSON
    classes           str [133]      class names (checkpoint meta / config CLASSES)
    {i}_masks         uint8 [N,H,W]  pipeline OutputKeys.MASKS, stacked in pipeline order
    {i}_labels        str [N]        pipeline OutputKeys.LABELS
    {i}_scores        float64 [N]    pipeline OutputKeys.SCORES (placeholder 0.999)
    {i}_input         float32 [1,3,Hp,Wp]  image tensor fed to the backbone (normalized, padded)
    {i}_cls_logits    float32 [Q,C+1]      last decoder layer's class logits
    {i}_mask_logits   float32 [Q,Hp/4,Wp/4] last decoder layer's mask logits (before upsampling)
    {i}_cls_logits64  float64 [Q,C+1]      the same network in float64 on the same input (a copy of the
    {i}_mask_logits64 float64 [Q,Hp/4,Wp/4] detector, ``.double()``): no float32 rounding to flip attention masks
    {i}_meta_json     str scalar     img_metas[0] as JSON (ori_shape, img_shape, pad_shape,
                                     scale_factor, batch_input_shape, flip, img_norm_cfg)
  panoptic only:
    {i}_pan           int32 [H,W]    mmdet pan_results (cls + inst_id * 1000, void = 133)
    {i}_ins_labels    int64 [K]      mmdet ins_results: thing label per instance
    {i}_ins_bboxes    float32 [K,5]  x1, y1, x2, y2, score (grouped by label, as bbox2result)
    {i}_ins_masks     uint8 [K,H,W]  instance masks in the same order
  semantic only:
    {i}_seg           int64 [H,W]    MaskFormerSemanticHead seg_pred (argmax class map)
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import pprint
import sys
import time
import warnings
from collections import Counter, OrderedDict

# The shim must replace mmcv's extension loader before anything imports mmcv.ops.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmcv_shim  # noqa: E402

mmcv_shim.install()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

NUM_THINGS = 80
NUM_STUFF = 53
INSTANCE_OFFSET = 1000

# Backbone presets. Named ones follow mmdet's bundled mask2former coco-panoptic configs;
# 'swin-tiny-test' is a small, fast network for unit tests (same structure, fewer channels).
PRESETS = {
    'swin-t': dict(bundled='mask2former_swin-t-p4-w7-224_lsj_8x2_50e_coco-panoptic.py',
                   embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                   window_size=7, pretrain_img_size=None, num_queries=100),
    'swin-s': dict(bundled='mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco-panoptic.py',
                   embed_dims=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24],
                   window_size=7, pretrain_img_size=None, num_queries=100),
    'swin-b': dict(bundled='mask2former_swin-b-p4-w12-384-in21k_lsj_8x2_50e_coco-panoptic.py',
                   embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                   window_size=12, pretrain_img_size=384, num_queries=100),
    'swin-l': dict(bundled='mask2former_swin-l-p4-w12-384-in21k_lsj_16x1_100e_coco-panoptic.py',
                   embed_dims=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                   window_size=12, pretrain_img_size=384, num_queries=200),
    'r50': dict(bundled='mask2former_r50_lsj_8x2_50e_coco-panoptic.py', resnet_depth=50,
                num_queries=100),
    'swin-tiny-test': dict(bundled=None, embed_dims=32, depths=[2, 2, 2, 2],
                           num_heads=[1, 2, 4, 8], window_size=7, pretrain_img_size=None,
                           num_queries=20, feat_channels=64, out_channels=64,
                           decoder_heads=8, encoder_heads=8, encoder_layers=2,
                           decoder_layers=3, encoder_ffn=128, decoder_ffn=128),
}
# Head defaults shared by all named presets (mmdet's r50 base config).
HEAD_DEFAULTS = dict(feat_channels=256, out_channels=256, decoder_heads=8, encoder_heads=8,
                     encoder_layers=6, decoder_layers=9, encoder_ffn=1024, decoder_ffn=2048,
                     encoder_points=4, group_norm_groups=32)

# Integer architecture options of the CLI (--embed-dims, --depths 2 2 6 2, ...).
ARCH_OPTIONS = ('embed_dims', 'depths', 'num_heads', 'window_size', 'pretrain_img_size',
                'resnet_depth', 'num_queries', 'feat_channels', 'out_channels',
                'decoder_heads', 'encoder_heads', 'encoder_layers', 'decoder_layers',
                'encoder_ffn', 'decoder_ffn', 'encoder_points', 'group_norm_groups')

HUB_FILES = {
    'panoptic': dict(config='config.py', model_type='swinL-panoptic-segmentation',
                     pipeline_type='image-panoptic-segmentation'),
    'semantic': dict(config='mmcv_config.py', model_type='swinL-semantic-segmentation',
                     pipeline_type='image-semantic-segmentation'),
}


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', choices=sorted(HUB_FILES), required=True)
    parser.add_argument('--backbone', choices=sorted(PRESETS), required=True)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--model-dir', required=True, help='where the hub layout is written')
    parser.add_argument('--images', nargs='+', default=[])
    parser.add_argument('--result', help='output .npz path')
    parser.add_argument('--no-pipeline', action='store_true',
                        help='only write the model dir, do not run the pipeline')

    arch = parser.add_argument_group('architecture overrides (default: the preset)')
    for name in ARCH_OPTIONS:
        nargs = 4 if name in ('depths', 'num_heads') else None
        arch.add_argument('--' + name.replace('_', '-'), dest=name, type=int, nargs=nargs)

    post = parser.add_argument_group('test_cfg (mmdet / ModelScope defaults)')
    post.add_argument('--object-mask-thr', type=float, default=0.8)
    post.add_argument('--iou-thr', type=float, default=0.8)
    post.add_argument('--max-per-image', type=int, default=100)
    post.add_argument('--test-cfg-in', choices=['model', 'top'],
                      help="where the config keeps test_cfg: inside 'model' (mmdet style, "
                           "panoptic default) or as a top-level 'test_cfg' (semantic default)")

    shaping = parser.add_argument_group('weight shaping (see shape_weights)')
    shaping.add_argument('--residual-scale', type=float, default=0.15,
                         help='factor on the decoder attention/FFN output projections')
    shaping.add_argument('--class-margin', type=float, default=14.0,
                         help='class logit of a query aligned with its class prototype')
    shaping.add_argument('--mask-logit-std', type=float, default=6.0,
                         help='target spread of the mask logits over pixels')
    shaping.add_argument('--image-class-gain', type=float, default=4.0,
                         help='spread of the image-driven part of the class logits (0: classes fixed per query)')
    shaping.add_argument('--no-shaping', action='store_true',
                         help='keep mmdet init_weights() output (degenerate outputs)')

    args = parser.parse_args(argv)
    if not args.no_pipeline and not (args.images and args.result):
        parser.error('--images and --result are required unless --no-pipeline is given')
    preset = dict(HEAD_DEFAULTS)
    preset.update((k, v) for k, v in PRESETS[args.backbone].items() if k != 'bundled')
    args.overridden = sorted(name for name in ARCH_OPTIONS if getattr(args, name) is not None
                             and getattr(args, name) != preset.get(name))
    for name in ARCH_OPTIONS:
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name))
    if args.test_cfg_in is None:
        args.test_cfg_in = 'model' if args.task == 'panoptic' else 'top'
    return args


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------
def backbone_config(args):
    if args.backbone == 'r50':
        return dict(type='ResNet', depth=args.resnet_depth, num_stages=4,
                    out_indices=(0, 1, 2, 3), frozen_stages=-1,
                    norm_cfg=dict(type='BN', requires_grad=False), norm_eval=True,
                    style='pytorch', init_cfg=None)
    cfg = dict(type='SwinTransformer', embed_dims=args.embed_dims, depths=list(args.depths),
               num_heads=list(args.num_heads), window_size=args.window_size, mlp_ratio=4,
               qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
               drop_path_rate=0.3, patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False,
               convert_weights=True, frozen_stages=-1, init_cfg=None)
    if args.pretrain_img_size is not None:
        cfg = dict(pretrain_img_size=args.pretrain_img_size, **cfg)
    return cfg


def backbone_channels(args):
    if args.backbone == 'r50':
        return [256, 512, 1024, 2048]
    return [args.embed_dims * 2 ** i for i in range(4)]


def test_cfg(args):
    return dict(panoptic_on=True, semantic_on=False, instance_on=True,
                max_per_image=args.max_per_image, iou_thr=args.iou_thr,
                filter_low_score=True, object_mask_thr=args.object_mask_thr)


def model_config(args):
    """The mmdet ``model`` dict: Mask2Former with the MSDeformAttn pixel decoder."""
    feat, out = args.feat_channels, args.out_channels
    num_classes = NUM_THINGS + NUM_STUFF
    pixel_decoder = dict(
        type='MSDeformAttnPixelDecoder', num_outs=3,
        norm_cfg=dict(type='GN', num_groups=args.group_norm_groups),
        act_cfg=dict(type='ReLU'),
        encoder=dict(
            type='DetrTransformerEncoder', num_layers=args.encoder_layers,
            transformerlayers=dict(
                type='BaseTransformerLayer',
                attn_cfgs=dict(type='MultiScaleDeformableAttention', embed_dims=feat,
                               num_heads=args.encoder_heads, num_levels=3,
                               num_points=args.encoder_points, im2col_step=64, dropout=0.0,
                               batch_first=False, norm_cfg=None, init_cfg=None),
                ffn_cfgs=dict(type='FFN', embed_dims=feat,
                              feedforward_channels=args.encoder_ffn, num_fcs=2, ffn_drop=0.0,
                              act_cfg=dict(type='ReLU', inplace=True)),
                operation_order=('self_attn', 'norm', 'ffn', 'norm')),
            init_cfg=None),
        positional_encoding=dict(type='SinePositionalEncoding', num_feats=feat // 2,
                                 normalize=True),
        init_cfg=None)
    transformer_decoder = dict(
        type='DetrTransformerDecoder', return_intermediate=True,
        num_layers=args.decoder_layers,
        transformerlayers=dict(
            type='DetrTransformerDecoderLayer',
            attn_cfgs=dict(type='MultiheadAttention', embed_dims=feat,
                           num_heads=args.decoder_heads, attn_drop=0.0, proj_drop=0.0,
                           dropout_layer=None, batch_first=False),
            ffn_cfgs=dict(embed_dims=feat, feedforward_channels=args.decoder_ffn, num_fcs=2,
                          act_cfg=dict(type='ReLU', inplace=True), ffn_drop=0.0,
                          dropout_layer=None, add_identity=True),
            feedforward_channels=args.decoder_ffn,
            operation_order=('cross_attn', 'norm', 'self_attn', 'norm', 'ffn', 'norm')),
        init_cfg=None)
    panoptic_head = dict(
        type='Mask2FormerHead', in_channels=backbone_channels(args), strides=[4, 8, 16, 32],
        feat_channels=feat, out_channels=out, num_things_classes=NUM_THINGS,
        num_stuff_classes=NUM_STUFF, num_queries=args.num_queries,
        num_transformer_feat_level=3, pixel_decoder=pixel_decoder,
        enforce_decoder_input_project=False,
        positional_encoding=dict(type='SinePositionalEncoding', num_feats=feat // 2,
                                 normalize=True),
        transformer_decoder=transformer_decoder,
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=2.0,
                      reduction='mean', class_weight=[1.0] * num_classes + [0.1]),
        loss_mask=dict(type='CrossEntropyLoss', use_sigmoid=True, reduction='mean',
                       loss_weight=5.0),
        loss_dice=dict(type='DiceLoss', use_sigmoid=True, activate=True, reduction='mean',
                       naive_dice=True, eps=1.0, loss_weight=5.0))
    fusion_type = 'MaskFormerFusionHead' if args.task == 'panoptic' else 'MaskFormerSemanticHead'
    panoptic_fusion_head = dict(type=fusion_type, num_things_classes=NUM_THINGS,
                                num_stuff_classes=NUM_STUFF, loss_panoptic=None, init_cfg=None)
    train_cfg = dict(
        num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75,
        assigner=dict(type='MaskHungarianAssigner',
                      cls_cost=dict(type='ClassificationCost', weight=2.0),
                      mask_cost=dict(type='CrossEntropyLossCost', weight=5.0, use_sigmoid=True),
                      dice_cost=dict(type='DiceCost', weight=5.0, pred_act=True, eps=1.0)),
        sampler=dict(type='MaskPseudoSampler'))
    model = dict(type='Mask2Former', backbone=backbone_config(args),
                 panoptic_head=panoptic_head, panoptic_fusion_head=panoptic_fusion_head,
                 train_cfg=train_cfg)
    if args.test_cfg_in == 'model':
        model['test_cfg'] = test_cfg(args)
    model['init_cfg'] = None
    return model


def test_pipeline():
    img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                        to_rgb=True)
    return img_norm_cfg, [
        dict(type='LoadImageFromFile'),
        dict(type='MultiScaleFlipAug', img_scale=(1333, 800), flip=False,
             transforms=[
                 dict(type='Resize', keep_ratio=True),
                 dict(type='RandomFlip'),
                 dict(type='Normalize', **img_norm_cfg),
                 dict(type='Pad', size_divisor=32),
                 dict(type='ImageToTensor', keys=['img']),
                 dict(type='Collect', keys=['img']),
             ]),
    ]


def config_variables(args, classes, palette):
    """Top-level variables of the written config file, in file order."""
    img_norm_cfg, pipeline = test_pipeline()
    variables = OrderedDict()
    if args.task == 'semantic':
        variables['CLASSES'] = tuple(classes)
        variables['PALETTE'] = [list(color) for color in palette]
    variables['num_things_classes'] = NUM_THINGS
    variables['num_stuff_classes'] = NUM_STUFF
    variables['model'] = model_config(args)
    if args.test_cfg_in == 'top':
        variables['test_cfg'] = test_cfg(args)
    variables['img_norm_cfg'] = img_norm_cfg
    variables['test_pipeline'] = pipeline
    variables['data'] = dict(samples_per_gpu=1, workers_per_gpu=1,
                             test=dict(type='CocoPanopticDataset', pipeline=pipeline))
    return variables


def write_config(path, variables, header):
    """Writes plain literal assignments: loadable by mmcv Config.fromfile and ast.literal_eval."""
    lines = ['# ' + line for line in header.splitlines()] + ['']
    for name, value in variables.items():
        lines.append(f'{name} = {pprint.pformat(value, width=96, sort_dicts=False)}')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def _plain(value):
    """Config value with tuples as lists and ConfigDicts as dicts, for comparisons."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_against_bundled(args, model_cfg):
    """For unmodified named presets, the written model must equal mmdet's bundled config."""
    bundled_name = PRESETS[args.backbone]['bundled']
    if bundled_name is None or args.overridden:
        return 'not compared (custom size)'
    import mmcv
    import mmdet
    path = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', 'mask2former',
                        bundled_name)
    bundled = _plain(mmcv.Config.fromfile(path)._cfg_dict.to_dict()['model'])
    ours = _plain(copy.deepcopy(model_cfg))
    # Intentional differences: no pretrained download, fusion head for the semantic task,
    # test_cfg with the explicit object_mask_thr (mmdet's default), and its placement.
    bundled['backbone']['init_cfg'] = None
    bundled['panoptic_fusion_head']['type'] = ours['panoptic_fusion_head']['type']
    bundled.pop('test_cfg')
    ours.pop('test_cfg', None)
    if ours != bundled:
        raise AssertionError(f'config differs from bundled {bundled_name}:\n'
                             f'{pprint.pformat(ours)}\nvs\n{pprint.pformat(bundled)}')
    return f'equal to mmdet bundled {bundled_name} (except init_cfg/test_cfg)'


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
def _normal(shape, generator, std=1.0):
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


@torch.no_grad()
def jitter_affine_parameters(detector, generator):
    """Moves norm affine parameters, BN statistics and zero biases away from 1/0.

    mmdet's init leaves LayerNorm/GroupNorm at weight 1, bias 0 and many biases at 0, which
    would let a re-implementation that swaps or drops them still match.
    """
    for module in detector.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            if module.weight is not None:
                module.weight.copy_(1.0 + _normal(module.weight.shape, generator, 0.1))
                module.bias.copy_(_normal(module.bias.shape, generator, 0.1))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(_normal(module.running_mean.shape, generator, 0.1))
                module.running_var.copy_(
                    1.0 + 0.2 * torch.rand(module.running_var.shape, generator=generator))
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            if torch.count_nonzero(module.bias) == 0:
                module.bias.copy_(_normal(module.bias.shape, generator, 0.02))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_bias is not None:
            module.in_proj_bias.copy_(_normal(module.in_proj_bias.shape, generator, 0.02))


@torch.no_grad()
def shape_deformable_attention(detector, generator):
    """Makes sampling offsets and attention weights depend on the query.

    mmcv initialises ``sampling_offsets.weight`` and ``attention_weights`` to zero (fixed
    offsets, uniform weights), which would hide errors in those projections.
    """
    from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttention
    for module in detector.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            fan_in = module.sampling_offsets.in_features
            module.sampling_offsets.weight.copy_(
                _normal(module.sampling_offsets.weight.shape, generator, 0.5 / fan_in ** 0.5))
            module.attention_weights.weight.copy_(
                _normal(module.attention_weights.weight.shape, generator, 1.0 / fan_in ** 0.5))
            module.attention_weights.bias.copy_(
                _normal(module.attention_weights.bias.shape, generator, 0.3))


@torch.no_grad()
def shrink_decoder_residuals(head, scale):
    """Scales every decoder sub-layer's output projection by ``scale``.

    The decoder is post-norm (x = LN(x + f(x))); with xavier-initialised branches each of the
    3 x L sub-layers replaces the query instead of refining it, so all queries end up alike.
    Small branches keep each query close to its learned ``query_feat`` while the image still
    moves it (cross-attention) and queries still see each other (self-attention).
    """
    for layer in head.transformer_decoder.layers:
        for attention in layer.attentions:
            attention.attn.out_proj.weight.mul_(scale)
            attention.attn.out_proj.bias.mul_(scale)
        for ffn in layer.ffns:
            last_linear = [m for m in ffn.modules() if isinstance(m, nn.Linear)][-1]
            last_linear.weight.mul_(scale)
            last_linear.bias.mul_(scale)


def assign_query_roles(num_queries, generator):
    """Intended outcome of every query: (kind, classes).

    kind: 'thing' / 'stuff' (confident, one class), 'void' (no-object class wins),
    'unsure' (probability split between two classes, below object_mask_thr). Classes are drawn
    from small pools so that several queries share a thing class (several instances) or a
    stuff class (one merged stuff region). As in trained models, most queries of a large
    query set are 'void': the active ones grow with sqrt(num_queries) (20 queries: 7 thing,
    6 stuff, 2 unsure; 100: 16, 13, 5; 200: 23, 18, 7).
    """
    num_things = max(1, round(1.6 * num_queries ** 0.5))
    num_stuff = max(1, round(1.3 * num_queries ** 0.5))
    num_unsure = max(1, round(0.5 * num_queries ** 0.5))
    num_void = max(0, num_queries - num_things - num_stuff - num_unsure)
    thing_pool = torch.randperm(NUM_THINGS, generator=generator)[:max(2, num_things // 2)]
    stuff_pool = torch.randperm(NUM_STUFF, generator=generator)[:max(3, 2 * num_stuff // 3)]
    stuff_pool += NUM_THINGS

    def draw(pool):
        return [int(pool[torch.randint(len(pool), (1,), generator=generator)])]

    roles = ([('thing', draw(thing_pool)) for _ in range(num_things)]
             + [('stuff', draw(stuff_pool)) for _ in range(num_stuff)]
             + [('unsure', torch.randperm(NUM_THINGS + NUM_STUFF, generator=generator)[:2]
                 .tolist()) for _ in range(num_unsure)]
             + [('void', [NUM_THINGS + NUM_STUFF]) for _ in range(num_void)])
    order = torch.randperm(len(roles), generator=generator)[:num_queries].tolist()
    return [roles[i] for i in order]


@torch.no_grad()
def shape_query_and_class_head(head, roles, class_margin, generator):
    """Gives every query a class prototype direction and the class head matching prototypes.

    Row c of the class head is ``margin / sqrt(D) * u_c`` (u_c: random zero-mean unit
    vectors). ``query_feat`` of a query meant for class c is ``cos * u_c + sin * v`` (v: its
    own random direction orthogonal to u_c, cos in [0.6, 1]), scaled to norm sqrt(D) as the
    decoder's LayerNorms leave it. Its class logit is then ~margin * cos and the others
    ~N(0, (margin / sqrt(D))^2): softmax max between ~0.85 and ~1 for 'thing'/'stuff'/'void'
    queries, ~0.5 for 'unsure' ones (two prototypes). The private directions v keep queries
    of the same class distinct for the mask branch.
    """
    dims = head.query_feat.embedding_dim
    num_outputs = head.cls_embed.out_features  # classes + no-object
    prototypes = _normal((num_outputs, dims), generator)
    prototypes -= prototypes.mean(dim=1, keepdim=True)
    prototypes /= prototypes.norm(dim=1, keepdim=True)
    head.cls_embed.weight.copy_(prototypes * class_margin / dims ** 0.5)
    head.cls_embed.bias.copy_(_normal((num_outputs,), generator, 0.1))

    queries = []
    for kind, classes in roles:
        target = prototypes[classes].sum(dim=0)
        target /= target.norm()
        private = _normal((dims,), generator)
        private -= private.mean()
        private -= (private @ target) * target
        private /= private.norm()
        cos = 0.75 if kind == 'unsure' else 0.6 + 0.4 * float(torch.rand((), generator=generator))
        queries.append(cos * target + (1.0 - cos ** 2) ** 0.5 * private)
    head.query_feat.weight.copy_(torch.stack(queries) * dims ** 0.5)


def calibration_image(seed, height=480, width=640):
    """A deterministic synthetic photo-like image (RGB uint8): colour blobs on a gradient,
    sharp-edged rectangles and 1/f ("natural image" spectrum) texture."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = (rng.uniform(40, 200, 3)[None, None]
             + rng.uniform(-60, 60, 3)[None, None] * (ys / height)[..., None]
             + rng.uniform(-60, 60, 3)[None, None] * (xs / width)[..., None])
    for _ in range(14):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(20, 160)
        weight = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius ** 2))
        image += weight[..., None] * rng.uniform(-120, 120, 3)[None, None]
    for _ in range(8):
        y0, x0 = rng.integers(0, height - 40), rng.integers(0, width - 40)
        y1, x1 = y0 + rng.integers(20, height // 2), x0 + rng.integers(20, width // 2)
        image[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(height), np.fft.rfftfreq(width),
                                      indexing='ij'))
    textures = []
    for _ in range(4):  # one luminance texture shared by the channels, one per channel
        spectrum = rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape)
        texture = np.fft.irfft2(spectrum / np.maximum(frequency, 1.0 / width), (height, width))
        textures.append(texture / texture.std())
    image += 35.0 * textures[0][..., None] + 12.0 * np.stack(textures[1:], axis=-1)
    return np.clip(image, 0, 255).astype(np.uint8)


class _CalibrationRun:
    """Runs the head on the calibration image; returns the mask-branch inputs.

    Backbone features are computed once (the backbone is final by then); with
    ``reuse_pixel_decoder`` the pixel decoder's last output is reused too, for the steps that
    only change the transformer decoder side.
    """

    def __init__(self, detector, seed):
        mean = np.array([123.675, 116.28, 103.53], np.float32)
        std = np.array([58.395, 57.12, 57.375], np.float32)
        image = (calibration_image(seed).astype(np.float32) - mean) / std
        image = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
        height, width = image.shape[-2:]
        self.img_metas = [dict(batch_input_shape=(height, width), img_shape=(height, width, 3),
                               pad_shape=(height, width, 3), ori_shape=(height, width, 3))]
        self.detector = detector
        detector.eval()
        with torch.no_grad():
            self.backbone_features = detector.extract_feat(image)
        self.pixel_decoder_output = None

    @torch.no_grad()
    def __call__(self, reuse_pixel_decoder=False):
        head = self.detector.panoptic_head
        pixel_decoder = head.pixel_decoder
        records = {}

        def keep_pixel_decoder_output(module, args, output):
            self.pixel_decoder_output = output

        hooks = [
            pixel_decoder.register_forward_hook(keep_pixel_decoder_output),
            pixel_decoder.output_convs[-1].conv.register_forward_hook(
                lambda module, args, out: records.__setitem__('pre_norm', out[0])),
            # called before the first decoder layer and after each one: the last call wins
            head.mask_embed[-1].register_forward_pre_hook(
                lambda module, args: records.__setitem__('hidden', args[0][0])),
        ]
        if reuse_pixel_decoder and self.pixel_decoder_output is not None:
            cached = self.pixel_decoder_output
            pixel_decoder.forward = lambda feats: cached  # instance attribute, removed below
        try:
            head(self.backbone_features, self.img_metas)
        finally:
            pixel_decoder.__dict__.pop('forward', None)
            for hook in hooks:
                hook.remove()
        records['mask_features'] = self.pixel_decoder_output[0][0]
        return records


@torch.no_grad()
def shape_mask_features(head, calibration, generator):
    """Per-pixel mask features F with zero mean over every image and a constant channel.

    The 1/4-resolution output conv feeding ``mask_feature`` ends in GroupNorm + ReLU. Its
    GroupNorm bias is raised to ~4 so the ReLU is (almost) never active; then the sum over a
    group's channels of (x - beta) / gamma is exactly GroupNorm-normalised, i.e. has zero
    mean over the image whatever the image. ``mask_feature`` rows are random orthonormal
    mixtures of these group sums, whitened with their covariance on a synthetic calibration
    image so that no single pattern dominates all masks. The last row is the constant 1.
    """
    conv_module = head.pixel_decoder.output_convs[-1]
    group_norm = conv_module.norm
    groups, channels = group_norm.num_groups, group_norm.num_channels
    group_of = torch.arange(channels) // (channels // groups)
    group_norm.bias.copy_(4.0 + _normal((channels,), generator, 0.1))
    gamma, beta = group_norm.weight.clone(), group_norm.bias.clone()

    # Group sums on the calibration image: (G, pixels).
    normalized = group_norm(calibration()['pre_norm'][None])[0]
    normalized = ((normalized - beta[:, None, None]) / gamma[:, None, None]).flatten(1)
    group_sums = torch.zeros(groups, normalized.shape[1]).index_add_(0, group_of, normalized)
    covariance = group_sums.double() @ group_sums.double().T / group_sums.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(0) + 0.2 * eigenvalues.mean()
    whitening = (eigenvectors / eigenvalues.sqrt()).T.float()  # (G, G)

    conv = head.pixel_decoder.mask_feature
    out_channels = conv.out_channels
    mixing, _ = torch.linalg.qr(_normal((max(out_channels - 1, groups), groups), generator))
    mixing = mixing[:out_channels - 1] @ whitening  # (out-1, G): row r mixes the group sums
    per_channel = mixing[:, group_of] / gamma[None]  # (out-1, C)
    weight = torch.zeros(out_channels, channels)
    weight[:-1] = per_channel
    bias = torch.zeros(out_channels)
    bias[:-1] = -(per_channel * beta[None]).sum(dim=1)
    bias[-1] = 1.0
    conv.weight.copy_(weight.view_as(conv.weight))
    conv.bias.copy_(bias)


@torch.no_grad()
def shape_mask_embedding(head, roles, calibration, mask_logit_std, generator, iterations=3):
    """Sets the last ``mask_embed`` layer so each query's mask is a sparse, image-driven blob.

    Target embedding of query q: a random direction over the zero-mean feature channels,
    scaled so its mask logits spread by ``mask_logit_std`` on the calibration image, plus a
    negative weight on the constant channel placing the 0-crossing at a chosen coverage:
    thing queries cover ~25% of the image between them, stuff queries ~60%, the others 5%
    each. The layer is then solved (ridge least squares) to map every query's hidden vector
    to its target; as that changes the decoder's attention masks, it is re-solved a few
    times. Returns the relative fit error on the calibration image.
    """
    num_things = sum(kind == 'thing' for kind, _ in roles)
    num_stuff = sum(kind == 'stuff' for kind, _ in roles)
    coverage = {'thing': 0.25 / max(num_things, 1), 'stuff': 0.6 / max(num_stuff, 1),
                'unsure': 0.05, 'void': 0.05}
    last = head.mask_embed[-1]
    out_channels = last.out_features
    directions = _normal((len(roles), out_channels - 1), generator)

    records = calibration()
    features = records['mask_features'][:-1].flatten(1)  # (out-1, pixels), zero mean
    logits = directions @ features
    directions *= (mask_logit_std / logits.std(dim=1))[:, None]
    logits = (directions @ features)[:, ::7]
    offsets = torch.stack([torch.quantile(logits[q], 1.0 - coverage[kind])
                           for q, (kind, _) in enumerate(roles)])
    targets = torch.cat([directions, -offsets[:, None]], dim=1)  # (Q, out)

    for _ in range(iterations):
        hidden = records['hidden']  # (Q, D) after the last decoder layer
        design = torch.cat([hidden, torch.ones(len(roles), 1)], dim=1).double()
        ridge = 1e-3 * design.pow(2).sum(0).mean()
        gram = design.T @ design + ridge * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ targets.double())  # (D+1, out)
        last.weight.copy_(solution[:-1].T.float())
        last.bias.copy_(solution[-1].float())
        records = calibration(reuse_pixel_decoder=True)
    fitted = last(records['hidden'])
    return float((fitted - targets).norm() / targets.norm())


def shape_weights(detector, args):
    """Seeded, deterministic reshaping of mmdet's random init; returns (roles, fit error).

    Plain random weights give degenerate outputs (all queries alike, masks covering
    everything or nothing), which would let a wrong re-implementation pass. In order:

    1. norm affine parameters / BN statistics / zero biases get random values;
    2. deformable attention sampling offsets and attention weights depend on the query;
    3. decoder residual branches are scaled down (``--residual-scale``);
    4. every query gets a role (thing / stuff / void / unsure) and a class; ``query_feat``
       and the class head are built from class prototypes (``--class-margin``);
    5. mask features: zero mean over every image (GroupNorm group sums) plus a constant
       channel, whitened on a synthetic calibration image;
    6. the last mask-embedding layer is solved so each query's mask logits spread by
       ``--mask-logit-std`` and are positive on a role-dependent fraction of the image.
    """
    generator = torch.Generator().manual_seed(args.seed + 1)
    head = detector.panoptic_head
    jitter_affine_parameters(detector, generator)
    shape_deformable_attention(detector, generator)
    shrink_decoder_residuals(head, args.residual_scale)
    roles = assign_query_roles(head.num_queries, generator)
    shape_query_and_class_head(head, roles, args.class_margin, generator)
    calibration = _CalibrationRun(detector, args.seed)
    shape_mask_features(head, calibration, generator)
    fit_error = shape_mask_embedding(head, roles, calibration, args.mask_logit_std, generator)
    make_classes_image_dependent(detector, calibration, args, generator)
    return roles, fit_error


@torch.no_grad()
def make_classes_image_dependent(detector, calibration, args, generator, num_images=4, num_directions=8):
    """Adds an image-driven part to the class logits, so a query's class is not fixed by its ``query_feat``.

    With small decoder residuals a query's final hidden vector is mostly its own learned part; the image moves it
    only a little (cross-attention), so every query chose the same class on any two photos and label equality said
    little. Here the hidden vectors are recorded on ``num_images`` synthetic calibration images; the directions
    along which they move from image to image, made orthogonal to every query's mean vector (so the added logits
    are zero on average and purely image-driven), get class-head rows: ``num_directions`` of them, each
    coordinate scaled to unit spread, mixed into the class logits with random weights of std ``gain``. The mask
    branch is untouched (the class head does not feed back into the decoder).
    """
    if args.image_class_gain <= 0:
        return
    head = detector.panoptic_head
    runs = [calibration] + [_CalibrationRun(detector, args.seed + 1000 + k) for k in range(num_images - 1)]
    recorded = {}
    # the class head's input after the last decoder layer (it is called once per layer: the last call wins)
    handle = head.cls_embed.register_forward_pre_hook(lambda module, inputs: recorded.__setitem__('x', inputs[0][0]))
    try:
        hidden = []
        for run in runs:
            run()
            hidden.append(recorded['x'].clone())
    finally:
        handle.remove()
    hidden = torch.stack(hidden)  # (images, Q, D)
    means = hidden.mean(dim=0)  # (Q, D)
    deviations = (hidden - means).flatten(0, 1)  # (images * Q, D)
    mean_basis, _ = torch.linalg.qr(means.T.double())  # (D, Q): span of the per-query means
    deviations = deviations.double()
    deviations -= (deviations @ mean_basis) @ mean_basis.T
    _, _, right = torch.linalg.svd(deviations, full_matrices=False)
    directions = right[:num_directions]  # (k, D), orthogonal to every query's mean
    spread = (deviations @ directions.T).std(dim=0)  # (k,)
    num_outputs = head.cls_embed.out_features
    mixing = _normal((num_outputs, num_directions), generator).double() * args.image_class_gain / spread
    head.cls_embed.weight.add_((mixing @ directions).float())


# --------------------------------------------------------------------------------------
# hub directory
# --------------------------------------------------------------------------------------
def coco_panoptic_classes():
    from mmdet.datasets import CocoPanopticDataset
    return CocoPanopticDataset.CLASSES, CocoPanopticDataset.PALETTE


def build_detector_like_modelscope(config_path):
    """The same calls SwinLPanopticSegmentation / SemanticSegmentation make."""
    import mmcv
    from mmdet.models import build_detector
    cfg = mmcv.Config.fromfile(config_path)
    cfg.model.train_cfg = None
    return build_detector(cfg.model, test_cfg=cfg.get('test_cfg'))


def write_model_dir(args):
    import mmcv
    import mmdet
    if args.task == 'semantic':
        # Registers MaskFormerSemanticHead in mmdet's HEADS (as ModelScope's model does).
        import modelscope.models.cv.image_semantic_segmentation.pan_merge  # noqa: F401
    os.makedirs(args.model_dir, exist_ok=True)
    hub = HUB_FILES[args.task]
    classes, palette = coco_panoptic_classes()
    variables = config_variables(args, classes, palette)
    bundled_check = check_against_bundled(args, variables['model'])
    config_path = os.path.join(args.model_dir, hub['config'])
    header = (f'mmdet 2.x Mask2Former ({args.task}, backbone {args.backbone}), written by\n'
              f'tests/oracles/mmdet_oracle.py; random weights (seed {args.seed}).')
    write_config(config_path, variables, header)

    torch.manual_seed(args.seed)
    detector = build_detector_like_modelscope(config_path)
    logging.getLogger('mmcv').setLevel(logging.WARNING)  # init_weights logs every parameter
    detector.init_weights()
    roles, fit_error = (None, None) if args.no_shaping else shape_weights(detector, args)
    detector.eval()

    with open(config_path) as f:
        config_text = f.read()
    # What mmdet's tools/train.py (env_info, config, seed, exp_name), its CheckpointHook
    # (mmdet_version, CLASSES), IterBasedRunner (epoch, iter, hook_msgs) and mmcv's
    # save_checkpoint (mmcv_version, time) put in meta. Primitives only, so the file also
    # loads with torch.load(weights_only=True), which mmcv 1.x's load_checkpoint gets on
    # torch >= 2.6.
    meta = dict(env_info='oracle (random weights)', config=config_text, seed=args.seed,
                exp_name=os.path.basename(config_path), mmdet_version=mmdet.__version__,
                CLASSES=tuple(classes), hook_msgs=dict(last_ckpt='iter_1.pth'), epoch=1,
                iter=1, mmcv_version=mmcv.__version__, time=time.asctime())
    optimizer = dict(state={}, param_groups=[dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                                  weight_decay=0.05, amsgrad=False,
                                                  params=[0, 1, 2])])
    checkpoint = dict(meta=meta, state_dict=detector.state_dict(), optimizer=optimizer)
    torch.save(checkpoint, os.path.join(args.model_dir, 'pytorch_model.pt'))

    configuration = dict(framework='pytorch', task='image-segmentation',
                         model=dict(type=hub['model_type']),
                         pipeline=dict(type=hub['pipeline_type']))
    with open(os.path.join(args.model_dir, 'configuration.json'), 'w') as f:
        json.dump(configuration, f, indent=2)
    return classes, roles, fit_error, bundled_check


# --------------------------------------------------------------------------------------
# running ModelScope's pipeline with hooks
# --------------------------------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


class Capture:
    """Forward hooks on the mmdet detector that record the raw tensors of one call."""

    def __init__(self, detector):
        self.records = {}
        self.handles = [
            detector.backbone.register_forward_pre_hook(self._backbone_input),
            detector.panoptic_head.register_forward_pre_hook(self._head_input),
            detector.panoptic_head.register_forward_hook(self._head_output),
            detector.register_forward_hook(self._detector_output),
        ]

    def _backbone_input(self, module, args):
        self.records['input'] = args[0].detach().cpu().numpy().astype(np.float32)

    def _head_input(self, module, args):
        self.records['img_metas'] = copy.deepcopy(args[1])

    def _head_output(self, module, args, output):
        cls_per_layer, mask_per_layer = output
        # batch of one: (Q, C+1) and (Q, Hp/4, Wp/4)
        self.records['cls_logits'] = cls_per_layer[-1][0].detach().cpu().numpy()
        self.records['mask_logits'] = mask_per_layer[-1][0].detach().cpu().numpy()

    def _detector_output(self, module, args, output):
        self.records['raw'] = output

    def pop(self):
        records, self.records = self.records, {}
        return records

    def remove(self):
        for handle in self.handles:
            handle.remove()


def run_pipeline(args):
    from modelscope.outputs import OutputKeys
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    start = time.perf_counter()
    pipe = pipeline(Tasks.image_segmentation, model=os.path.abspath(args.model_dir),
                    trust_remote_code=True, device='cpu')
    load_seconds = time.perf_counter() - start
    capture = Capture(pipe.model.model)
    arrays, summaries, image_seconds = {}, [], []
    for i, image_path in enumerate(args.images):
        start = time.perf_counter()
        output = pipe(image_path)
        image_seconds.append(time.perf_counter() - start)
        records = capture.pop()
        masks = output[OutputKeys.MASKS]
        labels = list(output[OutputKeys.LABELS])
        height, width = records['img_metas'][0]['ori_shape'][:2]
        arrays[f'{i}_masks'] = (np.stack(masks).astype(np.uint8) if masks
                                else np.zeros((0, height, width), np.uint8))
        arrays[f'{i}_labels'] = np.array(labels, dtype=str)
        arrays[f'{i}_scores'] = np.asarray(output[OutputKeys.SCORES], dtype=np.float64)
        arrays[f'{i}_input'] = records['input']
        arrays[f'{i}_cls_logits'] = records['cls_logits']
        arrays[f'{i}_mask_logits'] = records['mask_logits']
        arrays[f'{i}_meta_json'] = np.array(json.dumps(_jsonable(records['img_metas'][0])))
        raw = records['raw'][0]
        summary = dict(image=image_path, segments=len(labels), seconds=image_seconds[-1],
                       mask_dtype=str(masks[0].dtype) if masks else None,
                       labels=Counter(labels))
        if args.task == 'panoptic':
            pan = np.asarray(raw['pan_results'], dtype=np.int32)
            arrays[f'{i}_pan'] = pan
            bbox_results, mask_results = raw['ins_results']
            ins_labels = np.concatenate([np.full(len(b), c, np.int64)
                                         for c, b in enumerate(bbox_results)])
            arrays[f'{i}_ins_labels'] = ins_labels
            arrays[f'{i}_ins_bboxes'] = np.concatenate(bbox_results).astype(np.float32)
            flat_masks = [m for per_class in mask_results for m in per_class]
            arrays[f'{i}_ins_masks'] = (np.stack(flat_masks).astype(np.uint8) if flat_masks
                                        else np.zeros((0, height, width), np.uint8))
            ids = [v for v in np.unique(pan) if v != NUM_THINGS + NUM_STUFF]
            summary['things'] = sum(1 for v in ids if v % INSTANCE_OFFSET < NUM_THINGS)
            summary['stuff'] = len(ids) - summary['things']
            summary['instances'] = len(ins_labels)
        else:
            seg = np.asarray(raw)
            arrays[f'{i}_seg'] = seg
            summary['seg_dtype'] = str(seg.dtype)
        probabilities = torch.softmax(torch.from_numpy(records['cls_logits']), -1)
        summary['confident_queries'] = int((probabilities.max(-1).values > 0.8).sum())
        summaries.append(summary)
    capture.remove()
    detector64 = copy.deepcopy(pipe.model.model).double().eval()
    for i in range(len(args.images)):
        image = torch.from_numpy(arrays[f'{i}_input']).double()
        img_metas = [json.loads(str(arrays[f'{i}_meta_json']))]
        for meta in img_metas:
            for key in ('ori_shape', 'img_shape', 'pad_shape', 'batch_input_shape'):
                if key in meta:
                    meta[key] = tuple(meta[key])
        with torch.no_grad():
            cls_per_layer, mask_per_layer = detector64.panoptic_head(detector64.extract_feat(image), img_metas)
        arrays[f'{i}_cls_logits64'] = cls_per_layer[-1][0].numpy()
        arrays[f'{i}_mask_logits64'] = mask_per_layer[-1][0].numpy()
    return arrays, summaries, load_seconds


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings('ignore', category=UserWarning)
    total_start = time.perf_counter()
    classes, roles, fit_error, bundled_check = write_model_dir(args)
    build_seconds = time.perf_counter() - total_start
    print(f'[oracle] model dir {args.model_dir}: {bundled_check}; built in {build_seconds:.1f}s')
    if roles is not None:
        print('[oracle] query roles:', dict(Counter(kind for kind, _ in roles)),
              f'mask embedding fit error {fit_error:.3f}')
    if args.no_pipeline:
        return

    arrays, summaries, load_seconds = run_pipeline(args)
    arrays.update(images=np.array(args.images, dtype=str), task=np.array(args.task),
                  backbone=np.array(args.backbone), classes=np.array(list(classes), dtype=str),
                  args_json=np.array(json.dumps(vars(args))))
    os.makedirs(os.path.dirname(os.path.abspath(args.result)), exist_ok=True)
    np.savez_compressed(args.result, **arrays)

    print(f'[oracle] pipeline load {load_seconds:.1f}s')
    for summary in summaries:
        extra = ''
        if args.task == 'panoptic':
            extra = (f" things={summary['things']} stuff={summary['stuff']}"
                     f" instances={summary['instances']}")
        print(f"[oracle] {summary['image']}: {summary['segments']} segments{extra}, "
              f"confident queries {summary['confident_queries']}, "
              f"{summary['seconds']:.1f}s, masks {summary['mask_dtype']}")
        print('         labels:', dict(summary['labels']))
    print(f'[oracle] wrote {args.result}; total {time.perf_counter() - total_start:.1f}s')


if __name__ == '__main__':
    main()
