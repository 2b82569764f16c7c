"""Thread leases (megatron_kd.utils.threads): a scheduler lends idle cores to a running training job.

The quickstart lends them only to stages in ``LENDABLE_STAGES``; that is sound only because
pre-training with megatron's loss computes the same bits at 1 and 2 intra-op threads, which the last
test checks at the `full` teacher's shape (4 x 256, V 4,096, 16 x 128 tokens per step).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_kd.quickstart.pipeline import LENDABLE_STAGES
from megatron_kd.quickstart.schedule import StageSpec, lease_plan
from megatron_kd.quickstart.sizes import SIZES
from megatron_kd.utils.threads import LEASE_ENV, ThreadLease, write_lease


def test_lease_follows_the_file_and_restores(tmp_path, monkeypatch):
    base = torch.get_num_threads()
    try:
        path = tmp_path / "lease"
        lease = ThreadLease(path)
        assert lease.poll() == base  # no file yet: unchanged
        write_lease(path, base + 1)
        assert lease.poll() == base + 1 and torch.get_num_threads() == base + 1
        path.write_text("not a number\n")
        assert lease.poll() == base + 1  # malformed: kept
        write_lease(path, base)
        assert lease.poll() == base and torch.get_num_threads() == base
        write_lease(path, base + 2)
        lease.poll()
        lease.restore()
        assert torch.get_num_threads() == base
        monkeypatch.delenv(LEASE_ENV, raising=False)
        assert not ThreadLease().active and ThreadLease().poll() == base
        monkeypatch.setenv(LEASE_ENV, str(path))
        assert ThreadLease().path == path
        with pytest.raises(ValueError, match="threads must be >= 1"):
            write_lease(path, 0)
    finally:
        torch.set_num_threads(base)


def test_lease_plan_lends_idle_threads_to_lendable_stages_only():
    teacher, student = StageSpec("teacher", lendable=True), StageSpec("no_kd")
    assert lease_plan({0: teacher, 1: None}, 1) == {0: 2, 1: 1}
    assert lease_plan({0: teacher, 1: student}, 1) == {0: 1, 1: 1}  # nobody idle
    assert lease_plan({0: student, 1: None}, 1) == {0: 1, 1: 1}  # not lendable: keeps its own count
    assert lease_plan({0: teacher, 1: None, 2: None}, 2) == {0: 4, 1: 2, 2: 2}  # at most doubled
    assert lease_plan({0: teacher, 1: None, 2: None, 3: None}, 1) == {0: 2, 1: 1, 2: 1, 3: 1}  # never 3, 4
    ref = StageSpec("reference", lendable=True)
    assert lease_plan({0: teacher, 1: ref, 2: None}, 1) == {0: 2, 1: 1, 2: 1}  # remainder: lower index
    assert LENDABLE_STAGES == {"teacher", "reference"}


def _pretrain(tmp_path: Path, name: str, lease: int | None) -> tuple[Path, str]:
    m = SIZES["full"].teacher
    save = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(LEASE_ENV, None)
    if lease is not None:
        write_lease(tmp_path / f"{name}.lease", lease)
        env[LEASE_ENV] = str(tmp_path / f"{name}.lease")
    args = [f"model.{k}={v}" for k, v in m.items()] + [
        "model.vocab_size=4096", "data.synthetic=true", "train.micro_batch_size=16", "train.global_batch_size=16",
        "train.seq_length=128", "train.train_iters=4", "train.eval_interval=2", "train.eval_iters=1",
        "train.fused_lm_loss=false", "optim.lr=0.002", f"checkpoint.save={save}", "logging.quiet=true"]
    run = subprocess.run([sys.executable, "-m", "megatron_kd", "pretrain", *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return save, run.stdout + run.stderr


def test_pretraining_is_bit_identical_with_lent_threads(tmp_path):
    one, _ = _pretrain(tmp_path, "one", None)
    two, log = _pretrain(tmp_path, "two", 2)
    assert "2 intra-op threads (thread lease)" in log
    # the tensors (the .metadata file names the checkpoint's own path)
    files = sorted(p.relative_to(one) for p in (one / "iter_0000004").glob("*.distcp"))
    assert files
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f"{f} differs between 1 and 2 threads"
    m1, m2 = _loss_records(one / "metrics.jsonl"), _loss_records(two / "metrics.jsonl")
    assert len(m1) == len(m2) > 4 and m1 == m2


def _loss_records(path: Path) -> list[dict]:
    """The metrics lines with a loss, without their timings."""
    timing = ("time", "step_time_s", "tokens_per_s")
    return [{k: v for k, v in json.loads(ln).items() if k not in timing}
            for ln in path.read_text().splitlines() if '"loss"' in ln]
