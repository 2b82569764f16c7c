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
softmax. Evaluation steps (``evaluation=True``) report the held-out ``lm`` loss (the metric KD is
judged by) and, online, the held-out ``kd``; no ``total``/``alpha``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Optional

import torch

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

    def __call__(self, data_iterator: Iterator[dict[str, Any]], model: torch.nn.Module):
        batch = batch_to_device(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], None)
        teacher = model.pop_teacher_output() if self.mode == "online" else None
        return output, partial(self.loss_func, batch, teacher)

    def loss_func(self, batch: dict[str, torch.Tensor], teacher_logits: Optional[torch.Tensor],
                  output_tensor: torch.Tensor):
        """Loss of one micro-batch from the student logits ``output_tensor`` [b, s, V/tp]."""
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
        if self.evaluation:
            report.pop("total", None)
            report.pop("alpha", None)
        return loss_sum, num_tokens, report
