"""Which process this is under ``torchrun``, and merging per-rank results: shared by evaluation, training and the
command line."""
import os
from typing import Any, List, Sequence, Tuple

import torch
import torch.distributed as distributed


def rank_and_world_size() -> Tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank(), distributed.get_world_size()
    return 0, 1


def gather_objects(value: Any) -> List[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a process group."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return [value]
    gathered: List[Any] = [None] * world_size
    distributed.all_gather_object(gathered, value)
    return gathered


def merge_metrics(metrics: Sequence[Any]) -> List[Any]:
    """Each rank's metric objects (ModelScope's ``merge`` protocol) merged, in order, into rank 0's copies; every
    rank gets the same merged list."""
    gathered = gather_objects(list(metrics))
    merged = gathered[0]
    for other in gathered[1:]:
        for metric, other_metric in zip(merged, other):
            metric.merge(other_metric)
    return merged


def join_torchrun_group() -> Tuple[int, int]:
    """(rank, world size) when started by ``torchrun`` with several processes, after joining its process group
    (gloo: only small integers cross it); (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not distributed.is_initialized():
        distributed.init_process_group("gloo")
    return rank_and_world_size()


def sum_over_ranks(values: Sequence[int]) -> List[int]:
    """Element-wise sums of every rank's ``values``; ``values`` itself without a process group."""
    if rank_and_world_size()[1] == 1:
        return list(values)
    totals = torch.tensor(list(values), dtype=torch.long)
    distributed.all_reduce(totals)
    return totals.tolist()
