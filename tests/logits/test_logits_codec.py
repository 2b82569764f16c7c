"""bitpack-v1 codec, shard files and the top-p/top-k selection against float64 references."""
import numpy as np
import pytest
import torch

from megatron_kd.logits import codec
from megatron_kd.logits.shard import ShardReader, ShardWriter
from megatron_kd.logits.truncation import flatten_selection, select_top_p_top_k

STEP = 1.0 / 16


def _random_rows(rng, T, K, vocab, counts=None):
    """Distinct ids per row, log-probs of a random sparse distribution, counts incl. 0, 1 and K."""
    counts = rng.integers(0, K + 1, T) if counts is None else counts
    ids = np.stack([rng.choice(vocab, K, replace=False) if vocab < 10 * K * 1000
                    else rng.integers(0, vocab // K, K) + np.arange(K) * (vocab // K) for _ in range(T)])
    ids = rng.permuted(ids, axis=1)
    lp = np.log(rng.dirichlet(np.full(vocab if vocab < 4096 else 4096, 0.1), T)[:, :K] + 1e-12)
    lp = np.sort(lp, axis=1)[:, ::-1].astype(np.float32)
    return ids, lp, counts


def _positions(chunk, seg_len, id_bits):
    lengths = codec.token_bit_lengths(chunk.count, chunk.widths, id_bits)
    seg_start = np.concatenate([[0], np.cumsum(seg_len)])
    byte_start = np.concatenate([[0], np.cumsum(chunk.segment_bytes)])
    pos = np.zeros(len(lengths), dtype=np.int64)
    for s in range(len(seg_len)):
        a, b = seg_start[s], seg_start[s + 1]
        pos[a:b] = byte_start[s] * 8 + np.concatenate([[0], np.cumsum(lengths[a:b])[:-1]])
    return pos


@pytest.mark.parametrize("vocab", [2, 1000, 151_936, 1 << 24])
def test_codec_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    K = min(vocab, 255)
    T = 300
    counts = rng.integers(0, K + 1, T)
    counts[:3] = [0, 1, K]
    ids, lp, _ = _random_rows(rng, T, K, vocab, counts)
    id_bits = codec.id_bits_for(vocab)
    assert id_bits == {2: 1, 1000: 10, 151_936: 18, 1 << 24: 24}[vocab]
    seg_len = np.array([1, 120, 0, 179])
    fi, fl = codec.flatten_rows(ids, lp, counts)
    chunk = codec.encode(counts, fi, fl, seg_len, id_bits, STEP)
    buf = np.concatenate([chunk.payload, np.zeros(8, np.uint8)])
    got_ids, got_lp = codec.decode(buf, _positions(chunk, seg_len, id_bits), chunk.count, chunk.widths, chunk.top,
                                   id_bits, STEP, K)
    for t in range(T):
        n = counts[t]
        assert (got_ids[t, n:] == -1).all() and np.isneginf(got_lp[t, n:]).all()
        want = dict(zip(ids[t, :n].tolist(), lp[t, :n].tolist()))
        got = dict(zip(got_ids[t, :n].tolist(), got_lp[t, :n].tolist()))
        assert got.keys() == want.keys()
        if n:
            top = max(want.values())
            err = max(abs(got[i] - want[i]) for i in want)
            assert err <= STEP / 2 + abs(top) * 2.0 ** -11 + 1e-6
            assert list(got.values()) == sorted(got.values(), reverse=True)
    # A single kept id costs its id bits only (its log-prob is the token's fp16 top).
    assert codec.token_bit_lengths(chunk.count[1:2], chunk.widths[1:2], id_bits)[0] == id_bits


def test_codec_rejects_bad_input():
    with pytest.raises(ValueError, match="2\\^24"):
        codec.id_bits_for((1 << 24) + 1)
    with pytest.raises(ValueError, match="distinct"):
        codec.encode(np.array([2]), np.array([5, 5]), np.array([-1.0, -2.0]), np.array([1]), 10, STEP)
    with pytest.raises(ValueError, match="bits"):
        codec.encode(np.array([1]), np.array([1024]), np.array([-1.0]), np.array([1]), 10, STEP)


def test_quantisation_kl_is_below_target():
    """KL(stored || exact), both renormalised over the kept ids, is ~ step^2/24 << 1e-3 nats."""
    rng = np.random.default_rng(0)
    T, K, vocab = 2000, 100, 151_936
    counts = rng.integers(1, K + 1, T)
    ids, lp, _ = _random_rows(rng, T, K, vocab, counts)
    id_bits = codec.id_bits_for(vocab)
    fi, fl = codec.flatten_rows(ids, lp, counts)
    chunk = codec.encode(counts, fi, fl, [T], id_bits, STEP)
    buf = np.concatenate([chunk.payload, np.zeros(8, np.uint8)])
    got_ids, got_lp = codec.decode(buf, _positions(chunk, [T], id_bits), chunk.count, chunk.widths, chunk.top,
                                   id_bits, STEP, K, sort=False)
    kls = []
    for t in range(T):
        n = counts[t]
        order = np.argsort(ids[t, :n])
        exact = lp[t, :n][order].astype(np.float64)
        stored = got_lp[t, :n].astype(np.float64)
        assert np.array_equal(got_ids[t, :n], np.sort(ids[t, :n]))
        e, s = exact - np.logaddexp.reduce(exact), stored - np.logaddexp.reduce(stored)
        kls.append(float(np.sum(np.exp(s) * (s - e))))
    assert 0 <= np.mean(kls) < STEP ** 2 / 24 * 1.5 and max(kls) < 1e-3
    assert len(chunk.payload) / counts.sum() < 3.0  # bytes per entry at a Qwen-size vocabulary


def test_shard_random_access_across_out_of_order_segments(tmp_path):
    rng = np.random.default_rng(1)
    vocab, K, T = 5000, 30, 200
    ids, lp, counts = _random_rows(rng, T, K, vocab)
    counts[[49, 99, 149, 199]] = 0  # documents' last tokens (outside every window)
    id_bits = codec.id_bits_for(vocab)
    w = ShardWriter(tmp_path / "s.kdl", T)
    # Two windows written in reverse order of their positions (as length-sorted batches do).
    for seg_starts, seg_len in (([100, 150], [49, 49]), ([0, 20, 50], [20, 29, 49])):
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(seg_starts, seg_len)])
        fi, fl = codec.flatten_rows(ids[rows], lp[rows], counts[rows])
        w.add(codec.encode(counts[rows], fi, fl, seg_len, id_bits, STEP), np.array(seg_starts), np.array(seg_len))
    info = w.close()
    assert info["entries"] == counts.sum() and (tmp_path / "s.kdl").stat().st_size == info["bytes"]
    r = ShardReader(tmp_path / "s.kdl")
    full_ids, full_lp = r.read(0, T, id_bits, STEP, K)
    for a, b in ((0, T), (10, 60), (99, 101), (149, 151), (180, 181), (37, 37)):
        part_ids, part_lp = r.read(a, b, id_bits, STEP, K)
        assert np.array_equal(part_ids, full_ids[a:b]) and np.array_equal(part_lp, full_lp[a:b])
    for t in range(T):
        assert set(full_ids[t][full_ids[t] >= 0].tolist()) == set(ids[t, :counts[t]].tolist())


def _truncate64(lp, top_p, top_k):
    """Float64 selection; also says whether the top-p cut is within fp32 rounding of a tie."""
    order = np.lexsort((np.arange(len(lp)), -lp))
    p = np.exp(lp[order])
    before = np.cumsum(p) - p
    n = int(min(max((before < top_p).sum(), 1), top_k))
    near_tie = bool(np.any(np.abs(before[max(n - 1, 1):n + 1] - top_p) < 1e-5))
    return order[:n], near_tie


@pytest.mark.parametrize("top_p,top_k", [(0.95, 100), (0.5, 7), (1.0, 20)])
def test_selection_matches_float64_reference(top_p, top_k):
    torch.manual_seed(0)
    vocab, padded = 300, 384
    scale = torch.linspace(0.1, 8.0, 64).unsqueeze(1)  # flat to very sharp rows
    logits = torch.randn(64, padded) * scale
    ids, lp, n = select_top_p_top_k(logits, vocab, top_p, top_k)
    ref_lp = torch.log_softmax(logits[:, :vocab].double(), -1).numpy()
    ties = 0
    for t in range(64):
        want, near_tie = _truncate64(ref_lp[t], top_p, top_k)
        if near_tie and n[t] != len(want):  # the cut mass is within fp32 rounding of top_p
            ties += 1
            assert abs(int(n[t]) - len(want)) <= 1
            want = want[: min(len(want), int(n[t]))]
        else:
            assert n[t] == len(want)
        assert ids[t, :len(want)].tolist() == want.tolist()
        np.testing.assert_allclose(lp[t, :len(want)].numpy(), ref_lp[t, want], atol=1e-5)
    assert ties <= 2
    assert (ids < vocab).all() and n.min() >= 1 and n.max() <= top_k
    fi, fl = flatten_selection(ids, lp, n)
    ci, cl = codec.flatten_rows(ids.numpy(), lp.numpy(), n.numpy())
    assert np.array_equal(fi.numpy(), ci) and np.array_equal(fl.numpy(), cl)


def test_two_stage_selection_equals_one_stage():
    from megatron_kd.logits import truncation

    torch.manual_seed(1)
    logits = torch.randn(256, 500) * torch.linspace(0.2, 12.0, 256).unsqueeze(1)
    saved = truncation._first_stage_hits[0]
    try:
        results = []
        for hits in (1.0, 0.0):  # first stage on (top-16, then top-k for the rest) / off
            truncation._first_stage_hits[0] = hits
            results.append(select_top_p_top_k(logits, 500, 0.9, 60))
    finally:
        truncation._first_stage_hits[0] = saved
    (i1, l1, n1), (i2, l2, n2) = results
    assert torch.equal(n1, n2) and 1 < n1.float().mean() < 60
    valid = torch.arange(60).unsqueeze(0) < n1.unsqueeze(1)
    assert torch.equal(i1[valid], i2[valid]) and torch.equal(l1[valid], l2[valid])


def test_blocked_topk_keeps_torch_topk_entries():
    """The block-pruned top-k (issue 15) returns the same entries as torch.topk, and the selection
    built on it equals a float64 reference at a vocabulary where the pruning is active."""
    from megatron_kd.logits.truncation import _block_size, _topk

    torch.manual_seed(2)
    assert _block_size(4096, 100) == 4 and _block_size(4096, 16) == 16 and _block_size(300, 100) == 1
    for rows, vocab, k in ((64, 4096, 100), (33, 4096, 16), (17, 8192, 7), (8, 1000, 100)):
        x = torch.randn(rows, vocab) * torch.linspace(0.5, 6.0, rows).unsqueeze(1)
        x[0, 5:9] = x[0].max() + 1.0  # ties at the top
        vals, ids = _topk(x, k)
        ref_vals, ref_ids = torch.topk(x, k)
        assert torch.equal(torch.sort(ids, -1)[0], torch.sort(ref_ids, -1)[0])
        assert torch.equal(x.gather(1, ids), vals)
    logits = torch.randn(40, 4096) * torch.linspace(0.5, 6.0, 40).unsqueeze(1)
    ids, lp, n = select_top_p_top_k(logits, 4096, 0.95, 100)
    ref = torch.log_softmax(logits.double(), -1)
    for t in range(40):
        want = torch.argsort(-ref[t], stable=True)[: int(n[t])]
        assert ids[t, : int(n[t])].tolist() == want.tolist()
        np.testing.assert_allclose(lp[t, : int(n[t])].numpy(), ref[t, want].numpy(), atol=1e-5)


def test_write_fields_matches_bytewise_or():
    """The word-wise field writer (issue 15) against a plain per-bit reference, sorted and not."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        f = int(rng.integers(1, 300))
        width = rng.integers(0, 26, f)
        pos = np.cumsum(np.concatenate([[int(rng.integers(0, 40))], width[:-1] + rng.integers(0, 9, f - 1)]))
        val = rng.integers(0, 1 << 25, f) & ((np.int64(1) << width) - 1)
        nbytes = int((pos[-1] + width[-1] + 7) // 8) + int(rng.integers(0, 5))
        bits = np.zeros(nbytes * 8, dtype=np.uint8)
        for p, w, v in zip(pos, width, val):
            bits[p:p + w] = (v >> np.arange(w)) & 1
        want = np.packbits(bits, bitorder="little")
        for order in (np.arange(f), rng.permutation(f)):
            got = codec._write_fields(nbytes, pos[order], width[order], val[order])
            assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_cpu_fast_selection_equals_general_path():
    """The CPU single-rank path (issue 15: order keys, one sort, block-maxima log-sum-exp, key-sorted
    flatten) gives the general path's bits: ties, -0.0 / +0.0, -inf padding, an all -inf row, NaN."""
    from megatron_kd.logits import truncation as tr

    torch.manual_seed(3)
    x = torch.randn(48, 4096) * torch.linspace(0.3, 9.0, 48).unsqueeze(1)
    x[1] = torch.round(x[1] * 2) / 2  # many exact ties, also at the top-k boundary
    x[2, :] = 0.0
    x[2, 7] = -0.0
    x[3, 100:] = float("-inf")
    x[4, :] = float("-inf")
    vals = torch.tensor([0.0, -0.0, 1.5, -1.5, float("inf"), float("-inf"), float("nan"), 1.5])
    ids = torch.arange(8)
    order = torch.sort(tr._order_keys(vals, ids, 3), descending=True).indices.tolist()
    assert order == [6, 4, 2, 7, 0, 1, 3, 5]  # NaN first (as torch's sort), ties by smaller id
    for rows in (x, x[:, :300].contiguous()):
        lse_ref = torch.logsumexp(rows, -1)
        assert torch.equal(tr._logsumexp_cpu(rows, rows.amax(-1)), lse_ref)
        for kk in (1, 16, 100):
            fast = tr._truncate_cpu(rows, kk, lse_ref.double(), 0.9)
            slow = tr._truncate(rows, kk, 0, lse_ref.double(), 0.9, None, 1)
            for a, b in zip(fast, slow):  # (the all -inf row has NaN log-probs in both)
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    ids, lp, n = select_top_p_top_k(x, 4000, 0.95, 100)
    valid = torch.arange(100).unsqueeze(0) < n.unsqueeze(1)
    key, perm = torch.sort(torch.where(valid, ids, torch.iinfo(torch.long).max), dim=-1)
    fi, fl = flatten_selection(ids, lp, n)
    assert torch.equal(fi, key.masked_select(valid))
    torch.testing.assert_close(fl, lp.gather(-1, perm).masked_select(valid), rtol=0, atol=0, equal_nan=True)


def test_encode_in_segment_groups_gives_the_same_bytes(monkeypatch):
    """encode() works on cache-sized groups of whole segments (issue 15): the bytes and tables equal
    one pass over all segments, top-k and sampled layouts, empty segments and tokens included."""
    rng = np.random.default_rng(7)
    vocab, K, T = 5000, 40, 900
    ids, lp, counts = _random_rows(rng, T, K, vocab)
    seg = np.array([0, 100, 250, 0, 1, 300, 249])
    fi, fl = codec.flatten_rows(ids, lp, counts)
    draws = np.concatenate([np.bincount(rng.integers(0, c, 48), minlength=c) for c in counts if c])
    layout = codec.Layout(codec.id_bits_for(vocab), STEP, num_draws=48, draw_offset=0)
    outs = []
    for group in (1 << 40, 500):  # one group / many
        monkeypatch.setattr(codec, "GROUP_ENTRIES", group)
        outs.append((codec.encode(counts, fi, fl, seg, codec.id_bits_for(vocab), STEP),
                     codec.encode(counts, fi, fl, seg, layout.id_bits, STEP, draws=draws, layout=layout)))
    for a, b in zip(outs[0], outs[1]):
        for f in ("payload", "count", "widths", "top", "segment_bytes", "num_entries"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
