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
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from megatron_kd.quickstart import run_quickstart

    report = run_quickstart(args.out, args.size, args.seed)
    print(f"quickstart: report written to {args.out}/report.md")
    for line in report["conclusions"]:
        print(f"  {line}")
    return 0
