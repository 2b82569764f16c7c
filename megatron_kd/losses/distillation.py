"""The distillation loss layer: ``(1 - alpha) * LM + alpha * KD`` in megatron's 3-tuple form.

Both :class:`DistillationLoss` and :func:`lm_loss_func` return what a megatron-core
``forward_step_func``'s ``loss_func`` may return with ``config.calculate_per_token_loss=True``
(set by :func:`megatron_kd.models.build_gpt_model`)::

    (loss_sum, num_tokens, report)

* ``loss_sum``: scalar tensor, the *sum* over this micro-batch's unmasked tokens of the per-token
  total loss (with autograd). The schedule sums ``num_tokens`` over micro-batches and
  ``finalize_model_grads`` divides the gradients by that total, i.e. a per-token mean.
* ``num_tokens``: scalar ``torch.int`` tensor, the number of unmasked tokens.
* ``report``: dict of detached float32 tensors of shape [2] = ``[sum, count]`` (Megatron-LM's
  convention: sum them over micro-batches and data-parallel ranks, then ``sum / count`` is the
  per-token mean). Keys: ``lm`` (cross-entropy at T=1), ``kd`` (the divergence, without the T^2
  factor; absent when no teacher was given), ``total`` (what ``loss_sum`` holds; its mean is the
  training loss) and ``alpha`` (``[alpha, 1]``: the mean over micro-batches is alpha).
  All values are per micro-batch and local to this data-parallel rank; every TP rank holds the
  same values.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_kd.losses.config import KDLossConfig
from megatron_kd.losses.divergences import kd_loss
from megatron_kd.losses.fused import fused_kd_lm_loss
from megatron_kd.losses.fused_linear import fused_linear_kd
from megatron_kd.losses.schedules import alpha_at
from megatron_kd.losses.sparse import sparse_kd_loss


def _megatron_tp_active() -> bool:
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # not imported: not initialised
    return parallel_state is not None and parallel_state.model_parallel_is_initialized()


def lm_per_token(logits: torch.Tensor, labels: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Per-token cross-entropy [...] (float32) of vocab-parallel ``logits`` [..., V/tp].

    Uses megatron's ``tensor_parallel.vocab_parallel_cross_entropy`` when megatron's parallel
    state is initialised (any TP size), else ``torch.nn.functional.cross_entropy`` (single
    process). ``labels`` must be valid global ids (mask the others before calling).

    -inf logits (padded vocabulary columns) are safe in both: the row max is finite, exp(-inf)=0
    gives them zero probability and zero gradient. megatron's CE overwrites fp32 logits in place
    (it reuses them for the softmax); unless ``inplace`` it is given a copy of fp32 logits.
    """
    if _megatron_tp_active():
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        if logits.dtype == torch.float32 and not inplace:
            logits = logits.clone()
        return vocab_parallel_cross_entropy(logits, labels)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, labels.reshape(-1), reduction="none").view(labels.shape)


def _token_mask(labels, loss_mask, ignore_index):
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the labels' shape {tuple(labels.shape)}")
    mask = (loss_mask != 0) & (labels != ignore_index)
    return mask, labels.masked_fill(~mask, 0)


def _pair(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack((total.detach().float(), count.float()))


def lm_loss_func(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                 ignore_index: int = -100, inplace: bool = False):
    """Plain LM loss in megatron's per-token 3-tuple form (pre-training, the reference LM).

    Args:
        logits: [..., V/tp] vocab-parallel student logits (e.g. [s, b, V/tp] or [b, s, V/tp]).
        labels: [...] next-token ids (``ignore_index`` entries are skipped).
        loss_mask: [...] 1 = count this token, 0 = skip.
        ignore_index: labels equal to it are skipped too.
        inplace: let megatron's CE overwrite fp32 ``logits`` (saves a logits-sized copy; see
            :func:`lm_per_token`).
    Returns:
        ``(loss_sum, num_tokens, {"lm": [sum, count], "total": [sum, count]})`` (module doc).
    """
    mask, safe = _token_mask(labels, loss_mask, ignore_index)
    lm = lm_per_token(logits, safe, inplace=inplace)
    loss_sum = torch.where(mask, lm, 0.0).sum()
    count = mask.sum()
    pair = _pair(loss_sum, count)
    return loss_sum, count.to(torch.int), {"lm": pair, "total": pair.clone()}


class DistillationLoss:
    """``total = (1 - alpha) * LM + alpha * [T^2] * KD`` per token, summed (module doc).

    ``DistillationLoss(cfg)(student_logits, labels, loss_mask, teacher_logits=..., step=...,
    total_steps=...)`` with dense teacher logits, or ``target_ids=..., target_logprobs=...`` with
    sparse (stored top-k) targets. KD runs first (it keeps no reference to the logits), then the
    LM cross-entropy. A term whose weight is 0 is still computed, without gradient, for the
    report (KD only when a teacher is given).
    """

    def __init__(self, cfg: Optional[KDLossConfig] = None):
        self.cfg = cfg or KDLossConfig()

    def __call__(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        target_ids: Optional[torch.Tensor] = None,
        target_logprobs: Optional[torch.Tensor] = None,
        step: int = 0,
        total_steps: int = 1,
    ):
        """Args (leading shape ``[...]`` = e.g. [s, b] or [b, s], the same for all):

        student_logits: [..., V/tp] vocab-parallel student logits (padded columns -inf).
        labels: [...] next-token ids; loss_mask: [...] 1 (any nonzero) = train on this token.
        teacher_logits: [..., V/tp] dense teacher logits (online teacher), or
        target_ids / target_logprobs: [..., k] sparse stored targets (-1 = padding).
        step / total_steps: drive the alpha schedule (0-based optimizer step).

        Returns ``(loss_sum, num_tokens, report)`` as described in the module docstring.
        """
        cfg = self.cfg
        sparse = target_ids is not None or target_logprobs is not None
        if sparse and (target_ids is None or target_logprobs is None):
            raise ValueError("sparse KD needs both target_ids and target_logprobs")
        if sparse and teacher_logits is not None:
            raise ValueError("give either teacher_logits (dense) or sparse targets, not both")
        alpha = alpha_at(cfg, step, total_steps)
        have_teacher = sparse or teacher_logits is not None
        if alpha > 0 and not have_teacher:
            raise ValueError(
                f"KD weight alpha={alpha} > 0 but no teacher_logits or target_ids/target_logprobs "
                f"were given: pass a teacher, or set kd.alpha=0"
            )
        mask, safe_labels = _token_mask(labels, loss_mask, cfg.ignore_index)
        count = mask.sum()
        if have_teacher and cfg.one_pass and not cfg.lm_inplace:
            return self._one_pass(student_logits, safe_labels, mask, count, alpha, teacher_logits,
                                  target_ids, target_logprobs)
        report = {}
        total = None
        scale = cfg.temperature ** 2 if cfg.t2_scale else 1.0
        if have_teacher:  # before the LM term: megatron's CE may overwrite the logits
            with contextlib.nullcontext() if alpha > 0 else torch.no_grad():
                if sparse:
                    kd = sparse_kd_loss(
                        student_logits, target_ids, target_logprobs, cfg.temperature,
                        cfg.residual, loss_mask=mask, chunk_size=cfg.chunk_size,
                        target_kind="logprobs" if cfg.target_kind == "auto" else cfg.target_kind,
                    )
                else:
                    kd = kd_loss(
                        student_logits, teacher_logits, cfg.kind, cfg.temperature, cfg.skew,
                        cfg.beta, loss_mask=mask, chunk_size=cfg.chunk_size,
                    )
            kd_sum = kd.sum()  # masked tokens are exactly 0
            report["kd"] = _pair(kd_sum, count)
            if alpha > 0:
                total = (alpha * scale) * kd_sum
        with contextlib.nullcontext() if alpha < 1 else torch.no_grad():
            lm = lm_per_token(student_logits, safe_labels, inplace=cfg.lm_inplace)
            lm_sum = torch.where(mask, lm, 0.0).sum()
        report["lm"] = _pair(lm_sum, count)
        if alpha < 1:
            total = (1.0 - alpha) * lm_sum if total is None else total + (1.0 - alpha) * lm_sum
        report["total"] = _pair(total, count)
        report["alpha"] = torch.tensor([alpha, 1.0], dtype=torch.float32, device=lm_sum.device)
        return total, count.to(torch.int), report

    def _weights(self, alpha: float) -> tuple[float, float]:
        cfg = self.cfg
        return alpha * (cfg.temperature ** 2 if cfg.t2_scale else 1.0), 1.0 - alpha

    def _sparse_kind(self) -> str:
        return "logprobs" if self.cfg.target_kind == "auto" else self.cfg.target_kind

    def _finish(self, total, kd_sum, lm_sum, count, alpha, have_teacher=True):
        report = {"lm": _pair(lm_sum, count)}
        if have_teacher:
            report["kd"] = _pair(kd_sum, count)
        report["total"] = _pair(total, count)
        report["alpha"] = torch.tensor([alpha, 1.0], dtype=torch.float32, device=lm_sum.device)
        return total, count.to(torch.int), report

    def _one_pass(self, student_logits, safe_labels, mask, count, alpha, teacher_logits, target_ids,
                  target_logprobs):
        """LM + KD in one pass per logits chunk (kd.one_pass; :func:`fused_kd_lm_loss`)."""
        cfg = self.cfg
        w_kd, w_lm = self._weights(alpha)
        total, kd, lm = fused_kd_lm_loss(
            student_logits, safe_labels, mask, teacher_logits=teacher_logits, target_ids=target_ids,
            target_logprobs=target_logprobs, kind=cfg.kind, temperature=cfg.temperature, skew=cfg.skew,
            beta=cfg.beta, residual=cfg.residual, target_kind=self._sparse_kind(), w_kd=w_kd, w_lm=w_lm,
            chunk_size=cfg.chunk_size, compiled=cfg.compile,
        )
        return self._finish(total.sum(), kd.sum(), lm.sum(), count, alpha)

    def fused_linear(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: torch.Tensor,
        teacher_hidden: Optional[torch.Tensor] = None,
        teacher_weight: Optional[torch.Tensor] = None,
        target_ids: Optional[torch.Tensor] = None,
        target_logprobs: Optional[torch.Tensor] = None,
        step: int = 0,
        total_steps: int = 1,
        vocab_size: Optional[int] = None,
        sequence_parallel: bool = False,
    ):
        """The same 3-tuple as :meth:`__call__`, from the student's final hidden states and output
        weight (:func:`fused_linear_kd`: no [tokens, V] logits). ``hidden`` [b, s, H] (sequence
        parallel: this rank's [b, s/tp, H]); ``weight`` [V/tp, H]; a teacher as ``teacher_hidden``
        + ``teacher_weight`` or sparse targets, or neither (LM only: the report has no ``kd``)."""
        cfg = self.cfg
        sparse = target_ids is not None or target_logprobs is not None
        have_teacher = sparse or teacher_hidden is not None
        alpha = alpha_at(cfg, step, total_steps) if have_teacher else 0.0
        mask, safe = _token_mask(labels, loss_mask, cfg.ignore_index)
        count = mask.sum()
        w_kd, w_lm = self._weights(alpha)
        total, kd_sum, lm_sum = fused_linear_kd(
            hidden, weight, safe, mask, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            target_ids=target_ids, target_logprobs=target_logprobs, kind=cfg.kind,
            temperature=cfg.temperature, skew=cfg.skew, beta=cfg.beta, residual=cfg.residual,
            target_kind=self._sparse_kind(), w_kd=w_kd, w_lm=w_lm, vocab_size=vocab_size,
            sequence_parallel=sequence_parallel, chunk_tokens=cfg.fused_chunk_tokens, compiled=cfg.compile,
        )
        out = self._finish(total, kd_sum, lm_sum, count, alpha, have_teacher)
        if not have_teacher:  # the report of lm_loss_func
            out[2].pop("alpha")
        return out
