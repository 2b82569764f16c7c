"""Dense (full-vocabulary) distillation divergences, vocab-parallel and chunked over tokens.

With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)`` over the (TP-sharded)
vocabulary, :func:`kd_loss` returns the per-token value of one of :data:`KINDS`:

=================== ==========================================================================
``forward_kl``      KL(p || q) = sum p (log p - log q)
``reverse_kl``      KL(q || p) = sum q (log q - log p)
``skew_forward_kl`` KL(p || a p + (1-a) q), a = ``skew``                      (DistiLLM)
``skew_reverse_kl`` KL(q || a q + (1-a) p), a = ``skew``                      (DistiLLM)
``jsd``             b KL(p || m) + (1-b) KL(q || m), m = b p + (1-b) q, b = ``beta`` (GKD);
                    at the endpoints (TRL's ``generalized_jsd_loss``) b = 0 is KL(p || q)
                    and b = 1 is KL(q || p), not the (identically 0) mixture formula
``tvd``             1/2 sum |p - q|
``soft_ce``         -sum p log q  (= forward KL + teacher entropy; same gradient)
``mse``             mean over the vocabulary of (student/T - teacher/T)^2
=================== ==========================================================================

No T^2 factor is applied here (see :class:`megatron_kd.losses.KDLossConfig.t2_scale`).

Absent columns: a vocabulary column whose student *or* teacher logit is -inf (megatron's padded
vocabulary columns, see :func:`megatron_kd.models.mask_padded_vocab`) is dropped from both
distributions, which are renormalised over the remaining columns. For padded columns (-inf in
both) this is exactly the unpadded result; a -inf student logit where the teacher has mass gives
a finite loss instead of inf/NaN. A token whose columns are all absent has loss 0.

Gradients (analytic, computed chunk by chunk in forward, see :class:`ChunkedLoss`) flow to the
student logits only; the teacher is treated as a constant and gets no gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron_kd.losses.vocab_parallel import (
    Rows,
    TPContext,
    Workspace,
    all_reduce_,
    auto_chunk,
    compute_dtype,
    resolve_tp,
    run_chunked,
    take_rows,
)

KINDS = ("forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tvd",
         "soft_ce", "mse")
"""The divergences :func:`kd_loss` implements."""

ABSENT = -1e30
"""Finite stand-in for -inf logits of absent columns: exp() of it is exactly 0 after the max
shift, and differences between two absent entries are 0 instead of NaN."""


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two [n, V] tensors -> [n]."""
    return torch.linalg.vecdot(a, b)


def _mask_absent(S: torch.Tensor, Tt: torch.Tensor, ws: Workspace) -> Optional[torch.Tensor]:
    """Set columns that are -inf on either side to :data:`ABSENT` on both; return that mask.

    Returns None, building no mask, when neither chunk holds a -inf (two min-reductions; on CPU
    only - on GPUs the test would be a host sync, so the mask is always built there).
    """
    if S.device.type == "cpu" and bool(S.amin() > float("-inf")) and bool(Tt.amin() > float("-inf")):
        return None
    n = S.shape[0]
    absent = torch.isneginf(S, out=ws.get("absent", n, torch.bool))
    absent |= torch.isneginf(Tt, out=ws.get("absent_t", n, torch.bool))
    S.masked_fill_(absent, ABSENT)
    Tt.masked_fill_(absent, ABSENT)
    return absent


def _exp_sums(S: torch.Tensor, Tt: torch.Tensor, tp: TPContext):
    """exp() of the max-shifted S, Tt and their global row sums."""
    Es, Et = torch.exp(S), torch.exp(Tt)
    z = all_reduce_(torch.stack((Es.sum(-1), Et.sum(-1))), tp)
    return Es, Et, z[0], z[1]


def _probs(S: torch.Tensor, Tt: torch.Tensor, tp: TPContext):
    """(p, q, log p, log q), all [n, V_local]; S and Tt are overwritten by log q and log p."""
    Es, Et, zs, zt = _exp_sums(S, Tt, tp)
    lq = S.sub_(zs.log().unsqueeze(-1))
    lp = Tt.sub_(zt.log().unsqueeze(-1))
    return Et.div_(zt.unsqueeze(-1)), Es.div_(zs.unsqueeze(-1)), lp, lq


def _kl_family(kind: str, S, Tt, smax, tp: TPContext, need_grad: bool, out, inv_t: float,
               ws: Workspace):
    """forward_kl, soft_ce, reverse_kl: loss and d loss / d student logits (1/T included).

    The hot path. exp(s) goes straight into ``out`` (the gradient buffer's rows, when given), the
    shifted student logits become D = t - s, the teacher's are exponentiated in place, and the
    probabilities are never normalised in a separate pass: two [n, V_local] scratch buffers.
    """
    Es = torch.exp(S, out=ws.get("exp_s", S.shape[0], S.dtype) if out is None else out)
    D = S if kind == "soft_ce" else torch.sub(Tt, S, out=S)  # log p - log q + const per row
    Et = Tt.exp_()
    z = all_reduce_(torch.stack((Es.sum(-1), Et.sum(-1))), tp)
    zs, zt = z[0], z[1]
    lzs, lzt = zs.log(), zt.log()
    if kind == "reverse_kl":  # Et is only needed for its sum: reuse it for the product
        qd = all_reduce_(torch.mul(Es, D, out=Et).sum(-1) / zs, tp)
        loss = lzt - lzs - qd
        if not need_grad:
            return loss, None
        D.sub_(qd.unsqueeze(-1)).mul_((-inv_t / zs).unsqueeze(-1))  # (sum q D - D) / (T zs)
        return loss, Es.mul_(D)
    part = all_reduce_(D.mul_(Et).sum(-1) / zt, tp)  # D is dead after this dot product
    if kind == "soft_ce":  # D held the shifted student logits
        loss = torch.where(smax > ABSENT, lzs - part, 0.0)  # all columns absent: 0, not log V
    else:
        loss = part - lzt + lzs
    if not need_grad:
        return loss, None
    Es.mul_((inv_t / zs).unsqueeze(-1))  # q / T
    return loss, Es.addcmul_(Et, (-inv_t / zt).unsqueeze(-1))  # - p / T


def _skew_forward(a: float, S, Tt, tp: TPContext, need_grad: bool):
    p, q, lp, lq = _probs(S, Tt, tp)
    tiny = torch.finfo(S.dtype).tiny
    r = q.mul(1.0 - a).add_(p, alpha=a).clamp_min_(tiny)
    ratio = torch.div(p, r)
    lp.sub_(r.log_())
    red = all_reduce_(torch.stack((_dot(p, lp), _dot(q, ratio))), tp)
    grad = None
    if need_grad:  # d/dS = -(1-a) q (p/r - sum q p/r)
        grad = q.mul_(ratio.sub_(red[1].unsqueeze(-1)).mul_(-(1.0 - a)))
    return red[0], grad


def _skew_reverse(a: float, S, Tt, tp: TPContext, need_grad: bool):
    p, q, lp, lq = _probs(S, Tt, tp)
    tiny = torch.finfo(S.dtype).tiny
    r = p.mul_(1.0 - a).add_(q, alpha=a).clamp_min_(tiny)
    qr = torch.div(q, r)
    lq.sub_(r.log_())
    red = all_reduce_(torch.stack((_dot(q, lq), _dot(q, qr))), tp)
    loss = red[0]
    grad = None
    if need_grad:  # d/dS = q (log q - log r - a q/r - L + a sum q^2/r)
        lq.sub_(qr, alpha=a).sub_((loss - a * red[1]).unsqueeze(-1))
        grad = q.mul_(lq)
    return loss, grad


def _jsd(b: float, S, Tt, tp: TPContext, need_grad: bool):
    p, q, lp, lq = _probs(S, Tt, tp)
    tiny = torch.finfo(S.dtype).tiny
    lm = p.mul(b).add_(q, alpha=1.0 - b).clamp_min_(tiny).log_()
    red = all_reduce_(torch.stack((_dot(p, lp.sub_(lm)), _dot(q, lq.sub_(lm)))), tp)
    loss = b * red[0] + (1.0 - b) * red[1]
    grad = None
    if need_grad:  # d/dS = (1-b) q (log q - log m - KL(q||m))
        grad = q.mul_(lq.sub_(red[1].unsqueeze(-1)).mul_(1.0 - b))
    return loss, grad


def _tvd(S, Tt, tp: TPContext, need_grad: bool):
    Es, Et, zs, zt = _exp_sums(S, Tt, tp)
    q = Es.div_(zs.unsqueeze(-1))
    d = torch.sub(q, Et.div_(zt.unsqueeze(-1)))
    sg = torch.sign(d)
    red = all_reduce_(torch.stack((_dot(sg, d), _dot(q, sg))), tp)
    grad = q.mul_(sg.sub_(red[1].unsqueeze(-1)).mul_(0.5)) if need_grad else None
    return 0.5 * red[0], grad


def _mse(S, Tt, absent: Optional[torch.Tensor], tp: TPContext, need_grad: bool):
    d = S.sub_(Tt)
    present = torch.full(S.shape[:1], float(S.shape[-1]), dtype=S.dtype, device=S.device)
    if absent is not None:
        present -= absent.sum(-1).to(S.dtype)
    red = all_reduce_(torch.stack((_dot(d, d), present)), tp)
    count = red[1].clamp_min(1.0)
    grad = d.mul_((2.0 / count).unsqueeze(-1)) if need_grad else None
    return red[0] / count, grad


def _dense_kernel(student2d, teacher2d, kind, temperature, skew, beta, tp, cdtype):
    inv_t = 1.0 / temperature
    ws = Workspace(student2d.shape[-1], student2d.device)
    # One check per call (one host sync on GPUs): without any -inf the per-chunk absent-column
    # handling is skipped and copy, temperature and max shift fuse into one kernel per input.
    clean = student2d.numel() == 0 or (
        bool(student2d.amin() > float("-inf")) and bool(teacher2d.amin() > float("-inf"))
    )

    def tempered(rows: Rows, n: int):
        """Fresh tempered copies of the rows, absent columns set to ABSENT, and that mask."""
        S = take_rows(student2d, rows, cdtype, ws.get("s", n, cdtype))
        Tt = take_rows(teacher2d, rows, cdtype, ws.get("t", n, cdtype))
        if inv_t != 1.0:
            S.mul_(inv_t)
            Tt.mul_(inv_t)
        return S, Tt, _mask_absent(S, Tt, ws)

    def shifted(rows: Rows, n: int):
        """Tempered rows minus their global (TP) row max, and that max [2, n]."""
        if not clean:
            S, Tt, _ = tempered(rows, n)
            mx = all_reduce_(torch.stack((S.amax(-1), Tt.amax(-1))), tp, "max")
            return S.sub_(mx[0].unsqueeze(-1)), Tt.sub_(mx[1].unsqueeze(-1)), mx
        xs = student2d[rows] if isinstance(rows, slice) else student2d.index_select(0, rows)
        xt = teacher2d[rows] if isinstance(rows, slice) else teacher2d.index_select(0, rows)
        mx = torch.stack((xs.amax(-1).to(cdtype), xt.amax(-1).to(cdtype))).mul_(inv_t)
        all_reduce_(mx, tp, "max")
        S = torch.add(mx[0].neg().unsqueeze(-1), xs, alpha=inv_t, out=ws.get("s", n, cdtype))
        Tt = torch.add(mx[1].neg().unsqueeze(-1), xt, alpha=inv_t, out=ws.get("t", n, cdtype))
        return S, Tt, mx

    def kernel(rows: Rows, need_grad: bool, out: Optional[torch.Tensor]):
        n = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
        if kind == "mse":
            S, Tt, absent = tempered(rows, n)
            loss, grad = _mse(S, Tt, absent, tp, need_grad)
        else:
            S, Tt, mx = shifted(rows, n)
            if kind in ("forward_kl", "reverse_kl", "soft_ce"):
                return _kl_family(kind, S, Tt, mx[0], tp, need_grad, out, inv_t, ws)
            if kind == "skew_forward_kl":
                loss, grad = _skew_forward(skew, S, Tt, tp, need_grad)
            elif kind == "skew_reverse_kl":
                loss, grad = _skew_reverse(skew, S, Tt, tp, need_grad)
            elif kind == "jsd":
                loss, grad = _jsd(beta, S, Tt, tp, need_grad)
            else:
                loss, grad = _tvd(S, Tt, tp, need_grad)
        if grad is not None and inv_t != 1.0:
            grad.mul_(inv_t)
        return loss, grad  # ChunkedLoss copies it into the gradient buffer

    return kernel


def check_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature`` is a finite positive number."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")


def normalize_kind(kind: str, skew: float, beta: float) -> str:
    """``kind`` with its degenerate settings replaced by the plain divergence they equal (skew 0 ->
    the unskewed KL; JSD at beta 0 / 1 -> forward / reverse KL, TRL's endpoint limits); raises a
    one-line ``ValueError`` for skew or beta outside [0, 1]."""
    for name, val in (("skew", skew), ("beta", beta)):
        if not 0.0 <= float(val) <= 1.0:
            raise ValueError(f"{name}={val!r} must lie in [0, 1]")
    if kind in ("skew_forward_kl", "skew_reverse_kl") and skew == 0.0:
        return kind[len("skew_"):]
    if kind == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return kind


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    skew: float = 0.1,
    beta: float = 0.5,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    retain_graph: bool = False,
) -> torch.Tensor:
    """Per-token distillation divergence between student and teacher logits (see :data:`KINDS`).

    Args:
        student_logits: [..., V_local] this TP rank's vocabulary shard (megatron's [s, b, V/tp],
            or any leading shape); fp32/bf16/fp16 (maths in fp32 per chunk; fp64 stays fp64).
        teacher_logits: same shape as ``student_logits``; treated as a constant (no gradient).
        kind: one of :data:`KINDS`.
        temperature: T > 0; both distributions are softmax(logits / T). No T^2 factor.
        skew: a in [0, 1] for ``skew_forward_kl`` / ``skew_reverse_kl`` (0 = plain KL).
        beta: b in [0, 1] for ``jsd``; 0 = forward KL, 1 = reverse KL (TRL's GKD convention).
        loss_mask: optional [...] tensor; tokens where it is 0 get loss 0 and gradient 0 and are
            skipped entirely (must be identical on all TP ranks).
        tp_group: TP group the vocabulary is split over; ``None``: megatron's TP group when
            model parallel is initialised with TP > 1, else a single process.
        chunk_size: tokens per chunk; ``None``: ~4M logits per CPU thread (up to 4), 32M on GPUs
            (:func:`~megatron_kd.losses.vocab_parallel.auto_chunk`). Peak scratch memory
            is a few [chunk, V_local] fp32 buffers plus one gradient shaped like the logits.
        retain_graph: allow more than one backward through the result (``retain_graph=True``,
            ``torch.autograd.gradcheck``); costs one more logits-sized tensor per backward.

    Returns:
        [...] per-token loss in nats, float32 (float64 for float64 inputs), identical on every
        TP rank. Differentiable with respect to ``student_logits`` (one backward per forward).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; choose one of {', '.join(KINDS)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: both must be the same vocab shard "
            f"(slice both to the common vocabulary if the teacher's is larger)"
        )
    check_temperature(temperature)
    kind = normalize_kind(kind, skew, beta)
    tp = resolve_tp(tp_group)
    cdtype = compute_dtype(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    kernel = _dense_kernel(
        student_logits.detach().reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab),
        kind, float(temperature), float(skew), float(beta), tp, cdtype,
    )
    chunk = auto_chunk(vocab, chunk_size, student_logits.device)
    return run_chunked(student_logits, kernel, chunk, loss_mask, cdtype,
                       retain_graph)
