"""The single-process form of the fused sparse-target kernel (``fused._sparse_fast_local``, issue 15).

It drops the per-entry masks of the general form when every stored entry is a real id or padding
with zero mass; its values and gradient must be *identical* (``torch.equal``) to the general form's,
and anything outside its preconditions must go to the general form. End to end, the fused output
layer with ragged (-1 / -inf padded) targets is checked against the float64 reference as well.
"""
import pytest
import torch
import torch.nn.functional as F

import kd_reference as R
from megatron_kd.losses import fused, fused_linear_kd
from megatron_kd.losses.vocab_parallel import TPContext

TP1 = TPContext(None, 0, 1)


def _chunk(n=37, v=53, k=9, dtype=torch.float32, seed=0, ragged=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64).mul_(3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lps = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1).sub(0.07).to(dtype)
    if ragged:  # as the store's dataset: -1 ids with -inf log-probs after each token's entries
        cnt = torch.randint(0, k + 1, (n, 1), generator=g)
        pad = torch.arange(k) >= cnt
        ids, lps = ids.masked_fill(pad, -1), lps.masked_fill(pad, float("-inf"))
    return s, labels, ids, lps


def _both(s, labels, ids, lps, need_grad=True, w_kd=0.6, w_lm=0.4, vocab_limit=None, monkeypatch=None):
    """(local form's result or None, general form's result): each (kd, lm, grad)."""
    vocab_limit = s.shape[-1] if vocab_limit is None else vocab_limit
    s1 = s.clone()
    local = fused._sparse_fast_local(s1, ids, lps, labels, TP1, need_grad, None, w_kd, w_lm, 0, vocab_limit)
    if local is None:
        assert torch.equal(s1, s), "the local form touched S before giving up"
    monkeypatch.setattr(fused, "_sparse_fast_local", lambda *a: None)
    general = fused._sparse_fast(s.clone(), ids, lps, labels, TP1, need_grad, None, w_kd, w_lm, 0, vocab_limit)
    monkeypatch.undo()
    return local, general


def _assert_identical(a, b):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)  # bit for bit (0.0 == -0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("need_grad,w_kd", [(True, 0.6), (False, 0.6), (True, 0.0)])
def test_local_form_identical_to_general(monkeypatch, dtype, ragged, need_grad, w_kd):
    s, labels, ids, lps = _chunk(dtype=dtype, ragged=ragged)
    local, general = _both(s, labels, ids, lps, need_grad, w_kd, monkeypatch=monkeypatch)
    assert local is not None
    _assert_identical(local, general)
    # and the dispatcher picks it, also with a separate gradient buffer (the one-pass loss's ``out``)
    out = fused._sparse_fast(s.clone(), ids, lps, labels, TP1, need_grad, None, w_kd, 0.4, 0, s.shape[-1])
    _assert_identical(out, local)
    buf = torch.empty_like(s)
    out = fused._sparse_fast(s.clone(), ids, lps, labels, TP1, need_grad, buf, w_kd, 0.4, 0, s.shape[-1])
    _assert_identical(out, local)
    if need_grad:
        assert out[2].data_ptr() == buf.data_ptr()


def test_local_form_ids_beyond_vocab_limit_and_underflow(monkeypatch):
    s, labels, ids, lps = _chunk(seed=1, ragged=True)
    ids[3, 0], lps[3, 0] = 60, float("-inf")  # an id past the vocabulary with zero mass: padding
    lps[5, 1] = lps[5, 0] - 200.0  # exp underflows to 0 in float32: p = 0 but the entry is real
    local, general = _both(s, labels, ids, lps, monkeypatch=monkeypatch)
    assert local is not None
    _assert_identical(local, general)
    lps[4] = float("-inf")  # a token whose entries all have zero mass
    local, general = _both(s, labels, ids, lps, monkeypatch=monkeypatch)
    assert local is not None
    _assert_identical(local, general)


@pytest.mark.parametrize("case", ["padding_with_mass", "nan_logprob", "pos_inf_logprob", "neg_inf_logit",
                                  "vocab_limit_above_width"])
def test_local_form_declines_outside_its_preconditions(monkeypatch, case):
    s, labels, ids, lps = _chunk(seed=2, ragged=True)
    vocab_limit = None
    if case == "padding_with_mass":
        ids[0, 0], lps[0, 0] = -1, -0.5
    elif case == "nan_logprob":
        lps[1, 0] = float("nan")
    elif case == "pos_inf_logprob":
        lps[1, 0] = float("inf")
    elif case == "neg_inf_logit":  # a padded (-inf) student column that a stored id points at
        s[:, 7] = float("-inf")
        ids[2, 0], lps[2, 0] = 7, -1.0
    else:
        vocab_limit = s.shape[-1] + 3
    local, general = _both(s, labels, ids, lps, vocab_limit=vocab_limit, monkeypatch=monkeypatch)
    assert local is None
    assert fused._sparse_fast_local(s[:0].clone(), ids[:0], lps[:0], labels[:0], TP1, True, None, 0.6, 0.4, 0,
                                    s.shape[-1]) is None  # an empty chunk
    out = fused._sparse_fast(s.clone(), ids, lps, labels, TP1, True, None, 0.6, 0.4, 0,
                             s.shape[-1] if vocab_limit is None else vocab_limit)
    _assert_identical(out, general)


def test_fused_linear_ragged_targets_match_float64_reference():
    g = torch.Generator().manual_seed(7)
    n, v, pad, hid, k = 13, 29, 3, 8, 6
    h = torch.randn(n, hid, generator=g, dtype=torch.float64)
    w = torch.randn(v + pad, hid, generator=g, dtype=torch.float64) * 0.7
    labels = torch.randint(0, v, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.2).to(torch.float64)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lps = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1).gather(-1, ids)
    cnt = torch.randint(0, k + 1, (n, 1), generator=g)
    padm = torch.arange(k) >= cnt
    ids, lps = ids.masked_fill(padm, -1), lps.masked_fill(padm, float("-inf"))
    ids[1, -1] = v + 1  # a padded-vocabulary id with zero mass

    def reference():
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = (hh @ ww.t())[:, :v]
        ce = F.cross_entropy(logits, labels, reduction="none")
        kd = R.sparse(logits, ids, lps)
        total = ((0.5 * kd + 0.5 * ce) * mask).sum()
        total.backward()
        return total.detach(), (kd * mask).sum().detach(), (ce * mask).sum().detach(), hh.grad, ww.grad

    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    total, kd, lm = fused_linear_kd(hh, ww, labels, mask, target_ids=ids, target_logprobs=lps, vocab_size=v,
                                    chunk_tokens=4, w_kd=0.5, w_lm=0.5)
    total.backward()
    for a, b in zip((total.detach(), kd, lm, hh.grad, ww.grad), reference()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
