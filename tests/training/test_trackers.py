"""TensorBoard and Weights & Biases (offline mode, no network) receive exactly the JSONL's metrics:
one ``megatron-kd pretrain`` run with both trackers on, each read back from its own files
(TensorBoard's EventAccumulator; the records of wandb's ``.wandb`` log) and compared with
``metrics.jsonl`` record by record. Skipped cleanly when a package is missing."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _installed(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    if not (_installed("tensorboard") or _installed("wandb")):
        pytest.skip("neither tensorboard nor wandb is installed (pip install 'megatron-kd[tb,wandb]')")
    tmp = tmp_path_factory.mktemp("trackers")
    save = tmp / "run"
    args = [sys.executable, "-m", "megatron_kd", "pretrain", "--no-progress", "--config", str(ROOT / "examples/cpu/pretrain_tiny.yaml"),
            "train.train_iters=4", "optim.warmup_iters=1", "train.eval_interval=2", "train.log_interval=0",
            f"checkpoint.save={save}", "checkpoint.save_interval=0"]
    if _installed("tensorboard"):
        args.append(f"logging.tensorboard_dir={tmp / 'tb'}")
    if _installed("wandb"):
        args += ["logging.wandb_project=megatron-kd-test", "logging.wandb_mode=offline", "logging.wandb_name=tiny"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp / "wandb_cfg"), "WANDB_CACHE_DIR": str(tmp / "wandb_cache"),
           "WANDB_DATA_DIR": str(tmp / "wandb_data"), "WANDB_DISABLE_GIT": "true", "WANDB_API_KEY": ""}
    env.pop("WANDB_API_KEY")
    proc = subprocess.run(args, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "valid"}
    return tmp, save, records


def _expected(records):
    from megatron_kd.training.trackers import scalars

    out = {}
    for r in records:
        r = {k: v for k, v in r.items() if k != "time"}  # JsonlWriter's wall clock: each tracker has its own
        for tag, value in scalars(r).items():
            out.setdefault(tag, {})[r["step"]] = value
    return out


def test_scalars_are_the_jsonl_keys():
    from megatron_kd.training.trackers import scalars

    rec = {"step": 3, "split": "valid", "loss": 2.5, "ppl": 12.0, "note": "x", "nan": float("nan"), "flag": True}
    assert scalars(rec) == {"valid/loss": 2.5, "valid/ppl": 12.0}


def test_tensorboard_gets_the_jsonl_metrics(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, records = run
    acc = EventAccumulator(str(tmp / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    expected = _expected(records)
    assert set(acc.Tags()["scalars"]) == set(expected)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/loss", "valid/ppl"} <= set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag


def _wandb_records(path):
    """Records of a ``.wandb`` file: a LevelDB-style log (7-byte file header, 32 KiB blocks, records
    of crc32 + uint16 length + uint8 type, FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf + chunk)
            out.append(rec)
            buf = b""
        else:
            buf += chunk
    return out


def test_wandb_offline_gets_the_jsonl_metrics(run):
    pytest.importorskip("wandb")
    tmp, save, records = run
    runs = list((save / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    rows = {}
    for rec in _wandb_records(runs[0]):
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    expected = _expected(records)
    logged = {k for row in rows.values() for k in row if not k.startswith("_")}
    assert logged == set(expected)
    for tag, by_step in expected.items():
        for step, value in by_step.items():
            assert rows[step][tag] == pytest.approx(value, rel=1e-6), (tag, step)
    assert json.loads((save / "wandb_run.json").read_text())["id"] in runs[0].name


def test_missing_package_is_one_line_before_any_work(monkeypatch):
    from megatron_kd.training import trackers
    from megatron_kd.training.config import LoggingConfig

    monkeypatch.setattr(trackers, "_installed", lambda name: False)
    with pytest.raises(ValueError, match=r"megatron-kd\[tb\]"):
        trackers.check_trackers(LoggingConfig(tensorboard_dir="tb"))
    with pytest.raises(ValueError, match=r"megatron-kd\[wandb\]"):
        trackers.check_trackers(LoggingConfig(wandb_project="p"))
    with pytest.raises(ValueError, match="wandb_project is not"):
        trackers.check_trackers(LoggingConfig(wandb_mode="offline"))
