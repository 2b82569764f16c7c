"""Training loop on megatron-core schedules: DDP, optimizer, LR schedules, checkpoints, logging.

Public API (what ``pretrain`` and ``distill`` use)::

    chunks, optimizer, scheduler = setup_model_and_optimizer(model_cfg, parallel, optim_cfg, train_iters)
    trainer = Trainer(chunks, optimizer, scheduler, forward_step_func, model_cfg, train_cfg,
                      checkpoint_cfg, logging_cfg, adjust_tensor_shapes_fn=..., on_step_end=...,
                      extra_state=..., load_extra_state=...)
    trainer.resume(); trainer.fit(make_train_iterator, make_valid_iterator)
"""
from megatron_kd.training.config import (
    CheckpointConfig,
    LoggingConfig,
    ModelSpec,
    OptimConfig,
    PretrainConfig,
    PretrainDataConfig,
    TrainConfig,
    resolve_model_config,
    validate_pretrain_config,
)
from megatron_kd.training.lm_loss import lm_forward_step, lm_loss_func, make_lm_forward_step, vocab_parallel_lm_loss
from megatron_kd.training.loop import Trainer, num_microbatches, resume_dir, train
from megatron_kd.training.metrics import MetricsLogger, reduce_reports
from megatron_kd.training.model_setup import setup_model_and_optimizer, unwrap_model, wrap_model
from megatron_kd.training.optim import build_optimizer, build_scheduler
from megatron_kd.training.synthetic import SequentialBatchIterator, SyntheticDataset

__all__ = [
    "CheckpointConfig", "LoggingConfig", "MetricsLogger", "ModelSpec", "OptimConfig", "PretrainConfig",
    "PretrainDataConfig", "SequentialBatchIterator", "SyntheticDataset", "TrainConfig", "Trainer",
    "build_optimizer", "build_scheduler", "lm_forward_step", "lm_loss_func", "make_lm_forward_step",
    "num_microbatches", "reduce_reports", "resolve_model_config", "resume_dir", "setup_model_and_optimizer",
    "train", "unwrap_model", "validate_pretrain_config", "vocab_parallel_lm_loss", "wrap_model",
]
