"""Cross-tokenizer KD losses: Universal Logit Distillation and the GOLD-style hybrid.

Student and teacher have different vocabularies, so their distributions cannot be compared id by
id. Both functions take per-position logits that are already *aligned* (same leading shape: row
``i`` of the teacher is the teacher position aligned with student position ``i``; see
:mod:`megatron_kd.data.alignment`) and return the per-position loss, float32 (float64 inputs:
float64). With ``q = softmax(student / T)`` over the student vocabulary and ``p = softmax(teacher
/ T)`` over the teacher's:

* :func:`uld_loss` (Boizard et al. 2024): ``Σ_r |sort↓(q)_r − sort↓(p)_r|`` over the two
  probability vectors zero-padded to the same length. With ``top_m``: both sorts keep their ``m``
  largest entries and the tails ``R_q``, ``R_p`` (the remaining masses) enter as one term,
  ``Σ_{r<m} |q_(r) − p_(r)| + |R_q − R_p|``; it never exceeds the exact loss and falls short of it
  by at most ``2·min(R_q, R_p)`` (so the tail contributes at most its mass); exact when ``m`` covers
  both vocabularies.
* :func:`hybrid_kd_loss` (GOLD): ids matched by a :class:`~megatron_kd.data.vocab_map.VocabMap`
  (same text in both vocabularies) get the exact forward KL between the two distributions
  restricted to the matched support and renormalised, ``KL(p̃ ‖ q̃)``; the unmatched ids' raw
  probabilities get ULD; ``loss = matched_weight · KL + unmatched_weight · ULD_unmatched``. With
  identical tokenizers every id is matched and this is exactly forward KL.

Gradients are analytic (``run_chunked``: one gradient buffer, chunks of tokens). ULD: with
``g_i = sign(q_(r(i)) − p_(r(i)))`` at the rank ``r(i)`` of ``q_i`` (tail ids: ``sign(R_q − R_p)``),
``∂/∂s = q ⊙ (g − Σ q g) / T``; the KL part: ``(q̃ − p̃) / T`` on the matched ids.

Vocab parallelism (logits sharded over the TP group, each model by its own width):

* ``top_m`` ULD never gathers the vocabulary: global max / log-sum-exp by all-reduce, each rank
  offers its local top-``m`` probabilities, an all-gather of those ``[n, m]`` candidates gives the
  global top ``m`` (and which rank owns each), the tails by one all-reduce;
* exact ULD and the hybrid all-gather the logits of one chunk of positions (``[chunk, V]`` per
  rank: a sort, or a permutation between two vocabularies, needs the whole row), compute the loss
  on every rank and keep the gradient of the local shard. Memory stays ``O(chunk × V)``.

A column whose logit is −inf (megatron's padded vocabulary, masked by the caller) has probability
0 and takes no part; a row with no finite column on a side has loss 0.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_kd.losses.vocab_parallel import (TPContext, all_reduce_, auto_chunk, compute_dtype, resolve_tp,
                                               run_chunked, take_rows)


def _softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of ``x / T`` where a row of only -inf gives zeros (not NaN)."""
    z = x / temperature
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    s = e.sum(-1, keepdim=True)
    return e / torch.where(s > 0, s, torch.ones_like(s))


def _gather_vocab(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """All-gather the vocab shards of ``x`` [n, V_local] into [n, V] (no-op on one process)."""
    if tp.group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


def _uld_full(q: torch.Tensor, p: torch.Tensor, top_m: Optional[int], need_grad: bool
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """ULD of full rows ``q`` [n, Vq], ``p`` [n, Vp]; returns (loss, g) with ``g`` the per-entry
    sign coefficients [n, Vq] (d loss / d q) or None."""
    vq, vp = q.shape[-1], p.shape[-1]
    if top_m is None or top_m >= max(vq, vp):
        width = max(vq, vp)
        qs, qi = torch.sort(q, dim=-1, descending=True)
        ps = torch.sort(p, dim=-1, descending=True).values
        if vq < width:
            qs = torch.nn.functional.pad(qs, (0, width - vq))
        if vp < width:
            ps = torch.nn.functional.pad(ps, (0, width - vp))
        d = qs - ps
        loss = d.abs().sum(-1)
        if not need_grad:
            return loss, None
        g = torch.empty_like(q).scatter_(-1, qi, torch.sign(d[:, :vq]))
        return loss, g
    mq, mp = min(top_m, vq), min(top_m, vp)
    qs, qi = torch.topk(q, mq, dim=-1)
    ps = torch.topk(p, mp, dim=-1).values
    r_q = q.sum(-1) - qs.sum(-1)
    r_p = p.sum(-1) - ps.sum(-1)
    if mq < top_m:
        qs = torch.nn.functional.pad(qs, (0, top_m - mq))
    if mp < top_m:
        ps = torch.nn.functional.pad(ps, (0, top_m - mp))
    d = qs - ps
    tail = r_q - r_p
    loss = d.abs().sum(-1) + tail.abs()
    if not need_grad:
        return loss, None
    g = torch.sign(tail).unsqueeze(-1).expand_as(q).clone()
    g.scatter_(-1, qi, torch.sign(d[:, :mq]))
    return loss, g


def _softmax_backward(q: torch.Tensor, g: torch.Tensor, temperature: float, tp: TPContext,
                      local: bool) -> torch.Tensor:
    """``q ⊙ (g − Σ q g) / T``; with ``local`` the sum runs over the TP group's shards."""
    dot = (q * g).sum(-1, keepdim=True)
    if local:
        all_reduce_(dot, tp)
    return q * (g - dot) / temperature


def _uld_kernel(student2d, teacher2d, temperature, top_m, tp, dtype):
    def kernel(rows, need_grad, out):
        s = take_rows(student2d, rows, dtype)
        t = take_rows(teacher2d, rows, dtype)
        if tp.group is None or top_m is None:
            q = _softmax(_gather_vocab(s, tp), temperature)
            p = _softmax(_gather_vocab(t, tp), temperature)
            loss, g = _uld_full(q, p, top_m, need_grad)
            if not need_grad:
                return loss, None
            grad = _softmax_backward(q, g, temperature, tp, local=False)
            v = s.shape[-1]
            return loss, grad[:, tp.rank * v:(tp.rank + 1) * v]
        return _uld_topm_tp(s, t, temperature, top_m, tp, need_grad)

    return kernel


def _local_softmax_tp(x: torch.Tensor, temperature: float, tp: TPContext) -> torch.Tensor:
    """This shard's part of the global softmax of ``x / T`` (max and sum all-reduced)."""
    return _local_softmax_tp_(x / temperature, 1.0, tp)


def _local_softmax_tp_(x: torch.Tensor, temperature: float, tp: TPContext) -> torch.Tensor:
    """:func:`_local_softmax_tp` computed in place in ``x`` (a tensor the caller owns), same values."""
    if temperature != 1.0:  # x / 1 is x exactly: skip the pass
        x.div_(temperature)
    m = x.amax(-1, keepdim=True)
    all_reduce_(m, tp, "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = x.sub_(m).exp_()
    s = e.sum(-1, keepdim=True)
    all_reduce_(s, tp)
    return e.div_(torch.where(s > 0, s, torch.ones_like(s)))


def _global_topm(x: torch.Tensor, m: int, tp: TPContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-``m`` values [n, m] of the sharded rows ``x`` and a mask of this rank's entries
    among them, mapped to their sorted rank: ``rank_of`` [n, V_local] (-1 = not in the top m)."""
    n, v = x.shape
    ml = min(m, v)
    vals, idx = torch.topk(x, ml, dim=-1)
    parts = [torch.empty_like(vals) for _ in range(tp.world_size)]
    dist.all_gather(parts, vals.contiguous(), group=tp.group)
    cand = torch.cat(parts, dim=-1)  # [n, tp * ml], rank r's candidates at [r*ml, (r+1)*ml)
    k = min(m, cand.shape[-1])
    top, pos = torch.topk(cand, k, dim=-1)
    if k < m:
        top = torch.nn.functional.pad(top, (0, m - k))
    mine = (pos // ml) == tp.rank
    rank_of = torch.full((n, v), -1, dtype=torch.long, device=x.device)
    rows = torch.arange(n, device=x.device).unsqueeze(-1).expand_as(pos)
    sorted_rank = torch.arange(k, device=x.device).unsqueeze(0).expand_as(pos)
    local_col = idx.gather(-1, (pos % ml))
    rank_of[rows[mine], local_col[mine]] = sorted_rank[mine]
    return top, rank_of


def _uld_topm_tp(s, t, temperature, top_m, tp, need_grad):
    q = _local_softmax_tp(s, temperature, tp)
    p = _local_softmax_tp(t, temperature, tp)
    qs, q_rank = _global_topm(q, top_m, tp)
    ps, p_rank = _global_topm(p, top_m, tp)
    tails = torch.stack([(q * (q_rank < 0)).sum(-1), (p * (p_rank < 0)).sum(-1)])
    all_reduce_(tails, tp)
    d = qs - ps
    tail = tails[0] - tails[1]
    loss = d.abs().sum(-1) + tail.abs()
    if not need_grad:
        return loss, None
    sign_d = torch.sign(d)
    g = torch.where(q_rank >= 0, sign_d.gather(-1, q_rank.clamp_min(0)), torch.sign(tail).unsqueeze(-1))
    return loss, _softmax_backward(q, g, temperature, tp, local=True)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} must "
                         "have the same leading shape (align the teacher positions first)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             top_m: Optional[int] = None, *, loss_mask: Optional[torch.Tensor] = None,
             chunk_size: Optional[int] = None, tp_group: Optional[dist.ProcessGroup] = None,
             retain_graph: bool = False) -> torch.Tensor:
    """Universal Logit Distillation per aligned position (see the module docstring).

    Args:
        student_logits: ``[..., V_s/tp]`` vocab-parallel student logits.
        teacher_logits: ``[..., V_t/tp]`` teacher logits at the aligned positions (constant).
        temperature: T of both softmaxes.
        top_m: compare only the ``m`` largest probabilities of each side plus the tail masses
            (None: exact, the whole sorted vectors).
        loss_mask: positions to compute (others: loss 0, gradient 0), e.g. aligned & not padding.
        chunk_size: positions per chunk (None: automatic).
        tp_group: the TP group (None: megatron's, when initialised with TP > 1).
        retain_graph: keep the gradient buffer so backward can run more than once.
    Returns:
        ``[...]`` per-position loss (float32; float64 for float64 inputs).
    """
    _check_pair(student_logits, teacher_logits, temperature)
    if top_m is not None and top_m < 1:
        raise ValueError(f"top_m={top_m} must be >= 1 or None (exact)")
    tp = resolve_tp(tp_group)
    dtype = compute_dtype(student_logits, teacher_logits)
    width = max(student_logits.shape[-1], teacher_logits.shape[-1]) * (tp.world_size if top_m is None else 1)
    chunk = auto_chunk(width, chunk_size, student_logits.device)
    t2d = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    s2d = student_logits.reshape(-1, student_logits.shape[-1])
    kernel = _uld_kernel(s2d, t2d, float(temperature), top_m, tp, dtype)
    return run_chunked(student_logits, kernel, chunk, loss_mask, dtype, retain_graph)


def _hybrid_kernel(student2d, teacher2d, s_ids, t_ids, s_matched, t_matched, temperature, w_m, w_u, top_m,
                   tp, dtype):
    def kernel(rows, need_grad, out):
        s_local = take_rows(student2d, rows, dtype)
        s = _gather_vocab(s_local, tp)
        t = _gather_vocab(take_rows(teacher2d, rows, dtype), tp)
        # Matched support: KL between the renormalised restrictions (absent pairs dropped).
        sm, tm = s[:, s_ids], t[:, t_ids]
        absent = ~(torch.isfinite(sm) & torch.isfinite(tm))
        sm = sm.masked_fill(absent, float("-inf"))
        tm = tm.masked_fill(absent, float("-inf"))
        q_m = _softmax(sm, temperature)
        p_m = _softmax(tm, temperature)
        log_ratio = torch.where(p_m > 0, torch.log(p_m) - torch.log(q_m.clamp_min(torch.finfo(dtype).tiny)),
                                torch.zeros_like(p_m))
        kl = (p_m * log_ratio).sum(-1)
        # Unmatched remainder: raw probabilities of the unmatched ids, ULD.
        q = _softmax(s, temperature)
        p = _softmax(t, temperature)
        q_u = q.masked_fill(s_matched, 0.0)
        p_u = p.masked_fill(t_matched, 0.0)
        uld, g = _uld_full(q_u, p_u, top_m, need_grad)
        loss = w_m * kl + w_u * uld
        if not need_grad:
            return loss, None
        g = g.masked_fill(s_matched, 0.0)
        grad = w_u * _softmax_backward(q, g, temperature, tp, local=False)
        grad[:, s_ids] += w_m * (q_m - p_m) / temperature
        v = s_local.shape[-1]
        return loss, grad[:, tp.rank * v:(tp.rank + 1) * v]

    return kernel


def hybrid_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_map,
                   temperature: float = 1.0, matched_weight: float = 1.0, unmatched_weight: float = 1.0,
                   top_m: Optional[int] = None, *, loss_mask: Optional[torch.Tensor] = None,
                   chunk_size: Optional[int] = None, tp_group: Optional[dist.ProcessGroup] = None,
                   retain_graph: bool = False) -> torch.Tensor:
    """GOLD-style hybrid per aligned position: ``matched_weight · KL(p̃‖q̃)`` over the matched ids
    (renormalised) ``+ unmatched_weight · ULD`` over the unmatched ids' probabilities.

    ``vocab_map``: a :class:`~megatron_kd.data.vocab_map.VocabMap` (or any object with
    ``student_ids`` / ``teacher_ids`` arrays of matched global ids). Other arguments as
    :func:`uld_loss` (``top_m`` applies to the ULD remainder). Under TP the logits of each chunk
    are all-gathered (the matched pairs cross shards).
    """
    _check_pair(student_logits, teacher_logits, temperature)
    if matched_weight < 0 or unmatched_weight < 0:
        raise ValueError(f"matched_weight={matched_weight} and unmatched_weight={unmatched_weight} must be >= 0")
    tp = resolve_tp(tp_group)
    dev = student_logits.device
    vs = student_logits.shape[-1] * tp.world_size
    vt = teacher_logits.shape[-1] * tp.world_size
    s_ids = torch.as_tensor(np.asarray(vocab_map.student_ids), dtype=torch.long, device=dev)
    t_ids = torch.as_tensor(np.asarray(vocab_map.teacher_ids), dtype=torch.long, device=dev)
    if len(s_ids) != len(t_ids):
        raise ValueError("vocab_map.student_ids and vocab_map.teacher_ids must pair up (same length)")
    if len(s_ids) and (int(s_ids.max()) >= vs or int(t_ids.max()) >= vt or int(s_ids.min()) < 0
                       or int(t_ids.min()) < 0):
        raise ValueError(f"vocab_map ids exceed the logits' vocabularies (student {vs}, teacher {vt}): "
                         "build the map from the tokenizers of these two models")
    s_matched = torch.zeros(vs, dtype=torch.bool, device=dev)
    s_matched[s_ids] = True
    t_matched = torch.zeros(vt, dtype=torch.bool, device=dev)
    t_matched[t_ids] = True
    dtype = compute_dtype(student_logits, teacher_logits)
    chunk = auto_chunk(max(vs, vt), chunk_size, dev)
    t2d = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    s2d = student_logits.reshape(-1, student_logits.shape[-1])
    kernel = _hybrid_kernel(s2d, t2d, s_ids, t_ids, s_matched, t_matched, float(temperature),
                            float(matched_weight), float(unmatched_weight), top_m, tp, dtype)
    return run_chunked(student_logits, kernel, chunk, loss_mask, dtype, retain_graph)


def _projected_kernel(student2d, teacher2d, proj_local, temperature, tp, dtype, student_global):
    valid = proj_local >= 0
    src = torch.nonzero(valid).reshape(-1)
    dst = proj_local[src]

    # Elementwise work on [chunk, V] tensors is this loss's whole cost (no matmul), so every step
    # below works in place on the chunk's private copies; each element gets the same float operations
    # in the same order as the plain formulas in the comments (tests/losses: bit-equal).
    def kernel(rows, need_grad, out):
        s = take_rows(student2d, rows, dtype)
        p = _local_softmax_tp_(take_rows(teacher2d, rows, dtype), temperature, tp)
        # r[v] = sum of p[u] over projection[u] = v, added in ascending u (as index_add_ would)
        r = torch.zeros(s.shape[0], student_global, dtype=dtype, device=s.device)
        r.scatter_add_(1, dst.expand(s.shape[0], -1), p.index_select(1, src))
        del p
        all_reduce_(r, tp)
        mass = r.sum(-1, keepdim=True)
        r.div_(torch.where(mass > 0, mass, torch.ones_like(mass)))  # r / mass (renormalised)
        v = s.shape[-1]
        r = r[:, tp.rank * v:(tp.rank + 1) * v]
        z = s.div_(temperature) if temperature != 1.0 else s  # z = s / T
        m = z.amax(-1, keepdim=True)
        all_reduce_(m, tp, "max")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.sub(z, m).exp_()  # exp(z - m)
        total = e.sum(-1, keepdim=True)
        all_reduce_(total, tp)
        lse = m + torch.log(total)
        off = ~(r > 0)
        log_q = z.sub_(lse).masked_fill_(off, 0.0)  # where(r > 0, z - lse, 0)
        log_r = torch.log(r.masked_fill(off, 1.0)).masked_fill_(off, 0.0)  # where(r > 0, log r, 0)
        part = log_r.sub_(log_q).mul_(r).sum(-1)  # sum r (log r - log q)
        all_reduce_(part, tp)
        has_mass = mass > 0
        loss = torch.where(has_mass.squeeze(-1), part, torch.zeros_like(part))
        if not need_grad:
            return loss, None
        grad = e.div_(total).sub_(r)  # q - r
        if temperature != 1.0:
            grad.div_(temperature)
        return loss, grad.masked_fill_(~has_mass, 0.0)

    return kernel


def projected_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, projection,
                      temperature: float = 1.0, *, loss_mask: Optional[torch.Tensor] = None,
                      chunk_size: Optional[int] = None, tp_group: Optional[dist.ProcessGroup] = None,
                      retain_graph: bool = False) -> torch.Tensor:
    """Forward KL from the teacher's distribution *projected* onto the student vocabulary.

    ``projection[u]`` is the student id a continuation starting with teacher token ``u`` begins
    with (-1: dropped; :func:`megatron_kd.data.vocab_map.build_projection`). With
    ``p = softmax(teacher / T)``, the target is ``r(v) ∝ Σ_{u: projection[u] = v} p(u)``
    (renormalised over the mapped mass) and the loss ``KL(r ‖ softmax(student / T))``, gradient
    ``(q − r) / T``. Identical tokenizers (identity projection): exactly forward KL. Under TP each
    rank scatter-adds its teacher shard into a ``[chunk, V_s]`` buffer, one all-reduce sums it.
    """
    _check_pair(student_logits, teacher_logits, temperature)
    tp = resolve_tp(tp_group)
    dev = student_logits.device
    vs = student_logits.shape[-1] * tp.world_size
    vt_local = teacher_logits.shape[-1]
    proj = torch.as_tensor(np.asarray(projection), dtype=torch.long, device=dev)
    if len(proj) and int(proj.max()) >= vs:
        raise ValueError(f"projection maps to student id {int(proj.max())} beyond the student logits' {vs} "
                         "columns: build it from the tokenizers of these two models")
    full = torch.full((vt_local * tp.world_size,), -1, dtype=torch.long, device=dev)
    n = min(len(proj), len(full))
    full[:n] = proj[:n]
    proj_local = full[tp.rank * vt_local:(tp.rank + 1) * vt_local]
    dtype = compute_dtype(student_logits, teacher_logits)
    chunk = auto_chunk(max(vs, vt_local), chunk_size, dev)
    t2d = teacher_logits.detach().reshape(-1, vt_local)
    s2d = student_logits.reshape(-1, student_logits.shape[-1])
    kernel = _projected_kernel(s2d, t2d, proj_local, float(temperature), tp, dtype, vs)
    return run_chunked(student_logits, kernel, chunk, loss_mask, dtype, retain_graph)
