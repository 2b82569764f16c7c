"""Quickstart report: ``report.json`` (schema in docs/quickstart.md), ``report.md`` and PNG plots."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from megatron_kd.utils.io import atomic_write, write_json_atomic
from megatron_kd.utils.progress import read_jsonl

REPORT_VERSION = 1


def _train_curve(metrics_path: str) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    if not Path(metrics_path).is_file():
        return steps, losses
    for rec in read_jsonl(metrics_path):
        if rec.get("split") != "train":
            continue
        # KD runs report lm / kd / total; the LM part is what every student shares.
        value = rec.get("lm", rec.get("loss", rec.get("total")))
        if value is not None:
            steps.append(int(rec["step"]))
            losses.append(float(value))
    return steps, losses


def _plot_curves(qs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_kd.quickstart.sizes import STUDENTS

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, label in STUDENTS:
        steps, losses = _train_curve(qs.results[name]["metrics"])
        ax.plot(steps, losses, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training LM loss (nats/token)")
    ax.set_title("Students, same token budget")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def _conclusions(students: list[dict[str, Any]], teacher_loss: float) -> list[str]:
    base = next(s for s in students if s["name"] == "no_kd")["heldout_loss"]
    lines = [f"Teacher held-out loss {teacher_loss:.3f} vs no-KD student {base:.3f} "
             f"({'teacher clearly stronger' if teacher_loss < base - 0.05 else 'teacher NOT clearly stronger'})."]
    for s in students:
        if s["name"] == "no_kd":
            continue
        delta = s["heldout_loss"] - base
        verdict = "helps" if delta < -0.005 else "does not help at this scale" if delta > 0.005 else "is neutral"
        lines.append(f"{s['label']}: {s['heldout_loss']:.3f} ({delta:+.3f} vs no KD) — {verdict}.")
    return lines


def write_report(qs, total_seconds: float) -> dict[str, Any]:
    """Assemble and write the report files under ``qs.out``; return the report dict."""
    from megatron_kd.quickstart.sizes import STUDENTS

    r, size = qs.results, qs.size
    evals = r["evaluate"]
    students = []
    for name, label in STUDENTS:
        run = r[name]
        students.append({
            "name": name, "label": label, "heldout_loss": evals[name]["loss"], "heldout_ppl": evals[name]["ppl"],
            "heldout_tokens": evals[name]["tokens"], "train_tokens": run["tokens"], "iterations": run["iterations"],
            "wall_time_s": run["wall_time_s"], "checkpoint": run["checkpoint"], "kd": run.get("config"),
        })
    miniplm = r["miniplm"]["report"]
    store = r["logits"]["summary"]
    report = {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "size": size.name,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        # Sum of stage times, so a resumed run reports the whole pipeline, not just its last leg.
        "total_seconds": round(sum(res.get("seconds") or 0.0 for res in r.values()), 1),
        "this_invocation_seconds": round(total_seconds, 1),
        "stages": {name: res.get("seconds") for name, res in r.items()},
        "corpus": r["corpus"],
        "tokenizer": r["tokenizer"],
        "datasets": r["preprocess"],
        "models": {"teacher": size.teacher, "reference": size.reference, "student": size.student},
        "teacher": {"heldout_loss": evals["teacher"]["loss"], "train_tokens": r["teacher"]["tokens"],
                    "wall_time_s": r["teacher"]["wall_time_s"]},
        "reference": {"heldout_loss": evals["reference"]["loss"], "train_tokens": r["reference"]["tokens"],
                      "wall_time_s": r["reference"]["wall_time_s"]},
        "miniplm": {"alpha": miniplm["alpha"], "instances": miniplm["num_instances"],
                    "kept_instances": miniplm["kept_instances"], "kept_token_fraction": miniplm["kept_token_fraction"],
                    "thresholds": miniplm["thresholds"],
                    "kept_fraction_by_domain": {d: v["kept_fraction"] for d, v in miniplm["domains"].items()}},
        "logits_store": {k: store.get(k) for k in ("tokens", "bytes_per_token", "mean_kept", "bytes")
                         if isinstance(store, dict) and k in store},
        "students": students,
        "conclusions": _conclusions(students, evals["teacher"]["loss"]),
        "plots": {"loss_curves": "loss_curves.png", "miniplm_scores": "miniplm_scores.png"},
    }
    _plot_curves(qs, qs.out / "loss_curves.png")
    png = Path(f"{r['miniplm']['prefix']}.report.png")
    if png.is_file():
        shutil.copyfile(png, qs.out / "miniplm_scores.png")
    write_json_atomic(qs.out / "report.json", report)
    with atomic_write(qs.out / "report.md", encoding="utf-8") as fh:
        fh.write(render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"# megatron-kd quickstart report ({report['size']})", "",
             f"Created {report['created']} on {report['machine']['platform']} "
             f"({report['machine']['cpus']} CPUs); whole run {report['total_seconds']:.0f} s.", ""]
    c = report["corpus"]
    lines += [f"Corpus: {c['documents']:,} documents ({c['bytes'] / 1e6:.1f} MB) from the Python standard "
              f"library, split by document into {c['split_documents']}. Tokenizer: SentencePiece BPE, "
              f"{report['tokenizer']['vocab_size']:,} ids.", ""]
    lines += ["## Held-out LM loss (nats/token, lower is better)", "",
              "| model | held-out loss | perplexity | training tokens | wall time (s) |",
              "|---|---:|---:|---:|---:|",
              f"| teacher | {report['teacher']['heldout_loss']:.3f} | | {report['teacher']['train_tokens']:,} "
              f"| {report['teacher']['wall_time_s']:.0f} |",
              f"| MiniPLM reference LM | {report['reference']['heldout_loss']:.3f} | | "
              f"{report['reference']['train_tokens']:,} | {report['reference']['wall_time_s']:.0f} |"]
    for s in report["students"]:
        lines.append(f"| student: {s['label']} | {s['heldout_loss']:.3f} | {s['heldout_ppl']:.1f} | "
                     f"{s['train_tokens']:,} | {s['wall_time_s']:.0f} |")
    lines += ["", "## What this run shows", ""] + [f"- {line}" for line in report["conclusions"]]
    m = report["miniplm"]
    lines += ["", "## MiniPLM difference sampling", "",
              f"Kept {m['kept_instances']:,} of {m['instances']:,} instances (α = {m['alpha']}), "
              f"{m['kept_token_fraction']:.1%} of the tokens; lowest kept score r = "
              f"{m['thresholds']['r_min_kept']:.3f} nats/token.", "", "![MiniPLM scores](miniplm_scores.png)", "",
              "## Training curves", "", "![loss curves](loss_curves.png)", "",
              "## Stage times (s)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["stages"].items()]
    return "\n".join(lines) + "\n"
