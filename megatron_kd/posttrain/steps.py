"""Shared pieces of the post-training steps: data-parallel sums, megatron micro-batch passes, the
student set-up on the shared training stack.

Gradients: post-training losses are pre-normalised by their *global* token count (all DP ranks,
all micro-batches) and megatron DDP sums gradients over data parallel, so the summed gradient is
exactly the gradient of the global mean. A step may run several schedule passes into the same
buffers (PPO + pre-training micro-batches), so the model's ``finalize_model_grads_func`` is unset
and :func:`finish_grads` reduces once per step.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_kd.posttrain.generation import forward_logits
from megatron_kd.runtime import parallel


def dp_info() -> tuple[int, int, object]:
    """(data-parallel rank, size, group); (0, 1, None) without parallel_state."""
    g = parallel.dp_group()
    return g.rank, g.world_size, g.group


def dp_sum(x: torch.Tensor) -> torch.Tensor:
    """float64 copy of ``x`` summed over the data-parallel group."""
    return parallel.dp_sum(x.detach().double().clone())


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
    in the DDP buffers (the Trainer zeroes them and steps the optimizer; :func:`finish_grads` reduces).
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


def finish_grads(student) -> None:
    """All-reduce (sum) the step's accumulated gradients over data parallel, once per step."""
    finalize_model_grads([student], num_tokens=None)


def setup_student(model: torch.nn.Module, optim, train_iters: int):
    """``(ddp, optimizer, scheduler)`` for a post-training student on the shared training stack
    (``training.model_setup.wrap_model``, ``training.optim``); grads are reduced by :func:`finish_grads`.
    An already wrapped ``model`` (a DDP from an earlier stage) gets a fresh optimizer and schedule."""
    from megatron_kd.training.model_setup import effective_optim_config, wrap_model
    from megatron_kd.training.optim import build_optimizer, build_scheduler

    from megatron.core.distributed import DistributedDataParallel

    optim = effective_optim_config(optim)
    ddp = model if isinstance(model, DistributedDataParallel) else wrap_model(model, optim)
    ddp.config.finalize_model_grads_func = None
    optimizer = build_optimizer([ddp], optim)
    return ddp, optimizer, build_scheduler(optimizer, optim, train_iters)


def fit(student, optimizer, scheduler, model_cfg, *, step, make_iterator: Callable[[int], Any], batch_size: int,
        total_steps: int, run=None, cfg: Any = None, name: str = "train", tokenizer: str | None = None,
        seed: int = 0, evaluator=None, on_step_end=None, extra_state=None, load_extra_state=None,
        rank_state=None, load_rank_state=None):
    """Run the shared :class:`~megatron_kd.training.loop.Trainer` with a post-training ``step`` and batch
    source ``make_iterator(consumed_samples)``; resume first when the checkpoint directory holds one.

    ``run`` is a command config with ``train`` (:class:`~megatron_kd.training.config.TrainScheduleConfig`),
    ``checkpoint`` and ``logging`` sections, or a flat :class:`megatron_kd.posttrain.config.RunControl`
    (runs built in code), or None (no checkpoints, no metrics file: in-memory runs in tests); ``cfg`` the
    resolved command config saved next to checkpoints. ``total_steps`` and ``seed`` are the resolved run
    length and seed. Returns ``(trainer, Trainer.fit's result)``.
    """
    import dataclasses

    from megatron_kd.posttrain.config import RunControl
    from megatron_kd.training.config import CheckpointConfig, LoggingConfig, TrainConfig, TrainScheduleConfig
    from megatron_kd.training.loop import Trainer

    run = run or RunControl(save="", eval_interval=0, save_interval=0, log_interval=0,
                            logging=LoggingConfig(quiet=True))
    batches = dict(micro_batch_size=max(batch_size // dp_info()[1], 1), global_batch_size=batch_size, seq_length=1,
                   eval_iters=0, train_iters=total_steps, seed=seed)
    if isinstance(run, RunControl):
        train = TrainConfig(eval_interval=run.eval_interval, log_interval=run.log_interval,
                            exit_interval=run.exit_interval, exit_duration_mins=run.exit_duration_mins, **batches)
        ckpt = CheckpointConfig(save=run.save or None, save_interval=run.save_interval, keep_last=run.keep_last,
                                tokenizer=tokenizer)
    else:
        schedule = {f.name: getattr(run.train, f.name) for f in dataclasses.fields(TrainScheduleConfig)}
        train = TrainConfig(**{**schedule, **batches})
        ckpt = dataclasses.replace(run.checkpoint, save=run.checkpoint.save or None,
                                   tokenizer=run.checkpoint.tokenizer or tokenizer)
    trainer = Trainer([student], optimizer, scheduler, None, model_cfg, train, ckpt, run.logging, step=step,
                      evaluator=evaluator, on_step_end=on_step_end, extra_state=extra_state,
                      load_extra_state=load_extra_state, rank_state=rank_state, load_rank_state=load_rank_state,
                      desc=name, config_to_save=cfg)
    trainer.resume()
    return trainer, trainer.fit(make_iterator)
