"""Post-training configuration vocabulary: the shared names of ``training.config`` with post-training defaults.

* ``optim`` is :class:`megatron_kd.training.config.OptimConfig` (``lr``, ``min_lr``, ``warmup_iters``,
  ``lr_schedule``, ...); the subclasses here only change defaults (the MiniLLM reference's for
  ``minillm``, the SFT/GKD scripts' for ``sft`` and ``onpolicy``).
* ``model`` (sft from random weights) is :class:`megatron_kd.training.config.ModelSpec` (``preset``
  plus ModelConfig fields); ``model: tiny`` is short for ``model: {preset: tiny}``.
* Older spellings are accepted and renamed with a one-line deprecation note:
  ``optim.warmup_steps`` -> ``optim.warmup_iters``, ``optim.schedule`` -> ``optim.lr_schedule``,
  ``model_overrides.X`` -> ``model.X``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_kd.training.config import LoggingConfig, OptimConfig

_noted: set[str] = set()


def deprecation_note(old: str, new: str) -> None:
    """Print once per process: ``config key 'old' is deprecated: use 'new'``."""
    if old not in _noted:
        _noted.add(old)
        print(f"note: config key '{old}' is deprecated: use '{new}' (same meaning)", file=sys.stderr, flush=True)


def rename_keys(data: dict[str, Any], prefix: str, aliases: dict[str, str]) -> dict[str, Any]:
    """``data`` with each ``old`` key of ``aliases`` renamed to its new name (a note per key). When both
    spellings are present the one given last wins (an override given after the YAML)."""
    for old, new in aliases.items():
        if old in data:
            deprecation_note(prefix + old, prefix + new)
            keys = list(data)
            value = data.pop(old)
            if new not in data or keys.index(old) > keys.index(new):
                data[new] = value
    return data


OPTIM_ALIASES = {"warmup_steps": "warmup_iters", "schedule": "lr_schedule"}


@dataclass
class PostTrainOptimConfig(OptimConfig):
    """``optim`` of post-training: the shared OptimConfig (AdamW, clipping, LR schedule after a linear
    warmup, precision); ``warmup_steps`` / ``schedule`` are accepted as old names of ``warmup_iters`` /
    ``lr_schedule``. Precision follows the command's ``params_dtype``."""

    lr: float = 5e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine / linear decay."""
    weight_decay: float = 1e-2
    """Decoupled (AdamW) weight decay; biases and norm weights are exempt."""
    lr_schedule: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    """constant | cosine | linear | wsd, all after a linear warmup of warmup_iters steps."""

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        return rename_keys(data, prefix, OPTIM_ALIASES)


@dataclass
class MiniLLMOptimConfig(PostTrainOptimConfig):
    """``optim`` of ``minillm``: the shared OptimConfig with the MiniLLM reference's defaults
    (App. B.1: lr 5e-6 constant after 100 warmup steps, weight decay 1e-6)."""

    lr: float = 5e-6
    """Peak learning rate."""
    min_lr: float = 5e-6
    """Learning rate at the end of the decay (the reference sets lr-min = lr)."""
    weight_decay: float = 1e-6
    """Decoupled (AdamW) weight decay."""
    lr_schedule: Literal["constant", "cosine", "linear", "wsd"] = "constant"
    """constant | cosine | linear | wsd, all after a linear warmup of warmup_iters steps."""
    warmup_iters: int = 100
    """Linear warmup length in optimizer steps."""


@dataclass
class RunControl:
    """Run-control keys shared by ``sft``, ``minillm`` and ``onpolicy`` (the Trainer's)."""

    save: str = ""
    """Output checkpoint directory; a rerun of the same command resumes from it."""
    eval_interval: int = 100
    """Evaluate every N optimizer steps (0 = only at the end)."""
    save_interval: int = 100
    """Checkpoint every N optimizer steps (0 = only at the end)."""
    keep_last: int = 0
    """Keep only the newest N checkpoints (0 = keep all)."""
    log_interval: int = 10
    """Print one progress line every N steps (metrics.jsonl gets every step)."""
    exit_interval: int = 0
    """Stop (after checkpointing) when the step is a multiple of this (0 = run to the end)."""
    exit_duration_mins: float = 0.0
    """Stop (after checkpointing) after this many minutes (0 = no limit)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs (metrics_path default `<save>/metrics.jsonl`, TensorBoard, quiet)."""
