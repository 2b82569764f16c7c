"""Worker side of preprocessing: raw input records -> token arrays, per batch.

Kept free of megatron-core and torch imports so spawned workers start fast. A batch is a list of
``(line_number, raw_bytes)`` records of one source file; the result holds, per output key, the
concatenated token ids (already in the dataset dtype), the length of every sequence and the number
of sequences of every document, plus one serialized metadata line per kept document and the
records that were rejected (in input order, so the first error reported is the first in the file).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_kd.data.tokenizers import Tokenizer


@dataclass
class EncodeOptions:
    """How records become documents (shared by every worker)."""

    json_keys: tuple[str, ...] = ("text",)
    """JSON fields to tokenize; each produces its own dataset (``{prefix}_{key}_...``)."""
    input_format: str = "jsonl"
    """``jsonl`` (one JSON object per line) or ``text`` (each record's raw text is the document)."""
    append_eod: bool = True
    """Append the tokenizer's end-of-document id after every document."""
    meta_keys: tuple[str, ...] = ()
    """JSON fields copied verbatim into the per-document metadata line (when present)."""
    write_meta: bool = True
    """Produce one metadata line (source file index, line number, ``meta_keys``) per document."""
    dtype: str = "uint16"
    """Token dtype of the ``.bin`` file (numpy name)."""
    sentence_splitter: Any = None
    """An object with ``span_tokenize(text)`` (nltk Punkt) to split documents into sentences."""

    @property
    def output_keys(self) -> tuple[str, ...]:
        """One dataset per key: the JSON keys, or ``("text",)`` for plain-text input."""
        return self.json_keys if self.input_format == "jsonl" else ("text",)


@dataclass
class BatchResult:
    """Tokenized output of one batch (see the module docstring)."""

    source: int
    bytes_in: int
    tokens: dict[str, np.ndarray] = field(default_factory=dict)
    seq_lengths: dict[str, np.ndarray] = field(default_factory=dict)
    doc_seqs: dict[str, np.ndarray] = field(default_factory=dict)
    meta_lines: list[bytes] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    num_docs: int = 0
    num_empty: int = 0


def _record_texts(raw: bytes, opts: EncodeOptions) -> tuple[list[str], dict | None, str | None]:
    """Texts of one record (one per json key) and its JSON object, or an error string."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [], None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    if opts.input_format == "text":
        return [line], None, None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return [], None, f"invalid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return [], None, f"expected a JSON object, got {type(obj).__name__}"
    texts = []
    for key in opts.json_keys:
        if key not in obj:
            return [], None, f"missing key {key!r} (keys: {sorted(obj)[:8]})"
        value = obj[key]
        if not isinstance(value, str):
            return [], None, f"key {key!r} is {type(value).__name__}, not a string"
        texts.append(value)
    return texts, obj, None


class Encoder:
    """Turns batches of records into :class:`BatchResult` (one instance per worker process)."""

    def __init__(self, tokenizer: Tokenizer, opts: EncodeOptions):
        self.tokenizer = tokenizer
        self.opts = opts
        self.eod = tokenizer.eod

    def _pieces(self, text: str) -> list[str]:
        """The text cut at sentence starts; the pieces concatenate back to ``text`` exactly."""
        if self.opts.sentence_splitter is None:
            return [text]
        starts = [s for s, _ in self.opts.sentence_splitter.span_tokenize(text)]
        if not starts:
            return [text]
        starts[0] = 0
        bounds = starts + [len(text)]
        return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def encode_batch(self, source: int, records: list[tuple[int, bytes]], input_bytes: int = 0) -> BatchResult:
        """Tokenize ``records`` of source file number ``source`` (``input_bytes``: the bytes of
        input they were read from, for throughput accounting)."""
        opts = self.opts
        out = BatchResult(source=source, bytes_in=input_bytes or sum(len(r) for _, r in records))
        kept: list[tuple[int, list[str], dict | None]] = []
        for line_no, raw in records:
            texts, obj, error = _record_texts(raw, opts)
            if error is not None:
                out.errors.append((line_no, error))
            elif any(not t for t in texts):
                out.num_empty += 1
            else:
                kept.append((line_no, texts, obj))
        texts_keys = opts.output_keys
        n_keys = len(texts_keys)
        # Tokenize every piece of every key in one call (fast paths batch inside the tokenizer).
        pieces, owners = [], []  # owners[j] = (record index, key index)
        for r, (_, texts, _) in enumerate(kept):
            for k in range(n_keys):
                for piece in self._pieces(texts[k]):
                    pieces.append(piece)
                    owners.append((r, k))
        ids = self.tokenizer.encode_batch(pieces) if pieces else []
        per_record: list[list[list[list[int]]]] = [[[] for _ in range(n_keys)] for _ in kept]
        for (r, k), seq in zip(owners, ids):
            if seq:
                per_record[r][k].append(seq)
        dtype = np.dtype(opts.dtype)
        flat = {key: [] for key in texts_keys}
        lengths = {key: [] for key in texts_keys}
        nseqs = {key: [] for key in texts_keys}
        for r, (line_no, _, obj) in enumerate(kept):
            seqs_by_key = per_record[r]
            if any(not seqs for seqs in seqs_by_key):  # tokenized to nothing: treat as empty
                out.num_empty += 1
                continue
            for key, seqs in zip(texts_keys, seqs_by_key):
                if opts.append_eod:
                    seqs[-1] = seqs[-1] + [self.eod]
                for seq in seqs:
                    flat[key].extend(seq)
                    lengths[key].append(len(seq))
                nseqs[key].append(len(seqs))
            out.num_docs += 1
            if opts.write_meta:
                meta = {"file": source, "line": line_no}
                if obj is not None:
                    meta.update({k: obj[k] for k in opts.meta_keys if k in obj})
                out.meta_lines.append((json.dumps(meta, ensure_ascii=False) + "\n").encode("utf-8"))
        for key in texts_keys:
            out.tokens[key] = np.asarray(flat[key], dtype=dtype)
            out.seq_lengths[key] = np.asarray(lengths[key], dtype=np.int32)
            out.doc_seqs[key] = np.asarray(nseqs[key], dtype=np.int32)
        return out


_ENCODER: Encoder | None = None


def init_worker(tokenizer: Tokenizer, opts: EncodeOptions) -> None:
    """``multiprocessing.Pool`` initializer: build this process's encoder once."""
    global _ENCODER
    _ENCODER = Encoder(tokenizer, opts)


def encode_in_worker(job: tuple[int, list[tuple[int, bytes]], int]) -> BatchResult:
    """``Pool.imap`` target: encode one ``(source, records, input bytes)`` batch."""
    assert _ENCODER is not None, "init_worker was not called"
    return _ENCODER.encode_batch(*job)
