"""Teacher and student on one pipeline: a per-stage wrapper the megatron-core schedules drive.

Every pipeline rank holds its student stage (DDP-wrapped, trained) and the same-numbered stage of
the frozen teacher (each model split by its own layer count). The activation sent between stages
is both hidden states concatenated on the last dimension, ``[s, b, h_student + h_teacher]``, in the
student's pipeline dtype; the 1F1B schedule learns the wider shape from
:func:`make_adjust_tensor_shapes_fn`. :class:`DistillationModel`:

* ``set_input_tensor`` splits the received tensor: the student part keeps its autograd link (its
  gradient goes back up the pipeline), the teacher part is detached and cast to the teacher dtype;
* ``forward`` runs the teacher stage under ``no_grad`` and then the student stage; non-last stages
  return the concatenation, the last stage returns the student's vocab-parallel logits and keeps
  the teacher's for the loss (:meth:`pop_teacher_output`); with ``run_teacher`` off (evaluation
  without KD) only the student runs;
* DDP plumbing (``zero_grad_buffer``, ``no_sync``, ``finish_grad_sync``) and checkpoints
  (``.module`` chain, ``sharded_state_dict``) see the student only: the teacher is a plain
  attribute, not a sub-module, so it is in no state dict, no ``parameters()``, and ``train()``
  leaves it in eval mode.

With PP = 1 the same wrapper simply runs both models (no concatenation).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.utils import get_attr_wrapped_model

from megatron_kd.distill.intermediate import InjectAuxLoss


class ForwardTimer:
    """Accumulated wall time of timed blocks: CUDA events on GPU (no host sync while timing),
    ``time.perf_counter`` on CPU. :meth:`seconds` resolves and resets."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._total = 0.0
        self._events: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._total += time.perf_counter() - t0

    def seconds(self) -> float:
        """Seconds accumulated since the last call (waits for timed GPU work to finish)."""
        total = self._total
        for start, end in self._events:
            end.synchronize()
            total += start.elapsed_time(end) / 1000.0
        self._total, self._events = 0.0, []
        return total


class DistillationModel(torch.nn.Module):
    """One pipeline rank's student stage (``self.module``, DDP) plus its frozen teacher stage.

    Args:
        student: the DDP-wrapped student stage (what the optimizer and checkpoints hold).
        teacher: the teacher's GPTModel stage for this rank (frozen; see :func:`teacher.load_teacher`).
        student_hidden / teacher_hidden: hidden sizes (where the received activation is split).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, student_hidden: int,
                 teacher_hidden: int, intermediate: Any = None):
        super().__init__()
        self.module = student
        # A plain attribute, not a sub-module: invisible to state_dict(), parameters(), train().
        object.__setattr__(self, "teacher", teacher)
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        self.teacher_dtype = next(teacher.parameters()).dtype
        self.is_first_stage = parallel_state.is_pipeline_first_stage()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.teacher_timer, self.student_timer = ForwardTimer(), ForwardTimer()
        self.intermediate = intermediate  # IntermediateLosses of this stage's pairs, or None
        self.loss_mask: Optional[torch.Tensor] = None  # [b, s] of the next forward (set by the forward step)
        # (tokens, position_ids) the teacher reads instead of the student's (cross-tokenizer KD), or None
        self.teacher_inputs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._teacher_output: Optional[torch.Tensor] = None
        self._aux: Optional[torch.Tensor] = None
        self.run_teacher = True
        """False: forwards skip the teacher (evaluation without KD, ``kd.eval_with_teacher``); a
        pipeline stage then sends zeros in the teacher's part of the activation."""

    # ------------------------------------------------------------------ schedule interface
    def set_input_tensor(self, input_tensor: Any) -> None:
        """Split the received ``[s, b, h_s + h_t]`` activation between student and teacher."""
        tensors = input_tensor if isinstance(input_tensor, list) else [input_tensor]
        student_set = get_attr_wrapped_model(self.module, "set_input_tensor")
        x = tensors[0]
        if x is None:
            student_set([None])
            self.teacher.set_input_tensor([None])
            return
        if x.shape[-1] != self.student_hidden + self.teacher_hidden:
            raise RuntimeError(f"received activation of width {x.shape[-1]}, expected student {self.student_hidden} "
                               f"+ teacher {self.teacher_hidden}: pass adjust_tensor_shapes_fn to the schedule")
        student_set([x[..., : self.student_hidden]])
        self.teacher.set_input_tensor([x[..., self.student_hidden:].detach().to(self.teacher_dtype)])

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any = None,
                **kwargs: Any) -> torch.Tensor:
        """Teacher stage (no grad), then student stage; see the module docstring for the output."""
        t_ids, t_pos = self.teacher_inputs if self.teacher_inputs is not None else (input_ids, position_ids)
        self.teacher_inputs = None
        teacher_out = None
        if self.run_teacher:
            with torch.no_grad(), self.teacher_timer():
                teacher_out = self.teacher(t_ids, t_pos, attention_mask)
        with self.student_timer():
            student_out = self.module(input_ids, position_ids, attention_mask, **kwargs)
        aux = None
        if self.intermediate is not None:
            if torch.is_grad_enabled():
                aux = self.intermediate.compute(self.loss_mask)
            else:  # evaluation: no intermediate losses
                self.intermediate.clear()
        if self.is_last_stage:
            self._teacher_output, self._aux = teacher_out, aux
            return student_out
        if teacher_out is None:  # the next stage's teacher does not run either: any values do
            teacher_out = student_out.new_zeros(*student_out.shape[:-1], self.teacher_hidden)
        out = torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)
        if aux is not None:  # back-propagated together with this stage's output (intermediate.py)
            out = InjectAuxLoss.apply(out, aux, self._loss_scale(out))
        return out

    def _loss_scale(self, like: torch.Tensor) -> float:
        config = get_attr_wrapped_model(self.module, "config", allow_none=False)
        if config.grad_scale_func is None:
            return 1.0
        return float(config.grad_scale_func(torch.ones(1, device=like.device)))

    def pop_aux_loss(self) -> Optional[torch.Tensor]:
        """The last stage's weighted intermediate loss of the last forward (scalar), or None."""
        out, self._aux = self._aux, None
        return out

    def pop_teacher_output(self) -> Optional[torch.Tensor]:
        """The teacher logits [b, s, V/tp] of the last forward on the last stage (then forgotten)."""
        out, self._teacher_output = self._teacher_output, None
        return out

    # ------------------------------------------------------------------ the student's DDP
    def zero_grad_buffer(self) -> None:
        """Zero the student's gradient buffers (the teacher has none)."""
        self.module.zero_grad_buffer()

    def no_sync(self):
        """The student DDP's ``no_sync`` context (gradient accumulation without reduction)."""
        return self.module.no_sync()

    def finish_grad_sync(self, *args: Any, **kwargs: Any) -> None:
        """Finish the student DDP's gradient reduction."""
        self.module.finish_grad_sync(*args, **kwargs)

    def start_grad_sync(self, *args: Any, **kwargs: Any) -> None:
        """Start the student DDP's gradient reduction."""
        self.module.start_grad_sync(*args, **kwargs)

    def sharded_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The student's sharded state dict only (checkpoints never hold the teacher)."""
        return self.module.sharded_state_dict(*args, **kwargs)

    def train(self, mode: bool = True) -> "DistillationModel":
        """Train/eval the student; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def timings(self) -> tuple[float, float]:
        """``(teacher_forward_s, student_forward_s)`` on this rank since the last call."""
        return self.teacher_timer.seconds(), self.student_timer.seconds()


def unwrap_student(model: torch.nn.Module) -> torch.nn.Module:
    """The student DDP of a :class:`DistillationModel` (anything else is returned as is)."""
    return model.module if isinstance(model, DistillationModel) else model


def student_finalize_model_grads(model: list[torch.nn.Module], *args: Any, **kwargs: Any):
    """megatron's ``finalize_model_grads`` over the students of the schedule's model list."""
    return finalize_model_grads([unwrap_student(m) for m in model], *args, **kwargs)


def install_schedule_hooks(distill_model: DistillationModel) -> None:
    """Point the student config's schedule hooks at the student DDP (the schedule sees the wrapper)."""
    config = get_attr_wrapped_model(distill_model.module, "config", allow_none=False)
    config.finalize_model_grads_func = student_finalize_model_grads
    config.no_sync_func = distill_model.module.no_sync


def make_adjust_tensor_shapes_fn(teacher_hidden: int) -> Callable:
    """The 1F1B ``adjust_tensor_shapes_fn``: widen every send/recv shape ``(s, b, h)`` by ``teacher_hidden``."""

    def adjust(recv_shapes: list, send_shapes: list) -> tuple[list, list]:
        widen = lambda shapes: [(*shape[:-1], shape[-1] + teacher_hidden) for shape in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    return adjust
