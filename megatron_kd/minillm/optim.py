"""Student training plumbing for MiniLLM and its baselines: megatron DDP, megatron optimizer, LR.

Gradients: our models run with ``calculate_per_token_loss=True``, so megatron DDP *sums* gradients
over data-parallel ranks and ``finalize_model_grads(..., num_tokens=None)`` does not rescale. Every
loss here is therefore pre-normalised by its *global* token count (all ranks, all micro-batches),
which makes the summed gradient exactly the gradient of the global mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module


@dataclass
class OptimConfig:
    """AdamW + schedule. Defaults: the MiniLLM reference (App. B.1 / released scripts)."""

    lr: float = 5e-6
    """Peak learning rate."""
    min_lr: float = 5e-6
    """Final learning rate of the cosine schedule (the reference sets lr-min = lr)."""
    warmup_steps: int = 100
    """Linear warmup (optimizer steps)."""
    schedule: str = "constant"
    """constant | cosine | linear (after warmup)."""
    weight_decay: float = 1e-6
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    precision: str = "fp32"
    """fp32 | bf16 (bf16 params/activations with fp32 master weights)."""

    def validate(self) -> None:
        """One-line ``ValueError`` on bad settings."""
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"optim.schedule={self.schedule!r} must be constant, cosine or linear")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"optim.precision={self.precision!r} must be fp32 or bf16")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")


def wrap_model(model: torch.nn.Module, precision: str = "fp32") -> DistributedDataParallel:
    """(Float16Module +) megatron DDP around a trainable model stage; parameters broadcast over DP."""
    if precision == "bf16":
        model = Float16Module(model.config, model)
    ddp = DistributedDataParallel(
        model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                    use_distributed_optimizer=False), model)
    ddp.broadcast_params()
    # We call finalize_model_grads ourselves once per optimizer step (several forward_backward
    # calls -- PPO and LM micro-batches -- accumulate into the same buffers first).
    model.config.finalize_model_grads_func = None
    return ddp


def build_optimizer(ddp: DistributedDataParallel, cfg: OptimConfig, total_steps: int):
    """(megatron optimizer, OptimizerParamScheduler) for ``total_steps`` optimizer steps."""
    cfg.validate()
    ocfg = OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                           adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                           clip_grad=cfg.clip_grad, bf16=cfg.precision == "bf16",
                           params_dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    opt = get_megatron_optimizer(ocfg, [ddp])
    warm = min(cfg.warmup_steps, max(total_steps - 1, 0))
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if warm else cfg.lr, max_lr=cfg.lr, min_lr=min(cfg.min_lr, cfg.lr),
        lr_warmup_steps=warm, lr_decay_steps=max(total_steps, warm + 1), lr_decay_style=cfg.schedule,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    return opt, sched


def zero_grads(ddp: DistributedDataParallel, opt) -> None:
    """Clear the DDP gradient buffers and the optimizer's grads before accumulating a step."""
    ddp.zero_grad_buffer()
    opt.zero_grad()


def optimizer_step(ddp: DistributedDataParallel, opt, sched) -> tuple[bool, float | None]:
    """All-reduce grads over DP (sum), clip, step, advance the schedule -> (applied, grad_norm)."""
    finalize_model_grads([ddp], num_tokens=None)
    ok, grad_norm, _ = opt.step()
    if ok:
        sched.step(1)
    return bool(ok), (float(grad_norm) if grad_norm is not None else None)


def current_lr(opt) -> float:
    """Learning rate of the first parameter group."""
    return float(opt.param_groups[0]["lr"])
