"""Mask2Former's masked-attention transformer decoder.

Each layer attends from the queries to one level of the pixel decoder (coarsest first, round robin) through a
mask predicted by the previous layer, then among the queries, then a feed-forward block (all post-norm).
Parameter names follow detectron2's ``MultiScaleMaskedTransformerDecoder`` (EasyCV's is identical).
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.layers.position_encoding import SinePositionEncoding
from modelscope_plugin.modeling.layers.row_groups import map_row_groups


def masked_multi_head_attention(attention: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, blocked: Optional[torch.Tensor]) -> torch.Tensor:
    """``attention(query, key, value, attn_mask=...)[0]`` (sequence-first (L, B, C), packed in-projection) with
    ``blocked``: (B, Lq, Lk) bool, True = not attended, shared by every head. nn.MultiheadAttention wants that mask
    repeated per head and turns it into a float mask of that size (B * heads * Lq * Lk floats: 40 MB per FastInst
    layer at 640x1152, written twice); ``scaled_dot_product_attention`` broadcasts one over the heads instead. The
    arithmetic is nn.MultiheadAttention's (which calls the same kernel)."""
    heads, (query_length, batch_size, channels), key_length = attention.num_heads, query.shape, key.shape[0]
    query_weight, key_weight, value_weight = attention.in_proj_weight.chunk(3)
    query_bias, key_bias, value_bias = attention.in_proj_bias.chunk(3)

    def split_heads(values: torch.Tensor, length: int) -> torch.Tensor:
        # (L, B, C) -> (B, heads, L, C / heads)
        return values.view(length, batch_size * heads, -1).transpose(0, 1).view(batch_size, heads, length, -1)

    attended = F.scaled_dot_product_attention(
        split_heads(F.linear(query, query_weight, query_bias), query_length),
        split_heads(F.linear(key, key_weight, key_bias), key_length),
        split_heads(F.linear(value, value_weight, value_bias), key_length),
        attn_mask=None if blocked is None else ~blocked[:, None],
        dropout_p=attention.dropout if attention.training else 0.0)
    # (B, heads, Lq, C / heads) -> (Lq, B, C)
    attended = attended.permute(2, 0, 1, 3).reshape(query_length, batch_size, channels)
    return F.linear(attended, attention.out_proj.weight, attention.out_proj.bias)


class CrossAttentionLayer(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, memory, attention_mask, memory_position, query_position):
        """queries: (Q, B, C); memory: (HW, B, C); attention_mask: (B, Q, HW) bool, True = not attended (every head)."""
        attended = masked_multi_head_attention(self.multihead_attn, queries + query_position, memory + memory_position,
                                               memory, attention_mask)
        return self.norm(queries + self.dropout(attended))


class SelfAttentionLayer(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, query_position):
        query_key = queries + query_position
        attended = self.self_attn(query_key, query_key, value=queries, need_weights=False)[0]
        return self.norm(queries + self.dropout(attended))


class FeedForwardLayer(nn.Module):
    def __init__(self, embed_dim: int, feedforward_dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(embed_dim, feedforward_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(feedforward_dim, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """queries: (L, B, C), post-norm residual block; in inference over groups of rows (``map_row_groups``: the
        (L, B, feedforward_dim) hidden layer is 47 MB in FastInst's pixel path at 640x1152)."""
        def block(rows: torch.Tensor) -> torch.Tensor:
            transformed = self.linear2(self.dropout(F.relu(self.linear1(rows), inplace=True)))
            return self.norm(rows + self.dropout(transformed))

        return map_row_groups(block, queries, self.linear1.out_features)


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(dims[index], dims[index + 1]) for index in range(num_layers))

    def forward(self, features):
        for index, layer in enumerate(self.layers):
            features = layer(features)
            if index < len(self.layers) - 1:
                features = F.relu(features)
        return features


class StagePrediction(NamedTuple):
    class_logits: torch.Tensor
    """(B, Q, num_classes + 1)"""
    mask_logits: Optional[torch.Tensor]
    """(B, Q, H/4, W/4), or None where not asked for."""
    attention_logits: Optional[torch.Tensor]
    """(B, Q, h, w) mask logits at the next layer's level, or None after the last layer."""


@dataclass
class DecoderPredictions:
    """Per decoder stage (the query features before the first layer, then after each layer); only the last
    stage unless auxiliary outputs were asked for."""

    class_logits: List[torch.Tensor]  # each (B, Q, num_classes + 1)
    mask_logits: List[torch.Tensor]  # each (B, Q, H/4, W/4)


class MultiScaleMaskedTransformerDecoder(nn.Module):
    def __init__(self, in_channels: int = 256, num_classes: int = 133, hidden_dim: int = 256, num_queries: int = 100,
                 num_heads: int = 8, feedforward_dim: int = 2048, num_layers: int = 9, mask_dim: int = 256,
                 num_feature_levels: int = 3, dropout: float = 0.0, learned_queries: bool = True):
        """``learned_queries``: the queries start from the learned ``query_feat``; False: the caller passes them
        to ``forward`` (OneFormer's task-conditioned queries) and there is no ``query_feat``."""
        super().__init__()
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_feature_levels = num_feature_levels
        self.position_encoding = SinePositionEncoding(hidden_dim // 2)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FeedForwardLayer(hidden_dim, feedforward_dim, dropout) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim) if learned_queries else None
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        # a 1x1 projection only where the pixel decoder's width differs from the decoder's (none in the releases)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if in_channels != hidden_dim else nn.Sequential()
            for _ in range(num_feature_levels)
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        for layers in (self.transformer_self_attention_layers, self.transformer_cross_attention_layers,
                       self.transformer_ffn_layers):
            for parameter in layers.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)

    def predict(self, queries: torch.Tensor, mask_features: Optional[torch.Tensor],
                attention_features: Optional[torch.Tensor]) -> StagePrediction:
        """One stage's heads on the current queries.

        queries: (Q, B, C). mask_features: (B, mask_dim, H/4, W/4), or None where the stage's full-resolution masks
        are not needed. attention_features: the mask features resized to the next layer's level, or None after the
        last layer. Bilinear resizing is linear per channel, so ``mask_embed · resize(features)`` equals
        ``resize(mask_embed · features)`` (the reference's attention-mask logits) at a fraction of the cost.
        """
        # (Q, B, C) -> (B, Q, C)
        decoded = self.decoder_norm(queries).transpose(0, 1)
        mask_embedding = self.mask_embed(decoded)
        mask_logits = None if mask_features is None else torch.einsum("bqc,bchw->bqhw", mask_embedding, mask_features)
        attention_logits = (None if attention_features is None
                            else torch.einsum("bqc,bchw->bqhw", mask_embedding, attention_features))
        return StagePrediction(self.class_embed(decoded), mask_logits, attention_logits)

    def attention_mask(self, attention_logits: torch.Tensor) -> torch.Tensor:
        """(B, Q, h, w) logits -> (B, Q, h*w) bool, True = not attended by any head (sigmoid < 0.5, as the
        reference); a query whose mask is empty at this level attends everywhere."""
        attention_mask = (attention_logits.flatten(2).sigmoid() < 0.5).detach()
        # logical ops rather than the reference's in-place boolean indexing: same mask, and it exports to ONNX
        return attention_mask & ~attention_mask.all(-1, keepdim=True)

    def forward(self, multi_scale_features: List[torch.Tensor], mask_features: torch.Tensor,
                return_auxiliary: Optional[bool] = None, queries: Optional[torch.Tensor] = None) -> DecoderPredictions:
        """multi_scale_features: (B, C, h_l, w_l) coarsest first; mask_features: (B, mask_dim, H/4, W/4);
        queries: (Q, B, C) initial query features where they are not learned (``learned_queries=False``).

        Every stage's logits are returned when ``return_auxiliary`` (default: in training, for deep supervision);
        otherwise only the last stage's, the earlier ones only steering the masked attention.
        """
        return_auxiliary = self.training if return_auxiliary is None else return_auxiliary
        memories, memory_positions, sizes = [], [], []
        for level in range(self.num_feature_levels):
            feature = multi_scale_features[level]
            sizes.append(tuple(feature.shape[-2:]))
            # (B, C, h, w) -> (h*w, B, C)
            memory_positions.append(self.position_encoding(feature).flatten(2).permute(2, 0, 1))
            memory = self.input_proj[level](feature).flatten(2) + self.level_embed.weight[level][None, :, None]
            memories.append(memory.permute(2, 0, 1))
        # the mask features at each level's size, for the attention masks
        attention_features = [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                              for size in sizes]
        batch_size = mask_features.shape[0]
        # (Q, C) -> (Q, B, C)
        query_position = self.query_embed.weight.unsqueeze(1).repeat(1, batch_size, 1)
        if (queries is None) == (self.query_feat is None):
            raise ValueError("initial queries are passed exactly when the decoder has no learned query_feat")
        if queries is None:
            queries = self.query_feat.weight.unsqueeze(1).repeat(1, batch_size, 1)

        predictions = DecoderPredictions([], [])
        for stage in range(self.num_layers + 1):
            last = stage == self.num_layers
            prediction = self.predict(queries, mask_features if (last or return_auxiliary) else None,
                                      None if last else attention_features[stage % self.num_feature_levels])
            if last or return_auxiliary:
                predictions.class_logits.append(prediction.class_logits)
                predictions.mask_logits.append(prediction.mask_logits)
            if last:
                break
            level = stage % self.num_feature_levels
            queries = self.transformer_cross_attention_layers[stage](
                queries, memories[level], self.attention_mask(prediction.attention_logits), memory_positions[level],
                query_position
            )
            queries = self.transformer_self_attention_layers[stage](queries, query_position)
            queries = self.transformer_ffn_layers[stage](queries)
        return predictions
