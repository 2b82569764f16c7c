"""Store layout, manifest and the identities (teacher, dataset, tokenizer) a store is bound to.

Store directory::

    STORE/
      manifest.json           format, settings, identities, shard table (+ checksums), stats
      documents.npy           int64 [num_documents + 1]: first token of each document (cumsum)
      shards/shard_00000.kdl  bit-packed shard files (:mod:`megatron_kd.logits.shard`)
      shards/shard_00000.json per-shard record, written after the shard (its completion marker)
      shards/shard_00000.labels.npy  float32 [shard tokens]: the teacher's log-prob of the actual next
                              token at every position (NaN: no target), with ``--label-logprobs`` only
      metrics.jsonl           per-shard throughput of the run(s) that wrote it

``manifest.json`` is written when a run starts (``complete: false``, settings + identities: a
resumed run must match them) and rewritten with the shard table when every shard exists.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megatron_kd.utils.io import read_json, sha256_file

FORMAT = "megatron-kd/logits-store"
VERSION = 1
MANIFEST = "manifest.json"
DOCUMENTS = "documents.npy"
SHARDS = "shards"
SETTING_KEYS = ("encoding", "vocab_size", "id_bits", "value_step", "top_p", "top_k", "seq_length", "overlap",
                "shard_tokens", "method", "num_samples", "proposal_temperature", "seed", "audit_fraction",
                "label_logprobs")
SETTING_DEFAULTS = {"method": "topk", "seed": None, "audit_fraction": 0.0, "label_logprobs": False}
"""Values of settings that stores written before they existed implicitly had."""


def shard_file(store: str | Path, index: int) -> Path:
    """Path of shard ``index``'s data file."""
    return Path(store) / SHARDS / f"shard_{index:05d}.kdl"


def audit_file(store: str | Path, index: int) -> Path:
    """Path of shard ``index``'s audit sample (dense teacher log-probs of a few positions)."""
    return Path(store) / SHARDS / f"shard_{index:05d}.audit.npz"


def labels_file(store: str | Path, index: int) -> Path:
    """Path of shard ``index``'s label log-probs (``--label-logprobs``)."""
    return Path(store) / SHARDS / f"shard_{index:05d}.labels.npy"


def shard_record_file(store: str | Path, index: int) -> Path:
    """Path of shard ``index``'s record (exists only once the shard is complete)."""
    return Path(store) / SHARDS / f"shard_{index:05d}.json"


def strip_dataset_prefix(prefix: str | Path) -> str:
    """``prefix`` without a ``.bin``/``.idx``/``.manifest.json`` suffix."""
    p = str(prefix)
    for ext in (".bin", ".idx", ".manifest.json"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def dataset_identity(prefix: str | Path) -> dict[str, Any]:
    """What binds a store to an indexed dataset: sha256 of the ``.idx`` (document lengths and
    pointers), size of the ``.bin``, and, when ``{prefix}.manifest.json`` exists (written by
    ``megatron-kd preprocess``), its ``.bin`` sha256 and tokenizer identity."""
    prefix = strip_dataset_prefix(prefix)
    idx, binf = Path(prefix + ".idx"), Path(prefix + ".bin")
    for f in (idx, binf):
        if not f.is_file():
            raise FileNotFoundError(f"dataset file {f} does not exist: pass --data as the indexed dataset prefix "
                                    "(the path without .bin/.idx)")
    ident: dict[str, Any] = {"prefix": str(Path(prefix).resolve()), "idx_sha256": sha256_file(idx),
                             "bin_bytes": binf.stat().st_size, "bin_sha256": None, "tokenizer": None}
    man_path = Path(prefix + ".manifest.json")
    if man_path.is_file():
        man = read_json(man_path, "dataset manifest")
        sums = man.get("checksums") or {}
        ident["bin_sha256"] = sums.get("bin")
        tok = man.get("tokenizer")
        if isinstance(tok, dict):
            ident["tokenizer"] = {"identity": tok.get("identity"), "path": tok.get("path")}
        elif isinstance(tok, str):
            ident["tokenizer"] = {"identity": tok, "path": None}
    return ident


def tokenizer_identity(tokenizer: Any) -> str | None:
    """Identity string of a tokenizer object (``.identity``), a dict (``["identity"]``) or a string."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str):
        return tokenizer
    if isinstance(tokenizer, dict):
        return tokenizer.get("identity")
    return getattr(tokenizer, "identity", None)


def teacher_identity(ckpt_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Teacher checkpoint, iteration, sha256 of its ``meta.json`` and its model config."""
    path = Path(meta["path"]) / "meta.json"
    if not path.is_file():  # a Hugging Face model directory used as the teacher: its config.json
        path = Path(meta["path"]) / "config.json"
    return {"checkpoint": str(Path(ckpt_dir).resolve()), "iteration": meta.get("iteration"),
            "meta_sha256": sha256_file(path), "model_config": meta.get("model_config"),
            "tokenizer": meta.get("tokenizer")}


def describe(ident: dict[str, Any] | None) -> str:
    """Short fingerprint of an identity dict for error messages."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_resume(existing: dict[str, Any], new: dict[str, Any], store: Path) -> None:
    """Raise a one-line ``ValueError`` if ``store`` was started with other settings or inputs."""
    for key in SETTING_KEYS:
        old_v = existing["settings"].get(key, SETTING_DEFAULTS.get(key))
        new_v = new["settings"].get(key, SETTING_DEFAULTS.get(key))
        if key == "seed" and existing["settings"].get("method", "topk") == "topk" and not existing["settings"].get(
                "audit_fraction"):
            continue  # the seed does not change a top-k store without audit sample
        if old_v != new_v:
            raise ValueError(f"logits store {store} was started with {key}={old_v} but this "
                             f"run asks for {key}={new_v}: use a new --out or the original settings")
    old_t, new_t = existing["teacher"], new["teacher"]
    if (old_t.get("meta_sha256"), old_t.get("iteration")) != (new_t.get("meta_sha256"), new_t.get("iteration")):
        raise ValueError(f"logits store {store} was started with teacher {old_t.get('checkpoint')} (iteration "
                         f"{old_t.get('iteration')}) but this run uses {new_t.get('checkpoint')} (iteration "
                         f"{new_t.get('iteration')}): use a new --out or the original teacher")
    old_d, new_d = existing["dataset"], new["dataset"]
    if (old_d["idx_sha256"], old_d["bin_bytes"]) != (new_d["idx_sha256"], new_d["bin_bytes"]):
        raise ValueError(f"logits store {store} was started on dataset {old_d['prefix']} but {new_d['prefix']} "
                         "differs from it: use a new --out or the original dataset")


def read_store_manifest(store: str | Path, require_complete: bool = True) -> dict[str, Any]:
    """Read and check ``STORE/manifest.json``; one-line errors name the store and the fix."""
    store = Path(store)
    path = store / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{store} is not a teacher-logits store (no {MANIFEST}): create it with "
                                "megatron-kd logits --teacher CKPT --data PREFIX --out STORE")
    man = read_json(path, "logits store manifest")
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise ValueError(f"{path} is not a megatron-kd logits-store manifest (format != {FORMAT!r})")
    if man.get("version") != VERSION:
        raise ValueError(f"logits store {store} has format version {man.get('version')}, this code reads "
                         f"version {VERSION}: recompute the store with this version")
    if require_complete and not man.get("complete"):
        raise ValueError(f"logits store {store} is incomplete: re-run megatron-kd logits with the same "
                         "arguments to finish it")
    return man
