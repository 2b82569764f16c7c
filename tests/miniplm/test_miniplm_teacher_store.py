"""``miniplm score --teacher-store``: the teacher's NLL read from a logits store written with
``--label-logprobs`` equals the scores of a teacher forward (chunk and document mode), the reference
side is unchanged, and stores that cannot stand in for the teacher are refused in one line."""
import numpy as np
import pytest

from dist_helpers import run_workers
from miniplm_testlib import make_dataset, random_docs, save_models_worker

CHUNK = 16


def _worker(rank, world_size, root, data):
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits
    from megatron_kd.miniplm.score import ScoreConfig, score_corpus

    teacher, reference = save_models_worker(rank, world_size, root)
    for name, overlap, labels in (("store", 0, True), ("overlapped", 4, True), ("nolabels", 0, False)):
        precompute_logits(PrecomputeConfig(teacher=teacher, data=data, out=f"{root}/{name}", top_p=0.9, top_k=8,
                                           seq_length=CHUNK, overlap=overlap, shard_tokens=400,
                                           label_logprobs=labels))
    kw = dict(teacher=teacher, reference=reference, data=data, chunk_length=CHUNK, shard_size=8, micro_batch_size=2)
    for mode in ("chunk", "document"):
        score_corpus(ScoreConfig(out=f"{root}/{mode}_forward", mode=mode, **kw))
        score_corpus(ScoreConfig(out=f"{root}/{mode}_stored", mode=mode, teacher_store=f"{root}/store", **kw))
    # chunk_length None: the store's window
    score_corpus(ScoreConfig(teacher=teacher, reference=reference, data=data, out=f"{root}/default_len",
                             teacher_store=f"{root}/store", shard_size=8, micro_batch_size=2))
    return teacher, reference


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniplm_teacher_store")
    data = make_dataset(root / "corpus", random_docs(24, 1, 60, seed=5))
    (teacher, reference), = run_workers(_worker, 1, str(root), data)
    return dict(root=root, data=data, teacher=teacher, reference=reference)


def _read(path):
    from megatron_kd.miniplm.store import ScoreStore

    return ScoreStore(path).read()


@pytest.mark.parametrize("mode", ["chunk", "document"])
def test_stored_teacher_nll_equals_teacher_forward(runs, mode):
    fwd, man_f = _read(runs["root"] / f"{mode}_forward")
    got, man_s = _read(runs["root"] / f"{mode}_stored")
    assert len(got) == len(fwd) > 20
    for f in ("instance", "doc", "offset", "length", "n_pred"):
        assert np.array_equal(got[f], fwd[f]), f
    np.testing.assert_array_equal(got["nll_ref"], fwd["nll_ref"])  # the reference runs as before
    np.testing.assert_allclose(got["nll_teacher"], fwd["nll_teacher"], rtol=2e-6, atol=2e-6)
    assert man_s["teacher_nll"].startswith("logits store") and man_f["teacher_nll"] == "teacher forward"


def test_chunk_length_defaults_to_the_store_window(runs):
    got, man = _read(runs["root"] / "default_len")
    fwd, _ = _read(runs["root"] / "chunk_forward")
    assert man["instances"]["chunk_length"] == CHUNK
    np.testing.assert_allclose(got["nll_teacher"], fwd["nll_teacher"], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("store,args,match", [
    ("overlapped", [], "overlapping windows"),
    ("nolabels", [], "holds no label log-probs"),
    ("store", ["--chunk-length", "12"], "windows of 16 tokens but --chunk-length is 12"),
])
def test_unusable_teacher_store_is_refused_in_one_line(runs, tmp_path, capsys, store, args, match):
    from megatron_kd.cli import main

    rc = main(["miniplm", "score", "--teacher", runs["teacher"], "--reference", runs["reference"], "--data",
               runs["data"], "--out", str(tmp_path / "s"), "--teacher-store", str(runs["root"] / store), *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and match in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_store_of_another_teacher_is_refused(runs, tmp_path, capsys):
    from megatron_kd.cli import main

    # the reference checkpoint posing as the teacher: the store names another teacher
    rc = main(["miniplm", "score", "--teacher", runs["reference"], "--reference", runs["reference"], "--data",
               runs["data"], "--out", str(tmp_path / "s"), "--teacher-store", str(runs["root"] / "store")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "was written by teacher" in err and len(err.splitlines()) == 1, err
