"""MiniLLM loss terms against float64 references computed from the same logits and samples;
TP=2 equals TP=1 (values and gradients); whitening over DP=2 equals whitening the union."""
import pytest
import torch

from dist_helpers import run_workers
from minillm_test_utils import plain, tensors
from megatron_kd.posttrain import losses as L

V, PAD = 40, 35  # real vocab 35, padded to 40


@pytest.fixture(autouse=True, scope="module")
def _single_process_parallel_state():
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())  # world size 1: megatron's vocab-parallel CE needs the TP group


def _data(seed=0, b=3, t=7):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, V, generator=g) * 2
    te = torch.randn(b, t, V, generator=g) * 2
    s[..., PAD:] = float("-inf")
    te[..., PAD:] = float("-inf")
    labels = torch.randint(0, PAD, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[0, :2] = 0   # prompt positions
    mask[1, 5:] = 0   # padding after EOS
    return s, te, labels, mask, g


def _ref_logsoftmax(x):
    return torch.log_softmax(x.double(), -1)


def test_token_log_probs_value_grad_and_input_untouched():
    s, _, labels, _, _ = _data()
    s = s.requires_grad_(True)
    before = s.detach().clone()
    lq = L.token_log_probs(s, labels)
    assert torch.equal(s.detach(), before)  # megatron's CE works in place: we must pass a copy
    ref_in = s.detach().double().requires_grad_(True)
    ref = _ref_logsoftmax(ref_in).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(lq.double(), ref, atol=1e-5, rtol=0)
    w = torch.randn(lq.shape, dtype=torch.float64)
    (lq.double() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_in.grad.nan_to_num(0.0), atol=1e-5, rtol=0)


def test_single_step_reverse_kl_value_and_grad():
    s, te, _, _, _ = _data(1)
    s = s.requires_grad_(True)
    kl = L.single_step_reverse_kl(s, te)
    ref_in = s.detach().double().requires_grad_(True)
    lq, lp = _ref_logsoftmax(ref_in[..., :PAD]), _ref_logsoftmax(te.double()[..., :PAD])
    ref = (lq.exp() * (lq - lp)).sum(-1)
    torch.testing.assert_close(kl.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.rand(kl.shape, dtype=torch.float64)
    (kl.double() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_in.grad.nan_to_num(0.0), atol=1e-5, rtol=1e-5)
    assert (s.grad[..., PAD:] == 0).all()
    # KL(q || q) = 0 and gradient 0
    torch.testing.assert_close(L.single_step_reverse_kl(te, te), torch.zeros(kl.shape), atol=1e-6, rtol=0)


def test_mixture_log_prob_and_importance_weights():
    g = torch.Generator().manual_seed(2)
    lq = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 5
    lp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 5
    for a in (0.0, 0.2, 0.5, 1.0):
        mix = (1 - a) * lq.exp() + a * lp.exp()
        torch.testing.assert_close(L.mixture_log_prob(lq, lp, a), mix.log(), atol=1e-12, rtol=0)
        torch.testing.assert_close(L.importance_weights(lq, lp, a), lq.exp() / mix, atol=1e-12, rtol=0)
    torch.testing.assert_close(L.importance_weights(lq, lp, 0.0), torch.ones_like(lq))


def _ref_returns(r, m, gamma, include_current, length_norm):
    b, T = r.shape
    out = torch.zeros(b, T, dtype=torch.float64)
    for i in range(b):
        for t in range(T):
            if not m[i, t]:
                continue
            first = t if include_current else t + 1
            terms = [(gamma ** (u - t)) * r[i, u].item() for u in range(first, T) if m[i, u]]
            total = sum(terms)
            out[i, t] = total / max(len(terms), 1) if length_norm else total
    return out


def test_normalized_returns_match_explicit_sums():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(4, 9, generator=g, dtype=torch.float64)
    m = torch.zeros(4, 9)
    m[0, 2:7] = 1
    m[1, 0:9] = 1
    m[2, 4:5] = 1  # single-token response
    m[3, 1:4] = 1
    for gamma in (1.0, 0.95):
        for inc in (True, False):
            for norm in (True, False):
                got = L.normalized_returns(r, m, gamma, inc, norm)
                torch.testing.assert_close(got, _ref_returns(r, m, gamma, inc, norm), atol=1e-12, rtol=0)


def test_token_rewards_and_whiten():
    g = torch.Generator().manual_seed(4)
    lp, lq = -torch.rand(3, 5, generator=g) * 4, -torch.rand(3, 5, generator=g) * 4
    torch.testing.assert_close(L.token_rewards(lp, lq, 2.0), 2.0 * (lp.double() - lq.double()))
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = (torch.rand(3, 5, generator=g) > 0.3).float()
    vals = x[m.bool()]
    ref = (x - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-8) * m
    torch.testing.assert_close(L.whiten(x, m), ref, atol=1e-12, rtol=0)


def test_ppo_clipped_surrogate_value_and_grad():
    g = torch.Generator().manual_seed(5)
    logq = (-torch.rand(2, 50, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    log_beh = logq.detach() + torch.randn(2, 50, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(2, 50, generator=g, dtype=torch.float64)
    loss, clipped = L.ppo_clipped_surrogate(logq, log_beh, adv, 0.2)
    rho = torch.exp(logq.detach() - log_beh)
    ref = torch.maximum(-adv * rho, -adv * rho.clamp(0.8, 1.2))
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    loss.sum().backward()
    # d/dlogq of -A rho is -A rho where the unclipped branch is active, else 0.
    active = (-adv * rho) >= (-adv * rho.clamp(0.8, 1.2))
    ref_grad = torch.where(active, -adv * rho, torch.zeros_like(rho))
    torch.testing.assert_close(logq.grad, ref_grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(clipped.bool(), ~active)
    assert clipped.sum() > 0 and (~clipped.bool()).sum() > 0


def _ref_total(s, te, labels, log_beh, adv, w, clip, weighted):
    """float64 MiniLLM per-token loss: max(-A rho, -A clip(rho)) + (w) KL(q||p), rho = q/p~."""
    lq_all = _ref_logsoftmax(s[..., :PAD])
    lp_all = _ref_logsoftmax(te.double()[..., :PAD])
    lq = lq_all.gather(-1, labels[..., None]).squeeze(-1)
    rho = torch.exp(lq - log_beh)
    pg = torch.maximum(-adv * rho, -adv * rho.clamp(1 - clip, 1 + clip))
    kl = (lq_all.exp() * (lq_all - lp_all)).sum(-1)
    return pg + (w if weighted else 1.0) * kl


def test_minillm_token_loss_equals_float64_reference():
    s, te, labels, mask, g = _data(6)
    # Rollout quantities from the *same* samples: behaviour = teacher-mixed (alpha 0.2), old = current.
    lq_old = L.token_log_probs(s, labels).double()
    lp = L.token_log_probs(te, labels).double()
    log_beh = L.mixture_log_prob(lq_old, lp, 0.2)
    w = L.importance_weights(lq_old, lp, 0.2)
    rewards = L.token_rewards(lp, lq_old) * mask
    adv = L.whiten(L.normalized_returns(rewards, mask, 0.95, True, True), mask)
    s_pert = s + torch.randn(s.shape, generator=g) * 0.3  # a few optimizer steps later: ratios move
    s_pert[..., PAD:] = float("-inf")
    for weighted in (False, True):
        x = s_pert.clone().requires_grad_(True)
        loss, parts = L.minillm_token_loss(x, te, labels, log_beh, adv, w, 0.2, 1.0, weighted)
        ref_in = s_pert.double().requires_grad_(True)
        ref = _ref_total(ref_in, te, labels, log_beh, adv, w, 0.2, weighted)
        torch.testing.assert_close(loss.double() * mask, ref * mask, atol=1e-5, rtol=1e-5)
        (loss * mask).sum().backward()
        (ref * mask).sum().backward()
        torch.testing.assert_close(x.grad.double(), ref_in.grad.nan_to_num(0.0), atol=1e-5, rtol=1e-5)
        assert 0 < parts["clipped"][mask.bool()].mean() < 1


def test_soft_cross_entropy_value_and_grad():
    s, te, _, _, _ = _data(7)
    s = s.requires_grad_(True)
    got = L.soft_cross_entropy(s, te)
    ref_in = s.detach().double().requires_grad_(True)
    ref = -(torch.softmax(te.double()[..., :PAD], -1) * _ref_logsoftmax(ref_in[..., :PAD])).sum(-1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_in.grad.nan_to_num(0.0), atol=1e-5, rtol=1e-5)


def _tp_worker(rank, world_size, s, te, labels, mask, log_beh, adv, w, x_local):
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    local = s.shape[-1] // world_size
    sl = slice(rank * local, (rank + 1) * local)
    out = {}
    xs = s[..., sl].clone().requires_grad_(True)
    loss, _ = L.minillm_token_loss(xs, te[..., sl], labels, log_beh, adv, w, 0.2, 1.0, True)
    (loss * mask).sum().backward()
    out["loss"], out["grad"] = loss.detach(), xs.grad
    xs = s[..., sl].clone().requires_grad_(True)
    sce = L.soft_cross_entropy(xs, te[..., sl])
    sce.sum().backward()
    out["sce"], out["sce_grad"] = sce.detach(), xs.grad
    out["logq"] = L.token_log_probs(s[..., sl], labels)
    # Whitening over DP: at world_size 2 with TP=1 each rank whitens its half of x.
    return plain(out)


def _dp_whiten_worker(rank, world_size, x, m):
    from megatron.core import parallel_state

    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig())
    half = x.shape[0] // world_size
    sl = slice(rank * half, (rank + 1) * half)
    return plain(L.whiten(x[sl], m[sl], parallel_state.get_data_parallel_group()))


def test_tp2_equals_tp1_and_dp_whitening():
    s, te, labels, mask, g = _data(8)
    lq = L.token_log_probs(s, labels).double()
    lp = L.token_log_probs(te, labels).double()
    log_beh = L.mixture_log_prob(lq, lp, 0.2)
    w = L.importance_weights(lq, lp, 0.2)
    adv = torch.randn(lq.shape, generator=g, dtype=torch.float64)
    args = (s, te, labels, mask, log_beh, adv, w, None)
    ref = tensors(_tp_worker(0, 1, *args))  # TP=1 reference in this process
    outs = tensors(run_workers(_tp_worker, 2, *args))
    for r, out in enumerate(outs):
        for k in ("loss", "sce", "logq"):
            torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-5)
        for k in ("grad", "sce_grad"):
            torch.testing.assert_close(out[k], ref[k][..., r * V // 2:(r + 1) * V // 2], atol=1e-5, rtol=1e-5)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    m = (torch.rand(6, 5, generator=g) > 0.3).float()
    halves = tensors(run_workers(_dp_whiten_worker, 2, x, m))
    torch.testing.assert_close(torch.cat(halves), L.whiten(x, m), atol=1e-12, rtol=0)
