"""Indexed-dataset access for MiniPLM: open, identify, read per-document metadata, write atomically.

Until the data branch lands (``megatron_kd.data.manifest``), this module talks to megatron-core's
``IndexedDataset``/``IndexedDatasetBuilder`` directly and understands the side files the data
pipeline writes next to a dataset prefix ``P``:

* ``P.bin`` / ``P.idx``   megatron-core indexed dataset (one sequence = one document here)
* ``P.manifest.json``     producer, tokenizer identity, counts, checksums (optional on input)
* ``P.meta.jsonl``        one JSON object per document, e.g. ``{"domain": "arxiv"}`` (optional)

Every dataset this package writes gets all four, written atomically; the manifest is written last
and carries SHA-256 checksums of ``.bin`` and ``.idx`` so a consumer can validate the pair.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from megatron_kd.utils.io import atomic_write, read_json, remove_dead_temps, sha256_file, write_json_atomic

MANIFEST_FORMAT = "megatron-kd/indexed-dataset"  # shared with megatron_kd.data.manifest
MANIFEST_SUFFIX = ".manifest.json"
META_SUFFIX = ".meta.jsonl"


def bin_path(prefix: str | Path) -> Path:
    """``prefix.bin``."""
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    """``prefix.idx``."""
    return Path(f"{prefix}.idx")


def open_dataset(prefix: str | Path):
    """The megatron-core ``IndexedDataset`` at ``prefix`` (``ds[i]``: tokens of document i).

    Prefers the data branch's ``open_indexed_dataset`` when it is installed. Raises
    ``FileNotFoundError`` naming the prefix when ``.bin``/``.idx`` are missing.
    """
    if not bin_path(prefix).is_file() or not idx_path(prefix).is_file():
        raise FileNotFoundError(
            f"indexed dataset {prefix}.bin/.idx not found: pass the prefix written by megatron-kd "
            "preprocess (the path without .bin/.idx)"
        )
    try:  # the data branch's reader validates its manifest too
        from megatron_kd.data.manifest import open_indexed_dataset  # type: ignore[import-not-found]
    except ImportError:
        open_indexed_dataset = None
    if open_indexed_dataset is not None:
        return open_indexed_dataset(str(prefix))
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix), mmap=True)


def read_dataset_manifest(prefix: str | Path) -> dict[str, Any] | None:
    """``prefix.manifest.json`` as a dict, or None when the dataset has no manifest."""
    path = Path(f"{prefix}{MANIFEST_SUFFIX}")
    return read_json(path, "dataset manifest") if path.is_file() else None


def dataset_tokenizer(manifest: dict[str, Any] | None) -> str | None:
    """The tokenizer identity/path a dataset manifest records (None when unknown)."""
    if not manifest:
        return None
    tok = manifest.get("tokenizer")
    if isinstance(tok, dict):
        return tok.get("identity") or tok.get("path")
    return tok


def dataset_tokenizer_path(manifest: dict[str, Any] | None, prefix: str | Path | None = None) -> str | None:
    """A loadable tokenizer path from a dataset manifest (None when it records none); a relative
    path is resolved against the dataset's directory when ``prefix`` is given."""
    from megatron_kd.utils.artifacts import resolve_ref

    tok = (manifest or {}).get("tokenizer")
    if isinstance(tok, dict):
        tok = tok.get("path")
    return resolve_ref(tok, Path(prefix).parent) if tok and prefix is not None else tok


def dataset_identity(prefix: str | Path, ds=None) -> dict[str, Any]:
    """What identifies a dataset's content cheaply: counts, ``.idx`` SHA-256, ``.bin`` size.

    Hashing the ``.bin`` (hundreds of GB at scale) is avoided: the ``.idx`` holds every
    document length and offset, so any re-tokenisation or reordering changes it.
    """
    ds = ds if ds is not None else open_dataset(prefix)
    lengths = np.asarray(ds.sequence_lengths)
    manifest = read_dataset_manifest(prefix)
    return {
        "prefix": str(Path(prefix).resolve()),
        "num_documents": int(len(lengths)),
        "num_tokens": int(lengths.sum(dtype=np.int64)),
        "idx_sha256": sha256_file(idx_path(prefix)),
        "bin_bytes": os.path.getsize(bin_path(prefix)),
        "tokenizer": dataset_tokenizer(manifest),
    }


def same_dataset(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two :func:`dataset_identity` dicts describe the same content (paths may differ)."""
    keys = ("num_documents", "num_tokens", "idx_sha256", "bin_bytes")
    return all(a.get(k) == b.get(k) for k in keys)


def read_doc_meta(prefix: str | Path, num_documents: int) -> list[dict[str, Any]] | None:
    """Per-document metadata from ``prefix.meta.jsonl`` (None when absent).

    Raises ``ValueError`` when the line count does not match the number of documents.
    """
    path = Path(f"{prefix}{META_SUFFIX}")
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if len(rows) != num_documents:
        raise ValueError(
            f"{path} has {len(rows)} lines but the dataset has {num_documents} documents: regenerate "
            "it with megatron-kd preprocess or delete it"
        )
    return rows


def _lookup(record: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


def doc_domains(prefix: str | Path, num_documents: int, key: str = "domain") -> np.ndarray:
    """Per-document domain names from ``.meta.jsonl`` field ``key`` (a dotted path such as
    ``meta.pile_set_name``): object array, ``"unknown"`` where missing, ``"all"`` without meta."""
    meta = read_doc_meta(prefix, num_documents)
    if meta is None:
        return np.full(num_documents, "all", dtype=object)
    values = [_lookup(m, key) for m in meta]
    return np.array(["unknown" if v is None else str(v) for v in values], dtype=object)


def check_writable(prefix: str | Path, overwrite: bool) -> None:
    """Refuse (one line) to replace an existing dataset at ``prefix`` unless ``overwrite``."""
    if not overwrite and (bin_path(prefix).exists() or idx_path(prefix).exists()):
        raise FileExistsError(f"output dataset {prefix}.bin/.idx already exists: pass --overwrite or another prefix")


class IndexedDatasetWriter:
    """Write an indexed dataset + ``.meta.jsonl`` + ``.manifest.json`` atomically.

    Tokens go to temp files beside the prefix; :meth:`close` renames ``.bin``, ``.idx`` and
    ``.meta.jsonl`` into place and writes the manifest last (the commit point a reader checks).
    On an exception nothing is left under the final names.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype, manifest: dict[str, Any] | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        # Temp files of a killed writer of this prefix (its pid is gone) are removed.
        remove_dead_temps(self.prefix.parent, f"{self.prefix.name}.tmp*", r"\.tmp(\d+)\.")
        self._tmp = Path(f"{prefix}.tmp{os.getpid()}")
        self.dtype = np.dtype(dtype)
        self._builder = IndexedDatasetBuilder(str(self._tmp) + ".bin", dtype=self.dtype.type)
        self._meta_fh = open(str(self._tmp) + META_SUFFIX, "w", encoding="utf-8")
        self.manifest = dict(manifest or {})
        self.num_documents = 0
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Append one document (1-D token array) and its metadata line."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        self._builder.add_document(tokens, [int(tokens.size)])
        self._meta_fh.write(json.dumps(meta or {}) + "\n")
        self.num_documents += 1
        self.num_tokens += int(tokens.size)

    def close(self) -> dict[str, Any]:
        """Finalize and move everything into place; return the manifest written."""
        self._builder.finalize(str(self._tmp) + ".idx")
        self._meta_fh.close()
        for suffix in (".bin", ".idx", META_SUFFIX):
            os.replace(str(self._tmp) + suffix, f"{self.prefix}{suffix}")
        self.manifest.setdefault("format", MANIFEST_FORMAT)
        self.manifest.setdefault("version", 1)
        self.manifest.update({
            "num_documents": self.num_documents,
            "num_sequences": self.num_documents,
            "num_tokens": self.num_tokens,
            "dtype": self.dtype.name,
            "checksums": {"bin": sha256_file(bin_path(self.prefix)), "idx": sha256_file(idx_path(self.prefix)),
                          "meta": sha256_file(f"{self.prefix}{META_SUFFIX}")},
        })
        write_json_atomic(f"{self.prefix}{MANIFEST_SUFFIX}", self.manifest)
        return self.manifest

    def abort(self) -> None:
        """Remove the temp files (after an error)."""
        for fh in (self._meta_fh, getattr(self._builder, "data_file", None)):
            try:  # closing flushes: on a full disk that raises too, and the temp files must still go
                if fh is not None:
                    fh.close()
            except Exception:  # noqa: BLE001 - best effort clean-up
                pass
        for suffix in (".bin", ".idx", META_SUFFIX):
            Path(str(self._tmp) + suffix).unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL atomically; return how many were written."""
    n = 0
    with atomic_write(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n
