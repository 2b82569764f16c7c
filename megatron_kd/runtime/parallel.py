"""Parallel primitives, written once: which TP / DP / PP group a process is in, reducers over them,
and ``unwrap`` of a model wrapped by DDP / Float16Module / the distillation wrapper.

Every function here works without megatron's ``parallel_state`` being initialised (one process,
unit tests, notebooks): the group is then :data:`SINGLE` (``group=None``, rank 0, size 1) and every
collective is a no-op. ``megatron.core.parallel_state`` is not imported when nothing imported it yet
(it cannot be initialised then), so calling these from a loss on one process costs nothing.

    from megatron_kd.runtime.parallel import tp_group, dp_group, all_reduce_, dp_sum, dp_mean, unwrap
    tp = tp_group()                       # ParallelGroup(group, rank, world_size)
    start = tp.shard_offset(logits.shape[-1])   # first vocabulary id of this TP rank's shard
    all_reduce_(row_max, tp, op="max")    # in place; no-op when tp.world_size == 1
    loss_sum = dp_sum(torch.tensor([s, n], dtype=torch.float64))   # summed over data-parallel ranks
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

ReduceOp = Literal["sum", "max", "min", "avg"]
"""Reduction of :func:`all_reduce_` (``avg`` = sum divided by the group size)."""

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "avg": dist.ReduceOp.SUM}


@dataclass(frozen=True)
class ParallelGroup:
    """A process group and this process's place in it (``group=None``: one process, no collectives)."""

    group: Optional[dist.ProcessGroup]
    """The torch.distributed group; None when the size is 1 (collectives are skipped)."""
    rank: int
    """This process's rank within the group."""
    world_size: int
    """Number of processes in the group."""

    def shard_offset(self, local_size: int) -> int:
        """First global index held by this rank when a dimension is split contiguously into equal
        ``local_size`` shards (megatron's vocabulary split over TP)."""
        return self.rank * local_size

    # The loss layer's historical name for the same thing.
    vocab_offset = shard_offset


SINGLE = ParallelGroup(None, 0, 1)
"""The group of a single process."""


def _parallel_state():
    """megatron's parallel_state if it is imported and initialised, else None (never imports it)."""
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is None or not ps.model_parallel_is_initialized():
        return None
    return ps


def group_of(group: Optional[dist.ProcessGroup]) -> ParallelGroup:
    """The :class:`ParallelGroup` of an explicit torch.distributed group (None or size 1 -> SINGLE)."""
    if group is None or not dist.is_initialized():
        return SINGLE
    size = dist.get_world_size(group)
    if size <= 1:
        return SINGLE
    return ParallelGroup(group, dist.get_rank(group), size)


def tp_group(group: Optional[dist.ProcessGroup] = None) -> ParallelGroup:
    """The tensor-parallel group: ``group`` when given, else megatron's TP group when initialised."""
    if group is not None:
        return group_of(group)
    ps = _parallel_state()
    if ps is None or ps.get_tensor_model_parallel_world_size() <= 1:
        return SINGLE
    return ParallelGroup(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                         ps.get_tensor_model_parallel_world_size())


def dp_group() -> ParallelGroup:
    """megatron's data-parallel group (SINGLE when parallel_state is not initialised or DP = 1)."""
    ps = _parallel_state()
    if ps is None or ps.get_data_parallel_world_size() <= 1:
        return SINGLE
    return ParallelGroup(ps.get_data_parallel_group(), ps.get_data_parallel_rank(),
                         ps.get_data_parallel_world_size())


def pp_group() -> ParallelGroup:
    """megatron's pipeline-parallel group (SINGLE when parallel_state is not initialised or PP = 1)."""
    ps = _parallel_state()
    if ps is None or ps.get_pipeline_model_parallel_world_size() <= 1:
        return SINGLE
    return ParallelGroup(ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_rank(),
                         ps.get_pipeline_model_parallel_world_size())


def is_pipeline_first_stage() -> bool:
    """True on the first pipeline stage (and without pipeline parallelism)."""
    ps = _parallel_state()
    return True if ps is None else ps.is_pipeline_first_stage()


def is_pipeline_last_stage() -> bool:
    """True on the last pipeline stage (and without pipeline parallelism)."""
    ps = _parallel_state()
    return True if ps is None else ps.is_pipeline_last_stage()


def _comm_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where a tensor must live for a collective on ``group`` (NCCL: this GPU; gloo: the CPU)."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, group: ParallelGroup, op: ReduceOp = "sum") -> torch.Tensor:
    """All-reduce ``tensor`` in place over ``group`` and return it; a no-op for a single process.

    A tensor on the wrong device for the backend (a CPU tensor under NCCL) is reduced through a
    copy on the right one and written back, so callers need not care where the group computes.
    """
    if group.group is None:
        return tensor
    if op not in _OPS:
        raise ValueError(f"all_reduce_ op={op!r}: use one of {sorted(_OPS)}")
    dev = _comm_device(group.group)
    work = tensor if tensor.device == dev else tensor.to(dev)
    dist.all_reduce(work, op=_OPS[op], group=group.group)
    if op == "avg":
        work.div_(group.world_size)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def dp_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the data-parallel group, in place (returned). Use float64 for counts
    and loss sums that must not depend on the DP size."""
    return all_reduce_(values, dp_group(), "sum")


def dp_mean(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the data-parallel group, in place (returned)."""
    return all_reduce_(values, dp_group(), "avg")


def dp_all_gather_object(obj: Any) -> list[Any]:
    """Every data-parallel rank's ``obj``, in DP rank order (``[obj]`` for one process)."""
    group = dp_group()
    if group.group is None:
        return [obj]
    parts: list[Any] = [None] * group.world_size
    dist.all_gather_object(parts, obj, group=group.group)
    return parts


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module under any chain of ``.module`` wrappers (megatron DDP, Float16Module,
    the distillation wrapper whose ``.module`` is the student): a GPTModel stage."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
