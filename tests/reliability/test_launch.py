"""`python -m megatron_kd.utils.launch` (torchrun with the workers' exit code passed through):
a worker's documented exit code (75 requeue, 2 bad input, ...) becomes the launcher's, and a
SIGTERM to the launcher (Slurm scancel) ends in 75 after the workers stopped. Plain torchrun
reports 1 in every one of these cases."""
import os
import signal
import subprocess
import sys
import time

import pytest

from reliability_helpers import EXIT_REQUEUE, REPO, assert_no_orphans, descendants, env, records, run

WORKER = """
import os, signal, sys, time
code = int(os.environ["WORKER_EXIT"])
if code < 0:  # wait for SIGTERM, then stop like a megatron-kd run that saved a checkpoint
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
    open(os.environ["READY"] + os.environ["RANK"], "w").close()
    time.sleep(120)
    sys.exit(1)
sys.exit(code if os.environ["RANK"] == "0" or code == 0 else 0)
"""

LAUNCH = [sys.executable, "-m", "megatron_kd.utils.launch", "--standalone", "--nproc-per-node", "2"]


def _launch(tmp_path, code):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    e = {**env(), "WORKER_EXIT": str(code), "READY": str(tmp_path / "ready")}
    return subprocess.Popen(LAUNCH + [str(script)], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("code,want", [(0, 0), (75, 75), (2, 2), (3, 3), (74, 74), (7, 1)])
def test_worker_exit_code_reaches_the_launcher(tmp_path, code, want):
    proc = _launch(tmp_path, code)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == want, err[-2000:]


def test_sigterm_to_the_launcher_exits_75(tmp_path):
    proc = _launch(tmp_path, -1)
    deadline = time.time() + 300
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    children = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    assert_no_orphans(children)


@pytest.mark.slow
def test_torchrun_pretrain_sigterm_to_the_group_requeues_and_resumes(tmp_path):
    """nproc=2 (data parallel) pretrain under the launcher, SIGTERM to the whole process group after
    the first checkpoint: exit 75, then the rerun finishes with the uninterrupted run's losses."""
    base = ["pretrain", "--config", str(REPO / "examples/cpu/pretrain_tiny.yaml"), "train.train_iters=8",
            "train.seq_length=32", "train.eval_iters=0", "train.log_interval=1", "optim.warmup_iters=1",
            "checkpoint.save_interval=2", "logging.quiet=true"]
    ref = run(base + [f"checkpoint.save={tmp_path}/ref"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    save = tmp_path / "run"
    launch = LAUNCH[2:] + ["-m", "megatron_kd"] + base + [f"checkpoint.save={save}"]
    proc = subprocess.Popen([sys.executable, "-m"] + launch, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not (save / "latest").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    children = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert_no_orphans(children)
    again = subprocess.run([sys.executable, "-m"] + launch, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    got = {r["step"]: r["loss"] for r in records(save / "metrics.jsonl") if r["split"] == "train"}
    want = {r["step"]: r["loss"] for r in records(tmp_path / "ref/metrics.jsonl") if r["split"] == "train"}
    assert got.keys() == want.keys()
    assert got == pytest.approx(want, rel=1e-4)  # DP=2 all-reduce order vs one process: not bit-identical

