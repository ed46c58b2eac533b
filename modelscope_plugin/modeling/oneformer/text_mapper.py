"""OneFormer's text side, used only by the training loss: each image's text list ("a photo with a {class}" per
target segment, padded with the task's sentence, ``training_targets.py``), as CLIP token ids, becomes one
embedding per entry.

A CLIP-style text encoder (token + learned position embeddings, pre-norm transformer with quick-GELU MLPs, final
LayerNorm, the feature at the end-of-text token, the largest id) feeds a ReLU MLP projector to the decoder's width;
``num_context`` learned prompt embeddings are appended after the projected entries. Names and wiring follow
transformers' ``OneFormerTextMapper`` (whose layers, like SHI-Labs' code, attend without the causal mask they
build), so its state dict loads with a prefix rename only.
"""
import torch
from torch import nn

from modelscope_plugin.modeling.mask2former.transformer_decoder import MLP


class TextMLP(nn.Module):
    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(features)
        # quick GELU: x * sigmoid(1.702 x)
        return self.fc2(hidden * torch.sigmoid(1.702 * hidden))


class TextTransformerLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x)); sequence-first (L, N, C)."""

    def __init__(self, width: int, num_heads: int, layer_norm_eps: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, num_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = TextMLP(width, width * 4)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = self.layer_norm1(hidden)
        hidden = hidden + self.self_attn(normed, normed, normed, need_weights=False)[0]
        return hidden + self.mlp(self.layer_norm2(hidden))


class TextTransformer(nn.Module):
    def __init__(self, width: int, num_layers: int, num_heads: int, layer_norm_eps: float):
        super().__init__()
        self.width = width
        self.layers = nn.Sequential(*[TextTransformerLayer(width, num_heads, layer_norm_eps)
                                      for _ in range(num_layers)])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


class TextEncoder(nn.Module):
    """(N, context_length) token ids -> (N, width) features at each sequence's end-of-text token."""

    def __init__(self, context_length: int, width: int, num_layers: int, vocab_size: int, layer_norm_eps: float):
        super().__init__()
        self.context_length = context_length
        self.transformer = TextTransformer(width, num_layers, width // 64, layer_norm_eps)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width, eps=layer_norm_eps)
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        projection_std = width ** -0.5 * (2 * num_layers) ** -0.5
        for layer in self.transformer.layers:
            nn.init.normal_(layer.self_attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=projection_std)
            nn.init.normal_(layer.mlp.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(layer.mlp.fc2.weight, std=projection_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # (N, L) -> (N, L, C) -> (L, N, C) for the sequence-first attention
        hidden = (self.token_embedding(tokens) + self.positional_embedding).permute(1, 0, 2)
        hidden = self.ln_final(self.transformer(hidden).permute(1, 0, 2))
        # the end-of-text token has the largest id of CLIP's vocabulary
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), tokens.argmax(dim=-1)]


class TextMapper(nn.Module):
    def __init__(self, hidden_dim: int, context_length: int = 77, width: int = 256, num_layers: int = 6,
                 vocab_size: int = 49408, projector_layers: int = 2, num_context: int = 16,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        if num_context > 0 and width != hidden_dim:
            raise ValueError(f"prompt embeddings (width {width}) are appended to text queries of width {hidden_dim}: "
                             "the two must be equal")
        self.text_encoder = TextEncoder(context_length, width, num_layers, vocab_size, layer_norm_eps)
        self.text_projector = MLP(width, hidden_dim, hidden_dim, projector_layers)
        self.prompt_ctx = nn.Embedding(num_context, width) if num_context > 0 else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, num_text, context_length) ids -> (B, num_text + num_context, hidden_dim) text queries."""
        batch_size, num_text, context_length = tokens.shape
        # (B * num_text, L) -> (B * num_text, width) -> (B, num_text, hidden_dim)
        encoded = self.text_encoder(tokens.reshape(batch_size * num_text, context_length))
        text_queries = self.text_projector(encoded).reshape(batch_size, num_text, -1)
        if self.prompt_ctx is None:
            return text_queries
        # (num_context, width) -> (B, num_context, width), appended as transformers does (width == hidden_dim there)
        context = self.prompt_ctx.weight[None].expand(batch_size, -1, -1)
        return torch.cat([text_queries, context], dim=1)
