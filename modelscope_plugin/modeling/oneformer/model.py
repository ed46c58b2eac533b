"""OneFormer (Jain et al., CVPR 2023): one network for panoptic, semantic and instance segmentation, told the task.

Backbone and pixel decoder are Mask2Former's. The task sentence's token ids (``task_tokens.py``), read as floats,
pass a two-layer MLP into one task query. A small DETR decoder (the query transformer) turns that task query,
repeated for every object query and offset by the learned query positions, into object queries by attending to the
stride-4 mask features (as the reference wires it: their sine position encoding is the memory, their projection the
memory's position); the task query, normalised by the decoder's LayerNorm, is appended as the last
query. Mask2Former's masked-attention decoder then refines all of them and predicts classes and masks for each, so
the outputs have ``num_queries`` rows, the task query's included (as in the reference implementations).

Training (``forward_training``) tells each image its own task and also returns what the contrastive loss compares:
the queries entering the masked-attention decoder and the text mapper's embeddings of each image's text list.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from modelscope_plugin.modeling.mask2former.model import Mask2FormerOutput
from modelscope_plugin.modeling.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from modelscope_plugin.modeling.mask2former.transformer_decoder import (
    MLP,
    CrossAttentionLayer,
    FeedForwardLayer,
    MultiScaleMaskedTransformerDecoder,
    SelfAttentionLayer,
)
from modelscope_plugin.modeling.oneformer.criterion import OneFormerTrainingOutput
from modelscope_plugin.modeling.oneformer.task_tokens import task_token_ids
from modelscope_plugin.modeling.oneformer.text_mapper import TextMapper


class QueryTransformer(nn.Module):
    """Post-norm DETR decoder: per layer self-attention among the queries, cross-attention to the pixels, feed-forward;
    a final LayerNorm."""

    def __init__(self, hidden_dim: int, num_heads: int, feedforward_dim: int, num_layers: int, dropout: float = 0.1):
        super().__init__()
        self.self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.ffn_layers = nn.ModuleList(
            FeedForwardLayer(hidden_dim, feedforward_dim, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, queries: torch.Tensor, query_positions: torch.Tensor, pixels: torch.Tensor,
                pixel_positions: torch.Tensor) -> torch.Tensor:
        """queries, query_positions: (Q, B, C); pixels, pixel_positions: (HW, B, C). Returns (Q, B, C)."""
        for self_attention, cross_attention, feedforward in zip(
                self.self_attention_layers, self.cross_attention_layers, self.ffn_layers):
            queries = self_attention(queries, query_positions)
            queries = cross_attention(queries, pixels, None, pixel_positions, query_positions)
            queries = feedforward(queries)
        return self.norm(queries)


class OneFormer(nn.Module):
    def __init__(self, backbone: nn.Module, pixel_decoder: MSDeformAttnPixelDecoder,
                 transformer_decoder: MultiScaleMaskedTransformerDecoder, query_transformer: QueryTransformer,
                 task_sequence_length: int, mask_dim: int, use_task_norm: bool = True,
                 text_mapper: Optional[TextMapper] = None):
        super().__init__()
        if transformer_decoder.query_feat is not None:
            raise ValueError("OneFormer's transformer decoder takes its initial queries (learned_queries=False)")
        hidden_dim = transformer_decoder.decoder_norm.normalized_shape[0]
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.query_transformer = query_transformer
        self.task_sequence_length = task_sequence_length
        self.use_task_norm = use_task_norm
        self.task_mlp = MLP(task_sequence_length, hidden_dim, hidden_dim, 2)
        self.query_input_projection = nn.Conv2d(mask_dim, hidden_dim, kernel_size=1)
        nn.init.xavier_uniform_(self.query_input_projection.weight)
        nn.init.zeros_(self.query_input_projection.bias)
        self.text_mapper = text_mapper

    def task_query(self, task: Union[str, Sequence[str]], batch_size: int, reference: torch.Tensor) -> torch.Tensor:
        """(B, C): the task MLP on the task sentence's token ids read as floats (normalised if ``use_task_norm``);
        ``task``: one for the batch or one per image."""
        tasks = [task] * batch_size if isinstance(task, str) else list(task)
        if len(tasks) != batch_size:
            raise ValueError(f"{len(tasks)} tasks for {batch_size} images")
        # (B, task_seq_len)
        tokens = torch.stack([task_token_ids(name, self.task_sequence_length) for name in tasks])
        query = self.task_mlp(tokens.to(reference.device, reference.dtype))
        return self.transformer_decoder.decoder_norm(query) if self.use_task_norm else query

    def forward(self, images: torch.Tensor, task: Union[str, Sequence[str]] = "panoptic",
                return_auxiliary: Optional[bool] = None, text_tokens: Optional[torch.Tensor] = None
                ) -> Union[Mask2FormerOutput, OneFormerTrainingOutput]:
        """images: (B, 3, H, W) normalised and padded; task: "panoptic", "semantic" or "instance" (or one per
        image). Returns raw logits for ``num_queries`` queries, the last being the task query (earlier decoder
        stages too when ``return_auxiliary``, by default in training). With ``text_tokens``: ``forward_training``
        (so that a data-parallel wrapper sees the training pass)."""
        if text_tokens is not None:
            return self.forward_training(images, task, text_tokens)
        return self.predict(images, task, return_auxiliary)[0]

    def forward_training(self, images: torch.Tensor, tasks: Sequence[str],
                         text_tokens: torch.Tensor) -> OneFormerTrainingOutput:
        """images: (B, 3, H, W); tasks: one per image; text_tokens: (B, num_text, context_length) CLIP ids of each
        image's text list, num_text = num_queries - the text mapper's prompt embeddings. Auxiliary stages included."""
        if self.text_mapper is None:
            raise ValueError("this OneFormer has no text mapper (build it with a text_mapper config to train)")
        predictions, contrastive_queries = self.predict(images, tasks, return_auxiliary=True)
        return OneFormerTrainingOutput(predictions, contrastive_queries, self.text_mapper(text_tokens))

    def predict(self, images: torch.Tensor, task: Union[str, Sequence[str]],
                return_auxiliary: Optional[bool]) -> Tuple[Mask2FormerOutput, torch.Tensor]:
        """(logits, (B, Q, C) queries entering the masked-attention decoder: object queries, then the task query)."""
        features = self.backbone(images)
        mask_features, multi_scale_features = self.pixel_decoder(features)
        batch_size = images.shape[0]
        task_query = self.task_query(task, batch_size, mask_features)
        decoder = self.transformer_decoder
        # object queries: the task query for each (zeros without the task norm), placed by the learned positions
        # of all queries but the last
        query_positions = decoder.query_embed.weight[:-1, None].expand(-1, batch_size, -1)
        initial = (task_query[None].expand(query_positions.shape[0], -1, -1) if self.use_task_norm
                   else torch.zeros_like(query_positions))
        # the reference passes the sine encoding of the mask features as the attended memory (keys and values) and
        # their projection as its position (added to the keys only); (B, C, H/4, W/4) -> (HW, B, C)
        memory = decoder.position_encoding(mask_features).flatten(2).permute(2, 0, 1)
        memory_positions = self.query_input_projection(mask_features).flatten(2).permute(2, 0, 1)
        object_queries = self.query_transformer(initial, query_positions, memory, memory_positions)
        # (Q - 1, B, C) + (1, B, C) -> (Q, B, C)
        queries = torch.cat([object_queries, task_query[None]], dim=0)
        predictions = decoder(multi_scale_features, mask_features, return_auxiliary, queries=queries)
        output = Mask2FormerOutput(
            class_logits=predictions.class_logits[-1],
            mask_logits=predictions.mask_logits[-1],
            auxiliary_class_logits=predictions.class_logits[:-1],
            auxiliary_mask_logits=predictions.mask_logits[:-1],
        )
        # (Q, B, C) -> (B, Q, C)
        return output, queries.permute(1, 0, 2)
