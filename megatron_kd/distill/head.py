"""The fused distillation head (``kd.fused_linear``): the loss runs the output layers itself.

Megatron's ``GPTModel`` ends with ``logits = output_layer(hidden, weight=...)`` (a column-parallel
layer over the vocabulary; tied embeddings pass the embedding as ``weight``). While a
:class:`HeadCapture` is active, that output layer hands back its input - the final hidden states,
after the final norm - and records the weight it would have used, so the model returns
``[b, s, H]`` (``[b, s/tp, H]`` under sequence parallelism) instead of ``[b, s, V/tp]`` logits.
The distill forward step then calls :meth:`megatron_kd.losses.DistillationLoss.fused_linear`,
which produces the student's (and, online, the teacher's) logits chunk by chunk inside the loss
and never holds them whole.

Only the last pipeline stage has an output layer; other stages are untouched. Outside the
``capture()`` context the output layer behaves exactly as before (evaluation helpers, generation
and export still get logits).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from megatron_kd.models.head import HeadCapture, capture_for


@dataclass
class HeadWeights:
    """What the fused loss needs besides the model outputs (one micro-batch)."""

    student: torch.Tensor
    """The student's output weight shard [V/tp, H] (the embedding when tied)."""
    teacher: Optional[torch.Tensor]
    """The teacher's output weight shard [V_t/tp, H_t] (online), else None."""
    sequence_parallel: bool
    """The hidden states are sequence-parallel shards."""


class FusedHead:
    """The student's (and the online teacher's) head captures of one model chunk."""

    def __init__(self, student: HeadCapture, teacher: Optional[HeadCapture]):
        self.student, self.teacher = student, teacher
        if teacher is not None and teacher.sequence_parallel != student.sequence_parallel:
            raise ValueError("fused KD head: teacher and student disagree on sequence parallelism; "
                             "set kd.fused_linear=false")

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Within: the output layers return their hidden states (module doc)."""
        with contextlib.ExitStack() as stack:
            for c in (self.student, self.teacher):
                if c is not None:
                    stack.enter_context(c.capturing())
            yield

    def weights(self) -> HeadWeights:
        """The weights recorded by the last captured forward."""
        return HeadWeights(self.student.pop_weight(),
                           self.teacher.pop_weight() if self.teacher is not None else None,
                           self.student.sequence_parallel)


def fused_head_for(model: Any, student: Any, teacher: Any = None) -> Optional[FusedHead]:
    """A :class:`FusedHead` for the last pipeline stage (None elsewhere).

    ``student``: the student under its wrappers; ``teacher``: the online teacher stage or None.
    """
    cap = capture_for(student)
    if cap is None:
        return None
    t_cap = capture_for(teacher) if teacher is not None else None
    if teacher is not None and t_cap is None:  # a teacher without a megatron output layer: unfused head
        return None
    return FusedHead(cap, t_cap)
