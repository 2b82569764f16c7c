"""``miniplm split``: carve the reference model's held-out slice out of a corpus, without overlap.

Each document goes to exactly one side, decided by a keyed hash of its *tokens*:
``u = blake2b(seed || tokens) / 2**64``; ``u < holdout_fraction`` -> reference split, else main
split. Hashing the content (not the position) makes the split independent of document order and
sends exact duplicate documents to the same side, so no text of the reference set appears in the
corpus that is scored and selected. It is deterministic for a given seed; the held-out share is
``holdout_fraction`` in expectation (by documents), reported exactly in the manifests.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_kd.miniplm import dataset_io
from megatron_kd.utils.progress import progress


@dataclass
class SplitConfig:
    """Settings of ``megatron-kd miniplm split``."""

    data: str
    """Source dataset prefix."""
    out_ref: str
    """Output prefix of the held-out reference-model split."""
    out_main: str
    """Output prefix of the main split (the corpus to score and select)."""
    holdout_fraction: float = 0.05
    """Expected fraction of documents held out (the paper: 5B of 105B tokens, about 0.048)."""
    seed: int = 0
    """Hash key: another seed gives another (equally valid) split."""
    overwrite: bool = False
    """Replace existing outputs."""


def holdout_value(tokens: np.ndarray, seed: int) -> float:
    """Uniform [0, 1) value of a document from a keyed hash of its tokens (as int64 bytes)."""
    h = hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), digest_size=8,
                        key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2.0**64


def split_dataset(cfg: SplitConfig) -> dict[str, Any]:
    """Write the reference and main splits (indexed datasets + meta + manifests). Returns a summary."""
    if not 0 < cfg.holdout_fraction < 1:
        raise ValueError(f"--holdout-fraction {cfg.holdout_fraction} must be in (0, 1)")
    if Path(cfg.out_ref).resolve() == Path(cfg.out_main).resolve():
        raise ValueError("--out-ref and --out-main must be different prefixes")
    for prefix in (cfg.out_ref, cfg.out_main):
        dataset_io.check_writable(prefix, cfg.overwrite)
    ds = dataset_io.open_dataset(cfg.data)
    n = len(ds)
    src_meta = dataset_io.read_doc_meta(cfg.data, n)
    src_manifest = dataset_io.read_dataset_manifest(cfg.data) or {}
    base = {"format": "megatron-kd/indexed-dataset/v1", "produced_by": "megatron-kd miniplm split",
            "tokenizer": src_manifest.get("tokenizer"),
            "source": {"prefix": str(Path(cfg.data).resolve()),
                       "idx_sha256": dataset_io.dataset_identity(cfg.data, ds)["idx_sha256"]},
            "split": {"holdout_fraction": cfg.holdout_fraction, "seed": cfg.seed,
                      "rule": "blake2b(key=seed, int64 tokens) / 2**64 < holdout_fraction -> reference"}}
    ref = dataset_io.IndexedDatasetWriter(cfg.out_ref, ds.index.dtype, {**base, "side": "reference"})
    main = dataset_io.IndexedDatasetWriter(cfg.out_main, ds.index.dtype, {**base, "side": "main"})
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    bar = progress(int(lengths.sum()), "miniplm split", unit="tok")
    try:
        for i in range(n):
            tokens = ds[i]
            meta = {**(src_meta[i] if src_meta else {}), "source_doc": i}
            (ref if holdout_value(tokens, cfg.seed) < cfg.holdout_fraction else main).add(tokens, meta)
            bar.update(int(lengths[i]))
    except BaseException:
        ref.abort()
        main.abort()
        raise
    bar.close()
    m_ref, m_main = ref.close(), main.close()
    return {"documents": n, "reference_documents": m_ref["num_documents"], "main_documents": m_main["num_documents"],
            "reference_tokens": m_ref["num_tokens"], "main_tokens": m_main["num_tokens"],
            "reference_token_fraction": m_ref["num_tokens"] / max(int(lengths.sum()), 1)}
