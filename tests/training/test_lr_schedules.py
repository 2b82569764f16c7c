"""LR schedules (megatron's OptimizerParamScheduler as we configure it) against closed-form formulas."""
import math

import pytest

from megatron_kd.training.config import OptimConfig
from megatron_kd.training.optim import build_scheduler


class _FakeOptimizer:
    def __init__(self):
        self.param_groups = [{"params": [], "wd_mult": 1.0, "default_config": True},
                             {"params": [], "wd_mult": 0.0, "default_config": True}]


def _reference_lr(k: int, cfg: OptimConfig, total: int, warmup: int, decay: int) -> float:
    """lr used by optimizer step k (1-based), written independently of megatron."""
    if warmup and k <= warmup:
        return cfg.lr * k / warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        ratio = (k - warmup) / (total - warmup)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * ratio))
    start = total - decay  # WSD: stable until here, then decay to min_lr at step `total`
    if k <= start:
        return cfg.lr
    r = (k - start) / decay
    coeff = {"linear": 1 - r, "cosine": 0.5 * (1 + math.cos(math.pi * r)),
             "exponential": 2 * 0.5 ** r - 1, "minus_sqrt": 1 - math.sqrt(r)}[cfg.wsd_decay_style]
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * coeff


def _lrs(cfg: OptimConfig, total: int) -> list[float]:
    opt = _FakeOptimizer()
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        sched.step(1)  # what the Trainer does right before optimizer.step()
        out.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["weight_decay"] == 0.0  # no decay on biases / norms
        assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay
    return out


@pytest.mark.parametrize("kw, warmup, decay", [
    (dict(lr_schedule="constant", warmup_iters=10), 10, 0),
    (dict(lr_schedule="cosine", warmup_fraction=0.1), 10, 0),
    (dict(lr_schedule="cosine"), 0, 0),
    (dict(lr_schedule="wsd", warmup_iters=5, wsd_decay_fraction=0.2), 5, 20),
    (dict(lr_schedule="wsd", warmup_iters=5, wsd_decay_fraction=0.2, wsd_decay_style="cosine"), 5, 20),
    (dict(lr_schedule="wsd", wsd_decay_fraction=0.3, wsd_decay_style="exponential"), 0, 30),
    (dict(lr_schedule="wsd", wsd_decay_fraction=0.3, wsd_decay_style="minus_sqrt"), 0, 30),
])
def test_schedule_matches_closed_form(kw, warmup, decay):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, weight_decay=0.1, **kw)
    total = 100
    got = _lrs(cfg, total)
    want = [_reference_lr(k, cfg, total, warmup, decay) for k in range(1, total + 1)]
    for k, (g, w) in enumerate(zip(got, want), start=1):
        assert g == pytest.approx(w, rel=1e-12, abs=1e-15), f"step {k}"
    if warmup:
        assert got[warmup - 1] == pytest.approx(cfg.lr)  # peak reached exactly at the end of warmup
    if cfg.lr_schedule != "constant":
        assert got[-1] == pytest.approx(cfg.min_lr)


def test_resumed_scheduler_continues_exactly():
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, lr_schedule="wsd", warmup_iters=3, wsd_decay_fraction=0.5)
    opt = _FakeOptimizer()
    first = build_scheduler(opt, cfg, 20)
    for _ in range(7):
        first.step(1)
    state = first.state_dict()
    opt2 = _FakeOptimizer()
    second = build_scheduler(opt2, cfg, 20)
    second.load_state_dict(state)
    for _ in range(13):
        first.step(1)
        second.step(1)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
