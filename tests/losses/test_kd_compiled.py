"""Compiled chunk kernels of the fused loss (issue 15 item 4, ``kd.compile``).

Values and gradients through ``torch.compile`` against the same independent float64 references as
``test_kd_fused.py`` (skipped when inductor cannot compile here), and the eager fallback when
compilation fails (one log line, eager results, compilation off for the process).
"""
import logging

import pytest
import torch

import kd_reference as R
from megatron_kd.losses import DistillationLoss, KDLossConfig
from megatron_kd.losses import compiled as C
from test_kd_fused import V, _data, _fused, _linear_fused, _linear_reference, _reference


@pytest.fixture
def fresh():
    C.reset()
    yield
    C.reset()


def _require_compiled():
    if not C.enabled():
        pytest.skip(f"inductor cannot compile here: {C._STATE['error']}")


@pytest.mark.slow  # inductor compiles 4 kernels x float64 (C++ builds): ~1 min on a busy 2-core machine
def test_compiled_kernels_match_float64_references(fresh):
    s, t, labels, mask, ids, lps, h, w, th, tw = _data(11)
    # one pass over given logits: dense fast path (clean logits) and sparse targets, masked rows
    sc, tc = s[:, :V].contiguous(), t[:, :V].contiguous()
    for kind in ("forward_kl", "soft_ce"):
        ref = _reference(sc, labels, mask, 0.3, 0.7, lambda x: R.dense(x, tc, kind))
        got = _fused(sc, labels, mask, teacher_logits=tc, kind=kind, w_kd=0.3, w_lm=0.7, compiled=True)
        _require_compiled()
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    ref = _reference(s, labels, mask, 0.5, 0.5, lambda x: R.sparse(x, ids, lps, 1.0, False))
    got = _fused(s, labels, mask, target_ids=ids, target_logprobs=lps, w_kd=0.5, w_lm=0.5, compiled=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # fused output layer: online forward KL, offline sparse, LM only (padded vocabulary, odd chunks)
    t_logits = (th @ tw.t())[:, :V]
    cases = [
        (dict(teacher_hidden=th, teacher_weight=tw, w_kd=0.7, w_lm=0.3), 0.7, 0.3, lambda x: R.dense(x, t_logits,
                                                                                               "forward_kl")),
        (dict(target_ids=ids, target_logprobs=lps, w_kd=0.5, w_lm=0.5), 0.5, 0.5,
         lambda x: R.sparse(x, ids, lps, 1.0, False)),
        (dict(w_kd=0.5, w_lm=1.0), 0.0, 1.0, None),
    ]
    for kw, w_kd, w_lm, kd_fn in cases:
        ref = _linear_reference(h, w, labels, mask, w_kd, w_lm, kd_fn)
        got = _linear_fused(h, w, labels, mask, compiled=True, **kw)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert C.enabled()
    # float32 through the layer (kd.compile): equal to the eager kernels; a new alpha does not recompile
    s32, t32 = sc.float(), tc.float()
    outs = []
    for compile_ in (False, True, True):
        x = s32.clone().requires_grad_(True)
        cfg = KDLossConfig(alpha=0.3 if len(outs) < 2 else 0.6, compile=compile_)
        loss, _, report = DistillationLoss(cfg)(x, labels, mask, teacher_logits=t32)
        loss.backward()
        outs.append((loss.detach(), x.grad, report))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-6, atol=1e-7)
    for key in outs[0][2]:
        torch.testing.assert_close(outs[1][2][key], outs[0][2][key], rtol=1e-6, atol=1e-6)
    assert C.enabled()


def test_compile_failure_falls_back_to_eager(fresh, monkeypatch, caplog):
    s, t, labels, mask, ids, lps, h, w, th, tw = _data(12)

    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nlong traceback")
        return run

    monkeypatch.setattr(C.torch, "compile", broken)
    ref = _linear_fused(h, w, labels, mask, teacher_hidden=th, teacher_weight=tw, w_kd=0.7, w_lm=0.3)
    with caplog.at_level(logging.WARNING, logger=C.__name__):
        got = _linear_fused(h, w, labels, mask, teacher_hidden=th, teacher_weight=tw, w_kd=0.7, w_lm=0.3,
                            compiled=True)
        again = _linear_fused(h, w, labels, mask, teacher_hidden=th, teacher_weight=tw, w_kd=0.7, w_lm=0.3,
                              compiled=True)
    for a, b, c in zip(got, ref, again):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12)
    lines = [r for r in caplog.records if "kd.compile" in r.getMessage()]
    assert len(lines) == 1 and "no C++ compiler found" in lines[0].getMessage()
    assert "long traceback" not in lines[0].getMessage()
    assert not C.enabled()


def _tp_cases(h, th, w, tw, labels, mask, ids, lps, s, lps_s, ids_s, labels_s, compiled):
    """Compiled kernels between the TP collectives: fused linear (online, sparse, LM) and the one-pass
    sparse loss on padded (-inf) logits. name -> arrays (values, grads of this rank's shards)."""
    from megatron_kd.losses import fused_kd_lm_loss, fused_linear_kd

    out = {}
    for name, kw in (("fkl", dict(teacher_hidden=th, teacher_weight=tw)),
                     ("sparse", dict(target_ids=ids, target_logprobs=lps)), ("lm", {})):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        total, kd, lm = fused_linear_kd(hh, ww, labels, mask, vocab_size=45, chunk_tokens=3, w_kd=0.6, w_lm=0.4,
                                        compiled=compiled, **kw)
        total.backward()
        out[name] = (torch.stack([total.detach(), kd, lm]).numpy(), hh.grad.numpy(), ww.grad.numpy())
    x = s.clone().requires_grad_(True)
    total, kd, lm = fused_kd_lm_loss(x, labels_s, None, target_ids=ids_s, target_logprobs=lps_s, chunk_size=4,
                                     compiled=compiled)
    total.sum().backward()
    out["one_pass_sparse"] = (torch.stack([total.detach(), kd, lm]).numpy(), x.grad.numpy())
    return out


def _tp_inputs():
    from test_kd_tensor_parallel import _inputs, _linear_inputs

    s, t, ids_s, lps_s, labels_s, mask_s = _inputs()
    return (*_linear_inputs(), s, lps_s, ids_s, labels_s)


def _tp_worker(rank, world_size, inputs):
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2))
    h, th, w, tw, labels, mask, ids, lps, s, lps_s, ids_s, labels_s = inputs
    rows = slice(rank * 24, (rank + 1) * 24)
    out = _tp_cases(h, th, w[rows], tw[rows], labels, mask, ids, lps, s[..., rows].contiguous(), lps_s, ids_s,
                    labels_s, True)
    return out, C.enabled(), C._STATE["error"]


@pytest.mark.slow  # two processes, each compiling the kernels
def test_compiled_tp2_equals_eager_tp1():
    import numpy as np

    from dist_helpers import run_workers

    inputs = _tp_inputs()
    ref = _tp_cases(*inputs, compiled=False)
    results = run_workers(_tp_worker, 2, inputs)
    if not all(r[1] for r in results):
        pytest.skip(f"inductor cannot compile here: {results[0][2] or results[1][2]}")
    for name, want in ref.items():
        r0, r1 = results[0][0][name], results[1][0][name]
        for r in (r0, r1):
            np.testing.assert_allclose(r[0], want[0], rtol=1e-5, atol=1e-5, err_msg=name)
        if name == "one_pass_sparse":
            np.testing.assert_allclose(np.concatenate([r0[1], r1[1]], axis=-1), want[1], rtol=1e-4, atol=1e-6)
            continue
        np.testing.assert_allclose(r0[1], want[1], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(r1[1], want[1], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.concatenate([r0[2], r1[2]], axis=0), want[2], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
