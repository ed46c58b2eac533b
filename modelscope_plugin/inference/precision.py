"""Inference precision: float32 by default, opt-in bfloat16 / float16 autocast.

Under autocast the matrix products and convolutions run in the lower precision, deformable attention's sampling
positions and attention weights stay in float32 (under float16 the whole layer does, ``MultiScaleDeformableAttention``
turning autocast off for itself) and post-processing gets float32 logits; ``benchmarks/bf16_audit.py`` lists what
runs in which dtype. bfloat16 works on GPUs and on CPUs, but is fast only where the CPU has native bfloat16 units
(AVX-512 BF16 / AMX; a warning says so otherwise); float16 only on CUDA.
"""
import contextlib
import functools
import logging
from typing import ContextManager

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions and matrix products natively on this CPU (AVX-512 BF16 / AMX);
    without it they fall back to reference loops, several times slower than float32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (got {device}); use 'bf16' on CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_slow_bf16()


@functools.lru_cache(maxsize=None)
def _warn_slow_bf16() -> None:
    logger.warning("precision 'bf16' on a CPU without native bfloat16 units (AVX-512 BF16 / AMX; torch reports %s): "
                   "convolutions and matrix products fall back to slow loops, several times slower than 'fp32'",
                   torch.backends.cpu.get_cpu_capability())


def inference_context(device: torch.device, precision: str = "fp32") -> ContextManager:
    """``torch.inference_mode`` plus autocast to ``precision`` on ``device``."""
    check_precision(precision, device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if PRECISIONS[precision] is not None:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=PRECISIONS[precision]))
    return stack
