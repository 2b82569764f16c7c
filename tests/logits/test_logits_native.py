"""The C kernel of the CPU top-p/top-k selection (issue 15 item 3) against the torch path and float64.

The ids and order of the definition (a float64 lexsort), the counts of the torch path
(``MEGATRON_KD_NATIVE=0``) on ties, signed zeros,
-inf padding, all -inf and +inf rows, vocabularies that are not multiples of 8, padded columns,
strided rows and threads; the log-sum-exp within float32 rounding of a float64 reference; a NaN
row falls back to the torch path.
"""
import numpy as np
import pytest
import torch

from megatron_kd.logits import codec, native, truncation
from megatron_kd.logits.truncation import flatten_selection, select_top_p_top_k

pytestmark = pytest.mark.skipif(not native.available(), reason="C selection kernel not built / not supported here")


def _torch_path(monkeypatch, *args):
    monkeypatch.setenv(native.ENV, "0")
    try:
        return select_top_p_top_k(*args)
    finally:
        monkeypatch.delenv(native.ENV)


def _rows(vocab: int, rows: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.3, 9.0, rows).unsqueeze(1)
    x[1] = torch.round(x[1] * 2) / 2  # many exact ties, also at the top-k boundary
    x[2] = 0.0
    x[2, ::3] = -0.0
    x[3, min(100, vocab // 2):] = float("-inf")
    x[4] = float("-inf")
    x[5, 3] = x[5, 9] = float("inf")
    x[6] = 1.25  # one value everywhere
    return x


def _assert_same_selection(got, want, x, vocab):
    (i1, l1, n1), (i2, l2, n2) = got, want
    assert torch.equal(n1, n2)
    for t in range(len(n1)):
        n = int(n1[t])
        # the definition: decreasing value, ties smaller id first (the torch path's top-k may take
        # other members of a tie at the k-th value, so it is not the reference for the ids)
        row = x[t, :vocab].double().numpy()
        want_ids = np.lexsort((np.arange(vocab), -row))[:n]
        assert i1[t, :n].tolist() == want_ids.tolist(), t
        assert sorted(row[i2[t, :n].numpy()].tolist()) == sorted(row[want_ids].tolist())
    valid = torch.arange(i1.shape[1]).unsqueeze(0) < n1.unsqueeze(1)
    lse64 = torch.logsumexp(x[:, :vocab].double(), -1)
    tol = 4 * torch.finfo(torch.float32).eps * lse64.abs().clamp(min=1.0)  # ulps of the log-sum-exp
    diff = (l1.double() - l2.double()).abs()
    ok = (diff <= tol.unsqueeze(1)) | (l1.isnan() & l2.isnan()) | (l1 == l2)
    assert bool(ok[valid].all())


@pytest.mark.parametrize("vocab,k,top_p", [(4096, 100, 0.95), (4096, 16, 0.6), (4001, 100, 0.99), (300, 300, 1.0),
                                           (37, 5, 0.9), (8192, 7, 0.5), (1000, 1, 0.95)])
def test_native_equals_torch_path(monkeypatch, vocab, k, top_p):
    x = _rows(vocab, seed=vocab + k)
    got = select_top_p_top_k(x, vocab, top_p, k)
    _assert_same_selection(got, _torch_path(monkeypatch, x, vocab, top_p, k), x, vocab)
    if top_p >= 1.0:  # every entry of finite log-prob up to top_k, whatever the rounding of the normaliser
        finite = torch.isfinite(torch.log_softmax(x[:, :vocab].double(), -1)).sum(-1)
        assert torch.equal(got[2], finite.clamp(1, k))
    # the kept entries in id order (the codec's input), against the codec's numpy flattening
    fi, fl = flatten_selection(*got)
    ci, cl = codec.flatten_rows(got[0].numpy(), got[1].numpy(), got[2].numpy())
    assert np.array_equal(fi.numpy(), ci) and np.array_equal(fl.numpy(), cl, equal_nan=True)


def test_native_padding_strides_and_lse():
    vocab, padded = 3000, 3072
    wide = _rows(3200, rows=24, seed=5)
    x = wide[:, :padded]  # strided rows; columns >= vocab are padding (ignored, not masked here)
    assert not x.is_contiguous()
    ids, lp, n, lse = native.select_native(x, vocab, 50, 0.9)
    _, _, ref_n = truncation._select(x.contiguous().masked_fill(
        torch.arange(padded) >= vocab, float("-inf")), vocab, 0.9, 50, None, None, 1)
    assert torch.equal(n, ref_n) and bool((ids < vocab).all())
    lse64 = torch.logsumexp(x[:, :vocab].double(), -1)
    finite = torch.isfinite(lse64)
    np.testing.assert_allclose(lse[finite].double().numpy(), lse64[finite].numpy(), rtol=3e-7, atol=1e-6)
    assert lse[4] == float("-inf") and lse[5] == float("inf")
    for t in range(len(n)):
        want = np.lexsort((np.arange(vocab), -x[t, :vocab].double().numpy()))[:int(n[t])]
        assert ids[t, :int(n[t])].tolist() == want.tolist()
    # log-probs against float64 log_softmax where they are finite
    lp64 = torch.log_softmax(x[:, :vocab].double(), -1).gather(1, ids)
    sel = torch.isfinite(lp64) & (torch.arange(50).unsqueeze(0) < n.unsqueeze(1))
    np.testing.assert_allclose(lp[sel].double().numpy(), lp64[sel].numpy(), atol=1e-5)


def test_native_large_vocabulary_and_threads(monkeypatch):
    vocab = 151_936
    x = torch.randn(70, vocab, generator=torch.Generator().manual_seed(9)) * 3.0
    x[:, :50] += 6.0  # a few frequent ids on top, as a trained LM
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.select_native(x, vocab, 100, 0.95)
        torch.set_num_threads(2)  # rows split over two threads (>= 32 rows each)
        two = native.select_native(x, vocab, 100, 0.95)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    _assert_same_selection(one[:3], _torch_path(monkeypatch, x, vocab, 0.95, 100), x, vocab)


def test_nan_row_takes_the_torch_path(monkeypatch):
    x = _rows(512, rows=8, seed=3)
    x[7, 11] = float("nan")
    assert native.select_native(x, 512, 20, 0.9) is None
    got = select_top_p_top_k(x, 512, 0.9, 20)
    want = _torch_path(monkeypatch, x, 512, 0.9, 20)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    assert not native.available() and native.select_native(_rows(64, rows=8), 64, 4, 0.9) is None


def _store_rows(rng, T, K, vocab, segments):
    counts = rng.integers(0, K + 1, T)
    counts[rng.random(T) < 0.1] = 0
    ids = [np.sort(rng.choice(vocab, c, replace=False)) for c in counts]
    lps = [(-rng.exponential(3.0, c) - rng.random()).astype(np.float32) for c in counts]
    cuts = np.sort(rng.integers(0, T + 1, segments - 1))
    return (counts, np.concatenate(ids + [np.zeros(0, np.int64)]).astype(np.int64),
            np.concatenate(lps + [np.zeros(0, np.float32)]), np.diff(np.concatenate([[0], cuts, [T]])))


def test_native_encoder_gives_the_numpy_bytes():
    """The C top-k encoder (issue 15) writes the numpy encoder's payload and tables byte for byte:
    empty tokens and segments, 1-255 entries, 6- to 19-bit ids, three value steps."""
    rng = np.random.default_rng(11)
    for case in range(120):
        T, K = int(rng.integers(0, 300)), int(rng.choice([1, 5, 40, 100, 255]))
        vocab = int(rng.choice([50, 4096, 151_936, 300_000]))
        counts, ids, lp, seg = _store_rows(rng, T, min(K, vocab), vocab, int(rng.integers(1, 6)))
        bits, step = codec.id_bits_for(vocab), float(rng.choice([1 / 16, 1 / 128, 0.5]))
        got = native.encode_topk(counts, ids, lp, seg, bits, step, codec.VALUE_WIDTHS, codec.MAX_VALUE_Q)
        want = codec._encode(counts, ids, lp, seg, bits, step, None, codec.Layout(bits, step))
        assert got is not None, case
        payload, count, widths, top, seg_bytes = got
        assert np.array_equal(payload, want.payload) and np.array_equal(count, want.count), case
        assert np.array_equal(widths, want.widths) and np.array_equal(seg_bytes, want.segment_bytes), case
        assert np.array_equal(top.view(np.uint16), want.top.view(np.uint16)), case
        # and through encode() (the store writer's call), decodable to the same entries
        enc = codec.encode(counts, ids, lp, seg, bits, step)
        assert np.array_equal(enc.payload, want.payload) and enc.num_entries == len(ids)


def test_native_encoder_leaves_bad_input_to_numpy():
    rng = np.random.default_rng(12)
    counts, ids, lp, seg = _store_rows(rng, 50, 20, 4096, 2)
    j = int(np.flatnonzero(counts >= 2)[0])
    start = int(counts[:j].sum())
    ids[start], ids[start + 1] = ids[start + 1], ids[start]  # not increasing inside a token
    assert native.encode_topk(counts, ids, lp, seg, 12, 1 / 16, codec.VALUE_WIDTHS, codec.MAX_VALUE_Q) is None
    with pytest.raises(ValueError, match="increasing"):
        codec.encode(counts, ids, lp, seg, 12, 1 / 16)
    assert native.encode_topk(counts, ids, lp.astype(np.float64), seg, 12, 1 / 16, codec.VALUE_WIDTHS,
                              codec.MAX_VALUE_Q) is None  # float64 log-probs: the numpy encoder


# ---- the sampled store's Gumbel-max draws (sampling.draw_tokens at TP = 1) -------------------------
def _draws(monkeypatch, native_on: bool, *args):
    from megatron_kd.logits.sampling import draw_tokens

    monkeypatch.setenv(native.ENV, "1" if native_on else "0")
    try:
        return draw_tokens(*args)
    finally:
        monkeypatch.delenv(native.ENV)


@pytest.mark.parametrize("n, vocab, real, draws, temp, block, dtype, exclude, row_chunk", [
    (300, 4096, 4096, 12, 1.0, 64, torch.float32, False, None),  # the quickstart's shape
    (97, 1000, 990, 5, 0.8, 64, torch.float32, True, None),      # padded ids, excluded head, temperature
    (64, 513, 500, 24, 1.0, 16, torch.bfloat16, False, 9),       # partial last block, row chunks
    (40, 2048, 2048, 3, 1.5, 128, torch.float32, True, 11),
    (33, 37, 37, 7, 1.0, 64, torch.float32, False, None),        # one partial block
    (16, 151_936, 151_936, 4, 1.0, 64, torch.float32, False, None),  # Qwen's vocabulary: 2,374 blocks
])
def test_native_draws_equal_the_torch_path(monkeypatch, n, vocab, real, draws, temp, block, dtype, exclude,
                                           row_chunk):
    g = torch.Generator().manual_seed(n * 7 + vocab)
    x = (torch.randn(n, vocab, generator=g) * 4).to(dtype)
    x[1] = float("-inf")  # nothing to draw: -1
    x[2, : vocab // 2] = float("-inf")  # half the vocabulary impossible
    x[3] = 0.0  # uniform
    x[4, 5] = float("inf")  # an infinite logit: lse +inf, nothing drawn (as the torch path)
    x[5, 7] = 30.0  # one id carries (almost) all the mass
    pos = torch.randint(0, 10**12, (n,), generator=g)
    ex = torch.randint(-1, vocab, (n, 7), generator=g) if exclude else None
    args = (x, real, pos, draws, 1234, temp, ex, block, row_chunk)
    got, want = _draws(monkeypatch, True, *args), _draws(monkeypatch, False, *args)
    assert torch.equal(got, want)
    assert (got[1] == -1).all() and (got[0] >= 0).all() and (got < real).all()
    assert (got[5] == 7).float().mean() > 0.5


def test_native_draws_threads_and_refusals(monkeypatch):
    from megatron_kd.logits.sampling import draw_tokens

    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 4096, generator=g) * 3
    pos = torch.arange(256) * 1_000_003
    base = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = draw_tokens(x, 4096, pos, 12, 9)
        torch.set_num_threads(2)
        two = draw_tokens(x, 4096, pos, 12, 9)
    finally:
        torch.set_num_threads(base)
    assert torch.equal(one, two)
    assert torch.equal(one, _draws(monkeypatch, False, x, 4096, pos, 12, 9))
    lse = torch.zeros(4, 64, dtype=torch.float64)
    keys = torch.zeros(4, 3, dtype=torch.int64)
    assert native.draw_native(x[:4], 4096, lse, keys, 64) is not None
    lse[2, 5] = float("nan")  # a NaN row: the torch path decides
    assert native.draw_native(x[:4], 4096, lse, keys, 64) is None
    assert native.draw_native(x[:4].double(), 4096, lse, keys, 64) is None
    assert native.draw_native(x[:4], 4096, lse[:, :10], keys, 64) is None  # wrong block count
    x[3, 0] = float("nan")
    assert torch.equal(draw_tokens(x[:4], 4096, pos[:4], 3, 9), _draws(monkeypatch, False, x[:4], 4096, pos[:4], 3, 9))
