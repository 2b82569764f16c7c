"""Atomic writing of one or more indexed datasets through megatron-core's ``IndexedDatasetBuilder``.

Everything is written into a hidden staging directory beside the outputs
(``.{name}.tmp-{pid}-{random}``); :meth:`StagedDatasets.commit` moves the finished files to their
final names, the manifest last, and :meth:`StagedDatasets.abort` deletes the staging directory. A
crash at any point before ``commit`` therefore leaves nothing under the final names (an old
dataset being overwritten stays intact until the new one is complete).
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from megatron_kd.data.manifest import dataset_paths
from megatron_kd.utils.io import remove_dead_temps


def check_outputs(prefixes: list[str], overwrite: bool) -> None:
    """Refuse (``FileExistsError``, one line) if any output file of ``prefixes`` exists."""
    for prefix in prefixes:
        if Path(prefix).is_dir():
            raise ValueError(f"output prefix {prefix} is a directory: pass a file prefix like {prefix}/corpus")
        if overwrite:
            continue
        for path in dataset_paths(prefix).values():
            if path.exists():
                raise FileExistsError(f"output {path} already exists: pass --overwrite to replace it "
                                      "or choose another --output-prefix")


class StagedDatasets:
    """Builders for several datasets (e.g. one per JSON key) staged in one temp directory."""

    def __init__(self, prefixes: list[str], dtype: Any, with_meta: bool):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefixes = [str(p) for p in prefixes]
        out_dir = Path(self.prefixes[0]).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        name = Path(self.prefixes[0]).name
        # Staging directories of killed runs (their pid is gone) are removed, never reused half-written.
        remove_dead_temps(out_dir, f".{name}.tmp-*", r"\.tmp-(\d+)-")
        self.tmp_dir = out_dir / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp_dir.mkdir()
        self.dtype = np.dtype(dtype)
        self.staged = {p: dataset_paths(self.tmp_dir / Path(p).name) for p in self.prefixes}
        self.builders = {p: IndexedDatasetBuilder(str(self.staged[p]["bin"]), dtype=self.dtype.type)
                         for p in self.prefixes}
        self.bin_sha = {p: hashlib.sha256() for p in self.prefixes}
        self.meta_fh = {p: open(self.staged[p]["meta"], "wb") for p in self.prefixes} if with_meta else {}
        self.meta_sha = {p: hashlib.sha256() for p in self.meta_fh}

    def add_documents(self, prefix: str, tokens: np.ndarray, seq_lengths: np.ndarray,
                      doc_seqs: np.ndarray) -> None:
        """Append documents: ``tokens`` concatenated, ``seq_lengths`` per sequence,
        ``doc_seqs`` = number of sequences of each document (1 unless sentence-split)."""
        builder = self.builders[prefix]
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.bin_sha[prefix].update(tokens.tobytes())
        tok_pos = seq_pos = 0
        for n in doc_seqs.tolist():
            lens = seq_lengths[seq_pos: seq_pos + n]
            n_tok = int(lens.sum())
            builder.add_document(tokens[tok_pos: tok_pos + n_tok], lens.tolist())
            tok_pos += n_tok
            seq_pos += n

    def add_index(self, prefix: str, source_prefix: str) -> None:
        """Append a whole existing dataset (same dtype) with megatron's ``add_index``."""
        builder = self.builders[prefix]
        src_bin = dataset_paths(source_prefix)["bin"]
        with open(src_bin, "rb") as fh:
            while block := fh.read(1 << 22):
                self.bin_sha[prefix].update(block)
        builder.add_index(str(source_prefix))

    def add_meta(self, prefix: str, lines: bytes) -> None:
        """Append serialized metadata lines (one per document, already newline-terminated)."""
        self.meta_fh[prefix].write(lines)
        self.meta_sha[prefix].update(lines)

    def finalize(self) -> dict[str, dict[str, Any]]:
        """Write every ``.idx``; return per prefix the checksums and the file sizes."""
        from megatron_kd.utils.io import sha256_file

        out = {}
        for p in self.prefixes:
            staged = self.staged[p]
            self.builders[p].finalize(str(staged["idx"]))
            checksums = {"bin": self.bin_sha[p].hexdigest(), "idx": sha256_file(staged["idx"])}
            sizes = {"bin": staged["bin"].stat().st_size, "idx": staged["idx"].stat().st_size}
            if p in self.meta_fh:
                self.meta_fh[p].close()
                checksums["meta"] = self.meta_sha[p].hexdigest()
                sizes["meta"] = staged["meta"].stat().st_size
            for kind in ("bin", "idx", "meta"):
                if staged[kind].exists():  # durable before the rename makes them visible
                    with open(staged[kind], "rb+") as fh:
                        os.fsync(fh.fileno())
            out[p] = {"checksums": checksums, "sizes": sizes}
        return out

    def commit(self, manifests: dict[str, dict[str, Any]]) -> None:
        """Write each manifest and move all files to their final names (manifests last)."""
        from megatron_kd.utils.io import write_json_atomic

        for p in self.prefixes:
            write_json_atomic(self.staged[p]["manifest"], manifests[p])
        for p in self.prefixes:
            final = dataset_paths(p)
            for kind in ("bin", "idx", "meta"):
                if self.staged[p][kind].exists():
                    os.replace(self.staged[p][kind], final[kind])
                elif final[kind].exists():  # stale side file of an overwritten dataset
                    final[kind].unlink()
        for p in self.prefixes:
            os.replace(self.staged[p]["manifest"], dataset_paths(p)["manifest"])
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def abort(self) -> None:
        """Close everything and delete the staging directory (nothing reaches the final names)."""
        handles = [*self.meta_fh.values(), *(getattr(b, "data_file", None) for b in self.builders.values())]
        for fh in handles:
            try:  # closing flushes, which fails again on a full disk: the staging directory must still go
                if fh is not None:
                    fh.close()
            except Exception:  # noqa: BLE001 - best effort during cleanup
                pass
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
