"""``megatron-kd logits --stats STORE``: size and fidelity of a logits store, per store and per shard.

Size: positions, targets, bytes per target and per kept entry, mean kept entries. Fidelity, from
the dense *audit sample* precompute keeps (``--audit-fraction``: the full teacher distribution
``p`` of a hash-chosen fraction of positions), against the stored target ``s`` the loss learns
from (top-k: the kept log-probs renormalised; sampled: the normalised weights):

* ``kept_teacher_mass``: ``sum_{i in S} p_i`` over the stored ids ``S``;
* ``kl_teacher_stored``: ``KL(p_S || s)`` with ``p_S = p`` restricted to ``S`` and renormalised
  (finite for every kind: the error of the stored values on their support -- quantisation for
  top-k, sampling noise of the weights for sampled stores; the mass outside ``S`` is
  ``1 - kept_teacher_mass``, where ``KL(p || s)`` itself is infinite for any finite support);
* ``tv_teacher_stored``: total variation ``1/2 sum_V |p - s|`` over the full vocabulary, i.e.
  half the L1 error of the KD gradient ``q - s`` at the teacher (bias + sampling noise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megatron_kd.logits import manifest as mf
from megatron_kd.logits.selection import target_weights
from megatron_kd.logits.store import LogitsStore


def _stored_distribution(store: LogitsStore, tok, ids, lp, draws, n: int) -> np.ndarray:
    """Normalised stored target weights [E] of flat entries."""
    if store.target_kind == "weights":
        return target_weights(store.method, lp, draws, tok, n, store.num_samples, store.proposal_temperature)
    w = np.exp(lp - np.max(lp))  # top-k: renormalised over the kept ids (the loss's default target)
    return w / np.bincount(tok, w, minlength=n)[tok]


def _audit(store: LogitsStore, shard: int, rec: dict[str, Any]) -> dict[str, float] | None:
    name = rec.get("audit_file")
    if not name or not rec.get("audit_positions"):
        return None
    with np.load(store.path / mf.SHARDS / name) as z:
        pos, dense = z["positions"], z["logprobs"].astype(np.float64)
    reader = store._reader(shard)
    t_lo = rec["token_lo"]
    kept, kl, tv = [], [], []
    for j, g in enumerate(pos):
        t = int(g) - t_lo
        tok, ids, lp, draws = reader.read_entries(t, t + 1, store.layout)
        if len(ids) == 0:
            continue
        s = _stored_distribution(store, tok, ids, lp, draws, 1)
        p = np.exp(dense[j])
        p_s = p[ids]
        mass = p_s.sum()
        kept.append(mass)
        ps = p_s / mass
        kl.append(float(np.sum(np.where(ps > 0, ps * (np.log(np.maximum(ps, 1e-300)) - np.log(s)), 0.0))))
        full = p.copy()
        full[ids] -= s
        tv.append(0.5 * float(np.abs(full).sum()))
    if not kept:
        return None
    return {"audit_positions": len(kept), "kept_teacher_mass": float(np.mean(kept)),
            "kl_teacher_stored": float(np.mean(kl)), "tv_teacher_stored": float(np.mean(tv))}


def store_stats(path: str | Path) -> dict[str, Any]:
    """Statistics of a complete store (see the module docstring): ``{"store": {...}, "shards": [...]}``."""
    store = LogitsStore(path)
    s = store.manifest["settings"]
    shards, audits = [], []
    for i, rec in enumerate(store.manifest["shards"]):
        targets, entries, size = rec["targets"], rec["entries"], rec["bytes"]
        row = {"shard": i, "positions": rec["token_hi"] - rec["token_lo"], "targets": targets, "bytes": size,
               "bytes_per_token": size / max(targets, 1), "bytes_per_entry": size / max(entries, 1),
               "mean_entries": entries / max(targets, 1)}
        a = _audit(store, i, rec)
        if a:
            row.update(a)
            audits.append(a)
        shards.append(row)
    st = store.manifest["stats"]
    total = {"path": str(store.path), "method": store.method, "target_kind": store.target_kind,
             "num_samples": s.get("num_samples"), "proposal_temperature": s.get("proposal_temperature"),
             "top_p": s["top_p"], "top_k": s["top_k"], "seed": s.get("seed"), "positions": st["positions"],
             "targets": st["targets"], "bytes": st["bytes"], "bytes_per_token": st["bytes_per_target"],
             "bytes_per_entry": st["bytes_per_entry"], "mean_entries": st["mean_entries_per_target"]}
    if audits:
        n = np.array([a["audit_positions"] for a in audits], dtype=np.float64)
        total["audit_positions"] = int(n.sum())
        for k in ("kept_teacher_mass", "kl_teacher_stored", "tv_teacher_stored"):
            total[k] = float(np.dot(n, [a[k] for a in audits]) / n.sum())
    return {"store": total, "shards": shards}


def format_stats(stats: dict[str, Any]) -> str:
    """Human-readable table of :func:`store_stats`."""
    cols = ("positions", "targets", "bytes_per_token", "bytes_per_entry", "mean_entries", "kept_teacher_mass",
            "kl_teacher_stored", "tv_teacher_stored", "audit_positions")
    st = stats["store"]
    head = (f"store {st['path']}: method={st['method']} ({st['target_kind']}) top_p={st['top_p']} top_k={st['top_k']}"
            + (f" N={st['num_samples']} tau={st['proposal_temperature']}" if st["num_samples"] else "")
            + f" seed={st['seed']}")

    def fmt(v):
        return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = [head, "shard " + " ".join(f"{c:>17}" for c in cols)]
    for row in stats["shards"]:
        lines.append(f"{row['shard']:>5} " + " ".join(f"{fmt(row.get(c)):>17}" for c in cols))
    lines.append("total " + " ".join(f"{fmt(st.get(c)):>17}" for c in cols))
    return "\n".join(lines)
