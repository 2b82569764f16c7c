"""Fused losses (issue 15): one-pass LM + KD, and the output layer fused into the loss.

Values and gradients against independent float64 references (row-by-row definitions plus
``F.cross_entropy``, plain autograd through ``hidden @ weight.T``); bf16 within tolerance.
"""
import pytest
import torch
import torch.nn.functional as F

import kd_reference as R
from megatron_kd.losses import KINDS, DistillationLoss, KDLossConfig, fused_kd_lm_loss, fused_linear_kd

V, PAD = 29, 3


def _data(seed=0, n=11, k=6, hidden=8):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V + PAD, generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, V + PAD, generator=g, dtype=torch.float64) * 2
    s[:, V:] = t[:, V:] = float("-inf")
    labels = torch.randint(0, V, (n,), generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).to(torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)])
    ids[0, 3:] = -1
    lps = torch.log_softmax(t[:, :V], -1).gather(-1, ids.clamp_min(0))
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(V + PAD, hidden, generator=g, dtype=torch.float64) * 0.7
    th = torch.randn(n, hidden + 4, generator=g, dtype=torch.float64)
    tw = torch.randn(V + PAD + 2, hidden + 4, generator=g, dtype=torch.float64) * 0.7
    return s, t, labels, mask, ids, lps, h, w, th, tw


def _reference(s, labels, mask, w_kd, w_lm, kd_fn):
    x = s.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(x, labels, reduction="none")
    kd = kd_fn(x)
    total = ((w_kd * kd + w_lm * ce) * mask).sum()
    (g,) = torch.autograd.grad(total, x)
    return total.detach(), (kd * mask).sum().detach(), (ce * mask).sum().detach(), g


def _fused(s, labels, mask, **kw):
    x = s.detach().clone().requires_grad_(True)
    total, kd, lm = fused_kd_lm_loss(x, labels, mask, chunk_size=4, **kw)
    total.sum().backward()
    assert not kd.requires_grad and not lm.requires_grad
    assert torch.all(kd[mask == 0] == 0) and torch.all(lm[mask == 0] == 0)
    return total.sum().detach(), kd.sum(), lm.sum(), x.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_one_pass_dense_matches_float64_reference(kind, temperature):
    s, t, labels, mask, *_ = _data()
    ref = _reference(s, labels, mask, 0.6, 0.4, lambda x: R.dense(x, t, kind, temperature, 0.2, 0.3))
    got = _fused(s, labels, mask, teacher_logits=t, kind=kind, temperature=temperature, skew=0.2, beta=0.3,
                 w_kd=0.6, w_lm=0.4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_one_pass_dense_fast_path_clean_logits():
    """No -inf columns: forward KL / soft CE share the student's exp (the fast kernel)."""
    s, t, labels, mask, *_ = _data(1)
    s, t = s[:, :V].contiguous(), t[:, :V].contiguous()
    for kind in ("forward_kl", "soft_ce"):
        ref = _reference(s, labels, mask, 0.3, 0.7, lambda x: R.dense(x, t, kind))
        got = _fused(s, labels, mask, teacher_logits=t, kind=kind, w_kd=0.3, w_lm=0.7)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # at alpha = 0.5 / 0.5 the gradient is q - 0.5 onehot - 0.5 p
    x = s.clone().requires_grad_(True)
    fused_kd_lm_loss(x, labels, None, teacher_logits=t)[0].sum().backward()
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    torch.testing.assert_close(x.grad, q - 0.5 * F.one_hot(labels, V) - 0.5 * p)


@pytest.mark.parametrize("temperature,residual,target_kind", [
    (1.0, False, "logprobs"), (1.5, False, "logprobs"), (1.0, True, "logprobs"), (1.0, False, "weights"),
])
def test_one_pass_sparse_matches_float64_reference(temperature, residual, target_kind):
    s, t, labels, mask, ids, lps, *_ = _data(2)
    ref = _reference(s, labels, mask, 0.5, 0.5, lambda x: R.sparse(x, ids, lps, temperature, residual))
    got = _fused(s, labels, mask, target_ids=ids, target_logprobs=lps, temperature=temperature,
                 residual=residual, target_kind=target_kind, w_kd=0.5, w_lm=0.5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_layer_one_pass_equals_two_pass():
    s, t, labels, mask, ids, lps, *_ = _data(3)
    s, t = s.float(), t.float()
    for kw in (dict(teacher_logits=t), dict(target_ids=ids, target_logprobs=lps.float())):
        outs = []
        for one_pass in (True, False):
            x = s.clone().requires_grad_(True)
            cfg = KDLossConfig(alpha=0.3, temperature=1.0, one_pass=one_pass)
            loss, count, report = DistillationLoss(cfg)(x, labels, mask, **kw)
            loss.backward()
            outs.append((loss.detach(), report, x.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[0][2], outs[1][2], rtol=1e-5, atol=1e-6)
        assert set(outs[0][1]) == set(outs[1][1])
        for key in outs[0][1]:
            torch.testing.assert_close(outs[0][1][key], outs[1][1][key], rtol=1e-5, atol=1e-5)


def _linear_reference(h, w, labels, mask, w_kd, w_lm, kd_fn):
    hh, ww = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    logits = (hh @ ww.t())[:, :V]  # padded vocabulary rows take no part
    ce = F.cross_entropy(logits, labels, reduction="none")
    kd = kd_fn(logits) if kd_fn is not None else torch.zeros_like(ce)
    total = ((w_kd * kd + w_lm * ce) * mask).sum()
    total.backward()
    return total.detach(), (kd * mask).sum().detach(), (ce * mask).sum().detach(), hh.grad, ww.grad


def _linear_fused(h, w, labels, mask, **kw):
    hh, ww = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    total, kd, lm = fused_linear_kd(hh, ww, labels, mask, vocab_size=V, chunk_tokens=3, **kw)
    total.backward()
    return total.detach(), kd, lm, hh.grad, ww.grad


@pytest.mark.parametrize("kind,temperature", [("forward_kl", 1.0), ("jsd", 1.5), ("reverse_kl", 1.0)])
def test_fused_linear_online_matches_float64_reference(kind, temperature):
    s, t, labels, mask, ids, lps, h, w, th, tw = _data(4)
    t_logits = (th @ tw.t())[:, :V]
    ref = _linear_reference(h, w, labels, mask, 0.7, 0.3,
                            lambda x: R.dense(x, t_logits, kind, temperature, 0.1, 0.4))
    got = _linear_fused(h, w, labels, mask, teacher_hidden=th, teacher_weight=tw, kind=kind,
                        temperature=temperature, beta=0.4, w_kd=0.7, w_lm=0.3)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("residual", [False, True])
def test_fused_linear_offline_and_lm_only_match_reference(residual):
    s, t, labels, mask, ids, lps, h, w, th, tw = _data(5)
    ref = _linear_reference(h, w, labels, mask, 0.5, 0.5, lambda x: R.sparse(x, ids, lps, 1.0, residual))
    got = _linear_fused(h, w, labels, mask, target_ids=ids, target_logprobs=lps, residual=residual,
                        w_kd=0.5, w_lm=0.5)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    ref = _linear_reference(h, w, labels, mask, 0.0, 1.0, None)
    got = _linear_fused(h, w, labels, mask, w_kd=0.5, w_lm=1.0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_fused_linear_layer_3d_and_no_grad():
    s, t, labels, mask, ids, lps, h, w, th, tw = _data(6, n=12)
    cfg = KDLossConfig(alpha=0.4, fused_chunk_tokens=5)
    hh = h.float().view(3, 4, -1).clone().requires_grad_(True)
    loss, count, report = DistillationLoss(cfg).fused_linear(
        hh, w.float(), labels.view(3, 4), mask.view(3, 4), teacher_hidden=th.float().view(3, 4, -1),
        teacher_weight=tw.float(), vocab_size=V)
    loss.backward()
    logits = (h.float() @ w.float().t())[:, :V]
    teacher = (th.float() @ tw.float().t())[:, :V]
    x = logits.detach().view(3, 4, V).requires_grad_(True)
    ref_loss, ref_count, ref_report = DistillationLoss(KDLossConfig(alpha=0.4))(
        x, labels.view(3, 4), mask.view(3, 4), teacher_logits=teacher.view(3, 4, V))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert count == ref_count and set(report) == set(ref_report)
    torch.testing.assert_close(hh.grad.view(12, -1), x.grad.view(12, V) @ w.float()[:V], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        again = DistillationLoss(cfg).fused_linear(hh, w.float(), labels.view(3, 4), mask.view(3, 4),
                                                   vocab_size=V)
    assert set(again[2]) == {"lm", "total"}
    torch.testing.assert_close(again[2]["lm"], ref_report["lm"], rtol=1e-5, atol=1e-5)


def test_fused_linear_bf16_within_tolerance():
    s, t, labels, mask, ids, lps, h, w, th, tw = _data(7, n=40, hidden=32)
    ref = _linear_fused(h, w, labels, mask, teacher_hidden=th, teacher_weight=tw, w_kd=0.5, w_lm=0.5)
    got = _linear_fused(h.bfloat16(), w.bfloat16(), labels, mask, teacher_hidden=th.bfloat16(),
                        teacher_weight=tw.bfloat16(), w_kd=0.5, w_lm=0.5)
    assert got[3].dtype == torch.bfloat16 and got[4].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=3e-2, atol=3e-2)
    # megatron's Float16Module hands the last stage's output over in fp32: bf16 weight, fp32 hidden
    mixed = _linear_fused(h.bfloat16().float(), w.bfloat16(), labels, mask, teacher_hidden=th.bfloat16().float(),
                          teacher_weight=tw.bfloat16(), w_kd=0.5, w_lm=0.5)
    assert mixed[3].dtype == torch.float32 and mixed[4].dtype == torch.bfloat16
    for a, b in zip(mixed, got):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-2, atol=1e-2)


def test_fused_linear_refuses_bad_input():
    s, t, labels, mask, ids, lps, h, w, th, tw = _data(8)
    with pytest.raises(ValueError, match="not both"):
        fused_linear_kd(h, w, labels, mask, teacher_hidden=th, teacher_weight=tw, target_ids=ids,
                        target_logprobs=lps)
    with pytest.raises(ValueError, match="do not match labels"):
        fused_linear_kd(h[:-1], w, labels, mask)
