"""``miniplm select``: keep the top-alpha instances by difference score, in corpus order.

r(x) = nll_ref(x) - nll_teacher(x) = mean-token log p_teacher(x) - mean-token log p_ref(x).
The number kept is k = floor(alpha * N) with alpha taken as the decimal number written
(``Fraction(str(alpha))``, so 0.57 * 100 keeps 57, not 56 from binary rounding). Ties in r
are broken by corpus position (earlier instance first), so the selection is deterministic.

Outputs for ``--out PREFIX``: ``PREFIX.bin/.idx`` (same dtype and tokenizer as the source),
``PREFIX.meta.jsonl`` (per output document: source document, offset, length, domain),
``PREFIX.manifest.json``, ``PREFIX.report.json`` + ``PREFIX.report.png`` and, with
``--export-text``, ``PREFIX.jsonl``. Kept instances that are adjacent pieces of the same source
document are written as one output document (their text is contiguous); a gap (a dropped chunk)
starts a new output document.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from megatron_kd.miniplm import dataset_io
from megatron_kd.miniplm.export import auto_sources, export_text, needs_tokenizer
from megatron_kd.miniplm.report import build_report, plot_report
from megatron_kd.miniplm.store import ScoreStore
from megatron_kd.utils.artifacts import resolve_ref
from megatron_kd.utils.io import write_json_atomic
from megatron_kd.utils.progress import progress


@dataclass
class SelectConfig:
    """Settings of ``megatron-kd miniplm select``."""

    scores: str
    """Scores directory written by ``miniplm score`` (must be complete)."""
    alpha: float = 0.5
    """Fraction of instances to keep (0 < alpha <= 1); k = floor(alpha * N)."""
    out: str = ""
    """Output prefix of the refined dataset and its side files."""
    data: str | None = None
    """Source dataset prefix; default: the one recorded in the scores manifest (checked by checksum)."""
    export_text: bool = False
    """Also write the kept text as ``PREFIX.jsonl`` (for students with another tokenizer)."""
    source_jsonl: str | None = None
    """Original JSONL (non-blank line i = document i): whole kept documents are copied verbatim.
    Default: the sources ``preprocess`` recorded (manifest ``sources`` + ``.meta.jsonl`` lines)."""
    json_key: str = "text"
    """Text field of ``source_jsonl`` records."""
    tokenizer: str | None = None
    """Tokenizer to detokenise kept chunks (default: the one recorded with the scores)."""
    domain_key: str = "domain"
    """Field of ``.meta.jsonl`` naming an instance's domain (dotted path, e.g. ``meta.pile_set_name``)."""
    merge_adjacent: bool = True
    """Write adjacent kept pieces of one document as one output document."""
    histogram_bins: int = 50
    """Bins of the score histogram in the report."""
    overwrite: bool = False
    """Replace existing outputs at ``out``."""


def num_to_keep(n: int, alpha: float) -> int:
    """k = floor(alpha * n), with alpha read as its decimal representation (no float round-off)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"--alpha {alpha} must be in (0, 1]")
    return math.floor(Fraction(str(alpha)) * n)


def difference_scores(rows: np.ndarray) -> np.ndarray:
    """r = nll_ref - nll_teacher per instance (float64)."""
    return rows["nll_ref"].astype(np.float64) - rows["nll_teacher"].astype(np.float64)


def top_fraction(r: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean keep-mask of the floor(alpha*N) highest r; ties go to the earlier instance."""
    if np.isnan(r).any():
        raise ValueError("scores contain NaN (an instance without predictions?): rescore with --min-length >= 2")
    n = len(r)
    k = num_to_keep(n, alpha)
    order = np.lexsort((np.arange(n), -r))  # primary: r descending; secondary: position ascending
    keep = np.zeros(n, dtype=bool)
    keep[order[:k]] = True
    return keep


def merge_pieces(doc: np.ndarray, offset: np.ndarray, length: np.ndarray, merge: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Join kept instances (corpus order) that are contiguous pieces of one document.

    Returns ``(doc, offset, length, first)``: per output document its source document, start,
    token count and the index (into the inputs) of its first instance.
    """
    n = len(doc)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e, e
    new = np.ones(n, dtype=bool)
    if merge:
        new[1:] = (doc[1:] != doc[:-1]) | (offset[1:] != offset[:-1] + length[:-1])
    first = np.flatnonzero(new)
    lens = np.add.reduceat(length.astype(np.int64), first)
    return doc[first].astype(np.int64), offset[first].astype(np.int64), lens, first


def _load_tokenizer(ref: str | None):
    if not ref:
        raise ValueError("--export-text must detokenise chunks but no tokenizer is known: pass --tokenizer "
                         "(or --source-jsonl with whole-document instances)")
    try:
        from megatron_kd.data.tokenizers import load_tokenizer  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError("--export-text needs megatron_kd.data.tokenizers to detokenise; it is not installed") from None
    try:
        return load_tokenizer(ref)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--export-text cannot load the tokenizer {ref!r} ({exc}): pass --tokenizer") from None


def select_corpus(cfg: SelectConfig, tokenizer=None) -> dict[str, Any]:
    """Select the top-alpha instances of a scored corpus and write the refined dataset.

    ``tokenizer``: an object with ``decode(list[int]) -> str`` (and optionally ``eod``) used by
    ``--export-text``; default loads ``cfg.tokenizer`` or the scores' tokenizer. Returns the report.
    """
    if not cfg.out:
        raise ValueError("--out is required: the output dataset prefix")
    dataset_io.check_writable(cfg.out, cfg.overwrite)
    if cfg.source_jsonl and not Path(cfg.source_jsonl).is_file():
        raise FileNotFoundError(f"--source-jsonl {cfg.source_jsonl} does not exist")
    rows, man = ScoreStore(cfg.scores).read()
    data = cfg.data or resolve_ref(man["dataset"].get("prefix_relative"), cfg.scores) or man["dataset"]["prefix"]
    if not cfg.data and not Path(data + ".idx").is_file() and Path(man["dataset"]["prefix"] + ".idx").is_file():
        data = man["dataset"]["prefix"]
    ds = dataset_io.open_dataset(data)
    if not dataset_io.same_dataset(dataset_io.dataset_identity(data, ds), man["dataset"]):
        raise ValueError(f"dataset {data} is not the one {cfg.scores} was scored on (checksum differs): pass --data")
    r = difference_scores(rows)
    keep = top_fraction(r, cfg.alpha)
    kept = rows[keep]
    p_doc, p_off, p_len, p_first = merge_pieces(kept["doc"], kept["offset"], kept["length"], cfg.merge_adjacent)
    doc_lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_meta = dataset_io.read_doc_meta(data, len(doc_lengths))
    src_manifest = dataset_io.read_dataset_manifest(data) or {}
    auto = None if cfg.source_jsonl else auto_sources(src_manifest, doc_meta)
    if cfg.export_text and tokenizer is None and needs_tokenizer(p_doc, p_off, p_len, doc_lengths,
                                                                 bool(cfg.source_jsonl or auto)):
        tokenizer = _load_tokenizer(cfg.tokenizer or man.get("tokenizer")
                                    or dataset_io.dataset_tokenizer_path(src_manifest, data))
    domains = dataset_io.doc_domains(data, len(doc_lengths), cfg.domain_key)
    manifest = {
        "format": dataset_io.MANIFEST_FORMAT, "version": 1, "produced_by": "megatron-kd miniplm select",
        "tokenizer": src_manifest.get("tokenizer") or man.get("tokenizer"),
        "source": {"prefix": str(Path(data).resolve()), "idx_sha256": man["dataset"]["idx_sha256"]},
        "sources": src_manifest.get("sources"),  # the meta lines' "file" indexes refer to these
        "selection": {"alpha": cfg.alpha, "num_instances": int(len(rows)), "kept_instances": int(keep.sum()),
                      "rounding": "floor(alpha * N)", "scores": str(Path(cfg.scores).resolve()),
                      "teacher": man["teacher"]["path"], "reference": man["reference"]["path"]},
    }
    bar = progress(int(p_len.sum()), "miniplm select", unit="tok")
    with dataset_io.IndexedDatasetWriter(cfg.out, ds.index.dtype, manifest) as writer:
        for d, o, n, f in zip(p_doc, p_off, p_len, p_first):
            bar.update(int(n))
            tokens = ds.get(int(d), offset=int(o), length=int(n))
            src = {k: doc_meta[d][k] for k in ("file", "line") if doc_meta and k in doc_meta[d]}
            writer.add(tokens, {"source_doc": int(d), "offset": int(o), "length": int(n),
                                "domain": str(domains[d]), "first_instance": int(kept["instance"][f]), **src})
    bar.close()
    if cfg.export_text:
        export_text(f"{cfg.out}.jsonl", ds, p_doc, p_off, p_len, doc_lengths, domains,
                    tokenizer, cfg.source_jsonl, cfg.json_key, auto, doc_meta)
    report = build_report(rows, r, keep, domains[rows["doc"]], cfg.alpha, cfg.histogram_bins)
    report["output"] = {"prefix": str(Path(cfg.out).resolve()), "documents": int(len(p_doc)),
                        "tokens": int(p_len.sum()), "text_jsonl": f"{cfg.out}.jsonl" if cfg.export_text else None}
    write_json_atomic(f"{cfg.out}.report.json", report)
    plot_report(report, f"{cfg.out}.report.png")
    return report
