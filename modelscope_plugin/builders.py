"""Whole networks as nested constructor calls; the only place a config object is read."""
from typing import Union

from modelscope_plugin.config import (
    DinatConfig,
    EomtConfig,
    FastInstConfig,
    Mask2FormerConfig,
    OneFormerConfig,
    ResNetConfig,
    SwinConfig,
)
from modelscope_plugin.modeling.backbones.dinat import Dinat
from modelscope_plugin.modeling.backbones.resnet import ResNet
from modelscope_plugin.modeling.backbones.swin import SwinTransformer
from modelscope_plugin.modeling.eomt.model import Eomt
from modelscope_plugin.modeling.eomt.vit import PatchEmbeddings, RotaryEmbedding2d, VitBlock
from modelscope_plugin.modeling.fastinst.model import FastInst
from modelscope_plugin.modeling.fastinst.pixel_decoder import PyramidPoolingModuleFPN
from modelscope_plugin.modeling.fastinst.transformer_decoder import FastInstDecoder
from modelscope_plugin.modeling.mask2former.model import Mask2Former
from modelscope_plugin.modeling.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from modelscope_plugin.modeling.mask2former.transformer_decoder import MultiScaleMaskedTransformerDecoder
from modelscope_plugin.modeling.oneformer.model import OneFormer, QueryTransformer
from modelscope_plugin.modeling.oneformer.text_mapper import TextMapper


def build_backbone(config):
    if isinstance(config, SwinConfig):
        return SwinTransformer(
            embed_dim=config.embed_dim, depths=config.depths, num_heads=config.num_heads,
            window_size=config.window_size, patch_size=config.patch_size, mlp_ratio=config.mlp_ratio,
            drop_path_rate=config.drop_path_rate,
        )
    if isinstance(config, ResNetConfig):
        return ResNet(depth=config.depth, width=config.width)
    if isinstance(config, DinatConfig):
        return Dinat(
            embed_dim=config.embed_dim, depths=config.depths, num_heads=config.num_heads,
            kernel_size=config.kernel_size, dilations=config.dilations, mlp_ratio=config.mlp_ratio,
            drop_path_rate=config.drop_path_rate, layer_scale_init=config.layer_scale_init,
        )
    raise TypeError(f"unknown backbone config {type(config).__name__}")


def build_deformable_pixel_decoder(config: Union[Mask2FormerConfig, OneFormerConfig],
                                   backbone) -> MSDeformAttnPixelDecoder:
    """Mask2Former's (and OneFormer's) multi-scale deformable-attention pixel decoder over ``backbone``."""
    return MSDeformAttnPixelDecoder(
        in_channels=backbone.out_channels, in_strides=backbone.out_strides, conv_dim=config.hidden_dim,
        mask_dim=config.hidden_dim, num_heads=config.num_heads, feedforward_dim=config.encoder_feedforward_dim,
        num_encoder_layers=config.encoder_layers, num_groups=config.num_groups,
    )


def build_masked_decoder(config: Union[Mask2FormerConfig, OneFormerConfig],
                         learned_queries: bool) -> MultiScaleMaskedTransformerDecoder:
    """Mask2Former's masked-attention decoder; OneFormer gives it task-conditioned queries (``learned_queries``
    False)."""
    return MultiScaleMaskedTransformerDecoder(
        in_channels=config.hidden_dim, num_classes=config.num_classes, hidden_dim=config.hidden_dim,
        num_queries=config.num_queries, num_heads=config.num_heads, feedforward_dim=config.decoder_feedforward_dim,
        num_layers=config.decoder_layers, mask_dim=config.hidden_dim, learned_queries=learned_queries,
    )


def build_mask2former(config: Mask2FormerConfig) -> Mask2Former:
    backbone = build_backbone(config.backbone)
    return Mask2Former(
        backbone=backbone,
        pixel_decoder=build_deformable_pixel_decoder(config, backbone),
        transformer_decoder=build_masked_decoder(config, learned_queries=True),
    )


def build_fastinst(config: FastInstConfig) -> FastInst:
    backbone = build_backbone(config.backbone)
    return FastInst(
        backbone=backbone,
        pixel_decoder=PyramidPoolingModuleFPN(
            in_channels=backbone.out_channels, in_strides=backbone.out_strides, conv_dim=config.hidden_dim,
            num_groups=config.num_groups, in_features=("res3", "res4", "res5"),
        ),
        transformer_decoder=FastInstDecoder(
            in_channels=config.hidden_dim, num_classes=config.num_classes, hidden_dim=config.hidden_dim,
            num_queries=config.num_queries, num_aux_queries=config.num_aux_queries, num_heads=config.num_heads,
            feedforward_dim=config.feedforward_dim, num_layers=config.decoder_layers, mask_dim=config.mask_dim,
        ),
    )


def build_eomt(config: EomtConfig) -> Eomt:
    return Eomt(
        embeddings=PatchEmbeddings(
            hidden_dim=config.hidden_dim, patch_size=config.patch_size, grid_size=config.grid_size,
            num_register_tokens=config.num_register_tokens, learned_positions=config.rope_theta is None,
        ),
        blocks=[
            VitBlock(
                hidden_dim=config.hidden_dim, num_heads=config.num_heads, mlp_dim=config.mlp_dim,
                swiglu_mlp=config.swiglu_mlp, layer_norm_eps=config.layer_norm_eps,
                layer_scale_init=config.layer_scale_init,
            )
            for _ in range(config.num_layers)
        ],
        num_queries=config.num_queries, num_query_blocks=config.num_query_blocks, num_classes=config.num_classes,
        num_upscale_blocks=config.num_upscale_blocks, layer_norm_eps=config.layer_norm_eps,
        rotary_embedding=(None if config.rope_theta is None else RotaryEmbedding2d(
            head_dim=config.hidden_dim // config.num_heads, grid_size=config.grid_size, theta=config.rope_theta)),
    )


def build_oneformer(config: OneFormerConfig) -> OneFormer:
    backbone = build_backbone(config.backbone)
    return OneFormer(
        backbone=backbone,
        pixel_decoder=build_deformable_pixel_decoder(config, backbone),
        transformer_decoder=build_masked_decoder(config, learned_queries=False),
        query_transformer=QueryTransformer(
            hidden_dim=config.hidden_dim, num_heads=config.num_heads, feedforward_dim=config.decoder_feedforward_dim,
            num_layers=config.query_transformer_layers,
        ),
        task_sequence_length=config.task_seq_len, mask_dim=config.hidden_dim, use_task_norm=config.use_task_norm,
        text_mapper=None if config.text_mapper is None else TextMapper(
            hidden_dim=config.hidden_dim, context_length=config.text_mapper.context_length,
            width=config.text_mapper.width, num_layers=config.text_mapper.num_layers,
            vocab_size=config.text_mapper.vocab_size, projector_layers=config.text_mapper.projector_layers,
            num_context=config.text_mapper.num_context),
    )
