"""One teacher pass, several stores (``precompute_stores`` / ``megatron-kd logits --also-store``) and the
teacher's label log-probs (``--label-logprobs``): every store is byte-identical to the one written alone,
the label log-probs equal a float64 teacher forward, TP=2 = TP=1, and a resumed pass recomputes only the
shards a store lacks."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import logits_testlib as L
from dist_helpers import run_workers
from megatron_kd.logits import manifest as mf
from megatron_kd.utils.io import sha256_file

SAMPLE = dict(method="sample", num_samples=6, audit_fraction=0.05)


def _worker(rank, world_size, base):
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits, precompute_stores
    from megatron_kd.runtime import ParallelConfig, barrier, init_distributed

    ckpt, prefix = os.path.join(base, "ckpt"), os.path.join(base, "ds")
    L.make_teacher(rank, world_size, ckpt)
    common = dict(teacher=ckpt, data=prefix, top_p=L.TOP_P, top_k=L.TOP_K, seq_length=L.SEQ, overlap=L.OVERLAP,
                  micro_batch_size=2, shard_tokens=300)

    def cfg(name, **kw):
        return PrecomputeConfig(out=os.path.join(base, name), **{**common, **kw})

    out = {"alone_topk": precompute_logits(cfg("alone_topk")), "alone_sample": precompute_logits(cfg("alone_sample",
                                                                                                     **SAMPLE))}
    out["pass"] = precompute_stores([cfg("pass_topk", label_logprobs=True), cfg("pass_sample", **SAMPLE)])
    out["tp2"] = precompute_stores([cfg("tp2_topk", label_logprobs=True, tensor_parallel=2)])
    # Resume: the sampled store lost one shard (file + record); the top-k store is complete.
    if rank == 0:
        for name in ("pass_topk", "pass_sample"):
            shutil.copytree(os.path.join(base, name), os.path.join(base, f"re_{name}"))
        mf.shard_file(os.path.join(base, "re_pass_sample"), 1).unlink()
        mf.shard_record_file(os.path.join(base, "re_pass_sample"), 1).unlink()
    barrier()
    out["resumed"] = precompute_stores([cfg("re_pass_topk", label_logprobs=True), cfg("re_pass_sample", **SAMPLE)])
    init_distributed(ParallelConfig())
    ref = L.reference_worker(rank, world_size, ckpt, prefix)
    out["reference"] = ref if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("teacher_pass"))
    L.make_dataset(os.path.join(base, "ds"))
    return base, run_workers(_worker, 2, base, timeout=900)


def _files(store):
    """sha256 of every shard and audit file of a store (records and label files aside)."""
    return {p.name: sha256_file(p) for p in sorted((Path(store) / mf.SHARDS).glob("shard_*"))
            if not p.name.endswith((".json", ".labels.npy"))}


def _labels(store):
    man = mf.read_store_manifest(store)
    return np.concatenate([np.load(os.path.join(store, mf.SHARDS, r["labels_file"])) for r in man["shards"]])


def test_one_pass_writes_the_same_bytes_as_two(built):
    base, res = built
    assert all(s["complete"] for s in res[0]["pass"])
    for kind in ("topk", "sample"):
        alone, joint = _files(os.path.join(base, f"alone_{kind}")), _files(os.path.join(base, f"pass_{kind}"))
        assert alone and alone == joint, kind
        a = mf.read_store_manifest(os.path.join(base, f"alone_{kind}"))
        j = mf.read_store_manifest(os.path.join(base, f"pass_{kind}"))
        assert a["stats"] == j["stats"] and a["settings"]["method"] == kind
    # the label log-probs are a setting of the store that asked for them only
    assert mf.read_store_manifest(os.path.join(base, "pass_topk"))["settings"]["label_logprobs"] is True
    assert "label_logprobs" not in mf.read_store_manifest(os.path.join(base, "pass_sample"))["settings"]
    assert not list((Path(base) / "pass_sample" / mf.SHARDS).glob("*.labels.npy"))


def test_label_logprobs_equal_float64_teacher(built):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    base, res = built
    ref = res[0]["reference"]
    got = _labels(os.path.join(base, "pass_topk"))
    raw = IndexedDataset(os.path.join(base, "ds"))
    assert len(got) == sum(L.DOC_LENGTHS)
    at, checked = 0, 0
    for d, n in enumerate(L.DOC_LENGTHS):
        doc = raw[d].astype(np.int64)
        for o in range(n):
            if o == n - 1:  # the document's last token has no target
                assert np.isnan(got[at + o])
                continue
            want = ref[d][o][doc[o + 1]]
            assert abs(got[at + o] - want) <= 1e-4 * max(1.0, abs(want)), (d, o)
            checked += 1
        at += n
    assert checked == sum(n - 1 for n in L.DOC_LENGTHS)


def test_label_logprobs_tp2_equal_tp1(built):
    base, _ = built
    a, b = _labels(os.path.join(base, "pass_topk")), _labels(os.path.join(base, "tp2_topk"))
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    np.testing.assert_allclose(b[ok], a[ok], rtol=1e-5, atol=1e-5)


def test_resumed_pass_computes_only_the_missing_shard(built):
    base, res = built
    topk, sample = res[0]["resumed"]
    assert sum(r["resumed"][0]["shards"] for r in res) == 0  # nothing left to do for the top-k store
    assert sum(r["resumed"][1]["shards"] for r in res) == 1 and sample["complete"] and topk["complete"]
    for kind in ("topk", "sample"):
        assert _files(os.path.join(base, f"re_pass_{kind}")) == _files(os.path.join(base, f"pass_{kind}"))


def test_stores_that_cannot_share_a_pass_fail_in_one_line(tmp_path):
    from megatron_kd.commands.logits import parse_also_store
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_stores

    a = PrecomputeConfig(teacher="t", data="d", out=str(tmp_path / "a"), seq_length=64)
    with pytest.raises(ValueError, match=r"must share seq_length") as exc:
        precompute_stores([a, PrecomputeConfig(teacher="t", data="d", out=str(tmp_path / "b"), seq_length=32)])
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"same --out"):
        precompute_stores([a, PrecomputeConfig(teacher="t", data="d", out=str(tmp_path / "a"), seq_length=64)])
    assert parse_also_store("stores/x:sample", "topk") == ("stores/x", "sample")
    assert parse_also_store("stores/x", "topk") == ("stores/x", "topk")
    with pytest.raises(ValueError, match=r"not a method"):
        parse_also_store("stores/x:samples", "topk")
