"""Selection report: JSON numbers and a PNG (score histogram, kept fraction per domain)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _stats(x: np.ndarray) -> dict[str, float | None]:
    if len(x) == 0:
        return {"mean": None, "std": None, "min": None, "p10": None, "p50": None, "p90": None, "max": None}
    q = np.percentile(x, [10, 50, 90])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "p10": float(q[0]),
            "p50": float(q[1]), "p90": float(q[2]), "max": float(x.max())}


def build_report(rows: np.ndarray, r: np.ndarray, keep: np.ndarray, domains: np.ndarray, alpha: float,
                 bins: int = 50) -> dict[str, Any]:
    """Numbers of a selection.

    ``rows``: the scores (SCORE_DTYPE); ``r``: difference scores; ``keep``: bool mask;
    ``domains``: domain name per instance. Thresholds: ``r_min_kept`` (the lowest kept score)
    and ``r_max_dropped`` (the highest dropped one); they are equal only when a tie straddles the
    cut, which corpus order breaks.
    """
    tokens = rows["length"].astype(np.int64)
    edges = np.histogram_bin_edges(r, bins=bins) if len(r) else np.linspace(0, 1, bins + 1)
    per_domain = {}
    for dom in sorted(set(domains.tolist())):
        m = domains == dom
        per_domain[dom] = {
            "instances": int(m.sum()), "kept_instances": int((m & keep).sum()),
            "kept_fraction": float((m & keep).sum() / max(m.sum(), 1)),
            "tokens": int(tokens[m].sum()), "kept_tokens": int(tokens[m & keep].sum()),
            "mean_r": float(r[m].mean()) if m.any() else None,
            "mean_nll_teacher": float(rows["nll_teacher"][m].mean()) if m.any() else None,
            "mean_nll_ref": float(rows["nll_ref"][m].mean()) if m.any() else None,
        }
    return {
        "alpha": alpha,
        "num_instances": int(len(r)), "kept_instances": int(keep.sum()),
        "rounding": "kept = floor(alpha * num_instances); ties broken by corpus order",
        "tokens": int(tokens.sum()), "kept_tokens": int(tokens[keep].sum()),
        "kept_token_fraction": float(tokens[keep].sum() / max(tokens.sum(), 1)),
        "thresholds": {"r_min_kept": float(r[keep].min()) if keep.any() else None,
                       "r_max_dropped": float(r[~keep].max()) if (~keep).any() else None},
        "r": _stats(r), "r_kept": _stats(r[keep]), "r_dropped": _stats(r[~keep]),
        "nll_teacher": _stats(rows["nll_teacher"]), "nll_ref": _stats(rows["nll_ref"]),
        "histogram": {"edges": edges.tolist(), "all": np.histogram(r, edges)[0].tolist(),
                      "kept": np.histogram(r[keep], edges)[0].tolist()},
        "domains": per_domain,
    }


def domain_panel(domains: dict[str, dict[str, Any]], max_domains: int = 20) -> list[tuple[str, float, int]]:
    """``(label, kept fraction, instances)`` of the ``max_domains`` largest domains (by instances; ties by
    name) and, if more exist, one ``other (n domains)`` row pooling the rest."""
    order = sorted(domains, key=lambda d: (-domains[d]["instances"], d))
    rows = [(d, domains[d]["kept_fraction"], domains[d]["instances"]) for d in order[:max_domains]]
    rest = order[max_domains:]
    if rest:
        n = sum(domains[d]["instances"] for d in rest)
        kept = sum(domains[d]["kept_instances"] for d in rest)
        rows.append((f"other ({len(rest)} domains)", kept / max(n, 1), n))
    return rows


def plot_report(report: dict[str, Any], path: str | Path, max_domains: int = 20) -> None:
    """Two panels: histogram of r (all vs kept, threshold line) and kept fraction of the ``max_domains``
    largest domains (the rest pooled as "other")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_kd.utils.io import atomic_write

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    h = report["histogram"]
    edges = np.asarray(h["edges"])
    widths = np.diff(edges)
    ax1.bar(edges[:-1], h["all"], width=widths, align="edge", color="0.75", label="all")
    ax1.bar(edges[:-1], h["kept"], width=widths, align="edge", color="tab:blue", alpha=0.8, label="kept")
    thr = report["thresholds"]["r_min_kept"]
    if thr is not None:
        ax1.axvline(thr, color="tab:red", linestyle="--", label=f"threshold {thr:.3f}")
    ax1.set_xlabel("r = NLL_ref - NLL_teacher (nats/token)")
    ax1.set_ylabel("instances")
    ax1.set_title(f"difference scores (alpha={report['alpha']}, kept {report['kept_instances']}"
                  f"/{report['num_instances']})")
    ax1.legend()
    rows = domain_panel(report["domains"], max_domains)[::-1]  # largest at the top
    ax2.barh([f"{d} ({n})" for d, _, n in rows], [f for _, f, _ in rows], color="tab:blue")
    ax2.tick_params(axis="y", labelsize=7)
    ax2.axvline(report["alpha"], color="tab:red", linestyle="--", label="alpha")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("kept fraction of instances")
    ax2.set_title(f"kept fraction, {min(max_domains, len(report['domains']))} largest domains (instances)")
    ax2.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
