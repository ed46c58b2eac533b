"""Row-wise blocks computed over groups of rows in inference.

A transformer's feed-forward block, with the norm and the residual around it, maps every token on its own. On large
inputs its hidden layer is large: 99 MB of bfloat16 in Swin-L's first stage at 800x1333, 43 MB in the deformable
pixel decoder. glibc's malloc returns a freed block that large to the operating system and the next call faults it
in again, a 4 KiB page at a time (the cost dominated several of these blocks on a 2-core VM, benchmarks/README.md).
Over groups of rows every intermediate stays small and in the CPU's cache, and the rows come out the same: each row's
arithmetic does not depend on the rows beside it.
"""
from typing import Callable, Optional

import torch

# Hidden-layer elements per group of rows (8 MiB of float32).
GROUP_ELEMENTS = 1 << 21
# Rows per group, at least, for each input channel: every group's matrix products pack their weights again (about
# input channels x hidden width), which more rows amortise. With fewer, Swin-L's third-stage MLP (768 channels,
# 4032 tokens at 800x1333) took 1.4-1.6x as long over groups as in one pass; the first stage's 64512 tokens x 192
# channels took 0.6x.
MIN_ROWS_PER_CHANNEL = 8


def in_inference(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is computed without autograd and outside tracing, export and compilation (where a loop of
    groups would be unrolled into the graph)."""
    return (not (torch.is_grad_enabled() and tensor.requires_grad) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


def rows_per_group(hidden_width: int, channels: int) -> int:
    """Rows a group holds: at most ``GROUP_ELEMENTS`` hidden elements, but ``MIN_ROWS_PER_CHANNEL`` rows per input
    channel."""
    return max(GROUP_ELEMENTS // max(1, hidden_width), MIN_ROWS_PER_CHANNEL * channels, 1)


def map_row_groups(function: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, hidden_width: int,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``function(inputs)`` for a ``function`` that maps each row (last dimension) of ``inputs`` on its own:
    (..., C) -> (..., C_out), through intermediates of ``hidden_width`` per row.

    In inference (``in_inference``) it runs on groups of rows of the flattened leading dimensions
    (``rows_per_group``) and writes into ``out`` (which may be ``inputs`` itself, where the
    caller owns it and needs it no more; by default a new tensor of the result's dtype). Otherwise, or where one group
    holds every row, it returns ``function(inputs)``.
    """
    rows = inputs.reshape(-1, inputs.shape[-1])
    group_rows = rows_per_group(hidden_width, inputs.shape[-1])
    if not in_inference(inputs) or rows.shape[0] <= group_rows:
        return function(inputs)
    first = function(rows[:group_rows])
    if out is None:
        out = torch.empty(inputs.shape[:-1] + first.shape[-1:], dtype=first.dtype, device=first.device)
    out_rows = out.view(-1, out.shape[-1])
    out_rows[:group_rows] = first
    for start in range(group_rows, rows.shape[0], group_rows):
        out_rows[start:start + group_rows] = function(rows[start:start + group_rows])
    return out
