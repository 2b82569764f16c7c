"""merge-datasets: the merged dataset is the concatenation of its inputs, document for document,
with metadata re-pointed at the merged source list; mismatched inputs are refused.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_merge.py
"""
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_kd.data.merge import merge_datasets
from megatron_kd.data.preprocess import preprocess, read_meta
from megatron_kd.utils.io import sha256_file


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def two_parts(tmp_path, sp_tok):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": f"part a doc {i}", "domain": "a"} for i in range(3)])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": f"part b document {i}!", "domain": "b"} for i in range(4)])
    preprocess([a], str(tmp_path / "pa"), sp_tok, progress=False)
    preprocess([b], str(tmp_path / "pb"), sp_tok, progress=False)
    return str(tmp_path / "pa_text_document"), str(tmp_path / "pb_text_document")


def test_merge_concatenates_documents_and_meta(tmp_path, two_parts, sp_tok):
    pa, pb = two_parts
    out = str(tmp_path / "ab_text_document")
    m = merge_datasets([pa, pb + ".bin"], out, tokenizer=sp_tok)
    merged, da, db = IndexedDataset(out), IndexedDataset(pa), IndexedDataset(pb)
    assert len(merged) == 7 and np.array_equal(merged.document_indices, np.arange(8))
    expected = [da[i] for i in range(3)] + [db[i] for i in range(4)]
    assert all(np.array_equal(merged[i], e) for i, e in enumerate(expected))
    assert m["num_documents"] == 7 and m["num_tokens"] == int(merged.sequence_lengths.sum())
    assert m["checksums"]["bin"] == sha256_file(out + ".bin")
    assert m["tokenizer"]["identity"] == sp_tok.identity
    meta = read_meta(out)
    assert [(r["file"], r["domain"]) for r in meta] == [(0, "a")] * 3 + [(1, "b")] * 4
    assert [s["path"].rsplit("/", 1)[-1] for s in m["sources"]] == ["a.jsonl", "b.jsonl"]


def test_merge_directory_input_and_refusals(tmp_path, two_parts, sp_tok, hf_tok_dir):
    pa, pb = two_parts
    m = merge_datasets([str(tmp_path)], str(tmp_path / "sub" / "all"))
    assert [d["prefix"].rsplit("/", 1)[-1] for d in m["merged_from"]] == ["pa_text_document", "pb_text_document"]
    with pytest.raises(FileExistsError, match="already exists"):
        merge_datasets([pa, pb], str(tmp_path / "sub" / "all"))
    with pytest.raises(ValueError, match="is also an input"):
        merge_datasets([pa, pb], pa)
    with pytest.raises(ValueError, match="tokenized with"):
        merge_datasets([pa, pb], str(tmp_path / "x"), tokenizer=str(hf_tok_dir))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_datasets([pa, str(tmp_path / "nothing")], str(tmp_path / "y"))
