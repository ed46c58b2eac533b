"""Typed configurations of the supported networks. Defaults are the released checkpoints' values.

Config objects stop at ``builders.py``: the modules themselves take plain arguments.
"""
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

TASKS = ("panoptic", "semantic", "instance")
"""What a segmentation model answers: one map of things and stuff, a class per pixel, or scored things."""


@dataclass
class SwinConfig:
    embed_dim: int = 192
    """Channels of the first stage; stage i has embed_dim * 2**i."""
    depths: Tuple[int, ...] = (2, 2, 18, 2)
    num_heads: Tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    patch_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.3
    """Stochastic depth at the last block (training only)."""


@dataclass
class DinatConfig:
    """DiNAT (dilated neighbourhood attention). Defaults: DiNAT-L of OneFormer's COCO model (kernel 11)."""

    embed_dim: int = 192
    """Channels of the first stage; stage i has embed_dim * 2**i."""
    depths: Tuple[int, ...] = (3, 4, 18, 5)
    num_heads: Tuple[int, ...] = (6, 12, 24, 48)
    kernel_size: int = 11
    """Side of each pixel's neighbourhood (odd)."""
    dilations: Tuple[Tuple[int, ...], ...] = (
        (1, 20, 1), (1, 5, 1, 10), (1, 2, 1, 3, 1, 4, 1, 5, 1, 2, 1, 3, 1, 4, 1, 5, 1, 5), (1, 2, 1, 2, 1))
    """Per stage, the spacing of each block's neighbourhood."""
    mlp_ratio: float = 2.0
    layer_scale_init: float = 0.0
    """Initial per-channel scale of the residual branches; 0: no layer scales."""
    drop_path_rate: float = 0.3
    """Stochastic depth at the last block (training only)."""


@dataclass
class ResNetConfig:
    depth: int = 50
    """18 / 34 (basic blocks) or 50 / 101 (bottlenecks)."""
    width: int = 64
    """Channels of the stem and of res2's 3x3 convolutions, doubled per stage (torchvision's and the releases' 64;
    detectron2's ``STEM_OUT_CHANNELS``). Other widths are for networks trained from scratch, e.g. the demo models."""


@dataclass
class PreprocessConfig:
    """How an image becomes the network input; recorded per image so post-processing can undo it."""

    short_side: int = 800
    """Target length of the shorter side."""
    long_side_max: int = 1333
    """Cap on the longer side after resizing."""
    mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    """RGB mean subtracted from 0..255 pixels."""
    std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisor: int = 32
    """Padded height and width are multiples of this (zeros, bottom/right, after normalisation)."""
    resize_backend: str = "cv2"
    """"cv2": bilinear on uint8 as mmcv/mmdet/EasyCV do; "pil": PIL bilinear as torchvision/ModelScope's FastInst;
    "torchvision": torchvision's antialiased bilinear on the uint8 tensor (transformers' fast image processors)."""
    divide_by_std: bool = False
    """Normalise as (x - mean) / std (torchvision, ModelScope's FastInst) rather than (x - mean) * (1 / std) (mmcv);
    the two differ by float32 rounding (one unit in the last place)."""
    size_rule: str = "mmcv"
    """How the resized size is computed: "mmcv" (``rescale_size``: one scale, each side rounded) or "transformers"
    (``get_size_with_aspect_ratio`` of transformers' image processors: the short side exact, the other truncated)."""
    pad_black: bool = False
    """Padding holds black pixels, (0 - mean) / std, as where an image is padded before it is normalised
    (transformers' EomtImageProcessor, the original EoMT); False: zeros after normalisation (mmdet, detectron2)."""


@dataclass
class InferenceConfig:
    """Post-processing thresholds; defaults are the references' (mmdet 2.x / detectron2 Mask2Former)."""

    object_mask_threshold: float = 0.8
    """Panoptic: a query is kept if its best non-void class probability exceeds this."""
    overlap_threshold: float = 0.8
    """Panoptic: a kept query is dropped if it wins less than this fraction of its own (prob >= 0.5) mask."""
    filter_low_score: bool = True
    """Panoptic: a segment keeps only pixels where its own mask probability is >= 0.5 (mmdet's test_cfg)."""
    max_per_image: int = 100
    """Instance: top-k (query, class) pairs kept before thresholding."""
    score_threshold: float = 0.5
    """Instance: detections scoring below this are dropped from the pipeline output (``score_thr``; evaluation
    passes 0, as COCO's AP ranks every detection)."""
    mask_from_probability: bool = False
    """Instance: a pixel is in the mask where sigmoid(logit) > 0.5 (detectron2 / FastInst) rather than where
    logit > 0 (mmdet); the two differ only for logits so small that float32's sigmoid rounds them to 0.5."""


@dataclass
class Mask2FormerConfig:
    backbone: Union[SwinConfig, ResNetConfig] = field(default_factory=SwinConfig)
    num_things_classes: int = 80
    num_stuff_classes: int = 53
    num_queries: int = 200
    hidden_dim: int = 256
    """Width of the pixel decoder, the transformer decoder and the mask embedding."""
    num_heads: int = 8
    encoder_layers: int = 6
    encoder_feedforward_dim: int = 1024
    decoder_layers: int = 9
    """Masked-attention layers; predictions come before the first and after each (decoder_layers + 1 stages)."""
    decoder_feedforward_dim: int = 2048
    num_groups: int = 32
    """GroupNorm groups in the pixel decoder."""
    class_names: Tuple[str, ...] = ()
    category_ids: Tuple[int, ...] = ()
    """Dataset id of each contiguous class (COCO panoptic ids by default)."""
    task: str = "panoptic"
    """Default output of the pipeline: "panoptic", "semantic" or "instance"."""
    source: str = "mmdet"
    """Checkpoint source whose behaviour (Swin variant, preprocessing) is followed: mmdet, easycv, detectron2, hf."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    @property
    def num_classes(self) -> int:
        return self.num_things_classes + self.num_stuff_classes


SWIN_PRESETS = {
    "swin-t": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin-s": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin-b": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "swin-l": SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


def swin_large_coco_panoptic() -> Mask2FormerConfig:
    """``damo/cv_swinL_panoptic-segmentation_cocopan``: Swin-L (window 12, in21k 384), 200 queries, 133 classes."""
    return Mask2FormerConfig(backbone=SWIN_PRESETS["swin-l"], num_queries=200)


def swin_large_coco_semantic() -> Mask2FormerConfig:
    """``damo/cv_swinL_semantic-segmentation_cocopanmerge``: the same network answering semantic segmentation."""
    return Mask2FormerConfig(backbone=SWIN_PRESETS["swin-l"], num_queries=200, task="semantic")


def resnet50_coco_panoptic() -> Mask2FormerConfig:
    """``damo/cv_r50_panoptic-segmentation_cocopan``: EasyCV Mask2Former R50, 100 queries, 133 classes."""
    return Mask2FormerConfig(backbone=ResNetConfig(depth=50), num_queries=100, source="easycv")


@dataclass
class FastInstConfig:
    """FastInst (He et al., CVPR 2023). Defaults: ``damo/cv_resnet50_fast-instance-segmentation_coco`` (R50-D3)."""

    backbone: Union[ResNetConfig, SwinConfig] = field(default_factory=ResNetConfig)
    """ResNet-50/101 (the hub checkpoints); a Swin for this package's small demo models."""
    num_classes: int = 80
    """Thing classes (FastInst is instance-only); the class head adds one "no object" logit."""
    num_queries: int = 100
    """Instance-activation-guided queries picked from the stride-16 pixel features."""
    num_aux_queries: int = 8
    """Learned auxiliary queries appended to them (they predict nothing; they give attention a place to go)."""
    hidden_dim: int = 256
    """Width of the pixel decoder (detectron2's CONVS_DIM) and of the transformer decoder."""
    mask_dim: int = 256
    """Width of the mask embedding and of the per-layer mask features."""
    num_heads: int = 8
    feedforward_dim: int = 1024
    decoder_layers: int = 3
    """Dual-path layers: 3 (D3, the hub checkpoint) or 1 (D1)."""
    num_groups: int = 32
    """GroupNorm groups in the pixel decoder."""
    class_names: Tuple[str, ...] = ()
    category_ids: Tuple[int, ...] = ()
    """Dataset id of each contiguous class (COCO instance ids by default)."""
    task: str = "instance"
    source: str = "detectron2"
    preprocess: PreprocessConfig = field(
        default_factory=lambda: PreprocessConfig(short_side=640, long_side_max=1333, resize_backend="pil",
                                                 divide_by_std=True))
    """ModelScope's FastInst pipeline: PIL bilinear resize to short side 640, long side at most 1333, (x - mean) /
    std."""
    inference: InferenceConfig = field(
        default_factory=lambda: InferenceConfig(score_threshold=0.5, mask_from_probability=True))

    @property
    def num_things_classes(self) -> int:
        return self.num_classes


def fastinst_r50_d3_coco() -> FastInstConfig:
    """``damo/cv_resnet50_fast-instance-segmentation_coco``: FastInst R50, 3 decoder layers, 640 / 1333."""
    return FastInstConfig()


def fastinst_release(depth: int = 50, decoder_layers: int = 3) -> FastInstConfig:
    """The official FastInst releases (R50-D1 at 576 / 777, R50-D3 and R101-D3 at 640 / 853, detectron2's test
    sizes)."""
    short_side, long_side_max = (576, 777) if decoder_layers == 1 else (640, 853)
    return FastInstConfig(backbone=ResNetConfig(depth=depth), decoder_layers=decoder_layers,
                          preprocess=PreprocessConfig(short_side=short_side, long_side_max=long_side_max,
                                                      resize_backend="pil", divide_by_std=True))


@dataclass
class EomtConfig:
    """EoMT (Kerssies et al., CVPR 2025): a plain ViT whose last ``num_query_blocks`` blocks also carry learned
    queries; no pixel decoder, no transformer decoder. Defaults: ``tue-mps/coco_panoptic_eomt_large_640`` (DINOv2
    ViT-L/16 with 4 register tokens, 640x640 input, 200 queries, 133 COCO panoptic classes)."""

    hidden_dim: int = 1024
    """Width of the ViT, of the queries and of the mask embedding."""
    num_layers: int = 24
    """ViT blocks."""
    num_heads: int = 16
    mlp_dim: int = 4096
    """Hidden width of each block's MLP (DINOv2 ViT-L: 4 x hidden_dim)."""
    swiglu_mlp: bool = False
    """SwiGLU MLP (DINOv2 giant) instead of fc1 -> GELU -> fc2."""
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 1.0
    """Initial value of the per-channel layer scales (a freshly built network; checkpoints bring their own)."""
    image_size: int = 640
    """Side of the square input the position embeddings were made for (they are not interpolated)."""
    patch_size: int = 16
    num_register_tokens: int = 4
    """Register tokens after the class token (DINOv2 with registers, DINOv3)."""
    rope_theta: Optional[float] = None
    """None: DINOv2's learned position embeddings; a number: DINOv3's 2-D rotary embeddings on the patches with this
    base (100 in DINOv3), no position embeddings."""
    num_query_blocks: int = 4
    """The queries join before block ``num_layers - num_query_blocks`` and pass through the last blocks with the
    patches (transformers' ``num_blocks``)."""
    num_upscale_blocks: int = 2
    """Transposed-convolution x2 steps from the patch grid to the mask resolution (2: stride 4 for patch 16)."""
    num_queries: int = 200
    num_things_classes: int = 80
    num_stuff_classes: int = 53
    class_names: Tuple[str, ...] = ()
    category_ids: Tuple[int, ...] = ()
    """Dataset id of each contiguous class (COCO panoptic ids by default)."""
    task: str = "panoptic"
    """Default output of the pipeline: "panoptic", "semantic" or "instance"."""
    source: str = "hf"
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(
        short_side=640, long_side_max=640, size_divisor=640, resize_backend="torchvision", divide_by_std=True,
        pad_black=True))
    """The long side resized to ``image_size``, then padded bottom/right with black to the square input (ImageNet
    mean and std), as transformers' EomtImageProcessor with ``do_pad``."""
    semantic_windows: bool = False
    """Semantic inference on sliding windows (the official semantic recipe, transformers' ``do_split_image``): the
    short side resized to ``image_size``, the long side covered by overlapping ``image_size`` squares, each run on its
    own and their class evidence averaged. False: the image is padded as for the other tasks (a panoptic or instance
    checkpoint asked for a semantic map)."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    @property
    def num_classes(self) -> int:
        return self.num_things_classes + self.num_stuff_classes

    @property
    def grid_size(self) -> int:
        """Patches along each side of the input."""
        return self.image_size // self.patch_size


def eomt_large_coco_panoptic() -> EomtConfig:
    """``tue-mps/coco_panoptic_eomt_large_640``: DINOv2 ViT-L/16 + 4 registers, 640x640, 200 queries, 133 classes."""
    return EomtConfig()


@dataclass
class OneFormerTextMapperConfig:
    """Training only: the text mapper of OneFormer's query-text contrastive loss (transformers' ``text_encoder_*``
    fields; ``width`` must equal ``hidden_dim`` when ``num_context`` > 0)."""

    context_length: int = 77
    width: int = 256
    num_layers: int = 6
    vocab_size: int = 49408
    projector_layers: int = 2
    num_context: int = 16
    """Learned prompt embeddings appended after each image's num_text = num_queries - num_context text queries."""


@dataclass
class OneFormerConfig:
    """OneFormer (Jain et al., CVPR 2023): Mask2Former's backbone, pixel decoder and masked-attention decoder, with
    queries conditioned on the task. Defaults: ``shi-labs/oneformer_coco_swin_large`` (Swin-L, 150 queries, 133 COCO
    panoptic classes)."""

    backbone: Union[SwinConfig, DinatConfig] = field(default_factory=lambda: SWIN_PRESETS["swin-l"])
    num_things_classes: int = 80
    num_stuff_classes: int = 53
    num_queries: int = 150
    """Queries of the decoder, the task query (the last) included."""
    hidden_dim: int = 256
    """Width of the pixel decoder, the decoders, the mask embedding and the task query."""
    num_heads: int = 8
    encoder_layers: int = 6
    encoder_feedforward_dim: int = 1024
    decoder_layers: int = 9
    """Masked-attention layers (Hugging Face's ``decoder_layers`` counts one more)."""
    decoder_feedforward_dim: int = 2048
    """Feed-forward width of the masked-attention decoder and of the query transformer."""
    query_transformer_layers: int = 2
    """Layers of the DETR decoder that makes the object queries from the task query."""
    task_seq_len: int = 77
    """Length of the task sentence's token ids, zero-padded (the task MLP's input width)."""
    use_task_norm: bool = True
    """The task query passes the decoder's LayerNorm and seeds every object query (False: they start at zero)."""
    num_groups: int = 32
    """GroupNorm groups in the pixel decoder."""
    class_names: Tuple[str, ...] = ()
    category_ids: Tuple[int, ...] = ()
    """Dataset id of each contiguous class (COCO panoptic ids by default)."""
    task: str = "panoptic"
    """Default task: what the network is told and the pipeline answers ("panoptic", "semantic" or "instance")."""
    source: str = "hf"
    preprocess: PreprocessConfig = field(default_factory=lambda: PreprocessConfig(
        short_side=800, long_side_max=1333, resize_backend="torchvision", divide_by_std=True,
        size_rule="transformers"))
    """OneFormerImageProcessor: short side to 800 (long side at most 1333, transformers' size rule), torchvision's
    antialiased bilinear, ImageNet mean and std; then padded bottom/right to a multiple of 32 as the original
    OneFormer (transformers pads a lone image not at all)."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    text_mapper: Optional[OneFormerTextMapperConfig] = None
    """Training only (folders saved with ``is_training=True``): the text mapper; None for inference-only models."""

    @property
    def num_classes(self) -> int:
        return self.num_things_classes + self.num_stuff_classes


def oneformer_swin_large_coco() -> OneFormerConfig:
    """``shi-labs/oneformer_coco_swin_large``: Swin-L (window 12), 150 queries, 133 COCO panoptic classes."""
    return OneFormerConfig()
