"""Inference precision: float32 by default, opt-in bfloat16 / float16 autocast.

Under autocast the matrix products and convolutions run in the lower precision, deformable attention's sampling
positions and attention weights stay in float32 (under float16 the whole layer does, ``MultiScaleDeformableAttention``
turning autocast off for itself) and post-processing gets float32 logits; ``benchmarks/bf16_audit.py`` lists what
runs in which dtype. bfloat16 works on GPUs and on CPUs, but is fast only where the CPU has native bfloat16 units
(AVX-512 BF16 / AMX; a warning says so otherwise); float16 only on CUDA. "auto" is bfloat16 where the device has native
bfloat16 units (``native_bf16``), else float32; ``resolve_precision`` turns it into one of those once, when the
``Predictor`` is built.
"""
import contextlib
import functools
import logging
from typing import ContextManager

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_CHOICES = ("fp32", "bf16", "fp16", "auto")
"""What ``precision`` arguments and ``--precision`` options accept: a precision of ``PRECISIONS``, or "auto"."""
APP_PRECISION = "fp32"
"""The default of ``modelscope-seg segment / evaluate / serve``, ``make demo`` and ``app.py`` (README, "Speed and
precision", says why)."""


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 convolutions and matrix products natively on this CPU (AVX-512 BF16 / AMX);
    without it they fall back to reference loops, several times slower than float32. On x86 torch's own check
    (``_is_mkldnn_bf16_supported``) also says yes for any AVX-512 CPU, where oneDNN converts bfloat16 to float32 and
    is no faster than float32, so the bfloat16 instructions themselves are asked for too (``x86_bf16_units``)."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    units = x86_bf16_units()
    return True if units is None else units


def x86_bf16_units():
    """Whether this x86 CPU has bfloat16 dot-product instructions (AVX-512 BF16 or AMX-BF16); None on another
    architecture, or where torch cannot tell (``torch.cpu.get_capabilities``, torch 2.3+)."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return None
    capabilities = get_capabilities()
    if capabilities.get("architecture") not in ("x86_64", "x86"):
        return None
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively: a CPU with AVX-512 BF16 / AMX
    (``cpu_has_native_bf16``), a CUDA GPU of compute capability 8.0 or newer (not counting emulation)."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` checked for ``device``, with "auto" resolved: "bf16" where ``native_bf16(device)``, else
    "fp32" (logged once per device and outcome)."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp32"
        _log_auto(str(device), precision)
    check_precision(precision, device)
    return precision


@functools.lru_cache(maxsize=None)
def _log_auto(device: str, precision: str) -> None:
    logger.info("precision 'auto' on %s: %s (%s)", device, precision,
                "native bfloat16 units" if precision == "bf16" else "no native bfloat16 units")


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
