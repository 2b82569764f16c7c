"""Writing a logits store's files during a precompute pass: encoded chunks, label log-probs, audit
samples, the shard record that marks a shard complete, the final manifest and the byte-offset key."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_kd.logits import codec, manifest as mf
from megatron_kd.logits.precompute_config import PrecomputeConfig
from megatron_kd.logits.selection import Selection
from megatron_kd.logits.shard import ShardWriter
from megatron_kd.logits.windows import MicroBatch
from megatron_kd.utils.io import read_json, write_json_atomic


@dataclass
class StoreRun:
    """One store of a teacher pass: its settings, header and the shard being written."""

    cfg: PrecomputeConfig
    header: dict[str, Any]
    layout: codec.Layout
    writer: Optional[ShardWriter] = None
    audit: list = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.cfg.out)


def write_chunk(writer: ShardWriter, result: Selection, mb: MicroBatch, token_lo: np.ndarray, layout: codec.Layout,
                 audit: list):
    seg_len = np.array([w.end - w.emit for w in mb.windows], dtype=np.int64)
    starts = np.array([token_lo[w.doc] + w.emit for w in mb.windows], dtype=np.int64)
    writer.add(codec.encode(result.counts, result.ids, result.logprobs, seg_len, layout.id_bits, layout.value_step,
                            draws=result.draws, layout=layout), starts, seg_len)
    if len(result.audit_positions):
        audit.append((result.audit_positions, result.audit_logprobs))


def put_labels(labels: np.ndarray, lps: np.ndarray, mb: MicroBatch, token_lo: np.ndarray) -> None:
    """Scatter one micro-batch's label log-probs (emitted positions, window order) into the shard's array."""
    at = 0
    for w in mb.windows:
        n = w.end - w.emit
        lo = token_lo[w.doc] + w.emit
        labels[lo:lo + n] = lps[at:at + n]
        at += n


def save_labels(store: Path, index: int, labels: np.ndarray) -> dict[str, Any]:
    """Write shard ``index``'s label log-probs atomically; returns its record keys."""
    from megatron_kd.utils.io import sha256_file

    path = mf.labels_file(store, index)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, labels.astype(np.float32))
    tmp.replace(path)
    return {"labels_file": path.name, "labels_sha256": sha256_file(path)}


def finish_shard(run: StoreRun, i: int, lo: int, hi: int, doc_start: np.ndarray,
                  labels: np.ndarray | None) -> None:
    """Close store ``run``'s shard ``i``: audit sample, label log-probs, then the record (its completion marker)."""
    audit_info = write_audit(run.path, i, run.audit) if run.cfg.audit_fraction > 0 else {}
    label_info = save_labels(run.path, i, labels) if labels is not None else {}
    info = run.writer.close()
    hist = np.bincount(np.asarray(run.writer.count), minlength=1)
    write_json_atomic(mf.shard_record_file(run.path, i), {
        "index": i, "file": mf.shard_file(run.path, i).name, "doc_lo": lo, "doc_hi": hi,
        "token_lo": int(doc_start[lo]), "token_hi": int(doc_start[hi]), **info,
        "count_histogram": hist.tolist(), **audit_info, **label_info})
    run.writer = None


def write_byte_key(cfg: PrecomputeConfig, meta: dict) -> None:
    """The byte-offset key (megatron_kd.logits.byte_key) when the data's tokenizer has byte spans."""
    from megatron_kd.interop.convert import checkpoint_tokenizer
    from megatron_kd.logits.byte_key import byte_table, default_key_tokenizer, write_byte_key

    if cfg.byte_key_tokenizer == "none":
        return
    tok = cfg.byte_key_tokenizer or default_key_tokenizer(cfg.data, checkpoint_tokenizer(cfg.teacher, meta,
                                                                                              cfg.tokenizer))
    if tok is None:
        return
    if cfg.byte_key_tokenizer:
        write_byte_key(cfg.out, cfg.data, tok)
        return
    try:
        byte_table(tok, "the data's")
        write_byte_key(cfg.out, cfg.data, tok)
    except (ValueError, OSError) as exc:  # auto: the store still serves the teacher's tokenizer
        print(f"megatron-kd logits: no byte-offset key ({str(exc).splitlines()[0]})", flush=True)


def write_audit(store: Path, index: int, audit: list) -> dict[str, Any]:
    """Write shard ``index``'s audit sample (positions + dense teacher log-probs); returns its record keys."""
    from megatron_kd.utils.io import sha256_file

    pos = np.concatenate([a[0] for a in audit]) if audit else np.zeros(0, np.int64)
    lps = np.concatenate([a[1] for a in audit]) if audit else np.zeros((0, 0), np.float32)
    order = np.argsort(pos, kind="stable")
    path = mf.audit_file(store, index)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, positions=pos[order], logprobs=lps[order].astype(np.float32))
    tmp.replace(path)
    return {"audit_file": path.name, "audit_positions": int(len(pos)), "audit_sha256": sha256_file(path)}


def finalize_manifest(store: str | Path) -> dict[str, Any]:
    """Fold the shard records into ``manifest.json`` (``complete: true``) with store statistics."""
    from megatron_kd.utils.io import sha256_file

    store = Path(store)
    man = mf.read_store_manifest(store, require_complete=False)
    recs = [read_json(mf.shard_record_file(store, i), "shard record") for i in range(man["num_shards"])]
    hist = np.zeros(256, dtype=np.int64)
    for r in recs:
        hist[: len(r["count_histogram"])] += r["count_histogram"]
    entries = sum(r["entries"] for r in recs)
    targets = sum(r["targets"] for r in recs)
    data_bytes = sum(r["bytes"] for r in recs)
    man.update(complete=True, shards=[{k: v for k, v in r.items() if k != "count_histogram"} for r in recs],
               documents_sha256=sha256_file(store / mf.DOCUMENTS),
               stats={"positions": man["num_tokens"], "targets": targets, "entries": entries,
                      "mean_entries_per_target": entries / max(targets, 1), "bytes": data_bytes,
                      "bytes_per_target": data_bytes / max(targets, 1), "bytes_per_entry": data_bytes / max(entries, 1),
                      "count_histogram": np.trim_zeros(hist, "b").tolist()})
    write_json_atomic(store / mf.MANIFEST, man)
    return man
