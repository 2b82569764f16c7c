"""``megatron-kd logits``: precompute (or verify) an offline teacher-logits store."""
from __future__ import annotations

import argparse
import json
import sys

from megatron_kd.commands._flags import flag


def register(subparsers) -> None:
    """Add the ``logits`` sub-command."""
    p = subparsers.add_parser(
        "logits", help="run a teacher over an indexed dataset and store its top-p/top-k distributions",
        description="Precompute the teacher's truncated distributions (top-p, then top-k) for every position of "
                    "an indexed dataset into a sharded, resumable store keyed by (document, offset). Launch with "
                    "torchrun for TP/PP/DP; re-run the same command to resume. See docs/logits_store.md.")
    p.add_argument("--teacher", default=None, help="teacher checkpoint directory (megatron-kd layout)")
    p.add_argument("--data", default=None, help="indexed dataset prefix (path without .bin/.idx)")
    flag(p, "--output", dest="out", default=None, help="store directory to create, resume or verify")
    p.add_argument("--method", default="topk", choices=["topk", "sample", "topk+sample"],
                   help="what is kept per position: topk (top-p/top-k log-probs, default), sample (N i.i.d. "
                        "teacher draws: unbiased weighted targets) or topk+sample (exact head + sampled tail)")
    p.add_argument("--num-samples", type=int, default=24,
                   help="sample / topk+sample: draws per position (default 24)")
    p.add_argument("--proposal-temperature", type=float, default=1.0,
                   help="sample / topk+sample: draw from r ∝ p^(1/tau) (default 1: the teacher itself)")
    p.add_argument("--seed", type=int, default=1234, help="sampling / audit seed (default 1234)")
    p.add_argument("--audit-fraction", type=float, default=0.0,
                   help="fraction of positions whose dense teacher distribution is kept for --stats (default 0)")
    p.add_argument("--stats", default=None, metavar="STORE",
                   help="print size and fidelity statistics of STORE (per store and per shard) and exit")
    p.add_argument("--json", action="store_true", help="with --stats: print one JSON object instead of a table")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass kept per token (default 0.95)")
    p.add_argument("--top-k", type=int, default=100, help="cap on kept ids per token, 1..255 (default 100)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="teacher window in tokens; students may use any sequence length up to it "
                        "(default min(1024, the teacher's max_position_embeddings))")
    p.add_argument("--overlap", type=int, default=0,
                   help="context tokens a window re-reads from the previous window of the same document "
                        "(default 0: non-overlapping document-aligned windows)")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="rows of --seq-length tokens per teacher forward (default 4)")
    p.add_argument("--shard-tokens", type=int, default=1 << 22,
                   help="dataset tokens per shard, the unit of resumption and DP work (default 4194304)")
    p.add_argument("--value-step", type=float, default=1.0 / 16,
                   help="log-prob quantisation step in nats (default 0.0625: <= 0.031 nats error per entry)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="teacher weights dtype (default bf16 on GPU, fp32 on CPU)")
    flag(p, "--tensor-parallel", type=int, default=1, help="teacher tensor-parallel size (default 1)")
    flag(p, "--pipeline-parallel", type=int, default=1, help="teacher pipeline-parallel size (default 1)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: latest)")
    p.add_argument("--tokenizer", default=None,
                   help="teacher tokenizer (default: the one the checkpoint carries, CKPT/tokenizer)")
    p.add_argument("--max-shards", type=int, default=None,
                   help="stop after this many shards per data-parallel rank (resume later; default: all)")
    p.add_argument("--byte-key-tokenizer", default=None, metavar="TOKENIZER",
                   help="tokenizer of --data for the byte-offset key that lets students of any tokenizer use the "
                        "store (default: the dataset manifest's, else the teacher's; 'none' = no key)")
    p.add_argument("--also-store", action="append", default=[], metavar="DIR[:METHOD]",
                   help="write another store DIR in the same teacher pass (repeatable), keeping METHOD (topk | "
                        "sample | topk+sample; default --method) with the other flags of this command: e.g. "
                        "--output stores/topk --also-store stores/sampled:sample costs one teacher forward, not two")
    p.add_argument("--label-logprobs", action="store_true",
                   help="also keep the teacher's log-prob of the actual next token at every position (4 bytes per "
                        "token) in --output: `megatron-kd miniplm score --teacher-store` then reads the teacher's "
                        "NLL from the store instead of running the teacher again")
    p.add_argument("--verify", action="store_true",
                   help="only check the store at --output (manifest, sizes, sha256 of every shard) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``megatron-kd logits``."""
    if args.stats:
        from megatron_kd.logits.stats import format_stats, store_stats

        stats = store_stats(args.stats)
        print(json.dumps(stats) if args.json else format_stats(stats))
        return 0
    if not args.out:
        raise ValueError("--output STORE is required (or pass --stats STORE)")
    if args.verify:
        from megatron_kd.logits.store import verify_store

        problems = verify_store(args.out)
        for line in problems:
            print(f"megatron-kd logits --verify: {line}", file=sys.stderr)
        if not problems:
            print(f"logits store {args.out}: OK")
        return 1 if problems else 0
    if not args.teacher or not args.data:
        raise ValueError("--teacher and --data are required (or pass --verify to check an existing store)")
    from dataclasses import replace

    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_stores
    from megatron_kd.runtime import destroy_distributed, is_main_process

    cfg = PrecomputeConfig(
        teacher=args.teacher, data=args.data, out=args.out, top_p=args.top_p, top_k=args.top_k,
        seq_length=args.seq_length, overlap=args.overlap, micro_batch_size=args.micro_batch_size,
        shard_tokens=args.shard_tokens, value_step=args.value_step, dtype=args.dtype,
        tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
        iteration=args.iteration, max_shards=args.max_shards, method=args.method, num_samples=args.num_samples,
        proposal_temperature=args.proposal_temperature, seed=args.seed, audit_fraction=args.audit_fraction,
        tokenizer=args.tokenizer, byte_key_tokenizer=args.byte_key_tokenizer, label_logprobs=args.label_logprobs)
    cfgs = [cfg] + [replace(cfg, out=out, method=method, label_logprobs=False)
                    for out, method in (parse_also_store(v, args.method) for v in args.also_store)]
    for c in cfgs:
        c.validate()  # bad --num-samples / --proposal-temperature fail here, before any work
    try:
        summaries = precompute_stores(cfgs)
        if is_main_process():
            for c, summary in zip(cfgs, summaries):
                print(json.dumps(summary if len(cfgs) == 1 else {"store": c.out, "method": c.method, **summary}))
    finally:
        destroy_distributed()
    return 0


def parse_also_store(value: str, default_method: str) -> tuple[str, str]:
    """``DIR[:METHOD]`` of ``--also-store`` -> (DIR, METHOD); one-line error for a bad METHOD."""
    from megatron_kd.logits.selection import METHODS

    out, sep, method = value.rpartition(":")
    if not sep:
        return value, default_method
    if method not in METHODS:
        raise ValueError(f"--also-store {value}: {method!r} is not a method ({', '.join(METHODS)}); "
                         "write DIR or DIR:METHOD")
    if not out:
        raise ValueError(f"--also-store {value}: the store directory is missing; write DIR or DIR:METHOD")
    return out, method
