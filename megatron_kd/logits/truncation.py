"""Top-p then top-k truncation of vocab-parallel teacher logits, without gathering the vocabulary.

Definition (every TP layout gives the same ids): ``lp = log_softmax(logits)`` over the real
vocabulary (padded columns masked) at temperature 1; entries sorted by decreasing ``lp`` (ties:
smaller id first); keep the shortest prefix whose probability mass reaches ``top_p`` (an entry is
kept when the mass *before* it is ``< top_p``, computed in float64; ``top_p >= 1`` keeps every
entry of finite log-prob), then at most ``top_k`` of them; always at least one.

Vocab-parallel: each TP rank reduces its shard to a max and a sum of exponentials (one all-reduce
each gives the global log-sum-exp) and to its local top-``k`` candidates; only ``tp * k``
candidates per token are all-gathered, and every rank selects the same global top-``k``.

On CPU at TP = 1 with fp32 logits, the C kernel of :mod:`megatron_kd.logits.native` does the whole
selection of a row in three cached passes when it is built (``MEGATRON_KD_NATIVE=0`` turns it off):
the same ids and counts; its own log-sum-exp (float64 sum) may differ from ``torch.logsumexp`` by a
float32 ulp, and so may the log-probs. Rows holding a NaN take the torch path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_kd.logits.native import flatten_native
from megatron_kd.logits.native import select_native


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


FIRST_K = 16
"""Candidates of the first selection stage (see :func:`select_top_p_top_k`)."""
_first_stage_hits = [1.0]  # running fraction of positions the first stage decided (same on all TP ranks)


def _block_size(v: int, k: int) -> int:
    """Columns per block of :func:`_topk`: the largest power of two ``B <= sqrt(v / k)`` dividing
    ``v`` (ranks about ``v / B + k * B`` entries); 1 (= plain ``torch.topk``) below 4."""
    b = 1
    while (2 * b) ** 2 * k <= v and v % (2 * b) == 0:
        b *= 2
    return b if b >= 4 else 1


def _block_maxima(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """The block maxima [R, V / B] :func:`_topk` ranks for ``k`` (None when it does not prune)."""
    rows, v = x.shape
    b = _block_size(v, k)
    if b == 1 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    return x.view(rows, b, v // b).amax(1)


def _topk(x: torch.Tensor, k: int, bm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``x`` [R, V]: values and column ids, in no order.

    The same entries as ``torch.topk`` (which of several entries equal to the k-th largest value
    are taken is left open by both). On CPU, for ``V >> k``, they are found among the columns of
    the ``k`` blocks with the largest maxima, block ``j`` being the ``B`` columns ``j + i * V / B``:
    the k-th largest entry is at least the k-th largest block maximum ``m`` (those k maxima are k
    entries >= m), so every entry above it lies in a block whose maximum is above ``m``, i.e. in
    one of those blocks. That ranks ``V / B + k * B`` entries instead of ``V`` (``torch.topk`` runs
    an ``nth_element`` over the whole row on CPU); the block maxima are one vectorised pass.
    """
    rows, v = x.shape
    b = _block_size(v, k)
    if b == 1 or x.device.type != "cpu" or not x.is_contiguous():
        return torch.topk(x, k, dim=-1, sorted=False)
    nb = v // b
    if bm is None or bm.shape != (rows, nb):
        bm = x.view(rows, b, nb).amax(1)
    _, blocks = torch.topk(bm, k, dim=-1, sorted=False)
    cols = (blocks.unsqueeze(-1) + nb * torch.arange(b, device=x.device)).view(rows, k * b)
    vals, j = torch.topk(x.gather(1, cols), k, dim=-1, sorted=False)
    return vals, cols.gather(1, j)


def _order_keys(vals: torch.Tensor, ids: torch.Tensor, id_bits: int) -> torch.Tensor:
    """int64 keys whose decreasing order is the selection order: decreasing value, ties smaller id.

    ``vals`` fp32, ``ids`` in ``[0, 2^id_bits)``; key = ordered bits of the value (the fp32 bit
    pattern with the magnitude bits of negatives flipped, -0.0 as +0.0, every NaN as one NaN
    above +inf, as torch's sort places NaN) shifted left by ``id_bits``, or'ed with the complemented
    id. Keys are distinct, so any sort gives the order a stable value sort of id-sorted entries gives.
    """
    b = (vals + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> +0.0 (they compare equal)
    b = torch.where(b < 0, b ^ 0x7FFFFFFF, b)
    b = torch.where(vals != vals, 0x7FC00000, b)  # NaN (any payload / sign) ranks first
    mask = (1 << id_bits) - 1
    return (b << id_bits) | (mask - ids)


_CPU_BUF: list[torch.Tensor] = [torch.empty(0)]
_CPU_BUF_MAX = 1 << 22
"""Elements of the reused CPU work buffer of :func:`_logsumexp_cpu` (16 MiB fp32; larger chunks allocate)."""


def _logsumexp_cpu(x: torch.Tensor, rowmax: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, -1)`` bit for bit (its own steps: max with +-inf -> 0, ``sum(exp(x - max))``,
    log, add the max), from the row maxima ``rowmax`` [R] (exact however they were reduced), in a
    reused buffer instead of two fresh [R, V] temporaries."""
    m = rowmax.masked_fill(rowmax.abs() == float("inf"), 0.0)
    n = x.numel()
    if n <= _CPU_BUF_MAX:
        if _CPU_BUF[0].numel() < n:
            _CPU_BUF[0] = torch.empty(n, dtype=torch.float32)
        buf = _CPU_BUF[0][:n].view(x.shape)
        torch.sub(x, m.unsqueeze(-1), out=buf)
    else:
        buf = x - m.unsqueeze(-1)
    return buf.exp_().sum(-1).log_().add_(m)


def _top_p_count(p, cum, lp, top_p, kk):
    """Kept entries per row (the mass before an entry ``< top_p``, finite log-probs; 1 to ``kk``) and
    whether the count is final. ``top_p >= 1`` keeps every finite entry: the float32 log-sum-exp can
    make the probabilities add up to a hair above 1, which must not cut the tail."""
    if top_p >= 1.0:
        n = torch.isfinite(lp).sum(dim=-1).clamp_(1, kk)
        return n, torch.zeros_like(n, dtype=torch.bool)
    n = ((cum - p < top_p) & torch.isfinite(lp)).sum(dim=-1).clamp_(1, kk)
    return n, cum[:, -1] >= top_p


def _truncate_cpu(x, kk, lse, top_p, bm=None):
    """:func:`_truncate` on CPU, one rank, fp32 contiguous ``x``: the same results, with one sort of
    :func:`_order_keys` instead of two sorts and four gathers (``bm``: :func:`_block_maxima`)."""
    vals, idx = _topk(x, min(kk, x.shape[-1]), bm)
    id_bits = max(1, (x.shape[-1] - 1).bit_length())
    key = torch.sort(_order_keys(vals, idx, id_bits), dim=-1, descending=True).values[:, :kk]
    gids = ((1 << id_bits) - 1) - (key & ((1 << id_bits) - 1))
    lp = x.gather(-1, gids).double() - lse.unsqueeze(-1)
    p = torch.exp(lp)
    cum = torch.cumsum(p, dim=-1)
    return gids, lp, *_top_p_count(p, cum, lp, top_p, kk)


def _truncate(x, kk, start, lse, top_p, group, tp):
    """Global top-``kk`` of rows ``x`` (this rank's shard) and the top-p count within them.

    Returns ids [R, kk], log-probs (float64) [R, kk], counts [R] and ``done`` [R]: True where the
    kept mass reaches ``top_p`` inside these ``kk`` entries (the count is then final).
    """
    vals, idx = _topk(x, min(kk, x.shape[-1]))  # the order does not matter: sorted below
    vals = _gather_last(vals, group, tp)
    gids = _gather_last(idx + start, group, tp)
    # Deterministic order: by id, then (stable) by decreasing value -> ties keep the smaller id.
    gids, perm = torch.sort(gids, dim=-1)
    vals = vals.gather(-1, perm)
    vals, perm = torch.sort(vals, dim=-1, descending=True, stable=True)
    gids = gids.gather(-1, perm)[:, :kk]
    lp = vals[:, :kk].double() - lse.unsqueeze(-1)
    p = torch.exp(lp)
    cum = torch.cumsum(p, dim=-1)
    return gids, lp, *_top_p_count(p, cum, lp, top_p, kk)


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
    if tp == 1 and logits.device.type == "cpu":
        # The CPU single-rank path (:func:`_truncate_cpu`) runs dozens of small ops per chunk: skip
        # the Python torch-function modes (megatron_kd.runtime.cpu's device rewrite) around them.
        with torch._C.DisableTorchFunction():
            return _select(logits, vocab_size, top_p, top_k, chunk_tokens, None, 1)
    return _select(logits, vocab_size, top_p, top_k, chunk_tokens, group, tp)


def _select(logits, vocab_size, top_p, top_k, chunk_tokens, group, tp):
    T, v_local = logits.shape
    start = (dist.get_rank(group) if tp > 1 else 0) * v_local
    k = min(top_k, vocab_size)
    chunk = chunk_tokens or max(1, (1 << 26) // max(v_local, 1))
    out_ids, out_lp, out_n = [], [], []
    for c0 in range(0, T, chunk):
        x = logits[c0:c0 + chunk]
        if tp == 1:  # the C kernel over the real columns (padding skipped, not masked); None where it does not run
            got = select_native(x, min(v_local, vocab_size), k, top_p)
            if got is not None:
                out_ids.append(got[0])
                out_lp.append(got[1])
                out_n.append(got[2])
                continue
        x = x.float()
        if start + v_local > vocab_size:  # padded vocabulary columns get probability 0
            x = x.masked_fill(torch.arange(start, start + v_local, device=x.device) >= vocab_size, float("-inf"))
        k0 = min(FIRST_K, k) if _first_stage_hits[0] >= 0.5 else k
        fast = tp == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
        bm = None
        if fast:  # the row maxima from the top-k's block maxima (max is exact in any order)
            bm = _block_maxima(x, min(k0, v_local))
            lse = _logsumexp_cpu(x, (bm if bm is not None else x).amax(-1))
        else:
            lse = torch.logsumexp(x, dim=-1)
        # Global log-sum-exp from the per-rank ones: two all-reduces of [T] values.
        if tp > 1:
            m = lse.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            s = torch.exp(lse - m)
            dist.all_reduce(s, group=group)
            lse = m + torch.log(s)
        lse = lse.double()
        # Two stages: most positions of a trained teacher are decided by their top FIRST_K entries
        # (their mass already reaches top_p); only the others pay for the full top-k.
        # The first stage is skipped while it decides under half of the positions (a flat teacher),
        # where it would only add a second top-k pass.
        if fast:
            gids, lp, n, done = _truncate_cpu(x, k0, lse, top_p, bm)
        else:
            gids, lp, n, done = _truncate(x, k0, start, lse, top_p, group, tp)
        decided = done if k0 < k else torch.exp(lp[:, :FIRST_K]).sum(-1) >= top_p
        _first_stage_hits[0] = 0.8 * _first_stage_hits[0] + 0.2 * float(decided.double().mean())
        if k0 < k:
            gids = torch.cat([gids, gids.new_full((len(gids), k - k0), -1)], dim=-1)
            lp = torch.cat([lp, lp.new_full((len(lp), k - k0), float("-inf"))], dim=-1)
            rest = torch.nonzero(~done).squeeze(-1)  # identical on every TP rank
            if len(rest):
                if fast:
                    g2, lp2, n2, _ = _truncate_cpu(x.index_select(0, rest), k, lse.index_select(0, rest), top_p)
                else:
                    g2, lp2, n2, _ = _truncate(x.index_select(0, rest), k, start, lse.index_select(0, rest), top_p,
                                               group, tp)
                gids[rest], lp[rest], n[rest] = g2, lp2, n2
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
    got = flatten_native(ids, logprobs, counts)
    if got is not None:
        return got
    valid = torch.arange(ids.shape[-1], device=ids.device).unsqueeze(0) < counts.unsqueeze(-1)
    if ids.device.type == "cpu" and logprobs.dtype == torch.float32 and ids.numel():
        with torch._C.DisableTorchFunction():
            # One sort of (id << 32 | the log-prob's 32 bits): ids and values come out together.
            bits = logprobs.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            key = torch.sort(torch.where(valid, (ids << 32) | bits, torch.iinfo(torch.long).max), dim=-1).values
            key = key.masked_select(valid)
            low = key & 0xFFFFFFFF
            return key >> 32, ((low ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32)
    key, perm = torch.sort(torch.where(valid, ids, torch.iinfo(torch.long).max), dim=-1)
    # Sorting pushed the unused entries to the end of each row, so ``valid`` still marks the kept ones.
    return key.masked_select(valid), logprobs.gather(-1, perm).masked_select(valid)
