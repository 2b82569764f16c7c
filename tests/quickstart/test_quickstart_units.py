"""Fast checks of the quickstart report's statistics (no training)."""
import math

import numpy as np
import pytest

from megatron_kd.miniplm.report import domain_panel
from megatron_kd.quickstart.heldout import paired_bootstrap, verdict


def test_paired_bootstrap_point_estimate_and_interval():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 500, size=80).astype(float)
    base = tokens * rng.uniform(4.0, 6.0, size=80)
    better = base - 0.2 * tokens + rng.normal(0, 2.0, size=80)  # a clear, systematic gain of ~0.2 nats/token
    ci = paired_bootstrap(better, base, tokens, samples=500, seed=1)
    assert ci["delta"] == pytest.approx((better - base).sum() / tokens.sum())
    assert ci["low"] <= ci["delta"] <= ci["high"] < 0
    assert verdict(ci) == "helps"
    same = paired_bootstrap(base + rng.normal(0, 5.0, size=80), base, tokens, samples=500, seed=1)
    assert same["low"] < 0 < same["high"]
    assert verdict(same) == "no measurable effect at this scale"
    worse = paired_bootstrap(base, better, tokens, samples=500, seed=1)
    assert verdict(worse) == "hurts"
    # bits per byte: the same statistic over bytes, scaled by 1/ln 2
    bpb = paired_bootstrap(better, base, tokens * 3, samples=10, seed=1, scale=1 / math.log(2))
    assert bpb["delta"] == pytest.approx(ci["delta"] / 3 / math.log(2))


def test_paired_bootstrap_is_seeded_and_refuses_ragged_input():
    a, b, t = [1.0, 2.0, 3.0], [1.5, 2.5, 2.0], [10, 10, 10]
    assert paired_bootstrap(a, b, t, samples=50, seed=3) == paired_bootstrap(a, b, t, samples=50, seed=3)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap([1.0], [1.0, 2.0], [1, 1])
    one = paired_bootstrap([1.0], [2.0], [4])
    assert one["delta"] == -0.25 and math.isnan(one["low"]) and verdict(one) == "no measurable effect at this scale"


def test_domain_panel_keeps_the_largest_and_pools_the_rest():
    domains = {f"d{i:03d}": {"instances": i + 1, "kept_instances": (i + 1) // 2, "kept_fraction": ((i + 1) // 2) / (i + 1)}
               for i in range(30)}
    rows = domain_panel(domains, 20)
    assert len(rows) == 21
    assert [r[0] for r in rows[:3]] == ["d029", "d028", "d027"]
    label, frac, n = rows[-1]
    assert label == "other (10 domains)" and n == sum(range(1, 11))
    assert frac == pytest.approx(sum((i + 1) // 2 for i in range(10)) / n)
    assert len(domain_panel(dict(list(domains.items())[:5]), 20)) == 5


def test_score_documents_matches_a_float64_reference(dist1, tmp_path):
    """Per-document NLL / tokens / bytes and the ECE from one unpadded float64 forward per window."""
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
    import evalkit

    from megatron_kd.evaluation.lm_loss import document_windows, evaluate_lm_loss, open_eval_dataset
    from megatron_kd.quickstart.heldout import score_documents

    model, _ = evalkit.build_model(seed=3)
    docs = evalkit.random_docs(5, [40, 1, 17, 90, 2, 33])
    evalkit.write_indexed_dataset(str(tmp_path / "held"), docs)
    data = open_eval_dataset(str(tmp_path / "held"))
    seq, vocab = 16, evalkit.CFG["vocab_size"]
    tok = evalkit.ByteTokenizer()
    got = score_documents(model, data, vocab, seq, tok, micro_batch_size=3, bins=10)

    want_nll = np.zeros(len(docs))
    logits_all, labels_all = [], []
    for w in document_windows([len(d) for d in docs], seq):
        ids = docs[w.doc][w.start:w.end]
        want_nll[w.doc] -= evalkit.ref_logprobs(model, ids).sum()
        with torch.no_grad():
            lg = model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], None)[0, :, :vocab]
        logits_all.append(lg.double())
        labels_all.append(torch.tensor(ids[1:]))
    np.testing.assert_allclose(got["doc_nll"], want_nll, rtol=1e-5, atol=1e-5)
    assert got["doc_tokens"] == [max(len(d) - 1, 0) for d in docs]
    assert got["doc_bytes"] == [len(tok.decode(d).encode("utf-8")) for d in docs]
    ref = evaluate_lm_loss(model, data, vocab, seq, micro_batch_size=3, show_progress=False)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6) and got["tokens"] == ref["tokens"]

    x = torch.cat(logits_all).numpy()
    labels = torch.cat(labels_all).numpy()
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    conf, ok = p.max(-1), p.argmax(-1) == labels
    b = np.minimum((conf * 10).astype(int), 9)
    ece = sum(abs(ok[b == i].mean() - conf[b == i].mean()) * (b == i).sum() for i in range(10) if (b == i).any())
    assert got["ece"] == pytest.approx(ece / len(conf), abs=1e-6)
    assert got["mean_confidence"] == pytest.approx(conf.mean(), rel=1e-6)
    assert got["top1_accuracy"] == pytest.approx(ok.mean())


def test_offline_students_read_their_store_with_the_right_target_kind(tmp_path, monkeypatch):
    """offline_kd reads the top-k store as log-probs with the remainder bucket (sizes.kd_residual);
    offline_sampled_kd reads the sampled store as weights (T = 1, no bucket); online KD has neither."""
    import megatron_kd.distill.run as run_mod
    from megatron_kd.quickstart.pipeline import Quickstart
    from megatron_kd.quickstart.sizes import SIZES

    seen = {}
    monkeypatch.setattr(run_mod, "run_distill", lambda cfg: seen.setdefault("cfg", cfg) and {"iteration": 0})
    qs = Quickstart(tmp_path, SIZES["tiny"], log=lambda s: None)
    qs.results = {"tokenizer": {"path": str(tmp_path / "spm.model"), "vocab_size": 1024},
                  "teacher": {"checkpoint": str(tmp_path / "teacher")},
                  "logits": {"store": str(tmp_path / "topk"), "sampled": {"store": str(tmp_path / "sample")}}}
    size = SIZES["tiny"]
    want = {"offline_kd": ("topk", "logprobs", True, size.topk_alpha),
            "offline_sampled_kd": ("sample", "weights", False, size.kd_alpha),
            "online_kd": (None, "auto", False, size.kd_alpha), "miniplm_kd": (None, "auto", False, size.kd_alpha)}
    qs.results["miniplm"] = {"prefix": str(tmp_path / "miniplm")}
    for name, (store, kind, residual, alpha) in want.items():
        seen.clear()
        qs.student(name)
        kd = seen["cfg"].kd
        assert (kd.logits_store, kd.target_kind, kd.residual, kd.temperature) == (
            str(tmp_path / store) if store else None, kind, residual, 1.0), name
        assert kd.kind == "forward_kl" and kd.alpha == alpha, name
