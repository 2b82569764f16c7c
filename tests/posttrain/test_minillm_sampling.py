"""Vocab-parallel sampling: distributions (chi-square, fixed seed), top-k/top-p vs a float64
sort-based reference, teacher-mixed sampling draws from (1-a) q + a p, TP=2 == TP=1."""
import math

import torch

from dist_helpers import run_workers
from minillm_test_utils import plain, tensors
from megatron_kd.posttrain.sampling import SamplingConfig, apply_top_k, apply_top_p, hash_uniform, sample_next


def _chi2_crit(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the 0.999 chi-square quantile."""
    a = 2.0 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    expected = probs.double() * n
    big = expected >= 5  # pool the rare cells into one
    e = torch.cat([expected[big], expected[~big].sum().view(1)])
    o = torch.cat([counts[big].double(), counts[~big].sum().double().view(1)])
    keep = e > 0
    stat = (((o - e) ** 2) / e)[keep].sum().item()
    return stat, int(keep.sum()) - 1


def _draws(logits, cfg, n, teacher=None, alpha=0.0, seed=1234):
    rows = torch.arange(n)
    lg = logits.expand(n, -1)
    tl = None if teacher is None else teacher.expand(n, -1)
    return sample_next(lg, cfg, seed, rows, 7, tl, alpha)


def test_hash_uniform_is_uniform_and_keyed():
    u = hash_uniform(5, torch.arange(64), 3, torch.arange(1000))
    assert u.min() > 0 and u.max() < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    stat, df = _chi2(counts, torch.full((20,), 0.05), u.numel())
    assert stat < _chi2_crit(df)
    assert not torch.equal(u, hash_uniform(6, torch.arange(64), 3, torch.arange(1000)))
    assert not torch.equal(u, hash_uniform(5, torch.arange(64), 4, torch.arange(1000)))
    # A column's noise does not depend on which other columns are computed (TP-shard invariant).
    torch.testing.assert_close(u[:, 500:], hash_uniform(5, torch.arange(64), 3, torch.arange(500, 1000)))


def test_sampling_matches_softmax_with_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g) * 2
    n = 40000
    for temp in (1.0, 0.7):
        ids = _draws(logits, SamplingConfig(temperature=temp), n)
        counts = torch.bincount(ids, minlength=40)
        stat, df = _chi2(counts, torch.softmax(logits[0].double() / temp, -1), n)
        assert stat < _chi2_crit(df), (temp, stat, df)


def test_teacher_mixed_sampling_draws_from_mixture():
    g = torch.Generator().manual_seed(1)
    q_logits = torch.randn(1, 30, generator=g) * 2
    p_logits = torch.randn(1, 30, generator=g) * 2
    alpha, n = 0.2, 40000
    ids = _draws(q_logits, SamplingConfig(), n, teacher=p_logits, alpha=alpha)
    counts = torch.bincount(ids, minlength=30)
    q = torch.softmax(q_logits[0].double(), -1)
    p = torch.softmax(p_logits[0].double(), -1)
    stat, df = _chi2(counts, (1 - alpha) * q + alpha * p, n)
    assert stat < _chi2_crit(df), stat
    # ... and clearly not from q alone or p alone.
    assert _chi2(counts, q, n)[0] > 10 * _chi2_crit(df)
    assert _chi2(counts, p, n)[0] > 10 * _chi2_crit(df)


def _ref_top_k_top_p(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """float64 reference: HF-style sort-based filtering; returns the kept mask."""
    x = logits.double()
    keep = torch.ones_like(x, dtype=torch.bool)
    if k > 0:
        kth = x.topk(k, -1).values[:, -1:]
        keep &= x >= kth
    if p < 1:
        masked = x.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(masked, -1)
        sp, idx = probs.sort(-1, descending=True)
        above = sp.cumsum(-1) - sp  # mass strictly more probable than each id
        keep_sorted = above < p
        keep_p = torch.zeros_like(keep).scatter(-1, idx, keep_sorted)
        keep &= keep_p
    return keep


def test_top_k_top_p_equal_sort_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 300, generator=g) * 3
    for k, p in [(0, 0.9), (20, 1.0), (50, 0.8), (0, 0.3), (5, 0.99), (0, 1e-6)]:
        out = apply_top_p(apply_top_k(logits, k), p)
        assert torch.equal(torch.isfinite(out), _ref_top_k_top_p(logits, k, p)), (k, p)
    # Sampling never leaves the kept set.
    ids = _draws(logits[:1], SamplingConfig(top_k=10, top_p=0.7), 2000)
    kept = _ref_top_k_top_p(logits[:1], 10, 0.7)[0]
    assert kept[ids].all()


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 77, generator=g)
    ids = sample_next(logits, SamplingConfig(greedy=True), 0, torch.arange(5), 0)
    assert torch.equal(ids, logits.argmax(-1))


def _tp_sampling_worker(rank, world_size, logits, teacher):
    from megatron_kd.posttrain.vocab import shard_offset
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    local = logits.shape[-1] // world_size
    s = slice(rank * local, (rank + 1) * local)
    assert shard_offset(local) == rank * local
    rows = torch.arange(logits.shape[0])
    out = {}
    for name, cfg, alpha in [("plain", SamplingConfig(), 0.0), ("temp_topk_topp", SamplingConfig(0.8, 40, 0.9), 0.0),
                             ("greedy", SamplingConfig(greedy=True), 0.0), ("mixed", SamplingConfig(), 0.2),
                             ("mixed_topp", SamplingConfig(top_p=0.5), 0.2)]:
        out[name] = sample_next(logits[:, s], cfg, 99, rows, 11, teacher[:, s], alpha)
    return plain(out)


def test_tp2_samples_equal_tp1():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 256, generator=g) * 2
    teacher = torch.randn(64, 256, generator=g) * 2
    logits[:, 250:] = float("-inf")  # padded vocabulary columns
    teacher[:, 250:] = float("-inf")
    ref = tensors(_tp_sampling_worker(0, 1, logits, teacher))  # TP=1 reference in this process
    outs = tensors(run_workers(_tp_sampling_worker, 2, logits, teacher))
    for out in outs:
        for name in ref:
            assert torch.equal(out[name], ref[name]), name
    assert (ref["plain"] < 250).all()
