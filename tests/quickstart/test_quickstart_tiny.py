"""`megatron-kd quickstart --size tiny` end to end: report structure, intervals, calibration, stores.

At this size no KD student beats no KD measurably (measured 2026-12-06: online KD, α = 0.9, +0.060 nats
[95% CI +0.033, +0.090]; seed-to-seed spread of no KD alone is 0.14 nats); the report says so, and the test checks that its verdicts follow the
intervals rather than asserting a gain. KD gains are for the `full` size (see docs/quickstart.md)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_tiny_report(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "megatron_kd", "quickstart", "--out", str(out), "--size", "tiny"],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in ("version", "size", "corpus", "tokenizer", "teacher", "reference", "miniplm", "logits_store",
                "students", "conclusions", "stages", "evaluation"):
        assert key in report, key
    assert report["size"] == "tiny"
    ev = report["evaluation"]
    assert ev["seq_length"] == 128 and ev["documents"] >= 10 and ev["bootstrap"]["samples"] > 0
    store = report["logits_store"]
    for key in ("method", "target_kind", "positions", "bytes_per_token", "bytes_per_entry", "mean_entries"):
        assert store.get(key) is not None, key
    assert store["method"] == "topk" and store["bytes_per_token"] > 0
    students = {s["name"]: s for s in report["students"]}
    assert set(students) == {"no_kd", "online_kd", "offline_kd", "miniplm_data", "miniplm_kd", "offline_sampled_kd",
                             "xtok_no_kd", "xtok_kd"}
    sampled = report["logits_stores"]["sample"]
    assert sampled["method"] == "sample" and sampled["target_kind"] == "weights" and sampled["num_samples"] == 12
    assert students["offline_sampled_kd"]["kd"]["target_kind"] == "weights"
    assert students["offline_kd"]["kd"]["target_kind"] == "logprobs" and students["offline_kd"]["kd"]["residual"]
    # the own-tokenizer student is compared with its own no-KD twin, in bits per byte
    assert students["xtok_kd"]["vs_no_kd"]["baseline"] == "xtok_no_kd"
    assert students["xtok_kd"]["vs_no_kd"]["metric"] == "bits_per_byte"
    assert students["xtok_kd"]["kd"]["cross_tokenizer"] == "projected"
    budgets = {s["train_tokens"] for s in students.values()}
    assert len(budgets) == 1, "every student must get the same token budget"
    for name, s in students.items():
        assert 0 <= s["ece"] <= 1 and 0 <= s["top1_accuracy"] <= 1, name
        assert s["mean_confidence"] > 5 / 1024, name  # real top-1 probabilities, not a uniform distribution's
        assert s["heldout_bits_per_byte"] > 0, name
        assert len(s["heldout_curve"]["steps"]) >= 2, name  # eval every eval_interval steps
        if name != "no_kd":
            ci = s["vs_no_kd"]
            assert ci["low"] <= ci["delta"] <= ci["high"], name
            assert s["verdict"] in ("helps", "hurts", "no measurable effect at this scale"), name
            helps = ci["high"] < 0
            assert (s["verdict"] == "helps") == helps, name
    assert report["teacher"]["heldout_loss"] < students["no_kd"]["heldout_loss"]
    assert report["teacher"]["vs_no_kd"]["high"] < 0, "the teacher must be measurably stronger"
    for name in ("report.md", "loss_curves.png", "miniplm_scores.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "95% CI" in md and "eval context 128 tokens" in md and "size `tiny`" in md
