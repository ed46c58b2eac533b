"""Inference precision: float32 by default, opt-in bfloat16 / float16 autocast.

Under autocast the matrix products and convolutions run in the lower precision while deformable attention stays
in float32 (``MultiScaleDeformableAttention`` turns autocast off for itself) and post-processing gets float32
logits. bfloat16 works on CPUs and GPUs; float16 only on CUDA.
"""
import contextlib
from typing import ContextManager

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device (got {device}); use 'bf16' on CPU")


def inference_context(device: torch.device, precision: str = "fp32") -> ContextManager:
    """``torch.inference_mode`` plus autocast to ``precision`` on ``device``."""
    check_precision(precision, device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if PRECISIONS[precision] is not None:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=PRECISIONS[precision]))
    return stack
