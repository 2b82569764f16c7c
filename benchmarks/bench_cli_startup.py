"""``megatron-kd --help`` / ``megatron-kd <cmd> --help`` latency (issue 13 item 7; target <= 1.0 s).

Each round runs every command's ``--help`` once in a fresh ``python -m megatron_kd`` subprocess
(interleaved rounds, so machine load hits all commands alike); the median over rounds is reported.
Prints one JSON line: {"rounds", "target_s", "median_s": {command: seconds}, "max_median_s", "ok"}.

    python benchmarks/bench_cli_startup.py [--rounds 5]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def commands() -> list[list[str]]:
    """``[]`` (top level) and every command / nested step, as argv prefixes."""
    sys.path.insert(0, str(ROOT))
    from megatron_kd.cli import build_parser

    def walk(parser, prefix):
        found = [prefix]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found.extend(walk(child, prefix + [name]))
        return found

    return walk(build_parser(), [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmds = commands()
    times: dict[str, list[float]] = {" ".join(c) or "(top)": [] for c in cmds}
    for _ in range(args.rounds):
        for c in cmds:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "megatron_kd", *c, "--help"], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[" ".join(c) or "(top)"].append(time.perf_counter() - t0)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    worst = max(med.values())
    print(json.dumps({"bench": "cli_startup", "rounds": args.rounds, "target_s": 1.0, "median_s": med,
                      "max_median_s": worst, "ok": worst <= 1.0}))


if __name__ == "__main__":
    main()
