"""Reducing loss reports over micro-batches / ranks, and writing them (console, JSONL, TensorBoard, W&B).

A loss ``report`` (third element of a loss function's result) maps names to either a 2-element
tensor ``[sum, count]`` -> reported as ``sum / count`` over the global batch (token-weighted), or a
scalar tensor -> reported as its mean over micro-batches and data-parallel ranks. So whatever the
loss layer reports (``lm``, ``kd``, ``total``, ``alpha``, ...) reaches the metrics file unchanged.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kd.runtime.distributed import is_main_process
from megatron_kd.runtime.parallel import dp_group, dp_sum
from megatron_kd.training.config import LoggingConfig
from megatron_kd.training.trackers import build_trackers
from megatron_kd.utils.io import atomic_write
from megatron_kd.utils.progress import JsonlWriter, progress, read_jsonl_lines


def _pairs(reports: list[dict[str, Any]]) -> dict[str, list[float]]:
    acc: dict[str, list[float]] = {}
    for report in reports:
        for key, value in report.items():
            t = torch.as_tensor(value).detach().float().cpu().reshape(-1)
            s, c = (float(t[0]), float(t[1])) if t.numel() == 2 else (float(t.sum()), float(t.numel()))
            pair = acc.setdefault(key, [0.0, 0.0])
            pair[0] += s
            pair[1] += c
    return acc


def reduce_reports(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Global-batch metrics from the schedule's per-micro-batch reports; the same dict on every rank.

    Collective over all ranks: reports exist only on the last pipeline stage; they are summed over
    data-parallel ranks there and then broadcast down each pipeline.
    """
    result: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage():
        acc = _pairs(reports)
        keys = sorted(acc)
        if keys and dp_group().world_size > 1:
            t = dp_sum(torch.tensor([v for k in keys for v in acc[k]], dtype=torch.float64))
            acc = {k: [float(t[2 * i]), float(t[2 * i + 1])] for i, k in enumerate(keys)}
        result = {k: (s / c if c else float("nan")) for k, (s, c) in acc.items()}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [result]
        group = parallel_state.get_pipeline_model_parallel_group()
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(box, src=last, group=group)
        result = box[0]
    return result


def main_loss(metrics: dict[str, float]) -> float:
    """The loss that is optimised: ``total`` if reported, else ``lm``, else the first key."""
    for key in ("total", "lm"):
        if key in metrics:
            return metrics[key]
    return next(iter(metrics.values())) if metrics else float("nan")


METRICS_OWNER = "metrics_owner.json"


def default_metrics_path(save_dir: str | Path | None) -> Path | None:
    """``<checkpoint.save>/metrics.jsonl``: where a run's metrics go unless ``logging.metrics_path`` says."""
    return Path(save_dir) / "metrics.jsonl" if save_dir else None


def _same_file(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def check_metrics_owner(metrics_path: str | Path | None, save_dir: str | Path | None) -> None:
    """Refuse (one-line ``ValueError``) a metrics file that holds another run's records.

    A run owns ``<save>/metrics.jsonl`` and any file its save directory has claimed (in
    ``<save>/metrics_owner.json``); it resumes into them and truncates them to its checkpoint. Any
    other non-empty file belongs to another run and is never truncated.
    """
    if metrics_path is None or not Path(metrics_path).is_file() or Path(metrics_path).stat().st_size == 0:
        return
    default = default_metrics_path(save_dir)
    if default is not None and _same_file(metrics_path, default):
        return
    if save_dir is not None:
        claim = Path(save_dir) / METRICS_OWNER
        try:
            claimed = json.loads(claim.read_text(encoding="utf-8")).get("metrics_path") if claim.is_file() else None
        except (json.JSONDecodeError, AttributeError):
            claimed = None
        if claimed and _same_file(Path(save_dir) / claimed, metrics_path):
            return
    where = f"<checkpoint.save>/metrics.jsonl = {default}" if default is not None else "a new file"
    raise ValueError(f"logging.metrics_path={metrics_path} holds another run's metrics: it is not truncated; "
                     f"unset logging.metrics_path (default {where}) or choose a new file")


def claim_metrics_path(metrics_path: str | Path | None, save_dir: str | Path | None) -> None:
    """Record in ``<save>/metrics_owner.json`` that this run writes ``metrics_path`` (rank 0)."""
    if metrics_path is None or save_dir is None or not is_main_process():
        return
    default = default_metrics_path(save_dir)
    if _same_file(metrics_path, default):
        return
    target = Path(os.path.relpath(Path(metrics_path).resolve(), Path(save_dir).resolve()))
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(save_dir) / METRICS_OWNER) as fh:
        json.dump({"metrics_path": str(target)}, fh)


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records with ``step > last_step`` (from a run that was killed after its last checkpoint)
    and a torn last line (reported in one line), so a resumed run never duplicates a record."""
    path = Path(path)
    if not is_main_process() or not path.is_file():
        return
    records, torn = read_jsonl_lines(path)
    if torn is not None:
        print(f"{path}: ignored a torn last line ({len(torn.encode())} bytes, a write cut short by a crash "
              "or a full disk)", flush=True)
    kept = [r for r in records if r.get("step", 0) <= last_step]
    if len(kept) != len(records) or torn is not None:
        with atomic_write(path) as fh:
            for r in kept:
                fh.write(json.dumps(r) + "\n")


def _fmt(value: float) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
        return f"{value:.3e}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class MetricsLogger:
    """Rank-0 progress bar + one line per ``log_interval`` steps; JSONL every step; the same records to TensorBoard / W&B."""

    def __init__(self, cfg: LoggingConfig, metrics_path: str | Path | None, train_iters: int, start_iter: int,
                 tokens_per_step: int, log_interval: int, desc: str = "train",
                 tracker_config: dict[str, Any] | None = None):
        self.train_iters, self.tokens_per_step, self.log_interval = train_iters, tokens_per_step, log_interval
        self.start_iter = start_iter
        if metrics_path is not None:
            truncate_metrics(metrics_path, start_iter)
        self.jsonl = JsonlWriter(metrics_path)
        # TensorBoard / W&B get every JSONL record, as SPLIT/NAME scalars (training/trackers.py).
        self.trackers = build_trackers(cfg, metrics_path, tracker_config) if is_main_process() else []
        self.bar = progress(train_iters, desc, unit="step", initial=start_iter, disable=cfg.quiet)
        self._times: list[float] = []
        self._t0 = time.perf_counter()

    def log_train(self, step: int, metrics: dict[str, Any], step_time: float) -> None:
        """Record one optimizer step (``metrics``: loss report + lr, grad_norm, ...)."""
        self._times.append(step_time)
        tokens_per_s = self.tokens_per_step / step_time if step_time > 0 else float("nan")
        record = {"step": step, "split": "train", **metrics, "step_time_s": round(step_time, 6),
                  "tokens_per_s": round(tokens_per_s, 2)}
        self._write(record)
        if not is_main_process():
            return
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", refresh=False)
        if self.log_interval and (step % self.log_interval == 0 or step == self.train_iters):
            recent = self._times[1:] if len(self._times) > 1 else self._times
            mean = sum(recent) / len(recent)
            eta = datetime.timedelta(seconds=int(mean * (self.train_iters - step)))
            shown = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k not in ("consumed_samples",))
            self.bar.write(f"step {step}/{self.train_iters} | {shown} | {self.tokens_per_step / mean:,.0f} tok/s"
                           f" | ETA {eta}")

    def log_eval(self, step: int, metrics: dict[str, float], split: str = "valid") -> None:
        """Record an evaluation (``metrics`` from :func:`reduce_reports` plus ``loss``, ``ppl``)."""
        self._write({"step": step, "split": split, **metrics})
        if is_main_process():
            self.bar.write(f"[{split}] step {step} | " + " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))

    def _write(self, record: dict[str, Any]) -> None:
        self.jsonl.write(record)
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        """Close the bar and files."""
        self.bar.close()
        self.jsonl.close()
        for tracker in self.trackers:
            tracker.close()
