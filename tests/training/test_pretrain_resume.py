"""`megatron-kd pretrain` end to end: the loss goes down, and a run killed with SIGKILL after a
checkpoint resumes onto exactly the loss curve of an uninterrupted run (also across a DP change)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_kd.utils.progress import read_jsonl

REPO = Path(__file__).resolve().parents[2]
STEPS = 30
COMMON = ["--config", str(REPO / "examples/cpu/pretrain_tiny.yaml"), f"train.train_iters={STEPS}",
          "train.eval_iters=0", "train.log_interval=10", "logging.quiet=true", "checkpoint.keep_last=0"]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cmd(save: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_kd", "pretrain", *COMMON, f"checkpoint.save={save}",
            f"logging.metrics_path={save}/metrics.jsonl", *extra]


def _losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(save / "metrics.jsonl") if r["split"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    save = tmp_path_factory.mktemp("pretrain") / "ref"
    subprocess.run(_cmd(save, "checkpoint.save_interval=10"), env=_env(), check=True, timeout=600,
                   capture_output=True)
    return _losses(save), save


def test_thirty_steps_reduce_the_loss(uninterrupted):
    losses = [uninterrupted[0][s] for s in range(1, STEPS + 1)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert abs(losses[0] - 5.545) < 0.1  # ln(256): a fresh model predicts ~uniformly
    assert last < first - 1.0, (first, last)


def test_sigkill_and_resume_reproduces_the_loss_curve(uninterrupted, tmp_path):
    save = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(save, "checkpoint.save_interval=5"), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (save / "latest").is_file():
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = int((save / "latest").read_text().strip().split("_")[1])
    assert killed_at < STEPS, "the run finished before it could be killed"
    out = subprocess.run(_cmd(save, "checkpoint.save_interval=5"), env=_env(), check=True, timeout=600,
                         capture_output=True, text=True)
    assert f"resumed from {save}/iter_{killed_at:07d}" in out.stdout
    resumed = _losses(save)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(uninterrupted[0][step], abs=1e-6), step


def test_dp2_checkpoint_resumes_at_dp1(uninterrupted, tmp_path):
    save = tmp_path / "dp2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_kd"]
    cmd = _cmd(save, "checkpoint.save_interval=10", "train.exit_interval=10")
    subprocess.run(torchrun + cmd[3:], env=_env(), check=True, timeout=600, capture_output=True)
    assert (save / "latest").read_text().strip() == "iter_0000010"
    subprocess.run(_cmd(save, "checkpoint.save_interval=10"), env=_env(), check=True, timeout=600,
                   capture_output=True)
    resumed = _losses(save)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):  # DP=2 sums gradients in another order: equal to float rounding
        assert resumed[step] == pytest.approx(uninterrupted[0][step], abs=1e-5), step


def test_finetune_starts_from_weights_with_a_fresh_run(uninterrupted, tmp_path):
    losses, ref_dir = uninterrupted
    save = tmp_path / "ft"
    out = subprocess.run(_cmd(save, f"checkpoint.load={ref_dir}", "checkpoint.finetune=true",
                              "train.train_iters=3", "optim.warmup_iters=1"),
                         env=_env(), check=True, timeout=600, capture_output=True, text=True)
    assert f"loaded weights from {ref_dir}" in out.stdout
    ft = _losses(save)
    assert sorted(ft) == [1, 2, 3]  # a new run: iteration 0, fresh optimizer and schedule
    # step 1 sees samples 0..7 with the trained weights: far below a fresh model's ln(256)
    assert ft[1] < losses[STEPS] + 0.3 and ft[1] < losses[1] - 1.5


@pytest.mark.slow
def test_tp2_pp2_checkpoint_resumes_at_tp1_pp1(tmp_path):
    """4 processes (TP2 x PP2) save at step 10 and go on to 12; a single process resumes step 10
    and must reproduce steps 11-12 (dist_checkpointing reshards model and optimizer state)."""
    save = tmp_path / "tp2pp2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "megatron_kd"]
    cmd = _cmd(save, "checkpoint.save_interval=10", "train.train_iters=12", "parallel.tensor_parallel=2",
               "parallel.pipeline_parallel=2")
    subprocess.run(torchrun + cmd[3:], env=_env(), check=True, timeout=900, capture_output=True)
    reference = _losses(save)
    (save / "latest").write_text("iter_0000010\n")  # as if the run had died after step 10
    out = subprocess.run(_cmd(save, "checkpoint.save_interval=10", "train.train_iters=12"), env=_env(),
                         check=True, timeout=600, capture_output=True, text=True)
    assert "resumed from" in out.stdout and "iter_0000010" in out.stdout
    resumed = _losses(save)
    assert sorted(resumed) == list(range(1, 13))
    for step in (11, 12):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step
