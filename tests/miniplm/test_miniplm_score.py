"""``miniplm score``: float64 reference scores, TP=2 / DP=2 / PP=2 == TP=1, resume after SIGKILL.

Process spawns are expensive on a shared 2-core box, so a module fixture runs everything once:
(1) one TP=1 worker writes random teacher/reference checkpoints, scores the corpus in chunk and
document mode and recomputes a sample of instances with float64 maths; (2) a CLI process is
SIGKILLed in the middle of writing a shard; (3) one 2-process job scores at TP=2, at PP=2 and
resumes the killed store at DP=2. The tests then compare the stores.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dist_helpers import run_workers
from miniplm_testlib import float64_mean_nll, make_dataset, random_docs, save_models_worker

CHUNK, SHARD = 16, 8
COMMON = dict(chunk_length=CHUNK, shard_size=SHARD, micro_batch_size=2)


def _tp1_worker(rank, world_size, root, data):
    from megatron_kd.miniplm.dataset_io import open_dataset
    from megatron_kd.miniplm.score import ScoreConfig, score_corpus
    from megatron_kd.miniplm.store import ScoreStore
    from megatron_kd.training.checkpoint import load_model_for_inference

    teacher, reference = save_models_worker(rank, world_size, root)
    score_corpus(ScoreConfig(teacher=teacher, reference=reference, data=data, out=f"{root}/tp1", **COMMON))
    score_corpus(ScoreConfig(teacher=teacher, reference=reference, data=data, out=f"{root}/doc", mode="document",
                             **COMMON))
    rows, _ = ScoreStore(f"{root}/tp1").read()
    docrows, _ = ScoreStore(f"{root}/doc").read()
    ds = open_dataset(data)
    models = [load_model_for_inference(p)[0] for p in (teacher, reference)]
    checks = []
    for i in list(range(0, len(rows), 7)) + [len(rows) - 1]:  # a sample incl. short document tails
        row = rows[i]
        toks = ds.get(int(row["doc"]), offset=int(row["offset"]), length=int(row["length"]))
        checks.append((row["nll_teacher"], float64_mean_nll(models[0], 300, toks),
                       row["nll_ref"], float64_mean_nll(models[1], 300, toks)))
    doc_checks = []
    for row in docrows[:6]:  # document mode: token-weighted mean over 16-token windows
        toks = ds[int(row["doc"])]
        wins = [toks[o:o + CHUNK] for o in range(0, len(toks), CHUNK) if len(toks[o:o + CHUNK]) >= 2]
        n = [len(w) - 1 for w in wins]
        exp = [sum(float64_mean_nll(m, 300, w) * k for w, k in zip(wins, n)) / sum(n) for m in models]
        doc_checks.append((row["nll_teacher"], exp[0], row["nll_ref"], exp[1], row["n_pred"], sum(n)))
    return teacher, reference, np.array(checks), doc_checks


_KILLER = textwrap.dedent("""
    import os, signal, sys, tempfile
    from megatron_kd.miniplm import store as st
    original, calls = st.ScoreStore.write_shard, [0]
    def write_shard(self, index, rows):
        calls[0] += 1
        if calls[0] == 3:  # die half-way through writing the third shard
            fd, _ = tempfile.mkstemp(prefix=f".{st.shard_name(index)}.", suffix=".tmp", dir=self.root)
            os.write(fd, b"\\x93NUMPY half a shard")
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, index, rows)
    st.ScoreStore.write_shard = write_shard
    from megatron_kd.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _multi_worker(rank, world_size, root, data, teacher, reference):
    from megatron_kd.miniplm.score import ScoreConfig, score_corpus
    from megatron_kd.runtime import destroy_distributed

    kw = dict(teacher=teacher, reference=reference, data=data, **COMMON)
    score_corpus(ScoreConfig(out=f"{root}/tp2", tensor_parallel=2, **kw))
    score_corpus(ScoreConfig(out=f"{root}/pp2", pipeline_parallel=2, **kw))
    score_corpus(ScoreConfig(out=f"{root}/killed", **kw))  # DP=2 resumes the store of the killed run
    destroy_distributed()
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniplm_score")
    docs = random_docs(30, 1, 70, seed=3)
    data = make_dataset(root / "corpus", docs, domains=["a" if i % 3 else "b" for i in range(30)])
    (teacher, reference, checks, doc_checks), = run_workers(_tp1_worker, 1, str(root), data)
    script = root / "killer.py"
    script.write_text(_KILLER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "miniplm", "score", "--teacher", teacher, "--reference",
                           reference, "--data", data, "--out", str(root / "killed"), "--chunk-length", str(CHUNK),
                           "--shard-size", str(SHARD), "--micro-batch-size", "2"], env=env, capture_output=True,
                          text=True, timeout=600)
    killed_state = {"returncode": proc.returncode, "shards": sorted(p.name for p in (root / "killed").glob("shard_*")),
                    "temps": sorted(p.name for p in (root / "killed").glob(".shard_*"))}
    assert run_workers(_multi_worker, 2, str(root), data, teacher, reference) == [True, True]
    return dict(root=root, data=data, checks=checks, doc_checks=doc_checks, killed=killed_state,
                teacher=teacher, reference=reference)


def _read(path):
    from megatron_kd.miniplm.store import ScoreStore

    return ScoreStore(path).read()


def test_scores_equal_float64_computation(runs):
    c = runs["checks"]
    np.testing.assert_allclose(c[:, 0], c[:, 1], atol=2e-5, rtol=0)  # teacher
    np.testing.assert_allclose(c[:, 2], c[:, 3], atol=2e-5, rtol=0)  # reference
    assert np.abs(c[:, 0] - c[:, 2]).max() > 1e-3  # two different models were scored
    for t, t_exp, r, r_exp, n_pred, n_exp in runs["doc_checks"]:
        assert n_pred == n_exp
        assert abs(t - t_exp) < 2e-5 and abs(r - r_exp) < 2e-5


def test_store_layout_and_manifest(runs):
    rows, man = _read(runs["root"] / "tp1")
    lengths = np.concatenate([[len(d) for d in random_docs(30, 1, 70, seed=3)]])
    assert man["complete"] and man["num_instances"] == len(rows) == sum(-(-n // CHUNK) for n in lengths) - sum(
        1 for n in lengths if n % CHUNK == 1)
    assert rows["instance"].tolist() == list(range(len(rows)))
    assert (rows["n_pred"] == rows["length"] - 1).all()
    assert man["teacher"]["iteration"] == 3 and len(man["teacher"]["config_sha256"]) == 64
    assert man["dataset"]["num_documents"] == 30 and man["instances"]["chunk_length"] == CHUNK
    assert man["num_shards"] == len(man["shards"]) == -(-len(rows) // SHARD)
    metrics = (runs["root"] / "tp1" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == man["num_shards"]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_scores_equal_tp1(runs, layout):
    ref, _ = _read(runs["root"] / "tp1")
    got, man = _read(runs["root"] / layout)
    for f in ("instance", "doc", "offset", "length", "n_pred"):
        assert (got[f] == ref[f]).all()
    np.testing.assert_allclose(got["nll_teacher"], ref["nll_teacher"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["nll_ref"], ref["nll_ref"], atol=1e-5, rtol=0)


def test_resume_after_kill_is_identical_without_duplicates(runs):
    k = runs["killed"]
    assert k["returncode"] == -9  # SIGKILL
    assert k["shards"] == ["shard_00000.npy", "shard_00001.npy"] and len(k["temps"]) == 1
    got, man = _read(runs["root"] / "killed")  # resumed at DP=2: complete and checksummed
    ref, _ = _read(runs["root"] / "tp1")
    assert got["instance"].tolist() == list(range(len(ref)))  # every instance exactly once
    for f in got.dtype.names:
        assert np.array_equal(got[f], ref[f]), f  # bit-identical to the uninterrupted run
    assert not list((runs["root"] / "killed").glob(".shard_*"))  # the half-written temp is gone


def test_resume_into_another_runs_store_is_refused(runs):
    from megatron_kd.miniplm.store import ScoreStore

    store = ScoreStore(runs["root"] / "tp1")
    identity = store.manifest()
    identity["instances"] = dict(identity["instances"], chunk_length=8)
    with pytest.raises(FileExistsError, match="differs in instances"):
        store.create_or_resume(identity)
    assert store.create_or_resume(store.manifest()) is True  # the same run resumes


def test_input_errors_are_one_line(runs, tmp_path, capsys):
    from megatron_kd.cli import main

    base = ["miniplm", "score", "--teacher", runs["teacher"], "--reference", runs["reference"], "--data",
            runs["data"], "--out", str(tmp_path / "s")]
    assert main(["miniplm", "score", "--teacher", str(tmp_path / "nope")] + base[4:]) == 2
    assert main(base[:-4] + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "s")]) == 2
    assert main(base + ["--chunk-length", "1"]) == 2
    assert main(base + ["--chunk-length", "1000"]) == 2  # longer than max_position_embeddings
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("megatron-kd miniplm: error:") for line in err)
    assert "no 'latest' file" in err[0] and "not found" in err[1] and "max_position_embeddings" in err[3]


def _with_tokenizer(src, dst, ref):
    import shutil

    from megatron_kd.utils.io import read_json, write_json_atomic

    shutil.copytree(src, dst)
    meta_path = next(dst.glob("iter_*")) / "meta.json"
    meta = read_json(meta_path)
    meta["tokenizer"] = ref
    write_json_atomic(meta_path, meta)
    return str(dst)


def test_tokenizer_mismatch_is_refused(runs, tmp_path):
    from megatron_kd.miniplm.score import ScoreConfig, check_inputs

    # convert hf-to-mcore copies the tokenizer into CKPT/tokenizer and records it relatively
    teacher = _with_tokenizer(runs["teacher"], tmp_path / "teacher", "tokenizer")
    (tmp_path / "teacher" / "tokenizer").mkdir()
    same = _with_tokenizer(runs["reference"], tmp_path / "ref_same", str(tmp_path / "teacher" / "tokenizer"))
    other = _with_tokenizer(runs["reference"], tmp_path / "ref_other", "another-tokenizer")
    data = make_dataset(tmp_path / "d", random_docs(3, 4, 9), tokenizer=None)
    t_meta, r_meta, _ = check_inputs(ScoreConfig(teacher=teacher, reference=same, data=data, out="x", chunk_length=CHUNK))
    assert t_meta["tokenizer"] == r_meta["tokenizer"] == str((tmp_path / "teacher" / "tokenizer").resolve())
    with pytest.raises(ValueError, match="differs from reference tokenizer"):
        check_inputs(ScoreConfig(teacher=teacher, reference=other, data=data, out="x", chunk_length=CHUNK))
    with pytest.raises(ValueError, match="was tokenized with"):  # data from another tokenizer
        check_inputs(ScoreConfig(teacher=runs["teacher"], reference=runs["reference"],
                                 data=make_dataset(tmp_path / "d2", random_docs(3, 4, 9), tokenizer="gpt2"), out="x", chunk_length=CHUNK))
