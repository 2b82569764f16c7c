"""Fused distillation losses: LM + KD in one pass per logits chunk, and the output layer fused in.

Entry points, vocab-parallel (TP shards of the vocabulary, reductions per chunk):

* :func:`fused_kd_lm_loss` - given the student logits (and the teacher's logits or sparse
  targets), one pass over each token chunk computes the LM cross-entropy and the KD divergence
  with a shared row max / log-sum-exp, and one combined analytic gradient
  ``w_kd * dKD/ds + w_lm * dLM/ds`` (at T = 1, forward KL: ``(w_kd + w_lm) q - w_kd p - w_lm onehot``,
  i.e. ``q - (1 - a) onehot - a p`` for ``w = (a, 1 - a)``). Every divergence of
  :func:`megatron_kd.losses.kd_loss` and both sparse-target modes are supported; forward KL and
  soft CE at T = 1 (dense) and renormalised sparse targets at T = 1 share the student's exp, the
  other cases run the divergence kernel and the LM on the same chunk.
* :func:`kd_lm_chunk` - that pass on one chunk, shared with the fused output layer
  (:func:`megatron_kd.losses.fused_linear.fused_linear_kd`).

Weights ``w_kd`` / ``w_lm`` are plain numbers fixed at forward time (the alpha schedule and the
T^2 factor); the returned per-token KD and LM values are detached, for the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_kd.losses import compiled as _compiled
from megatron_kd.losses.divergences import KINDS, _dense_kernel, check_temperature, normalize_kind
from megatron_kd.losses.sparse import TARGET_KINDS, _sparse_kernel
from megatron_kd.losses.vocab_ops import global_row_max, gather_owned, owned_ids, sub_onehot_
from megatron_kd.losses.vocab_parallel import (
    ChunkedLoss,
    TPContext,
    Workspace,
    all_reduce_,
    auto_chunk,
    compute_dtype,
    flat_mask,
    resolve_tp,
    take_rows,
)


@dataclass(frozen=True)
class KDSpec:
    """Which divergence the fused kernels compute (already normalised by :func:`kd_spec`)."""

    kind: str = "forward_kl"
    temperature: float = 1.0
    skew: float = 0.1
    beta: float = 0.5
    residual: bool = False
    sparse: bool = False

    @property
    def dense_fast(self) -> bool:
        """Dense kinds whose KD shares the student's exp with the LM term."""
        return not self.sparse and self.kind in ("forward_kl", "soft_ce") and self.temperature == 1.0

    @property
    def sparse_fast(self) -> bool:
        """Sparse targets whose KD shares the student's exp with the LM term."""
        return self.sparse and not self.residual and self.temperature == 1.0


def kd_spec(kind: str = "forward_kl", temperature: float = 1.0, skew: float = 0.1, beta: float = 0.5,
            residual: bool = False, sparse: bool = False, target_kind: str = "logprobs") -> KDSpec:
    """Validate the KD settings (one-line errors, as :func:`kd_loss` / :func:`sparse_kd_loss`)."""
    check_temperature(temperature)
    if sparse:
        if target_kind not in TARGET_KINDS:
            raise ValueError(f"target_kind={target_kind!r} is not one of {', '.join(TARGET_KINDS)}")
        if (residual or target_kind == "weights") and temperature != 1.0:
            raise ValueError(f"residual / weighted sparse targets need temperature=1 (got {temperature})")
        if target_kind == "weights" and residual:
            raise ValueError("weighted (sampled) sparse targets need residual=False")
        return KDSpec("forward_kl", float(temperature), residual=bool(residual), sparse=True)
    if kind not in KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    kind = normalize_kind(kind, skew, beta)
    return KDSpec(kind, float(temperature), float(skew), float(beta))


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=x.dtype, device=x.device)


def _lm_part(S: torch.Tensor, labels: torch.Tensor, tp: TPContext, need_grad: bool, w_lm: float,
             offset: Optional[int] = None):
    """LM cross-entropy of one chunk (S is overwritten); grad = w_lm (softmax - onehot) or None."""
    li, own = owned_ids(labels, S.shape[-1], tp, offset)
    mx = global_row_max(S, tp=tp)[0]
    sl = gather_owned(S, li, own)
    S.sub_(mx.unsqueeze(-1))
    E = S.exp_()
    red = all_reduce_(torch.stack((E.sum(-1), sl)), tp)
    lm = mx + red[0].log() - red[1]
    if not need_grad:
        return lm, None
    E.mul_((w_lm / red[0]).unsqueeze(-1))
    return lm, sub_onehot_(E, li, own, w_lm)


def _dense_fast(S, Tt, labels, tp, need_grad, out, w_kd, w_lm, soft_ce, offset):
    """Forward KL / soft CE at T = 1 plus LM on one clean chunk (no -inf); S and Tt are overwritten."""
    li, own = owned_ids(labels, S.shape[-1], tp, offset)
    mx = global_row_max(S, Tt, tp=tp)
    sl = gather_owned(S, li, own)
    S.sub_(mx[0].unsqueeze(-1))
    Tt.sub_(mx[1].unsqueeze(-1))
    Es = torch.exp(S) if out is None else torch.exp(S, out=out)
    D = S if soft_ce else torch.sub(Tt, S, out=S)
    Et = Tt.exp_()
    red = all_reduce_(torch.stack((Es.sum(-1), Et.sum(-1), D.mul_(Et).sum(-1), sl)), tp)
    zs, zt = red[0], red[1]
    lzs, lzt = zs.log(), zt.log()
    part = red[2] / zt
    kd = lzs - part if soft_ce else part - lzt + lzs
    lm = mx[0] + lzs - red[3]
    if not need_grad:
        return kd, lm, None
    Es.mul_(((w_kd + w_lm) / zs).unsqueeze(-1))
    if w_kd != 0.0:
        Es.addcmul_(Et, (-w_kd / zt).unsqueeze(-1))
    return kd, lm, sub_onehot_(Es, li, own, w_lm)


def _sparse_target_terms(present: torch.Tensor, sv: torch.Tensor, lzs: torch.Tensor, lp: torch.Tensor):
    """The target side of renormalised sparse KD on [n, k] stored entries: ``present`` (stored id is a
    real column), ``sv`` the student's logits at the stored ids, ``lzs`` [n] the student's log-partition
    (after the max shift), ``lp`` the stored log-probs. Returns (p [n, k] the teacher renormalised over
    the present ids, kd [n] = KL(p || student), has [n] = any mass present)."""
    lq = torch.where(present, sv - lzs.unsqueeze(-1), 0.0)
    p, lp_hat, has = _renormalise(torch.where(present, lp, float("-inf")))
    return p, torch.where(p > 0, p * (lp_hat - lq), 0.0).sum(-1), has


def _renormalise(a: torch.Tensor):
    """Stored log-probs ``a`` [n, k] (-inf = absent) renormalised per row: (p, log p, has [n] = any mass)."""
    amax = a.amax(-1)
    amax = torch.where(torch.isfinite(amax), amax, 0.0)
    e = torch.exp(a - amax.unsqueeze(-1))
    z = e.sum(-1)
    has = z > 0
    z = torch.where(has, z, 1.0)
    return e / z.unsqueeze(-1), a - (amax + z.log()).unsqueeze(-1), has


def _sparse_fast_local(S, ids, lp, labels, tp, need_grad, out, w_kd, w_lm, offset, vocab_limit):
    """:func:`_sparse_fast` on one process (CPU), with the [n, k] masks mostly gone; None (S untouched)
    when its preconditions fail, so the caller runs the general form.

    On the CPU a masked ``torch.where`` / comparison over [n, k] costs 5-20x an arithmetic op (~190 us vs
    ~10 us at [512, 100]), and the general form runs about ten of them per chunk: ~3 ms per 512-token chunk
    at V = 8,192, 2.5% of an offline step (issue 15). Here, when every stored id is a real column or
    padding (id outside ``[0, vocab_limit)``) whose log-prob is -inf, and the student's logits at the ids
    are finite, "present" is just "valid", the masked teacher log-probs equal ``lp`` and every masked
    term is an exact product with 0 - so the values and the gradient equal the general form's (up to the
    sign of a zero), with no per-element mask. Anything else (NaN / +inf log-probs, a padding entry with
    mass, non-finite logits) returns None.
    """
    v_local = S.shape[-1]
    if offset != 0 or vocab_limit > v_local or v_local == 0 or ids.numel() == 0:
        return None
    lo, hi = (int(x) for x in torch.aminmax(ids))
    valid = None  # None: every id is valid
    if lo < 0 or hi >= vocab_limit:
        valid = (ids >= 0) & (ids < vocab_limit)
        if bool(((lp > float("-inf")) & ~valid).any()):  # a padding entry carries mass: general form
            return None
    if not bool(lp.amax() < float("inf")):  # NaN or +inf log-probs
        return None
    li, own = owned_ids(labels, v_local, tp, offset)
    lidx = ids.clamp(0, v_local - 1)  # padding entries read some real column; their terms are 0 below
    sv = S.gather(-1, lidx)  # first, while the chunk's logits are fresh from the matmul (random reads)
    mx = global_row_max(S, tp=tp)[0]
    sv.sub_(mx.unsqueeze(-1))  # = the shifted logits at the ids (the same rounding as S.sub_ below)
    if not bool(sv.sum().isfinite()):
        return None
    S.sub_(mx.unsqueeze(-1))
    sl = gather_owned(S, li, own)
    E = S.exp_() if out is None else torch.exp(S, out=out)
    zs = E.sum(-1)
    zs = torch.where(zs > 0, zs, 1.0)
    lzs = zs.log()
    lm = lzs - sl
    # The target side (_sparse_target_terms with present = valid, hence a = lp).
    p, lp_hat, has = _renormalise(lp)
    lq = sv - lzs.unsqueeze(-1)
    # p = 0 exactly wherever lp_hat = -inf (padding, zero mass); clamping those to the lowest float makes
    # their term p * (...) = 0 instead of NaN, so no mask is needed. (lq <= 0: no overflow.)
    kd = (p * (lp_hat.clamp_min_(torch.finfo(lp_hat.dtype).min) - lq)).sum(-1)
    if not bool(kd.isfinite().all()):  # overflow somewhere: the masked form
        present = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        p, kd, has = _sparse_target_terms(present, sv, lzs, lp)
    if not need_grad:
        return kd, lm, None
    E.mul_(((w_kd * has.to(E.dtype) + w_lm) / zs).unsqueeze(-1))
    if w_kd != 0.0:
        E.scatter_add_(-1, lidx, -w_kd * p)  # padding entries add -0.0 (p = 0) to a real column
    return kd, lm, sub_onehot_(E, li, own, w_lm)


def _sparse_fast(S, ids, lp, labels, tp, need_grad, out, w_kd, w_lm, offset, vocab_limit):
    """Renormalised sparse targets at T = 1 plus LM on one chunk (S is overwritten).

    Same maths as :func:`megatron_kd.losses.sparse_kd_loss` (non-residual, T = 1).
    """
    v_local = S.shape[-1]
    if tp.group is None and S.device.type == "cpu":
        res = _sparse_fast_local(S, ids, lp, labels, tp, need_grad, out, w_kd, w_lm, offset, vocab_limit)
        if res is not None:
            return res
    lidx, owned = owned_ids(ids, v_local, tp, offset)
    li, own = owned_ids(labels, v_local, tp, offset)
    valid = (ids >= 0) & (ids < vocab_limit)
    mx = global_row_max(S, tp=tp)[0]
    S.sub_(mx.unsqueeze(-1))
    sv = gather_owned(S, lidx, owned)
    sl = gather_owned(S, li, own)
    E = S.exp_() if out is None else torch.exp(S, out=out)
    red = all_reduce_(torch.cat((E.sum(-1, keepdim=True), sl.unsqueeze(-1), sv), dim=-1), tp)
    zs, sl, sv = red[:, 0], red[:, 1], red[:, 2:]
    present = valid & (sv > float("-inf"))
    zs = torch.where(zs > 0, zs, 1.0)
    lzs = zs.log()
    lm = lzs - sl
    p, kd, has = _sparse_target_terms(present, sv, lzs, lp)
    if not need_grad:
        return kd, lm, None
    E.mul_(((w_kd * has.to(E.dtype) + w_lm) / zs).unsqueeze(-1))
    if w_kd != 0.0:
        E.scatter_add_(-1, lidx, torch.where(owned & present, -w_kd * p, 0.0))
    return kd, lm, sub_onehot_(E, li, own, w_lm)


# ------------------------------------------------------------- compiled forms (kd.compile)
def _scalar(x: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x, dtype=like.dtype, device=like.device)


def _lm_part_compiled(S, labels, tp, need_grad, w_lm, offset):
    """:func:`_lm_part` through the compiled kernels (S is overwritten)."""
    li, own = owned_ids(labels, S.shape[-1], tp, offset)
    mx = global_row_max(S, tp=tp)[0]
    red = all_reduce_(_compiled.call(_compiled.lm_sums_, S, mx, li, own), tp)
    lm = mx + red[0].log() - red[1]
    if not need_grad:
        return lm, None
    _compiled.call(_compiled.lm_grad_, S, w_lm / red[0], li, own, _scalar(w_lm, S))
    return lm, S


def _dense_fast_compiled(S, Tt, labels, tp, need_grad, w_kd, w_lm, soft_ce, offset):
    """:func:`_dense_fast` through the compiled kernels (S and Tt are overwritten)."""
    li, own = owned_ids(labels, S.shape[-1], tp, offset)
    mx = global_row_max(S, Tt, tp=tp)
    ms, mt = mx[0], mx[1]
    red = all_reduce_(_compiled.call(_compiled.dense_sums_, S, Tt, ms, mt, li, own, soft_ce), tp)
    zs, zt = red[0], red[1]
    lzs, lzt = zs.log(), zt.log()
    part = red[2] / zt
    kd = lzs - part if soft_ce else part - lzt + lzs
    lm = ms + lzs - red[3]
    if not need_grad:
        return kd, lm, None
    _compiled.call(_compiled.dense_grad_, S, Tt, (w_kd + w_lm) / zs, w_kd / zt, li, own, _scalar(w_lm, S))
    return kd, lm, S


def _sparse_fast_compiled(S, ids, lp, labels, tp, need_grad, w_kd, w_lm, offset, vocab_limit):
    """:func:`_sparse_fast` through the compiled kernels (S is overwritten)."""
    v_local = S.shape[-1]
    lidx, owned = owned_ids(ids, v_local, tp, offset)
    li, own = owned_ids(labels, v_local, tp, offset)
    valid = (ids >= 0) & (ids < vocab_limit)
    mx = global_row_max(S, tp=tp)[0]
    sv = torch.where(owned, S.gather(-1, lidx) - mx.unsqueeze(-1), 0.0)
    sums = _compiled.call(_compiled.lm_sums_, S, mx, li, own)
    red = all_reduce_(torch.cat((sums.t(), sv), dim=-1), tp)
    zs, sl, sv = red[:, 0], red[:, 1], red[:, 2:]
    present = valid & (sv > float("-inf"))
    zs = torch.where(zs > 0, zs, 1.0)
    lzs = zs.log()
    lm = mx + lzs - sl
    p, kd, has = _sparse_target_terms(present, sv, lzs, lp)
    if not need_grad:
        return kd, lm, None
    _compiled.call(_compiled.lm_grad_, S, (w_kd * has.to(S.dtype) + w_lm) / zs, li, own, _scalar(w_lm, S))
    if w_kd != 0.0:
        S.scatter_add_(-1, lidx, torch.where(owned & present, -w_kd * p, 0.0))
    return kd, lm, S


def kd_lm_chunk(spec: KDSpec, S: torch.Tensor, labels: torch.Tensor, tp: TPContext, need_grad: bool,
                w_kd: float, w_lm: float, *, teacher: Optional[torch.Tensor] = None,
                ids: Optional[torch.Tensor] = None, lp: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None, clean: bool = True, kd_kernel=None,
                width: Optional[int] = None, vocab_limit: Optional[int] = None, compiled: bool = False):
    """``(kd[n], lm[n], grad[n, V_local] or None)`` of one chunk of student logits ``S`` (overwritten).

    ``grad = w_kd dKD/dS + w_lm dLM/dS``. ``teacher`` [n, V_local] (dense, overwritten) or
    ``ids``/``lp`` [n, k] (sparse). ``clean``: no -inf anywhere in S or the teacher (required by
    the dense fast path). ``kd_kernel(need_grad) -> (kd, grad)``: the divergence of this chunk for
    the general path (default: built from the chunk itself; call it before S is modified).
    ``out``: optional buffer for the gradient. ``width``: the shard's full width when ``S`` holds
    only its first (real-vocabulary) columns; ``vocab_limit``: ids from it on are not real (default
    ``width * tp_size``). ``spec.kind == "none"``: LM only (kd = 0). ``compiled``: run the LM-only,
    dense-fast and sparse-fast kernels through :mod:`megatron_kd.losses.compiled` (``kd.compile``;
    eager when compilation is unavailable); the other kinds always run eager.
    """
    valid_cols = S.shape[-1]
    width = valid_cols if width is None else width
    offset = tp.vocab_offset(width)
    vocab_limit = width * tp.world_size if vocab_limit is None else vocab_limit
    compiled = compiled and _compiled.enabled()
    if spec.kind == "none":
        lm, glm = (_lm_part_compiled if compiled else _lm_part)(S, labels, tp, need_grad, w_lm, offset)
        return torch.zeros_like(lm), lm, glm
    if spec.dense_fast and clean:
        if compiled:
            return _dense_fast_compiled(S, teacher, labels, tp, need_grad, w_kd, w_lm, spec.kind == "soft_ce",
                                        offset)
        return _dense_fast(S, teacher, labels, tp, need_grad, out, w_kd, w_lm, spec.kind == "soft_ce", offset)
    if spec.sparse_fast:
        if compiled:
            return _sparse_fast_compiled(S, ids, lp, labels, tp, need_grad, w_kd, w_lm, offset, vocab_limit)
        return _sparse_fast(S, ids, lp, labels, tp, need_grad, out, w_kd, w_lm, offset, vocab_limit)
    if valid_cols < width:  # the general kernels expect the full shard: pad with absent columns
        S = F.pad(S, (0, width - valid_cols), value=float("-inf"))
        if teacher is not None:
            teacher = F.pad(teacher, (0, width - valid_cols), value=float("-inf"))
    if kd_kernel is None:
        n = S.shape[0]
        if spec.sparse:
            k = _sparse_kernel(S, ids, lp, spec.temperature, spec.residual, tp, S.dtype)
        else:
            k = _dense_kernel(S, teacher, spec.kind, spec.temperature, spec.skew, spec.beta, tp, S.dtype)
        kd_kernel = lambda g: k(slice(0, n), g, None)  # noqa: E731
    kd, gkd = kd_kernel(need_grad and w_kd != 0.0)
    lm, glm = _lm_part(S, labels, tp, need_grad, w_lm, offset)
    if not need_grad:
        return kd, lm, None
    if gkd is not None:
        glm.add_(gkd, alpha=w_kd)
    return kd, lm, glm[:, :valid_cols]


def fused_kd_lm_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    teacher_logits: Optional[torch.Tensor] = None,
    target_ids: Optional[torch.Tensor] = None,
    target_logprobs: Optional[torch.Tensor] = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    skew: float = 0.1,
    beta: float = 0.5,
    residual: bool = False,
    target_kind: str = "logprobs",
    w_kd: float = 0.5,
    w_lm: float = 0.5,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    retain_graph: bool = False,
    compiled: bool = False,
):
    """LM cross-entropy and KD divergence of vocab-parallel logits in one pass per token chunk.

    Args:
        student_logits: [..., V_local] this TP rank's shard (padded columns may be -inf).
        labels: [...] valid global next-token ids (mask the others to any valid id first).
        loss_mask: optional [...]; 0 = token skipped (all three outputs 0 there, no gradient).
        teacher_logits: [..., V_local] dense teacher (constant), or
        target_ids / target_logprobs: [..., k] sparse targets (as :func:`sparse_kd_loss`).
        kind, temperature, skew, beta, residual, target_kind: as :func:`kd_loss` /
            :func:`sparse_kd_loss` (the LM term is always at T = 1).
        w_kd, w_lm: weights of the two terms in ``total``.
        tp_group, chunk_size, retain_graph: as :func:`kd_loss`.
        compiled: compiled chunk kernels (``kd.compile``, :func:`kd_lm_chunk`).

    Returns:
        ``(total, kd, lm)``, each [...] float32 (float64 for float64 logits): ``total = w_kd * kd
        + w_lm * lm`` differentiable w.r.t. ``student_logits``; ``kd`` and ``lm`` detached.
    """
    sparse = target_ids is not None or target_logprobs is not None
    if sparse == (teacher_logits is not None):
        raise ValueError("fused_kd_lm_loss needs either teacher_logits or target_ids+target_logprobs")
    if sparse and (target_ids is None or target_logprobs is None):
        raise ValueError("sparse KD needs both target_ids and target_logprobs")
    lead = student_logits.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels {tuple(labels.shape)} must have the logits' leading shape {tuple(lead)}")
    if not sparse and teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: both must be the same vocab shard")
    if sparse and (target_ids.shape[:-1] != lead or target_logprobs.shape != target_ids.shape):
        raise ValueError(f"sparse targets must be [..., k] with the logits' leading shape {tuple(lead)}")
    spec = kd_spec(kind, temperature, skew, beta, residual, sparse, target_kind)
    tp = resolve_tp(tp_group)
    vocab = student_logits.shape[-1]
    cdtype = compute_dtype(student_logits, teacher_logits if not sparse else target_logprobs)
    s2d = student_logits.detach().reshape(-1, vocab)
    lab = labels.reshape(-1).long()
    if sparse:
        k = target_ids.shape[-1]
        ids2d, lp2d, t2d = target_ids.reshape(-1, k).long(), target_logprobs.detach().reshape(-1, k), None
        kdk = None if spec.sparse_fast else _sparse_kernel(
            s2d, ids2d, lp2d, spec.temperature, spec.residual, tp, cdtype)
        clean = True
    else:
        ids2d = lp2d = None
        t2d = teacher_logits.detach().reshape(-1, vocab)
        clean = s2d.numel() == 0 or (bool(s2d.amin() > float("-inf")) and bool(t2d.amin() > float("-inf")))
        kdk = None if (spec.dense_fast and clean) else _dense_kernel(
            s2d, t2d, spec.kind, spec.temperature, spec.skew, spec.beta, tp, cdtype)
    n_rows = s2d.shape[0]
    kd_all = torch.zeros(n_rows, dtype=cdtype, device=s2d.device)
    lm_all = torch.zeros(n_rows, dtype=cdtype, device=s2d.device)
    ws = Workspace(vocab, s2d.device)
    w_kd, w_lm = float(w_kd), float(w_lm)

    def kernel(rows, need_grad: bool, out):
        n = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
        S = take_rows(s2d, rows, cdtype, ws.get("S", n, cdtype))
        teacher = take_rows(t2d, rows, cdtype, ws.get("T", n, cdtype)) if t2d is not None else None
        ids = take_rows(ids2d, rows, torch.int64) if sparse else None
        lp = take_rows(lp2d, rows, cdtype) if sparse else None
        kd_fn = None if kdk is None else (lambda g: kdk(rows, g, None))
        kd, lm, grad = kd_lm_chunk(spec, S, take_rows(lab, rows, torch.int64), tp, need_grad, w_kd, w_lm,
                                   teacher=teacher, ids=ids, lp=lp, out=out, clean=clean, kd_kernel=kd_fn,
                                   compiled=compiled)
        if isinstance(rows, slice):
            kd_all[rows], lm_all[rows] = kd, lm
        else:
            kd_all.index_copy_(0, rows, kd.to(cdtype))
            lm_all.index_copy_(0, rows, lm.to(cdtype))
        return w_kd * kd + w_lm * lm, grad

    chunk = auto_chunk(vocab, chunk_size, student_logits.device)
    mask = flat_mask(loss_mask, lead)
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    total = ChunkedLoss.apply(s2d if not want_grad else student_logits.reshape(-1, vocab), kernel, chunk,
                              mask, cdtype, bool(retain_graph), want_grad)
    return total.view(lead), kd_all.view(lead), lm_all.view(lead)
