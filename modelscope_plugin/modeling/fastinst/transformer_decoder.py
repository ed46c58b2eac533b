"""FastInst's decoder: instance-activation-guided queries and dual-path transformer layers.

Queries are not learned embeddings (as in Mask2Former) but pixel features of the stride-16 level, picked where an
auxiliary class head is most confident (local maxima of its class map first, then top-k). Each dual-path layer
first updates the stride-8 pixel features by attending to the queries, then updates the queries by masked
attention to those pixel features, self-attention and a feed-forward block. Masks are predicted per stage as the
dot product of a query embedding and a per-stage projection of the pixel features.

Parameter names follow detectron2's / ModelScope's ``FastInstDecoder`` (``query_proposal.*``,
``transformer_{query,mask}_*_layers.*``, ``{decoder_query_norm,class_embed,mask_embed,mask_features}_layers.*``).
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.mask2former.transformer_decoder import (
    MLP,
    CrossAttentionLayer,
    FeedForwardLayer,
    SelfAttentionLayer,
)


def seek_local_maximum(probabilities: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """(B, C, h, w) -> same shape, 1 where a value is >= its 8 neighbours (zeros outside the map) and >= epsilon."""
    padded = F.pad(probabilities, (1, 1, 1, 1), "constant", 0)
    height, width = probabilities.shape[-2:]
    maximum = probabilities >= epsilon
    for row_offset in (0, 1, 2):
        for column_offset in (0, 1, 2):
            if row_offset == 1 and column_offset == 1:
                continue
            neighbour = padded[:, :, row_offset:row_offset + height, column_offset:column_offset + width]
            maximum = maximum & (probabilities >= neighbour)
    return maximum.to(probabilities.dtype)


def instance_activation_scores(proposal_class_logits: torch.Tensor) -> torch.Tensor:
    """(B, C + 1, h, w) auxiliary class logits -> (B, h*w) ranking score of each pixel as a query.

    A pixel keeps the probability of its best foreground class (other classes are zeroed); the score is that
    probability plus 1 where it is a local maximum of its class's map, so local maxima rank above all other pixels.

    Computed in float32 whatever the logits' dtype: bfloat16 probabilities (8 significant bits) tie often, and the
    top-k then breaks the ties by pixel index, which picked other queries than float32 in about 1 scene in 6 of the
    FastInst demo's held-out set under bf16 autocast (benchmarks/README.md, "precision='auto' as default?").
    """
    num_channels = proposal_class_logits.shape[1]
    probabilities = proposal_class_logits.float().softmax(dim=1)
    best_class = probabilities[:, :-1].max(1).indices
    # one-hot of each pixel's best class, (B, C + 1, h, w)
    is_best = torch.arange(num_channels, device=probabilities.device)[None, :, None, None] == best_class[:, None]
    probabilities = probabilities * is_best.to(probabilities.dtype)
    probabilities = probabilities + seek_local_maximum(probabilities)
    # (B, C + 1, h, w) -> (B, C, h*w) -> best over classes
    return probabilities[:, :-1].flatten(2).max(1).values


def pixel_locations(height: int, width: int, device=None) -> torch.Tensor:
    """(2, h*w) normalised (x, y) of each pixel: 0 at the first row/column, 1 at the last (FastInst's convention)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height, device=device), torch.linspace(0, 1, width, device=device),
                          indexing="ij")
    return torch.stack([x, y], 0).flatten(1)


class QueryProposal(nn.Module):
    """Auxiliary class head over the stride-16 features and the top-k selection of query pixels."""

    def __init__(self, num_features: int, num_queries: int, num_classes: int):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.conv_proposal_cls_logits = nn.Sequential(
            nn.Conv2d(num_features, num_features, kernel_size=3, stride=1, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_features, num_classes + 1, kernel_size=1, stride=1, padding=0),
        )

    def forward(self, features: torch.Tensor, positions: torch.Tensor):
        """features: (B, C, h, w); positions: (1, C, h, w).

        Returns query features (B, C, Q), their positions (B, C, Q), the selected flat pixel indices (B, Q) and the
        auxiliary class logits (B, num_classes + 1, h, w)."""
        batch_size, channels, height, width = features.shape
        if not torch.jit.is_tracing() and height * width < self.num_queries:
            raise ValueError(f"FastInst selects {self.num_queries} queries from the stride-16 feature map, "
                             f"which has only {height}x{width} pixels here; the input image is too small")
        proposal_class_logits = self.conv_proposal_cls_logits(features)
        indices = instance_activation_scores(proposal_class_logits).topk(self.num_queries, dim=1).indices
        # (B, Q) -> (B, C, Q) to gather channels at the selected pixels
        gather_index = indices[:, None, :].expand(-1, channels, -1)
        query_features = features.flatten(2).gather(2, gather_index)
        query_positions = positions.expand(batch_size, -1, -1, -1).flatten(2).gather(2, gather_index)
        return query_features, query_positions, indices, proposal_class_logits


@dataclass
class DecoderState:
    """What the ground-truth-guided training pass re-runs: per stage the (Q + aux, B, C) queries and (h*w, B, C)
    pixel features, and their positions."""

    query_memory: List[torch.Tensor]
    pixel_memory: List[torch.Tensor]
    query_positions: torch.Tensor
    pixel_positions: torch.Tensor
    pixel_size: Tuple[int, int]


@dataclass
class FastInstPredictions:
    class_logits: List[Optional[torch.Tensor]]
    """Per stage (before the first layer, then after each) (B, Q, num_classes + 1); only the last in eval mode."""
    mask_logits: List[torch.Tensor]
    """Per stage (B, Q, H/8, W/8)."""
    proposal_class_logits: torch.Tensor
    """(B, num_classes + 1, H/16, W/16): the auxiliary class head that picks the queries."""
    query_indices: torch.Tensor
    """(B, Q) flat indices of the selected pixels in the stride-16 map."""
    query_locations: Optional[torch.Tensor] = None
    """(B, Q, 2) normalised (x, y) of the selected pixels (training only: the matcher's location cost)."""
    state: Optional[DecoderState] = field(default=None, repr=False)
    """Training only: inputs of the ground-truth-guided pass (``FastInstDecoder.guided_forward``)."""


class FastInstDecoder(nn.Module):
    def __init__(self, in_channels: int = 256, num_classes: int = 80, hidden_dim: int = 256, num_queries: int = 100,
                 num_aux_queries: int = 8, num_heads: int = 8, feedforward_dim: int = 1024, num_layers: int = 3,
                 mask_dim: int = 256, dropout: float = 0.0):
        super().__init__()
        if in_channels != hidden_dim:
            raise ValueError(f"FastInst's queries are pixel features: the pixel decoder width ({in_channels}) "
                             f"must equal the decoder width ({hidden_dim})")
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_queries = num_queries
        self.num_aux_queries = num_aux_queries
        self.num_classes = num_classes
        # a learned position map, resized to each feature level (detectron2 leaves it uninitialised; weights load
        # over it)
        meta_position_size = int(round(math.sqrt(num_queries)))
        self.meta_pos_embed = nn.Parameter(torch.empty(1, hidden_dim, meta_position_size, meta_position_size))
        nn.init.normal_(self.meta_pos_embed, std=0.02)
        if num_aux_queries > 0:
            self.empty_query_features = nn.Embedding(num_aux_queries, hidden_dim)
            self.empty_query_pos_embed = nn.Embedding(num_aux_queries, hidden_dim)
        self.query_proposal = QueryProposal(hidden_dim, num_queries, num_classes)
        self.transformer_query_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.transformer_query_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.transformer_query_ffn_layers = nn.ModuleList(
            FeedForwardLayer(hidden_dim, feedforward_dim, dropout) for _ in range(num_layers))
        self.transformer_mask_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.transformer_mask_ffn_layers = nn.ModuleList(
            FeedForwardLayer(hidden_dim, feedforward_dim, dropout) for _ in range(num_layers))
        for layers in (self.transformer_query_cross_attention_layers, self.transformer_query_self_attention_layers,
                       self.transformer_query_ffn_layers, self.transformer_mask_cross_attention_layers,
                       self.transformer_mask_ffn_layers):
            for parameter in layers.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)
        # one prediction head per stage: before the first layer and after each
        self.decoder_query_norm_layers = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(num_layers + 1))
        self.class_embed_layers = nn.ModuleList(MLP(hidden_dim, hidden_dim, num_classes + 1, 3)
                                                for _ in range(num_layers + 1))
        self.mask_embed_layers = nn.ModuleList(MLP(hidden_dim, hidden_dim, mask_dim, 3) for _ in range(num_layers + 1))
        self.mask_features_layers = nn.ModuleList(nn.Linear(hidden_dim, mask_dim) for _ in range(num_layers + 1))

    def dual_path_layer(self, layer_index: int, query_features: torch.Tensor, pixel_features: torch.Tensor,
                        query_positions: torch.Tensor, pixel_positions: torch.Tensor,
                        attention_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One dual-path layer. query_features: (Q + aux, B, C); pixel_features: (h*w, B, C);
        attention_mask: (B, Q + aux, h*w) bool, True = the query does not attend to that pixel (in any head).

        The pixel path goes first (pixels attend to all queries, then a feed-forward block); the query path then
        attends to the updated pixels through the mask, then among the queries, then a feed-forward block."""
        pixel_features = self.transformer_mask_cross_attention_layers[layer_index](
            pixel_features, query_features, None, query_positions, pixel_positions)
        pixel_features = self.transformer_mask_ffn_layers[layer_index](pixel_features)
        query_features = self.transformer_query_cross_attention_layers[layer_index](
            query_features, pixel_features, attention_mask, pixel_positions, query_positions)
        query_features = self.transformer_query_self_attention_layers[layer_index](query_features, query_positions)
        query_features = self.transformer_query_ffn_layers[layer_index](query_features)
        return query_features, pixel_features

    def predict(self, stage: int, query_features: torch.Tensor, pixel_features: torch.Tensor,
                pixel_size: Tuple[int, int], with_class: bool) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Stage ``stage``'s heads on the instance queries (auxiliary ones predict nothing): class logits
        (B, Q, num_classes + 1) if ``with_class``, and mask logits (B, Q, h, w)."""
        # (Q, B, C) -> (B, Q, C)
        decoded = self.decoder_query_norm_layers[stage](query_features[: self.num_queries]).transpose(0, 1)
        class_logits = self.class_embed_layers[stage](decoded) if with_class else None
        mask_embedding = self.mask_embed_layers[stage](decoded)
        # (h*w, B, C) -> (B, h*w, mask_dim)
        mask_features = self.mask_features_layers[stage](pixel_features.transpose(0, 1))
        mask_logits = torch.einsum("bqc,blc->bql", mask_embedding, mask_features)
        # (B, Q, h*w) -> (B, Q, h, w)
        return class_logits, mask_logits.reshape(mask_logits.shape[0], self.num_queries, pixel_size[0], pixel_size[1])

    def attention_mask(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """(B, Q, h, w) mask logits -> (B, Q + aux, h*w) bool: a query attends where its mask logit is >= 0;
        auxiliary queries, and queries whose mask is empty, attend everywhere."""
        # auxiliary queries get a positive logit (attend everywhere)
        padded = F.pad(mask_logits, (0, 0, 0, 0, 0, self.num_aux_queries), "constant", 1)
        # (B, Q + aux, h, w) -> (B, Q + aux, h*w)
        blocked = (padded < 0.0).flatten(2)
        return (blocked & ~blocked.all(-1, keepdim=True)).detach()

    def forward(self, multi_scale_features: List[torch.Tensor]) -> FastInstPredictions:
        """multi_scale_features: the pixel decoder's [stride 32, stride 16, stride 8] maps, each (B, C, h, w)."""
        batch_size = multi_scale_features[0].shape[0]
        proposal_features, pixel_map = multi_scale_features[1], multi_scale_features[2]
        pixel_size = (pixel_map.shape[-2], pixel_map.shape[-1])
        pixel_positions = F.interpolate(self.meta_pos_embed, size=pixel_size, mode="bilinear", align_corners=False)
        proposal_positions = F.interpolate(self.meta_pos_embed, size=proposal_features.shape[-2:], mode="bilinear",
                                           align_corners=False)
        # (B, C, h, w) -> (h*w, B, C)
        pixel_features = pixel_map.flatten(2).permute(2, 0, 1)
        pixel_positions = pixel_positions.flatten(2).permute(2, 0, 1)

        query_features, query_positions, query_indices, proposal_class_logits = self.query_proposal(
            proposal_features, proposal_positions)
        # (B, C, Q) -> (Q, B, C)
        query_features = query_features.permute(2, 0, 1)
        query_positions = query_positions.permute(2, 0, 1)
        if self.num_aux_queries > 0:
            # (aux, C) -> (aux, B, C)
            query_features = torch.cat(
                [query_features, self.empty_query_features.weight.unsqueeze(1).repeat(1, batch_size, 1)], 0)
            query_positions = torch.cat(
                [query_positions, self.empty_query_pos_embed.weight.unsqueeze(1).repeat(1, batch_size, 1)], 0)

        class_logits, mask_logits = self.predict(0, query_features, pixel_features, pixel_size,
                                                 with_class=self.training or self.num_layers == 0)
        predictions_class, predictions_mask = [class_logits], [mask_logits]
        query_memory, pixel_memory = [query_features], [pixel_features]
        for layer_index in range(self.num_layers):
            query_features, pixel_features = self.dual_path_layer(
                layer_index, query_features, pixel_features, query_positions, pixel_positions,
                self.attention_mask(mask_logits))
            is_last = layer_index == self.num_layers - 1
            class_logits, mask_logits = self.predict(layer_index + 1, query_features, pixel_features, pixel_size,
                                                     with_class=self.training or is_last)
            predictions_class.append(class_logits)
            predictions_mask.append(mask_logits)
            query_memory.append(query_features)
            pixel_memory.append(pixel_features)

        predictions = FastInstPredictions(predictions_class, predictions_mask, proposal_class_logits, query_indices)
        if self.training:
            height, width = proposal_features.shape[-2:]
            locations = pixel_locations(height, width, proposal_features.device)
            # (2, h*w) -> (B, Q, 2)
            predictions.query_locations = locations[:, query_indices].permute(1, 2, 0)
            predictions.state = DecoderState(query_memory, pixel_memory, query_positions, pixel_positions, pixel_size)
        return predictions

    def guided_forward(self, state: DecoderState,
                       guide_attention_mask: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Ground-truth mask-guided learning (training only, as official FastInst): each layer ``i`` runs again on the
        features stage ``i + 1`` produced, attending through ``guide_attention_mask`` (see
        ``location_cost.ground_truth_attention_mask``) instead of the predicted masks; returns per layer the class
        logits (B, Q, C + 1) and mask logits (B, Q, h, w) of those passes."""
        class_logits, mask_logits = [], []
        for layer_index in range(self.num_layers):
            query_features, pixel_features = self.dual_path_layer(
                layer_index, state.query_memory[layer_index + 1], state.pixel_memory[layer_index + 1],
                state.query_positions, state.pixel_positions, guide_attention_mask)
            guided_class, guided_mask = self.predict(layer_index + 1, query_features, pixel_features, state.pixel_size,
                                                     with_class=True)
            class_logits.append(guided_class)
            mask_logits.append(guided_mask)
        return class_logits, mask_logits
