"""The student's output layer fused with the LM + KD loss (:func:`fused_linear_kd`).

Chunk by chunk over tokens, ``[tokens, V]`` logits are never materialised: each chunk's logits go
through :func:`megatron_kd.losses.fused.kd_lm_chunk`, and the gradients of the final hidden states
and of the output weight are accumulated per chunk in forward (so backward is two scalings). Online,
the teacher's logits are produced per chunk from its final hidden states and output weight. Under TP
the hidden states enter through an identity whose backward all-reduces over the TP group (sequence
parallel: all-gather / reduce-scatter), like megatron's column-parallel layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_kd.losses.fused import KDSpec, kd_lm_chunk, kd_spec
from megatron_kd.losses.vocab_parallel import TPContext, all_reduce_, auto_chunk, flat_mask, resolve_tp

class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the TP group (contiguous buffer)."""

    @staticmethod
    def forward(ctx, x, tp):  # noqa: D102
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        g = g.contiguous()  # an all-reduce of a non-contiguous view's copy would be lost
        return all_reduce_(g, ctx.tp), None


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over the TP group; backward reduce-scatters (sequence parallel)."""

    @staticmethod
    def forward(ctx, x, tp):  # noqa: D102
        ctx.tp = tp
        return gather_dim0(x, tp)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        tp = ctx.tp
        g = g.contiguous()
        if tp.group is None:
            return g, None
        out = g.new_empty((g.shape[0] // tp.world_size, *g.shape[1:]))
        dist.reduce_scatter_tensor(out, g, group=tp.group)
        return out, None


def gather_dim0(x: torch.Tensor, tp: TPContext) -> torch.Tensor:
    """All-gather ``x`` along dim 0 over ``tp`` (no autograd); identity on one process."""
    if tp.group is None:
        return x
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * tp.world_size, *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=tp.group)
    return out


LINEAR_MIN_TOKENS = {"cpu": 64, "cuda": 1024}
"""Smallest automatic fused-linear chunk: every chunk streams the whole output weight (and its fp32
gradient) through memory, so a chunk needs enough tokens for the matmuls to stay compute-bound
(about 6 x tokens flops per 12 bytes moved per weight element; GPUs need ~500+ tokens)."""


def linear_chunk_tokens(valid_cols: int, chunk_tokens: Optional[int], device: torch.device) -> int:
    """Tokens per fused-linear chunk: ``chunk_tokens``, else the KD kernels' element budget but at
    least :data:`LINEAR_MIN_TOKENS` (scratch: about three fp32 [chunk, V_local] buffers)."""
    if chunk_tokens is not None:
        return auto_chunk(max(valid_cols, 1), chunk_tokens, device)
    floor = LINEAR_MIN_TOKENS["cuda" if device.type == "cuda" else "cpu"]
    return max(floor, auto_chunk(max(valid_cols, 1), None, device))


class FusedLinearLoss(torch.autograd.Function):
    """``sum_tokens w_kd KD + w_lm LM`` of ``hidden @ weight[:valid].T`` chunk by chunk (module doc).

    forward(hidden2d [N, H], weight [V_local, H], labels [N], rows (active token indices), spec,
    w_kd, w_lm, valid_cols, chunk, tp, teacher_hidden2d, teacher_weight, ids2d, lp2d, want_grad, vocab_limit,
    compiled)
    -> (total, kd_sum, lm_sum) scalars (cdtype); only ``total`` carries a gradient. Columns from
    ``valid_cols`` on (padded vocabulary) take no part (as -inf logits would). The gradients of
    ``hidden2d`` and ``weight`` are computed in forward, chunk by chunk; the weight's gradient is
    accumulated in float32 (float64 for float64 weights).
    """

    @staticmethod
    def forward(ctx, hidden2d, weight, labels, rows, spec, w_kd, w_lm, valid_cols, chunk, tp,
                teacher_hidden2d, teacher_weight, ids2d, lp2d, want_grad, vocab_limit, compiled):  # noqa: D102
        need_h = bool(want_grad and ctx.needs_input_grad[0])
        need_w = bool(want_grad and ctx.needs_input_grad[1])
        need_grad = need_h or need_w
        cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        W = weight[:valid_cols]
        Wt = teacher_weight[:valid_cols] if teacher_weight is not None else None
        gh = torch.zeros_like(hidden2d) if need_h else None
        gw = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if need_w else None
        sums = torch.zeros(3, dtype=cdtype, device=hidden2d.device)
        # CPU: the [chunk, V] scratch is allocated once per call, not per chunk. At V = 151,936 a chunk
        # buffer (~39 MB) is above glibc's largest mmap threshold (32 MiB), so every fresh one is a new
        # mapping whose pages fault in again (a CUDA caching allocator reuses blocks by itself).
        reuse = hidden2d.device.type == "cpu" and weight.dtype == cdtype and not compiled
        rows_max = min(chunk, rows.numel())
        s_buf = torch.empty(rows_max, valid_cols, dtype=cdtype, device=weight.device) if reuse else None
        t_buf = (torch.empty_like(s_buf) if reuse and Wt is not None and Wt.dtype == cdtype else None)
        # A separate gradient buffer only where the kernel needs one (online: S is its scratch). The LM-only
        # and sparse-target kernels overwrite S in place: a second [chunk, V] buffer would double the working
        # set (2 x 16 MB at V = 8,192, over a 32 MiB L3) and cost the offline step ~8% (issue 15).
        g_buf = torch.empty_like(s_buf) if reuse and need_grad and Wt is not None else None
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            n = idx.numel()
            h = hidden2d.index_select(0, idx).to(weight.dtype)  # Float16Module hands fp32 hidden states over
            S = torch.matmul(h, W.t(), out=s_buf[:n]) if reuse else torch.matmul(h, W.t()).to(cdtype)
            teacher = ids = lp = None
            if Wt is not None:
                th = teacher_hidden2d.index_select(0, idx).to(Wt.dtype)
                teacher = (torch.matmul(th, Wt.t(), out=t_buf[:n]) if t_buf is not None
                           else torch.matmul(th, Wt.t()).to(cdtype))
            elif ids2d is not None:
                ids, lp = ids2d.index_select(0, idx), lp2d.index_select(0, idx).to(cdtype)
            kd, lm, G = kd_lm_chunk(spec, S, labels.index_select(0, idx), tp, need_grad, w_kd, w_lm,
                                    teacher=teacher, ids=ids, lp=lp, width=weight.shape[0],
                                    out=g_buf[:n] if g_buf is not None else None,
                                    vocab_limit=vocab_limit, compiled=compiled)
            sums += torch.stack((w_kd * kd.sum() + w_lm * lm.sum(), kd.sum(), lm.sum()))
            if need_grad:
                Gw = G.to(weight.dtype)
                if need_h:
                    gh.index_copy_(0, idx, torch.matmul(Gw, W).to(gh.dtype))
                if need_w:
                    if gw.dtype == Gw.dtype:
                        gw[:valid_cols].addmm_(Gw.t(), h.to(gw.dtype))
                    else:
                        gw[:valid_cols].add_(torch.matmul(Gw.t(), h.to(Gw.dtype)))
        ctx.grads = (gh, gw)
        ctx.weight_dtype = weight.dtype
        return sums[0].clone(), sums[1].clone(), sums[2].clone()

    @staticmethod
    def backward(ctx, g_total, _g_kd, _g_lm):  # noqa: D102
        gh, gw = ctx.grads
        if gh is None and gw is None and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            raise RuntimeError("fused linear KD backward ran twice on one graph (or under no_grad)")
        ctx.grads = (None, None)
        if gh is not None:
            gh = gh.mul_(g_total.to(gh.dtype))
        if gw is not None:
            gw = gw.mul_(g_total.to(gw.dtype)).to(ctx.weight_dtype)
        return (gh, gw) + (None,) * 15


def fused_linear_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: Optional[torch.Tensor] = None,
    *,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
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
    vocab_size: Optional[int] = None,
    sequence_parallel: bool = False,
    chunk_tokens: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] = None,
    compiled: bool = False,
):
    """Student output layer + LM/KD loss without materialising the [tokens, V] logits.

    Args:
        hidden: [b, s, H] the student's final hidden states (after the final norm), tokens in the
            labels' order; with ``sequence_parallel`` this rank's [b, s/tp, H] sequence shard.
        weight: [V_local, H] the student's output weight shard (tied: the embedding's).
        labels: [b, s] global next-token ids; loss_mask: [b, s] (0 / ignored tokens skipped).
        teacher_hidden / teacher_weight: the online teacher's final hidden states (same layout as
            ``hidden``) and output weight shard [V_t_local, H_t] (constants), or
        target_ids / target_logprobs: [b, s, k] sparse targets, or neither (LM only, w_kd ignored).
        kind ... target_kind: as :func:`fused_kd_lm_loss`.
        w_kd, w_lm: weights of the summed terms.
        vocab_size: real vocabulary (global ids); columns from it on are padding and take no part.
        sequence_parallel: ``hidden``/``teacher_hidden`` are sequence shards (all-gathered here).
        chunk_tokens: tokens per chunk (None: about 4M logits per CPU thread, 32M on GPUs).
        tp_group: as :func:`kd_loss`.
        compiled: compiled chunk kernels (``kd.compile``, :func:`kd_lm_chunk`).

    Returns:
        ``(total, kd_sum, lm_sum)`` scalars over the unmasked tokens: ``total = w_kd kd_sum + w_lm
        lm_sum`` differentiable w.r.t. ``hidden`` and ``weight``; the other two detached.
    """
    tp = resolve_tp(tp_group)
    sparse = target_ids is not None or target_logprobs is not None
    dense = teacher_hidden is not None or teacher_weight is not None
    if sparse and dense:
        raise ValueError("give either a teacher (hidden + weight) or sparse targets, not both")
    if dense and (teacher_hidden is None or teacher_weight is None):
        raise ValueError("the online teacher needs both teacher_hidden and teacher_weight")
    if sparse and (target_ids is None or target_logprobs is None):
        raise ValueError("sparse KD needs both target_ids and target_logprobs")
    if not (sparse or dense):
        w_kd = 0.0
    spec = kd_spec(kind, temperature, skew, beta, residual, sparse, target_kind) if (sparse or dense) else \
        KDSpec("none")
    v_local = weight.shape[0]
    if vocab_size is None:
        vocab_size = v_local * tp.world_size
    valid = max(0, min(v_local, vocab_size - tp.vocab_offset(v_local)))
    if valid == 0:
        raise ValueError(f"vocab shard {tp.rank} holds only padded columns (vocab_size={vocab_size}, "
                         f"V_local={v_local}): use a smaller tensor-parallel size")
    if dense and teacher_weight.shape[0] < valid:
        raise ValueError(f"teacher output shard has {teacher_weight.shape[0]} rows, fewer than the "
                         f"{valid} real vocabulary columns of the student's shard")
    if sequence_parallel and tp.group is not None:
        hidden = _GatherSeq.apply(hidden.transpose(0, 1), tp).transpose(0, 1)
        if dense:
            teacher_hidden = gather_dim0(teacher_hidden.detach().transpose(0, 1), tp).transpose(0, 1)
    elif tp.group is not None:
        hidden = _CopyToTP.apply(hidden, tp)
    lead = labels.shape
    if tuple(hidden.shape[:-1]) != tuple(lead):
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(lead)}")
    h2d = hidden.reshape(-1, hidden.shape[-1])
    mask = flat_mask(loss_mask, lead)
    rows = (torch.nonzero(mask, as_tuple=False).reshape(-1) if mask is not None
            else torch.arange(labels.numel(), device=labels.device))
    th2d = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]) if dense else None
    ids2d = target_ids.reshape(-1, target_ids.shape[-1]).long() if sparse else None
    lp2d = target_logprobs.detach().reshape(-1, target_ids.shape[-1]) if sparse else None
    chunk = linear_chunk_tokens(valid, chunk_tokens, weight.device)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total, kd_sum, lm_sum = FusedLinearLoss.apply(
        h2d, weight, labels.reshape(-1).long(), rows, spec, float(w_kd), float(w_lm), valid, chunk, tp,
        th2d, teacher_weight.detach() if dense else None, ids2d, lp2d, want_grad, int(vocab_size),
        bool(compiled))
    return total, kd_sum.detach(), lm_sum.detach()
