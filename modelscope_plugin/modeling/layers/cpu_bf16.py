"""What runs differently in inference under CPU bfloat16 autocast, where oneDNN's bfloat16 kernels have faster forms.

``linear_gelu``: a linear layer and GELU as one oneDNN matrix product. torch has no public fused linear +
activation for CPU; ``torch.ops.mkldnn._linear_pointwise`` is the oneDNN product with an activation applied to its
float32 sums before the result is rounded, which torch's own compiler (inductor) emits for this pattern. The GELU then
costs no pass over a (tokens, 4 x width) bfloat16 tensor: on a 2-core AMX CPU a ViT-L / Swin-L MLP's first layer took
25-40 % less time (benchmarks/README.md), and the result is at least as close to float32 (one rounding instead of two).

``channels_last_in_bf16``: full-resolution feature maps laid out channels-last, where oneDNN's bfloat16 convolutions
and torch's group norm run about twice as fast as on NCHW maps. Not in float32, where torch's channels-last group
norm is less accurate (backbones/resnet.py). ``contiguous_map``: the backbones' output maps likewise, as they compute
them (no NCHW copy).

Anywhere else (float32, training, GPUs, a torch build without the op) the layers run as written.
"""
import torch
from torch import nn

FUSED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
"""oneDNN's linear + activation op (``linear_gelu``), or None where this torch build has none."""


def cpu_bf16_inference(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is on the CPU in inference (no autograd) under bfloat16 autocast."""
    return (tensor.device.type == "cpu" and not torch.is_grad_enabled() and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def linear_gelu(tokens: torch.Tensor, linear: nn.Linear, activation: nn.Module) -> torch.Tensor:
    """``activation(linear(tokens))``: (..., in_features) -> (..., out_features); one fused oneDNN product in
    ``cpu_bf16_inference`` where ``activation`` is an ``nn.GELU`` (exact or tanh), the two modules otherwise."""
    if not (FUSED_LINEAR is not None and isinstance(activation, nn.GELU) and cpu_bf16_inference(tokens)):
        return activation(linear(tokens))
    dtype = torch.bfloat16  # the operands autocast would give F.linear
    bias = None if linear.bias is None else linear.bias.to(dtype)
    return FUSED_LINEAR(tokens.to(dtype), linear.weight.to(dtype), bias, "gelu", [], activation.approximate)


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives ``tensor`` as a matrix product's input: its own where autocast is off for its device
    or leaves it alone (float64, integers)."""
    device_type = tensor.device.type
    if not torch.is_autocast_enabled(device_type) or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return tensor.dtype
    return torch.get_autocast_dtype(device_type)


def autocast_input(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in ``autocast_dtype`` (the same rounding as autocast's): copies that follow (window partitions)
    then move half the bytes under bf16 autocast."""
    return tensor.to(autocast_dtype(tensor))


def contiguous_map(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) backbone ``features``, contiguous: channels-last in ``cpu_bf16_inference`` (where the backbones
    compute them so, hence no copy, and where the pixel decoders' convolutions and group norms run several times
    faster), NCHW otherwise."""
    memory_format = torch.channels_last if cpu_bf16_inference(features) else torch.contiguous_format
    return features.contiguous(memory_format=memory_format)


def channels_last_in_bf16(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) ``features`` laid out channels-last in ``cpu_bf16_inference``; unchanged otherwise."""
    return features.contiguous(memory_format=torch.channels_last) if cpu_bf16_inference(features) else features
