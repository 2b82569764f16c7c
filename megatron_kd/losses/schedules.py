"""Schedules for the KD weight alpha, driven by the training step."""
from __future__ import annotations

from megatron_kd.losses.config import KDLossConfig


def _lerp(a: float, b: float, frac: float) -> float:
    return a + (b - a) * min(max(frac, 0.0), 1.0)


def alpha_at(cfg: KDLossConfig, step: int, total_steps: int) -> float:
    """The KD weight alpha at ``step`` (0-based) of a run of ``total_steps`` optimizer steps.

    * ``constant``: ``cfg.alpha``.
    * ``linear``: from ``alpha_start`` (default ``alpha``) at step 0 to ``alpha_end`` (default
      ``alpha``) at step ``total_steps``, linear in between.
    * ``wsd``: warmup-stable-decay, the shape of a WSD learning rate: linear from ``alpha_start``
      (default 0) to ``alpha`` over the first ``wsd_warmup_fraction * total_steps`` steps, then
      ``alpha``, then linear down to ``alpha_end`` (default 0) over the last
      ``wsd_decay_fraction * total_steps`` steps.

    Steps outside ``[0, total_steps]`` are clamped. Returns a Python float in [0, 1].
    """
    if cfg.alpha_schedule == "constant":
        return float(cfg.alpha)
    if total_steps < 1:
        raise ValueError(
            f"kd.alpha_schedule={cfg.alpha_schedule!r} needs total_steps >= 1, got {total_steps}"
        )
    step = min(max(int(step), 0), int(total_steps))
    if cfg.alpha_schedule == "linear":
        start = cfg.alpha if cfg.alpha_start is None else cfg.alpha_start
        end = cfg.alpha if cfg.alpha_end is None else cfg.alpha_end
        return float(_lerp(start, end, step / total_steps))
    start = 0.0 if cfg.alpha_start is None else cfg.alpha_start
    end = 0.0 if cfg.alpha_end is None else cfg.alpha_end
    warmup = cfg.wsd_warmup_fraction * total_steps
    decay = cfg.wsd_decay_fraction * total_steps
    if warmup > 0 and step < warmup:
        return float(_lerp(start, cfg.alpha, step / warmup))
    decay_start = total_steps - decay
    if decay > 0 and step > decay_start:
        return float(_lerp(cfg.alpha, end, (step - decay_start) / decay))
    return float(cfg.alpha)
