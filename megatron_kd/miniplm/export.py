"""Kept text as JSONL, so a student with another tokenizer or model family can re-tokenise it.

A kept piece that is a whole source document is copied verbatim from its source record when the
source can be found:

* automatically, from the dataset's side files: ``.meta.jsonl`` line i holds document i's
  ``file`` (index into the manifest's ``sources``) and 1-based ``line``, and the manifest names
  the JSONL files and the ``json_key`` (what ``megatron-kd preprocess`` writes);
* or from ``--source-jsonl``, whose non-blank line i must be document i (checked by count).

Every other piece (a chunk of a document, or a document whose source is unavailable) is
detokenised with the corpus tokenizer, dropping the end-of-document token. Pieces come in corpus
order, so each source file is read forward once.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from megatron_kd.miniplm.dataset_io import write_jsonl_atomic


def _whole(p_off: np.ndarray, p_len: np.ndarray, full_len: np.ndarray) -> np.ndarray:
    return (p_off == 0) & (p_len == full_len)


class _ForwardLines:
    """Line ``k`` (1-based, physical) of several text files, reading each file forward."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._fh: dict[int, Any] = {}
        self._pos: dict[int, int] = {}

    def get(self, file: int, line: int) -> str:
        if file not in self._fh or self._pos[file] >= line:  # (re)open when asked to go back
            if file in self._fh:
                self._fh[file].close()
            path = self.paths[file]
            self._fh[file] = gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else \
                open(path, encoding="utf-8")
            self._pos[file] = 0
        fh = self._fh[file]
        text = ""
        while self._pos[file] < line:
            text = fh.readline()
            if not text:
                raise ValueError(f"source {self.paths[file]} has fewer than {line} lines: the dataset's "
                                 ".meta.jsonl does not match it (pass --source-jsonl or drop --export-text)")
            self._pos[file] += 1
        return text

    def close(self) -> None:
        for fh in self._fh.values():
            fh.close()


def auto_sources(manifest: dict[str, Any] | None, doc_meta: list[dict] | None) -> tuple[list[str], str] | None:
    """``(jsonl paths, json_key)`` when the dataset's manifest and meta point to readable JSONL
    sources (as ``preprocess`` records them), else None."""
    if not manifest or not doc_meta or not manifest.get("sources") or "line" not in doc_meta[0]:
        return None
    paths = [s.get("path") for s in manifest["sources"]]
    formats = {s.get("format") for s in manifest["sources"]}
    if not formats <= {"jsonl", "json"} or not all(p and Path(p).is_file() for p in paths):
        return None
    return paths, manifest.get("json_key") or "text"


def needs_tokenizer(p_doc: np.ndarray, p_off: np.ndarray, p_len: np.ndarray, doc_lengths: np.ndarray,
                    has_source: bool) -> bool:
    """True when some kept piece must be detokenised (not a whole document, or no source)."""
    if not has_source:
        return len(p_doc) > 0
    return not bool(_whole(p_off, p_len, doc_lengths[p_doc]).all())


def _decode(tokenizer, ids: np.ndarray) -> str:
    eod = getattr(tokenizer, "eod", None)
    return tokenizer.decode([int(t) for t in ids if eod is None or int(t) != eod])


def _records(ds, p_doc, p_off, p_len, doc_lengths, domains, tokenizer, source_jsonl, json_key, auto, doc_meta
             ) -> Iterator[dict[str, Any]]:
    whole = _whole(p_off, p_len, doc_lengths[p_doc])
    reader = _ForwardLines([source_jsonl] if source_jsonl else (auto[0] if auto else []))
    key = json_key if source_jsonl else (auto[1] if auto else json_key)
    line_of_doc = None
    if source_jsonl:  # non-blank line i = document i
        line_of_doc, n = [], 0
        with open(source_jsonl, encoding="utf-8") as fh:
            for k, line in enumerate(fh, 1):
                if line.strip():
                    line_of_doc.append(k)
                    n += 1
        if n != len(doc_lengths):
            raise ValueError(f"--source-jsonl {source_jsonl} has {n} records but the dataset has "
                             f"{len(doc_lengths)} documents: pass the JSONL the dataset was built from")
    try:
        for d, o, n, w in zip(p_doc, p_off, p_len, whole):
            verbatim = bool(w and (source_jsonl or auto))
            if verbatim:
                file, line = (0, line_of_doc[d]) if source_jsonl else (doc_meta[d]["file"], doc_meta[d]["line"])
                text = json.loads(reader.get(file, line))[key]
            else:
                text = _decode(tokenizer, ds.get(int(d), offset=int(o), length=int(n)))
            yield {"text": text, "source_doc": int(d), "offset": int(o), "length": int(n),
                   "domain": str(domains[d]), "verbatim": verbatim}
    finally:
        reader.close()


def export_text(path: str | Path, ds, p_doc: np.ndarray, p_off: np.ndarray, p_len: np.ndarray,
                doc_lengths: np.ndarray, domains: np.ndarray, tokenizer=None, source_jsonl: str | None = None,
                json_key: str = "text", auto: tuple[list[str], str] | None = None,
                doc_meta: list[dict] | None = None) -> int:
    """Write one JSONL record per kept piece (``text``, ``source_doc``, ``offset``, ``length``,
    ``domain``, ``verbatim``) atomically; returns the number of records. ``auto`` is what
    :func:`auto_sources` found (used when ``source_jsonl`` is None)."""
    return write_jsonl_atomic(path, _records(ds, p_doc, p_off, p_len, doc_lengths, domains, tokenizer,
                                             source_jsonl, json_key, auto, doc_meta))
