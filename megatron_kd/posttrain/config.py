"""Post-training configuration vocabulary: the shared names of ``training.config`` with post-training defaults.

* ``optim`` is :class:`megatron_kd.training.config.OptimConfig` (``lr``, ``min_lr``, ``warmup_iters``,
  ``lr_schedule``, ...); the subclasses here only change defaults (the MiniLLM reference's for
  ``minillm``, the SFT/GKD scripts' for ``sft`` and ``onpolicy``).
* ``model`` (sft from random weights) is :class:`megatron_kd.training.config.ModelSpec` (``preset``
  plus ModelConfig fields); ``model: tiny`` is short for ``model: {preset: tiny}``.
* Run control uses pretrain's sections and names: ``train`` is
  :class:`megatron_kd.training.config.TrainScheduleConfig` (``train.train_iters``, ``train.seed``,
  ``train.eval_interval``, ``train.log_interval``, ``train.exit_interval``, ...), ``checkpoint`` is
  :class:`megatron_kd.training.config.CheckpointConfig` (``checkpoint.save``, ``checkpoint.save_interval``,
  ``checkpoint.keep_last``, ...), ``logging`` is :class:`megatron_kd.training.config.LoggingConfig`; the
  subclasses here only change defaults.
* Older spellings are accepted and renamed with a one-line deprecation note:
  ``optim.warmup_steps`` -> ``optim.warmup_iters``, ``optim.schedule`` -> ``optim.lr_schedule``,
  ``model_overrides.X`` -> ``model.X``, and the flat run-control keys of :data:`RUN_KEY_MOVES`
  (``save`` -> ``checkpoint.save``, ``total_steps`` -> ``train.train_iters``, ...).
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megatron_kd.training.config import CheckpointConfig, LoggingConfig, OptimConfig, TrainScheduleConfig

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


def _lookup(data: dict[str, Any], parts: list[str]) -> Any:
    node: Any = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def move_keys(data: dict[str, Any], prefix: str, moves: dict[str, str]) -> dict[str, Any]:
    """``data`` with each dotted ``old`` key of ``moves`` moved to its dotted ``new`` place (a one-line
    note per key; ``data`` itself is not changed). When both spellings are present the one written later
    wins (compared where the two paths part: ``save`` vs ``checkpoint`` for ``save -> checkpoint.save``);
    :func:`megatron_kd.config.load_config` normalises the YAML and the overrides separately, so an
    override wins over the YAML in either spelling."""
    present = [(old, new) for old, new in moves.items()
               if isinstance(_lookup(data, old.split(".")[:-1]), dict) and old.split(".")[-1] in
               _lookup(data, old.split(".")[:-1])]
    if not present:
        return data
    data = copy.deepcopy(data)
    for old, new in present:
        deprecation_note(prefix + old, prefix + new)
        op, np_ = old.split("."), new.split(".")
        k = next(i for i in range(min(len(op), len(np_))) if op[i] != np_[i])
        parting = _lookup(data, op[:k])
        keys = list(parting)
        new_parent = _lookup(data, np_[:-1])
        new_given = isinstance(new_parent, dict) and np_[-1] in new_parent
        old_later = not new_given or keys.index(op[k]) > keys.index(np_[k])
        value = _lookup(data, op[:-1]).pop(op[-1])
        if old_later:
            node = data
            for part in np_[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[np_[-1]] = value
    return data


RUN_KEY_MOVES = {
    "save": "checkpoint.save", "save_interval": "checkpoint.save_interval", "keep_last": "checkpoint.keep_last",
    "eval_interval": "train.eval_interval", "log_interval": "train.log_interval",
    "exit_interval": "train.exit_interval", "exit_duration_mins": "train.exit_duration_mins",
}
"""Flat run-control keys of post-training before the shared vocabulary -> pretrain's names (every command;
``total_steps`` / ``seed`` moved from the command's own section are in each run config)."""


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
class SFTScheduleConfig(TrainScheduleConfig):
    """``train`` of ``sft``: the shared schedule keys with the SFT defaults."""

    train_iters: int = 0
    """Optimizer steps of the whole run (0 = sft.epochs passes over the training data)."""
    eval_interval: int = 100
    """Evaluate on valid_data every this many steps (0 = only at the end)."""
    seed: int = 1
    """Seed of the data order."""


@dataclass
class OnPolicyScheduleConfig(TrainScheduleConfig):
    """``train`` of ``onpolicy``: the shared schedule keys with the GKD / DistiLLM defaults."""

    train_iters: int = 1000
    """Optimizer steps of the whole run (the LR schedule and DistiLLM's generation schedule span them)."""
    eval_interval: int = 100
    """Evaluate (valid_data / eval_data) every this many steps (0 = only at the end)."""
    seed: int = 1
    """Seed of the data order, the source draws and the sampling noise."""


@dataclass
class MiniLLMScheduleConfig(TrainScheduleConfig):
    """``train`` of ``minillm``: the shared schedule keys with the MiniLLM reference's defaults."""

    train_iters: int = 5000
    """Optimizer steps of the whole run (reference --total-iters 5000)."""
    eval_interval: int = 100
    """Evaluate on eval_data every this many steps (0 = only at the end)."""
    seed: int = 10
    """Seed of prompt order, sampling noise and mini-batch shuffles."""


@dataclass
class PostTrainCheckpointConfig(CheckpointConfig):
    """``checkpoint`` of post-training: the shared CheckpointConfig. A rerun of the same command resumes
    from ``save``; ``load`` resumes from another run's checkpoint (``finetune``: its weights only)."""

    save: Optional[str] = None
    """Output checkpoint directory (required); a rerun of the same command resumes from it."""
    save_interval: int = 100
    """Checkpoint every this many steps (0 = only at the end of the run)."""
    tokenizer: Optional[str] = None
    """Tokenizer path/reference recorded in the checkpoint (defaults to the run's tokenizer)."""


@dataclass
class MiniLLMCheckpointConfig(PostTrainCheckpointConfig):
    """``checkpoint`` of ``minillm`` (the reference saves every 500 steps)."""

    save_interval: int = 500
    """Checkpoint every this many steps (0 = only at the end of the run)."""


@dataclass
class RunControl:
    """The flat run control of :func:`megatron_kd.posttrain.steps.fit` for runs built in code (tests,
    benchmarks). Commands spell these keys as pretrain does (``checkpoint.save``, ``train.eval_interval``,
    ...; see :data:`RUN_KEY_MOVES`)."""

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
