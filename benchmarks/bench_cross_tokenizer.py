"""Cross-tokenizer distillation cost on CPU, printed as one JSON line (last line of stdout).

Measures, on a demo-corpus slice with two SentencePiece vocabularies (teacher ``--teacher-vocab``,
student ``--student-vocab``) and a randomly initialised teacher/student pair:

* ``step_time_s``: median optimizer-step time (``step_time_s`` of metrics.jsonl, first step of each
  run dropped) of online distillation, per variant, in interleaved rounds:
  - ``kd_same``: plain online KD (forward KL), student on the teacher's tokenizer;
  - ``xtok_identity_<loss>``: the cross-tokenizer path with the *same* tokenizer on both sides
    (re-tokenisation, alignment, gather and the loss, everything else identical to ``kd_same``);
  - ``xtok_<loss>``: a real cross-tokenizer student (its own smaller vocabulary).
* ``ratio_*``: those step times over ``kd_same`` (the issue's "cross-tokenizer step / same-tokenizer
  KD step"; ``xtok_identity`` isolates the overhead, ``xtok`` also has a smaller student head).
* ``alignment_s_per_1m_tokens``: host time of re-tokenising + aligning student windows
  (``CrossTokenizerDataset.__getitem__`` minus the plain dataset's), per 1M student tokens.
* offline (``--offline``, default on): a top-k store of the teacher with its byte key;
  ``byte_key_s_per_1m_tokens`` (writing the key, per 1M teacher tokens),
  ``offline_lookup_s_per_1m_tokens`` (``ByteKeyedTargetsDataset.__getitem__`` minus the plain
  dataset's, per 1M student tokens; ``offline_same_lookup_s_per_1m_tokens`` the same-tokenizer
  ``TeacherTargetsDataset`` for comparison) and the step times ``offline_same`` (student on the
  teacher's tokenizer) / ``offline_xtok_<loss>`` with ``ratio_offline_xtok_<loss>`` between them.

Usage::

    python benchmarks/bench_cross_tokenizer.py                    # ~5 min on 2 loaded cores
    python benchmarks/bench_cross_tokenizer.py --rounds 2 --iters 6 --losses hybrid
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402


def _prepare(tmp: Path, docs: int, teacher_vocab: int, student_vocab: int) -> None:
    from megatron_kd.data.demo_corpus import build_demo_corpus
    from megatron_kd.data.preprocess import preprocess
    from megatron_kd.data.tokenizers import train_sentencepiece

    build_demo_corpus(str(tmp / "train.jsonl"), max_docs=docs)
    texts = [json.loads(ln)["text"] for ln in (tmp / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    train_sentencepiece(texts, teacher_vocab, str(tmp / "tt"))
    train_sentencepiece(texts, student_vocab, str(tmp / "st"))
    for tok in ("tt", "st"):
        preprocess([str(tmp / "train.jsonl")], str(tmp / tok), str(tmp / f"{tok}.model"), append_eod=True,
                   workers=1, progress=False)


def _common(args, tmp: Path, tok: str) -> list:
    return ["train.micro_batch_size=8", f"train.global_batch_size={8 * args.micro_batches}",
            f"train.seq_length={args.seq_length}", "train.eval_iters=0", "train.eval_interval=0",
            "train.log_interval=0", "logging.quiet=true", "optim.lr_schedule=constant", "optim.lr=1e-3",
            "optim.min_lr=1e-3", "data.split=100,0,0", f"model.max_position_embeddings={args.seq_length}",
            f"data.prefixes=[{tmp}/{tok}_text_document]", f"data.tokenizer={tmp}/{tok}.model"]


def _steps(metrics: Path) -> list[float]:
    recs = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    return [r["step_time_s"] for r in recs if "step_time_s" in r][1:]


def _alignment_cost(tmp: Path, seq_length: int, samples: int) -> dict:
    from megatron_kd.data.gpt_dataset import DataConfig, build_gpt_datasets
    from megatron_kd.data.tokenizers import load_tokenizer
    from megatron_kd.distill.cross_tokenizer import CrossTokenizerDataset

    st = load_tokenizer(tmp / "st.model")
    cfg = DataConfig(train_prefixes=[f"{tmp}/st_text_document"], split="100,0,0", seq_length=seq_length, seed=1,
                     tokenizer=str(tmp / "st.model"))
    train, _, _ = build_gpt_datasets(cfg, st, samples, None, None)
    wrapped = CrossTokenizerDataset(train, st, tmp / "tt.model")
    n = min(samples, len(train))
    wrapped[0]  # warm the byte tables
    t0 = time.perf_counter()
    for i in range(n):
        train[i]
    base = time.perf_counter() - t0
    aligned = 0
    t0 = time.perf_counter()
    for i in range(n):
        aligned += int((wrapped[i]["xtok_index"] >= 0).sum())
    full = time.perf_counter() - t0
    tokens = n * seq_length
    return {"alignment_s_per_1m_tokens": round((full - base) / tokens * 1e6, 3), "alignment_samples": n,
            "aligned_fraction": round(aligned / tokens, 4)}


def _offline_cost(tmp: Path, seq_length: int, samples: int, top_k: int) -> dict:
    from megatron_kd.data.gpt_dataset import DataConfig, build_gpt_datasets
    from megatron_kd.data.tokenizers import load_tokenizer
    from megatron_kd.logits import TeacherTargetsDataset
    from megatron_kd.logits.byte_key import ByteKeyedTargetsDataset, write_byte_key
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits
    from megatron_kd.runtime import destroy_distributed

    store = tmp / "store"
    try:
        precompute_logits(PrecomputeConfig(teacher=str(tmp / "teacher"), data=f"{tmp}/tt_text_document",
                                           out=str(store), top_k=top_k, seq_length=seq_length,
                                           byte_key_tokenizer="none"))
    finally:
        destroy_distributed()
    import numpy as np

    n_teacher = int(np.load(store / "documents.npy")[-1])
    t0 = time.perf_counter()
    write_byte_key(store, f"{tmp}/tt_text_document", str(tmp / "tt.model"))
    key_s = time.perf_counter() - t0
    out = {"byte_key_s_per_1m_tokens": round(key_s / n_teacher * 1e6, 3), "store_top_k": top_k}
    for tok, name in (("st", "offline_lookup_s_per_1m_tokens"), ("tt", "offline_same_lookup_s_per_1m_tokens")):
        t = load_tokenizer(tmp / f"{tok}.model")
        cfg = DataConfig(train_prefixes=[f"{tmp}/{tok}_text_document"], split="100,0,0", seq_length=seq_length,
                         seed=1, tokenizer=str(tmp / f"{tok}.model"))
        train, _, _ = build_gpt_datasets(cfg, t, samples, None, None)
        wrapped = (ByteKeyedTargetsDataset(train, store, tmp / "st.model") if tok == "st"
                   else TeacherTargetsDataset(train, store, check=False))
        n = min(samples, len(train))
        wrapped[0]
        t0 = time.perf_counter()
        for i in range(n):
            train[i]
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n):
            wrapped[i]
        out[name] = round((time.perf_counter() - t0 - base) / (n * seq_length) * 1e6, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=6, help="optimizer steps per run (the first is dropped)")
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--teacher-vocab", type=int, default=1024)
    ap.add_argument("--student-vocab", type=int, default=600)
    ap.add_argument("--losses", default="uld,hybrid,projected")
    ap.add_argument("--align-samples", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--offline", type=int, default=1, help="1: also the byte-keyed offline path (store, lookup, steps)")
    ap.add_argument("--store-top-k", type=int, default=32)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from megatron_kd.config import load_config
    from megatron_kd.distill import DistillConfig
    from megatron_kd.distill.run import run_distill
    from megatron_kd.training import PretrainConfig
    from megatron_kd.training.pretrain import run_pretrain

    teacher = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
               "model.ffn_hidden_size=256"]
    student = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=4",
               "model.ffn_hidden_size=128"]
    losses = [x for x in args.losses.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="bench_xtok_") as d:
        tmp = Path(d)
        _prepare(tmp, args.docs, args.teacher_vocab, args.student_vocab)
        run_pretrain(load_config(PretrainConfig, None, _common(args, tmp, "tt") + teacher + [
            "train.train_iters=1", f"checkpoint.save={tmp}/teacher"]))
        variants = {"kd_same": ("tt", [])}
        for loss in losses:
            variants[f"xtok_identity_{loss}"] = ("tt", [f"kd.cross_tokenizer={loss}"])
            variants[f"xtok_{loss}"] = ("st", [f"kd.cross_tokenizer={loss}"])
        offline = _offline_cost(tmp, args.seq_length, args.align_samples, args.store_top_k) if args.offline else {}
        if args.offline:
            off = ["kd.mode=offline", f"kd.logits_store={tmp}/store"]
            variants["offline_same"] = ("tt", off)
            for loss in losses:
                variants[f"offline_xtok_{loss}"] = ("st", off + [f"kd.cross_tokenizer={loss}"])
        times: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.rounds):
            for name, (tok, extra) in variants.items():
                save = tmp / f"{name}_{r}"
                run_distill(load_config(DistillConfig, None, _common(args, tmp, tok) + student + extra + [
                    f"train.train_iters={args.iters}", f"teacher.load={tmp}/teacher",
                    f"teacher.tokenizer={tmp}/tt.model", f"checkpoint.save={save}", "checkpoint.save_interval=0"]))
                times[name].extend(_steps(save / "metrics.jsonl"))
        med = {k: statistics.median(v) for k, v in times.items()}
        result = {"bench": "cross_tokenizer", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "host": platform.node(), "load_avg": list(os.getloadavg()), "threads": args.threads,
                  "seq_length": args.seq_length, "micro_batch": 8, "teacher_vocab": args.teacher_vocab,
                  "student_vocab": args.student_vocab, "rounds": args.rounds,
                  "step_time_s": {k: round(v, 5) for k, v in med.items()}}
        for k, v in med.items():
            if k.startswith("offline_xtok"):
                result[f"ratio_{k}"] = round(v / med["offline_same"], 3)
            elif k not in ("kd_same", "offline_same"):
                result[f"ratio_{k}"] = round(v / med["kd_same"], 3)
        result.update(_alignment_cost(tmp, args.seq_length, args.align_samples))
        result.update(offline)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
