"""Fault injection beyond the Trainer: `megatron-kd logits` killed mid-store (SIGKILL / SIGTERM to
the group) and rerun gives a store identical to an uninterrupted one, with no stale shard temp
file and no orphan. Slow: several teacher runs."""
import json
import random
import signal

import numpy as np
import pytest

from reliability_helpers import REPO, assert_no_orphans, kill, run, stale_files, start, wait_until

TINY = str(REPO / "examples/cpu/pretrain_tiny.yaml")


def _dataset(prefix, vocab=256, docs=60, seed=0):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_kd.utils.io import sha256_file

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(docs):
        n = int(rng.integers(20, 90))
        b.add_document(rng.integers(1, vocab, n).astype(np.uint16), [n])
    b.finalize(f"{prefix}.idx")
    with open(f"{prefix}.manifest.json", "w") as fh:
        json.dump({"format": "megatron-kd/indexed-dataset", "num_documents": docs, "dtype": "uint16",
                   "num_tokens": int(np.fromfile(f"{prefix}.bin", dtype=np.uint16).size),
                   "tokenizer": {"identity": "synthetic", "path": "synthetic"},
                   "checksums": {"bin": sha256_file(f"{prefix}.bin"), "idx": sha256_file(f"{prefix}.idx")}}, fh)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmdfaults")
    out = run(["pretrain", "--config", TINY, "train.train_iters=2", "train.eval_iters=0", "train.seq_length=32",
               "optim.warmup_iters=0", f"checkpoint.save={base}/teacher", "logging.quiet=true"])
    assert out.returncode == 0, out.stderr[-2000:]
    _dataset(base / "data")
    return base


def _logits(inputs, out):
    return ["logits", "--teacher", str(inputs / "teacher"), "--data", str(inputs / "data"), "--out", str(out),
            "--seq-length", "64", "--top-k", "8", "--shard-tokens", "300", "--micro-batch-size", "2"]


def _store_state(path):
    man = json.loads((path / "manifest.json").read_text())
    return man["shards"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGKILL, False), (signal.SIGTERM, True), (signal.SIGKILL, True)])
def test_logits_killed_mid_store_resumes_identically(inputs, tmp_path, sig, group):
    ref = tmp_path / "ref"
    out = run(_logits(inputs, ref))
    assert out.returncode == 0, out.stderr[-2000:]
    store = tmp_path / "killed"
    proc = start(_logits(inputs, store))
    want = random.Random(sig * 10 + group).randint(1, 3)  # fixed seed: kill after 1..3 finished shards
    try:
        wait_until(lambda: len(list((store / "shards").glob("shard_*.kdl"))) >= want, proc)
        children = kill(proc, sig, group)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_no_orphans(children)
    out = run(_logits(inputs, store))
    assert out.returncode == 0, out.stderr[-2000:]
    assert stale_files(store) == []
    assert _store_state(store) == _store_state(ref)


def _distill(inputs, save):
    return ["distill", "--config", str(REPO / "examples/cpu/distill_tiny.yaml"), f"teacher.load={inputs}/teacher",
            "train.train_iters=8", "train.seq_length=32", "train.eval_interval=4", "train.eval_iters=1",
            "checkpoint.save_interval=2", "checkpoint.keep_last=2", "optim.warmup_iters=1", f"checkpoint.save={save}",
            "logging.quiet=true", "logging.metrics_path=null"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, True), (signal.SIGKILL, False), (signal.SIGINT, False)])
def test_distill_online_interrupted_resumes_identically(inputs, tmp_path, sig, group):
    from reliability_helpers import EXIT_REQUEUE, assert_unique_steps, records

    ref = tmp_path / "ref"
    out = run(_distill(inputs, ref))
    assert out.returncode == 0, out.stderr[-2000:]
    save = tmp_path / "killed"
    proc = start(_distill(inputs, save))
    try:
        assert wait_until(lambda: (save / "latest").is_file(), proc)
        children = kill(proc, sig, group)
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else EXIT_REQUEUE)
    assert_no_orphans(children)
    out = run(_distill(inputs, save))
    assert out.returncode == 0, out.stderr[-2000:]
    assert_unique_steps(save / "metrics.jsonl")
    strip = [{k: v for k, v in r.items() if "time" not in k and k != "tokens_per_s"} for r in
             records(save / "metrics.jsonl")]
    want = [{k: v for k, v in r.items() if "time" not in k and k != "tokens_per_s"} for r in
            records(ref / "metrics.jsonl")]
    assert strip == want
    assert stale_files(save) == []


# --------------------------------------------------------------------------------------------
# miniplm score, preprocess, convert: killed at a seeded random point (SIGKILL / SIGTERM, to the
# process group or the main pid), rerun with the same command: the result is byte-identical to
# an uninterrupted run, nothing stale is left, no process outlives the killed one.

FAULTS = [(signal.SIGKILL, True), (signal.SIGKILL, False), (signal.SIGTERM, True), (signal.SIGTERM, False)]


def _kill_then_rerun(args, out_ready, sig, group, seed, cwd=None, overwrite_flag=None):
    from reliability_helpers import kill_at_random

    proc = start(args, cwd=cwd)
    try:
        children = kill_at_random(proc, out_ready, sig, group, seed)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if children is not None:
        assert "Traceback" not in err, err[-3000:]
        assert_no_orphans(children)
    again = run(args, cwd=cwd)
    if overwrite_flag and again.returncode == 2 and "already exists" in again.stderr:
        # The signal came after (part of) the output was in place: the one-line message says to
        # pass the overwrite flag, and that rerun must give the same bytes.
        assert "Traceback" not in again.stderr and overwrite_flag in again.stderr
        again = run(args + [overwrite_flag], cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    return children is not None


def _score_args(inputs, out):
    return ["miniplm", "score", "--teacher", str(inputs / "teacher"), "--reference", str(inputs / "teacher"),
            "--data", str(inputs / "data"), "--output", str(out), "--chunk-length", "32", "--shard-size", "16"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", FAULTS)
def test_miniplm_score_killed_resumes_identically(inputs, tmp_path, sig, group):
    from reliability_helpers import tree_bytes

    ref = tmp_path / "ref"
    out = run(_score_args(inputs, ref))
    assert out.returncode == 0, out.stderr[-2000:]
    got = tmp_path / "killed"
    _kill_then_rerun(_score_args(inputs, got), lambda: any(got.glob("shard_*")), sig, group, seed=sig * 2 + group)
    assert stale_files(got) == []
    skip = ("metrics.jsonl",)  # timings
    assert tree_bytes(got, skip) == tree_bytes(ref, skip)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_kd.data.demo_corpus import build_demo_corpus
    from megatron_kd.data.tokenizers import train_sentencepiece

    base = tmp_path_factory.mktemp("corpus")
    build_demo_corpus(str(base / "demo.jsonl"), max_docs=400)
    texts = [json.loads(line)["text"] for line in open(base / "demo.jsonl", encoding="utf-8")]
    train_sentencepiece(texts[:60], 500, str(base / "spm"))
    return base


def _preprocess_args(corpus, prefix):
    return ["preprocess", "--input", str(corpus / "demo.jsonl"), "--tokenizer", str(corpus / "spm.model"),
            "--output", str(prefix), "--workers", "2", "--no-progress"]


def _preprocess_fault(corpus, tmp_path, sig, group) -> tuple[list, dict, dict]:
    """Preprocess once uninterrupted (``ref``) and once killed by ``sig`` then rerun (``killed``);
    returns (stale temp files left in ``killed``, ref bytes, killed bytes), the manifests (which
    record their own output path and time) left out."""
    from reliability_helpers import tree_bytes

    (tmp_path / "ref").mkdir()
    (tmp_path / "killed").mkdir()
    out = run(_preprocess_args(corpus, tmp_path / "ref/ds"))
    assert out.returncode == 0, out.stderr[-2000:]
    killed = tmp_path / "killed"
    _kill_then_rerun(_preprocess_args(corpus, killed / "ds"), lambda: any(killed.glob(".*tmp-*")), sig, group,
                     seed=sig * 3 + group, overwrite_flag="--overwrite")

    def data(tree: dict) -> dict:
        return {k: v for k, v in tree.items() if not k.endswith(".manifest.json")}

    return stale_files(killed), data(tree_bytes(tmp_path / "ref")), data(tree_bytes(killed))


def test_preprocess_sigkill_to_the_group_resumes_identically(corpus, tmp_path):
    """The CI subset: the preprocess pool killed with its parent; the rerun writes the same bytes."""
    stale, ref, got = _preprocess_fault(corpus, tmp_path, signal.SIGKILL, True)
    assert stale == []
    assert ref and got == ref


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", FAULTS[1:])
def test_preprocess_killed_resumes_identically(corpus, tmp_path, sig, group):
    stale, ref, got = _preprocess_fault(corpus, tmp_path, sig, group)
    assert stale == []
    assert ref and got == ref


def _convert_args(inputs, out):
    return ["convert", "mcore-to-hf", "--checkpoint", str(inputs / "teacher"), "--output", str(out), "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", FAULTS)
def test_convert_killed_reruns_identically(inputs, tmp_path, sig, group):
    from reliability_helpers import tree_bytes

    ref = tmp_path / "ref"
    out = run(_convert_args(inputs, ref))
    assert out.returncode == 0, out.stderr[-2000:]
    got = tmp_path / "killed"
    tmp = tmp_path / "killed.tmp"
    _kill_then_rerun(_convert_args(inputs, got), lambda: tmp.exists() or got.exists(), sig, group,
                     seed=sig * 5 + group, overwrite_flag="--overwrite")
    assert stale_files(tmp_path / "killed") == [] and not tmp.exists() and not (tmp_path / "killed.old").exists()
    assert tree_bytes(got) == tree_bytes(ref)
