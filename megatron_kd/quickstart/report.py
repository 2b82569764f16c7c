"""Quickstart report: ``report.json`` (schema in docs/quickstart.md), ``report.md`` and PNG plots."""
from __future__ import annotations

import datetime
import math
import os
import platform
import shutil
from pathlib import Path
from typing import Any

from megatron_kd.utils.io import atomic_write, write_json_atomic
from megatron_kd.utils.progress import read_jsonl

REPORT_VERSION = 2


def _curve(metrics_path: str, split: str) -> tuple[list[int], list[float]]:
    """(steps, LM losses) of ``split`` (``train`` | ``valid``) records of a run's metrics.jsonl."""
    steps, losses = [], []
    if not Path(metrics_path).is_file():
        return steps, losses
    for rec in read_jsonl(metrics_path):
        if rec.get("split") != split:
            continue
        # KD runs report lm / kd / total; the LM part is what every student shares.
        value = rec.get("lm", rec.get("loss", rec.get("total")))
        if value is not None:
            steps.append(int(rec["step"]))
            losses.append(float(value))
    return steps, losses


def _train_curve(metrics_path: str) -> tuple[list[int], list[float]]:
    return _curve(metrics_path, "train")


def _plot_curves(qs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_kd.quickstart.sizes import students_of

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.6))
    for i, (name, label) in enumerate(students_of(qs.size)):
        color = f"C{i % 10}"
        steps, losses = _curve(qs.results[name]["metrics"], "train")
        ax1.plot(steps, losses, label=label, color=color)
        steps, losses = _curve(qs.results[name]["metrics"], "valid")
        ax2.plot(steps, losses, marker="o", markersize=3, label=label, color=color)
    ax1.set_title("training LM loss (each on its own training data)")
    s = qs.size
    ax2.set_title(f"held-out LM loss (same {s.eval_iters * s.global_batch_size} held-out sequences, "
                  f"every {s.eval_interval} steps)")
    for ax in (ax1, ax2):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("LM loss (nats/token)")
        ax.grid(alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Students, same token budget (own-tokenizer students: nats per their own tokens)", fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def _fmt_ci(ci: dict[str, float], unit: str = "") -> str:
    return f"{ci['delta']:+.3f}{unit} [95% CI {ci['low']:+.3f}, {ci['high']:+.3f}]"


def _conclusions(students: list[dict[str, Any]], teacher: dict[str, Any]) -> list[str]:
    base = next(s for s in students if s["name"] == "no_kd")["heldout_loss"]
    tv = teacher["vs_no_kd"]
    lines = [f"Teacher held-out loss {teacher['heldout_loss']:.3f} vs no-KD student {base:.3f}: "
             f"{_fmt_ci(tv)} — teacher {'clearly stronger' if tv['high'] < 0 else 'NOT clearly stronger'}."]
    for s in students:
        ci = s.get("vs_no_kd")
        if ci is None:
            continue
        value = (f"{s['heldout_bits_per_byte']:.3f} bits/byte" if ci["metric"] == "bits_per_byte"
                 else f"{s['heldout_loss']:.3f} nats/token")
        lines.append(f"{s['label']}: {value}, {_fmt_ci(ci)} vs {s['baseline']} ({ci['metric']}) — {s['verdict']}.")
    return lines


def _store_summary(qs, stage: str) -> dict[str, Any]:
    """``logits_store`` of report.json: what ``megatron-kd logits --stats`` prints for the store (size per
    token and entry, method, kind, positions) plus the precompute time."""
    try:
        res = qs.sampled_store() if stage == "sampled" else qs.results.get(stage)
    except ValueError:
        res = None
    if not res:
        return {}
    out: dict[str, Any] = {}
    try:
        from megatron_kd.logits.stats import store_stats

        out.update(store_stats(res["store"])["store"])
    except (ImportError, OSError, KeyError, ValueError) as exc:  # an old store: keep what precompute said
        out["stats_error"] = f"{type(exc).__name__}: {exc}"
    summary = res.get("summary") or {}
    # One teacher pass writes both stores: its seconds and rate are each store's (stores_in_pass says so).
    out.update({"precompute_seconds": res.get("seconds") or summary.get("seconds"),
                "positions_per_s": summary.get("positions_per_s"), "stores_in_pass": summary.get("stores_in_pass", 1),
                "path": res["store"]})
    return out


def _eval_row(ev: dict[str, Any]) -> dict[str, Any]:
    return {"heldout_loss": ev["loss"], "heldout_ppl": ev["ppl"], "heldout_tokens": ev["tokens"],
            "heldout_bits_per_byte": ev.get("bits_per_byte"), "ece": ev["ece"], "top1_accuracy": ev["top1_accuracy"],
            "mean_confidence": ev.get("mean_confidence")}


def schedule_summary(qs, schedule: dict[str, Any] | None) -> dict[str, Any]:
    """``schedule`` of report.json: workers, threads per stage, this invocation's wall time, the sum of
    stage seconds and the critical path (the chain of dependent stages with the most seconds: the
    wall time no number of workers can beat), plus when and where each stage ran in this invocation."""
    from megatron_kd.quickstart.schedule import critical_path

    schedule = dict(schedule or {})
    seconds = {name: res.get("seconds") or 0.0 for name, res in qs.results.items()}
    path, path_seconds = critical_path(qs.stage_specs(), seconds)
    return {"workers": schedule.get("workers", 1), "threads_per_stage": schedule.get("threads_per_stage"),
            "wall_seconds": schedule.get("wall_seconds"),
            "stage_seconds_sum": round(sum(seconds.values()), 1),
            "critical_path": path, "critical_path_seconds": path_seconds,
            "resumed_stages": schedule.get("resumed_stages", []), "timeline": schedule.get("timeline", {})}


def write_report(qs, total_seconds: float, schedule: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble and write the report files under ``qs.out``; return the report dict (``schedule``: what
    :meth:`Quickstart.run` says about workers, threads, wall time and the stage timeline)."""
    from megatron_kd.quickstart.heldout import paired_bootstrap, verdict
    from megatron_kd.quickstart.sizes import students_of

    r, size, evals = qs.results, qs.size, qs.evals
    boot = dict(samples=size.bootstrap_samples, seed=qs.seed)
    base = evals["no_kd"]

    def vs(name: str, baseline: str, metric: str = "loss") -> dict[str, Any]:
        a, b = evals[name], evals[baseline]
        if metric == "bits_per_byte":
            ci = paired_bootstrap(a["doc_nll"], b["doc_nll"], b["doc_bytes"], scale=1 / math.log(2), **boot)
            # bytes are the same documents' bytes for both (any tokenizers); nll sums differ per model
        else:
            ci = paired_bootstrap(a["doc_nll"], b["doc_nll"], b["doc_tokens"], **boot)
        return {**ci, "metric": metric, "baseline": baseline}

    students = []
    for name, label in students_of(size):
        run = r[name]
        row = {"name": name, "label": label, **_eval_row(evals[name]), "train_tokens": run["tokens"],
               "iterations": run["iterations"], "wall_time_s": run["wall_time_s"], "checkpoint": run["checkpoint"],
               "kd": run.get("config"), "heldout_curve": dict(zip(("steps", "loss"), _curve(run["metrics"], "valid")))}
        baseline = run.get("baseline", "no_kd") if name != "no_kd" else None
        if baseline:
            metric = run.get("compare_metric", "loss")
            row["baseline"] = baseline
            row["vs_no_kd"] = vs(name, baseline, metric)
            row["verdict"] = verdict(row["vs_no_kd"])
        students.append(row)
    teacher = {**_eval_row(evals["teacher"]), "train_tokens": r["teacher"]["tokens"],
               "wall_time_s": r["teacher"]["wall_time_s"], "vs_no_kd": vs("teacher", "no_kd")}
    miniplm = r["miniplm"]["report"]
    stages = {s.name: r[s.name].get("seconds") for s in qs.stage_specs() if s.name in r}
    report = {
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "size": size.name,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        # Sum of stage times, so a resumed run reports the whole pipeline, not just its last leg.
        "total_seconds": round(sum(v or 0.0 for v in stages.values()), 1),
        "this_invocation_seconds": round(total_seconds, 1),
        "wall_seconds": round(total_seconds, 1),
        "stages": stages,
        "schedule": schedule_summary(qs, schedule),
        "corpus": r["corpus"],
        "tokenizer": r["tokenizer"],
        "datasets": r["preprocess"],
        "models": {"teacher": size.teacher, "reference": size.reference, "student": size.student},
        "evaluation": {"seq_length": base["seq_length"], "documents": base["documents"], "tokens": base["tokens"],
                       # what the corpus stage split with (a run resumed from before 2026-12 held out 5%)
                       "heldout_percent": r["corpus"].get("heldout_percent", 5), "calibration_bins": size.calibration_bins,
                       "bootstrap": {"samples": size.bootstrap_samples, "level": 0.95, "unit": "held-out documents",
                                     "seed": qs.seed},
                       "curve": {"eval_interval": size.eval_interval, "eval_iters": size.eval_iters,
                                 "sequences": size.eval_iters * size.global_batch_size}},
        "teacher": teacher,
        "reference": {**_eval_row(evals["reference"]), "train_tokens": r["reference"]["tokens"],
                      "wall_time_s": r["reference"]["wall_time_s"]},
        "miniplm": {"alpha": miniplm["alpha"], "instances": miniplm["num_instances"],
                    "teacher_nll": r["miniplm"].get("teacher_nll", "teacher forward"),
                    "kept_instances": miniplm["kept_instances"], "kept_token_fraction": miniplm["kept_token_fraction"],
                    "thresholds": miniplm["thresholds"],
                    "kept_fraction_by_domain": {d: v["kept_fraction"] for d, v in miniplm["domains"].items()}},
        "logits_store": _store_summary(qs, "logits"),
        "logits_stores": {"topk": _store_summary(qs, "logits"), "sample": _store_summary(qs, "sampled")},
        "students": students,
        "conclusions": _conclusions(students, teacher),
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


def _num(v: Any, fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    ev = report["evaluation"]
    lines = [f"# megatron-kd quickstart report (size `{report['size']}`)", "",
             f"Created {report['created']} on {report['machine']['platform']} "
             f"({report['machine']['cpus']} CPUs); {_timing_sentence(report)} "
             f"(`megatron-kd quickstart --size {report['size']}`).", ""]
    c = report["corpus"]
    lines += [f"Corpus: {c['documents']:,} documents ({c['bytes'] / 1e6:.1f} MB) from the Python standard "
              f"library, split by document into {c['split_documents']}. Tokenizer: SentencePiece BPE, "
              f"{report['tokenizer']['vocab_size']:,} ids.", ""]
    lines += ["## Held-out evaluation", "",
              f"{ev['documents']} held-out documents ({ev['tokens']:,} scored tokens), eval context "
              f"{ev['seq_length']} tokens (document-aligned windows, the training sequence length). "
              f"Δ = held-out loss minus the baseline's (no KD, or the own-tokenizer no-KD twin, compared in "
              f"bits per byte) with a paired bootstrap {ev['bootstrap']['level']:.0%} interval over "
              f"{ev['bootstrap']['unit']} ({ev['bootstrap']['samples']} resamples). A method *helps* only "
              "when the whole interval is below 0; an interval that contains 0 means *no measurable effect "
              "at this scale* (one seed, small models: not evidence that it cannot help). The interval covers "
              "the choice of held-out documents only, not training noise: at `tiny` the no-KD student's held-out "
              "loss moved by 0.14-0.15 nats between training seeds (docs/quickstart.md), so differences of "
              "that size are about this seed's runs. ECE: next-token "
              f"expected calibration error of the top-1 prediction over every scored position "
              f"({ev['calibration_bins']} equal-width bins; lower is better). Own-tokenizer students get the same "
              "number of training tokens as the others, which is less text when their vocabulary is smaller: "
              "compare them with each other (their no-KD twin), not with the shared-tokenizer students.", "",
              "| model | held-out loss (nats/token) | bits/byte | Δ vs baseline [95% CI] | verdict | ECE | "
              "top-1 acc | mean top-1 conf | training tokens | wall time (s) |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    t = report["teacher"]
    lines.append(f"| teacher | {t['heldout_loss']:.3f} | {_num(t['heldout_bits_per_byte'], '.3f')} | "
                 f"{_fmt_ci(t['vs_no_kd'])} vs no_kd | | {t['ece']:.4f} | {t['top1_accuracy']:.3f} | "
                 f"{_num(t.get('mean_confidence'), '.3f')} | "
                 f"{t['train_tokens']:,} | {t['wall_time_s']:.0f} |")
    ref = report["reference"]
    lines.append(f"| MiniPLM reference LM | {ref['heldout_loss']:.3f} | {_num(ref['heldout_bits_per_byte'], '.3f')} "
                 f"| | | {ref['ece']:.4f} | {ref['top1_accuracy']:.3f} | {_num(ref.get('mean_confidence'), '.3f')} | "
                 f"{ref['train_tokens']:,} | "
                 f"{ref['wall_time_s']:.0f} |")
    for s in report["students"]:
        ci = s.get("vs_no_kd")
        delta = (f"{_fmt_ci(ci, ' bpb' if ci['metric'] == 'bits_per_byte' else '')} vs {ci['baseline']}"
                 if ci else "(baseline)")
        lines.append(f"| {s['label']} | {s['heldout_loss']:.3f} | {_num(s['heldout_bits_per_byte'], '.3f')} | "
                     f"{delta} | {s.get('verdict', '')} | {s['ece']:.4f} | {s['top1_accuracy']:.3f} | "
                     f"{_num(s.get('mean_confidence'), '.3f')} | "
                     f"{s['train_tokens']:,} | {s['wall_time_s']:.0f} |")
    lines += ["", "## What this run shows", ""] + [f"- {line}" for line in report["conclusions"]]
    stores = report.get("logits_stores") or {"topk": report.get("logits_store") or {}}
    if any(stores.values()):
        lines += ["", "## Offline teacher stores", "",
                  "Kept mass and KL(teacher ‖ stored) come from the dense audit sample precompute keeps "
                  "(`megatron-kd logits --stats`).", "",
                  "| store | settings | positions | bytes/token | bytes/entry | entries/token | kept teacher mass "
                  "| KL(teacher ‖ stored) | precompute (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for st in stores.values():
            if not st:
                continue
            setting = (f"N = {st.get('num_samples')} draws" if st.get("method") != "topk"
                       else f"top-p {st.get('top_p')}, top-k {st.get('top_k')}")
            lines.append(f"| `{st.get('method')}` ({st.get('target_kind')}) | {setting} | "
                         f"{_num(st.get('positions'), ',')} | {_num(st.get('bytes_per_token'), '.2f')} | "
                         f"{_num(st.get('bytes_per_entry'), '.2f')} | {_num(st.get('mean_entries'), '.1f')} | "
                         f"{_num(st.get('kept_teacher_mass'), '.3f')} | {_num(st.get('kl_teacher_stored'), '.2e')} | "
                         f"{_num(st.get('precompute_seconds'), '.0f')} |")
    m = report["miniplm"]
    lines += ["", "## MiniPLM difference sampling", "",
              f"Kept {m['kept_instances']:,} of {m['instances']:,} instances (α = {m['alpha']}), "
              f"{m['kept_token_fraction']:.1%} of the tokens; lowest kept score r = "
              f"{m['thresholds']['r_min_kept']:.3f} nats/token.", "", "![MiniPLM scores](miniplm_scores.png)", "",
              "## Training and held-out curves", "",
              f"Left: training LM loss (MiniPLM students train on the refined corpus, so these are not "
              f"comparable across corpora). Right: held-out LM loss on the same "
              f"{ev['curve']['sequences']} held-out sequences every {ev['curve']['eval_interval']} steps.", "",
              "![loss curves](loss_curves.png)", "",
              "## Stage times (s)", ""]
    sched = report.get("schedule") or {}
    timeline = sched.get("timeline") or {}
    if sched.get("critical_path"):
        lines += [f"Critical path (the chain of dependent stages with the most seconds, which no number of "
                  f"workers can shorten): {' → '.join(sched['critical_path'])}, "
                  f"{sched['critical_path_seconds']:.0f} s of {sched['stage_seconds_sum']:.0f} s of stage time.", ""]
    lines += ["| stage | seconds | worker | started at (s) |", "|---|---:|---:|---:|"]
    for k, v in report["stages"].items():
        t = timeline.get(k)
        lines.append(f"| {k} | {v} | {t['worker'] if t else ''} | {_num(t['start'] if t else None, '.0f')} |")
    return "\n".join(lines) + "\n"


def _timing_sentence(report: dict[str, Any]) -> str:
    sched = report.get("schedule") or {}
    if not sched.get("wall_seconds"):
        return f"whole run {report['total_seconds']:.0f} s"
    resumed = sched.get("resumed_stages") or []
    text = (f"wall time {sched['wall_seconds']:.0f} s with {sched['workers']} worker(s) of "
            f"{sched['threads_per_stage']} thread(s) each, {report['total_seconds']:.0f} s of stage time")
    if resumed:
        text += f" (this invocation resumed {len(resumed)} completed stages: the wall time is its own)"
    return text
