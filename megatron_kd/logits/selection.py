"""What precompute keeps per position: the target-selection methods of the logits store.

* ``topk``: top-p then top-k truncation (:func:`~megatron_kd.logits.truncation.select_top_p_top_k`);
  entries are (id, log-prob).
* ``sample``: ``N`` i.i.d. draws from the proposal ``r ∝ p^(1/tau)`` (``tau = 1``: the teacher);
  entries are the distinct drawn ids with their draw counts ``c_i`` (and, when ``tau != 1``, their
  log-probs). Target weights ``w_i ∝ c_i p_i / r_i``, normalised (``tau = 1``: ``c_i / N``).
* ``topk+sample``: the exact top-p/top-k head (``c = 0``, log-prob) plus ``N`` draws from the
  teacher restricted to the rest of the vocabulary (the tail), with their counts and log-probs.
  Weights: head ``p_i``; tail ``R * c_i / N`` with ``R = 1 - sum_head p`` (``tau != 1``: the
  self-normalised ``R * c_i p_i/r_i / sum_j c_j p_j/r_j``).

:meth:`TargetSelector.__call__` works on one chunk of teacher logits ``[n, V/tp]`` (this TP
rank's vocabulary shard) with the store positions of its rows, and is collective over the TP
group; the result is identical on every TP rank and depends only on (seed, position, logits).
:func:`target_weights` turns stored entries into the normalised weights the loss learns from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_kd.logits import codec
from megatron_kd.logits.sampling import DEFAULT_BLOCK, audit_mask, draw_tokens
from megatron_kd.logits.truncation import flatten_selection, select_top_p_top_k

METHODS = ("topk", "sample", "topk+sample")
"""Target-selection methods (``--method``)."""
TARGET_KINDS = {"topk": "logprobs", "sample": "weights", "topk+sample": "weights"}
"""What a store's targets are for the loss: log-probs (re-temperable) or weights (sum to 1)."""
DRAWS_ENCODING = "bitpack-draws-v1"


@dataclass
class Selection:
    """Selected entries of ``n`` positions, flat and grouped by position with increasing ids."""

    counts: np.ndarray
    """int64 [n] entries per position."""
    ids: np.ndarray
    """int64 [E] vocabulary ids."""
    logprobs: Optional[np.ndarray]
    """float [E] teacher log-probs (T = 1, full vocabulary), or None when not stored."""
    draws: Optional[np.ndarray]
    """int64 [E] draw counts (sampled methods), or None."""
    audit_positions: np.ndarray
    """int64 [m] store positions of this chunk kept in the audit sample."""
    audit_logprobs: np.ndarray
    """float32 [m, vocab_size] their dense teacher log-probs."""

    @staticmethod
    def concat(parts: list["Selection"]) -> "Selection":
        """One selection of the positions of ``parts`` in order."""
        def cat(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else np.concatenate(vals)
        return Selection(cat("counts"), cat("ids"), cat("logprobs"), cat("draws"), cat("audit_positions"),
                         cat("audit_logprobs"))


def store_layout(settings: dict) -> codec.Layout:
    """The codec layout of a store from its manifest settings."""
    method = settings.get("method", "topk")
    if method == "topk":
        return codec.Layout(settings["id_bits"], settings["value_step"])
    return codec.Layout(settings["id_bits"], settings["value_step"], values=bool(settings["store_logprobs"]),
                        num_draws=int(settings["num_samples"]), draw_offset=1 if method == "sample" else 0)


def max_entries(method: str, top_k: int, num_samples: int, vocab_size: int) -> int:
    """Largest number of entries one position can keep."""
    if method == "topk":
        return min(top_k, vocab_size)
    if method == "sample":
        return min(num_samples, vocab_size)
    return min(top_k, vocab_size) + min(num_samples, max(vocab_size - top_k, 0))


def _tp():
    from megatron_kd.losses.vocab_parallel import resolve_tp

    return resolve_tp(None)


def _global_lse(x: torch.Tensor, tp) -> torch.Tensor:
    lse = torch.logsumexp(x, dim=-1)
    if tp.group is not None:
        m = lse.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp.group)
        s = torch.exp(lse - torch.where(torch.isfinite(m), m, 0.0))
        dist.all_reduce(s, group=tp.group)
        lse = torch.where(torch.isfinite(m), m, 0.0) + torch.log(s)
    return lse


def _values_at(x: torch.Tensor, ids: torch.Tensor, tp, start: int) -> torch.Tensor:
    """x at global ids [n, m] (-1 -> -inf), summed over the ranks that own them."""
    local = ids - start
    owned = (ids >= 0) & (local >= 0) & (local < x.shape[-1])
    v = torch.where(owned, x.gather(-1, torch.where(owned, local, 0)), 0.0)
    if tp.group is not None:
        dist.all_reduce(v, group=tp.group)
    return torch.where(ids >= 0, v, float("-inf"))


@torch.no_grad()
def label_logprobs(logits: torch.Tensor, vocab_size: int, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's log-prob of ``labels`` [n] (global ids) under rows ``logits`` [n, V/tp]
    (this TP rank's vocabulary shard; padded columns excluded), float32 [n]; collective over TP."""
    tp = _tp()
    v_local = logits.shape[-1]
    start = tp.rank * v_local
    x = logits.float()
    if start + v_local > vocab_size:
        x = x.masked_fill(torch.arange(start, start + v_local, device=x.device) >= vocab_size, float("-inf"))
    return (_values_at(x, labels.unsqueeze(-1), tp, start).squeeze(-1) - _global_lse(x, tp)).float()


def _gather_vocab(x: torch.Tensor, tp) -> torch.Tensor:
    if tp.group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


def _runs(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of each row of ``sorted_ids`` [n, N] (-1 entries dropped):
    ``(row [U], id [U], count [U])`` grouped by row, ids increasing."""
    n, N = sorted_ids.shape
    valid = sorted_ids >= 0
    new = np.ones_like(valid)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    new &= valid
    flat_new = np.nonzero(new.reshape(-1))[0]
    # run length: next run start (or the end of the valid part of the row) minus this start
    row = flat_new // N
    end_of_row = row * N + valid.sum(1)[row]
    nxt = np.append(flat_new[1:], n * N)
    nxt = np.minimum(nxt, end_of_row)
    return row, sorted_ids.reshape(-1)[flat_new], nxt - flat_new


@dataclass
class TargetSelector:
    """Per-chunk target selection of one store (settings from :class:`PrecomputeConfig`)."""

    method: str = "topk"
    top_p: float = 0.95
    top_k: int = 100
    num_samples: int = 24
    proposal_temperature: float = 1.0
    seed: int = 1234
    audit_fraction: float = 0.0
    block: int = DEFAULT_BLOCK

    @property
    def store_logprobs(self) -> bool:
        """Whether entries carry log-probs (top-k, topk+sample, sample with tau != 1)."""
        return self.method != "sample" or self.proposal_temperature != 1.0

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, vocab_size: int, positions: torch.Tensor,
                 keep: bool = True) -> Optional[Selection]:
        """Select the entries of rows ``logits`` [n, V/tp] at store ``positions`` [n] (collective).

        ``keep=False`` runs the collectives only (ranks that do not write); returns None.
        """
        tp = _tp()
        n, v_local = logits.shape
        start = tp.rank * v_local
        x = logits.float()
        if start + v_local > vocab_size:
            x = x.masked_fill(torch.arange(start, start + v_local, device=x.device) >= vocab_size, float("-inf"))
        head_ids = head_lp = head_n = None
        if self.method in ("topk", "topk+sample"):
            head_ids, head_lp, head_n = select_top_p_top_k(x, vocab_size, self.top_p, self.top_k)
        draws_ids = draw_lp = None
        if self.method in ("sample", "topk+sample"):
            exclude = None
            if head_ids is not None:
                exclude = torch.where(torch.arange(head_ids.shape[1], device=x.device) < head_n.unsqueeze(1),
                                      head_ids, -1)
            draws_ids = draw_tokens(x, vocab_size, positions, self.num_samples, self.seed,
                                    self.proposal_temperature, exclude, self.block)
            if self.store_logprobs:
                draw_lp = _values_at(x, draws_ids, tp, start) - _global_lse(x, tp).unsqueeze(-1)
        audit = audit_mask(self.seed, positions, self.audit_fraction)
        audit_rows = torch.nonzero(audit).squeeze(-1)
        dense = None
        if len(audit_rows):
            xa = x.index_select(0, audit_rows)
            dense = _gather_vocab(xa - _global_lse(xa, tp).unsqueeze(-1), tp)[:, :vocab_size]
        if not keep:
            return None
        audit_pos = positions.index_select(0, audit_rows).cpu().numpy().astype(np.int64)
        audit_lp = (dense.cpu().numpy().astype(np.float32) if dense is not None
                    else np.zeros((0, vocab_size), np.float32))
        if self.method == "topk":
            fi, fl = flatten_selection(head_ids, head_lp, head_n)
            return Selection(head_n.cpu().numpy(), fi.cpu().numpy(), fl.cpu().numpy(), None, audit_pos, audit_lp)
        d = draws_ids.cpu().numpy()
        order = np.argsort(d, axis=1, kind="stable")
        d_sorted = np.take_along_axis(d, order, 1)
        row, ids, cnt = _runs(d_sorted)
        lp = None
        if draw_lp is not None:
            lp_sorted = np.take_along_axis(draw_lp.cpu().numpy(), order, 1)
            lp = lp_sorted.reshape(-1)[np.nonzero(((d_sorted >= 0) & np.concatenate(
                [np.ones((n, 1), bool), d_sorted[:, 1:] != d_sorted[:, :-1]], 1)).reshape(-1))[0]]
        if self.method == "sample":
            counts = np.bincount(row, minlength=n).astype(np.int64)
            return Selection(counts, ids, lp, cnt.astype(np.int64), audit_pos, audit_lp)
        # topk+sample: merge the exact head (draws 0) with the tail draws, ids increasing per row.
        hn = head_n.cpu().numpy()
        hid = head_ids.cpu().numpy()
        hlp = head_lp.cpu().numpy()
        hmask = np.arange(hid.shape[1])[None, :] < hn[:, None]
        h_row = np.nonzero(hmask)[0]
        all_row = np.concatenate([h_row, row])
        all_id = np.concatenate([hid[hmask], ids])
        order = np.lexsort((all_id, all_row))
        all_lp = np.concatenate([hlp[hmask].astype(np.float64), lp])
        all_dr = np.concatenate([np.zeros(len(h_row), np.int64), cnt.astype(np.int64)])
        counts = np.bincount(all_row, minlength=n).astype(np.int64)
        return Selection(counts, all_id[order], all_lp[order], all_dr[order], audit_pos, audit_lp)


def target_weights(method: str, logprobs: Optional[np.ndarray], draws: Optional[np.ndarray], tok: np.ndarray,
                   num_tokens: int, num_samples: int, proposal_temperature: float = 1.0) -> np.ndarray:
    """Normalised target weights [E] (sum 1 per token) of flat stored entries.

    ``tok`` [E]: the token of each entry; ``logprobs``/``draws`` as decoded. ``sample``:
    ``w ∝ c * p / r`` (``tau = 1``: ``c / N``). ``topk+sample``: head ``p_i`` as stored, tail
    ``R * (c p / r) / sum_tail (c p / r)`` with ``R = max(1 - sum_head p, 0)``.
    """
    E = len(tok)
    if E == 0:
        return np.zeros(0)
    tau = proposal_temperature
    c = draws.astype(np.float64)
    if method == "sample":
        raw = c if tau == 1.0 else c * np.exp(logprobs * (1.0 - 1.0 / tau) - _row_max(
            logprobs * (1.0 - 1.0 / tau), tok, num_tokens)[tok])
        return raw / np.bincount(tok, raw, minlength=num_tokens)[tok]
    if method != "topk+sample":
        raise ValueError(f"target weights exist for sampled stores only, not method={method!r}")
    head = c == 0
    p = np.exp(logprobs)
    head_mass = np.bincount(tok[head], p[head], minlength=num_tokens)
    rest = np.clip(1.0 - head_mass, 0.0, None)
    if tau == 1.0:
        raw = c
    else:
        a = np.where(head, -np.inf, logprobs * (1.0 - 1.0 / tau))
        raw = np.where(head, 0.0, c * np.exp(a - _row_max(a, tok, num_tokens)[tok]))
    tail_sum = np.bincount(tok, raw, minlength=num_tokens)
    tail_w = rest[tok] * raw / np.where(tail_sum > 0, tail_sum, 1.0)[tok]
    w = np.where(head, p, tail_w)
    # a token whose tail was empty: renormalise its head (no mass to put elsewhere)
    tot = np.bincount(tok, w, minlength=num_tokens)
    return w / np.where(tot > 0, tot, 1.0)[tok]


def _row_max(a: np.ndarray, tok: np.ndarray, num_tokens: int) -> np.ndarray:
    out = np.full(num_tokens, -np.inf)
    np.maximum.at(out, tok, a)
    return np.where(np.isfinite(out), out, 0.0)
