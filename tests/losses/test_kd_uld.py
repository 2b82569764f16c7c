"""Cross-tokenizer losses (megatron_kd.losses.uld_loss / hybrid_kd_loss) against float64
references written from their definitions (row by row, plain autograd through torch.sort), the
identical-tokenizer reduction to forward KL, and TP=2 = TP=1.

    PYTHONPATH=$PWD python -m pytest -q tests/losses/test_kd_uld.py
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_helpers import run_workers
from megatron_kd.data.vocab_map import VocabMap
from megatron_kd.losses import hybrid_kd_loss, kd_loss, projected_kd_loss, uld_loss

VS, VT = 38, 54  # student and teacher vocabularies (padded, even for TP=2)
REAL_S, REAL_T = 35, 51
T = 1.7


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(4, 3, VS, generator=g, dtype=torch.float64) * 2
    t = torch.randn(4, 3, VT, generator=g, dtype=torch.float64) * 2
    s[..., REAL_S:] = float("-inf")
    t[..., REAL_T:] = float("-inf")
    mask = torch.ones(4, 3)
    mask[1, 2] = mask[3, 0] = 0
    perm = torch.randperm(REAL_T, generator=g)[:20]
    vmap = VocabMap(np.arange(0, 40, 2)[:20].astype(np.int64) % REAL_S, perm.numpy().astype(np.int64), VS, VT)
    order = np.argsort(vmap.student_ids)
    vmap = VocabMap(vmap.student_ids[order], vmap.teacher_ids[order], VS, VT)
    return s, t, mask, vmap


def _probs(x, temperature):
    return torch.softmax(x / temperature, -1)  # -inf columns -> exactly 0


def _sorted_l1(a, b):
    a = torch.sort(a, descending=True).values
    b = torch.sort(b, descending=True).values
    n = max(len(a), len(b))
    return (F.pad(a, (0, n - len(a))) - F.pad(b, (0, n - len(b)))).abs().sum()


def ref_uld_row(s, t, temperature, top_m=None):
    q, p = _probs(s, temperature), _probs(t, temperature)
    if top_m is None:
        return _sorted_l1(q, p)
    qs = torch.sort(q, descending=True).values[:top_m]
    ps = torch.sort(p, descending=True).values[:top_m]
    head = _sorted_l1(qs, ps)
    return head + ((q.sum() - qs.sum()) - (p.sum() - ps.sum())).abs()


def ref_hybrid_row(s, t, vmap, temperature, w_m, w_u):
    q, p = _probs(s, temperature), _probs(t, temperature)
    a, b = torch.as_tensor(vmap.student_ids), torch.as_tensor(vmap.teacher_ids)
    qm, pm = q[a] / q[a].sum(), p[b] / p[b].sum()
    nz = pm > 0
    kl = (pm[nz] * (pm[nz].log() - qm[nz].log())).sum()
    s_un = torch.ones(len(q), dtype=torch.bool)
    s_un[a] = False
    t_un = torch.ones(len(p), dtype=torch.bool)
    t_un[b] = False
    return w_m * kl + w_u * _sorted_l1(q[s_un], p[t_un])


def ref_projected_row(s, t, proj, temperature):
    p = _probs(t, temperature)
    proj = torch.as_tensor(proj)
    keep = (proj >= 0).nonzero().reshape(-1)
    r = torch.zeros(len(s), dtype=s.dtype).index_add(0, proj[keep], p[keep])
    r = r / r.sum()
    log_q = torch.log_softmax(s / temperature, -1)
    nz = (r > 0).nonzero().reshape(-1)
    return (r[nz] * (r[nz].log() - log_q[nz])).sum()


def _projection(seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randint(0, REAL_S, (VT,), generator=g)
    proj[REAL_T:] = -1  # padded teacher columns
    proj[::7] = -1      # some teacher ids map nowhere (their mass is dropped)
    return proj.numpy()


def _reference(row_fn, s, t, mask, *args):
    x = s.clone().requires_grad_(True)
    rows = [row_fn(x[i, j], t[i, j], *args) if mask[i, j] else x.new_zeros(()) + 0 * x[i, j, 0]
            for i in range(s.shape[0]) for j in range(s.shape[1])]
    loss = torch.stack(rows).view(s.shape[:-1])
    loss.sum().backward()
    return loss.detach(), x.grad


def _ours(fn, s, t, mask, *args, **kw):
    x = s.clone().requires_grad_(True)
    loss = fn(x, t, *args, loss_mask=mask, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("top_m", [None, 5, 1, 60])
def test_uld_matches_float64_reference(top_m):
    s, t, mask, _ = _inputs()
    ref_loss, ref_grad = _reference(ref_uld_row, s, t, mask, T, top_m)
    loss, grad = _ours(uld_loss, s, t, mask, T, top_m, chunk_size=5)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert (loss[mask == 0] == 0).all() and (grad[mask == 0] == 0).all()


def test_top_m_bounds_the_exact_loss_by_the_tail_mass():
    s, t, _, _ = _inputs(1)
    exact = uld_loss(s, t, T)
    for m in (1, 3, 10, 30):
        approx = uld_loss(s, t, T, top_m=m)
        q = torch.sort(_probs(s, T), -1, descending=True).values
        p = torch.sort(_probs(t, T), -1, descending=True).values
        tails = torch.minimum(1 - q[..., :m].sum(-1), 1 - p[..., :m].sum(-1))
        assert (approx <= exact + 1e-12).all() and (exact <= approx + 2 * tails + 1e-12).all()
    torch.testing.assert_close(uld_loss(s, t, T, top_m=VT), exact)


def test_hybrid_matches_float64_reference():
    s, t, mask, vmap = _inputs(2)
    ref_loss, ref_grad = _reference(ref_hybrid_row, s, t, mask, vmap, T, 0.7, 0.4)
    loss, grad = _ours(hybrid_kd_loss, s, t, mask, vmap, T, 0.7, 0.4, chunk_size=4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_hybrid_top_m_applies_to_the_unmatched_remainder():
    s, t, mask, vmap = _inputs(2)
    kl_only = hybrid_kd_loss(s, t, vmap, T, 0.7, 0.0, loss_mask=mask)
    loss = hybrid_kd_loss(s, t, vmap, T, 0.7, 0.4, 4, loss_mask=mask)
    qu, pu = _probs(s, T).clone(), _probs(t, T).clone()
    qu[..., vmap.student_ids] = 0
    pu[..., vmap.teacher_ids] = 0
    qs, ps = torch.sort(qu, -1, True).values[..., :4], torch.sort(pu, -1, True).values[..., :4]
    tail = ((qu.sum(-1) - qs.sum(-1)) - (pu.sum(-1) - ps.sum(-1))).abs()
    torch.testing.assert_close(loss, kl_only + 0.4 * ((qs - ps).abs().sum(-1) + tail) * mask, rtol=1e-10, atol=1e-12)


def test_identical_tokenizers_hybrid_is_forward_kl_and_uld_of_self_is_zero():
    s, t, mask, _ = _inputs(3)
    t = t[..., :VS].clone()
    t[..., REAL_S:] = float("-inf")
    ident = VocabMap.identity(VS)
    loss, grad = _ours(hybrid_kd_loss, s, t, mask, ident, T)
    ref_loss, ref_grad = _ours(kd_loss, s, t, mask, "forward_kl", T)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert uld_loss(s, s, T).abs().max() < 1e-12


def test_projected_matches_float64_reference_and_reduces_to_forward_kl():
    s, t, mask, _ = _inputs(6)
    proj = _projection()
    ref_loss, ref_grad = _reference(ref_projected_row, s, t, mask, proj, T)
    loss, grad = _ours(projected_kd_loss, s, t, mask, proj, T, chunk_size=5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    t_same = t[..., :VS].clone()
    t_same[..., REAL_S:] = float("-inf")
    ident = np.arange(VS)
    loss, grad = _ours(projected_kd_loss, s, t_same, mask, ident, T)
    ref_loss, ref_grad = _ours(kd_loss, s, t_same, mask, "forward_kl", T)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_float32_and_no_grad_and_bad_input():
    s, t, mask, vmap = _inputs(4)
    loss32 = uld_loss(s.float(), t.float(), T, loss_mask=mask)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), uld_loss(s, t, T, loss_mask=mask), rtol=1e-5, atol=1e-6)
    x = s.float().requires_grad_(True)
    with torch.no_grad():
        assert hybrid_kd_loss(x, t.float(), vmap, T).grad_fn is None
    with pytest.raises(ValueError, match="same leading shape"):
        uld_loss(s, t[:2], T)
    with pytest.raises(ValueError, match="top_m"):
        uld_loss(s, t, T, top_m=0)
    with pytest.raises(ValueError, match="exceed"):
        hybrid_kd_loss(s, t, VocabMap(np.array([VS + 3]), np.array([0]), VS, VT), T)


def _tp_cases(s, t, mask, vmap):
    out = {}
    for name, fn, args in (("uld", uld_loss, (T, None)), ("uld_top3", uld_loss, (T, 3)),
                           ("uld_top40", uld_loss, (T, 40)),
                           ("hybrid", hybrid_kd_loss, (vmap, T, 0.6, 0.5)),
                           ("hybrid_top3", hybrid_kd_loss, (vmap, T, 0.6, 0.5, 3)),
                           ("projected", projected_kd_loss, (_projection(), T))):
        out[name] = _ours(fn, s, t, mask, *args, chunk_size=5)
    return out


def _tp_worker(rank, world_size, inputs):
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2))
    s, t, mask, vmap = inputs
    ss = s[..., rank * VS // 2:(rank + 1) * VS // 2].float().contiguous()
    ts = t[..., rank * VT // 2:(rank + 1) * VT // 2].float().contiguous()
    return {k: (v[0].numpy(), v[1].numpy()) for k, v in _tp_cases(ss, ts, mask, vmap).items()}


def test_tp2_equals_tp1():
    s, t, mask, vmap = _inputs(5)
    ref = _tp_cases(s.float(), t.float(), mask, vmap)
    ranks = run_workers(_tp_worker, 2, (s, t, mask, vmap))
    for name, (ref_loss, ref_grad) in ref.items():
        for r in ranks:
            np.testing.assert_allclose(r[name][0], ref_loss.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        grad = np.concatenate([ranks[0][name][1], ranks[1][name][1]], axis=-1)
        np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def _projected_plain(s, t, proj, temperature, mask):
    """The projected loss written as plain out-of-place formulas over whole [n, V] tensors (the kernel's
    form before it worked in place): the in-place kernel must give the same bits, not merely close ones."""
    proj = torch.as_tensor(proj)
    src = (proj >= 0).nonzero().reshape(-1)
    z_t = t / temperature
    m_t = z_t.amax(-1, keepdim=True)
    m_t = torch.where(torch.isfinite(m_t), m_t, torch.zeros_like(m_t))
    e_t = torch.exp(z_t - m_t)
    tot_t = e_t.sum(-1, keepdim=True)
    p = e_t / torch.where(tot_t > 0, tot_t, torch.ones_like(tot_t))
    r = torch.zeros(s.shape[0], s.shape[1], dtype=s.dtype)
    r.index_add_(1, proj[src], p.index_select(1, src))
    mass = r.sum(-1, keepdim=True)
    r = r / torch.where(mass > 0, mass, torch.ones_like(mass))
    z = s / temperature
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    total = e.sum(-1, keepdim=True)
    lse = m + torch.log(total)
    log_q = torch.where(r > 0, z - lse, torch.zeros_like(z))
    log_r = torch.where(r > 0, torch.log(torch.where(r > 0, r, torch.ones_like(r))), torch.zeros_like(r))
    loss = torch.where(mass.squeeze(-1) > 0, (r * (log_r - log_q)).sum(-1), torch.zeros(()))
    grad = torch.where(mass > 0, (e / total - r) / temperature, torch.zeros(()))
    return loss * mask, grad * mask.unsqueeze(-1)


@pytest.mark.parametrize("temperature", [1.0, T])
def test_projected_in_place_kernel_gives_the_plain_formulas_bits(temperature):
    g = torch.Generator().manual_seed(3)
    n, vs, vt = 300, 257, 389
    s = torch.randn(n, vs, generator=g) * 3
    t = torch.randn(n, vt, generator=g) * 3
    s[:, 250:] = t[:, 380:] = float("-inf")
    t[7] = float("-inf")  # a position whose teacher row is all padding: no mass, loss and gradient 0
    proj = torch.randint(0, 250, (vt,), generator=g)
    proj[380:] = -1
    proj[::5] = -1
    mask = (torch.rand(n, generator=g) > 0.1).float()
    ref_loss, ref_grad = _projected_plain(s, t, proj.numpy(), temperature, mask)
    loss, grad = _ours(projected_kd_loss, s, t, mask, proj.numpy(), temperature, chunk_size=64)
    assert ref_loss[7] == 0 and not ref_grad[7].any()
    assert torch.equal(loss, ref_loss)
    assert torch.equal(grad, ref_grad)
