"""Top-p then top-k truncation of vocab-parallel teacher logits, without gathering the vocabulary.

Definition (every TP layout gives the same ids): ``lp = log_softmax(logits)`` over the real
vocabulary (padded columns masked) at temperature 1; entries sorted by decreasing ``lp`` (ties:
smaller id first); keep the shortest prefix whose probability mass reaches ``top_p`` (an entry is
kept when the mass *before* it is ``< top_p``, computed in float64), then at most ``top_k`` of
them; always at least one.

Vocab-parallel: each TP rank reduces its shard to a max and a sum of exponentials (one all-reduce
each gives the global log-sum-exp) and to its local top-``k`` candidates; only ``tp * k``
candidates per token are all-gathered, and every rank selects the same global top-``k``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_group_and_size():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None, 1
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_world_size()


def _gather_last(x: torch.Tensor, group, size: int) -> torch.Tensor:
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def select_top_p_top_k(logits: torch.Tensor, vocab_size: int, top_p: float, top_k: int,
                       chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated teacher distribution of each token (definition in the module docstring).

    Args:
        logits: [T, V_local] this TP rank's vocabulary shard (any float dtype; computed in fp32).
        vocab_size: the real vocabulary size (columns at or beyond it are padding).
        top_p: nucleus mass in (0, 1].
        top_k: cap on kept entries (>= 1).
        chunk_tokens: tokens per chunk (bounds the fp32 working copy; default ~256 MiB).

    Returns:
        ``ids`` int64 [T, k], ``logprobs`` float32 [T, k] (sorted by decreasing log-prob, normalised
        over the full vocabulary) and ``counts`` int64 [T] (entries ``[:counts]`` are kept), with
        ``k = min(top_k, vocab_size)``. Identical on every TP rank.
    """
    group, tp = _tp_group_and_size()
    T, v_local = logits.shape
    start = (dist.get_rank(group) if tp > 1 else 0) * v_local
    k = min(top_k, vocab_size)
    k_local = min(k, v_local)
    chunk = chunk_tokens or max(1, (1 << 26) // max(v_local, 1))
    out_ids, out_lp, out_n = [], [], []
    for c0 in range(0, T, chunk):
        x = logits[c0:c0 + chunk].float()
        if start + v_local > vocab_size:  # padded vocabulary columns get probability 0
            x = x.masked_fill(torch.arange(start, start + v_local, device=x.device) >= vocab_size, float("-inf"))
        # Global log-sum-exp from the per-rank ones: two all-reduces of [T] values.
        lse = torch.logsumexp(x, dim=-1)
        if tp > 1:
            m = lse.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            s = torch.exp(lse - m)
            dist.all_reduce(s, group=group)
            lse = m + torch.log(s)
        lse = lse.double()
        vals, idx = torch.topk(x, k_local, dim=-1)
        vals = _gather_last(vals, group, tp)
        gids = _gather_last(idx + start, group, tp)
        # Deterministic order: by id, then (stable) by decreasing value -> ties keep the smaller id.
        gids, perm = torch.sort(gids, dim=-1)
        vals = vals.gather(-1, perm)
        vals, perm = torch.sort(vals, dim=-1, descending=True, stable=True)
        gids = gids.gather(-1, perm)[:, :k]
        lp = vals[:, :k].double() - lse.unsqueeze(-1)
        p = torch.exp(lp)
        before = torch.cumsum(p, dim=-1) - p
        n = ((before < top_p) & torch.isfinite(lp)).sum(dim=-1).clamp_(1, k)
        out_ids.append(gids)
        out_lp.append(lp.float())
        out_n.append(n)
    if not out_ids:
        return (torch.zeros(0, k, dtype=torch.long, device=logits.device),
                torch.zeros(0, k, dtype=torch.float32, device=logits.device),
                torch.zeros(0, dtype=torch.long, device=logits.device))
    return torch.cat(out_ids), torch.cat(out_lp), torch.cat(out_n)


@torch.no_grad()
def flatten_selection(ids: torch.Tensor, logprobs: torch.Tensor, counts: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept entries as flat lists grouped by token with increasing ids (the codec's input).

    ``ids``/``logprobs`` [T, k] and ``counts`` [T] as returned by :func:`select_top_p_top_k`;
    returns ``(ids [E], logprobs [E])`` with ``E = counts.sum()``.
    """
    valid = torch.arange(ids.shape[-1], device=ids.device).unsqueeze(0) < counts.unsqueeze(-1)
    key, perm = torch.sort(torch.where(valid, ids, torch.iinfo(torch.long).max), dim=-1)
    # Sorting pushed the unused entries to the end of each row, so ``valid`` still marks the kept ones.
    return key.masked_select(valid), logprobs.gather(-1, perm).masked_select(valid)
