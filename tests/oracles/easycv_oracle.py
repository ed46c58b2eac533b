"""Test oracle for ``damo/cv_r50_panoptic-segmentation_cocopan`` (EasyCV Mask2Former-R50, panoptic).

Run it with the oracle venv (``tests/oracles/setup_oracle_env.sh``)::

    .venv-oracle/bin/python tests/oracles/easycv_oracle.py --backbone r50 --seed 0 \\
        --model-dir OUT_DIR --images IMG [IMG ...] --result RESULT.npz [--export-pth PATH]

What it does, all with pai-easycv 0.11.7's own code on CPU:

1. builds EasyCV's ``Mask2Former`` from the config bundled with EasyCV,
   ``configs/segmentation/mask2former/mask2former_r50_8xb2_e50_panoptic.py`` (``--backbone r50``), or a
   smaller variant of it (``--backbone r50-tiny-test``; every size can be overridden on the command line);
2. gives it seeded random weights shaped so that its panoptic output is not degenerate (see
   :func:`shape_weights`);
3. writes a ModelScope model directory laid out like the hub one: ``configuration.json`` made by
   EasyCV's ``to_ms_config`` and one ``*.pt`` checkpoint written by EasyCV's ``save_checkpoint``;
   with ``--export-pth`` also an EasyCV export file (``easycv.apis.export.export``);
4. runs EasyCV's ModelScope pipeline (``image-panoptic-segmentation-easycv``, reached through
   ``modelscope.pipeline('image-segmentation', model=<dir>)``) on each image and saves, per image ``i``,
   in one ``.npz``:

   ==================  =====================================================================
   ``{i}_masks``       uint8 [N, H, W], the pipeline's ``masks`` (0/1, original image size)
   ``{i}_labels``      str [N], the pipeline's ``labels`` (class names)
   ``{i}_input``       float32 [1, 3, Hp, Wp], the tensor fed to the backbone (normalised, padded)
   ``{i}_cls_logits``  float32 [Q, C+1], the last decoder layer's class logits (C+1 = no object)
   ``{i}_mask_logits`` float32 [Q, Hp/4, Wp/4], the last decoder layer's mask logits
   ``{i}_cls_logits64``  float64, ``{i}_mask_logits64`` float64: the same network in float64 on the same input
                       (a ``.double()`` copy; no float32 rounding to flip attention masks)
   ``{i}_pan``         int32 [H, W], EasyCV's panoptic id map (``class + instance * 1000``; C = void)
   ``{i}_ins_labels``  int64 [K], ``{i}_ins_bboxes`` float32 [K, 5] (x1, y1, x2, y2, score), ``{i}_ins_masks``
                       uint8 [K, H, W]: what ``Mask2Former.instance_postprocess`` returned inside the pipeline's
                       ``forward_test`` (the bundled config has ``instance_on=True``), in its order (top-k order,
                       not grouped by class); the same keys and layout as ``mmdet_oracle.py``'s ``ins_results``
   ``{i}_ins64_labels``, ``{i}_ins64_bboxes``, ``{i}_ins64_masks``: the same from EasyCV's ``forward_test`` on the
                       float64 copy (network, resizing and ``instance_postprocess`` in float64)
   ``{i}_meta_json``   str, JSON of the image meta (img_shape, ori_shape, pad_shape, scale_factor, ...)
   ==================  =====================================================================

   plus ``images`` (the image paths, in order) and ``summary_json`` (the model sizes and seed).

``--write-keys PATH`` writes the checkpoint's state-dict keys and shapes (``tests/oracles/easycv_keys_r50.txt``
was made this way with ``--backbone r50``).

Importing EasyCV has side effects (pip installs, compiling a CUDA extension); ``easycv_shim`` removes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import easycv_shim  # noqa: E402  (must run before easycv / modelscope pipelines are imported)

easycv_shim.install()

import easycv  # noqa: E402
from easycv.apis.export import export as easycv_export  # noqa: E402
from easycv.models.builder import build_model  # noqa: E402
from easycv.utils.checkpoint import save_checkpoint  # noqa: E402
from easycv.utils.config_tools import mmcv_config_fromfile  # noqa: E402
from easycv.utils.ms_utils import to_ms_config  # noqa: E402

HUB_ID = 'damo/cv_r50_panoptic-segmentation_cocopan'
TASK = 'image-segmentation'
MS_MODEL_TYPE = 'r50-panoptic-segmentation'  # EasyCVModels.r50_panoptic_segmentation
MS_PIPELINE_TYPE = 'image-panoptic-segmentation-easycv'  # EasyCVPipelines.image_panoptic_segmentation_easycv
CHECKPOINT_NAME = 'pytorch_model.pt'  # the pipeline globs '*.pt' and needs exactly one
EASYCV_CONFIG = 'configs/segmentation/mask2former/mask2former_r50_8xb2_e50_panoptic.py'
EPOCHS = 50  # the recipe's total_epochs, written into the checkpoint meta like a finished run

# Mean and std of EasyCV's test pipeline (MMNormalize, RGB order), used for the calibration image.
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


@dataclass
class ModelSize:
    """The numbers of the network that the variants differ in (names as in the EasyCV config)."""

    backbone_depth: int = 50
    num_queries: int = 100
    hidden_dim: int = 256  # conv_dim = mask_dim = decoder hidden_dim (EasyCV needs them equal)
    transformer_enc_layers: int = 6
    transformer_dim_feedforward: int = 1024  # pixel-decoder encoder FFN
    dec_layers: int = 9
    dim_feedforward: int = 2048  # transformer-decoder FFN
    nheads: int = 8


VARIANTS = {
    'r50': ModelSize(),
    # Fast variant for unit tests: the same ResNet-50 (same backbone keys), a narrow head.
    'r50-tiny-test': ModelSize(
        num_queries=20, hidden_dim=64, transformer_enc_layers=2, transformer_dim_feedforward=128,
        dec_layers=3, dim_feedforward=128),
}


# --------------------------------------------------------------------------------------------- config


def build_easycv_config(size: ModelSize):
    """EasyCV's bundled panoptic config with the sizes of ``size`` and the predictor settings."""
    cfg = mmcv_config_fromfile(os.path.join(os.path.dirname(easycv.__file__), EASYCV_CONFIG))
    cfg.model.backbone.depth = size.backbone_depth
    if size.backbone_depth < 50:  # BasicBlock ResNets (18, 34)
        cfg.model.head.pixel_decoder.input_channel = [64, 128, 256, 512]
    pixel_decoder = cfg.model.head.pixel_decoder
    pixel_decoder.conv_dim = size.hidden_dim
    pixel_decoder.mask_dim = size.hidden_dim
    pixel_decoder.transformer_enc_layers = size.transformer_enc_layers
    pixel_decoder.transformer_dim_feedforward = size.transformer_dim_feedforward
    pixel_decoder.transformer_nheads = size.nheads
    decoder = cfg.model.head.transformer_decoder
    decoder.in_channels = size.hidden_dim
    decoder.hidden_dim = size.hidden_dim
    decoder.mask_dim = size.hidden_dim
    decoder.num_queries = size.num_queries
    decoder.dec_layers = size.dec_layers
    decoder.dim_feedforward = size.dim_feedforward
    decoder.nheads = size.nheads
    cfg.model.train_cfg.dec_layers = size.dec_layers + 1  # deep-supervision outputs incl. the query-only one
    # The bundled config has no `predict` section; the hub's `pipeline.predictor_config` needs one
    # (Mask2formerPredictor defaults to task_mode='panoptic', written out for clarity).
    cfg.predict = dict(type='Mask2formerPredictor', task_mode='panoptic')
    return cfg


def write_ms_configuration(cfg, model_dir: str) -> dict:
    """configuration.json exactly as EasyCV's ``to_ms_config`` writes it (jsonplus, tuples tagged)."""
    path = os.path.join(model_dir, 'configuration.json')
    to_ms_config(
        copy.deepcopy(cfg), task=TASK, ms_model_name=MS_MODEL_TYPE, pipeline_name=MS_PIPELINE_TYPE,
        save_path=path, reserved_keys=['CLASSES', 'PALETTE'], dump=True)
    with open(path) as f:
        return json.load(f)


# -------------------------------------------------------------------------------------------- weights


def calibration_image(seed: int, height: int = 384, width: int = 512) -> torch.Tensor:
    """A synthetic 'scene' (smooth colour fields + flat shapes), normalised like EasyCV's test pipeline.

    Used only to set statistics while shaping the weights, so the weights do not depend on the
    images the oracle is later run on.
    """
    rng = np.random.default_rng(seed + 1000)
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.float32)
    image = F.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(height, width),
                          mode='bicubic', align_corners=False)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(12):
        colour = rng.uniform(0, 255, size=3)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(20, height / 3), rng.uniform(20, width / 3)
        if rng.uniform() < 0.5:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        else:
            inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        image[inside] = colour
    image += rng.normal(0, 8, size=image.shape)
    image = (np.clip(image, 0, 255) - PIXEL_MEAN) / PIXEL_STD
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]


def _perturb_norm_layers(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random affine parameters for every BN/GN/LN (init is 1/0, which hides scale/shift bugs)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if module.weight is not None:
                module.weight.data = 1 + 0.2 * (torch.rand(module.weight.shape, generator=generator) - 0.5) * 2
                module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=generator)


def _perturb_zero_initialised(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give the parameters that EasyCV initialises to zero (biases, deformable attention weights)
    small random values, so a re-implementation that drops one of them is caught."""
    from easycv.thirdparty.deformable_attention.modules import MSDeformAttn

    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.sampling_offsets.weight.data = 0.01 * torch.randn(
                module.sampling_offsets.weight.shape, generator=generator)
            module.attention_weights.weight.data = 0.02 * torch.randn(
                module.attention_weights.weight.shape, generator=generator)
            module.attention_weights.bias.data = 0.3 * torch.randn(
                module.attention_weights.bias.shape, generator=generator)
    for name, parameter in model.named_parameters():
        if name.endswith('bias') and parameter.ndim == 1 and torch.all(parameter == 0):
            parameter.data = 0.02 * torch.randn(parameter.shape, generator=generator)


@torch.no_grad()
def _calibrate_batch_norm(backbone: torch.nn.Module, image: torch.Tensor) -> None:
    """Set the BN running statistics to the calibration image's batch statistics (stage by stage),
    so that the random ResNet neither explodes nor vanishes and the statistics are non-trivial."""
    batch_norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch -> exactly its statistics
        bn.train()
    backbone(image)
    for bn in batch_norms:
        bn.momentum = 0.1
        bn.eval()


class _LastInput:
    """Forward pre-hook keeping the last input of a module."""

    def __init__(self, module: torch.nn.Module):
        self.value = None
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, inputs):
        self.value = inputs[0].detach().clone()


@torch.no_grad()
def shape_weights(model, size: ModelSize, num_classes: int, num_things: int, seed: int) -> dict:
    """Turn EasyCV's random init into weights whose panoptic output is informative.

    With plain random weights every query predicts nearly the same class distribution (max softmax
    far below the 0.8 object threshold) and masks are all-or-nothing, so the panoptic map is empty or
    one segment. Here:

    * norms get random affine parameters, zero-initialised biases and deformable-attention weights
      get small random values; BN running statistics come from a synthetic calibration image;
    * the GroupNorm gains of the fine pixel-decoder inputs are damped (stride 8: 0.1, stride 16:
      0.3, stride-4 lateral: 0.1), so the stride-4 features follow the coarse levels and masks are
      blobs rather than texture speckle;
    * the mask features (``pixel_decoder.mask_features``, a 1x1 conv) are re-made so channel 0 is the
      constant 1 and the other channels are random projections of the stride-4 features,
      standardised (zero mean, unit variance) on the calibration image;
    * the transformer decoder's residual branches (cross-attention, self-attention and FFN output
      projections) are scaled by 0.2, so each query stays close to its learned query feature;
    * each query gets a role: half of them (at most 24) are confident -- a thing class (some classes
      repeat -> several instances) or a stuff class (repeats -> merged regions) -- the rest are
      "no object" or unsure between two classes (max prob ~0.43, below the 0.8 threshold). The
      class head is solved by least squares on the calibrated decoder output so confident queries
      reach softmax max ~0.9-0.97;
    * the mask head's last layer is solved the same way so that query q's mask logit is
      ``4 * (standardised projection of the mask features on direction d_q) - offset_q``; the offset
      (carried by the constant channel 0, this is what makes masks sparse) gives each confident
      mask ~0.7/num_confident of the calibration image. Confident queries take the principal
      components of the calibration mask features in +/- pairs (uncorrelated across pairs, disjoint
      within a pair), so few masks overlap and most survive the 0.8 overlap test.

    Returns a summary of the query roles.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = model.head
    decoder = head.predictor
    pixel_decoder = head.pixel_decoder
    image = calibration_image(seed)

    _perturb_norm_layers(model, generator)
    _perturb_zero_initialised(model, generator)
    # Coarse levels dominate the pixel decoder, so masks are blobs rather than texture speckle: damp
    # the GroupNorm gains of the fine input projections (index 0 = stride 32, 1 = 16, 2 = 8) and of
    # the stride-4 lateral conv.
    for projection, gain in zip(pixel_decoder.input_proj, (1.0, 0.3, 0.1)):
        projection[1].weight.data *= gain
        projection[1].bias.data *= gain
    for lateral in pixel_decoder.lateral_convs:
        lateral.norm.weight.data *= 0.1
        lateral.norm.bias.data *= 0.1
    _calibrate_batch_norm(model.backbone, image)

    # Mask features: channel 0 constant, others standardised random projections.
    mask_conv = pixel_decoder.mask_features
    mask_conv_input = _LastInput(mask_conv)
    features = model.backbone(image)
    pixel_decoder.forward_features(features)
    mask_conv_input.handle.remove()
    stride4 = mask_conv_input.value[0].flatten(1)  # [conv_dim, H*W]
    mask_dim, conv_dim = mask_conv.weight.shape[:2]
    projection = torch.randn(mask_dim, conv_dim, generator=generator) / conv_dim ** 0.5
    projected = projection @ stride4
    mean, std = projected.mean(1), projected.std(1).clamp_min(1e-6)
    weight = projection / std[:, None]
    bias = -mean / std
    weight[0], bias[0] = 0.0, 1.0
    mask_conv.weight.data = weight[:, :, None, None].contiguous()
    mask_conv.bias.data = bias

    # Small residual branches in the transformer decoder.
    residual_scale = 0.2
    for layers, attribute in ((decoder.transformer_cross_attention_layers, 'multihead_attn'),
                              (decoder.transformer_self_attention_layers, 'self_attn')):
        for layer in layers:
            getattr(layer, attribute).out_proj.weight.data *= residual_scale
            getattr(layer, attribute).out_proj.bias.data *= residual_scale
    for layer in decoder.transformer_ffn_layers:
        layer.linear2.weight.data *= residual_scale
        layer.linear2.bias.data *= residual_scale

    # Query roles and targets.
    num_queries = size.num_queries
    # Half the queries (at most 24) are confident, 60 % of those things; the rest split between
    # "no object" and "unsure".
    num_confident = min(num_queries // 2, 24)
    num_things_queries = round(0.6 * num_confident)
    num_void = (num_queries - num_confident) // 2
    roles = np.array(['thing'] * num_things_queries + ['stuff'] * (num_confident - num_things_queries)
                     + ['void'] * num_void + ['unsure'] * (num_queries - num_confident - num_void))
    rng.shuffle(roles)
    common_things = rng.choice(num_things, size=6, replace=False)  # repeated -> several instances
    common_stuff = rng.choice(np.arange(num_things, num_classes), size=4, replace=False)  # repeated -> merged
    class_targets = np.zeros((num_queries, num_classes + 1), dtype=np.float64)
    query_classes = np.full(num_queries, num_classes, dtype=np.int64)
    confident_logit, unsure_logit = 8.0, 6.0
    for q, role in enumerate(roles):
        if role == 'thing':
            c = rng.choice(common_things) if rng.uniform() < 0.5 else rng.integers(num_things)
        elif role == 'stuff':
            c = rng.choice(common_stuff) if rng.uniform() < 0.5 else rng.integers(num_things, num_classes)
        elif role == 'void':
            c = num_classes
        else:
            c, other = rng.choice(num_classes, size=2, replace=False)
            class_targets[q, other] = unsure_logit
        query_classes[q] = c
        class_targets[q, c] = unsure_logit if role == 'unsure' else confident_logit
    # Mask sizes: the confident queries' masks add up to about 70 % of the image (they overlap).
    coverage = rng.uniform(0.5, 1.5, size=num_queries) * 0.7 / num_confident
    slope = 4.0
    # Mask directions in mask-feature space. Confident queries take the principal components of the
    # calibration mask features in pairs of opposite sign: responses of different pairs are
    # uncorrelated and the two masks of a pair are disjoint, so few masks overlap and most survive
    # the fusion's overlap test. The other queries take random directions.
    directions = torch.randn(num_queries, mask_dim - 1, generator=generator)
    calibration_features = _mask_features(model, image)[1:]  # [mask_dim - 1, HW]
    centred = calibration_features - calibration_features.mean(1, keepdim=True)
    principal = torch.linalg.svd(centred, full_matrices=False).U.T  # [mask_dim - 1, mask_dim - 1]
    for rank, q in enumerate(np.flatnonzero(np.isin(roles, ['thing', 'stuff']))):
        directions[q] = principal[rank // 2] * (1 if rank % 2 == 0 else -1)

    # Solve the heads on the calibrated decoder state; twice, because the heads' own predictions
    # feed the masked attention of the next layers (the second pass sees the final attention masks).
    mask_feature_map = None
    for _ in range(2):
        class_input = _LastInput(decoder.class_embed)
        mask_input = _LastInput(decoder.mask_embed.layers[-1])
        mask_features, _, multi_scale = pixel_decoder.forward_features(model.backbone(image))
        decoder(multi_scale, mask_features)
        class_input.handle.remove()
        mask_input.handle.remove()
        mask_feature_map = mask_features[0].flatten(1)  # [mask_dim, HW]

        decoder_state = class_input.value[0].double()  # [Q, hidden]
        solution = _affine_least_squares(decoder_state, torch.from_numpy(class_targets))
        decoder.class_embed.weight.data = solution[:-1].T.float().contiguous()
        decoder.class_embed.bias.data = solution[-1].float()

        # Mask embedding targets: [offset, slope * direction / std] so that logits are standardised.
        responses = directions @ mask_feature_map[1:]  # [Q, HW]
        centre, spread = responses.mean(1), responses.std(1).clamp_min(1e-6)
        standardised = (responses - centre[:, None]) / spread[:, None]
        quantile = torch.stack([torch.quantile(standardised[q], float(1 - coverage[q])) for q in range(num_queries)])
        embedding = torch.cat(
            [(-slope * (centre / spread + quantile))[:, None], slope * directions / spread[:, None]], 1)
        hidden = mask_input.value[0].double()
        solution = _affine_least_squares(hidden, embedding.double())
        decoder.mask_embed.layers[-1].weight.data = solution[:-1].T.float().contiguous()
        decoder.mask_embed.layers[-1].bias.data = solution[-1].float()

    return {
        'roles': {role: int((roles == role).sum()) for role in ('thing', 'stuff', 'void', 'unsure')},
        'query_classes': query_classes.tolist(),
    }


@torch.no_grad()
def _mask_features(model, image: torch.Tensor) -> torch.Tensor:
    """The pixel decoder's mask features of one image, flattened: [mask_dim, H*W]."""
    mask_features, _, _ = model.head.pixel_decoder.forward_features(model.backbone(image))
    return mask_features[0].flatten(1)


def _affine_least_squares(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Min-norm [W; b] with inputs @ W + b = targets (exact when queries <= features + 1)."""
    design = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], 1)
    return torch.linalg.pinv(design) @ targets


# --------------------------------------------------------------------------------------- checkpoints


def save_hub_checkpoint(model, cfg, model_dir: str) -> str:
    """The ``*.pt`` as EasyCV's trainer saves it: {'meta': {...}, 'state_dict': {...}} (no optimizer)."""
    path = os.path.join(model_dir, CHECKPOINT_NAME)
    iterations_per_epoch = 118287 // 16  # COCO train2017 at 8 GPUs x 2 images
    meta = dict(easycv_version=easycv.__version__, config=cfg.pretty_text, epoch=EPOCHS,
                iter=EPOCHS * iterations_per_epoch)
    save_checkpoint(model, path, optimizer=None, meta=meta)
    return path


def write_state_dict_keys(checkpoint_path: str, keys_path: str) -> None:
    checkpoint = torch.load(checkpoint_path, map_location='cpu', weights_only=True)
    lines = [
        f'# State-dict keys of {HUB_ID} as written by tests/oracles/easycv_oracle.py',
        f'# (EasyCV save_checkpoint layout: top-level keys {sorted(checkpoint)};'
        f' meta keys {sorted(checkpoint["meta"])}).',
        '# key<TAB>shape<TAB>dtype',
    ]
    for key, tensor in checkpoint['state_dict'].items():
        lines.append(f'{key}\t{list(tensor.shape)}\t{str(tensor.dtype).replace("torch.", "")}')
    with open(keys_path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


# ------------------------------------------------------------------------------------------ pipeline


class PipelineRecorder:
    """Hooks on the predictor's model that keep the raw tensors of the last call."""

    def __init__(self, model):
        self.records: dict = {}
        model.backbone.register_forward_pre_hook(self._backbone_input)
        model.head.register_forward_hook(self._head_output)
        forward_test, panoptic_postprocess = model.forward_test, model.panoptic_postprocess
        instance_postprocess = model.instance_postprocess

        def recording_forward_test(img, img_metas, **kwargs):
            self.records['img_metas'] = img_metas[0][0]
            return forward_test(img, img_metas, **kwargs)

        def recording_panoptic_postprocess(mask_cls, mask_pred):
            pan = panoptic_postprocess(mask_cls, mask_pred)
            self.records['pan'] = pan.cpu().numpy().astype(np.int32)
            return pan

        def recording_instance_postprocess(mask_cls, mask_pred):
            labels, bboxes, masks = instance_postprocess(mask_cls, mask_pred)
            self.records['instances'] = (labels.astype(np.int64), bboxes.astype(np.float32), masks.astype(np.uint8))
            return labels, bboxes, masks

        model.forward_test = recording_forward_test
        model.panoptic_postprocess = recording_panoptic_postprocess
        model.instance_postprocess = recording_instance_postprocess

    def _backbone_input(self, module, inputs):
        self.records['input'] = inputs[0].detach().cpu().numpy().astype(np.float32)

    def _head_output(self, module, inputs, outputs):
        self.records['cls_logits'] = outputs['pred_logits'][0].detach().cpu().numpy().astype(np.float32)
        self.records['mask_logits'] = outputs['pred_masks'][0].detach().cpu().numpy().astype(np.float32)


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _check_loaded_weights(model, checkpoint_path: str) -> None:
    """EasyCV loads checkpoints with strict=False; make sure every tensor really arrived."""
    saved = torch.load(checkpoint_path, map_location='cpu', weights_only=True)['state_dict']
    loaded = model.state_dict()
    if saved.keys() != loaded.keys():
        raise RuntimeError(f'checkpoint/model key mismatch: {sorted(set(saved) ^ set(loaded))[:10]}')
    different = [k for k in saved if not torch.equal(saved[k], loaded[k].cpu())]
    if different:
        raise RuntimeError(f'pipeline model differs from the checkpoint in {different[:10]}')


def run_pipeline(model_dir: str, images: list[str]) -> tuple[dict, list[float]]:
    from modelscope.pipelines import pipeline

    segmenter = pipeline(TASK, model=os.path.abspath(model_dir), device='cpu')
    assert type(segmenter).__name__ == 'ImagePanopticSegmentationEasyCVPipeline', type(segmenter)
    _check_loaded_weights(segmenter.predict_op.model, segmenter.model_path)
    recorder = PipelineRecorder(segmenter.predict_op.model)
    arrays: dict = {'images': np.array([os.path.abspath(p) for p in images])}
    runtimes, metas = [], []
    for i, image_path in enumerate(images):
        recorder.records.clear()
        start = time.perf_counter()
        result = segmenter(image_path)
        runtimes.append(time.perf_counter() - start)
        records = recorder.records
        height, width = records['pan'].shape
        masks = np.stack(result['masks']).astype(np.uint8) if result['masks'] else np.zeros(
            (0, height, width), np.uint8)
        arrays[f'{i}_masks'] = masks
        arrays[f'{i}_labels'] = np.array(result['labels'], dtype=str)
        arrays[f'{i}_input'] = records['input']
        arrays[f'{i}_cls_logits'] = records['cls_logits']
        arrays[f'{i}_mask_logits'] = records['mask_logits']
        arrays[f'{i}_pan'] = records['pan']
        if 'instances' not in records:
            raise RuntimeError('EasyCV did not run instance_postprocess (test_cfg.instance_on is off?)')
        arrays[f'{i}_ins_labels'], arrays[f'{i}_ins_bboxes'], arrays[f'{i}_ins_masks'] = records['instances']
        metas.append(records['img_metas'])
        meta = {k: v for k, v in records['img_metas'].items()}
        arrays[f'{i}_meta_json'] = np.array(json.dumps(meta, default=_json_default))
    # EasyCV's forward_test in float64 (network, resizing and instance post-processing), on a copy without the
    # recording wrappers
    model64 = copy.deepcopy(segmenter.predict_op.model)
    model64.__dict__.pop('forward_test', None)
    model64.__dict__.pop('panoptic_postprocess', None)
    model64.__dict__.pop('instance_postprocess', None)
    model64 = model64.double().eval()
    head_outputs = {}
    model64.head.register_forward_hook(lambda module, inputs, outputs: head_outputs.update(outputs))
    # EasyCV's pixel decoder casts its inputs with ``.float()`` (its guard against half precision): for this pass
    # only, ``.float()`` keeps float64 (the cast is a no-op on its float32 path, so nothing else changes)
    float_cast = torch.Tensor.float
    torch.Tensor.float = lambda tensor, *args, **kwargs: tensor.double() if tensor.is_floating_point() else float_cast(tensor)
    try:
        for i in range(len(images)):
            with torch.no_grad():
                outputs = model64.forward_test([torch.from_numpy(arrays[f'{i}_input']).double()], [[metas[i]]],
                                               encode=False)
            arrays[f'{i}_cls_logits64'] = head_outputs['pred_logits'][0].numpy()
            arrays[f'{i}_mask_logits64'] = head_outputs['pred_masks'][0].numpy()
            height, width = arrays[f'{i}_pan'].shape
            masks = outputs['detection_masks'][0]
            arrays[f'{i}_ins64_labels'] = np.asarray(outputs['detection_classes'][0], dtype=np.int64)
            arrays[f'{i}_ins64_bboxes'] = np.concatenate(
                [outputs['detection_boxes'][0], outputs['detection_scores'][0][:, None]], 1).astype(np.float32)
            arrays[f'{i}_ins64_masks'] = (np.asarray(masks, dtype=np.uint8) if len(masks)
                                          else np.zeros((0, height, width), np.uint8))
    finally:
        torch.Tensor.float = float_cast
    return arrays, runtimes


def describe(arrays: dict, num_images: int, num_classes: int, runtimes: list[float]) -> None:
    for i in range(num_images):
        pan = arrays[f'{i}_pan']
        probabilities = torch.from_numpy(arrays[f'{i}_cls_logits']).softmax(-1)
        scores, labels = probabilities.max(-1)
        kept = (labels != num_classes) & (scores > 0.8)
        ids = np.unique(pan)
        things = int(sum(1 for s in ids if s >= 1000))
        stuff = int(sum(1 for s in ids if s < num_classes))
        void = float((pan == num_classes).mean())
        meta = json.loads(str(arrays[f'{i}_meta_json']))
        print(f'[{i}] {arrays["images"][i]}: ori {meta["ori_shape"]} -> img {meta["img_shape"]} pad'
              f' {meta["pad_shape"]}; queries kept {int(kept.sum())}/{len(kept)}; segments'
              f' {len(arrays[f"{i}_labels"])} ({things} things, {stuff} stuff), void {void:.1%};'
              f' instances {len(arrays[f"{i}_ins_labels"])}; {runtimes[i]:.1f} s')
        print(f'    labels: {[str(label) for label in arrays[f"{i}_labels"]]}')


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backbone', choices=sorted(VARIANTS), default='r50')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--model-dir', required=True, help='directory to write the hub layout into')
    parser.add_argument('--images', nargs='*', default=[], help='images to run the pipeline on')
    parser.add_argument('--result', help='.npz to write the per-image records into (needs --images)')
    parser.add_argument('--export-pth', help='also write an EasyCV export file (mask2former_pan_export.pth)')
    parser.add_argument('--write-keys', help='write the checkpoint state-dict keys and shapes to this file')
    for field, default in asdict(ModelSize()).items():
        parser.add_argument('--' + field.replace('_', '-'), type=int, default=None,
                            help=f'override (r50: {default})')
    args = parser.parse_args(argv)
    if args.images and not args.result:
        parser.error('--images needs --result')
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings('ignore', category=FutureWarning)
    size = ModelSize(**{k: (getattr(args, k) if getattr(args, k) is not None else v)
                        for k, v in asdict(VARIANTS[args.backbone]).items()})
    os.makedirs(args.model_dir, exist_ok=True)
    stale = [f for f in os.listdir(args.model_dir) if f.endswith('.pt')]
    if stale:
        raise SystemExit(f'{args.model_dir} already holds {stale}; the pipeline needs exactly one *.pt')

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    cfg = build_easycv_config(size)
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pretrained = None  # no download of ImageNet weights; random init instead
    model = build_model(model_cfg).eval()
    num_classes = model.num_classes
    roles = shape_weights(model, size, num_classes, model.num_things_classes, args.seed)
    write_ms_configuration(cfg, args.model_dir)
    checkpoint_path = save_hub_checkpoint(model, cfg, args.model_dir)
    if args.export_pth:
        easycv_export(copy.deepcopy(cfg), 'dummy', args.export_pth, model=model)
    if args.write_keys:
        write_state_dict_keys(checkpoint_path, args.write_keys)
    print(f'model {args.backbone} {size} seed {args.seed}: query roles {roles["roles"]};'
          f' written to {args.model_dir} in {time.perf_counter() - start:.1f} s')

    if args.images:
        arrays, runtimes = run_pipeline(args.model_dir, args.images)
        arrays['summary_json'] = np.array(json.dumps({
            'hub_id': HUB_ID, 'variant': args.backbone, 'seed': args.seed, 'size': asdict(size),
            'num_classes': num_classes, 'query_classes': roles['query_classes'], 'runtimes_s': runtimes}))
        np.savez_compressed(args.result, **arrays)
        describe(arrays, len(args.images), num_classes, runtimes)
    if easycv_shim.refused_commands:
        print(f'refused commands: {easycv_shim.refused_commands}')


if __name__ == '__main__':
    main()
