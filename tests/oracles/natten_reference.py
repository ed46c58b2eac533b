"""A loop reference for NATTEN's 2-D neighbourhood attention with relative position bias (``natten2dqkrpb`` and
``natten2dav`` of NATTEN <= 0.17, the functions transformers' DiNAT calls), for tests only.

The window and bias-table arithmetic is transcribed from NATTEN's CPU kernels (``get_window_start`` and
``get_pb_start`` of its common CPU header), pixel by pixel: no part of it is shared with
``modelscope_plugin.modeling.backbones.dinat``, which computes the same windows by clamping on dilation sub-grids.
Layouts are NATTEN's: query / key / value (B, heads, H, W, head_dim), attention (B, heads, H, W, K * K) with the
window's rows outer and its columns inner, bias (heads, 2K - 1, 2K - 1).
"""
import torch


def window_start(index: int, length: int, kernel_size: int, neighborhood_size: int, dilation: int) -> int:
    if dilation <= 1:
        return (max(index - neighborhood_size, 0)
                + (index + neighborhood_size >= length) * (length - index - neighborhood_size - 1))
    shifted = index - neighborhood_size * dilation
    if shifted < 0:
        return index % dilation
    if index + neighborhood_size * dilation >= length:
        remainder = index % dilation
        multiple = (length // dilation) * dilation
        rest = length - multiple
        if remainder < rest:
            return length - rest + remainder - 2 * neighborhood_size * dilation
        return multiple + remainder - kernel_size * dilation
    return shifted


def bias_start(index: int, length: int, kernel_size: int, neighborhood_size: int, dilation: int) -> int:
    if dilation <= 1:
        return (neighborhood_size + (index < neighborhood_size) * (neighborhood_size - index)
                + (index + neighborhood_size >= length) * (length - index - 1 - neighborhood_size))
    if index - neighborhood_size * dilation < 0:
        return kernel_size - 1 - (index // dilation)
    if index + neighborhood_size * dilation >= length:
        return (length - index - 1) // dilation
    return neighborhood_size


def _windows(height, width, kernel_size, dilation):
    """For every pixel: (row indices, column indices, bias rows, bias columns) of its window."""
    neighborhood_size = kernel_size // 2
    steps = torch.arange(kernel_size)
    for row in range(height):
        row_start = window_start(row, height, kernel_size, neighborhood_size, dilation)
        row_bias = bias_start(row, height, kernel_size, neighborhood_size, dilation)
        for column in range(width):
            column_start = window_start(column, width, kernel_size, neighborhood_size, dilation)
            column_bias = bias_start(column, width, kernel_size, neighborhood_size, dilation)
            yield (row, column, row_start + steps * dilation, column_start + steps * dilation,
                   row_bias + steps, column_bias + steps)


def natten2dqkrpb(query, key, rpb, kernel_size, dilation):
    batch_size, heads, height, width, _ = query.shape
    if height < kernel_size * dilation or width < kernel_size * dilation:
        raise ValueError("Input resolution must be greater than or equal to kernel size x dilation.")
    scores = query.new_zeros(batch_size, heads, height, width, kernel_size * kernel_size)
    for row, column, rows, columns, bias_rows, bias_columns in _windows(height, width, kernel_size, dilation):
        # (B, heads, K, K, head_dim)
        window = key[:, :, rows][:, :, :, columns]
        logits = torch.einsum("bhd,bhijd->bhij", query[:, :, row, column], window)
        bias = rpb[:, bias_rows][:, :, bias_columns]
        scores[:, :, row, column] = (logits + bias[None]).flatten(2)
    return scores


def natten2dav(attention, value, kernel_size, dilation):
    batch_size, heads, height, width, _ = attention.shape
    output = value.new_zeros(batch_size, heads, height, width, value.shape[-1])
    for row, column, rows, columns, _, _ in _windows(height, width, kernel_size, dilation):
        window = value[:, :, rows][:, :, :, columns].flatten(2, 3)
        output[:, :, row, column] = torch.einsum("bhk,bhkd->bhd", attention[:, :, row, column], window)
    return output
