"""A linear layer followed by GELU, fused into one oneDNN matrix product where autocast runs it in bfloat16 on a CPU.

torch has no public fused linear + activation for CPU; ``torch.ops.mkldnn._linear_pointwise`` is the oneDNN matrix
product with an activation applied to its float32 sums before the result is rounded, which torch's own compiler
(inductor) emits for this pattern. Under bfloat16 autocast the GELU then costs no pass over a (tokens, 4 x width)
bfloat16 tensor: on a 2-core AMX CPU a ViT-L / Swin-L MLP's first layer took 25-40 % less time (benchmarks/README.md),
and the result is at least as close to float32 (one rounding instead of two). Anywhere else (float32, training,
GPUs, a torch build without the op) the layers run as written.
"""
import torch
from torch import nn

_FUSED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def fused_gelu_applies(tokens: torch.Tensor) -> bool:
    """Whether ``linear_gelu`` fuses for ``tokens``: inference under CPU bfloat16 autocast, with the oneDNN op."""
    return (_FUSED_LINEAR is not None and tokens.device.type == "cpu" and not torch.is_grad_enabled()
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def linear_gelu(tokens: torch.Tensor, linear: nn.Linear, activation: nn.Module) -> torch.Tensor:
    """``activation(linear(tokens))``: (..., in_features) -> (..., out_features); one fused oneDNN product when
    ``fused_gelu_applies`` and ``activation`` is an ``nn.GELU`` (exact or tanh), the two modules otherwise."""
    if not (isinstance(activation, nn.GELU) and fused_gelu_applies(tokens)):
        return activation(linear(tokens))
    dtype = torch.bfloat16  # the operands autocast would give F.linear
    bias = None if linear.bias is None else linear.bias.to(dtype)
    return _FUSED_LINEAR(tokens.to(dtype), linear.weight.to(dtype), bias, "gelu", [], activation.approximate)
