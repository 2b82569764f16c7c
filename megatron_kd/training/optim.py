"""Optimizer (megatron-core AdamW with clipping / mixed precision) and learning-rate schedules.

The schedule is megatron-core's ``OptimizerParamScheduler``, stepped so that optimizer step
``k`` (1-based) uses ``lr_at(k)``: linear warmup from 0 over ``W`` steps (step W reaches the
peak), then constant, cosine or linear down to ``min_lr`` at ``train_iters``, or WSD (stable at the peak
until the last ``D`` steps, then decay to ``min_lr``). The config, not the checkpoint, defines the
schedule; a resumed run only restores the step count.
"""
from __future__ import annotations

import logging

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_kd.training.config import OptimConfig, warmup_iters, wsd_decay_iters

log = logging.getLogger(__name__)


def megatron_optimizer_config(optim: OptimConfig) -> OptimizerConfig:
    """megatron-core ``OptimizerConfig`` for AdamW with our settings."""
    return OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        decoupled_weight_decay=True, clip_grad=optim.clip_grad,
        bf16=optim.precision == "bf16", fp16=optim.precision == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[optim.precision],
        initial_loss_scale=optim.initial_loss_scale,
        use_distributed_optimizer=optim.use_distributed_optimizer,
    )


def build_optimizer(model_chunks: list[torch.nn.Module], optim: OptimConfig):
    """megatron ``get_megatron_optimizer`` over DDP-wrapped ``model_chunks`` (frozen params skipped)."""
    return get_megatron_optimizer(megatron_optimizer_config(optim), model_chunks)


def build_scheduler(optimizer, optim: OptimConfig, train_iters: int) -> OptimizerParamScheduler:
    """LR / weight-decay scheduler for ``train_iters`` optimizer steps (see the module docstring)."""
    warmup = warmup_iters(optim, train_iters)
    style = {"constant": "constant", "cosine": "cosine", "linear": "linear", "wsd": "WSD"}[optim.lr_schedule]
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=train_iters, lr_decay_style=style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=train_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=wsd_decay_iters(optim, train_iters) if style == "WSD" else None,
        lr_wsd_decay_style=optim.wsd_decay_style if style == "WSD" else None,
    )


def current_lr(optimizer) -> float:
    """Learning rate of the default parameter group (what the logs report)."""
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])
