"""Kept text as JSONL, so a student with another tokenizer or model family can re-tokenise it.

A kept piece that is a whole source document is copied verbatim from the original JSONL when
``--source-jsonl`` is given (non-blank line i must be document i, as ``preprocess`` writes them: the line
count is checked). Every other piece (a chunk of a document) is detokenised with the corpus
tokenizer, dropping the end-of-document token. One pass, streaming: pieces are in corpus order,
so the source JSONL is read forward once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_kd.miniplm.dataset_io import write_jsonl_atomic


def _whole(p_off: np.ndarray, p_len: np.ndarray, full_len: np.ndarray) -> np.ndarray:
    return (p_off == 0) & (p_len == full_len)


def needs_tokenizer(p_doc: np.ndarray, p_off: np.ndarray, p_len: np.ndarray, doc_lengths: np.ndarray,
                    source_jsonl: str | None) -> bool:
    """True when some kept piece must be detokenised (not a whole document, or no source JSONL)."""
    if not source_jsonl:
        return len(p_doc) > 0
    return not bool(_whole(p_off, p_len, doc_lengths[p_doc]).all())


def _decode(tokenizer, ids: np.ndarray) -> str:
    eod = getattr(tokenizer, "eod", None)
    ids = [int(t) for t in ids if eod is None or int(t) != eod]
    return tokenizer.decode(ids)


def _records(ds, p_doc, p_off, p_len, doc_lengths, domains, tokenizer, source_jsonl, json_key
             ) -> Iterator[dict[str, Any]]:
    whole = _whole(p_off, p_len, doc_lengths[p_doc])
    fh = open(source_jsonl, encoding="utf-8") if source_jsonl else None
    line_no, line = -1, None
    try:
        for d, o, n, w in zip(p_doc, p_off, p_len, whole):
            if fh is not None and w:
                while line_no < d:
                    line = fh.readline()
                    if not line:
                        raise ValueError(f"--source-jsonl {source_jsonl} has fewer lines than the dataset has "
                                         "documents: pass the JSONL the dataset was built from")
                    if line.strip():  # blank lines are not documents
                        line_no += 1
                text = json.loads(line)[json_key]
            else:
                text = _decode(tokenizer, ds.get(int(d), offset=int(o), length=int(n)))
            yield {"text": text, "source_doc": int(d), "offset": int(o), "length": int(n),
                   "domain": str(domains[d]), "verbatim": bool(fh is not None and w)}
        if fh is not None:
            extra = sum(1 for rest in fh if rest.strip())
            total = line_no + 1 + extra
            if total != len(doc_lengths):
                raise ValueError(f"--source-jsonl {source_jsonl} has {total} lines but the dataset has "
                                 f"{len(doc_lengths)} documents: pass the JSONL the dataset was built from")
    finally:
        if fh is not None:
            fh.close()


def export_text(path: str | Path, ds, p_doc: np.ndarray, p_off: np.ndarray, p_len: np.ndarray,
                doc_lengths: np.ndarray, domains: np.ndarray, tokenizer=None, source_jsonl: str | None = None,
                json_key: str = "text") -> int:
    """Write one JSONL record per kept piece (``text``, ``source_doc``, ``offset``, ``length``,
    ``domain``, ``verbatim``) atomically; returns the number of records."""
    return write_jsonl_atomic(path, _records(ds, p_doc, p_off, p_len, doc_lengths, domains, tokenizer,
                                             source_jsonl, json_key))
