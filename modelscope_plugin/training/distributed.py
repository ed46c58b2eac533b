"""Data-parallel training under ``torchrun`` on CPU (gloo) and GPU (NCCL).

ModelScope's ``init_dist('pytorch')`` calls ``torch.cuda.set_device`` and its ``DDPHook`` moves the model to
``cuda:{local_rank}`` and wraps it with ``device_ids=[torch.cuda.current_device()]``, so CPU training under
torchrun fails. ``SegmentationDDPHook`` picks the backend from the hardware (overridable with ``backend``).
"""
import os
from typing import Optional

import torch
import torch.distributed as distributed
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.priority import Priority
from modelscope.utils.constant import DistributedParallelType
from torch.nn.parallel import DistributedDataParallel


def init_process_group(backend: Optional[str] = None) -> torch.device:
    """Joins the torchrun group (env:// rendezvous) once; returns this rank's device."""
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if variable not in os.environ:
            raise RuntimeError(f"launcher='pytorch' needs torchrun's environment; {variable} is not set "
                               "(run with `torchrun --nproc_per_node=N ...`)")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not distributed.is_initialized():
        distributed.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")


def wrap_data_parallel(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    if isinstance(model, DistributedDataParallel):
        return model
    model.to(device)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


@HOOKS.register_module(module_name="SegmentationDDPHook", force=True)
class SegmentationDDPHook(Hook):
    """Replaces ModelScope's ``DDPHook``: ``launcher='pytorch'`` on CPU or GPU."""

    PRIORITY = Priority.LOW

    def __init__(self, launcher: str = "pytorch", backend: Optional[str] = None):
        if launcher != "pytorch":
            raise ValueError(f"launcher {launcher!r} is not supported; use launcher='pytorch' under torchrun")
        self.backend = backend
        self.wrapped = False

    def after_init(self, trainer):
        trainer.device = init_process_group(self.backend)
        trainer.model.to(trainer.device)
        trainer.parallel_groups[DistributedParallelType.DP] = None

    def before_run(self, trainer):
        if not self.wrapped and distributed.get_world_size() > 1:
            trainer.model = wrap_data_parallel(trainer.model, trainer.device)
            self.wrapped = True
