"""Unit checks of the Trainer's reliability parts that need no training run: checkpoint rotation
by write order, torn/foreign metrics files, hyper-parameter validation, exit codes and signals."""
import json
import os
import signal
import time

import pytest

from megatron_kd.training.checkpoint import rotate_checkpoints
from megatron_kd.training.config import OptimConfig, TrainConfig, validate_optim, validate_train
from megatron_kd.training.metrics import check_metrics_owner, claim_metrics_path, truncate_metrics
from megatron_kd.utils.exits import EXIT_IO_ERROR, EXIT_REQUEUE, FilesystemError, one_line
from megatron_kd.utils.processes import StopSignals


def _fake_ckpt(root, iteration, age):
    d = root / f"iter_{iteration:07d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text("{}")
    t = time.time() - age
    os.utime(d / "meta.json", (t, t))
    return d


def test_keep_last_rotates_by_write_order_and_never_deletes_latest(tmp_path):
    # A run restarted from step 10 after reaching 30: iter_10 is the newest write, iter_30 the oldest.
    _fake_ckpt(tmp_path, 30, age=300)
    _fake_ckpt(tmp_path, 20, age=200)
    _fake_ckpt(tmp_path, 10, age=100)
    (tmp_path / "latest").write_text("iter_0000010\n")
    rotate_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000010", "iter_0000020"]
    rotate_checkpoints(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000010"]


def test_latest_survives_even_if_it_is_the_oldest_write(tmp_path):
    _fake_ckpt(tmp_path, 5, age=500)
    _fake_ckpt(tmp_path, 6, age=10)
    _fake_ckpt(tmp_path, 7, age=5)
    (tmp_path / "latest").write_text("iter_0000005\n")
    rotate_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000005", "iter_0000007"]


def test_torn_last_metrics_line_is_dropped_and_reported(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 4, "split": "tr')
    truncate_metrics(path, 2)
    out = capsys.readouterr().out
    assert "torn last line" in out and str(path) in out and len(out.strip().splitlines()) == 1
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_corrupt_middle_metrics_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
        truncate_metrics(path, 1)


def test_metrics_of_another_run_are_refused_not_truncated(tmp_path):
    other = tmp_path / "other" / "metrics.jsonl"
    other.parent.mkdir()
    other.write_text('{"step": 1, "split": "train"}\n')
    with pytest.raises(ValueError, match="holds another run's metrics"):
        check_metrics_owner(other, tmp_path / "mine")
    with pytest.raises(ValueError, match="holds another run's metrics"):
        check_metrics_owner(other, None)
    assert other.read_text() == '{"step": 1, "split": "train"}\n'
    # The default path inside the save directory, and a path this save directory claimed, are its own.
    check_metrics_owner(tmp_path / "other" / "metrics.jsonl", tmp_path / "other")
    claim_metrics_path(tmp_path / "elsewhere.jsonl", tmp_path / "mine")
    (tmp_path / "elsewhere.jsonl").write_text('{"step": 1}\n')
    check_metrics_owner(tmp_path / "elsewhere.jsonl", tmp_path / "mine")


@pytest.mark.parametrize("section,field,value,message", [
    ("train", "train_iters", None, "train.train_iters=null must be a number"),
    ("optim", "lr", None, "optim.lr=null must be a number"),
    ("optim", "min_lr", None, "optim.min_lr=null must be a number"),
    ("optim", "lr", -3e-3, "optim.lr=-0.003 must be > 0"),
    ("train", "nonfinite", "ignore", "train.nonfinite='ignore' must be one of"),
])
def test_hyper_parameters_are_blamed_by_name(section, field, value, message):
    train, optim = TrainConfig(), OptimConfig()
    setattr(train if section == "train" else optim, field, value)
    with pytest.raises(ValueError) as info:
        validate_train(train, 1)
        validate_optim(optim, train.train_iters, on_gpu=False)
    assert str(info.value).startswith(message)


def test_filesystem_errors_are_one_line_naming_path_and_space(tmp_path):
    import errno

    full = FilesystemError(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")), "save", 10**6)
    text = one_line(full)
    assert str(tmp_path / "x") in text and "1,000,000 bytes needed" in text and "bytes free" in text
    ro = one_line(OSError(errno.EROFS, "Read-only file system", "/ro/out"))
    assert ro.startswith("cannot write /ro/out") and "writable" in ro
    assert (EXIT_IO_ERROR, EXIT_REQUEUE) == (74, 75)


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_wrapped_filesystem_errors_are_recognised(tmp_path):
    """What torch.save, megatron-core's writers and numpy raise on a full or read-only disk, without
    (or behind) an errno, is mapped to one filesystem error; anything else is left alone."""
    import errno

    from megatron_kd.utils.exits import filesystem_cause, one_line

    class CheckpointException(BaseException):  # torch's is a BaseException carrying per-rank failures
        def __init__(self, failures):
            super().__init__("CheckpointException ranks")
            self.failures = failures

    wrapped = CheckpointException({0: RuntimeError("Worker failure: [Errno 28] No space left on device")})
    assert filesystem_cause(wrapped, tmp_path).errno == errno.ENOSPC
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "x"))
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert filesystem_cause(outer).errno == errno.EROFS
    torn = filesystem_cause(RuntimeError("unexpected pos 704 vs 598"), tmp_path)  # torch.save's zip writer
    assert torn is not None and torn.errno in (errno.EIO, errno.ENOSPC)  # ENOSPC only when tmp_path is full
    short = filesystem_cause(OSError("3026 requested and 250 written"), tmp_path)
    assert short is not None and str(tmp_path) in one_line(short)
    assert filesystem_cause(RuntimeError("shape mismatch"), tmp_path) is None
    assert filesystem_cause(ValueError("bad value")) is None
