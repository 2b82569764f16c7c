"""Sparse (top-k / top-p truncated) teacher targets against full, vocab-parallel student logits.

The teacher-logits store keeps, per token, ``k`` vocabulary ids and the teacher's log-probs of
those ids, normalised over the *full* vocabulary at temperature 1. :func:`sparse_kd_loss`
compares them with the student's full softmax ``q = softmax(student / T)``:

* ``residual=False`` (the paper's truncate-then-renormalise target, Peng et al. 2024): the teacher
  target is renormalised over the kept ids and re-tempered,
  ``p(v) = exp(lp(v) / T) / sum_kept exp(lp / T)``, and
  ``loss = sum_kept p (log p - log q)``. With all ids kept this equals
  ``kd_loss(kind="forward_kl")``.
* ``residual=True`` (T must be 1): the kept mass stays as stored, ``p(v) = exp(lp(v))``, and the
  rest ``R_p = 1 - sum_kept p`` goes to one extra bucket matched against the student's mass
  outside the kept ids, ``R_q = 1 - sum_kept q``:
  ``loss = sum_kept p (log p - log q) + R_p (log R_p - log R_q)``. ``R_q`` is summed directly over
  the non-kept columns (no ``1 - x`` cancellation). When the student has exactly zero mass
  outside the kept ids (the ids cover its whole support) the bucket is dropped.

* ``target_kind="weights"`` (sampled stores, ``--method sample|topk+sample``): ``target_logprobs``
  holds *log target weights* ``log w_i`` (``sum w = 1`` per token; the estimator ``sum_i w_i
  delta_i`` of the teacher distribution) and the loss is the soft cross-entropy against them
  minus its (constant) entropy, ``loss = sum_i w_i (log w_i - log q_i)``, with gradient
  ``q - w``. It is unbiased: ``E[w] = p`` makes the expected gradient the dense forward-KL
  gradient ``q - p``. Weights are never re-tempered (T must be 1, residual False).

Padding and absent entries: ids < 0 (the store's -1 padding) and ids >= the global vocabulary are
ignored; ids whose student logit is -inf (padded vocabulary columns) are absent and dropped (in
residual mode their teacher mass falls into the bucket). A token with no usable id has loss 0 in
both modes. Ids must be unique per token (a repeated id counts twice).

Vocab parallel: each rank looks the kept ids up in its own shard; one all-reduce per chunk sums
the student's exp-sums and the [n, k] gathered student logits (each id is owned by one rank),
after one all-reduce of the row max. Teacher targets are identical on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_kd.losses.divergences import check_temperature
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


TARGET_KINDS = ("logprobs", "weights")
"""What ``target_logprobs`` holds: teacher log-probs (top-k) or log target weights (sampled)."""


def _sparse_kernel(student2d, ids2d, lp2d, temperature, residual, tp: TPContext, cdtype):
    inv_t = 1.0 / temperature
    v_local = student2d.shape[-1]
    v_total = v_local * tp.world_size
    offset = tp.vocab_offset(v_local)
    tiny = torch.finfo(cdtype).tiny

    ws = Workspace(v_local, student2d.device)

    def kernel(rows: Rows, need_grad: bool, out: Optional[torch.Tensor]):
        n = rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
        S = take_rows(student2d, rows, cdtype, ws.get("s", n, cdtype))
        if inv_t != 1.0:
            S.mul_(inv_t)
        ids = take_rows(ids2d, rows, torch.int64)
        lp = take_rows(lp2d, rows, cdtype)
        valid = (ids >= 0) & (ids < v_total)
        local = ids - offset
        owned = valid & (local >= 0) & (local < v_local)
        lidx = torch.where(owned, local, 0)

        smax = all_reduce_(S.amax(-1), tp, "max")
        smax = torch.where(torch.isfinite(smax), smax, 0.0)  # an all -inf row stays harmless
        S.sub_(smax.unsqueeze(-1))
        sv = torch.where(owned, S.gather(-1, lidx), 0.0)
        E = S.exp_()  # S itself is not needed any more
        sums = [E.sum(-1, keepdim=True)]
        if residual:  # zero the kept columns (prod-scatter: deterministic with repeated indices)
            E.scatter_reduce_(-1, lidx, (~owned).to(cdtype), reduce="prod")
            sums.append(E.sum(-1, keepdim=True))
        red = all_reduce_(torch.cat(sums + [sv], dim=-1), tp)
        zs = red[:, 0]
        sv = red[:, len(sums):]
        present = valid & (sv > float("-inf"))
        zs = torch.where(zs > 0, zs, 1.0)
        lq = torch.where(present, sv - zs.log().unsqueeze(-1), 0.0)  # log q at the kept ids
        apply = owned & present

        if not residual:
            a = torch.where(present, lp * inv_t, float("-inf"))
            amax = a.amax(-1)
            amax = torch.where(torch.isfinite(amax), amax, 0.0)
            e = torch.exp(a - amax.unsqueeze(-1))
            z = e.sum(-1)
            has = z > 0  # at least one kept id with teacher mass
            z = torch.where(has, z, 1.0)
            p = e / z.unsqueeze(-1)
            lp_hat = a - (amax + z.log()).unsqueeze(-1)
            loss = torch.where(p > 0, p * (lp_hat - lq), 0.0).sum(-1)
            if not need_grad:
                return loss, None
            scale = has.to(cdtype) * inv_t / zs  # q / T, or 0 for target-less rows
            grad = torch.mul(E, scale.unsqueeze(-1), out=E if out is None else out)
            return loss, grad.scatter_add_(-1, lidx, torch.where(apply, -p * inv_t, 0.0))
        else:
            rest = red[:, 1]
            p = torch.where(present, lp.exp(), 0.0)
            p_kept = p.sum(-1)
            r_p = (1.0 - p_kept).clamp_min(0.0)
            r_q = rest / zs
            bucket = r_q > 0
            rho = torch.where(bucket, r_p / r_q.clamp_min(tiny), 0.0)
            kept = torch.where(p > 0, p * (lp - lq), 0.0).sum(-1)
            tail = torch.where(
                bucket & (r_p > 0), r_p * (r_p.clamp_min(tiny).log() - r_q.clamp_min(tiny).log()), 0.0
            )
            loss = kept + tail
            if not need_grad:
                return loss, None
            # d/dS_j = c q_j + [j kept] (rho q_j - p_j), c = P_K - rho Q_K (= P_K + R_p - rho).
            c = torch.where(bucket, p_kept + r_p - rho, p_kept)
            q = torch.where(present, lq.exp(), 0.0)
            # kept columns are already 0 in E; T = 1 in residual mode
            grad = torch.mul(E, (c / zs).unsqueeze(-1), out=E if out is None else out)
            kept_grad = (c + rho).unsqueeze(-1) * q - p
            return loss, grad.scatter_add_(-1, lidx, torch.where(apply, kept_grad, 0.0))

    return kernel


def sparse_kd_loss(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    temperature: float = 1.0,
    residual: bool = False,
    *,
    loss_mask: Optional[torch.Tensor] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    retain_graph: bool = False,
    target_kind: str = "logprobs",
) -> torch.Tensor:
    """Per-token forward KL from a sparse (top-k) teacher target to the student's full softmax.

    Args:
        student_logits: [..., V_local] this TP rank's vocabulary shard (any leading shape).
        target_ids: [..., k] integer global vocabulary ids; -1 (any negative) = padding.
            Identical on every TP rank; ids must be unique per token.
        target_logprobs: [..., k] teacher log-probs of those ids, normalised over the full
            vocabulary at temperature 1 (what the logits store holds); any float dtype.
        temperature: T > 0. Non-residual: target re-tempered as softmax(logprob / T) over the
            kept ids, student softmax(logits / T). Residual mode requires T == 1.
        residual: keep the stored mass un-renormalised plus one remainder bucket (module doc).
        loss_mask: optional [...]; 0 = token skipped (loss 0, gradient 0).
        tp_group: as in :func:`megatron_kd.losses.kd_loss`.
        chunk_size: tokens per chunk (``None``: see :func:`~megatron_kd.losses.vocab_parallel.auto_chunk`).
        retain_graph: allow more than one backward through the result (see ``kd_loss``).
        target_kind: "logprobs" (top-k stores: ``target_logprobs`` are teacher log-probs) or
            "weights" (sampled stores: log target weights; soft cross-entropy, T = 1, no residual).

    Returns:
        [...] per-token loss in nats, float32 (float64 for float64 logits); gradients flow to
        ``student_logits`` only.
    """
    lead = student_logits.shape[:-1]
    if target_ids.shape[:-1] != lead or target_logprobs.shape != target_ids.shape:
        raise ValueError(
            f"sparse targets must be [..., k] with the logits' leading shape {tuple(lead)}: got "
            f"target_ids {tuple(target_ids.shape)}, target_logprobs {tuple(target_logprobs.shape)}"
        )
    if target_ids.shape[-1] == 0:
        raise ValueError("target_ids has k=0 columns: a sparse target needs at least one id")
    if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
        raise ValueError(f"target_ids must be an integer tensor, got {target_ids.dtype}")
    check_temperature(temperature)
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"target_kind={target_kind!r} is not one of {', '.join(TARGET_KINDS)}")
    if target_kind == "weights" and (temperature != 1.0 or residual):
        raise ValueError(
            f"weighted (sampled) targets estimate the teacher at T=1 and sum to 1: they need temperature=1 "
            f"and residual=False (got temperature={temperature}, residual={residual}): set kd.temperature=1, "
            f"kd.residual=false"
        )
    if residual and temperature != 1.0:
        raise ValueError(
            f"residual=True needs temperature=1 (got {temperature}): the stored log-probs are "
            f"normalised at T=1 and the remainder bucket cannot be re-tempered"
        )
    tp = resolve_tp(tp_group)
    cdtype = compute_dtype(student_logits, target_logprobs)
    vocab = student_logits.shape[-1]
    k = target_ids.shape[-1]
    kernel = _sparse_kernel(
        student_logits.detach().reshape(-1, vocab), target_ids.reshape(-1, k),
        target_logprobs.detach().reshape(-1, k), float(temperature), bool(residual), tp, cdtype,
    )
    chunk = auto_chunk(vocab, chunk_size, student_logits.device)
    return run_chunked(student_logits, kernel, chunk, loss_mask, cdtype,
                       retain_graph)
