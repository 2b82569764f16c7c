"""MiniPLM scoring throughput vs. a plain forward pass of the same two models (issue 8).

For each scenario the same instances are processed in interleaved rounds (one untimed warm-up
round, then ``--repeats`` timed ones; medians are reported):

* plain forward (the baseline of ``ratio_scoring_vs_plain_forward``): the scorer's own
  micro-batches (same shards, plan and shapes), built in memory beforehand, through both models
  under ``no_grad``, each ending like a forward that makes the logits of the scored (real)
  positions: the scorer's captured output layer, then one matmul over those rows. This is the
  scorer's path without the NLL, the data loading and the store writes;
* model forward (``ratio_scoring_vs_model_forward``, the baseline before 2026-12-06): the same
  batches through ``model(tokens)``, i.e. megatron's output layer over every position, padding
  included, and its [b, s, V] transposed copy of the logits;
* scoring: ``miniplm score`` end to end on the indexed dataset (its shard loop: mmap reads,
  batch planning, megatron's forward-only schedule, vocab-parallel NLL, store writes), timed by
  the per-shard seconds it records, plus the whole command (model loading included), once per
  NLL kernel (``eager``: torch's cross-entropy kernel; ``compiled``: torch.compile'd fused
  log-sum-exp, compiled during the warm-up round).

tokens/s counts instance tokens in all. On the CPU, time is the process's CPU time
(``time.process_time``) at a fixed thread count (default 1): the machine is shared by many jobs,
and wall-clock time of a single-threaded run mostly measures the waiting for a core. On a GPU it
is wall-clock time. Prints one JSON line (``min_ratio_scoring_vs_plain_forward``: the smallest
ratio over scenarios and kernels; issue 15's target is 0.95).

    PYTHONPATH=$PWD python benchmarks/bench_miniplm.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: spinning OpenMP threads would count as CPU time
import torch  # noqa: E402


def _save_models(root: Path, vocab: int, teacher: str, reference: str) -> tuple[str, str]:
    from megatron_kd.models import build_gpt_model, get_preset
    from megatron_kd.runtime import set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    out = []
    for i, (name, preset) in enumerate((("teacher", teacher), ("reference", reference))):
        set_seed(i)
        cfg = get_preset(preset, vocab_size=vocab, max_position_embeddings=4096)
        save_checkpoint(root / name, [build_gpt_model(cfg)], cfg, 1, tokenizer="bench")
        out.append(str(root / name))
    return out[0], out[1]


def _dataset(root: Path, name: str, lengths: list[int], vocab: int) -> str:
    from megatron_kd.miniplm.dataset_io import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(root / name, np.int32, {"tokenizer": "bench"}) as w:
        for n in lengths:
            w.add(rng.integers(0, vocab, n))
    return str(root / name)


def _clock(dev) -> float:
    return time.perf_counter() if dev.type == "cuda" else time.process_time()


SHARD_SIZE = 256
"""Instances per store shard of the benchmark's scoring runs."""


def _scoring_batches(data: str, chunk: int, mbs: int, dev) -> tuple[list[dict], int]:
    """The scorer's own micro-batches (same shards, windows, plan and shapes), built in memory;
    and the instance tokens."""
    from megatron_kd.miniplm.batching import build_microbatch, plan_steps
    from megatron_kd.miniplm.dataset_io import open_dataset
    from megatron_kd.miniplm.instances import scoring_windows, split_instances
    from megatron_kd.miniplm.store import shard_bounds

    ds = open_dataset(data)
    inst = split_instances(np.asarray(ds.sequence_lengths), chunk)
    pad = 8 if dev.type == "cuda" else 1  # the scorer's --pad-multiple auto
    batches = []
    for k in range(-(-len(inst) // SHARD_SIZE)):
        start, end = shard_bounds(k, SHARD_SIZE, len(inst))
        windows, _ = scoring_windows(inst[start:end], chunk)
        for step in plan_steps(windows["length"], mbs * chunk, 1, pad, chunk - 1):
            batches.extend(build_microbatch(ds, windows, rows, step.seq_length, dev) for rows in step.rows)
    return batches, int(inst["length"].astype(np.int64).sum())


def install_logits_head(model) -> None:
    """``model(tokens, pos, None, labels=labels)`` ends like a plain forward that makes the logits of
    the real (label >= 0) positions: the scorer's captured output layer, then one matmul over those
    rows (a [tokens, V] tensor, as a forward returns), and no loss. Returns a dummy [b, s]."""
    import types

    from megatron_kd.models.head import capture_for

    cap = capture_for(model)
    cap.active = True

    def compute_language_model_loss(self, labels, hidden):
        weight = cap.pop_weight()
        s, b, h = hidden.shape
        real = torch.nonzero(labels.transpose(0, 1).reshape(-1) >= 0).reshape(-1)
        torch.matmul(hidden.reshape(s * b, h).index_select(0, real).to(weight.dtype), weight.t())
        return torch.zeros(b, s, device=hidden.device)

    model.compute_language_model_loss = types.MethodType(compute_language_model_loss, model)


def _plain_forward(models, batches: list[dict], dev, head: bool) -> float:
    """Seconds of a bare forward of both models over ``batches`` (tensors already in memory).

    ``head``: the models were set up with :func:`install_logits_head` (logits of the real positions,
    the scorer's path without the NLL); else the model's own forward (logits of every position in
    [b, s, V], the older baseline)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = _clock(dev)
    with torch.no_grad():
        for b in batches:
            for m in models:
                if head:
                    m(b["tokens"], b["position_ids"], None, labels=b["labels"])
                else:
                    m(b["tokens"], b["position_ids"], None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return _clock(dev) - t0


def _score(teacher: str, reference: str, data: str, out: Path, chunk: int, mbs: int, dev,
           kernel: str) -> tuple[float, float]:
    from megatron_kd.miniplm.score import ScoreConfig, score_corpus
    from megatron_kd.utils.progress import read_jsonl

    shutil.rmtree(out, ignore_errors=True)
    t0 = _clock(dev)
    score_corpus(ScoreConfig(teacher=teacher, reference=reference, data=data, out=str(out), chunk_length=chunk,
                             micro_batch_size=mbs, shard_size=SHARD_SIZE, nll_kernel=kernel))
    total = _clock(dev) - t0
    key = "seconds" if dev.type == "cuda" else "cpu_seconds"
    loop = sum(r[key] for r in read_jsonl(out / "metrics.jsonl"))
    return loop, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="cpu-teacher", help="teacher model preset")
    ap.add_argument("--reference", default="cpu-student", help="reference model preset")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    ap.add_argument("--chunk-length", type=int, default=256, help="instance length")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="rows per batch at full length")
    ap.add_argument("--tokens", type=int, default=16384, help="corpus tokens per scenario")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved timed rounds after one warm-up round; medians are reported")
    ap.add_argument("--kernels", default="eager",
                    help="NLL kernels to measure, comma-separated (default: eager, what --nll-kernel auto runs on "
                         "CPU; add compiled to time the torch.compile kernel too)")
    ap.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    ap.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]),
                    help="torch intra-op threads (default: OMP_NUM_THREADS, else 1)")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats = 8192, 1

    from megatron_kd.runtime import ParallelConfig, device, init_distributed
    from megatron_kd.training.checkpoint import load_model_for_inference

    torch.set_num_threads(max(1, args.threads))
    init_distributed(ParallelConfig())
    dev = device()
    root = Path(tempfile.mkdtemp(prefix="bench_miniplm_"))
    try:
        teacher, reference = _save_models(root, args.vocab, args.teacher, args.reference)
        dtype = "bf16" if dev.type == "cuda" else "fp32"
        models = [load_model_for_inference(p, dtype)[0] for p in (teacher, reference)]
        head_models = [load_model_for_inference(p, dtype)[0] for p in (teacher, reference)]
        for m in head_models:
            install_logits_head(m)
        c = args.chunk_length
        rng = np.random.default_rng(1)
        scenarios = {
            # the paper's setting: every instance a full chunk
            "full_chunks": [c * 4] * max(1, args.tokens // (c * 4)),
            # ragged documents: short tails and short documents need padding
            "ragged_documents": [int(x) for x in rng.integers(c // 8, 3 * c, max(1, args.tokens // (3 * c // 2)))],
        }
        kernels = args.kernels.split(",")
        results = {}
        for name, lengths in scenarios.items():
            data = _dataset(root, name, lengths, args.vocab)
            batches, tokens = _scoring_batches(data, c, args.micro_batch_size, dev)
            times: dict[str, list] = {"plain": [], "model": [], **{k: [] for k in kernels},
                                      **{f"{k}_end_to_end": [] for k in kernels}}
            for r in range(args.repeats + 1):  # round 0 warms up (and compiles the compiled kernel, once)
                round_times = {"plain": _plain_forward(head_models, batches, dev, head=True),
                               "model": _plain_forward(models, batches, dev, head=False)}
                for k in kernels:
                    round_times[k], round_times[f"{k}_end_to_end"] = _score(
                        teacher, reference, data, root / f"scores_{name}", c, args.micro_batch_size, dev, k)
                if r:
                    for key, t in round_times.items():
                        times[key].append(t)
            med = {key: float(np.median(v)) for key, v in times.items()}
            results[name] = {"tokens": tokens, "plain_forward_tokens_per_s": round(tokens / med["plain"], 1),
                             "model_forward_tokens_per_s": round(tokens / med["model"], 1)}
            for k in kernels:
                results[name][f"nll_{k}"] = {
                    "scoring_tokens_per_s": round(tokens / med[k], 1),
                    "scoring_end_to_end_tokens_per_s": round(tokens / med[f"{k}_end_to_end"], 1),
                    "ratio_scoring_vs_plain_forward": round(med["plain"] / med[k], 3),
                    "ratio_scoring_vs_model_forward": round(med["model"] / med[k], 3),
                    "ratio_per_round": [round(p / t, 3) for p, t in zip(times["plain"], times[k])],
                }
        print(json.dumps({
            "benchmark": "miniplm_scoring", "device": str(dev),
            "clock": "wall" if dev.type == "cuda" else "process_cpu_time", "threads": torch.get_num_threads(),
            "teacher": args.teacher, "reference": args.reference, "vocab": args.vocab, "chunk_length": c,
            "micro_batch_size": args.micro_batch_size, "dtype": dtype, "repeats": args.repeats,
            "load_average": os.getloadavg()[0],
            "scenarios": results, "target_ratio": 0.9, "target_ratio_issue15": 0.95,
            "min_ratio_scoring_vs_plain_forward": min(
                (v["ratio_scoring_vs_plain_forward"] for r in results.values() for v in r.values()
                 if isinstance(v, dict)), default=None),
        }))  # one line, the last line of stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
