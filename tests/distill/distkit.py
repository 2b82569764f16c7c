"""Shared helpers of the distillation tests: a random teacher checkpoint, a fixed student, a trainer."""
from __future__ import annotations

import io
from typing import Any

import torch

# The teacher is deeper and wider than the student (both split over PP=2 and TP=2).
TEACHER = dict(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
               vocab_size=200, max_position_embeddings=64, init_method_std=0.08)
STUDENT = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
               vocab_size=200, max_position_embeddings=64)
SEQ = 16


def packed(obj: Any) -> bytes:
    """Tensors through the result queue as bytes (torch's fd sharing races with the worker's exit)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpacked(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def make_teacher_checkpoint(path: str, seed: int = 11) -> None:
    """A random (but peaked: larger init std) teacher saved as a megatron-kd checkpoint (world 1)."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    set_seed(seed)
    cfg = ModelConfig(**TEACHER)
    save_checkpoint(path, [build_gpt_model(cfg)], cfg, iteration=1)


def distill_config(teacher: str | None, tp: int = 1, pp: int = 1, steps: int = 3, mbs: int = 2, gbs: int = 8,
                   save: str | None = None, overrides: list[str] | None = None):
    """A ``DistillConfig`` for the tiny student on synthetic data."""
    from megatron_kd.config import load_config
    from megatron_kd.distill import DistillConfig

    items = [f"model.{k}={v}" for k, v in STUDENT.items()] + [
        "data.synthetic=true", f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
        f"train.micro_batch_size={mbs}", f"train.global_batch_size={gbs}", f"train.seq_length={SEQ}",
        f"train.train_iters={steps}", "train.eval_iters=1", "train.log_interval=0", "train.seed=5",
        "optim.lr=5e-3", "optim.min_lr=5e-4", "optim.warmup_iters=1", "logging.quiet=true",
        "kd.alpha=0.6", "kd.temperature=1.5"]
    if teacher:
        items.append(f"teacher.load={teacher}")
    else:
        items.append("kd.mode=none")
    if save:
        items.append(f"checkpoint.save={save}")
    return load_config(DistillConfig, None, items + list(overrides or []))


def build(cfg, student_state: dict | None = None):
    """Initialise the runtime for ``cfg`` and build its trainer; load ``student_state`` (full layout).

    Returns ``(trainer, make_train, make_valid, student_state)``.
    """
    from megatron_kd.distill.run import build_distill_data_iterators, build_distill_trainer, prepare_distill_config
    from megatron_kd.models.sharding import gather_full_state, load_full_state
    from megatron_kd.runtime import init_distributed, set_seed
    from megatron_kd.training import unwrap_model

    model_cfg, spec = prepare_distill_config(cfg)
    init_distributed(cfg.parallel)
    set_seed(cfg.train.seed)
    trainer = build_distill_trainer(cfg, model_cfg, spec)
    student = unwrap_model(trainer.model_chunks[0])
    if student_state is None:
        student_state = {k: v.clone() for k, v in gather_full_state(student, model_cfg).items()}
    load_full_state(student, student_state, model_cfg)
    make_train, make_valid = build_distill_data_iterators(cfg, model_cfg)
    return trainer, make_train, make_valid, student_state


def fit(trainer, make_train, make_valid) -> tuple[list[dict], dict]:
    """Train; return the per-step metrics and the final validation metrics."""
    steps: list[dict] = []
    trainer.on_step_end = lambda step, m: steps.append(dict(m, step=step))
    result = trainer.fit(make_train, make_valid)
    return steps, result["valid"]


def teacher_snapshot(trainer) -> dict[str, torch.Tensor]:
    """This rank's teacher tensors (copies)."""
    teacher = trainer.model_chunks[0].teacher
    return {k: v.detach().clone() for k, v in teacher.state_dict().items() if isinstance(v, torch.Tensor)}
