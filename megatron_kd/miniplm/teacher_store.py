"""The teacher's NLL of MiniPLM scoring windows, read from a logits store instead of a teacher forward.

A store written with ``megatron-kd logits --label-logprobs`` keeps, per dataset position ``(d, o)``,
the teacher's log-prob of token ``o + 1`` of ``d`` given the tokens of its window from the window's
start. With ``--overlap 0`` the store's windows start at ``0, S, 2S, ...`` of every document
(``S = --seq-length``), exactly where MiniPLM's chunks of ``chunk_length = S`` tokens start; a chunk
of ``L`` tokens predicts positions ``offset .. offset + L - 2`` from the same context as the store's
window. So the teacher side of ``miniplm score`` is a sum over stored positions, and one teacher
pass serves both the offline-KD store and MiniPLM (the reference model still runs: it is small).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def check_teacher_store(store: str | Path, teacher_identity: dict[str, Any], dataset_identity: dict[str, Any],
                        chunk_length: int | None) -> dict[str, Any]:
    """The store's manifest if it can stand in for the teacher; one-line ``ValueError`` otherwise.

    ``teacher_identity`` / ``dataset_identity``: :func:`megatron_kd.logits.manifest.teacher_identity` /
    ``dataset_identity`` of the run's ``--teacher`` and ``--data``; ``chunk_length`` None = take the
    store's window.
    """
    from megatron_kd.logits import manifest as mf

    man = mf.read_store_manifest(store)  # complete, right format (its own one-line errors)
    st = man["settings"]
    fix = f"write it with `megatron-kd logits --label-logprobs --overlap 0 --seq-length {chunk_length or 'L'}`"
    if not st.get("label_logprobs"):
        raise ValueError(f"--teacher-store {store} holds no label log-probs: {fix}, or drop --teacher-store")
    if st.get("overlap", 0) != 0:
        raise ValueError(f"--teacher-store {store} has overlapping windows (overlap {st['overlap']}), so its "
                         f"contexts differ from MiniPLM's chunks: {fix}")
    if chunk_length is not None and st["seq_length"] != chunk_length:
        raise ValueError(f"--teacher-store {store} has windows of {st['seq_length']} tokens but --chunk-length is "
                         f"{chunk_length}: pass --chunk-length {st['seq_length']} or {fix}")
    t = man["teacher"]
    if (t.get("meta_sha256"), t.get("iteration")) != (teacher_identity.get("meta_sha256"),
                                                      teacher_identity.get("iteration")):
        raise ValueError(f"--teacher-store {store} was written by teacher {t.get('checkpoint')} (iteration "
                         f"{t.get('iteration')}), not --teacher {teacher_identity.get('checkpoint')}: pass that "
                         "teacher or a store of this one")
    d = man["dataset"]
    if (d["idx_sha256"], d["bin_bytes"]) != (dataset_identity["idx_sha256"], dataset_identity["bin_bytes"]):
        raise ValueError(f"--teacher-store {store} covers dataset {d['prefix']}, which differs from --data "
                         f"{dataset_identity['prefix']}: pass the store of this dataset")
    for rec in man["shards"]:
        if not rec.get("labels_file"):
            raise ValueError(f"--teacher-store {store}: shard {rec['index']} has no label log-probs: {fix}")
    return man


class StoreTeacherNLL:
    """Sums of the teacher's NLL over MiniPLM scoring windows, from a store's label log-probs."""

    def __init__(self, store: str | Path, manifest: dict[str, Any]):
        from megatron_kd.logits import manifest as mf

        self.root = Path(store)
        self.doc_start = np.load(self.root / mf.DOCUMENTS)
        self.shards = sorted(manifest["shards"], key=lambda r: r["token_lo"])
        self.token_lo = np.array([r["token_lo"] for r in self.shards], dtype=np.int64)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _prefix_sums(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard ``k``'s prefix sums of the NLL (float64) and of the positions without a target."""
        if self._cached is None or self._cached[0] != k:
            lp = np.load(self.root / "shards" / self.shards[k]["labels_file"])
            missing = np.isnan(lp)
            nll = np.where(missing, 0.0, -lp.astype(np.float64))
            self._cached = (k, np.concatenate([[0.0], np.cumsum(nll)]),
                            np.concatenate([[0], np.cumsum(missing, dtype=np.int64)]))
        return self._cached[1], self._cached[2]

    def window_sums(self, windows: np.ndarray) -> np.ndarray:
        """float64 [n]: the teacher's NLL summed over the ``length - 1`` predictions of each window
        (:data:`~megatron_kd.miniplm.instances.INSTANCE_DTYPE` rows ``doc``, ``offset``, ``length``)."""
        first = self.doc_start[windows["doc"]] + windows["offset"]  # global position of the first prediction
        n_pred = windows["length"].astype(np.int64) - 1
        shard = np.searchsorted(self.token_lo, first, side="right") - 1
        out = np.zeros(len(windows), dtype=np.float64)
        for k in np.unique(shard):
            rows = np.nonzero(shard == k)[0]
            sums, missing = self._prefix_sums(int(k))
            lo = first[rows] - self.token_lo[k]
            hi = lo + n_pred[rows]
            if np.any(missing[hi] - missing[lo]):
                raise ValueError(f"--teacher-store {self.root}: some scored positions have no stored teacher "
                                 "log-prob (the store's windows do not match the chunks): rewrite the store")
            out[rows] = sums[hi] - sums[lo]
        return out
