"""Demo corpus: deterministic, offline, built from stdlib sources without importing them, with
texts that match the docstrings Python itself reports.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_demo_corpus.py
"""
import inspect
import json
import sys

import pytest

from megatron_kd.data.demo_corpus import build_demo_corpus, render_module, stdlib_dir


def test_deterministic_and_prefix_stable(tmp_path, demo_jsonl):
    stats = build_demo_corpus(str(tmp_path / "again.jsonl"), max_docs=40)
    assert (tmp_path / "again.jsonl").read_bytes() == demo_jsonl.read_bytes()
    small = build_demo_corpus(str(tmp_path / "small.jsonl"), max_docs=10)
    assert demo_jsonl.read_bytes().startswith((tmp_path / "small.jsonl").read_bytes())
    assert small["num_documents"] == 10 and stats["num_documents"] == 40
    assert json.loads((tmp_path / "again.jsonl.manifest.json").read_text())["sha256"] == stats["sha256"]


def test_documents_have_domains_and_real_docstrings(demo_docs):
    import pydoc_data.topics

    for doc in demo_docs:
        assert set(doc) == {"text", "domain", "meta"} and doc["text"].strip()
        if doc["meta"]["kind"] == "topic":
            assert doc["domain"] == "topics"
            assert doc["text"].strip("\n") == pydoc_data.topics.topics[doc["meta"]["name"]].strip("\n")
        else:
            assert doc["domain"] == doc["meta"]["name"].split(".")[0]
            assert doc["text"].startswith(f"Module {doc['meta']['name']}\n")
    assert len({d["domain"] for d in demo_docs}) > 10


def test_rendering_matches_inspect_on_an_imported_module():
    import json as json_module

    text = render_module(stdlib_dir() / "json" / "__init__.py", "json")
    assert inspect.getdoc(json_module) in text
    assert "dumps(obj, *, skipkeys=False" in text
    assert inspect.getdoc(json_module.dumps) in text


@pytest.mark.slow
def test_full_corpus_size_and_no_imports(tmp_path):
    before = set(sys.modules)
    stats = build_demo_corpus(str(tmp_path / "full.jsonl"))
    assert set(sys.modules) - before <= {"pydoc_data"}  # nothing of the stdlib was imported
    assert stats["num_documents"] > 500 and stats["num_bytes"] > 2_000_000
    assert stats["domains"]["topics"] > 50


def test_include_code_adds_source_documents():
    from itertools import islice

    from megatron_kd.data.demo_corpus import iter_demo_documents

    docs = list(islice(iter_demo_documents(include_code=True), 30))
    code = [d for d in docs if d["meta"]["kind"] == "code"]
    assert code, "a 30-document prefix of the shuffled units holds some source files"
    for d in code:
        src = (stdlib_dir() / d["meta"]["source"]).read_text(encoding="utf-8")
        assert d["text"] == f"# Lib/{d['meta']['source']}\n" + src
