"""Vocab-parallel negative log-likelihood of target tokens, and its per-row sums.

Logits stay in their tensor-parallel vocabulary shard: each rank computes its shard's max,
sum of exponentials and (when it owns the target id) the target logit, and three small
all-reduces over the TP group combine them. This is the forward half of megatron-core's
``vocab_parallel_cross_entropy`` without what only the backward needs (the normalised softmax,
in-place updates of the logits): one read of the logits for the max, one for the exponentials.
Padded vocabulary columns (ids >= ``vocab_size``) are excluded by slicing them off, which gives
them exactly zero probability (what ``mask_padded_vocab`` does with -inf, without the copy).
The result equals megatron's function and a float64 reference (tests/miniplm).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _tp_group_and_rank() -> tuple[object | None, int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    return group, parallel_state.get_tensor_model_parallel_rank(), tp


def vocab_parallel_nll(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token NLL ``-log softmax(logits)[target]`` in fp32.

    ``logits``: [n, V/tp] this rank's shard (any float dtype; upcast to fp32 here).
    ``targets``: [n] global token ids (< ``vocab_size``). Returns [n] fp32, identical on all TP
    ranks. Collective over the TP group: every TP rank must call it with the same ``n``.
    """
    group, tp_rank, tp = _tp_group_and_rank()
    shard = logits.shape[-1]
    start = tp_rank * shard
    valid = max(0, min(shard, vocab_size - start))  # real (unpadded) columns in this shard
    x = logits[:, :valid].float()
    n = x.shape[0]
    if valid > 0:
        local_max = x.max(dim=-1).values
    else:
        local_max = torch.full((n,), float("-inf"), device=x.device)
    if group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    gmax = local_max
    sum_exp = torch.exp(x - gmax[:, None]).sum(dim=-1) if valid > 0 else torch.zeros(n, device=x.device)
    local_t = targets - start
    owned = (local_t >= 0) & (local_t < valid)
    picked = torch.zeros(n, dtype=torch.float32, device=x.device)
    if valid > 0:
        idx = local_t.clamp(0, valid - 1)[:, None]
        picked = torch.where(owned, x.gather(-1, idx).squeeze(-1) - gmax, picked)
    if group is not None:
        both = torch.stack([sum_exp, picked])
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        sum_exp, picked = both[0], both[1]
    return torch.log(sum_exp) - picked


def row_nll_sums(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, vocab_size: int,
                 chunk_tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-token NLL and number of predicted tokens for every row of a batch.

    ``logits``: [b, s, V/tp] (this TP rank's shard); ``labels``: [b, s] target ids; ``mask``:
    [b, s] bool, True where position s predicts a real token (padding is False). Only masked-in
    positions are computed (padding-free), ``chunk_tokens`` at a time so the fp32 copy of the
    logits stays small. Returns ``(sums float64 [b], counts int64 [b])``.
    """
    b, s, v = logits.shape
    flat = logits.reshape(b * s, v)
    flat_labels = labels.reshape(-1)
    positions = mask.reshape(-1).nonzero().squeeze(-1)
    sums = torch.zeros(b, dtype=torch.float64, device=logits.device)
    all_valid = positions.numel() == b * s
    for lo in range(0, positions.numel(), chunk_tokens):
        if all_valid:  # a view, no gather copy
            hi = min(lo + chunk_tokens, b * s)
            pos = positions[lo:hi]
            nll = vocab_parallel_nll(flat[lo:hi], flat_labels[lo:hi], vocab_size)
        else:
            pos = positions[lo:lo + chunk_tokens]
            nll = vocab_parallel_nll(flat.index_select(0, pos), flat_labels.index_select(0, pos), vocab_size)
        sums.index_add_(0, torch.div(pos, s, rounding_mode="floor"), nll.double())
    counts = mask.sum(dim=1).to(torch.int64)
    return sums, counts
