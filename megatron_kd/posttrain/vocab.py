"""Vocab-parallel reductions on TP-sharded logits ([..., V/tp] on each tensor-parallel rank).

Two kinds of differentiable reductions. A reduction whose result is the *final*, replicated
value of a loss uses megatron's ``reduce_from_tensor_model_parallel_region`` (forward all-reduce,
backward identity: every rank back-propagates the same replicated loss). A reduction whose result
feeds further *per-shard* computation (the normaliser inside a log-softmax) must sum the incoming
gradients over ranks in backward, because every shard's terms depend on it. Nothing here gathers
the vocabulary.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region


def tp_size() -> int:
    """Tensor-parallel world size (1 when parallel_state is not initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    """Tensor-parallel rank (0 when parallel_state is not initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_tensor_model_parallel_rank()


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """In-place-free MAX all-reduce over the TP group (no gradient)."""
    x = x.detach().clone()
    if tp_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_tp_group())
    return x


def all_reduce_sum(x: torch.Tensor, differentiable: bool = False, shared: bool = False) -> torch.Tensor:
    """SUM all-reduce over the TP group.

    ``differentiable``: backward is the identity (the result is a replicated final value);
    with ``shared`` too the backward all-reduces the gradients (the result feeds per-shard terms).
    """
    if tp_size() == 1:
        return x
    if differentiable:
        return reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(x) if shared else x)
    x = x.detach().clone()
    dist.all_reduce(x, group=_tp_group())
    return x


def shard_offset(local_vocab: int) -> int:
    """Global id of this rank's first vocabulary column."""
    return tp_rank() * local_vocab


def logsumexp(logits: torch.Tensor, differentiable: bool = False, shared: bool = False) -> torch.Tensor:
    """Global log-sum-exp over the sharded last dimension -> logits.shape[:-1] (float32+).

    ``shared``: the result is used by per-shard computation (see the module docstring)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    m = all_reduce_max(x.max(dim=-1).values)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m.unsqueeze(-1)).sum(dim=-1)
    s = all_reduce_sum(s, differentiable, shared)
    return m + torch.log(s)


def log_softmax(logits: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """This shard's columns of the global log-softmax (padded columns at -inf stay -inf)."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return x - logsumexp(x, differentiable, shared=True).unsqueeze(-1)


def gather_target(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``values[..., target]`` for global ids ``target`` (shape values.shape[:-1]); no gradient.

    Each rank contributes the entries it owns and a SUM all-reduce assembles them.
    """
    local = values.shape[-1]
    start = shard_offset(local)
    inside = (target >= start) & (target < start + local)
    idx = (target - start).clamp(0, local - 1)
    picked = torch.gather(values.detach(), -1, idx.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(inside, picked, torch.zeros_like(picked))
    return all_reduce_sum(picked)


def argmax(values: torch.Tensor) -> torch.Tensor:
    """Global argmax over the sharded last dimension (lowest id wins ties, like torch.argmax)."""
    local_max, local_idx = values.max(dim=-1)
    gmax = all_reduce_max(local_max)
    start = shard_offset(values.shape[-1])
    big = torch.iinfo(torch.long).max
    cand = torch.where(local_max == gmax, local_idx + start, torch.full_like(local_idx, big))
    if tp_size() > 1:
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=_tp_group())
    return cand
