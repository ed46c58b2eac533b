"""The plain ViT that EoMT is made of: DINOv2 embeddings (class token, register tokens, learned position
embeddings for one square grid) or DINOv3's (the same without position embeddings, with 2-D rotary embeddings
on the patches instead), and pre-norm blocks with per-channel layer scales."""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from modelscope_plugin.modeling.layers.cpu_bf16 import linear_gelu


class PatchEmbeddings(nn.Module):
    """Pixels -> [class token, register tokens, patches + position embeddings]."""

    def __init__(self, hidden_dim: int, patch_size: int, grid_size: int, num_register_tokens: int,
                 learned_positions: bool = True, in_channels: int = 3):
        super().__init__()
        self.grid_size = grid_size
        self.hidden_dim = hidden_dim
        self.patch_projection = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, hidden_dim))
        nn.init.trunc_normal_(self.class_token, std=0.02)
        self.position_embeddings = None
        if learned_positions:
            self.position_embeddings = nn.Parameter(torch.zeros(grid_size * grid_size, hidden_dim))
            nn.init.normal_(self.position_embeddings)

    @property
    def num_prefix_tokens(self) -> int:
        """The class token and the register tokens, which come before the patches."""
        return 1 + self.register_tokens.shape[1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, prefix + grid * grid, D)."""
        patches = self.patch_projection(pixels)
        if patches.shape[-2:] != (self.grid_size, self.grid_size):
            raise ValueError(f"input {tuple(pixels.shape[-2:])} does not give the {self.grid_size}x{self.grid_size} "
                             "patch grid the position embeddings were made for")
        # (B, D, grid, grid) -> (B, grid * grid, D)
        patches = patches.flatten(2).transpose(1, 2)
        if self.position_embeddings is not None:
            patches = patches + self.position_embeddings.to(patches.dtype)
        batch_size = pixels.shape[0]
        return torch.cat([self.class_token.expand(batch_size, -1, -1).to(patches.dtype),
                          self.register_tokens.expand(batch_size, -1, -1).to(patches.dtype), patches], dim=1)


class RotaryEmbedding2d(nn.Module):
    """DINOv3's rotary position embedding for a square patch grid: each patch centre (y, x) scaled to [-1, 1];
    a quarter of each head's channels turn with y and a quarter with x at frequencies ``theta ** -(4 i / head_dim)``,
    the pattern repeated for the second half (the rotate-half pairing). Fixed at the grid the network runs at."""

    def __init__(self, head_dim: int, grid_size: int, theta: float):
        super().__init__()
        inverse_frequencies = 1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)
        centers = torch.arange(0.5, grid_size, dtype=torch.float32) / grid_size
        # (grid, grid, 2) -> (grid^2, 2) as (y, x), then to [-1, 1]
        coordinates = torch.stack(torch.meshgrid(centers, centers, indexing="ij"), dim=-1).flatten(0, 1)
        coordinates = 2.0 * coordinates - 1.0
        # (grid^2, 2, head_dim / 4) -> (grid^2, head_dim / 2) -> (grid^2, head_dim)
        angles = 2 * math.pi * coordinates[:, :, None] * inverse_frequencies[None, None, :]
        angles = angles.flatten(1, 2).tile(2)
        self.register_buffer("cos", torch.cos(angles), persistent=False)
        self.register_buffer("sin", torch.sin(angles), persistent=False)

    def forward(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cos, self.sin


def rotate_patches(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the last grid^2 tokens of (B, heads, N, head_dim); the tokens before them (queries, class and register
    tokens) are left as they are."""
    num_patches = cos.shape[0]
    prefix, patches = states.split((states.shape[-2] - num_patches, num_patches), dim=-2)
    first_half, second_half = patches.chunk(2, dim=-1)
    rotated = torch.cat([-second_half, first_half], dim=-1)
    return torch.cat([prefix, patches * cos + rotated * sin], dim=-2)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused q/k/v (rows: query, key, value) and an optional boolean mask.

    The key bias never changes the output (it adds the same amount to every score of a query), so DINOv3's
    checkpoints, which have none, load with zeros there."""

    def __init__(self, hidden_dim: int, num_heads: int):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.projection = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """tokens (B, N, D); attention_mask (B, N, N), True where a token may attend; rotary: (cos, sin) for the
        patches, the last tokens."""
        batch_size, num_tokens, hidden_dim = tokens.shape
        # (B, N, 3D) -> (3, B, heads, N, D / heads)
        qkv = self.qkv(tokens).reshape(batch_size, num_tokens, 3, self.num_heads, hidden_dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rotary is not None:
            query, key = rotate_patches(query, *rotary), rotate_patches(key, *rotary)
        if attention_mask is not None:
            attention_mask = attention_mask[:, None]
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        # (B, heads, N, D / heads) -> (B, N, D)
        attended = attended.transpose(1, 2).reshape(batch_size, num_tokens, hidden_dim)
        return self.projection(attended)


class Mlp(nn.Module):
    def __init__(self, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, mlp_dim)
        self.activation = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, hidden_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_gelu(tokens, self.fc1, self.activation))


class SwigluMlp(nn.Module):
    """SiLU(gate(x)) * up(x) -> down, with the hidden width 2/3 of ``mlp_dim`` rounded up to a multiple of 8."""

    def __init__(self, hidden_dim: int, mlp_dim: int):
        super().__init__()
        swiglu_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
        self.gate = nn.Linear(hidden_dim, swiglu_dim)
        self.up = nn.Linear(hidden_dim, swiglu_dim)
        self.down = nn.Linear(swiglu_dim, hidden_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(tokens)) * self.up(tokens))


class VitBlock(nn.Module):
    """x + scale1 * attention(norm1(x)), then x + scale2 * mlp(norm2(x))."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_dim: int, swiglu_mlp: bool, layer_norm_eps: float,
                 layer_scale_init: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.attention = SelfAttention(hidden_dim, num_heads)
        self.layer_scale1 = nn.Parameter(torch.full((hidden_dim,), float(layer_scale_init)))
        self.norm2 = nn.LayerNorm(hidden_dim, eps=layer_norm_eps)
        self.mlp = SwigluMlp(hidden_dim, mlp_dim) if swiglu_mlp else Mlp(hidden_dim, mlp_dim)
        self.layer_scale2 = nn.Parameter(torch.full((hidden_dim,), float(layer_scale_init)))

    def forward(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        # tokens + scale * branch in one pass (addcmul; two passes over the float32 stream made of the product and
        # the sum took 4x as long)
        tokens = torch.addcmul(tokens, self.layer_scale1, self.attention(self.norm1(tokens), attention_mask, rotary))
        return torch.addcmul(tokens, self.layer_scale2, self.mlp(self.norm2(tokens)))
