"""TP=2 (gloo, 2 processes, vocab-sharded logits) equals TP=1 on the full vocabulary.

One spawn runs every case (dense kinds, sparse, residual, the distillation loss layer with
megatron's vocab_parallel_cross_entropy); the parent computes the single-process results.
"""
import numpy as np
import torch

from dist_helpers import run_workers
from kd_reference import loss_and_grad
from megatron_kd.losses import KINDS, DistillationLoss, KDLossConfig, fused_linear_kd, kd_loss, sparse_kd_loss

REAL_V, PADDED_V = 45, 48  # megatron pads the vocabulary; padded columns are -inf
T = 1.5


def _inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 2, PADDED_V, generator=g) * 2
    t = torch.randn(5, 2, PADDED_V, generator=g) * 2
    s[..., REAL_V:] = t[..., REAL_V:] = float("-inf")
    ids = torch.stack([torch.randperm(REAL_V, generator=g)[:7] for _ in range(10)]).view(5, 2, 7)
    ids[0, 0, 4:] = -1
    ids[1, 1, :] = -1
    lps = torch.log_softmax(t, -1).gather(-1, ids.clamp_min(0))
    labels = torch.randint(0, REAL_V, (5, 2), generator=g)
    mask = torch.ones(5, 2)
    mask[4, 1] = 0
    return s, t, ids, lps, labels, mask


def _cases(s, t, ids, lps, labels, mask, tp_group=None):
    """name -> (loss or loss_sum, d loss.sum() / d student logits (this shard))."""
    out = {}
    for kind in KINDS:
        out[kind] = loss_and_grad(kd_loss, s, t, kind, T, 0.2, 0.3, chunk_size=3, tp_group=tp_group)
    out["sparse"] = loss_and_grad(sparse_kd_loss, s, ids, lps, T, chunk_size=4, tp_group=tp_group)
    out["residual"] = loss_and_grad(sparse_kd_loss, s, ids, lps, 1.0, True, tp_group=tp_group)
    cfg = KDLossConfig(alpha=0.4, temperature=T, t2_scale=True, chunk_size=3)
    for name, kw in (("layer_dense", dict(teacher_logits=t)),
                     ("layer_sparse", dict(target_ids=ids, target_logprobs=lps))):
        x = s.clone().requires_grad_(True)
        loss_sum, count, report = DistillationLoss(cfg)(x, labels, mask, **kw)
        assert torch.equal(x.detach(), s), "the loss layer must not modify the logits"
        loss_sum.backward()
        out[name] = (torch.stack([loss_sum.detach(), count.float(), report["lm"][0], report["kd"][0]]),
                     x.grad)
    return out


H, HT = 6, 10


def _linear_inputs():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4, H, generator=g)  # [b, s, H]; sequence parallel splits s
    th = torch.randn(2, 4, HT, generator=g)
    w = torch.randn(PADDED_V, H, generator=g) * 0.8
    tw = torch.randn(PADDED_V, HT, generator=g) * 0.8
    labels = torch.randint(0, REAL_V, (2, 4), generator=g)
    mask = torch.ones(2, 4)
    mask[1, 2] = 0
    ids = torch.stack([torch.randperm(REAL_V, generator=g)[:5] for _ in range(8)]).view(2, 4, 5)
    lps = torch.log_softmax(torch.randn(2, 4, REAL_V, generator=g), -1).gather(-1, ids)
    return h, th, w, tw, labels, mask, ids, lps


def _linear_cases(h, th, w, tw, labels, mask, ids, lps, sp=False):
    """name -> (stack(total, kd, lm), grad of h (this rank's part), grad of w (this shard))."""
    out = {}
    for name, kw in (("lin_fkl", dict(teacher_hidden=th, teacher_weight=tw)),
                     ("lin_jsd", dict(teacher_hidden=th, teacher_weight=tw, kind="jsd", temperature=T)),
                     ("lin_sparse", dict(target_ids=ids, target_logprobs=lps)),
                     ("lin_lm", {})):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        total, kd, lm = fused_linear_kd(hh, ww, labels, mask, vocab_size=REAL_V, chunk_tokens=3,
                                        sequence_parallel=sp, w_kd=0.6, w_lm=0.4, **kw)
        total.backward()
        out[name] = (torch.stack([total.detach(), kd, lm]), hh.grad, ww.grad)
    return out


def _worker(rank, world_size, inputs):
    from megatron.core import parallel_state

    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2))
    s, t, ids, lps, labels, mask = inputs
    local = PADDED_V // 2
    shard = slice(rank * local, (rank + 1) * local)
    res = _cases(s[..., shard].contiguous(), t[..., shard].contiguous(), ids, lps, labels, mask)
    explicit = parallel_state.get_tensor_model_parallel_group()
    res["explicit_group"] = loss_and_grad(kd_loss, s[..., shard].contiguous(), t[..., shard].contiguous(),
                                          "jsd", T, tp_group=explicit)
    # lm_inplace=True lets megatron's CE reuse fp32 logits as its softmax buffer (documented)
    x = s[..., shard].contiguous()
    before = x.clone()
    cfg = KDLossConfig(alpha=0.5, lm_inplace=True)
    inplace_sum, _, _ = DistillationLoss(cfg)(x, labels, mask, teacher_logits=t[..., shard].contiguous())
    assert not torch.equal(x, before)
    res["lm_inplace"] = (inplace_sum.detach().reshape(1), torch.zeros(0))
    out = {k: (v[0].numpy(), v[1].numpy()) for k, v in res.items()}
    h, th, w, tw, labels, mask, ids, lps = _linear_inputs()
    rows = slice(rank * local, (rank + 1) * local)
    lin = _linear_cases(h, th, w[rows], tw[rows], labels, mask, ids, lps)
    half = slice(rank * 2, rank * 2 + 2)
    sp = _linear_cases(h[:, half].contiguous(), th[:, half].contiguous(), w[rows], tw[rows], labels, mask,
                       ids, lps, sp=True)
    lin.update({"sp_" + k: v for k, v in sp.items()})
    return out, {k: tuple(x.numpy() for x in v) for k, v in lin.items()}


def test_tp2_equals_tp1_values_and_gradients():
    inputs = _inputs()
    ref = _cases(*inputs)
    ref["explicit_group"] = loss_and_grad(kd_loss, inputs[0], inputs[1], "jsd", T)
    results = run_workers(_worker, 2, inputs)
    ranks = [r[0] for r in results]
    lin_ref = _linear_cases(*_linear_inputs())
    for name, (ref_vals, ref_gh, ref_gw) in lin_ref.items():
        for prefix, concat_h in (("", None), ("sp_", 1)):
            r0, r1 = results[0][1][prefix + name], results[1][1][prefix + name]
            for r in (r0, r1):
                np.testing.assert_allclose(r[0], ref_vals.numpy(), rtol=1e-5, atol=1e-5, err_msg=prefix + name)
            gh = r0[1] if concat_h is None else np.concatenate([r0[1], r1[1]], axis=concat_h)
            if concat_h is None:
                np.testing.assert_allclose(r1[1], ref_gh.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(gh, ref_gh.numpy(), rtol=1e-4, atol=1e-6, err_msg=prefix + name)
            gw = np.concatenate([r0[2], r1[2]], axis=0)
            np.testing.assert_allclose(gw, ref_gw.numpy(), rtol=1e-4, atol=1e-6, err_msg=prefix + name)
    assert set(ranks[0]) == set(ref) | {"lm_inplace"}
    cfg = KDLossConfig(alpha=0.5)
    inplace_ref = DistillationLoss(cfg)(inputs[0], inputs[4], inputs[5], teacher_logits=inputs[1])[0]
    for rank in ranks:
        np.testing.assert_allclose(rank["lm_inplace"][0], [inplace_ref.item()], rtol=1e-5, atol=1e-5)
    for name, (ref_loss, ref_grad) in ref.items():
        for rank in ranks:  # every TP rank holds the full loss
            np.testing.assert_allclose(rank[name][0], ref_loss.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
        grad = np.concatenate([ranks[0][name][1], ranks[1][name][1]], axis=-1)
        np.testing.assert_allclose(grad, ref_grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.isfinite(grad).all()
