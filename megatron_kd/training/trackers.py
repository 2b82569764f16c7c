"""Experiment trackers: TensorBoard and Weights & Biases receive what the JSONL metrics file records.

Every record :class:`megatron_kd.training.metrics.MetricsLogger` writes to the JSONL file,
``{"step": S, "split": SPLIT, NAME: VALUE, ...}``, goes to each enabled tracker as scalars named
``SPLIT/NAME`` at step ``S`` (non-numeric and non-finite values are skipped). So ``train/loss``,
``train/kd``, ``train/lr``, ``train/tokens_per_s``, ``valid/loss``, ``valid/ppl`` ... are the
JSONL's keys, nothing renamed (the JSONL's wall-clock ``time`` is each tracker's own timestamp).

- TensorBoard: ``logging.tensorboard_dir=DIR`` (``pip install megatron-kd[tb]``).
- Weights & Biases: ``logging.wandb_project=NAME`` (``pip install megatron-kd[wandb]``), with
  ``logging.wandb_entity``, ``logging.wandb_name``, ``logging.wandb_dir`` (default: the directory of
  the metrics file, i.e. the checkpoint directory) and ``logging.wandb_mode`` (``online``,
  ``offline``: no network, ``wandb sync`` later; ``disabled``; unset: wandb's own default /
  ``WANDB_MODE``). A resumed run continues the same W&B run (its id is kept in
  ``<wandb_dir>/wandb_run.json``).

Trackers live on rank 0 only; the package is checked when the config is validated
(:func:`check_trackers`), so a missing one fails in one line before any model is built.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from megatron_kd.utils.io import atomic_write

WANDB_RUN_FILE = "wandb_run.json"


class Tracker(Protocol):
    """Something that receives one JSONL record at a time."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """``{"SPLIT/NAME": value}`` of a JSONL record's finite numeric fields (``step``/``split`` excluded)."""
    split = record.get("split", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{split}/{key}"] = float(value)
    return out


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_trackers(cfg: Any) -> None:
    """One-line ``ValueError`` when a configured tracker's package is missing or a setting is invalid."""
    if getattr(cfg, "tensorboard_dir", None) and not _installed("tensorboard"):
        raise ValueError("logging.tensorboard_dir is set but tensorboard is not installed: "
                         "pip install 'megatron-kd[tb]' (or tensorboard), or unset logging.tensorboard_dir")
    if getattr(cfg, "wandb_project", None):
        if not _installed("wandb"):
            raise ValueError("logging.wandb_project is set but wandb is not installed: "
                             "pip install 'megatron-kd[wandb]' (or wandb), or unset logging.wandb_project")
    elif any(getattr(cfg, k, None) for k in ("wandb_entity", "wandb_name", "wandb_dir", "wandb_mode")):
        raise ValueError("logging.wandb_entity/_name/_dir/_mode are set but logging.wandb_project is not: "
                         "set logging.wandb_project=<name> to log to Weights & Biases")


class TensorBoardTracker:
    """Scalars into a TensorBoard event file under ``log_dir``."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker:
    """One W&B run; resumed (same id) when ``<dir>/wandb_run.json`` names one from an earlier launch."""

    def __init__(self, project: str, directory: str | Path, entity: str | None = None, name: str | None = None,
                 mode: str | None = None, config: dict[str, Any] | None = None):
        import wandb

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / WANDB_RUN_FILE
        run_id = None
        if id_file.is_file():
            try:
                run_id = json.loads(id_file.read_text(encoding="utf-8")).get("id")
            except (json.JSONDecodeError, AttributeError):
                run_id = None
        kwargs: dict[str, Any] = {"project": project, "dir": str(directory), "config": config or {}}
        if entity:
            kwargs["entity"] = entity
        if name:
            kwargs["name"] = name
        if mode:
            kwargs["mode"] = mode
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        self.run = wandb.init(**kwargs)
        self._step = -1
        rid = getattr(self.run, "id", None)
        if rid and rid != run_id:
            with atomic_write(id_file) as fh:
                json.dump({"id": rid, "project": project}, fh)

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if not values:
            return
        step = int(record.get("step", 0))
        # W&B steps must not decrease; a record for an earlier step (resume) is logged with the
        # step as a field instead.
        if step >= self._step:
            self._step = step
            self.run.log(values, step=step)
        else:
            self.run.log({**values, "step": step})

    def close(self) -> None:
        self.run.finish()


def build_trackers(cfg: Any, metrics_path: str | Path | None, config: dict[str, Any] | None = None) -> list[Tracker]:
    """The trackers ``cfg`` (a :class:`LoggingConfig`) enables; call on rank 0 only."""
    trackers: list[Tracker] = []
    if getattr(cfg, "tensorboard_dir", None):
        trackers.append(TensorBoardTracker(cfg.tensorboard_dir))
    if getattr(cfg, "wandb_project", None):
        directory = cfg.wandb_dir or (Path(metrics_path).parent if metrics_path else Path(os.getcwd()))
        trackers.append(WandbTracker(cfg.wandb_project, directory, entity=cfg.wandb_entity, name=cfg.wandb_name,
                                     mode=cfg.wandb_mode, config=config))
    return trackers
