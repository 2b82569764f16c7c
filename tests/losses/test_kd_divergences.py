"""Dense KD divergences: values and gradients against float64 references, gradcheck, edge cases."""
import math

import pytest
import torch

import kd_reference as R
from megatron_kd.losses import KINDS, kd_loss

V = 37


def _logits(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64_reference(kind, temperature):
    s, t = _logits((3, 4, V), 0), _logits((3, 4, V), 1)
    kw = dict(kind=kind, temperature=temperature, skew=0.2, beta=0.3)
    loss, grad = R.loss_and_grad(kd_loss, s, t, chunk_size=5, **kw)
    ref, ref_grad = R.loss_and_grad(R.dense, s.double(), t.double(), **kw)
    assert loss.dtype == torch.float32 and loss.shape == (3, 4)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    s = _logits((2, 3, 7), 2).double().requires_grad_(True)
    t = _logits((2, 3, 7), 3).double()
    fn = lambda x: kd_loss(x, t, kind, temperature=1.5, skew=0.3, beta=0.4, chunk_size=4,  # noqa: E731
                           retain_graph=True)
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_chunk_size_and_leading_shape_do_not_matter(kind):
    s, t = _logits((5, 3, V), 4), _logits((5, 3, V), 5)
    a, ga = R.loss_and_grad(kd_loss, s, t, kind, chunk_size=1)
    b, gb = R.loss_and_grad(kd_loss, s.reshape(15, V), t.reshape(15, V), kind)
    torch.testing.assert_close(a.reshape(15), b, rtol=0, atol=1e-6)
    torch.testing.assert_close(ga.reshape(15, V), gb, rtol=0, atol=1e-7)


def test_special_parameter_values():
    s, t = _logits((4, V), 6), _logits((4, V), 7)
    fkl, rkl = kd_loss(s, t, "forward_kl"), kd_loss(s, t, "reverse_kl")
    torch.testing.assert_close(kd_loss(s, t, "skew_forward_kl", skew=0.0), fkl)
    torch.testing.assert_close(kd_loss(s, t, "skew_reverse_kl", skew=0.0), rkl)
    for kind in ("skew_forward_kl", "skew_reverse_kl"):
        assert kd_loss(s, t, kind, skew=1.0).abs().max() < 1e-5
    # generalised JSD endpoints as TRL's generalized_jsd_loss defines them (not the 0 of the formula)
    torch.testing.assert_close(kd_loss(s, t, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(kd_loss(s, t, "jsd", beta=1.0), rkl)
    # soft CE = forward KL + teacher entropy; identical logits give KL 0
    ent = -(t.softmax(-1) * t.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(kd_loss(s, t, "soft_ce"), fkl + ent, rtol=1e-5, atol=1e-5)
    for kind in set(KINDS) - {"soft_ce"}:
        assert kd_loss(t, t, kind).abs().max() < 1e-5, kind


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_jsd_against_float64_trl_convention(beta):
    """GKD's generalised JSD (value and gradient) against float64 maths written the way TRL's
    ``generalized_jsd_loss`` writes it: beta=0 is KL(teacher || student), beta=1 KL(student || teacher)."""
    s, t = _logits((3, 4, V), 21).double(), _logits((3, 4, V), 22).double()
    T = 0.9
    x = s.clone().requires_grad_(True)
    lq, lp = torch.log_softmax(x / T, -1), torch.log_softmax(t / T, -1)
    if beta == 0.0:
        ref = (lp.exp() * (lp - lq)).sum(-1)
    elif beta == 1.0:
        ref = (lq.exp() * (lq - lp)).sum(-1)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
        ref = beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)
    ref.sum().backward()
    loss, grad = R.loss_and_grad(kd_loss, s, t, "jsd", temperature=T, beta=beta)
    assert float(ref.detach().min()) > 1e-3  # a real divergence, not the degenerate 0
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad, x.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_vocab_columns_are_absent(kind):
    """-inf in both (megatron's padded vocab) == the unpadded computation; zero grad there."""
    s, t = _logits((2, 3, V), 8), _logits((2, 3, V), 9)
    pad = torch.full((2, 3, 11), float("-inf"))
    loss, grad = R.loss_and_grad(kd_loss, torch.cat([s, pad], -1), torch.cat([t, pad], -1), kind)
    ref, ref_grad = R.loss_and_grad(kd_loss, s, t, kind)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[..., :V], ref_grad, rtol=1e-5, atol=1e-7)
    assert grad[..., V:].abs().max() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_neg_inf_columns_are_finite_and_dropped(kind):
    """-inf student where the teacher has mass (and vice versa), and fully -inf rows."""
    s, t = _logits((4, V), 10), _logits((4, V), 11)
    s[0, 3] = float("-inf")             # student -inf, teacher has mass
    t[1, 5] = float("-inf")             # teacher -inf, student has mass
    s[2, 7] = t[2, 7] = float("-inf")
    s[3, :] = float("-inf")             # whole student row absent
    loss, grad = R.loss_and_grad(kd_loss, s, t, kind, chunk_size=3)
    ref, ref_grad = R.loss_and_grad(R.dense, s.double(), t.double(), kind)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    assert loss[3] == 0 and grad[3].abs().max() == 0


@pytest.mark.parametrize("temperature", [1e-3, 1e3])
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_temperatures(kind, temperature):
    s, t = _logits((3, V), 12, scale=5.0), _logits((3, V), 13, scale=5.0)
    loss, grad = R.loss_and_grad(kd_loss, s, t, kind, temperature)
    ref, ref_grad = R.loss_and_grad(R.dense, s.double(), t.double(), kind, temperature)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # fp32 limits: ~1e-7 absolute from log-sum-exp rounding, ~1e-6 relative to the loss scale
    assert (loss.double() - ref).abs().max() <= 1e-6 + 1e-5 * ref.abs().max()
    assert (grad.double() - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max() + 1e-9


def test_huge_logits_no_overflow():
    s, t = _logits((2, V), 14, scale=1e4), _logits((2, V), 15, scale=1e4)
    for kind in KINDS:
        loss, grad = R.loss_and_grad(kd_loss, s, t, kind)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), kind


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
def test_bf16_inputs(kind):
    s, t = _logits((4, 6, V), 16).bfloat16(), _logits((4, 6, V), 17).bfloat16()
    loss, grad = R.loss_and_grad(kd_loss, s, t, kind)
    ref, ref_grad = R.loss_and_grad(R.dense, s.double(), t.double(), kind)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-3)


def test_loss_mask_skips_tokens_and_all_masked_is_zero():
    s, t = _logits((3, 4, V), 18), _logits((3, 4, V), 19)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    loss, grad = R.loss_and_grad(kd_loss, s, t, "jsd", loss_mask=mask, chunk_size=2)
    full, full_grad = R.loss_and_grad(kd_loss, s, t, "jsd")
    torch.testing.assert_close(loss, torch.where(mask, full, 0.0))
    torch.testing.assert_close(grad, full_grad * mask.unsqueeze(-1))
    s_nan = s.clone()
    s_nan[~mask] = float("nan")  # garbage in skipped tokens never reaches the result
    loss2, grad2 = R.loss_and_grad(kd_loss, s_nan, t, "jsd", loss_mask=mask)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    loss0, grad0 = R.loss_and_grad(kd_loss, s, t, "forward_kl", loss_mask=torch.zeros(3, 4))
    assert loss0.abs().max() == 0 and grad0.abs().max() == 0


def test_teacher_gets_no_gradient_and_weighted_backward():
    s = _logits((3, V), 20).requires_grad_(True)
    t = _logits((3, V), 21).requires_grad_(True)
    w = torch.tensor([0.5, -2.0, 3.0])
    (kd_loss(s, t, "reverse_kl") * w).sum().backward()
    assert t.grad is None
    ref_s = s.detach().double().requires_grad_(True)
    (R.dense(ref_s, t.detach().double(), "reverse_kl") * w.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_path_and_double_backward_error(monkeypatch):
    import megatron_kd.losses.divergences as div

    s, t = _logits((2, V), 22).requires_grad_(True), _logits((2, V), 23)
    need_grad_seen = []
    orig = div._kl_family
    monkeypatch.setattr(div, "_kl_family", lambda *a: need_grad_seen.append(a[5]) or orig(*a))
    with torch.no_grad():
        a = kd_loss(s, t)
    b = kd_loss(s, t)
    assert a.grad_fn is None and torch.equal(a, b.detach())
    assert need_grad_seen == [False, True]  # no gradient buffer is computed under no_grad
    monkeypatch.undo()
    loss = kd_loss(s, t).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    x = s.detach().requires_grad_(True)
    loss = kd_loss(x, t, retain_graph=True).sum()
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_bad_arguments_fail_in_one_line():
    s = torch.zeros(2, V)
    with pytest.raises(ValueError, match="unknown KD loss kind"):
        kd_loss(s, s, "kl")
    with pytest.raises(ValueError, match="differ"):
        kd_loss(s, torch.zeros(2, V + 1))
    for bad_t in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(s, s, temperature=bad_t)
    with pytest.raises(ValueError, match="skew"):
        kd_loss(s, s, "skew_forward_kl", skew=1.5)
    with pytest.raises(ValueError, match="loss_mask shape"):
        kd_loss(s, s, loss_mask=torch.ones(3))
