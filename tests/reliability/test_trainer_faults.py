"""The shared Trainer under faults (through `megatron-kd pretrain`, the same loop distill and
post-training use): SIGTERM/SIGINT/SIGKILL at a checkpoint boundary, to the process group or the
main pid, then a rerun: identical metrics to an uninterrupted run, no duplicate metric line, no
orphaned checkpoint writer, no stale temp file; a finished run's rerun changes nothing; NaN/inf
steps stop or are skipped per `train.nonfinite`."""
import signal

import pytest

from reliability_helpers import (EXIT_REQUEUE, REPO, assert_no_orphans, assert_unique_steps, kill, losses,
                                      records, run, stale_files, start, wait_until)

STEPS = 12
BASE = ["pretrain", "--config", str(REPO / "examples/cpu/pretrain_tiny.yaml"), f"train.train_iters={STEPS}",
        "train.seq_length=32", "train.eval_interval=4", "train.eval_iters=1", "train.log_interval=4",
        "optim.warmup_iters=2", "checkpoint.save_interval=4", "checkpoint.keep_last=2", "logging.quiet=true"]


def _args(save, *extra):
    return BASE + [f"checkpoint.save={save}", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save = tmp_path_factory.mktemp("faults") / "ref"
    out = run(_args(save))
    assert out.returncode == 0, out.stderr[-2000:]
    return save


def _kill_and_resume(reference, tmp_path, sig, group):
    save = tmp_path / "run"
    proc = start(_args(save))
    try:
        assert wait_until(lambda: (save / "latest").is_file(), proc), "finished before the first checkpoint"
        children = kill(proc, sig, group)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # graceful: a complete checkpoint at the current step, the requeue code, one line
        assert proc.returncode == EXIT_REQUEUE, err[-3000:]
        assert "Traceback" not in err
        assert f"interrupted by {signal.Signals(sig).name}" in err
        saved = int((save / "latest").read_text().split("_")[1])
        assert saved == max(r["step"] for r in records(save / "metrics.jsonl"))
    assert_no_orphans(children)
    out = run(_args(save))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    assert_unique_steps(save / "metrics.jsonl")
    ref, got = records(reference / "metrics.jsonl"), records(save / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in ref]
    for split in ("train", "valid"):
        assert losses(save / "metrics.jsonl", split) == losses(reference / "metrics.jsonl", split)
    assert stale_files(save) == []
    assert (save / (save / "latest").read_text().strip() / "meta.json").is_file()
    return save


def test_sigterm_to_the_process_group_checkpoints_and_resumes_identically(reference, tmp_path):
    _kill_and_resume(reference, tmp_path, signal.SIGTERM, group=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGKILL, False),
                                       (signal.SIGKILL, True), (signal.SIGINT, True)])
def test_signals_checkpoint_and_resume_identically(reference, tmp_path, sig, group):
    _kill_and_resume(reference, tmp_path, sig, group)


def test_rerunning_a_finished_run_changes_nothing(reference):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    out = run(_args(reference))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already finished" in out.stdout
    after = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert after == before


def test_keep_last_keeps_the_newest_and_latest(reference):
    kept = sorted(p.name for p in reference.glob("iter_*"))
    assert kept == ["iter_0000008", "iter_0000012"]
    assert (reference / "latest").read_text().strip() == "iter_0000012"


def test_nonfinite_stop_exits_3_in_one_line_and_saves_nothing_nonfinite(tmp_path):
    save = tmp_path / "nan"
    out = run(_args(save, "optim.lr=1000", "optim.min_lr=0", "optim.clip_grad=0", "checkpoint.save_interval=1"))
    assert out.returncode == 3, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "non-finite" in lines[0] and "at step" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    bad_step = int(lines[0].split("at step ")[1].split()[0])
    saved = sorted(int(p.name.split("_")[1]) for p in save.glob("iter_*"))
    assert all(s < bad_step for s in saved)  # the non-finite state was never saved


def test_nonfinite_skip_drops_updates_and_stops_after_n_in_a_row(tmp_path):
    save = tmp_path / "skip"
    out = run(_args(save, "optim.lr=1000", "optim.min_lr=0", "optim.clip_grad=0", "train.nonfinite=skip",
                    "train.nonfinite_max_consecutive=2"))
    assert out.returncode == 3, out.stderr[-2000:]
    assert "2 consecutive non-finite steps" in out.stderr
    recs = [r for r in records(save / "metrics.jsonl") if r["split"] == "train"]
    assert sum(r.get("nonfinite_skipped", 0) for r in recs) >= 2
