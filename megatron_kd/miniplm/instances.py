"""Instances: the units MiniPLM scores and selects, cut from an indexed dataset's document lengths.

Two granularities:

* ``chunk`` (default, as in the paper): every document is cut into consecutive, non-overlapping
  chunks of ``chunk_length`` tokens (the last chunk of a document may be shorter). Chunks never
  cross a document boundary.
* ``document``: an instance is a whole document. A document longer than ``chunk_length`` is
  scored in consecutive ``chunk_length`` windows (each window starts without context) and its
  score is the token-weighted mean over all windows.

Token counting: a window of L tokens is fed to the models as its first L-1 tokens and yields L-1
predictions (token t+1 from tokens 0..t); its first token is never predicted because nothing
before it is in the window. Instances shorter than ``min_length`` tokens (default 2 = at least one
prediction) are not instances: they are skipped and counted in the report. Pass
``--chunk-length 1025`` to reproduce the paper exactly (1025-token chunks = 1024 predictions).
"""
from __future__ import annotations

import numpy as np

INSTANCE_DTYPE = np.dtype([("doc", "<i8"), ("offset", "<i8"), ("length", "<i4")])
"""One instance: document index, first token's offset inside the document, number of tokens."""

MODES = ("chunk", "document")


def validate_instance_args(chunk_length: int, mode: str, min_length: int) -> None:
    """Raise ``ValueError`` (one line) for unusable instance parameters."""
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    if chunk_length < 2:
        raise ValueError(f"--chunk-length {chunk_length} must be >= 2 (one context token + one prediction)")
    if not 2 <= min_length <= chunk_length:
        raise ValueError(f"--min-length {min_length} must be between 2 and --chunk-length {chunk_length}")


def _chunk_table(lengths: np.ndarray, chunk_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, offset, length) of every chunk of every document, vectorised (no Python loop)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = -(-lengths // chunk_length)  # ceil; 0 for empty documents
    docs = np.repeat(np.arange(len(lengths), dtype=np.int64), counts)
    starts = np.cumsum(counts) - counts
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
    offsets = within * chunk_length
    lens = np.minimum(chunk_length, lengths[docs] - offsets)
    return docs, offsets, lens


def split_instances(lengths: np.ndarray, chunk_length: int = 1024, mode: str = "chunk",
                    min_length: int = 2) -> np.ndarray:
    """The instance table (structured array of :data:`INSTANCE_DTYPE`) in corpus order.

    ``lengths``: tokens per document (``IndexedDataset.sequence_lengths``). Instances are ordered
    by (document, offset), so instance ids are stable for a given dataset and parameters.
    """
    validate_instance_args(chunk_length, mode, min_length)
    lengths = np.asarray(lengths, dtype=np.int64)
    if mode == "chunk":
        docs, offsets, lens = _chunk_table(lengths, chunk_length)
    else:
        docs = np.arange(len(lengths), dtype=np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        lens = lengths
    keep = lens >= min_length
    out = np.empty(int(keep.sum()), dtype=INSTANCE_DTYPE)
    out["doc"], out["offset"], out["length"] = docs[keep], offsets[keep], lens[keep]
    return out


def scoring_windows(instances: np.ndarray, chunk_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows the models actually see, and which instance each belongs to.

    Returns ``(windows, owner)``: ``windows`` is an :data:`INSTANCE_DTYPE` array of pieces of at
    most ``chunk_length`` tokens; ``owner[i]`` is the position in ``instances`` of window i's
    instance. In chunk mode this is the identity; in document mode long documents get several
    windows (a trailing piece shorter than 2 tokens has no prediction and is dropped).
    """
    docs, rel, lens = _chunk_table(instances["length"], chunk_length)
    keep = lens >= 2
    owner = docs[keep]
    windows = np.empty(len(owner), dtype=INSTANCE_DTYPE)
    windows["doc"] = instances["doc"][owner]
    windows["offset"] = instances["offset"][owner] + rel[keep]
    windows["length"] = lens[keep]
    return windows, owner


def skipped_tokens(lengths: np.ndarray, instances: np.ndarray) -> int:
    """Tokens of the corpus that belong to no instance (too-short tails or documents)."""
    return int(np.asarray(lengths, dtype=np.int64).sum() - instances["length"].astype(np.int64).sum())
