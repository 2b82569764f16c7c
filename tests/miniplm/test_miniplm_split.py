"""``miniplm split``: disjoint, complete, deterministic, duplicates on one side, about the asked share."""
import json

import numpy as np
import pytest

from miniplm_testlib import make_dataset, random_docs
from megatron_kd.miniplm.dataset_io import open_dataset
from megatron_kd.miniplm.split import SplitConfig, split_dataset


def _sides(prefix):
    meta = [json.loads(line) for line in open(f"{prefix}.meta.jsonl")]
    ds = open_dataset(prefix)
    return [m["source_doc"] for m in meta], [np.array(ds[i]) for i in range(len(ds))], meta


def test_split_is_disjoint_complete_and_deterministic(tmp_path):
    docs = random_docs(1500, 2, 12, seed=7)
    docs += [docs[3].copy() for _ in range(20)]  # exact duplicates must land on one side
    domains = [f"d{i % 3}" for i in range(len(docs))]
    data = make_dataset(tmp_path / "c", docs, domains)
    summary = split_dataset(SplitConfig(data=data, out_ref=str(tmp_path / "ref"), out_main=str(tmp_path / "main"),
                                        holdout_fraction=0.1, seed=0))
    ref_ids, ref_tokens, ref_meta = _sides(tmp_path / "ref")
    main_ids, main_tokens, _ = _sides(tmp_path / "main")
    assert set(ref_ids).isdisjoint(main_ids) and sorted(ref_ids + main_ids) == list(range(len(docs)))
    for i, toks in zip(ref_ids + main_ids, ref_tokens + main_tokens):
        assert np.array_equal(toks, docs[i])  # content preserved, order within each side = corpus order
    assert ref_ids == sorted(ref_ids) and main_ids == sorted(main_ids)
    assert all(m["domain"] == domains[m["source_doc"]] for m in ref_meta)
    dup_side = {i in ref_ids for i in [3] + list(range(1500, 1520))}
    assert len(dup_side) == 1
    ref_texts = {tuple(t) for t in ref_tokens}
    assert not any(tuple(t) in ref_texts for t in main_tokens)  # no text overlap at all
    n = 1500  # distinct documents: the share is binomial(1500, 0.1) = 150 +- 11.6
    assert abs(len(set(map(tuple, ref_tokens))) - 0.1 * n) < 4 * (n * 0.1 * 0.9) ** 0.5
    assert summary["reference_documents"] + summary["main_documents"] == len(docs)
    again = split_dataset(SplitConfig(data=data, out_ref=str(tmp_path / "ref2"), out_main=str(tmp_path / "main2"),
                                      holdout_fraction=0.1, seed=0))
    assert again == summary and _sides(tmp_path / "ref2")[0] == ref_ids
    other = split_dataset(SplitConfig(data=data, out_ref=str(tmp_path / "ref3"), out_main=str(tmp_path / "main3"),
                                      holdout_fraction=0.1, seed=1))
    assert _sides(tmp_path / "ref3")[0] != ref_ids and other["documents"] == len(docs)
    man = json.load(open(tmp_path / "ref.manifest.json"))
    assert man["side"] == "reference" and man["num_documents"] == len(ref_ids) and man["tokenizer"] == "test-tokenizer"


def test_split_refuses_bad_inputs(tmp_path):
    data = make_dataset(tmp_path / "c", random_docs(5, 2, 5))
    kw = dict(data=data, out_ref=str(tmp_path / "r"), out_main=str(tmp_path / "m"))
    with pytest.raises(ValueError, match="--holdout-fraction"):
        split_dataset(SplitConfig(**kw, holdout_fraction=1.0))
    with pytest.raises(ValueError, match="different prefixes"):
        split_dataset(SplitConfig(data=data, out_ref=str(tmp_path / "x"), out_main=str(tmp_path / "x")))
    split_dataset(SplitConfig(**kw))
    with pytest.raises(FileExistsError, match="--overwrite"):
        split_dataset(SplitConfig(**kw))
    with pytest.raises(FileNotFoundError, match="not found"):
        split_dataset(SplitConfig(data=str(tmp_path / "none"), out_ref=str(tmp_path / "a"), out_main=str(tmp_path / "b")))
