"""Intermediate-layer distillation: cosine / MSE between chosen student and teacher layer outputs.

A pair ``(student_layer, teacher_layer)`` (global 0-based indices, negative from the end) compares
the residual-stream outputs ``[s, b, h]`` of those transformer layers per token. When the widths
differ, a learned linear projection (student width -> teacher width, no bias) maps the student's
output first; it belongs to the student (``kd_projections.p<i>`` inside the GPTModel stage), so
DDP, the optimizer and checkpoints treat it like any student weight. Its initial values depend only
on the seed and the pair index, not on the parallel layout.

Any pipeline stage works, as long as both layers of a pair live on the same stage: the stage that
holds them computes ``alpha * kd.intermediate_weight * sum_tokens loss`` right after its forward.
On the last stage the loss function adds it to the micro-batch loss; on other stages
:class:`InjectAuxLoss` attaches it to the stage's output activation so that the schedule's backward
through that activation also back-propagates the auxiliary loss (gradient 1, times the fp16 loss
scale when there is one). Token counts, the final division by the number of tokens
(``calculate_per_token_loss``) and data-parallel reduction are the schedule's, as for the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_kd.losses import alpha_at
from megatron_kd.models.config import ModelConfig

PROJECTIONS = "kd_projections"


@dataclass(frozen=True)
class ResolvedPair:
    """One intermediate pair placed on the pipeline."""

    index: int
    """Position in ``kd.intermediate``."""
    student_layer: int
    """Global student layer index (non-negative)."""
    teacher_layer: int
    """Global teacher layer index (non-negative)."""
    loss: str
    """cosine | mse."""
    stage: int
    """Pipeline stage holding both layers."""
    student_local: int
    """Index of the student layer within its stage."""
    teacher_local: int
    """Index of the teacher layer within its stage."""


def resolve_pairs(pairs: Sequence[Any], student: ModelConfig, teacher: ModelConfig,
                  pipeline_parallel: int) -> list[ResolvedPair]:
    """Check ``kd.intermediate`` against both models and the PP size; one-line ``ValueError`` otherwise."""
    out = []
    per_s, per_t = student.num_layers // pipeline_parallel, teacher.num_layers // pipeline_parallel
    for i, pair in enumerate(pairs):
        s, t = int(pair.student_layer), int(pair.teacher_layer)
        for name, idx, n in (("student_layer", s, student.num_layers), ("teacher_layer", t, teacher.num_layers)):
            if not -n <= idx < n:
                raise ValueError(f"kd.intermediate[{i}].{name}={idx} is outside the model's {n} layers")
        s, t = s % student.num_layers, t % teacher.num_layers
        if s // per_s != t // per_t:
            raise ValueError(
                f"kd.intermediate[{i}]: student layer {s} is on pipeline stage {s // per_s} but teacher layer {t} "
                f"on stage {t // per_t} (PP={pipeline_parallel}: {per_s} student / {per_t} teacher layers per stage): "
                "pick layers on the same stage or lower parallel.pipeline_parallel")
        out.append(ResolvedPair(i, s, t, pair.loss, s // per_s, s % per_s, t % per_t))
    return out


def attach_projections(model: torch.nn.Module, pairs: Sequence[ResolvedPair], student_hidden: int,
                       teacher_hidden: int, seed: int) -> None:
    """Add ``model.kd_projections`` (student -> teacher width linears) for this stage's pairs, if widths differ."""
    if student_hidden == teacher_hidden or not pairs:
        return
    weight = next(model.parameters())
    layers = torch.nn.ModuleDict()
    for pair in pairs:
        linear = torch.nn.Linear(student_hidden, teacher_hidden, bias=False)
        g = torch.Generator().manual_seed(int(seed) * 1009 + pair.index)
        with torch.no_grad():  # layout-independent init: N(0, 1/h_s)
            linear.weight.copy_(torch.randn(teacher_hidden, student_hidden, generator=g) / student_hidden ** 0.5)
        layers[f"p{pair.index}"] = linear.to(device=weight.device, dtype=weight.dtype)
    model.add_module(PROJECTIONS, layers)


def per_token_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """[...] fp32 loss between hidden states [..., h]: 1 - cosine similarity, or mean squared error."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    return (s - t).pow(2).mean(-1)


class InjectAuxLoss(torch.autograd.Function):
    """Identity on ``output``; in backward also sends gradient ``scale`` to the scalar ``aux`` loss."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, scale: float):  # noqa: D102
        ctx.scale = scale
        ctx.save_for_backward(aux)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        (aux,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux, ctx.scale), None


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class IntermediateLosses:
    """Hooks on this stage's paired layers and the weighted loss of one micro-batch.

    Args:
        student / teacher: this rank's GPTModel stages (unwrapped); ``student`` owns the projections.
        pairs: the pairs on this stage (:func:`resolve_pairs` filtered by stage).
        kd: the ``kd`` config (alpha schedule, ``intermediate_weight``); state: the shared ``KDState``.
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, pairs: Sequence[ResolvedPair], kd: Any,
                 state: Any):
        self.pairs, self.kd, self.state = list(pairs), kd, state
        self.projections = getattr(student, PROJECTIONS, None)
        self._student: dict[int, torch.Tensor] = {}
        self._teacher: dict[int, torch.Tensor] = {}
        self._sums: list[torch.Tensor] = []  # detached [sum, count] per pair and micro-batch (no host sync)
        for pair in self.pairs:
            student.decoder.layers[pair.student_local].register_forward_hook(self._hook(self._student, pair.index))
            teacher.decoder.layers[pair.teacher_local].register_forward_hook(self._hook(self._teacher, pair.index))

    @staticmethod
    def _hook(store: dict, index: int):
        def hook(module, args, output):  # noqa: ARG001 - torch hook signature
            store[index] = _layer_output(output)

        return hook

    def compute(self, loss_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``alpha * w * sum over unmasked tokens and pairs`` (scalar, with grad) of the last forward.

        ``loss_mask`` is [b, s] (hidden states are [s, b, h]). Also accumulates the unweighted sum
        and token count for :meth:`take_report`. None when this stage has no pairs.
        """
        if not self.pairs:
            return None
        total = None
        for pair in self.pairs:
            s, t = self._student.pop(pair.index), self._teacher.pop(pair.index).detach()
            if self.projections is not None:
                s = self.projections[f"p{pair.index}"](s)
            loss = per_token_loss(s, t, pair.loss).transpose(0, 1)  # [b, s]
            mask = torch.ones_like(loss) if loss_mask is None else (loss_mask != 0).to(loss.dtype)
            pair_sum = (loss * mask).sum()
            self._sums.append(torch.stack([pair_sum.detach(), mask.sum()]))
            total = pair_sum if total is None else total + pair_sum
        alpha = alpha_at(self.kd, self.state.step, self.state.total_steps)
        return total * (alpha * self.kd.intermediate_weight)

    def clear(self) -> None:
        """Forget captured activations (a forward without :meth:`compute`, e.g. evaluation)."""
        self._student.clear()
        self._teacher.clear()

    def take_report(self) -> tuple[float, float]:
        """``(sum, count)`` of unweighted per-token pair losses since the last call."""
        if not self._sums:
            return 0.0, 0.0
        total = torch.stack(self._sums).sum(0).double().cpu()
        self._sums = []
        return float(total[0]), float(total[1])
