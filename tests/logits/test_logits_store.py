"""Teacher-logits store end to end: precompute with a tiny teacher, read back through megatron
GPTDataset samples, compare with direct teacher forwards (float64 reference), TP/DP/PP
invariance, resume, verification and manifest checks."""
import json
import os
import shutil

import numpy as np
import pytest

import logits_testlib as L
from dist_helpers import run_workers
from megatron_kd.logits import LogitsStore, TeacherTargetsDataset, sample_positions, verify_store
from megatron_kd.logits import manifest as mf

STEP = 1.0 / 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("logits"))
    L.make_dataset(os.path.join(base, "ds"))
    return base, run_workers(L.all_worker, 2, base, timeout=900)


def _tolerance(lp_ref: float, top: float) -> float:
    # quantisation (step/2) + fp16 rounding of the token's top log-prob + fp32 noise
    return STEP / 2 + abs(top) * 2.0 ** -11 + 1e-4


def test_store_reproduces_direct_forward_on_gpt_samples(built):
    base, res = built
    ref = res[0]["reference"]
    store = LogitsStore(os.path.join(base, "tp1"))
    assert res[0]["tp1"]["complete"] and store.manifest["stats"]["targets"] == sum(n - 1 for n in L.DOC_LENGTHS)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    raw = IndexedDataset(os.path.join(base, "ds"))
    checked, padded, counts = 0, 0, set()
    for seed, seq in ((1, 32), (2, 64)):
        gds = L.gpt_dataset(os.path.join(base, "ds"), seed, seq, 40, L.cache_dir(base))
        wrapped = TeacherTargetsDataset(gds, store)
        for idx in range(len(wrapped)):
            sample = wrapped[idx]
            docs, offs = sample_positions(gds, idx)
            ids, lps = sample["target_ids"].numpy(), sample["target_logprobs"].numpy()
            assert ids.shape == (seq, L.TOP_K) and lps.dtype == np.float32
            # The (document, offset) mapping reproduces the sample's tokens and labels.
            text = np.array([raw[d][o] for d, o in zip(docs, offs)])
            assert np.array_equal(text[:seq], sample["tokens"].numpy())
            assert np.array_equal(text[1:], sample["labels"].numpy())
            for j in range(seq):
                d, o = int(docs[j]), int(offs[j])
                if o == L.DOC_LENGTHS[d] - 1:  # label is the next document's first token
                    assert (ids[j] == -1).all() and np.isneginf(lps[j]).all()
                    padded += 1
                    continue
                want = L.truncate_reference(ref[d][o])
                got = {int(i): float(v) for i, v in zip(ids[j], lps[j]) if i >= 0}
                assert set(got) == set(want), (seed, seq, idx, j)
                top = max(want.values())
                assert max(abs(got[i] - want[i]) for i in want) <= _tolerance(0, top)
                assert list(got.values()) == sorted(got.values(), reverse=True)
                counts.add(len(got))
                checked += 1
    assert checked > 1500 and padded > 10
    assert 1 in counts and L.TOP_K in counts and len(counts) > 10  # both top-p and top-k cut


def _decoded(store):
    return [store.get(d) for d in range(store.num_documents)]


def test_tp2_and_pp2_stores_equal_tp1(built):
    base, res = built
    ref_store = LogitsStore(os.path.join(base, "tp1"))
    # The TP=1 store ran data-parallel over 2 ranks: each took a disjoint half of the shards.
    assert res[0]["tp1"]["shards"] + res[1]["tp1"]["shards"] == ref_store.manifest["num_shards"]
    assert min(r["tp1"]["shards"] for r in res) >= 2
    want = _decoded(ref_store)
    for name in ("tp2", "pp2"):
        assert all(r[name]["complete"] for r in res)
        store = LogitsStore(os.path.join(base, name))
        assert store.manifest["stats"]["entries"] == ref_store.manifest["stats"]["entries"], name
        for (i1, l1), (i2, l2) in zip(want, _decoded(store)):
            assert np.array_equal(i1, i2), name
            fin = i1 >= 0
            assert np.abs(l1[fin] - l2[fin]).max(initial=0) <= STEP + 1e-4, name


def test_resume_and_rerun_give_identical_store(built):
    base, res = built
    full = mf.read_store_manifest(os.path.join(base, "tp1"))
    shards = full["num_shards"]
    assert shards >= 4
    assert [r["partial"]["shards"] for r in res] == [1, 1] and res[0]["partial_complete"] is False
    assert sum(r["resumed"]["shards"] for r in res) == shards - 2 and res[0]["resumed"]["complete"]
    assert sum(r["refilled"]["shards"] for r in res) == 1 and sum(r["rerun"]["shards"] for r in res) == 0
    for name in ("resume", "holed"):
        man = mf.read_store_manifest(os.path.join(base, name))
        assert man["shards"] == full["shards"] and man["stats"] == full["stats"], name
    assert verify_store(os.path.join(base, "resume")) == []


def test_verify_detects_a_corrupted_byte(built, tmp_path, capsys):
    from megatron_kd.cli import main

    base, _ = built
    store = tmp_path / "store"
    shutil.copytree(os.path.join(base, "tp1"), store)
    assert verify_store(store) == []
    assert main(["logits", "--out", str(store), "--verify"]) == 0
    LogitsStore(store).check_integrity()  # what offline distill runs on open (hashes cached)
    shard = mf.shard_file(store, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    problems = verify_store(store)
    assert len(problems) == 1 and "shard_00001.kdl" in problems[0] and "sha256" in problems[0]
    assert main(["logits", "--out", str(store), "--verify"]) == 1
    assert "shard_00001.kdl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard_00001.kdl"):  # the cache sees the changed file
        LogitsStore(store).check_integrity()


def test_mismatched_dataset_tokenizer_or_settings_fail_in_one_line(built, tmp_path, capsys):
    from megatron_kd.cli import main

    base, _ = built
    store_path = os.path.join(base, "tp1")
    store = LogitsStore(store_path)
    other = str(tmp_path / "other")
    L.make_dataset(other)
    with open(other + ".idx", "r+b") as fh:  # same documents but one length differs -> another dataset
        fh.seek(34)
        fh.write(np.int32(2).tobytes())
    gds = L.gpt_dataset(other, 1, 32, 10, str(tmp_path / "cache"))
    with pytest.raises(ValueError) as err:
        TeacherTargetsDataset(gds, store)
    assert "\n" not in str(err.value) and "recompute the store" in str(err.value)
    with pytest.raises(ValueError, match="tokenizer"):
        store.check_compatible(tokenizer="synthetic-tokenizer-B")
    store.check_compatible(os.path.join(base, "ds"), tokenizer="synthetic-tokenizer-A")  # the right inputs pass
    assert store.manifest["tokenizer"]["identity"] == "synthetic-tokenizer-A"
    # Resuming a store with other settings is refused before any work.
    rc = main(["logits", "--teacher", os.path.join(base, "ckpt"), "--data", os.path.join(base, "ds"),
               "--out", store_path, "--top-k", "20", "--top-p", str(L.TOP_P), "--seq-length", str(L.SEQ)])
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert rc == 2 and line.startswith("megatron-kd logits: error:") and "top_k=40" in line
    # An incomplete store is refused by readers.
    part = tmp_path / "part"
    shutil.copytree(store_path, part)
    man = json.loads((part / "manifest.json").read_text())
    man["complete"] = False
    (part / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="incomplete"):
        LogitsStore(part)


def test_reader_works_in_dataloader_workers(built):
    import torch

    base, _ = built
    gds = L.gpt_dataset(os.path.join(base, "ds"), 1, 32, 12, L.cache_dir(base))
    wrapped = TeacherTargetsDataset(gds, os.path.join(base, "tp1"), k_max=8)
    loader = torch.utils.data.DataLoader(wrapped, batch_size=4, num_workers=2)
    batches = list(loader)
    direct = [wrapped[i] for i in range(len(wrapped))]
    got_ids = torch.cat([b["target_ids"] for b in batches])
    assert got_ids.shape == (len(wrapped), 32, 8)
    assert torch.equal(got_ids, torch.stack([d["target_ids"] for d in direct]))
    assert torch.equal(torch.cat([b["target_logprobs"] for b in batches]),
                       torch.stack([d["target_logprobs"] for d in direct]))
