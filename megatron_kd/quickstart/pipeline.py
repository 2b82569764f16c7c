"""``megatron-kd quickstart``: every stage of the pipeline on the demo corpus.

corpus -> split (train / reference / held-out) -> SentencePiece tokenizer -> indexed datasets ->
teacher + reference LM (pretrain) -> MiniPLM score + select -> offline teacher logits -> five
students on the same token budget (no KD, online KD, offline top-k KD, MiniPLM data, MiniPLM + KD,
offline sampled KD)
-> held-out evaluation (per document: paired bootstrap intervals vs no KD; calibration) ->
``report.md`` / ``report.json`` / plots.

Each stage declares the stages it needs (:meth:`Quickstart.stage_specs`); ``--workers N`` runs up to
N of them at once in worker processes, critical path first (:mod:`megatron_kd.quickstart.schedule`),
``--workers 1`` one after another in this process. Each stage writes a marker ``stages/<name>.json``
when it completes; a rerun with the same ``--out`` skips completed stages, so an interrupted
quickstart resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from megatron_kd.config import build_config
from megatron_kd.quickstart.schedule import StageSpec
from megatron_kd.quickstart.sizes import SIZES, QuickstartSize, students_of
from megatron_kd.utils.io import read_json, write_json_atomic

STAGE_COST = {  # seconds per stage of the `full` size, one thread, 2 idle cores (2026-12-06): scheduling weights
    "corpus": 4.4, "tokenizer": 0.5, "preprocess": 6.2, "xtok_tokenizer": 0.5, "xtok_preprocess": 0.8,
    "teacher": 210, "reference": 28, "miniplm": 20, "logits": 110,
    "no_kd": 36, "online_kd": 58, "offline_kd": 32, "miniplm_data": 36, "miniplm_kd": 64,
    "offline_sampled_kd": 29, "xtok_no_kd": 29, "xtok_kd": 86, "eval_teacher": 15, "eval": 5.5,
}
"""Only orders the ready stages (longest remaining path first) and estimates the ETA."""
LENDABLE_STAGES = frozenset({"teacher", "reference"})
"""Stages that may use an idle worker's core (:attr:`StageSpec.lendable`): pre-training with megatron's
loss trains bit-identically at 1 and 2 threads (tests/quickstart/test_thread_lease.py; also at 4, not
at 3, hence leases only double); on 2 cores the teacher gets both once the stages that need no teacher
are done (40-60 s less teacher)."""


class Quickstart:
    """State of one quickstart run under ``out``; :meth:`run` executes the stages in order."""

    def __init__(self, out: str | Path, size: QuickstartSize, seed: int = 1234, log: Callable[[str], None] = print):
        self.out = Path(out)
        self.size = size
        self.seed = seed
        self.log = log
        self.data = self.out / "data"
        self.ckpt = self.out / "checkpoints"
        self.stage_dir = self.out / "stages"
        self.results: dict[str, Any] = {}
        self.evals: dict[str, dict[str, Any]] = {}
        """Held-out evaluation per model (stage ``eval_<name>``)."""

    # ------------------------------------------------------------------ stage bookkeeping
    def _stage(self, name: str, fn: Callable[[], dict[str, Any]], worker: int | None = None) -> dict[str, Any]:
        marker = self.stage_dir / f"{name}.json"
        if marker.is_file():
            result = read_json(marker, "stage marker")
            self.log(f"[quickstart] {name}: done earlier ({result.get('seconds', 0):.1f} s), skipped")
        else:
            where = f" on worker {worker}" if worker is not None else ""
            self.log(f"[quickstart] {name}: started{where}")
            t0 = time.perf_counter()
            result = fn()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            if worker is not None:
                result["worker"] = worker
            write_json_atomic(marker, result)
            self.log(f"[quickstart] {name}: finished in {result['seconds']:.1f} s{where}")
        self.results[name] = result
        return result

    # ------------------------------------------------------------------ data
    def corpus(self) -> dict[str, Any]:
        from megatron_kd.data.demo_corpus import build_demo_corpus

        stats = build_demo_corpus(str(self.data / "corpus.jsonl"), max_docs=self.size.max_docs)
        splits = {"train": [], "reference": [], "heldout": []}
        with open(self.data / "corpus.jsonl", encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                # A stable per-document bucket: 10% reference-LM slice, size.heldout_percent held out, the rest train.
                bucket = int(hashlib.sha1(doc["text"].encode("utf-8")).hexdigest()[:8], 16) % 100
                name = ("reference" if bucket < 10 else "heldout" if bucket < 10 + self.size.heldout_percent
                        else "train")
                splits[name].append(line)
        counts = {}
        for name, lines in splits.items():
            from megatron_kd.utils.io import atomic_write

            with atomic_write(self.data / f"{name}.jsonl") as fh:
                fh.writelines(lines)
            counts[name] = len(lines)
        return {"documents": stats["num_documents"], "bytes": stats["num_bytes"], "domains": stats["num_domains"],
                "split_documents": counts, "heldout_percent": self.size.heldout_percent, "sha256": stats["sha256"]}

    def tokenizer(self, xtok: bool = False) -> dict[str, Any]:
        """SentencePiece BPE on the train split: the teacher's (``size.vocab_size``) or, with ``xtok``, the
        cross-tokenizer students' own (``size.xtok_vocab_size``)."""
        from megatron_kd.data.tokenizers import train_sentencepiece

        def texts():
            with open(self.data / "train.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)["text"]

        where = self.out / ("tokenizer_xtok" if xtok else "tokenizer")
        tok = train_sentencepiece(texts(), self.size.xtok_vocab_size if xtok else self.size.vocab_size,
                                  str(where / "spm"))
        return {"path": str(where / "spm.model"), "vocab_size": tok.vocab_size, "identity": tok.identity}

    def preprocess(self, xtok: bool = False) -> dict[str, Any]:
        from megatron_kd.data.preprocess import preprocess

        out = {}
        tok = self.results["xtok_tokenizer"]["path"] if xtok else self.tokenizer_path
        for name in ("train", "heldout") if xtok else ("train", "reference", "heldout"):
            dest = f"xtok_{name}" if xtok else name
            manifest = preprocess([str(self.data / f"{name}.jsonl")], str(self.data / dest), tok,
                                  json_keys=("text",), append_eod=True, workers=1, overwrite=True, progress=False)
            out[dest] = {"prefix": self.prefix(dest), "documents": manifest["num_documents"],
                         "tokens": manifest["num_tokens"]}
        return out

    @property
    def tokenizer_path(self) -> str:
        return str(self.out / "tokenizer" / "spm.model")

    def prefix(self, name: str) -> str:
        """Indexed-dataset prefix of a split (``train``, ``reference``, ``heldout``, ``miniplm``)."""
        return str(self.data / f"{name}_text_document")

    # ------------------------------------------------------------------ training runs
    def _train_config(self, model: dict, prefix: str, iters: int, lr: float, save: Path,
                      heldout_curve: bool = False, xtok: bool = False) -> dict[str, Any]:
        """Training config; ``xtok``: the student's own tokenizer (``xtok_tokenizer`` stage) and data."""
        s = self.size
        tok = self.results["xtok_tokenizer" if xtok else "tokenizer"]
        cfg = {
            "model": {**model, "vocab_size": tok["vocab_size"]},
            # one index cache per run: concurrent stages never write the same cache files
            "data": {"prefixes": [prefix], "tokenizer": tok["path"], "split": "100,0,0",
                     "cache_dir": str(self.data / "index_cache" / save.name)},
            "train": {"micro_batch_size": s.micro_batch_size, "global_batch_size": s.global_batch_size,
                      "seq_length": s.seq_length, "train_iters": iters, "log_interval": max(1, iters // 10),
                      "seed": self.seed},
            "optim": {"lr": lr, "min_lr": lr / 10, "lr_schedule": "wsd", "warmup_fraction": 0.05,
                      "wsd_decay_fraction": 0.2, "weight_decay": 0.1, "clip_grad": 1.0},
            "checkpoint": {"save": str(save), "save_interval": 0},
            "logging": {"metrics_path": str(save / "metrics.jsonl"), "quiet": True},
        }
        if heldout_curve:  # students: held-out LM loss every eval_interval steps (the report's held-out curves)
            cfg["data"]["valid_prefixes"] = [self.prefix("xtok_heldout" if xtok else "heldout")]
            cfg["train"].update(eval_interval=s.eval_interval, eval_iters=s.eval_iters)
        return cfg

    def _pretrain(self, model: dict, prefix: str, iters: int, lr: float, name: str,
                  heldout_curve: bool = False, xtok: bool = False, fused_lm_loss: bool = True) -> dict[str, Any]:
        from megatron_kd.training.config import PretrainConfig
        from megatron_kd.training.pretrain import run_pretrain

        save = self.ckpt / name
        data = self._train_config(model, prefix, iters, lr, save, heldout_curve, xtok)
        data["train"]["fused_lm_loss"] = fused_lm_loss
        cfg = build_config(PretrainConfig, data)
        t0 = time.perf_counter()
        result = run_pretrain(cfg)
        return {"checkpoint": str(save), "wall_time_s": round(time.perf_counter() - t0, 2),
                "iterations": result["iteration"], "metrics": str(save / "metrics.jsonl"),
                "tokens": iters * self.size.global_batch_size * self.size.seq_length}

    def _distill(self, name: str, prefix: str, mode: str, store: str = "logits",
                 cross_tokenizer: str | None = None) -> dict[str, Any]:
        from megatron_kd.distill.config import DistillConfig
        from megatron_kd.distill.run import run_distill

        s = self.size
        save = self.ckpt / name
        xtok = cross_tokenizer is not None
        data = self._train_config(s.student, prefix, s.student_iters, s.student_lr, save, heldout_curve=True,
                                  xtok=xtok)
        data["teacher"] = {"load": self.results["teacher"]["checkpoint"]}
        data["kd"] = {"mode": mode, "kind": "forward_kl", "temperature": s.kd_temperature, "alpha": s.kd_alpha,
                      "alpha_schedule": "constant"}
        if mode == "online":  # the held-out curves are LM losses: no teacher forward in evaluation (~6 s/student)
            data["kd"]["eval_with_teacher"] = False
        if xtok:  # the teacher re-reads the same text with its own tokenizer in the job (issue 17)
            data["teacher"]["tokenizer"] = self.tokenizer_path
            data["kd"].update(cross_tokenizer=cross_tokenizer, alpha=s.xtok_alpha)
        if mode == "offline":  # store: logits = the top-k store, sampled = the draws
            data["kd"]["logits_store"] = (self.sampled_store() if store == "sampled" else self.results[store])["store"]
            data["kd"]["target_kind"] = "weights" if store == "sampled" else "logprobs"
            if store == "logits":  # top-k: its own α (sizes.topk_alpha), + remainder bucket (sizes.kd_residual)
                data["kd"]["alpha"] = s.topk_alpha
                if s.kd_residual and s.kd_temperature == 1.0:
                    data["kd"]["residual"] = True
        cfg = build_config(DistillConfig, data)
        t0 = time.perf_counter()
        result = run_distill(cfg)
        return {"checkpoint": str(save), "wall_time_s": round(time.perf_counter() - t0, 2),
                "iterations": result["iteration"], "metrics": str(save / "metrics.jsonl"),
                "tokens": s.student_iters * s.global_batch_size * s.seq_length, "config": data["kd"]}

    def teacher(self) -> dict[str, Any]:
        s = self.size
        # The teacher and the reference train with megatron's full-logits loss (train.fused_lm_loss=false):
        # the fused loss is the same maths, but its float rounding moves a 300-step trajectory, and every
        # KD student's one-seed gain moves with the teacher (by up to 0.1 nats, docs/quickstart.md), so
        # they stay the recorded teacher and reference; the students use the fused loss (default).
        return self._pretrain(s.teacher, self.prefix("train"), s.teacher_iters, s.teacher_lr, "teacher",
                              fused_lm_loss=False)

    def reference(self) -> dict[str, Any]:
        s = self.size
        return self._pretrain(s.reference, self.prefix("reference"), s.reference_iters, s.teacher_lr, "reference",
                              fused_lm_loss=False)

    # ------------------------------------------------------------------ MiniPLM and logits
    def miniplm(self) -> dict[str, Any]:
        """Score the train split (teacher NLL from the ``logits`` stage's store, reference NLL by a forward)
        and keep the top ``miniplm_alpha`` by r = NLL_ref - NLL_teacher."""
        from megatron_kd.miniplm.score import ScoreConfig, score_corpus
        from megatron_kd.miniplm.select import SelectConfig, select_corpus

        scores = self.out / "miniplm" / "scores"
        logits = self.results.get("logits") or {}
        # A run resumed from before the shared teacher pass has a store without label log-probs.
        teacher_store = logits["store"] if logits.get("label_logprobs") else None
        score_corpus(ScoreConfig(teacher=self.results["teacher"]["checkpoint"],
                                 reference=self.results["reference"]["checkpoint"], data=self.prefix("train"),
                                 out=str(scores), chunk_length=self.size.seq_length, overwrite=True,
                                 teacher_store=teacher_store))
        report = select_corpus(SelectConfig(scores=str(scores), alpha=self.size.miniplm_alpha,
                                            out=self.prefix("miniplm"), overwrite=True))
        return {"scores": str(scores), "prefix": self.prefix("miniplm"), "report": report,
                "teacher_nll": "logits store" if teacher_store else "teacher forward"}

    def logits(self) -> dict[str, Any]:
        """ONE teacher pass over the train split writes both offline stores and the teacher's NLL for
        MiniPLM: the top-k store (top-p/top-k log-probs, plus the label log-probs ``miniplm`` reads) and
        the sampled store (``size.sample_draws`` teacher draws per position, unbiased weights; issue 16)."""
        from megatron_kd.logits.precompute import PrecomputeConfig, precompute_stores

        s = self.size

        def store(name: str, method: str, labels: bool = False) -> PrecomputeConfig:
            # overlap 0 and seq_length windows: the label log-probs line up with MiniPLM's chunks
            return PrecomputeConfig(
                teacher=self.results["teacher"]["checkpoint"], data=self.prefix("train"), out=str(self.out / name),
                top_p=s.top_p, top_k=s.top_k, seq_length=s.seq_length, overlap=0, method=method,
                num_samples=s.sample_draws, seed=self.seed, audit_fraction=s.audit_fraction, label_logprobs=labels,
                # the training micro-batch (16 rows) rather than the default 4: a quarter of the forwards,
                # ~20% less stage time; the stores' bytes are unchanged (the label log-probs move in the
                # last bits on a few positions: the teacher's matmuls block by rows differently)
                micro_batch_size=s.micro_batch_size)

        topk, sample = precompute_stores([store("logits_store", "topk", labels=True),
                                          store("logits_store_sample", "sample")])
        return {"store": str(self.out / "logits_store"), "summary": topk, "method": "topk", "label_logprobs": True,
                "sampled": {"store": str(self.out / "logits_store_sample"), "summary": sample, "method": "sample"}}

    def sampled_store(self) -> dict[str, Any]:
        """The sampled store's result (written by the ``logits`` stage; by its own stage before 2026-12-06)."""
        if "sampled" in self.results.get("logits", {}):
            return self.results["logits"]["sampled"]
        if "logits_sampled" in self.results:
            return self.results["logits_sampled"]
        raise ValueError(f"the logits stage of {self.out} wrote no sampled store (an older run): rerun with a new "
                         "--out")

    # ------------------------------------------------------------------ students and evaluation
    def student(self, name: str) -> dict[str, Any]:
        s = self.size
        if name == "no_kd":
            return self._pretrain(s.student, self.prefix("train"), s.student_iters, s.student_lr, name, True)
        if name == "online_kd":
            return self._distill(name, self.prefix("train"), "online")
        if name == "offline_kd":
            return self._distill(name, self.prefix("train"), "offline")
        if name == "offline_sampled_kd":
            return self._distill(name, self.prefix("train"), "offline", store="sampled")
        if name == "xtok_no_kd":  # its own vocabulary, no KD: the twin of xtok_kd (and vs no_kd in bits/byte)
            out = self._pretrain(s.student, self.prefix("xtok_train"), s.student_iters, s.student_lr, name, True,
                                 xtok=True)
            return {**out, "baseline": "no_kd", "compare_metric": "bits_per_byte"}
        if name == "xtok_kd":
            out = self._distill(name, self.prefix("xtok_train"), "online", cross_tokenizer=s.xtok_loss)
            return {**out, "baseline": "xtok_no_kd", "compare_metric": "bits_per_byte"}
        if name == "miniplm_data":
            return self._pretrain(s.student, self.results["miniplm"]["prefix"], s.student_iters, s.student_lr, name,
                                  True)
        if name == "miniplm_kd":
            return self._distill(name, self.results["miniplm"]["prefix"], "online")
        raise ValueError(f"unknown student {name!r}")

    def evaluate(self, name: str) -> dict[str, Any]:
        """Held-out loss, bits per byte, ECE and per-document sums of one model (``heldout.py``); the
        own-tokenizer students on the same held-out documents in their own tokenisation."""
        from megatron_kd.quickstart.heldout import evaluate_per_document

        xtok = name.startswith("xtok_")
        return evaluate_per_document(self.results[name]["checkpoint"], self.prefix("xtok_heldout" if xtok else "heldout"),
                                     seq_length=self.size.seq_length,
                                     tokenizer=self.results["xtok_tokenizer"]["path"] if xtok else self.tokenizer_path,
                                     max_documents=self.size.eval_docs, bins=self.size.calibration_bins)

    # ------------------------------------------------------------------ the stage graph
    def stage_specs(self) -> list[StageSpec]:
        """Every stage with the stages it needs (its inputs are those stages' markers and outputs) and
        its estimated cost (:data:`STAGE_COST`), in the order a ``--workers 1`` run used to take them."""
        def spec(name: str, *deps: str) -> StageSpec:
            return StageSpec(name, deps, STAGE_COST.get(name, STAGE_COST["eval"] if name.startswith("eval_") else 5.0),
                             lendable=name in LENDABLE_STAGES)

        data = ("tokenizer", "preprocess")
        specs = [spec("corpus"), spec("tokenizer", "corpus"), spec("preprocess", "tokenizer")]
        xtok = ("xtok_tokenizer", "xtok_preprocess")
        if self.size.xtok_vocab_size:
            specs += [spec("xtok_tokenizer", "corpus"), spec("xtok_preprocess", "xtok_tokenizer")]
        # logits: one teacher pass -> both stores + the teacher NLL that miniplm reads (no second teacher pass)
        specs += [spec("teacher", *data), spec("reference", *data), spec("logits", "teacher"),
                  spec("miniplm", "teacher", "reference", "logits")]
        needs = {"no_kd": data, "online_kd": ("teacher",), "offline_kd": ("logits",),
                 "miniplm_data": ("miniplm",), "miniplm_kd": ("miniplm", "teacher"),
                 "offline_sampled_kd": ("logits",), "xtok_no_kd": xtok, "xtok_kd": ("teacher", *xtok)}
        students = [name for name, _ in students_of(self.size)]
        specs += [spec(name, *needs[name]) for name in students]
        specs += [spec(f"eval_{name}", name) for name in ["teacher", "reference"] + students]
        return specs

    def stage_fn(self, name: str) -> Callable[[], dict[str, Any]]:
        """The function that computes stage ``name`` (from ``self.results`` of the stages it needs)."""
        fixed = {"corpus": self.corpus, "tokenizer": self.tokenizer, "preprocess": self.preprocess,
                 "xtok_tokenizer": lambda: self.tokenizer(xtok=True), "xtok_preprocess": lambda: self.preprocess(xtok=True),
                 "teacher": self.teacher, "reference": self.reference, "miniplm": self.miniplm,
                 "logits": self.logits}
        if name in fixed:
            return fixed[name]
        if name.startswith("eval_"):
            return lambda: self.evaluate(name[len("eval_"):])
        if name in dict(students_of(self.size)):
            return lambda: self.student(name)
        raise ValueError(f"unknown quickstart stage {name!r}")

    def completed(self) -> set[str]:
        """Stages with a marker (done by an earlier or a parallel run)."""
        if not self.stage_dir.is_dir():
            return set()
        return {p.stem for p in self.stage_dir.glob("*.json") if not p.name.startswith(".")}

    def load_completed(self) -> None:
        """Read every completed stage's marker into ``self.results`` (a worker's view of the inputs)."""
        for name in sorted(self.completed()):
            self.results[name] = read_json(self.stage_dir / f"{name}.json", "stage marker")

    def run_stage(self, name: str, worker: int | None = None) -> dict[str, Any]:
        """Run one stage (its inputs: the markers of the stages it needs) and write its marker."""
        spec = next((s for s in self.stage_specs() if s.name == name), None)
        if spec is None:
            raise ValueError(f"unknown quickstart stage {name!r}")
        self.load_completed()
        missing = [d for d in spec.deps if d not in self.results]
        if missing:
            raise ValueError(f"stage {name} needs {missing}, which have not completed")
        return self._stage(name, self.stage_fn(name), worker=worker)

    def run(self, workers: int = 1, threads: int = 1) -> dict[str, Any]:
        """Run (or resume) every stage; write the report; return report.json's content.

        ``workers`` = 1: every stage in this process, one after another; more: up to ``workers`` stages
        at once, each in a worker process (:mod:`megatron_kd.quickstart.schedule`). ``threads``: torch
        threads of every stage, in either mode (a stage's numbers depend on it, never on ``workers``)."""
        from megatron_kd.quickstart.report import write_report
        from megatron_kd.quickstart.schedule import Progress, StageFailed, priority_order, run_parallel
        from megatron_kd.utils.exits import one_line

        if workers < 1 or threads < 1:
            raise ValueError(f"--workers {workers} / --threads {threads}: both must be at least 1")
        t0 = time.perf_counter()
        specs = self.stage_specs()
        done = self.completed() & {s.name for s in specs}
        self.load_completed()
        for name in [n for n in priority_order(specs) if n in done]:
            self.log(f"[quickstart] {name}: done earlier ({self.results[name].get('seconds', 0):.1f} s), skipped")
        timeline: dict[str, dict] = {}
        if workers == 1:
            set_stage_threads(threads)
            progress = Progress(specs, done, 1)
            for name in priority_order(specs):
                if name in done:
                    continue
                start = time.perf_counter() - t0
                try:
                    result = self._stage(name, self.stage_fn(name), worker=0)
                except Exception as exc:
                    import traceback

                    trace = self.out / "logs" / "worker0.log"
                    trace.parent.mkdir(parents=True, exist_ok=True)
                    with open(trace, "a", encoding="utf-8") as fh:
                        fh.write(f"=== stage {name} failed\n{traceback.format_exc()}")
                    raise StageFailed(name, one_line(exc), str(trace)) from exc
                timeline[name] = {"worker": 0, "start": round(start, 2), "end": round(time.perf_counter() - t0, 2),
                                  "seconds": result["seconds"]}
                progress.finished(name, result["seconds"])
                self.log(progress.line())
        else:
            from megatron_kd.utils.host_memory import host_malloc_env

            # glibc malloc keeps freed blocks in the workers (fewer page faults, same numbers; utils.host_memory)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "TOKENIZERS_PARALLELISM": "false", **host_malloc_env()}
            timeline = run_parallel(specs, done, workers,
                                    ["--out", str(self.out), "--size", self.size.name, "--seed", str(self.seed),
                                     "--threads", str(threads)], self.out / "logs", self.log, env, threads=threads)
            self.load_completed()
        students = students_of(self.size)
        self.evals = {name: self.results[f"eval_{name}"] for name in ["teacher", "reference"] + [n for n, _ in students]}
        wall = time.perf_counter() - t0
        schedule = {"workers": workers, "threads_per_stage": threads, "wall_seconds": round(wall, 1),
                    "resumed_stages": sorted(done), "timeline": timeline}
        self.log(f"[quickstart] all {len(specs)} stages done in {wall:.0f} s wall time "
                 f"({workers} worker{'s' if workers > 1 else ''}, {threads} thread{'s' if threads > 1 else ''} each)")
        return write_report(self, wall, schedule=schedule)


def set_stage_threads(threads: int) -> None:
    """Fix torch's intra-op threads for the stages run in this process (floating-point sums depend on it)."""
    import torch

    torch.set_num_threads(threads)


def run_quickstart(out: str | Path, size: str = "full", seed: int = 1234, workers: int | None = None,
                   threads: int = 1) -> dict[str, Any]:
    """Run the whole pipeline under ``out`` at ``size`` (``tiny`` | ``full``) with ``workers`` stages at
    once (default :func:`~megatron_kd.quickstart.schedule.default_workers`) and ``threads`` torch
    threads per stage; return the report."""
    from megatron_kd.quickstart.schedule import default_workers

    if size not in SIZES:
        raise ValueError(f"--size {size!r}: choose one of {sorted(SIZES)}")
    return Quickstart(out, SIZES[size], seed).run(default_workers() if workers is None else workers, threads)
