"""Sparse (top-k) KD targets: all ids == dense forward KL, float64 references, residual bucket."""
import pytest
import torch

import kd_reference as R
from megatron_kd.losses import kd_loss, sparse_kd_loss

V = 29


def _case(lead=(3, 4), k=6, seed=0, pad_first=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=g) * 2
    t = torch.randn(*lead, V, generator=g) * 2
    n = int(torch.tensor(lead).prod())
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n)]).reshape(*lead, k)
    if pad_first:
        ids.view(-1, k)[0, k // 2:] = -1
    lps = torch.log_softmax(t, -1).gather(-1, ids.clamp_min(0))
    return s, t, ids, lps


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_all_ids_equal_dense_forward_kl(temperature):
    s, t, _, _ = _case()
    ids = torch.arange(V).expand(3, 4, V).flip(-1).contiguous()  # any order
    lps = torch.log_softmax(t, -1).gather(-1, ids)
    a, ga = R.loss_and_grad(sparse_kd_loss, s, ids, lps, temperature, chunk_size=5)
    b, gb = R.loss_and_grad(kd_loss, s, t, "forward_kl", temperature)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    if temperature == 1.0:  # residual bucket is empty with every id kept
        c, gc = R.loss_and_grad(sparse_kd_loss, s, ids, lps, 1.0, True)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gc, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("residual,temperature", [(False, 1.0), (False, 2.0), (True, 1.0)])
def test_topk_matches_float64_reference(residual, temperature):
    s, _, ids, lps = _case(k=6, seed=1)
    loss, grad = R.loss_and_grad(sparse_kd_loss, s, ids, lps, temperature, residual, chunk_size=4)
    ref, ref_grad = R.loss_and_grad(R.sparse, s.double(), ids, lps.double(), temperature, residual)
    assert loss.dtype == torch.float32 and loss.shape == (3, 4)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_residual_matches_its_definition():
    """Kept mass as stored + one bucket: the KL between two (k+1)-outcome distributions."""
    s, _, ids, lps = _case(lead=(5,), k=4, seed=2, pad_first=False)
    loss = sparse_kd_loss(s, ids, lps, residual=True)
    q = torch.softmax(s.double(), -1).gather(-1, ids)
    p = lps.double().exp()
    P = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
    Q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(loss.double(), (P * (P / Q).log()).sum(-1), rtol=1e-5, atol=1e-6)
    renorm = sparse_kd_loss(s, ids, lps, residual=False)
    assert not torch.allclose(loss, renorm)  # the two modes differ on truncated targets


@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_float64(residual):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64).requires_grad_(True)
    ids = torch.stack([torch.randperm(9, generator=g)[:4] for _ in range(6)]).view(2, 3, 4)
    ids[0, 0, 2:] = -1
    teacher = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    lps = torch.log_softmax(teacher, -1).gather(-1, ids.clamp_min(0))
    temperature = 1.0 if residual else 1.7
    fn = lambda z: sparse_kd_loss(z, ids, lps, temperature, residual, chunk_size=2,  # noqa: E731
                                  retain_graph=True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
def test_padding_out_of_range_and_neg_inf_ids(residual):
    s, _, ids, lps = _case(lead=(4,), k=5, seed=4, pad_first=False)
    ids[0] = -1                          # no kept targets at all -> loss 0, grad 0
    ids[1, 0] = V + 7                    # out of the vocabulary -> ignored like padding
    s[2, ids[2, 1]] = float("-inf")      # kept id on a -inf (padded) student column -> dropped
    pad = torch.full((4, 3), float("-inf"))
    s_pad = torch.cat([s, pad], -1)      # padded vocab columns
    ids[3, 4] = V + 1                    # an id pointing at a padded column -> dropped
    loss, grad = R.loss_and_grad(sparse_kd_loss, s_pad, ids, lps, 1.0, residual)
    ref, ref_grad = R.loss_and_grad(R.sparse, s_pad.double(), ids, lps.double(), 1.0, residual)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert loss[0] == 0 and grad[0].abs().max() == 0
    assert grad[:, V:].abs().max() == 0


def test_loss_mask_extreme_temperature_and_bf16():
    s, _, ids, lps = _case(k=8, seed=5)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 2] = mask[2, 0] = True
    loss, grad = R.loss_and_grad(sparse_kd_loss, s, ids, lps, loss_mask=mask)
    full, full_grad = R.loss_and_grad(sparse_kd_loss, s, ids, lps)
    torch.testing.assert_close(loss, torch.where(mask, full, 0.0))
    torch.testing.assert_close(grad, full_grad * mask.unsqueeze(-1))
    zero, zgrad = R.loss_and_grad(sparse_kd_loss, s, ids, lps, loss_mask=torch.zeros(3, 4))
    assert zero.abs().max() == 0 and zgrad.abs().max() == 0
    for temperature in (1e-3, 1e3):
        loss, grad = R.loss_and_grad(sparse_kd_loss, s, ids, lps, temperature)
        ref = R.sparse(s.double(), ids, lps.double(), temperature)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (loss.double() - ref).abs().max() <= 1e-6 + 1e-5 * ref.abs().max()
    lb, gb = R.loss_and_grad(sparse_kd_loss, s.bfloat16(), ids, lps.bfloat16())
    ref = R.sparse(s.bfloat16().double(), ids, lps.bfloat16().double())
    assert lb.dtype == torch.float32 and gb.dtype == torch.bfloat16
    torch.testing.assert_close(lb.double(), ref, rtol=1e-5, atol=1e-5)


def test_residual_with_all_mass_kept_and_stored_neg_inf_logprob():
    s, t, ids, lps = _case(lead=(2,), k=5, seed=6, pad_first=False)
    lps[0, 1] = float("-inf")            # a stored -inf log-prob: zero teacher mass, no NaN
    for residual in (False, True):
        loss, grad = R.loss_and_grad(sparse_kd_loss, s, ids, lps, 1.0, residual)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref = R.sparse(s.double(), ids, lps.double(), 1.0, residual)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_bad_arguments_fail_in_one_line():
    s, _, ids, lps = _case()
    with pytest.raises(ValueError, match="residual=True needs temperature=1"):
        sparse_kd_loss(s, ids, lps, 2.0, residual=True)
    with pytest.raises(ValueError, match="leading shape"):
        sparse_kd_loss(s, ids[:2], lps[:2])
    with pytest.raises(ValueError, match="integer"):
        sparse_kd_loss(s, ids.float(), lps)
    with pytest.raises(ValueError, match="k=0"):
        sparse_kd_loss(s, ids[..., :0], lps[..., :0])
