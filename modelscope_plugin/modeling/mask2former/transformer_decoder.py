"""Mask2Former's masked-attention transformer decoder.

Each layer attends from the queries to one level of the pixel decoder (coarsest first, round robin) through a
mask predicted by the previous layer, then among the queries, then a feed-forward block (all post-norm).
Parameter names follow detectron2's ``MultiScaleMaskedTransformerDecoder`` (EasyCV's is identical).
"""
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.position_encoding import SinePositionEncoding


class CrossAttentionLayer(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, memory, attention_mask, memory_position, query_position):
        """queries: (Q, B, C); memory: (HW, B, C); attention_mask: (B * heads, Q, HW) bool, True = not attended."""
        attended = self.multihead_attn(
            query=queries + query_position, key=memory + memory_position, value=memory, attn_mask=attention_mask, need_weights=False
        )[0]
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

    def forward(self, queries):
        return self.norm(queries + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(queries))))))


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


@dataclass
class DecoderPredictions:
    """Per decoder stage (the query features before the first layer, then after each layer)."""

    class_logits: List[torch.Tensor]  # each (B, Q, num_classes + 1)
    mask_logits: List[torch.Tensor]  # each (B, Q, H/4, W/4)


class MultiScaleMaskedTransformerDecoder(nn.Module):
    def __init__(self, in_channels: int = 256, num_classes: int = 133, hidden_dim: int = 256, num_queries: int = 100,
                 num_heads: int = 8, feedforward_dim: int = 2048, num_layers: int = 9, mask_dim: int = 256,
                 num_feature_levels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_feature_levels = num_feature_levels
        self.position_encoding = SinePositionEncoding(hidden_dim // 2)
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.transformer_ffn_layers = nn.ModuleList(FeedForwardLayer(hidden_dim, feedforward_dim, dropout) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        # a 1x1 projection only where the pixel decoder's width differs from the decoder's (none in the releases)
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1) if in_channels != hidden_dim else nn.Sequential()
            for _ in range(num_feature_levels)
        )
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        for layers in (self.transformer_self_attention_layers, self.transformer_cross_attention_layers, self.transformer_ffn_layers):
            for parameter in layers.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)

    def predict(self, queries: torch.Tensor, mask_features: torch.Tensor, attention_size: Tuple[int, int]):
        """Class and mask logits from the current queries, and the attention mask for the next layer."""
        # (Q, B, C) -> (B, Q, C)
        decoded = self.decoder_norm(queries).transpose(0, 1)
        class_logits = self.class_embed(decoded)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        attention_mask = F.interpolate(mask_logits, size=attention_size, mode="bilinear", align_corners=False)
        # (B, Q, h, w) -> (B * heads, Q, h*w); attend only where the predicted mask is foreground
        attention_mask = attention_mask.flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
        attention_mask = (attention_mask.sigmoid() < 0.5).detach()
        return class_logits, mask_logits, attention_mask

    def forward(self, multi_scale_features: List[torch.Tensor], mask_features: torch.Tensor) -> DecoderPredictions:
        """multi_scale_features: (B, C, h_l, w_l) coarsest first; mask_features: (B, mask_dim, H/4, W/4)."""
        memories, memory_positions, sizes = [], [], []
        for level in range(self.num_feature_levels):
            feature = multi_scale_features[level]
            sizes.append(tuple(feature.shape[-2:]))
            # (B, C, h, w) -> (h*w, B, C)
            memory_positions.append(self.position_encoding(feature).flatten(2).permute(2, 0, 1))
            memory = self.input_proj[level](feature).flatten(2) + self.level_embed.weight[level][None, :, None]
            memories.append(memory.permute(2, 0, 1))
        batch_size = mask_features.shape[0]
        # (Q, C) -> (Q, B, C)
        query_position = self.query_embed.weight.unsqueeze(1).repeat(1, batch_size, 1)
        queries = self.query_feat.weight.unsqueeze(1).repeat(1, batch_size, 1)

        class_logits, mask_logits, attention_mask = self.predict(queries, mask_features, sizes[0])
        predictions = DecoderPredictions([class_logits], [mask_logits])
        for layer_index in range(self.num_layers):
            level = layer_index % self.num_feature_levels
            # a query whose mask is empty at this level attends everywhere
            attention_mask[torch.where(attention_mask.sum(-1) == attention_mask.shape[-1])] = False
            queries = self.transformer_cross_attention_layers[layer_index](
                queries, memories[level], attention_mask, memory_positions[level], query_position
            )
            queries = self.transformer_self_attention_layers[layer_index](queries, query_position)
            queries = self.transformer_ffn_layers[layer_index](queries)
            class_logits, mask_logits, attention_mask = self.predict(
                queries, mask_features, sizes[(layer_index + 1) % self.num_feature_levels]
            )
            predictions.class_logits.append(class_logits)
            predictions.mask_logits.append(mask_logits)
        return predictions
