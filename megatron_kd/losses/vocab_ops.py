"""Chunk-level vocab-parallel primitives shared by the fused (one-pass) losses.

Every function works on one chunk of token rows of this TP rank's vocabulary shard,
``[n, V_local]``, and reduces per-token quantities over the TP group (``TPContext``) with at most
one collective each, so the fused kernels can batch their reductions: the row max is one
``max`` all-reduce, and the exp-sums, the label logit and any dot products go together in one
``sum`` all-reduce (see :func:`megatron_kd.losses.fused.kd_lm_chunk`).

Ids are global vocabulary ids; rank ``r`` owns ``[r * V_local, (r + 1) * V_local)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_kd.losses.vocab_parallel import TPContext, all_reduce_


def global_row_max(*chunks: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """[len(chunks), n] row maxima over the whole (TP-sharded) vocabulary, in one all-reduce.

    Rows whose maximum is -inf (every column absent) get 0, so shifting by it stays finite.
    """
    mx = torch.stack([c.amax(-1) for c in chunks])
    all_reduce_(mx, tp, "max")
    return torch.where(torch.isfinite(mx), mx, torch.zeros((), dtype=mx.dtype, device=mx.device))


def owned_ids(ids: torch.Tensor, local_vocab: int, tp: TPContext, offset: int | None = None):
    """``(local_index, owned)`` of global ``ids`` on this shard: owned = the id lives here.

    ``local_index`` is clamped to 0 where not owned (safe for gather/scatter; mask with ``owned``).
    ``offset``: first global id of the shard (default ``rank * local_vocab``; give it when only
    the first ``local_vocab`` columns of a wider shard are present).
    """
    local = ids - (tp.vocab_offset(local_vocab) if offset is None else offset)
    owned = (ids >= 0) & (local >= 0) & (local < local_vocab)
    return torch.where(owned, local, torch.zeros((), dtype=local.dtype, device=local.device)), owned


def gather_owned(x: torch.Tensor, local_index: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """``x[row, id]`` where this shard owns ``id``, else 0 (summing over TP gives the value).

    ``local_index`` / ``owned``: [n] or [n, k] from :func:`owned_ids`.
    """
    squeeze = local_index.dim() == 1
    idx = local_index.unsqueeze(-1) if squeeze else local_index
    out = x.gather(-1, idx)
    out = out.squeeze(-1) if squeeze else out
    return torch.where(owned, out, torch.zeros((), dtype=out.dtype, device=out.device))


def sub_onehot_(grad: torch.Tensor, local_index: torch.Tensor, owned: torch.Tensor,
                weight: float | torch.Tensor) -> torch.Tensor:
    """``grad[row, label] -= weight`` on the rows whose label this shard owns (in place)."""
    val = torch.where(owned, -torch.as_tensor(weight, dtype=grad.dtype, device=grad.device),
                      torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad.scatter_add_(-1, local_index.unsqueeze(-1), val.unsqueeze(-1).expand(-1, 1).contiguous())


def log_sum_exp(shifted_exp_sum: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """``row_max + log(sum exp(x - row_max))`` from an already all-reduced exp-sum."""
    return row_max + shifted_exp_sum.log()


def lm_from_lse(lse: torch.Tensor, label_logit: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy ``lse - logit[label]`` per token (0 where ``valid`` is False)."""
    lm = lse - label_logit
    if valid is not None:
        lm = torch.where(valid, lm, torch.zeros((), dtype=lm.dtype, device=lm.device))
    return lm
