"""EoMT ("Your ViT is Secretly an Image Segmentation Model", Kerssies et al., CVPR 2025).

The ViT is DINOv2's (learned position embeddings) or DINOv3's (rotary embeddings on the patches, ``rotary_embedding``).
Learned queries are prepended to the tokens before the last ``num_query_blocks`` ViT blocks. After the last block
(and, for masked attention, before each query block) the final LayerNorm'd tokens are read out: the class head on
the queries, and mask logits as the dot product of the mask-head embedding of each query with the patch grid
upsampled by the scale blocks.

Masked attention: before query block ``i`` the queries may attend only to the patches where the current mask
logits (bilinearly resized to the patch grid) are positive; the queries, class and register tokens stay visible.
The ``attention_mask_probabilities`` buffer (one value per query block, transformers' ``attn_mask_probs``)
decides where: at inference a block is masked when its probability is >= 0.5 and unmasked otherwise, so 1 (the
start of training) masks and 0 (trained checkpoints, whose masks were annealed away) does not. In training each
query keeps its mask with that probability, drawn at random, as in the reference (``forward``'s ``mask_draws``: the
uniform draws given, so that they can be seeded per image; else ``torch.rand``). transformers differs in one
case that trained checkpoints never reach: in a block with probability 0 after a block with a positive one, it
reuses the previous block's mask; here (as in the original implementation) such a block is unmasked.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.eomt.vit import PatchEmbeddings, RotaryEmbedding2d, VitBlock
from modelscope_plugin.modeling.mask2former.model import Mask2FormerOutput


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H, W, C) -> back
        return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class UpscaleLayer(nn.Module):
    """x2 transposed convolution, GELU, depthwise 3x3 convolution (no bias), LayerNorm over channels."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.transposed_conv = nn.ConvTranspose2d(hidden_dim, hidden_dim, kernel_size=2, stride=2)
        self.activation = nn.GELU()
        self.depthwise_conv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim,
                                        bias=False)
        self.norm = LayerNorm2d(hidden_dim, eps=1e-6)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.depthwise_conv(self.activation(self.transposed_conv(features))))


class MaskHead(nn.Module):
    """Three linear layers with GELU between them: query -> mask embedding."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, hidden_dim)
        self.activation = nn.GELU()

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.activation(self.fc2(self.activation(self.fc1(queries)))))


class Eomt(nn.Module):
    def __init__(self, embeddings: PatchEmbeddings, blocks: List[VitBlock], num_queries: int, num_query_blocks: int,
                 num_classes: int, num_upscale_blocks: int, layer_norm_eps: float,
                 rotary_embedding: Optional[RotaryEmbedding2d] = None):
        super().__init__()
        hidden_dim = embeddings.hidden_dim
        if not 0 < num_query_blocks <= len(blocks):
            raise ValueError(f"num_query_blocks {num_query_blocks} is not within 1..{len(blocks)}")
        self.embeddings = embeddings
        self.rotary_embedding = rotary_embedding
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.queries = nn.Embedding(num_queries, hidden_dim)
        self.num_query_blocks = num_query_blocks
        self.upscale_layers = nn.ModuleList([UpscaleLayer(hidden_dim) for _ in range(num_upscale_blocks)])
        self.mask_head = MaskHead(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.register_buffer("attention_mask_probabilities", torch.ones(num_query_blocks))

    @property
    def first_query_block(self) -> int:
        return len(self.blocks) - self.num_query_blocks

    def predict(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Final-normed tokens [queries, prefix, patches] (B, Q + prefix + grid^2, D) -> class logits (B, Q, K + 1)
        and mask logits (B, Q, h, w) at the patch grid times 2 ** num_upscale_blocks."""
        num_queries = self.queries.num_embeddings
        queries = tokens[:, :num_queries]
        patches = tokens[:, num_queries + self.embeddings.num_prefix_tokens:]
        grid_size = self.embeddings.grid_size
        # (B, grid^2, D) -> (B, D, grid, grid) laid out channels-last (a view for one image), which oneDNN keeps
        # through the upscale layers: their convolutions, GELU and norm ran 2-4x slower on the NCHW map the first
        # transposed convolution returned for the transposed view
        patches = patches.reshape(patches.shape[0], grid_size, grid_size, -1).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last)
        for layer in self.upscale_layers:
            patches = layer(patches)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), patches)
        return self.class_head(queries), mask_logits

    def attention_mask(self, mask_logits: torch.Tensor, num_tokens: int, probability: torch.Tensor,
                       draws: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, N, N) boolean mask, True where attention is allowed: each query sees the patches where its mask
        logits, resized to the patch grid, are positive (see the module docstring for ``probability``); in training
        a query whose uniform draw (``draws`` (B, Q), else ``torch.rand``) is above ``probability`` sees them all."""
        batch_size, num_queries = mask_logits.shape[:2]
        grid_size = self.embeddings.grid_size
        patch_start = num_queries + self.embeddings.num_prefix_tokens
        resized = F.interpolate(mask_logits, size=(grid_size, grid_size), mode="bilinear")
        # (B, Q, grid, grid) -> (B, Q, grid^2)
        query_sees_patch = resized.reshape(batch_size, num_queries, grid_size * grid_size) > 0
        if self.training:
            # each query keeps its mask with the block's probability
            if draws is None:
                draws = torch.rand(batch_size, num_queries, device=mask_logits.device)
            unmasked = draws.to(mask_logits.device) > probability
            query_sees_patch = query_sees_patch | unmasked[:, :, None]
        mask = torch.ones(batch_size, num_tokens, num_tokens, dtype=torch.bool, device=mask_logits.device)
        mask[:, :num_queries, patch_start:] = query_sees_patch
        return mask

    def block_is_masked(self, query_block: int) -> bool:
        probability = float(self.attention_mask_probabilities[query_block])
        return probability > 0 if self.training else probability >= 0.5

    def masked_blocks(self) -> List[bool]:
        """Per query block, whether it runs masked attention now (the module docstring's rule)."""
        return [self.block_is_masked(block) for block in range(self.num_query_blocks)]

    def forward(self, pixels: torch.Tensor, return_auxiliary: Optional[bool] = None,
                masked_blocks: Optional[List[bool]] = None,
                mask_draws: Optional[torch.Tensor] = None) -> Mask2FormerOutput:
        """pixels: (B, 3, image_size, image_size) normalised; returns raw logits (and, when ``return_auxiliary``, by
        default in training, the predictions made before each query block, in block order). ``masked_blocks``: the
        decisions of ``masked_blocks()`` made beforehand (a traced graph cannot read them from the buffer).
        ``mask_draws``: (B, num_query_blocks, num_queries) uniform draws in [0, 1) deciding in training which queries
        keep their masks (see ``attention_mask``); None: drawn with ``torch.rand``."""
        if mask_draws is not None and tuple(mask_draws.shape) != (
                pixels.shape[0], self.num_query_blocks, self.queries.num_embeddings):
            raise ValueError(f"mask_draws of shape {tuple(mask_draws.shape)}; expected (batch {pixels.shape[0]}, "
                             f"{self.num_query_blocks} query blocks, {self.queries.num_embeddings} queries)")
        if return_auxiliary is None:
            return_auxiliary = self.training
        if masked_blocks is None:
            masked_blocks = self.masked_blocks()
        tokens = self.embeddings(pixels)
        rotary = self.rotary_embedding() if self.rotary_embedding is not None else None
        auxiliary_class_logits, auxiliary_mask_logits = [], []
        for index, block in enumerate(self.blocks):
            attention_mask = None
            if index == self.first_query_block:
                queries = self.queries.weight[None].expand(tokens.shape[0], -1, -1).to(tokens.dtype)
                tokens = torch.cat([queries, tokens], dim=1)
            query_block = index - self.first_query_block
            masked = query_block >= 0 and masked_blocks[query_block]
            if query_block >= 0 and (masked or return_auxiliary):
                # a prediction before every query block in training (deep supervision, as the reference's loss), and
                # wherever it masks the attention
                class_logits, mask_logits = self.predict(self.norm(tokens))
                if return_auxiliary:
                    auxiliary_class_logits.append(class_logits)
                    auxiliary_mask_logits.append(mask_logits)
                if masked:
                    attention_mask = self.attention_mask(
                        mask_logits, tokens.shape[1], self.attention_mask_probabilities[query_block],
                        mask_draws[:, query_block] if mask_draws is not None else None)
            tokens = block(tokens, attention_mask, rotary)
        class_logits, mask_logits = self.predict(self.norm(tokens))
        return Mask2FormerOutput(class_logits=class_logits, mask_logits=mask_logits,
                                 auxiliary_class_logits=auxiliary_class_logits,
                                 auxiliary_mask_logits=auxiliary_mask_logits)
