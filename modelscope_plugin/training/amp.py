"""Mixed precision for the trainer on any device: ModelScope's ``TorchAMPOptimizerHook`` is CUDA-only.

The stock hook wraps the model's forward in ``torch.cuda.amp.autocast`` and scales the loss with
``torch.cuda.amp.GradScaler``; on a CPU both disable themselves with a warning, so ``use_fp16=True`` silently
trains in float32. ``SegmentationAMPOptimizerHook`` takes its place (the trainer maps the stock name onto it):
autocast on the trainer's device, bfloat16 on CPUs (the only half type CPU autocast runs) and float16 on CUDA
unless ``dtype="bf16"``, a gradient scaler only for float16 (bfloat16 has float32's exponent range). The
network's outputs are cast back to float32 before the losses. Deformable attention keeps float32 inside (see
``modeling/layers/ms_deform_attn.py``).
"""
import dataclasses
from typing import Any, Optional

import torch
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.optimizer.base import OptimizerHook, OptimizerProcessor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_float32(value: Any) -> Any:
    """Half-precision tensors inside dataclasses, lists, tuples and dicts -> float32; everything else unchanged."""
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{field.name: to_float32(getattr(value, field.name))
                                             for field in dataclasses.fields(value) if field.init})
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(item) for item in value)
    if isinstance(value, dict):
        return {key: to_float32(item) for key, item in value.items()}
    return value


class AutocastOptimizerProcessor(OptimizerProcessor):
    """Forward under autocast (outputs back to float32), backward through an optional gradient scaler."""

    def __init__(self, dtype: torch.dtype, scaler: Optional[torch.amp.GradScaler]):
        self.dtype = dtype
        self.scaler = scaler

    def initialize_optimizer(self, trainer):
        trainer.optimizer.zero_grad()
        self.model = trainer.unwrap_module(trainer.model)
        self.original_forward = self.model.forward

    def before_forward(self, trainer):
        device_type, dtype, forward = trainer.device.type, self.dtype, self.original_forward

        def autocast_forward(*arguments, **keywords):
            with torch.autocast(device_type=device_type, dtype=dtype):
                output = forward(*arguments, **keywords)
            return to_float32(output)

        self.model.forward = autocast_forward

    def backward(self, trainer, loss_keys, cumulative_iters, grad_clip):
        self.model.forward = self.original_forward
        if self.scaler is None:
            return super().backward(trainer, loss_keys, cumulative_iters, grad_clip)
        for key in loss_keys:
            trainer.train_outputs[key] /= cumulative_iters
            self.scaler.scale(trainer.train_outputs[key]).backward()
        if Hook.every_n_iters(trainer, cumulative_iters):
            self.scaler.unscale_(trainer.optimizer)
            if grad_clip is not None:
                self.clip_grads(trainer.model.parameters(), **grad_clip)
            self.scaler.step(trainer.optimizer)
            self.scaler.update()
            trainer.optimizer.zero_grad()


@HOOKS.register_module(module_name="SegmentationAMPOptimizerHook", force=True)
class SegmentationAMPOptimizerHook(Hook):
    """``TorchAMPOptimizerHook`` for CPU and CUDA. ``dtype``: "bf16" or "fp16" (default: fp16 on CUDA, bf16 on
    CPU); ``loss_scale``: GradScaler arguments (a dict) or a fixed initial scale (a float), fp16 only."""

    PRIORITY = OptimizerHook.PRIORITY

    def __init__(self, dtype: Optional[str] = None, loss_scale: Any = None, **unused):
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"SegmentationAMPOptimizerHook dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype_name = dtype
        self.loss_scale = {} if loss_scale is None else loss_scale

    def register_processor(self, trainer):
        device_type = trainer.device.type
        name = self.dtype_name or ("fp16" if device_type == "cuda" else "bf16")
        if name == "fp16" and device_type != "cuda":
            raise ValueError(f"float16 training needs a CUDA device (the trainer runs on {trainer.device}); "
                             "use dtype='bf16'")
        scaler = None
        if name == "fp16":
            arguments = self.loss_scale if isinstance(self.loss_scale, dict) else {"init_scale": float(self.loss_scale)}
            scaler = torch.amp.GradScaler("cuda", **arguments)
        for optimizer_hook in trainer.get_hook(OptimizerHook):
            if type(optimizer_hook.processor) in (type(None), OptimizerProcessor):
                optimizer_hook.set_processor(AutocastOptimizerProcessor(DTYPES[name], scaler))
