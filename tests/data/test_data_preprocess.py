"""Preprocessing: what megatron-core's own IndexedDataset reads back is exactly the tokenizer's
ids with EOD after each document; worker count does not change a byte; manifests and metadata
side files describe the data truthfully.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_preprocess.py
"""
import gzip
import json

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_kd.data.manifest import open_indexed_dataset, read_dataset_manifest, verify_checksums
from megatron_kd.data.preprocess import preprocess, read_meta
from megatron_kd.data.tokenizers import load_tokenizer
from megatron_kd.utils.io import sha256_file


def _files(prefix):
    return {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx", ".meta.jsonl")}


def test_roundtrip_through_megatron_indexed_dataset(demo_dataset, demo_docs, sp_tok):
    ds = IndexedDataset(demo_dataset)  # megatron-core's reader, no validation of ours in between
    assert len(ds) == len(demo_docs)
    assert np.array_equal(ds.document_indices, np.arange(len(demo_docs) + 1))
    for i, doc in enumerate(demo_docs):
        ids = ds[i]
        assert ids.dtype == np.uint16
        assert ids.tolist() == sp_tok.encode(doc["text"]) + [sp_tok.eod]
        assert sp_tok.decode(ids[:-1].tolist()) == doc["text"]
    assert int(ds.sequence_lengths.sum()) == sum(len(sp_tok.encode(d["text"])) + 1 for d in demo_docs)


def test_manifest_and_meta_side_file(demo_dataset, demo_docs, demo_jsonl, sp_tok):
    m = read_dataset_manifest(demo_dataset)
    assert m["tokenizer"]["identity"] == sp_tok.identity and m["tokenizer"]["vocab_size"] == 1000
    assert m["num_documents"] == len(demo_docs)
    assert m["num_tokens"] == sum(len(sp_tok.encode(d["text"])) + 1 for d in demo_docs)
    assert m["dtype"] == "uint16"
    for kind in ("bin", "idx", "meta"):
        assert m["checksums"][kind] == sha256_file(f"{demo_dataset}.{'meta.jsonl' if kind == 'meta' else kind}")
    verify_checksums(demo_dataset)
    (src,) = m["sources"]
    assert src["sha256"] == sha256_file(demo_jsonl) and src["bytes"] == demo_jsonl.stat().st_size
    assert src["documents"] == len(demo_docs)
    meta = read_meta(demo_dataset)
    assert len(meta) == len(demo_docs)
    for i, (line, doc) in enumerate(zip(meta, demo_docs)):
        assert line == {"file": 0, "line": i + 1, "domain": doc["domain"], "meta": doc["meta"]}


def test_two_workers_are_byte_identical(demo_jsonl, sp_tok, tmp_path):
    # Small batches so both workers get many work items and finish out of order.
    for w in (1, 2):
        preprocess([str(demo_jsonl)], str(tmp_path / f"w{w}"), sp_tok, workers=w, batch_bytes=4096,
                   progress=False)
    assert _files(str(tmp_path / "w1_text_document")) == _files(str(tmp_path / "w2_text_document"))


def test_no_eod_multiple_keys_and_max_documents(tmp_path, sp_tok):
    rows = [{"text": f"document number {i}.", "title": f"Title {i}", "domain": "d"} for i in range(7)]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = preprocess([str(path)], str(tmp_path / "out"), sp_tok, json_keys=("text", "title"),
                   append_eod=False, max_documents=5, progress=False)
    assert m["num_documents"] == 5
    # Every key's dataset is finalized (Megatron-LM once only finalized the last key's builder).
    for key in ("text", "title"):
        ds = open_indexed_dataset(tmp_path / f"out_{key}_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [sp_tok.encode(r[key]) for r in rows[:5]]
        assert read_dataset_manifest(tmp_path / f"out_{key}_document")["json_key"] == key


def test_int32_tokens_for_vocab_above_65500(tmp_path, big_vocab_dir):
    tok = load_tokenizer(big_vocab_dir)
    assert tok.vocab_size == 70_000
    path = tmp_path / "big.jsonl"
    texts = ["w1 w69000 w65535 w65536", "w7 unknownword w69997"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = preprocess([str(path)], str(tmp_path / "big"), tok, progress=False)
    assert m["dtype"] == "int32"
    ds = IndexedDataset(str(tmp_path / "big_text_document"))
    assert ds[0].dtype == np.int32
    assert ds[0].tolist() == [1, 69000, 65535, 65536, tok.eod]
    assert ds[1].tolist() == [7, 69998, 69997, tok.eod]  # 69998 = <unk>


def test_plain_text_units_and_globs(tmp_path, sp_tok):
    (tmp_path / "a.txt").write_text("First para line one.\nline two.\n\n\nSecond para.\n")
    (tmp_path / "b.txt").write_text("Only line of b.\n")
    glob = str(tmp_path / "*.txt")
    by_file = preprocess([glob], str(tmp_path / "f"), sp_tok, progress=False)
    by_para = preprocess([glob], str(tmp_path / "p"), sp_tok, text_unit="paragraph", progress=False)
    by_line = preprocess([glob], str(tmp_path / "l"), sp_tok, text_unit="line", progress=False)
    assert [m["num_documents"] for m in (by_file, by_para, by_line)] == [2, 3, 4]
    ds = IndexedDataset(str(tmp_path / "p_text_document"))
    expected = ["First para line one.\nline two.", "Second para.", "Only line of b."]
    assert [sp_tok.decode(ds[i][:-1].tolist()) for i in range(3)] == expected
    assert [(r["file"], r["line"]) for r in read_meta(str(tmp_path / "p_text_document"))] == [(0, 1), (0, 5), (1, 1)]
    ds = IndexedDataset(str(tmp_path / "f_text_document"))
    assert sp_tok.decode(ds[0][:-1].tolist()) == (tmp_path / "a.txt").read_text()


def test_gzip_jsonl_input(tmp_path, sp_tok):
    rows = [{"text": "compressed text one"}, {"text": "and two"}]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    m = preprocess([str(tmp_path / "c.jsonl.gz")], str(tmp_path / "c"), sp_tok, progress=False)
    ds = IndexedDataset(str(tmp_path / "c_text_document"))
    assert [ds[i][:-1].tolist() for i in range(2)] == [sp_tok.encode(r["text"]) for r in rows]
    assert m["sources"][0]["format"] == "jsonl"


def test_split_sentences_with_punkt_trained_on_input(demo_docs, sp_tok, tmp_path):
    demo_docs = demo_docs[:12]
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in demo_docs))
    m = preprocess([str(path)], str(tmp_path / "s"), sp_tok, split_sentences=True, workers=2,
                   punkt_train_chars=50_000, progress=False)
    assert m["name"] == "s_text_sentence"
    assert m["sentence_splitter"]["kind"] in ("nltk-punkt-trained-on-input", "nltk-punkt-pretrained")
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    docs = ds.document_indices
    assert len(docs) == len(demo_docs) + 1
    assert len(ds) > 3 * len(demo_docs)  # many sentences per document
    for i, doc in enumerate(demo_docs):
        sentences = [ds[j].tolist() for j in range(docs[i], docs[i + 1])]
        assert sentences[-1][-1] == sp_tok.eod  # EOD closes the last sentence only
        sentences[-1] = sentences[-1][:-1]
        assert all(sp_tok.eod not in s for s in sentences)
        # The sentences cut the text without losing a character.
        assert "".join(sp_tok.decode(s) for s in sentences) == doc["text"]


def test_hf_tokenizer_with_workers(demo_jsonl, demo_docs, hf_tok_dir, tmp_path):
    from tokenizers import Tokenizer as RustTokenizer

    reference = RustTokenizer.from_file(str(hf_tok_dir / "tokenizer.json"))
    eod = reference.token_to_id("<|endoftext|>")
    for w in (1, 2):
        preprocess([str(demo_jsonl)], str(tmp_path / f"hf{w}"), str(hf_tok_dir), workers=w,
                   batch_bytes=8192, progress=False)
    assert _files(str(tmp_path / "hf1_text_document")) == _files(str(tmp_path / "hf2_text_document"))
    ds = IndexedDataset(str(tmp_path / "hf2_text_document"))
    for i in (0, len(demo_docs) // 2, len(demo_docs) - 1):
        assert ds[i].tolist() == reference.encode(demo_docs[i]["text"], add_special_tokens=False).ids + [eod]
