"""Shared pieces of the post-training loops: data-parallel sums and megatron micro-batch passes."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kd.minillm.generation import forward_logits


def dp_info() -> tuple[int, int, object]:
    """(data-parallel rank, size, group); (0, 1, None) without parallel_state."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def dp_sum(x: torch.Tensor) -> torch.Tensor:
    """float64 copy of ``x`` summed over the data-parallel group."""
    _, size, group = dp_info()
    x = x.detach().double().clone()
    if size > 1:
        dist.all_reduce(x, group=group)
    return x


def positions(tokens: torch.Tensor) -> torch.Tensor:
    """Position ids 0..s-1 for a [b, s] batch."""
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def _forward_step(loss_fn, teacher, vocab_size, device, data_iterator, model):
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    tokens = batch["tokens"]
    t_logits = forward_logits(teacher, tokens, vocab_size) if teacher is not None else None
    output = model(tokens, positions(tokens), None)
    return output, partial(loss_fn, batch, t_logits)


def run_microbatches(student, batches: list[dict[str, torch.Tensor]], loss_fn: Callable,
                     teacher=None, vocab_size: int = 0, forward_only: bool = False) -> dict[str, float]:
    """Forward (+ backward) ``batches`` through megatron's schedule; return summed stats over DP.

    ``loss_fn(batch, teacher_logits, student_logits) -> (loss, num_tokens, stats)``; the teacher
    forward (no grad) runs inside each micro-batch when ``teacher`` is given. Gradients accumulate
    in the DDP buffers (the caller zeroes them and steps the optimizer).
    """
    device = next(student.parameters()).device
    fb = get_forward_backward_func()
    width = max(b["tokens"].shape[1] for b in batches)
    results = fb(forward_step_func=partial(_forward_step, loss_fn, teacher, vocab_size, device),
                 data_iterator=iter(batches), model=[student], num_microbatches=len(batches),
                 seq_length=width, micro_batch_size=batches[0]["tokens"].shape[0], forward_only=forward_only)
    keys = sorted({k for r in results for k in r})
    if not keys:
        return {}
    sums = torch.stack([sum((r[k].double() for r in results if k in r), torch.zeros((), dtype=torch.float64))
                        for k in keys])
    return dict(zip(keys, dp_sum(sums).tolist()))
