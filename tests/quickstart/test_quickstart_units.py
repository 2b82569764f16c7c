"""Fast checks of the quickstart report's statistics (no training)."""
import math

import numpy as np
import pytest

from megatron_kd.miniplm.report import domain_panel
from megatron_kd.quickstart.heldout import paired_bootstrap, verdict


def test_paired_bootstrap_point_estimate_and_interval():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 500, size=80).astype(float)
    base = tokens * rng.uniform(4.0, 6.0, size=80)
    better = base - 0.2 * tokens + rng.normal(0, 2.0, size=80)  # a clear, systematic gain of ~0.2 nats/token
    ci = paired_bootstrap(better, base, tokens, samples=500, seed=1)
    assert ci["delta"] == pytest.approx((better - base).sum() / tokens.sum())
    assert ci["low"] <= ci["delta"] <= ci["high"] < 0
    assert verdict(ci) == "helps"
    same = paired_bootstrap(base + rng.normal(0, 5.0, size=80), base, tokens, samples=500, seed=1)
    assert same["low"] < 0 < same["high"]
    assert verdict(same) == "no measurable effect at this scale"
    worse = paired_bootstrap(base, better, tokens, samples=500, seed=1)
    assert verdict(worse) == "hurts"
    # bits per byte: the same statistic over bytes, scaled by 1/ln 2
    bpb = paired_bootstrap(better, base, tokens * 3, samples=10, seed=1, scale=1 / math.log(2))
    assert bpb["delta"] == pytest.approx(ci["delta"] / 3 / math.log(2))


def test_paired_bootstrap_is_seeded_and_refuses_ragged_input():
    a, b, t = [1.0, 2.0, 3.0], [1.5, 2.5, 2.0], [10, 10, 10]
    assert paired_bootstrap(a, b, t, samples=50, seed=3) == paired_bootstrap(a, b, t, samples=50, seed=3)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1.0], [1.0, 2.0], [1, 1])
    one = paired_bootstrap([1.0], [2.0], [4])
    assert one["delta"] == -0.25 and math.isnan(one["low"]) and verdict(one) == "no measurable effect at this scale"


def test_domain_panel_keeps_the_largest_and_pools_the_rest():
    domains = {f"d{i:03d}": {"instances": i + 1, "kept_instances": (i + 1) // 2, "kept_fraction": ((i + 1) // 2) / (i + 1)}
               for i in range(30)}
    rows = domain_panel(domains, 20)
    assert len(rows) == 21
    assert [r[0] for r in rows[:3]] == ["d029", "d028", "d027"]
    label, frac, n = rows[-1]
    assert label == "other (10 domains)" and n == sum(range(1, 11))
    assert frac == pytest.approx(sum((i + 1) // 2 for i in range(10)) / n)
    assert len(domain_panel(dict(list(domains.items())[:5]), 20)) == 5
