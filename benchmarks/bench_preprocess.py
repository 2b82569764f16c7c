"""Preprocessing throughput on the embedded demo corpus, 1 vs 2 workers; prints one JSON object.

    PYTHONPATH=$PWD python benchmarks/bench_preprocess.py [--repeats 5] [--vocab-size 4096]

Builds the demo corpus and a SentencePiece BPE tokenizer in a temp directory (or uses
``--corpus``/``--tokenizer``), then times ``preprocess`` end to end (read, tokenize, write,
checksum, manifest; imports and corpus building excluded) alternating worker counts, and reports
the best and median run of each, plus the CPU seconds (this process + worker processes) each
run used: on a shared machine the wall-clock speedup depends on free cores, the CPU ratio does
not (``cpu_bound_speedup`` = workers x CPU(1 worker) / CPU(N workers), capped at N). Also checks
that the outputs are byte-identical.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Published order of magnitude for Megatron-style preprocessing (GPT-2 BPE, many workers).
MEGATRON_REFERENCE = [
    {"source": "bigscience-workshop/Megatron-DeepSpeed PR #18 (2021)",
     "setup": "48 workers, GPT-2 BPE (HF tokenizer)", "docs_per_s": 21903, "mb_per_s": 50.4,
     "note": "the same PR quotes ~15 MB/s for the stock Megatron preprocess_data.py"},
    {"source": "NVIDIA/Megatron-LM PR #3699 (2026, --find-optimal-num-workers)",
     "setup": "HF tokenizer; 4 / 16 workers", "docs_per_s": {"4": 6391.4, "16": 9606.6}},
]


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="JSONL corpus (default: build the demo corpus)")
    parser.add_argument("--tokenizer", help="tokenizer path (default: train a SentencePiece BPE)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocab of the trained tokenizer")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--include-code", action="store_true", help="demo corpus with stdlib source (~15 MB)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from megatron_kd.data.demo_corpus import build_demo_corpus
    from megatron_kd.data.preprocess import preprocess
    from megatron_kd.data.tokenizers import load_tokenizer, train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus or os.path.join(tmp, "demo.jsonl")
        if not args.corpus:
            build_demo_corpus(corpus, include_code=args.include_code)
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
        else:
            with open(corpus, encoding="utf-8") as fh:
                texts = [json.loads(line)["text"] for line in fh]
            tok = train_sentencepiece(texts, args.vocab_size, os.path.join(tmp, "tok"))
        preprocess([corpus], os.path.join(tmp, "warmup"), tok, progress=False)  # warm page cache
        runs: dict[int, list[dict]] = {w: [] for w in args.workers}
        for rep in range(args.repeats):
            for w in args.workers:
                prefix = os.path.join(tmp, f"w{w}")
                c0 = _cpu()
                t0 = time.perf_counter()
                m = preprocess([corpus], prefix, tok, workers=w, overwrite=True, progress=False)
                runs[w].append({"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0,
                                "bytes": m["sources"][0]["bytes"],
                                "tokens": m["num_tokens"], "docs": m["num_documents"],
                                "bin_sha256": m["checksums"]["bin"], "idx_sha256": m["checksums"]["idx"]})
        identical = len({(r["bin_sha256"], r["idx_sha256"]) for rs in runs.values() for r in rs}) == 1
        first = runs[args.workers[0]][0]
        result = {
            "benchmark": "preprocess", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), {platform.system()}",
            "python": platform.python_version(), "tokenizer": tok.describe()["kind"],
            "vocab_size": tok.vocab_size, "corpus_bytes": first["bytes"], "documents": first["docs"],
            "tokens": first["tokens"], "repeats": args.repeats, "outputs_identical": identical,
            "load_average_1min": round(os.getloadavg()[0], 2),
            "workers": {},
        }
        for w, rs in runs.items():
            best = min(r["seconds"] for r in rs)
            med = statistics.median(r["seconds"] for r in rs)
            result["workers"][str(w)] = {
                "best_seconds": round(best, 3), "median_seconds": round(med, 3),
                "mb_per_s": round(first["bytes"] / 1e6 / best, 2),
                "tokens_per_s": round(first["tokens"] / best),
                "docs_per_s": round(first["docs"] / best, 1),
                "median_mb_per_s": round(first["bytes"] / 1e6 / med, 2),
                "cpu_seconds_median": round(statistics.median(r["cpu_seconds"] for r in rs), 3),
            }
        base = result["workers"][str(args.workers[0])]
        for w in args.workers[1:]:
            cur = result["workers"][str(w)]
            cur["speedup_best"] = round(base["best_seconds"] / cur["best_seconds"], 2)
            cur["speedup_median"] = round(base["median_seconds"] / cur["median_seconds"], 2)
            cur["cpu_bound_speedup"] = round(min(w, w * base["cpu_seconds_median"] / cur["cpu_seconds_median"]), 2)
        result["megatron_reference"] = MEGATRON_REFERENCE
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
