"""`megatron-kd quickstart --size tiny` end to end: report structure and KD beating no KD."""
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
                "students", "conclusions", "stages"):
        assert key in report, key
    students = {s["name"]: s for s in report["students"]}
    assert set(students) == {"no_kd", "online_kd", "offline_kd", "miniplm_data", "miniplm_kd"}
    budgets = {s["train_tokens"] for s in students.values()}
    assert len(budgets) == 1, "every student must get the same token budget"
    assert report["teacher"]["heldout_loss"] < students["no_kd"]["heldout_loss"]
    assert students["online_kd"]["heldout_loss"] < students["no_kd"]["heldout_loss"]
    for name in ("report.md", "loss_curves.png", "miniplm_scores.png"):
        assert (out / name).is_file(), name
