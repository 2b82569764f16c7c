"""Forward steps of distillation for the megatron-core schedules (online, offline, none).

Contract (:mod:`megatron_kd.training.lm_loss`): ``step(data_iterator, model) -> (output, loss_func)``
and, on the last pipeline stage, ``loss_func(output) -> (loss_sum, num_tokens, report)`` with the
report of :class:`megatron_kd.losses.DistillationLoss` (``lm``, ``kd``, ``total``, ``alpha``).

* online: ``model`` is a :class:`~megatron_kd.distill.pipeline.DistillationModel`; the teacher
  logits of the micro-batch come from it (same vocab shard as the student's).
* offline: the batch carries ``target_ids`` / ``target_logprobs`` [b, s, k] aligned with labels
  (-1 padding), from the logits store; the loss is :func:`megatron_kd.losses.sparse_kd_loss`.
* none: the student's LM loss alone (the baseline).

Padded vocabulary columns (>= the KD vocabulary) are set to -inf on both sides before any
softmax.

With ``kd.fused_linear`` (every mode, not cross-tokenizer) the last stage's output layers are
captured (:mod:`megatron_kd.distill.head`): the model returns the final hidden states and the loss
runs the student's (and online the teacher's) output layer chunk by chunk
(:meth:`DistillationLoss.fused_linear`), so no [tokens, V] logits are held.

Evaluation steps (``evaluation=True``) report the held-out ``lm`` loss (the metric KD is
judged by) and, online, the held-out ``kd``; no ``total``/``alpha``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch

from megatron_kd.distill.head import FusedHead, HeadWeights, fused_head_for
from megatron_kd.losses import DistillationLoss, KDLossConfig, lm_loss_func
from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.training.lm_loss import batch_to_device


@dataclass
class KDState:
    """The optimizer step the KD schedules (alpha) read; the trainer updates ``step`` before each step."""

    step: int = 0
    """0-based optimizer step about to run (= the trainer's iteration: resumes continue the schedule)."""
    total_steps: int = 1
    """Steps of the whole run (train.train_iters)."""


def align_vocab_width(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Teacher logits [..., V_t] cut or -inf-padded to ``width`` columns (TP=1 only; see teacher.py)."""
    have = logits.shape[-1]
    if have == width:
        return logits
    if have > width:
        return logits[..., :width]
    pad = logits.new_full((*logits.shape[:-1], width - have), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class DistillForwardStep:
    """``forward_step_func`` for one KD mode (see the module docstring).

    Args:
        mode: "online" | "offline" | "none".
        kd: the loss settings (``DistillConfig.kd`` or any ``KDLossConfig``).
        kd_vocab_size: real vocabulary taking part in the losses (columns beyond are masked).
        state: the shared :class:`KDState` (alpha schedule step).
        evaluation: report held-out metrics instead of training ones.
    """

    def __init__(self, mode: str, kd: KDLossConfig, kd_vocab_size: int, state: Optional[KDState] = None,
                 evaluation: bool = False):
        if mode not in ("online", "offline", "none"):
            raise ValueError(f"kd.mode={mode!r} is not one of online, offline, none")
        self.mode, self.kd_vocab_size, self.evaluation = mode, kd_vocab_size, evaluation
        self.state = state or KDState()
        self.loss = DistillationLoss(kd)
        # mode "none" fuses too (LM loss only), so a plain step costs what a KD step's LM part costs.
        self.fused = bool(getattr(kd, "fused_linear", False)) and getattr(kd, "cross_tokenizer", None) is None
        self._heads: dict[int, Optional[FusedHead]] = {}

    def _head(self, model: torch.nn.Module) -> Optional[FusedHead]:
        """The fused head of this model chunk (None: not fused, or not the last stage)."""
        if not self.fused:
            return None
        key = id(model)
        if key not in self._heads:
            online = self.mode == "online" and hasattr(model, "pop_teacher_output")
            student = model.module if online else model
            self._heads[key] = fused_head_for(model, student, model.teacher if online else None)
        return self._heads[key]

    def __call__(self, data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module):
        batch = batch_to_device(next(data_iterator))
        teacher, aux, weights = None, None, None
        head = self._head(model)
        with head.capture() if head is not None else contextlib.nullcontext():
            if self.mode == "online":
                model.loss_mask = batch["loss_mask"]  # for intermediate-layer losses
                output = model(batch["tokens"], batch["position_ids"], None)
                teacher, aux = model.pop_teacher_output(), model.pop_aux_loss()
            else:
                output = model(batch["tokens"], batch["position_ids"], None)
        if head is not None:
            weights = head.weights()
        return output, partial(self.loss_func, batch, teacher, aux, head_weights=weights)

    def loss_func(self, batch: dict[str, torch.Tensor], teacher_logits: Optional[torch.Tensor],
                  aux_loss: Optional[torch.Tensor], output_tensor: torch.Tensor,
                  head_weights: Optional[HeadWeights] = None):
        """Loss of one micro-batch from the student logits ``output_tensor`` [b, s, V/tp].

        ``aux_loss``: this stage's weighted intermediate-layer loss (scalar), added to the total.
        ``head_weights``: set when the head is fused; ``output_tensor`` / ``teacher_logits`` are
        then the final hidden states [b, s, H] (module doc).
        """
        if head_weights is not None:
            return self._fused_loss(batch, teacher_logits, aux_loss, output_tensor, head_weights)
        student = mask_padded_vocab(output_tensor, self.kd_vocab_size)
        labels, loss_mask = batch["labels"], batch["loss_mask"]
        use_targets = self.mode == "offline" and not self.evaluation
        if self.mode == "none" or (self.mode == "offline" and self.evaluation):
            return lm_loss_func(student, labels, loss_mask)
        if self.mode == "online":
            if teacher_logits is None:
                raise RuntimeError("online KD: no teacher logits for this micro-batch (the model is not a "
                                   "DistillationModel?)")
            teacher = align_vocab_width(teacher_logits, student.shape[-1])
            kwargs = {"teacher_logits": mask_padded_vocab(teacher, self.kd_vocab_size)}
        elif use_targets:
            if "target_ids" not in batch:
                raise ValueError("offline KD: the batch has no target_ids/target_logprobs: wrap the training "
                                 "dataset with megatron_kd.logits.TeacherTargetsDataset")
            kwargs = {"target_ids": batch["target_ids"], "target_logprobs": batch["target_logprobs"]}
        loss_sum, num_tokens, report = self.loss(student, labels, loss_mask, step=self.state.step,
                                                 total_steps=self.state.total_steps, **kwargs)
        if aux_loss is not None:  # (reported by DistillTrainer, which sees the pairs of every stage)
            loss_sum = loss_sum + aux_loss
        if self.evaluation:
            report.pop("total", None)
            report.pop("alpha", None)
        return loss_sum, num_tokens, report

    def _fused_loss(self, batch, teacher_hidden, aux_loss, hidden, weights: HeadWeights):
        """The fused-head loss: same report as the unfused path (see :meth:`loss_func`)."""
        labels, loss_mask = batch["labels"], batch["loss_mask"]
        kwargs: dict[str, Any] = {}
        if self.mode == "online":
            if teacher_hidden is None or weights.teacher is None:
                raise RuntimeError("online KD: no teacher hidden states for this micro-batch (the model is not a "
                                   "DistillationModel?)")
            kwargs = {"teacher_hidden": teacher_hidden, "teacher_weight": weights.teacher}
        elif self.mode == "offline" and not self.evaluation:
            if "target_ids" not in batch:
                raise ValueError("offline KD: the batch has no target_ids/target_logprobs: wrap the training "
                                 "dataset with megatron_kd.logits.TeacherTargetsDataset")
            kwargs = {"target_ids": batch["target_ids"], "target_logprobs": batch["target_logprobs"]}
        loss_sum, num_tokens, report = self.loss.fused_linear(
            hidden, weights.student, labels, loss_mask, step=self.state.step, total_steps=self.state.total_steps,
            vocab_size=self.kd_vocab_size, sequence_parallel=weights.sequence_parallel, **kwargs)
        if not kwargs:  # mode none, or offline evaluation: the plain LM report
            return loss_sum, num_tokens, report
        if aux_loss is not None:
            loss_sum = loss_sum + aux_loss
        if self.evaluation:
            report.pop("total", None)
            report.pop("alpha", None)
        return loss_sum, num_tokens, report
