"""The scores store: a directory of shard files plus a manifest.

Layout::

    SCORES/
      manifest.json        identity (teacher, reference, dataset, tokenizer, instance parameters),
                           num_instances, shard_size, num_shards, complete, shard checksums
      shard_00000.npy      numpy structured array (:data:`SCORE_DTYPE`) of instances
      shard_00001.npy      [k*shard_size, (k+1)*shard_size) in corpus order
      metrics.jsonl        per-shard throughput (rank 0)

Atomicity and resume: each shard file is written to a temp name and renamed, so a shard file
exists only when it is complete; a killed run leaves at most temp files (removed on resume).
On restart the manifest's identity must match the new run (same checkpoints, dataset, chunking),
and only the shards without a file are scored. ``complete`` becomes true, with the SHA-256 of
every shard, only after all shards exist; readers refuse incomplete or tampered stores.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from megatron_kd.utils.io import atomic_write, read_json, sha256_file, write_json_atomic

FORMAT = "megatron-kd/miniplm-scores/v1"
MANIFEST = "manifest.json"
SCORE_DTYPE = np.dtype([
    ("instance", "<i8"),     # position in the corpus-ordered instance table
    ("doc", "<i8"),          # document index in the indexed dataset
    ("offset", "<i8"),       # first token of the instance inside the document
    ("length", "<i4"),       # tokens in the instance
    ("n_pred", "<i4"),       # predicted (scored) tokens
    ("nll_teacher", "<f8"),  # mean NLL per predicted token under the teacher (nats)
    ("nll_ref", "<f8"),      # mean NLL per predicted token under the reference model (nats)
])
# Identity keys that must match for a run to resume into an existing store.
_RESUME_KEYS = ("teacher", "reference", "dataset", "instances", "shard_size", "num_instances")


def config_hash(model_config: dict[str, Any]) -> str:
    """SHA-256 of a model config dict in canonical JSON (key order independent)."""
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()


def shard_name(index: int) -> str:
    """``shard_00012.npy``."""
    return f"shard_{index:05d}.npy"


def shard_bounds(index: int, shard_size: int, num_instances: int) -> tuple[int, int]:
    """[start, end) instance range of shard ``index``."""
    return index * shard_size, min((index + 1) * shard_size, num_instances)


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    out = {k: identity.get(k) for k in _RESUME_KEYS}
    ds = dict(out["dataset"] or {})
    ds.pop("prefix", None)  # the dataset may be read from another mount point
    ds.pop("prefix_relative", None)
    out["dataset"] = ds
    for who in ("teacher", "reference"):  # checkpoints may be moved (content: iteration + config hash)
        if isinstance(out.get(who), dict):
            out[who] = {k: v for k, v in out[who].items() if k not in ("path", "tokenizer")}
    return out


class ScoreStore:
    """Reader/writer of one scores directory (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        """``SCORES/manifest.json``."""
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any]:
        """The manifest dict (``FileNotFoundError`` if the store does not exist)."""
        return read_json(self.manifest_path, "scores manifest")

    def create_or_resume(self, identity: dict[str, Any], overwrite: bool = False) -> bool:
        """Start a store, or check that an existing one belongs to the same run (rank 0 only).

        ``identity`` holds everything of :data:`_RESUME_KEYS`. Returns True when resuming.
        Raises ``FileExistsError`` when the directory holds another run's store (one line).
        """
        if self.manifest_path.is_file() and not overwrite:
            old = self.manifest()
            if old.get("format") != FORMAT or _comparable(old) != _comparable(identity):
                diff = [k for k in _RESUME_KEYS if _comparable(old).get(k) != _comparable(identity).get(k)]
                raise FileExistsError(
                    f"scores directory {self.root} holds scores of another run (differs in {', '.join(diff)}): "
                    "pass --overwrite or another --out"
                )
            self.remove_temp_files()
            return True
        if overwrite and self.root.exists():
            for path in list(self.root.glob("shard_*.npy")) + [self.manifest_path]:
                path.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_temp_files()
        num_shards = max(1, math.ceil(identity["num_instances"] / identity["shard_size"]))
        write_json_atomic(self.manifest_path, {"format": FORMAT, **identity, "num_shards": num_shards,
                                               "complete": False, "shards": None})
        return False

    def remove_temp_files(self) -> None:
        """Delete temp files a killed writer left behind."""
        for tmp in self.root.glob(".shard_*.tmp"):
            tmp.unlink(missing_ok=True)

    def completed_shards(self, num_shards: int, shard_size: int, num_instances: int) -> set[int]:
        """Shards whose file exists and holds the right rows (a damaged file is deleted)."""
        done = set()
        for k in range(num_shards):
            path = self.root / shard_name(k)
            if not path.is_file():
                continue
            start, end = shard_bounds(k, shard_size, num_instances)
            try:
                rows = np.load(path, mmap_mode="r")
                ok = rows.dtype == SCORE_DTYPE and len(rows) == end - start and (
                    len(rows) == 0 or (rows["instance"][0] == start and rows["instance"][-1] == end - 1))
            except (ValueError, OSError, EOFError):
                ok = False
            if ok:
                done.add(k)
            else:
                path.unlink(missing_ok=True)
        return done

    def write_shard(self, index: int, rows: np.ndarray) -> None:
        """Write one shard atomically (temp file + rename)."""
        if rows.dtype != SCORE_DTYPE:
            raise TypeError(f"shard rows must have dtype SCORE_DTYPE, got {rows.dtype}")
        with atomic_write(self.root / shard_name(index), "wb") as fh:
            np.save(fh, rows, allow_pickle=False)

    def finalize(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Mark the store complete with per-shard checksums (rank 0, after all shards exist)."""
        man = self.manifest()
        missing = [k for k in range(man["num_shards"]) if not (self.root / shard_name(k)).is_file()]
        if missing:
            raise FileNotFoundError(f"scores {self.root} miss shards {missing[:5]}: rerun miniplm score to resume")
        man["shards"] = [{"name": shard_name(k), "sha256": sha256_file(self.root / shard_name(k))}
                         for k in range(man["num_shards"])]
        man["complete"] = True
        if summary:
            man["summary"] = summary
        write_json_atomic(self.manifest_path, man)
        return man

    def read(self, verify: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
        """All scores in corpus order, and the manifest. Validates completeness and checksums."""
        if not self.manifest_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a scores directory (no {MANIFEST}): run miniplm score first")
        man = self.manifest()
        if man.get("format") != FORMAT:
            raise ValueError(f"{self.manifest_path} has format {man.get('format')!r}, expected {FORMAT!r}")
        if not man.get("complete"):
            raise ValueError(f"scores {self.root} are incomplete (a run was interrupted): rerun miniplm score to resume")
        parts = []
        for entry in man["shards"]:
            path = self.root / entry["name"]
            if verify and sha256_file(path) != entry["sha256"]:
                raise ValueError(f"{path} does not match its checksum in {MANIFEST}: rerun miniplm score with --overwrite")
            parts.append(np.load(path))
        rows = np.concatenate(parts) if parts else np.empty(0, dtype=SCORE_DTYPE)
        if len(rows) != man["num_instances"] or not np.array_equal(rows["instance"], np.arange(len(rows))):
            raise ValueError(f"scores {self.root} do not cover instances 0..{man['num_instances'] - 1} exactly once")
        return rows, man
