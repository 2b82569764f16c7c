"""Input side of preprocessing: expand files/globs, detect the format, stream records in batches.

A record is ``(line_number, raw_bytes)``: one JSONL line, or for plain text one file, line or
paragraph (``text_unit``). Decoding and JSON parsing happen in the workers; this side only reads
bytes, hashes them (sha256 of each source, for the manifest) and cuts batches.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
TEXT_UNITS = ("file", "paragraph", "line")


@dataclass
class Source:
    """One input file and what was read from it (filled while streaming)."""

    path: str
    format: str
    bytes: int = 0
    sha256: str = ""
    records: int = 0
    documents: int = 0
    skipped: int = 0
    empty: int = 0

    def describe(self) -> dict:
        """Manifest entry."""
        return {"path": self.path, "format": self.format, "bytes": self.bytes, "sha256": self.sha256 or None,
                "records": self.records, "documents": self.documents, "skipped": self.skipped,
                "empty": self.empty}


def expand_inputs(inputs: list[str] | str) -> list[str]:
    """Files named by ``inputs`` (paths or glob patterns), in the order given, each pattern's
    matches sorted. Raises ``FileNotFoundError`` naming the first path/pattern that matches none."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    if not inputs:
        raise ValueError("no input given: pass --input FILE [FILE ...] (JSONL or text files, or globs)")
    files: list[str] = []
    for item in map(str, inputs):
        if glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"input pattern {item!r} matches no file: check the path")
            files.extend(matches)
        elif os.path.isdir(item):
            raise ValueError(f"input {item} is a directory: pass its files or a glob like '{item}/*.jsonl'")
        elif not os.path.isfile(item):
            raise FileNotFoundError(f"input file {item} does not exist: check --input")
        else:
            files.append(item)
    return files


def detect_format(path: str, requested: str = "auto") -> str:
    """``jsonl`` or ``text``: ``requested`` unless ``auto``, then by the file suffix."""
    if requested in ("jsonl", "text"):
        return requested
    if requested != "auto":
        raise ValueError(f"input format {requested!r}: choose auto, jsonl or text")
    return "jsonl" if path.lower().endswith(_JSONL_SUFFIXES) else "text"


def _open(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def iter_records(source: Source, text_unit: str = "file") -> Iterator[tuple[int, bytes, int]]:
    """Records of one source as ``(1-based line number, record bytes, input bytes consumed)``;
    fills in ``source`` (size, sha256 of the (decompressed) content, record count) when done.
    Blank lines are skipped; the consumed bytes include them and the line terminators."""
    digest = hashlib.sha256()
    n_bytes = 0
    with _open(source.path) as fh:
        if source.format == "text" and text_unit == "file":
            data = fh.read()
            digest.update(data)
            n_bytes = len(data)
            if data:
                source.records += 1
                yield 1, data, len(data)
        elif source.format == "text" and text_unit == "paragraph":
            para: list[bytes] = []
            start = pending = 0
            for line_no, line in enumerate(fh, 1):
                digest.update(line)
                n_bytes += len(line)
                pending += len(line)
                if line.strip():
                    if not para:
                        start = line_no
                    para.append(line)
                elif para:
                    source.records += 1
                    yield start, b"".join(para).rstrip(b"\r\n"), pending
                    para, pending = [], 0
            if para:
                source.records += 1
                yield start, b"".join(para).rstrip(b"\r\n"), pending
        else:  # jsonl, or text with one document per line
            pending = 0
            for line_no, line in enumerate(fh, 1):
                digest.update(line)
                n_bytes += len(line)
                pending += len(line)
                if line.strip():
                    source.records += 1
                    yield line_no, line.rstrip(b"\r\n"), pending
                    pending = 0
    source.bytes = n_bytes
    source.sha256 = digest.hexdigest()


def iter_batches(
    sources: list[Source], text_unit: str, batch_bytes: int = 1 << 16, batch_records: int = 1024
) -> Iterator[tuple[int, list[tuple[int, bytes]], int]]:
    """``(source index, [(line number, record)], input bytes)`` batches of about ``batch_bytes``
    bytes, never spanning files."""
    for i, source in enumerate(sources):
        batch: list[tuple[int, bytes]] = []
        size = 0
        for line_no, record, consumed in iter_records(source, text_unit):
            batch.append((line_no, record))
            size += consumed
            if size >= batch_bytes or len(batch) >= batch_records:
                yield i, batch, size
                batch, size = [], 0
        if batch:
            yield i, batch, size


def total_input_bytes(files: list[str]) -> int | None:
    """Sum of file sizes (for the progress bar), or None if any input is compressed."""
    if any(f.endswith(".gz") for f in files):
        return None
    return sum(Path(f).stat().st_size for f in files)
