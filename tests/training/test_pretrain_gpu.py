"""GPU only (skipped without CUDA): bf16 + distributed optimizer pre-training trains and resumes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_kd.utils.progress import read_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
def test_bf16_distributed_optimizer_trains_and_resumes(tmp_path):
    save = tmp_path / "gpu"
    base = [sys.executable, "-m", "megatron_kd", "pretrain", "--config", str(REPO / "examples/cpu/pretrain_tiny.yaml"),
            "optim.precision=bf16", "optim.use_distributed_optimizer=true", "train.eval_iters=0",
            "train.train_iters=40", "checkpoint.save_interval=20", f"checkpoint.save={save}",
            f"logging.metrics_path={save}/metrics.jsonl", "logging.quiet=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(base + ["train.exit_interval=20"], env=env, check=True, timeout=600)
    subprocess.run(base, env=env, check=True, timeout=600)
    losses = [r["loss"] for r in read_jsonl(save / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
