"""Checkpoints: megatron-core ``dist_checkpointing`` directories with a ``latest`` pointer.

Layout (a contract: ``distill``, ``logits``, ``miniplm``, ``eval`` and ``convert`` read it)::

    CKPT/
      latest                  text: name of the newest complete iteration directory
      model_config.json       the student's ModelConfig (so consumers need no hand-written YAML)
      iter_0000100/
        <dist_checkpointing files>   model (+ optimizer) sharded tensors: any DP size, and any
                                     TP/PP when the padded vocabulary divides the new TP
        meta.json             iteration, padded_vocab_size, model config, tokenizer, extra state
        rng/rank_00000.pt     per-rank RNG states (training checkpoints only)

Atomicity: every rank writes into ``iter_X.tmp``; after a barrier rank 0 renames it to
``iter_X`` and only then rewrites ``latest`` (atomic rename). A crash at any point leaves the
previous ``latest`` intact and loadable.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_kd.models.builder import build_gpt_model
from megatron_kd.models.config import ModelConfig
from megatron_kd.models.sharding import local_padded_vocab_size
from megatron_kd.runtime.distributed import barrier, is_main_process, rank
from megatron_kd.runtime.parallel import unwrap
from megatron_kd.utils.io import atomic_write, read_json, write_json_atomic

LATEST = "latest"
MODEL_CONFIG = "model_config.json"


def iteration_dir_name(iteration: int) -> str:
    """``iter_0000100`` for iteration 100."""
    return f"iter_{iteration:07d}"


_unwrap = unwrap


def _padded_vocab(model_chunks: list[torch.nn.Module]) -> int:
    from megatron_kd.runtime.distributed import world_size
    import torch.distributed as dist

    local = local_padded_vocab_size(_unwrap(model_chunks[0])) or 0
    if world_size() > 1:
        t = torch.tensor([local], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        local = int(t.item())
    return local


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict(prefix="")}
    return {f"model{i}": _unwrap(m).sharded_state_dict(prefix="") for i, m in enumerate(model_chunks)}


def resolve_checkpoint(ckpt_dir: str | Path, iteration: int | None = None) -> Path:
    """The iteration directory to load: ``iteration`` if given, else the one ``latest`` names."""
    ckpt_dir = Path(ckpt_dir)
    if iteration is not None:
        path = ckpt_dir / iteration_dir_name(iteration)
    else:
        pointer = ckpt_dir / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(
                f"checkpoint directory {ckpt_dir} has no '{LATEST}' file: pass a directory written by "
                "megatron-kd pretrain/distill/convert"
            )
        path = ckpt_dir / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete or missing (no meta.json)")
    return path


def read_checkpoint_meta(ckpt_dir: str | Path, iteration: int | None = None) -> dict[str, Any]:
    """``meta.json`` of the chosen iteration, plus ``path`` (its directory)."""
    path = resolve_checkpoint(ckpt_dir, iteration)
    meta = read_json(path / "meta.json", "checkpoint metadata")
    meta["path"] = str(path)
    return meta


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ``ModelConfig`` stored with a checkpoint."""
    path = Path(ckpt_dir) / MODEL_CONFIG
    return ModelConfig.from_dict(read_json(path, "model config"))


def has_checkpoint(ckpt_dir: str | Path | None) -> bool:
    """True when ``ckpt_dir`` holds a complete checkpoint to resume from."""
    return bool(ckpt_dir) and (Path(ckpt_dir) / LATEST).is_file()


def save_checkpoint(ckpt_dir: str | Path, model_chunks: list[torch.nn.Module], model_config: ModelConfig,
                    iteration: int, optimizer=None, scheduler=None, extra: dict[str, Any] | None = None,
                    tokenizer: str | None = None, keep_last: int | None = None) -> Path:
    """Save model (+ optimizer, scheduler, RNG, ``extra`` state) as iteration ``iteration``.

    Collective: every rank must call it. ``extra`` is JSON-serialisable run state (e.g. the data
    position ``consumed_samples``, KD schedule step). Returns the final iteration directory.
    ``keep_last`` deletes older iteration directories beyond the newest N.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iteration_dir_name(iteration)
    tmp = ckpt_dir / (final.name + ".tmp")
    if is_main_process():
        # Remnants of saves that crashed (never renamed, never pointed to by ``latest``).
        for stale in ckpt_dir.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        model_config.save(ckpt_dir / MODEL_CONFIG)
    barrier()
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded.get("model") or sharded)
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "tracker": _rng_tracker_states()}, tmp / "rng" / f"rank_{rank():05d}.pt")
    padded = _padded_vocab(model_chunks)
    barrier()
    if is_main_process():
        meta = {
            "iteration": iteration,
            "padded_vocab_size": padded,
            "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            "model_config": model_config.to_dict(),
            "tokenizer": tokenizer,
            "has_optimizer": optimizer is not None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra or {},
        }
        write_json_atomic(tmp / "meta.json", meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_write(ckpt_dir / LATEST) as fh:
            fh.write(final.name + "\n")
        if keep_last:
            olds = sorted(p for p in ckpt_dir.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in olds[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _rng_tracker_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker().get_states()


def load_checkpoint(ckpt_dir: str | Path, model_chunks: list[torch.nn.Module], optimizer=None, scheduler=None,
                    iteration: int | None = None, load_rng: bool = True) -> dict[str, Any]:
    """Load model (+ optimizer, scheduler, RNG) in place; return the checkpoint's ``meta``.

    Works with any data-parallel size. RNG states are restored only when this rank's file exists
    (same world size); otherwise the caller's seeding stands.
    """
    meta = read_checkpoint_meta(ckpt_dir, iteration)
    path = Path(meta["path"])
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise ValueError(f"checkpoint {path} has no optimizer state: it cannot be resumed, only loaded as weights")
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded.get("model") or sharded, is_loading=True)
    state = dist_checkpointing.load(sharded, str(path))
    if len(model_chunks) == 1:
        _unwrap(model_chunks[0]).load_state_dict(state["model"], strict=False)
    else:
        for i, m in enumerate(model_chunks):
            _unwrap(m).load_state_dict(state[f"model{i}"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / "rng" / f"rank_{rank():05d}.pt"
    if load_rng and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta


def load_model_for_inference(ckpt_dir: str | Path, params_dtype: str | torch.dtype = "fp32",
                             iteration: int | None = None) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """Build this rank's model stage from a checkpoint's own config and load its weights (eval mode).

    Any TP/PP (parallel_state must be initialised); returns ``(model, model_config, meta)``.
    The model is frozen (``requires_grad=False``) — the form a teacher or scorer needs.
    """
    meta = read_checkpoint_meta(ckpt_dir, iteration)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = build_gpt_model(cfg, params_dtype=params_dtype, padded_vocab_size=meta["padded_vocab_size"])
    load_checkpoint(ckpt_dir, [model], iteration=meta["iteration"], load_rng=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg, meta
