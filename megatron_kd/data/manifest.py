"""Manifests of indexed datasets, and validated opening of megatron ``.bin``/``.idx`` pairs.

A dataset prefix ``P`` (the path without extension) owns ``P.bin``, ``P.idx``,
``P.manifest.json`` and, optionally, ``P.meta.jsonl`` (see ``docs/data.md``). Consumers call
:func:`open_indexed_dataset`, which checks the files *before* megatron-core maps them (a truncated
``.bin`` or a foreign ``.idx`` otherwise surfaces as a numpy traceback or, worse, as garbage), and
:func:`check_tokenizer`, which refuses a dataset tokenized by another tokenizer.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_FORMAT = "megatron-kd/indexed-dataset"
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER_BYTES = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + document count 8
# megatron.core.datasets.indexed_dataset.DType codes -> numpy dtypes (kept here so that validating
# a file does not import megatron-core).
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                7: np.float32, 8: np.uint16}


def dataset_paths(prefix: str | os.PathLike) -> dict[str, Path]:
    """The files of dataset ``prefix``: ``bin``, ``idx``, ``manifest``, ``meta``."""
    p = str(prefix)
    return {"bin": Path(p + ".bin"), "idx": Path(p + ".idx"),
            "manifest": Path(p + ".manifest.json"), "meta": Path(p + ".meta.jsonl")}


def _strip_ext(prefix: str | os.PathLike) -> str:
    p = str(prefix)
    for ext in (".bin", ".idx", ".manifest.json", ".meta.jsonl"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def read_idx_header(idx_path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check the header of a megatron ``.idx`` file without megatron-core.

    Returns ``{"dtype", "itemsize", "sequence_count", "document_count"}``. Raises ``ValueError``
    (one line naming the file) if it is not a version-1 megatron index or its size does not match
    the counts it declares.
    """
    path = Path(idx_path)
    if not path.is_file():
        raise FileNotFoundError(f"index file {path} does not exist: check the dataset prefix "
                                "(pass the path without .bin/.idx) or re-run preprocess")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(_IDX_HEADER_BYTES)
    if len(head) < _IDX_HEADER_BYTES or head[:9] != _IDX_MAGIC:
        raise ValueError(f"{path} is not a megatron indexed-dataset index (bad header): "
                         "re-run preprocess to rebuild it")
    (version,) = struct.unpack("<Q", head[9:17])
    code = head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if version != 1:
        raise ValueError(f"{path} has index version {version}, only version 1 is supported: "
                         "re-run preprocess to rebuild it")
    if code not in _DTYPE_CODES:
        raise ValueError(f"{path} declares an unknown token dtype code {code}: the file is corrupt, "
                         "re-run preprocess")
    expected = _IDX_HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    # Multimodal indexes append one int8 mode per sequence; text datasets never do.
    if size not in (expected, expected + n_seq):
        raise ValueError(f"{path} is {size} bytes but its header declares {n_seq} sequences and "
                         f"{n_doc} document boundaries ({expected} bytes): the file is truncated or "
                         "corrupt, re-run preprocess")
    dtype = _DTYPE_CODES[code]
    return {"dtype": np.dtype(dtype).name, "itemsize": np.dtype(dtype).itemsize,
            "sequence_count": n_seq, "document_count": n_doc, "multimodal": size != expected}


def validate_indexed_files(prefix: str | os.PathLike) -> dict[str, Any]:
    """Check that ``prefix.idx`` is a sound megatron index and ``prefix.bin`` holds exactly the
    tokens it points to. Returns the header info plus ``num_tokens`` and ``num_documents``."""
    prefix = _strip_ext(prefix)
    paths = dataset_paths(prefix)
    info = read_idx_header(paths["idx"])
    if not paths["bin"].is_file():
        raise FileNotFoundError(f"data file {paths['bin']} does not exist (its index {paths['idx']} "
                                "does): re-run preprocess or restore the .bin")
    n_seq, n_doc = info["sequence_count"], info["document_count"]
    offset = _IDX_HEADER_BYTES
    lengths = np.fromfile(paths["idx"], dtype=np.int32, count=n_seq, offset=offset)
    pointers = np.fromfile(paths["idx"], dtype=np.int64, count=n_seq, offset=offset + 4 * n_seq)
    docs = np.fromfile(paths["idx"], dtype=np.int64, count=n_doc, offset=offset + 12 * n_seq)
    num_tokens = int(lengths.sum(dtype=np.int64))
    bin_size = paths["bin"].stat().st_size
    expected_bin = num_tokens * info["itemsize"]
    if bin_size != expected_bin:
        raise ValueError(f"{paths['bin']} is {bin_size} bytes but {paths['idx']} indexes {num_tokens} "
                         f"{info['dtype']} tokens ({expected_bin} bytes): the .bin is truncated or "
                         "does not belong to this .idx, re-run preprocess")
    bad_docs = n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or np.any(np.diff(docs) < 0)
    bad_ptrs = n_seq > 0 and (pointers[0] != 0 or np.any(
        pointers[1:] != pointers[:-1] + lengths[:-1].astype(np.int64) * info["itemsize"]))
    if bad_docs or bad_ptrs or np.any(lengths < 0):
        raise ValueError(f"{paths['idx']} has inconsistent sequence pointers or document indices: "
                         "the file is corrupt, re-run preprocess")
    return {**info, "num_tokens": num_tokens, "num_documents": n_doc - 1}


def read_dataset_manifest(dataset_prefix: str | os.PathLike) -> dict[str, Any]:
    """Read ``{dataset_prefix}.manifest.json`` (``dataset_prefix`` = path without ``.bin``/``.idx``).

    Raises ``FileNotFoundError``/``ValueError`` with one line naming the file and the fix.
    """
    from megatron_kd.utils.io import read_json

    path = dataset_paths(_strip_ext(dataset_prefix))["manifest"]
    if not path.is_file():
        raise FileNotFoundError(f"dataset manifest {path} does not exist: the dataset was not written "
                                "by megatron-kd preprocess/merge-datasets (re-run preprocess on it)")
    manifest = read_json(path, "dataset manifest")
    # Other megatron-kd producers (e.g. MiniPLM's selection) may omit "format"; a different one is foreign.
    if not isinstance(manifest, dict) or manifest.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a megatron-kd dataset manifest (format != {MANIFEST_FORMAT!r}): "
                         "re-run preprocess")
    for key in ("tokenizer", "num_documents", "num_tokens", "dtype", "checksums"):
        if key not in manifest:
            raise ValueError(f"dataset manifest {path} lacks the field {key!r}: re-run preprocess")
    return manifest


def manifest_tokenizer_path(dataset_prefix: str | os.PathLike) -> str | None:
    """The tokenizer a dataset was written with, as a path that exists here (the manifest records it
    relative to the dataset's directory; older manifests, relative to the launch directory), else
    None (no manifest, or the tokenizer is not where it recorded)."""
    from megatron_kd.utils.artifacts import resolve_ref

    prefix = _strip_ext(dataset_prefix)
    path = dataset_paths(prefix)["manifest"]
    if not path.is_file():
        return None
    from megatron_kd.utils.io import read_json

    try:
        tok = read_json(path, "dataset manifest").get("tokenizer")
    except (OSError, ValueError):
        return None
    ref = tok.get("path") if isinstance(tok, dict) else None
    found = resolve_ref(ref, Path(prefix).parent)
    return found if found and Path(found).exists() else None


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, what: str = "dataset") -> None:
    """Raise a one-line ``ValueError`` if ``tokenizer`` (a :class:`Tokenizer`, or its identity
    string) is not the tokenizer that wrote ``manifest``."""
    recorded = manifest.get("tokenizer") or {}
    if isinstance(recorded, str):  # a bare identity string
        recorded = {"identity": recorded}
    identity = tokenizer if isinstance(tokenizer, str) else tokenizer.identity
    if recorded.get("identity") != identity:
        name = manifest.get("name") or manifest.get("files", {}).get("bin", what)
        current = "" if isinstance(tokenizer, str) else f" {tokenizer.path}"
        raise ValueError(
            f"{what} {name} was tokenized with {recorded.get('path', '?')} "
            f"({str(recorded.get('identity', '?'))[-12:]}) but the tokenizer{current} "
            f"is {identity[-12:]}: re-run preprocess with this tokenizer or use the original one")


def verify_checksums(dataset_prefix: str | os.PathLike) -> None:
    """Recompute the sha256 of ``.bin``/``.idx`` (and ``.meta.jsonl``) and compare with the
    manifest; raise ``ValueError`` naming the first mismatching file. Reads every byte."""
    from megatron_kd.utils.io import sha256_file

    prefix = _strip_ext(dataset_prefix)
    manifest = read_dataset_manifest(prefix)
    paths = dataset_paths(prefix)
    for key, digest in manifest["checksums"].items():
        if key in paths and sha256_file(paths[key]) != digest:
            raise ValueError(f"{paths[key]} does not match the sha256 in {paths['manifest']}: the file "
                             "changed since it was written, re-run preprocess")


def check_token_ids(prefix: str | os.PathLike, vocab_size: int, full: bool = False, samples: int = 256,
                    what: str = "dataset") -> None:
    """Raise a one-line ``ValueError`` if ``prefix.bin`` holds a token id outside ``[0, vocab_size)``.

    Default: a fast check of ``samples`` sequences spread evenly over the file (catches a foreign
    or badly corrupted ``.bin``); ``full=True`` reads every token (``--verify-data``).
    """
    prefix = _strip_ext(prefix)
    info = validate_indexed_files(prefix)
    paths = dataset_paths(prefix)
    n_seq = info["sequence_count"]
    if n_seq == 0 or info["num_tokens"] == 0:
        return
    tokens = np.memmap(paths["bin"], dtype=np.dtype(info["dtype"]), mode="r")
    if full:
        spans = [(lo, min(lo + (1 << 24), tokens.size)) for lo in range(0, tokens.size, 1 << 24)]
    else:
        lengths = np.fromfile(paths["idx"], dtype=np.int32, count=n_seq, offset=_IDX_HEADER_BYTES)
        starts = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)])
        picks = np.unique(np.linspace(0, n_seq - 1, num=min(samples, n_seq)).round().astype(np.int64))
        spans = [(int(starts[i]), int(starts[i] + lengths[i])) for i in picks]
    for lo, hi in spans:
        if hi <= lo:
            continue
        chunk = np.asarray(tokens[lo:hi])
        top, low = int(chunk.max()), int(chunk.min())
        if top >= vocab_size or low < 0:
            bad = int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0]) + lo
            if paths["manifest"].is_file():
                try:
                    verify_checksums(prefix)
                except ValueError as exc:
                    if "does not match the sha256" not in str(exc):
                        raise ValueError(f"{paths['bin']} holds token id {int(tokens[bad])} at token {bad}, "
                                         f"outside the vocabulary [0, {vocab_size}): the {what} is corrupt or was "
                                         "made with another tokenizer; re-run preprocess") from None
                    raise ValueError(f"{paths['bin']} holds token id {int(tokens[bad])} at token {bad}, outside "
                                     f"the vocabulary [0, {vocab_size}), because the {what} is corrupt: "
                                     f"{exc}") from None
            raise ValueError(f"{paths['bin']} holds token id {int(tokens[bad])} at token {bad}, outside the "
                             f"vocabulary [0, {vocab_size}): the {what} is corrupt or was made with another "
                             "tokenizer; re-run preprocess (check every token with --verify-data)")


def token_id_error(prefixes, token_id: int, vocab_size: int, what: str = "dataset") -> ValueError:
    """The one-line error for a token id outside ``[0, vocab_size)`` met while reading ``prefixes``
    (one dataset prefix or several): it names a file whose sha256 no longer matches its manifest
    (corrupt, e.g. flipped bytes) when there is one, and only otherwise blames another tokenizer."""
    if isinstance(prefixes, (str, os.PathLike)):
        prefixes = [prefixes]
    prefixes = [_strip_ext(p) for p in prefixes or []]
    for prefix in prefixes:
        try:
            verify_checksums(prefix)
        except ValueError as exc:
            if "does not match the sha256" in str(exc):
                return ValueError(f"token id {token_id} is outside the vocabulary [0, {vocab_size}) because the "
                                  f"{what} is corrupt: {exc}")
        except OSError:
            continue
    names = ", ".join(str(dataset_paths(p)["bin"]) for p in prefixes) or what
    return ValueError(f"{names} holds token id {token_id}, outside the vocabulary [0, {vocab_size}): the {what} "
                      "was made with another tokenizer (or is corrupt and has no manifest checksum); "
                      "re-run preprocess with the model's tokenizer")


def check_batch_token_ids(tokens, vocab_size: int, prefixes=None, what: str = "dataset") -> None:
    """Raise :func:`token_id_error` if the integer array/tensor ``tokens`` (a batch about to be
    embedded) holds an id outside ``[0, vocab_size)``: one ``max``/``min`` over the batch, so every
    consumer can afford it, instead of an ``IndexError`` deep in the embedding."""
    if tokens is None or getattr(tokens, "numel", lambda: getattr(tokens, "size", 0))() == 0:
        return
    top, low = int(tokens.max()), int(tokens.min())
    if top >= vocab_size or low < 0:
        raise token_id_error(prefixes, top if top >= vocab_size else low, vocab_size, what)


def open_indexed_dataset(prefix: str | os.PathLike, tokenizer: Any = None, mmap: bool = True):
    """Validate and open dataset ``prefix`` as megatron-core's ``IndexedDataset``.

    ``ds[i]`` is a numpy array with document ``i``'s tokens (one sequence per document unless
    sentence-split), ``len(ds)`` the number of sequences, ``ds.sequence_lengths`` their lengths.
    When a manifest exists its file sizes are checked too, and ``tokenizer`` (optional) must match.
    """
    prefix = _strip_ext(prefix)
    info = validate_indexed_files(prefix)
    paths = dataset_paths(prefix)
    if paths["manifest"].is_file():
        manifest = read_dataset_manifest(prefix)
        if manifest.get("num_tokens") != info["num_tokens"] or manifest.get("dtype") != info["dtype"]:
            raise ValueError(f"{paths['manifest']} records {manifest.get('num_tokens')} "
                             f"{manifest.get('dtype')} tokens but the files hold {info['num_tokens']} "
                             f"{info['dtype']} tokens: the files were replaced, re-run preprocess")
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer)
    elif tokenizer is not None:
        raise FileNotFoundError(f"dataset manifest {paths['manifest']} does not exist, so the "
                                "tokenizer cannot be checked: re-run preprocess on this data")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, multimodal=info["multimodal"], mmap=mmap)


def strip_dataset_ext(path: str | Path) -> str:
    """``path`` without a ``.bin``/``.idx`` extension (users pass either)."""
    prefix = str(path)
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            return prefix[: -len(ext)]
    return prefix
