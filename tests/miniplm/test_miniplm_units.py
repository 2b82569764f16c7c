"""MiniPLM building blocks: instance splitting, batch planning, rounding, ties, vocab-parallel NLL."""
import math

import numpy as np
import pytest
import torch

from dist_helpers import run_workers
from megatron_kd.miniplm.batching import plan_steps
from megatron_kd.miniplm.instances import scoring_windows, skipped_tokens, split_instances
from megatron_kd.miniplm.select import merge_pieces, num_to_keep, top_fraction


def test_chunk_instances_do_not_cross_documents():
    lengths = np.array([0, 1, 2, 5, 8, 9])
    inst = split_instances(lengths, chunk_length=4, mode="chunk", min_length=2)
    got = [tuple(int(v) for v in x) for x in inst]
    # doc 1 (1 token) and the 1-token tails of docs 3 and 5 are skipped (no prediction)
    assert got == [(2, 0, 2), (3, 0, 4), (4, 0, 4), (4, 4, 4), (5, 0, 4), (5, 4, 4)]
    assert skipped_tokens(lengths, inst) == 1 + 1 + 1
    inst3 = split_instances(lengths, chunk_length=4, min_length=3)
    assert [tuple(int(v) for v in x) for x in inst3] == [(3, 0, 4), (4, 0, 4), (4, 4, 4), (5, 0, 4), (5, 4, 4)]


def test_document_instances_and_windows():
    lengths = np.array([3, 9, 1, 4])
    inst = split_instances(lengths, chunk_length=4, mode="document")
    assert inst["doc"].tolist() == [0, 1, 3] and inst["length"].tolist() == [3, 9, 4]
    win, owner = scoring_windows(inst, chunk_length=4)
    # doc 1 = 9 tokens -> windows 4 + 4 (+ a 1-token tail with no prediction, dropped)
    assert [(int(w["doc"]), int(w["offset"]), int(w["length"])) for w in win] == \
        [(0, 0, 3), (1, 0, 4), (1, 4, 4), (3, 0, 4)]
    assert owner.tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("bad", [dict(chunk_length=1), dict(mode="sentences"), dict(min_length=1)])
def test_bad_instance_args_fail_in_one_line(bad):
    args = dict(chunk_length=8, mode="chunk", min_length=2) | bad
    with pytest.raises(ValueError, match="--"):
        split_instances(np.array([5]), **args)


@pytest.mark.parametrize("n_mb", [1, 3])
def test_plan_covers_every_window_once(n_mb):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 65, 101)
    steps = plan_steps(lengths, tokens_per_microbatch=128, num_microbatches=n_mb, pad_multiple=8, max_seq_length=63)
    seen = []
    for st in steps:
        assert len({len(r) for r in st.rows}) == 1 and len(st.rows) <= n_mb
        assert st.seq_length <= 64 and st.seq_length * len(st.rows[0]) <= max(128, st.seq_length)
        for r in st.rows:
            real = r[r >= 0]
            assert (lengths[real] - 1 <= st.seq_length).all()
            seen.extend(real.tolist())
    assert sorted(seen) == list(range(101))


def test_keep_count_is_floor_of_decimal_alpha():
    assert num_to_keep(100, 0.57) == 57  # float 0.57*100 = 56.99999999999999
    assert num_to_keep(7, 0.5) == 3 and num_to_keep(10, 0.3) == 3 and num_to_keep(5, 1.0) == 5
    assert num_to_keep(3, 0.2) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--alpha"):
            num_to_keep(10, bad)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.57, 0.9, 1.0])
def test_top_fraction_keeps_exactly_the_highest(alpha):
    rng = np.random.default_rng(1)
    r = np.round(rng.normal(size=1000), 1)  # many ties
    keep = top_fraction(r, alpha)
    k = math.floor(round(alpha * 1000, 6))
    assert keep.sum() == k
    brute = sorted(range(1000), key=lambda i: (-r[i], i))[:k]
    assert set(np.flatnonzero(keep).tolist()) == set(brute)
    if 0 < k < 1000:
        assert r[keep].min() >= r[~keep].max()
    with pytest.raises(ValueError, match="NaN"):
        top_fraction(np.array([1.0, np.nan]), 0.5)


def test_merge_adjacent_pieces():
    doc = np.array([0, 0, 0, 2, 2, 3])
    off = np.array([0, 4, 12, 0, 4, 0])
    ln = np.array([4, 4, 4, 4, 2, 3])
    d, o, n, first = merge_pieces(doc, off, ln)
    assert d.tolist() == [0, 0, 2, 3] and o.tolist() == [0, 12, 0, 0] and n.tolist() == [8, 4, 6, 3]
    assert first.tolist() == [0, 2, 3, 5]
    d, o, n, first = merge_pieces(doc, off, ln, merge=False)
    assert n.tolist() == ln.tolist()


def _nll_case():
    g = torch.Generator().manual_seed(0)
    vocab, padded = 100, 256  # at TP=2 the second shard holds only padding columns
    logits = torch.randn(2, 8, padded, generator=g) * 3
    logits[..., vocab:] = 50.0  # garbage in the padded columns must not count
    targets = torch.randint(0, vocab, (2, 8), generator=g)
    ref = -torch.log_softmax(logits[..., :vocab].double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    mask = torch.ones_like(targets, dtype=torch.bool)
    mask[1, 5:] = False
    return logits, targets, mask, vocab, ref


def _check_nll(ours, sums, counts, ref):
    assert not torch.isnan(ours).any()
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=0)
    assert counts.tolist() == [8, 5]
    torch.testing.assert_close(sums, torch.stack([ref[0].sum(), ref[1, :5].sum()]), atol=1e-4, rtol=0)


def test_nll_matches_float64_single_process():
    from megatron_kd.miniplm.nll import row_nll_sums, vocab_parallel_nll

    logits, targets, mask, vocab, ref = _nll_case()
    ours = vocab_parallel_nll(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), vocab)
    sums, counts = row_nll_sums(logits, targets, mask, vocab, chunk_tokens=3)
    _check_nll(ours.reshape(targets.shape), sums, counts, ref)
    full = torch.ones_like(mask)
    sums_full, _ = row_nll_sums(logits, targets, full, vocab, chunk_tokens=5)  # the no-gather path
    torch.testing.assert_close(sums_full, ref.sum(-1), atol=1e-4, rtol=0)


def test_compiled_nll_kernel_matches_float64():
    """The torch.compile'd fused kernel (the GPU default) on CPU: same numbers, bf16 input too."""
    from megatron_kd.miniplm import nll as nll_mod

    logits, targets, mask, vocab, ref = _nll_case()
    sums, counts = nll_mod.row_nll_sums(logits.clone(), targets, mask, vocab, chunk_tokens=3, kernel="compiled")
    assert not nll_mod._compile_failed, "torch.compile is unavailable: the compiled kernel fell back to eager"
    ours = nll_mod.vocab_parallel_nll(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), vocab, "compiled")
    _check_nll(ours.reshape(targets.shape), sums, counts, ref)
    bf16 = logits.bfloat16()
    ref16 = -torch.log_softmax(bf16[..., :vocab].double(), -1).gather(-1, targets[..., None]).squeeze(-1)
    out16 = nll_mod.vocab_parallel_nll(bf16.reshape(-1, logits.shape[-1]), targets.reshape(-1), vocab, "compiled")
    torch.testing.assert_close(out16.double(), ref16.reshape(-1), atol=2e-5, rtol=0)  # fp32 maths on bf16 input
    with pytest.raises(ValueError, match="--nll-kernel"):
        nll_mod.resolve_kernel("triton")


def _nll_worker(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_kd.miniplm.nll import row_nll_sums, vocab_parallel_nll
    from megatron_kd.models import mask_padded_vocab
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    logits, targets, mask, vocab, ref = _nll_case()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    per = logits.shape[-1] // world_size
    shard = logits[..., tp_rank * per:(tp_rank + 1) * per].clone()
    ours = vocab_parallel_nll(shard.reshape(-1, per), targets.reshape(-1), vocab).reshape(targets.shape)
    megatron = vocab_parallel_cross_entropy(mask_padded_vocab(shard.clone(), vocab), targets)
    sums, counts = row_nll_sums(shard, targets, mask, vocab, chunk_tokens=3)
    _check_nll(ours, sums, counts, ref)
    torch.testing.assert_close(megatron.double(), ref, atol=2e-5, rtol=0)  # our NLL == megatron's CE
    return True


def test_vocab_parallel_nll_tp2_matches_float64_and_megatron():
    assert run_workers(_nll_worker, 2) == [True, True]


def test_cache_chunks_give_the_one_matmul_bits():
    """CPU cache-sized NLL chunks (issue 15): every row covered once, no tail of < 16 rows, and
    the fused per-chunk NLL equal, bit for bit, to the NLL of the whole [tokens, V] logits."""
    from megatron_kd.miniplm.nll import hidden_nll_sbv, token_nll_sbv
    from megatron_kd.models.head import cache_chunks

    cpu = torch.device("cpu")
    for n, width in ((0, 100), (5, 8192), (64, 8192), (65, 8192), (1000, 8192), (2048, 4096), (70, 151936)):
        bounds = cache_chunks(n, 2048, width, cpu)
        if not n:
            assert bounds == []
            continue
        assert [lo for lo, _ in bounds] == [0] + [hi for _, hi in bounds[:-1]] and bounds[-1][1] == n
        assert len(bounds) == 1 or min(hi - lo for lo, hi in bounds) >= 16
    assert cache_chunks(5000, 2048, 8192, torch.device("cuda")) == [(0, 2048), (2048, 4096), (4096, 5000)]
    torch.manual_seed(0)
    s, b, h, vocab = 130, 3, 32, 1000
    hidden, weight = torch.randn(s, b, h), torch.randn(1024, h) / 4
    labels = torch.randint(0, vocab, (b, s))
    labels[1, 100:] = -1
    fused = hidden_nll_sbv(hidden, weight, labels, vocab, chunk_tokens=2048)
    full = token_nll_sbv(torch.matmul(hidden, weight.t()), labels, vocab, chunk_tokens=4096)
    assert torch.equal(fused, full)
