"""Model chunks wrapped for training: (Float16Module) + megatron DDP, the optimizer and the scheduler.

:func:`setup_model_and_optimizer` is shared by ``pretrain`` and ``distill`` (the student side).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module

from megatron_kd.models.builder import build_gpt_model
from megatron_kd.models.config import ModelConfig
from megatron_kd.runtime.distributed import ParallelConfig, init_distributed, is_main_process
from megatron_kd.runtime.parallel import unwrap
from megatron_kd.training.config import OptimConfig
from megatron_kd.training.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def effective_optim_config(optim: OptimConfig) -> OptimConfig:
    """``optim`` adjusted to the hardware: the distributed optimizer is GPU-only in megatron-core 0.16.1
    (it rejects CPU parameters), so on CPU it is switched off with a note (same maths, unsharded)."""
    if optim.use_distributed_optimizer and not torch.cuda.is_available():
        if is_main_process():
            print("note: optim.use_distributed_optimizer=true ignored on CPU (megatron-core's distributed "
                  "optimizer needs CUDA); using the plain optimizer, which computes the same update", flush=True)
        from dataclasses import replace

        return replace(optim, use_distributed_optimizer=False)
    return optim


def wrap_model(model: torch.nn.Module, optim: OptimConfig) -> DistributedDataParallel:
    """Float16Module (bf16/fp16) and megatron DDP around one model chunk.

    Gradients are reduced in fp32; the schedules call ``finalize_model_grads`` (all-reduce over
    data parallel, embedding-tie sync over pipeline stages, division by the token count).
    """
    config = model.config
    if optim.precision != "fp32":
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        check_for_nan_in_grad=torch.cuda.is_available(),
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    ddp.broadcast_params()  # identical replicas across DP even if init RNG streams differed
    return ddp


def setup_model_and_optimizer(model_cfg: ModelConfig, parallel: ParallelConfig, optim: OptimConfig,
                              train_iters: int, padded_vocab_size: int | None = None,
                              model_builder: Callable[..., torch.nn.Module] | None = None):
    """Build this rank's model stage(s), wrap them, and create optimizer + LR scheduler.

    Returns ``(model_chunks, optimizer, scheduler)``; ``model_chunks`` is a list of DDP modules
    (one per virtual pipeline stage; here always one). ``padded_vocab_size`` forces the embedding
    size (resuming a checkpoint made at another TP). ``model_builder(model_cfg, params_dtype=...,
    padded_vocab_size=...)`` replaces :func:`build_gpt_model` (e.g. a student with extra heads).
    Sets the megatron ``TransformerConfig`` hooks the schedules use (finalize grads, no-sync,
    fp16 loss scaling). Requires a seeded, initialised distributed runtime.
    """
    init_distributed(parallel)
    optim = effective_optim_config(optim)
    builder = model_builder or build_gpt_model
    model = builder(model_cfg, params_dtype=optim.precision, padded_vocab_size=padded_vocab_size)
    chunks = [wrap_model(model, optim)]
    optimizer = build_optimizer(chunks, optim)
    scheduler = build_scheduler(optimizer, optim, train_iters)
    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = chunks[0].no_sync
    if optim.precision == "fp16":
        config.grad_scale_func = optimizer.scale_loss
    return chunks, optimizer, scheduler


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module under DDP / Float16Module wrappers (a GPTModel stage)."""
    return unwrap(model)
