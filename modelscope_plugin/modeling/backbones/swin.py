"""Swin Transformer backbone (Liu et al., 2021) returning res2..res5 feature maps.

Parameter names follow the original Swin release (``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.qkv``,
``mlp.fc1``, ``layers.{i}.downsample.reduction``, ``norm{i}``), which detectron2's Mask2Former also uses;
``checkpoint.py`` maps mmdet's and Hugging Face's layouts onto it.

Behaviour follows mmdet 2.x / detectron2 Mask2Former, the sources of the hub checkpoints: each stage
pads its input to a multiple of the window and every odd block shifts by half a window, whatever the
feature-map size. transformers' Mask2Former backbone does the same (only its standalone ``SwinModel`` drops
the shift and shrinks the window on small maps), so one behaviour serves every supported source.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from modelscope_plugin.modeling.layers.cpu_bf16 import autocast_dtype, autocast_input, contiguous_map, linear_gelu
from modelscope_plugin.modeling.layers.row_groups import in_inference, map_row_groups, rows_per_group

# Attention logit given to pairs of tokens from different regions of a shifted window (mmdet and the
# original Swin use -100, not -inf, so that softmax stays finite on fully masked rows).
SHIFTED_WINDOW_MASK_VALUE = -100.0


def relative_position_index(window_size: int) -> torch.Tensor:
    """(window_size², window_size²) index into the relative position bias table."""
    coordinates = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coordinates = coordinates.flatten(1)  # (2, N)
    relative = coordinates[:, :, None] - coordinates[:, None, :]  # (2, N, N)
    relative = relative.permute(1, 2, 0) + (window_size - 1)
    return relative[:, :, 0] * (2 * window_size - 1) + relative[:, :, 1]


def window_partition(features: torch.Tensor, window_size: int) -> torch.Tensor:
    """(batch, H, W, C) -> (batch * num_windows, window_size * window_size, C); H and W are multiples of the window."""
    batch_size, height, width, channels = features.shape
    features = features.view(batch_size, height // window_size, window_size, width // window_size, window_size,
                             channels)
    return features.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def padded_to_window(size: int, window_size: int) -> int:
    """``size`` rounded up to a multiple of the window (each stage pads its map so)."""
    return -(-size // window_size) * window_size


class WindowRows(NamedTuple):
    """A block's window partition as rows of flattened tensors, so that the pad's crop, the shift (roll), the partition
    and their inverses are one ``index_select`` each way (a roll and a permuted copy each way otherwise)."""
    # (batch * num_windows * N,) row of the padded (batch * H' * W', C) map of each window token; the windows of every
    # image that need no mask first, then those that do (``masked_windows``), image-major in each part
    partition: torch.Tensor
    reverse: torch.Tensor  # (batch * height * width,) window-token row of each token of the unpadded map


def window_rows(batch_size: int, height: int, width: int, window_size: int, shift_size: int, device,
                masked_windows: Sequence[int] = ()) -> WindowRows:
    """``WindowRows`` of a (height, width) map padded to multiples of the window and rolled by ``-shift_size``;
    ``masked_windows``: indices among an image's windows of those placed last (``ShiftedWindowMask.windows``)."""
    padded_height, padded_width = padded_to_window(height, window_size), padded_to_window(width, window_size)
    map_rows = torch.arange(batch_size * padded_height * padded_width, device=device).view(
        batch_size, padded_height, padded_width, 1)
    if shift_size > 0:
        map_rows = torch.roll(map_rows, shifts=(-shift_size, -shift_size), dims=(1, 2))
    windows = window_partition(map_rows, window_size)  # (batch * num_windows, N, 1)
    if masked_windows:
        num_windows = windows.shape[0] // batch_size
        masked = set(masked_windows)
        order = ([image * num_windows + window for image in range(batch_size) for window in range(num_windows)
                  if window not in masked]
                 + [image * num_windows + window for image in range(batch_size) for window in masked_windows])
        windows = windows[torch.tensor(order, device=device)]
    partition = windows.flatten()
    reverse = torch.empty_like(partition)
    reverse[partition] = torch.arange(partition.shape[0], device=device)
    reverse = reverse.view(batch_size, padded_height, padded_width)[:, :height, :width].flatten()
    return WindowRows(partition, reverse)


def window_region_ids(height: int, width: int, window_size: int, shift_size: int, device) -> torch.Tensor:
    """(num_windows, N) region of each token of each window of a map rolled by ``shift_size``: the roll brings the
    bottom / right strips next to the top / left ones, and tokens of different regions must not attend to each other."""
    region_ids = torch.zeros((1, height, width, 1), device=device)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region = 0
    for row_slice in slices:
        for column_slice in slices:
            region_ids[:, row_slice, column_slice, :] = region
            region += 1
    return window_partition(region_ids, window_size).squeeze(-1)


def region_mask(window_region_ids: torch.Tensor) -> torch.Tensor:
    """(windows, N) region ids -> (windows, N, N) additive mask: 0 within a region, ``SHIFTED_WINDOW_MASK_VALUE``
    across."""
    different_region = window_region_ids[:, None, :] != window_region_ids[:, :, None]
    return torch.zeros(different_region.shape, device=window_region_ids.device).masked_fill(
        different_region, SHIFTED_WINDOW_MASK_VALUE)


def shifted_window_attention_mask(height: int, width: int, window_size: int, shift_size: int, device) -> torch.Tensor:
    """(num_windows, N, N) additive mask that keeps a shifted window from mixing regions that were not adjacent."""
    return region_mask(window_region_ids(height, width, window_size, shift_size, device))


class ShiftedWindowMask(NamedTuple):
    """A shifted block's attention mask, kept for the windows whose mask is not all zero (those on the last row or
    column of windows, where the roll brings together regions that were not adjacent): attention in every other
    window needs only the relative position bias."""
    windows: List[int]  # indices of the masked windows among an image's windows, ascending
    mask: torch.Tensor  # (k, N, N) their additive masks
    num_windows: int  # windows per image


def masked_shifted_windows(height: int, width: int, window_size: int, shift_size: int,
                           device) -> ShiftedWindowMask:
    """The windows of the last row and column of windows of a (height, width) map (multiples of the window) and
    their ``shifted_window_attention_mask``; every other window's mask is all zero. Found from the geometry, not from
    the mask's values, so that the shapes do not depend on data (``torch.export``)."""
    region_ids = window_region_ids(height, width, window_size, shift_size, device)
    columns = width // window_size
    rows = region_ids.shape[0] // columns
    windows = [row * columns + column for row in range(rows) for column in range(columns)
               if row == rows - 1 or column == columns - 1]
    return ShiftedWindowMask(windows, region_mask(region_ids[torch.tensor(windows, device=device)]),
                             region_ids.shape[0])


def stage_windows(batch_size: int, height: int, width: int, window_size: int, shift_sizes: Sequence[int],
                  device) -> Tuple[Optional[ShiftedWindowMask], Dict[int, WindowRows]]:
    """What the blocks of a stage on a (height, width) map share: the shifted-window mask (None without shifted
    blocks) and the ``window_rows`` of each shift in ``shift_sizes``."""
    shift_size = max(shift_sizes)
    shifted_window_mask = None if shift_size == 0 else masked_shifted_windows(
        padded_to_window(height, window_size), padded_to_window(width, window_size), window_size, shift_size, device)
    layouts = {shift: window_rows(batch_size, height, width, window_size, shift, device,
                                  shifted_window_mask.windows if shift > 0 else ())
               for shift in set(shift_sizes)}
    return shifted_window_mask, layouts


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True,
                 attention_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attention_dropout = attention_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """windows: (num_windows, N, C); masks: (m, N, N) additive masks of the last m windows (a shifted block's
        windows that mix regions, which ``window_rows`` puts last), or None. Every window attends with the relative
        position bias, the last m with their mask added too. In inference over groups of windows (``rows_per_group``
        of the qkv projection, whose output is 74 MB in Swin-L's first stage at 800x1333)."""
        num_windows, tokens, channels = windows.shape
        # (heads, N, N), in the attention's dtype (bf16 under autocast: the sums with the masks below are built in
        # bf16; the masks' 0 and -100 are exact there)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].to(autocast_dtype(windows))
        bias = bias.view(tokens, tokens, self.num_heads).permute(2, 0, 1)
        num_masked = 0 if masks is None else masks.shape[0]
        # the windows without and with a mask, and their (1 or m, heads, N, N) attention masks
        parts = [(windows[:num_windows - num_masked], bias[None])]
        if num_masked > 0:
            parts.append((windows[num_windows - num_masked:], bias[None] + masks.to(bias.dtype)[:, None]))
        group_size = (max(1, rows_per_group(3 * channels, channels) // tokens) if in_inference(windows)
                      else num_windows)
        attended = [self.attend(part[start:start + group_size],
                                attention_mask if attention_mask.shape[0] == 1
                                else attention_mask[start:start + group_size])
                    for part, attention_mask in parts for start in range(0, part.shape[0], group_size)]
        return torch.cat(attended) if len(attended) > 1 else attended[0]

    def attend(self, windows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """windows: (W, N, C); attention_mask: (1 or W, heads, N, N) added to the logits. Returns (W, N, C)."""
        num_windows, tokens, channels = windows.shape
        # (3, W, heads, N, head_dim)
        qkv = self.qkv(windows).reshape(
            num_windows, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        dropout = self.attention_dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        attended = attended.transpose(1, 2).reshape(num_windows, tokens, channels)
        return self.proj_drop(self.proj(attended))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(linear_gelu(tokens, self.fc1, self.act))))


class SwinBlock(nn.Module):
    """Pre-norm block: (shifted) window attention then MLP, each with a residual connection."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shifted else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, tokens: torch.Tensor, height: int, width: int,
                shifted_window_mask: Optional[ShiftedWindowMask] = None,
                layout: Optional[WindowRows] = None) -> torch.Tensor:
        """tokens: (batch, height * width, C); shifted_window_mask (``masked_shifted_windows``, used by shifted
        blocks) and layout (``window_rows`` for this block's shift): the stage's, built here when not given."""
        batch_size, _, channels = tokens.shape
        window_size, shift_size = self.window_size, self.shift_size
        if layout is None or (shift_size > 0 and shifted_window_mask is None):
            shifted_window_mask, layouts = stage_windows(batch_size, height, width, window_size, [shift_size],
                                                         tokens.device)
            layout = layouts[shift_size]
        padded_height, padded_width = padded_to_window(height, window_size), padded_to_window(width, window_size)
        # in the qkv projection's input dtype (half the bytes to move under bf16 autocast), over groups of tokens in
        # inference
        features = map_row_groups(lambda token_rows: autocast_input(self.norm1(token_rows)), tokens, channels)
        if (padded_height, padded_width) != (height, width):
            # zeros at the bottom and right, to a multiple of the window
            features = F.pad(features.view(batch_size, height, width, channels),
                             (0, 0, 0, padded_width - width, 0, padded_height - height))
        # (batch * num_windows, N, C), rolled by -shift_size, the masked windows last
        windows = features.reshape(-1, channels).index_select(0, layout.partition).view(
            -1, window_size * window_size, channels)
        windows = self.attn(windows, shifted_window_mask.mask.repeat(batch_size, 1, 1) if shift_size > 0 else None)
        # back in place (rolled by +shift_size), cropped: (batch, height * width, C)
        features = windows.view(-1, channels).index_select(0, layout.reverse).view(batch_size, height * width, channels)
        tokens = tokens + self.drop_path(features)
        if self.training:
            return tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        # in inference over groups of tokens, into ``tokens`` (a new tensor): the MLP's hidden layer is 99 MB in
        # Swin-L's first stage at 800x1333
        return map_row_groups(lambda token_rows: token_rows + self.mlp(self.norm2(token_rows)), tokens,
                              self.mlp.fc1.out_features,
                              out=tokens)


class PatchMerging(nn.Module):
    """2×2 neighbourhood concatenation (original Swin order: (0,0), (1,0), (0,1), (1,1)) then a linear reduction."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, int, int]:
        batch_size, _, channels = tokens.shape
        features = tokens.view(batch_size, height, width, channels)
        features = F.pad(features, (0, 0, 0, width % 2, 0, height % 2))
        merged = torch.cat(
            [features[:, 0::2, 0::2], features[:, 1::2, 0::2], features[:, 0::2, 1::2], features[:, 1::2, 1::2]], dim=-1
        )
        merged_height, merged_width = merged.shape[1], merged.shape[2]
        merged = merged.view(batch_size, merged_height * merged_width, 4 * channels)
        return self.reduction(self.norm(merged)), merged_height, merged_width


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool,
                 drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, shifted=index % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      drop_path=drop_paths[index])
            for index in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        self.window_size = window_size

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Runs the blocks on (batch, height * width, C) tokens; the shifted-window mask and the window rows are built
        once per stage."""
        shifted_window_mask, layouts = stage_windows(tokens.shape[0], height, width, self.window_size,
                                                     [block.shift_size for block in self.blocks], tokens.device)
        for block in self.blocks:
            tokens = block(tokens, height, width, shifted_window_mask, layouts[block.shift_size])
        return tokens


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size×patch_size convolution (input padded bottom/right), then LayerNorm."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        height, width = images.shape[-2:]
        images = F.pad(images, (0, (-width) % self.patch_size, 0, (-height) % self.patch_size))
        features = self.proj(images)
        height, width = features.shape[-2:]
        return self.norm(features.flatten(2).transpose(1, 2)), height, width


class SwinTransformer(nn.Module):
    """Swin backbone. ``forward`` returns {"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)}."""

    def __init__(self, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 4,
                 in_channels: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.3):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for stage_index, depth in enumerate(depths):
            first_block = sum(depths[:stage_index])
            self.layers.append(SwinStage(
                dim=embed_dim * 2 ** stage_index, depth=depth, num_heads=num_heads[stage_index],
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop_paths=drop_paths[first_block:first_block + depth], downsample=stage_index < len(depths) - 1,
            ))
        self.out_channels: Dict[str, int] = {f"res{index + 2}": embed_dim * 2 ** index for index in range(len(depths))}
        self.out_strides: Dict[str, int] = {f"res{index + 2}": patch_size * 2 ** index for index in range(len(depths))}
        for index in range(len(depths)):
            self.add_module(f"norm{index}", nn.LayerNorm(embed_dim * 2 ** index))
        self.apply(self._init_linear_and_norm)

    @staticmethod
    def _init_linear_and_norm(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        tokens, height, width = self.patch_embed(images)
        outputs: Dict[str, torch.Tensor] = {}
        for stage_index, stage in enumerate(self.layers):
            tokens = stage(tokens, height, width)
            stage_output = getattr(self, f"norm{stage_index}")(tokens)
            # (B, H*W, C) -> (B, C, H, W); the permuted view is channels-last, which CPU bf16 inference keeps
            outputs[f"res{stage_index + 2}"] = contiguous_map(
                stage_output.view(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2))
            if stage.downsample is not None:
                tokens, height, width = stage.downsample(tokens, height, width)
        return outputs
