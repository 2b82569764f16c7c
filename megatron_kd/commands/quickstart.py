"""``megatron-kd quickstart``: the whole pipeline on the embedded demo corpus, on a CPU."""
from __future__ import annotations

import argparse

from megatron_kd.commands._flags import flag


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quickstart``."""
    p = subparsers.add_parser(
        "quickstart", help="run the whole pipeline (corpus → teacher → MiniPLM → logits → students → report) on CPU",
        description="Build the demo corpus, train a tokenizer, a teacher and a MiniPLM reference LM, refine the "
                    "corpus, precompute teacher logits (top-k and sampled), train the students on the same token "
                    "budget and write OUT/report.md, OUT/report.json and plots. Rerunning with the same --out resumes.")
    flag(p, "--output", "--out", dest="out", required=True, help="output directory (created; completed stages are reused)")
    p.add_argument("--size", default="full", choices=["tiny", "full"],
                   help="full: the whole demo corpus, aimed at ~10 min on 2 idle CPU cores; tiny: a few-minute "
                        "smoke run (default: full)")
    p.add_argument("--seed", type=int, default=1234, help="random seed of every stage (default: 1234)")
    p.add_argument("--workers", type=int, default=None,
                   help="stages run at once, each in its own worker process, critical path (the teacher) first; "
                        "1: every stage in this process, one after another (default: usable cores, at most 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of every stage, the same with any --workers (a stage's numbers depend on it, "
                        "so it is fixed rather than derived from --workers; default: 1)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import sys

    from megatron_kd.quickstart import run_quickstart
    from megatron_kd.quickstart.schedule import StageFailed

    try:
        report = run_quickstart(args.out, args.size, args.seed, workers=args.workers, threads=args.threads)
    except StageFailed as exc:  # one line naming the stage; the traceback is in the worker's log
        print(f"megatron-kd quickstart: error: {exc}", file=sys.stderr)
        return 1
    print(f"quickstart: report written to {args.out}/report.md")
    for line in report["conclusions"]:
        print(f"  {line}")
    return 0
