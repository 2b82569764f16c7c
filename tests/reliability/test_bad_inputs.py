"""Bad-input table: every case gives a clean one-line error (no traceback), the documented exit
code, and writes nothing. Config cases run `megatron_kd.cli.main` in-process (they fail before
any model is built); file cases call the validators the commands run before their work."""

import numpy as np
import pytest

from megatron_kd.cli import main
from reliability_helpers import REPO, run

TINY = str(REPO / "examples/cpu/pretrain_tiny.yaml")


def _cli(capsys, tmp_path, *args):
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(list(args))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning" not in ln.lower()]
    assert "Traceback" not in err
    assert len(lines) == 1 and "error:" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return rc, lines[0]


CONFIG_CASES = [
    ("train.train_iters=null", "train.train_iters=null must be a number"),
    ("optim.lr=null", "optim.lr=null must be a number"),
    ("optim.min_lr=null", "optim.min_lr=null must be a number"),
    ("optim.lr=-3e-3", "optim.lr=-0.003 must be > 0"),
    ("train.nonfinite=ignore", "train.nonfinite='ignore' must be one of"),
    ("train.nonfinite_max_consecutive=0", "train.nonfinite_max_consecutive=0 must be >= 1"),
]


@pytest.mark.parametrize("override,message", CONFIG_CASES)
def test_bad_hyper_parameters_are_named(capsys, tmp_path, override, message):
    rc, line = _cli(capsys, tmp_path, "pretrain", "--config", TINY, f"checkpoint.save={tmp_path}/run", override)
    assert rc == 2 and message in line


def test_metrics_path_of_another_run_is_refused_untouched(capsys, tmp_path):
    other = tmp_path / "other_metrics.jsonl"
    other.write_text('{"step": 1, "split": "train", "loss": 5.0}\n' * 3)
    rc, line = _cli(capsys, tmp_path, "pretrain", "--config", TINY, f"checkpoint.save={tmp_path}/run",
                    f"logging.metrics_path={other}")
    assert rc == 2 and "holds another run's metrics" in line
    assert other.read_text().count("\n") == 3


def _write_dataset(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("damage,message", [
    ("flip_bin", "outside the vocabulary"),
    ("truncate_idx", "truncated or corrupt"),
    ("empty_idx", "bad header"),
    ("truncate_bin", "the .bin is truncated"),
])
def test_damaged_datasets_are_refused_before_work(tmp_path, damage, message):
    from megatron_kd.data.manifest import check_token_ids

    prefix = tmp_path / "ds"
    _write_dataset(prefix, [[1, 2, 3, 4]] * 50)
    bin_, idx = tmp_path / "ds.bin", tmp_path / "ds.idx"
    if damage == "flip_bin":  # same size, one token id flipped far beyond the vocabulary
        data = bytearray(bin_.read_bytes())
        data[len(data) // 2 + 1] ^= 0xFF
        bin_.write_bytes(bytes(data))
    elif damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:-5])
    elif damage == "empty_idx":
        idx.write_bytes(b"")
    else:
        bin_.write_bytes(bin_.read_bytes()[:-2])
    with pytest.raises(ValueError) as info:
        check_token_ids(prefix, vocab_size=100, full=damage == "flip_bin")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_torn_checkpoint_index_or_shard_is_incomplete(tmp_path):
    from megatron_kd.training.checkpoint import check_checkpoint_complete

    d = tmp_path / "iter_0000001"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ValueError, match="index .metadata is missing"):
        check_checkpoint_complete(d)
    (d / ".metadata").write_bytes(b"\x80\x04trunc")
    with pytest.raises(ValueError, match="cannot be read"):
        check_checkpoint_complete(d)


def test_truncated_checkpoint_is_refused_by_dry_run(tmp_path):
    save = tmp_path / "run"
    out = run(["pretrain", "--config", TINY, "train.train_iters=2", "train.eval_iters=0", "train.seq_length=32",
               "optim.warmup_iters=0", f"checkpoint.save={save}", "logging.quiet=true"])
    assert out.returncode == 0, out.stderr[-2000:]
    shard = sorted((save / "iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = run(["pretrain", "--config", TINY, "--dry-run", "train.train_iters=4", "optim.warmup_iters=0",
               f"checkpoint.save={save}"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is incomplete" in out.stderr and shard.name in out.stderr


def test_unwritable_output_directory_is_one_line_exit_74(tmp_path):
    out = run(["pretrain", "--config", TINY, "train.train_iters=2", "train.eval_iters=0", "train.seq_length=32",
               "optim.warmup_iters=0", "checkpoint.save=/sys/megatron_kd_reliability/run", "logging.quiet=true"])
    lines = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 74 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and "/sys/megatron_kd_reliability" in lines[0]
