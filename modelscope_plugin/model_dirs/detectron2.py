"""facebookresearch/Mask2Former model-zoo files (``model_final_*.pkl``: a plain pickle of ``{"model": {name: numpy
array}, "__author__": ...}``, no configuration inside) -> (Mask2FormerConfig, network with strictly loaded weights).

The architecture is read from the weights: the backbone (ResNet-50/101 by the number of res4 blocks and the stem
width; Swin by its patch embedding, blocks per stage, relative-position tables and MLP widths), the queries, classes,
decoder and encoder layers, widths and attention heads. The class names come from ``class_names`` when given, else
from the built-in table with the checkpoint's class count (``data.categories.BUILTIN_CLASS_TABLES``: COCO panoptic,
COCO instance, ADE20K, Cityscapes), else loading fails asking for them. The test-time size is the model zoo's for that
dataset; detectron2 resizes with PIL and normalises as (x - mean) / std. ``thing_ids`` (the caller's) say which classes
are things where the class count gives no built-in split.
"""
import re
from dataclasses import replace
from typing import Mapping, Optional, Sequence, Tuple

import torch

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints.io import extract_state_dict, load_strict, read_checkpoint
from modelscope_plugin.checkpoints.keymaps import convert_to_native
from modelscope_plugin.config import Mask2FormerConfig, PreprocessConfig, ResNetConfig, SwinConfig
from modelscope_plugin.data.categories import class_table_of_count, describe_class_tables
from modelscope_plugin.errors import CheckpointError, ModelDirError
from modelscope_plugin.model_dirs.classes import with_things_first
from modelscope_plugin.model_dirs.configuration import check_config
from modelscope_plugin.modeling.mask2former.model import Mask2Former

PIXEL_DECODER = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."
DEFORMABLE_LEVELS, DEFORMABLE_POINTS = 3, 4
"""Mask2Former's pixel decoder attends over res3-res5 with 4 sampling points per head and level."""
# (short side, long-side cap) of the model zoo's test configurations, by training set
TEST_SIZES = {"COCO panoptic": (800, 1333), "COCO instance": (800, 1333), "ADE20K": (512, 2048),
              "Cityscapes": (1024, 2048), "Cityscapes instance": (1024, 2048)}
ADE20K_SWIN_LARGE_TEST_SIZE = (640, 2560)
"""The ADE20K Swin-L models were trained and are tested at 640."""


def is_detectron2_mask2former(checkpoint) -> bool:
    """Whether a checkpoint holds detectron2 Mask2Former weights (under ``model`` or at the top)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
    return isinstance(state, Mapping) and any(
        str(key).startswith(PREDICTOR + "transformer_self_attention_layers.") for key in state)


def _indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered children ``prefix.{i}.`` the weights hold."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({match.group(1) for match in map(pattern.match, state_dict) if match})


def backbone_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str):
    """ResNetConfig or SwinConfig from detectron2 backbone weights."""
    if "backbone.patch_embed.proj.weight" in state_dict:
        patch_weight = state_dict["backbone.patch_embed.proj.weight"]  # (embed_dim, 3, patch, patch)
        embed_dim = patch_weight.shape[0]
        depths = tuple(_indices(state_dict, f"backbone.layers.{stage}.blocks.") for stage in range(4))
        if 0 in depths or _indices(state_dict, "backbone.layers.") != 4:
            raise CheckpointError(f"{name}: a Swin backbone needs 4 stages with blocks; found blocks per stage "
                                  f"{depths}")
        tables = [state_dict[f"backbone.layers.{stage}.blocks.0.attn.relative_position_bias_table"]
                  for stage in range(4)]  # each ((2 * window - 1) ** 2, heads)
        window_size = (round(tables[0].shape[0] ** 0.5) + 1) // 2
        if (2 * window_size - 1) ** 2 != tables[0].shape[0]:
            raise CheckpointError(f"{name}: relative position table of {tables[0].shape[0]} rows is no square window")
        mlp_hidden = state_dict["backbone.layers.0.blocks.0.mlp.fc1.weight"].shape[0]
        return SwinConfig(embed_dim=embed_dim, depths=depths, num_heads=tuple(table.shape[1] for table in tables),
                          window_size=window_size, patch_size=patch_weight.shape[-1], mlp_ratio=mlp_hidden / embed_dim)
    if "backbone.stem.conv1.weight" in state_dict:
        res4_blocks = _indices(state_dict, "backbone.res4.")
        depths = {6: 50, 23: 101}
        if res4_blocks not in depths:
            raise CheckpointError(f"{name}: a ResNet with {res4_blocks} res4 blocks is neither ResNet-50 nor -101")
        return ResNetConfig(depth=depths[res4_blocks], width=state_dict["backbone.stem.conv1.weight"].shape[0])
    raise CheckpointError(f"{name}: the backbone is neither a detectron2 ResNet (backbone.stem.*) nor a Swin "
                          "(backbone.patch_embed.*)")


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], name: str) -> Mask2FormerConfig:
    """The architecture of detectron2 Mask2Former weights (names as saved), without class names."""
    try:
        query_feat = state_dict[PREDICTOR + "query_feat.weight"]  # (queries, hidden)
        class_weight = state_dict[PREDICTOR + "class_embed.weight"]  # (classes + 1, hidden)
        mask_features = state_dict[PIXEL_DECODER + "mask_features.weight"]  # (mask_dim, hidden, 1, 1)
        encoder_layer = PIXEL_DECODER + "transformer.encoder.layers.0."
        attention_weights = state_dict[encoder_layer + "self_attn.attention_weights.weight"]
        encoder_linear = state_dict[encoder_layer + "linear1.weight"]
        decoder_linear = state_dict[PREDICTOR + "transformer_ffn_layers.0.linear1.weight"]
        decoder_attention = state_dict[PREDICTOR + "transformer_self_attention_layers.0.self_attn.in_proj_weight"]
    except KeyError as error:
        raise CheckpointError(f"{name} is not a detectron2 Mask2Former checkpoint: it lacks {error}") from error
    hidden_dim = query_feat.shape[1]
    levels = _indices(state_dict, PIXEL_DECODER + "input_proj.")
    if levels != DEFORMABLE_LEVELS or _indices(state_dict, PREDICTOR + "input_proj.") not in (0, DEFORMABLE_LEVELS):
        raise CheckpointError(f"{name}: the pixel decoder has {levels} feature levels; this package's has "
                              f"{DEFORMABLE_LEVELS} (res3-res5)")
    if mask_features.shape[0] != hidden_dim:
        raise CheckpointError(f"{name}: mask_dim {mask_features.shape[0]} differs from hidden_dim {hidden_dim}, "
                              "which this package's Mask2Former shares")
    # attention_weights: (heads * levels * points, hidden)
    num_heads = attention_weights.shape[0] // (DEFORMABLE_LEVELS * DEFORMABLE_POINTS)
    if decoder_attention.shape != (3 * hidden_dim, hidden_dim) or hidden_dim % num_heads:
        raise CheckpointError(f"{name}: decoder attention {tuple(decoder_attention.shape)} does not fit hidden_dim "
                              f"{hidden_dim} with {num_heads} heads")
    num_classes = class_weight.shape[0] - 1
    return Mask2FormerConfig(
        backbone=backbone_from_state_dict(state_dict, name), num_things_classes=num_classes, num_stuff_classes=0,
        num_queries=query_feat.shape[0], hidden_dim=hidden_dim, num_heads=num_heads,
        encoder_layers=_indices(state_dict, PIXEL_DECODER + "transformer.encoder.layers."),
        encoder_feedforward_dim=encoder_linear.shape[0],
        decoder_layers=_indices(state_dict, PREDICTOR + "transformer_self_attention_layers."),
        decoder_feedforward_dim=decoder_linear.shape[0], source="detectron2", task="semantic",
        preprocess=PreprocessConfig(resize_backend="pil", divide_by_std=True))


def with_class_names(config: Mask2FormerConfig, class_names: Optional[Sequence[str]], where: str,
                     task: Optional[str] = None) -> Mask2FormerConfig:
    """``config`` (all classes counted as things) with its classes named: ``class_names`` when given, else the
    built-in table of that many classes (which also gives the thing / stuff split, dataset ids, default task and test
    size); without either, one ``ModelDirError`` asking for the names."""
    num_classes = config.num_classes
    table = class_table_of_count(num_classes)
    if class_names is not None:
        class_names = tuple(str(name) for name in class_names)
        if len(class_names) != num_classes:
            raise ModelDirError(f"{where}: {len(class_names)} class names given for its {num_classes} classes")
    elif table is None:
        raise ModelDirError(f"{where} records no class names and its {num_classes} classes match no built-in class "
                            f"set ({describe_class_tables()}); give them: class_names=[...] (load_model, pipeline) "
                            "or --classes FILE (modelscope-seg), one name per line in class order")
    if table is None:  # the user's classes: all counted as things; semantic by default (every class answers)
        return replace(config, class_names=class_names, category_ids=tuple(range(num_classes)),
                       task=task or config.task)
    short_side, long_side_max = TEST_SIZES[table.dataset]
    if table.dataset == "ADE20K" and isinstance(config.backbone, SwinConfig) and config.backbone.embed_dim == 192:
        short_side, long_side_max = ADE20K_SWIN_LARGE_TEST_SIZE
    return replace(config, class_names=class_names or table.class_names, category_ids=table.category_ids,
                   num_things_classes=table.num_things_classes,
                   num_stuff_classes=num_classes - table.num_things_classes, task=task or table.task,
                   preprocess=replace(config.preprocess, short_side=short_side, long_side_max=long_side_max))


def load_detectron2_checkpoint(path, checkpoint: Optional[dict] = None, task: Optional[str] = None,
                               class_names: Optional[Sequence[str]] = None,
                               thing_ids: Optional[Sequence[int]] = None) -> Tuple[Mask2FormerConfig, Mask2Former]:
    """A facebookresearch/Mask2Former ``model_final_*.pkl`` (or any file of detectron2 Mask2Former weights).
    ``thing_ids``: the class indices that are things (``classes.things_first``; panoptic becomes the default)."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    raw = extract_state_dict(checkpoint)
    config = with_class_names(config_from_state_dict(raw, str(path)), class_names, str(path), task)
    check_config(config, str(path))
    state_dict = convert_to_native(raw, "detectron2")
    config, state_dict = with_things_first(config, state_dict, thing_ids, task, str(path))
    network = build_mask2former(config)
    load_strict(network, state_dict, checkpoint_name=str(path))
    return config, network.eval()
