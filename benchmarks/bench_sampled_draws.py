"""The sampled store's draws (``megatron_kd.logits.sampling.draw_tokens``) on CPU, printed as JSON.

Times ``draw_tokens`` and the whole sampled-store selector (``TargetSelector(method="sample")``:
draws, their sort into counts, the audit sample) on ``--rows`` random rows of ``--vocab`` logits,
with the C kernel (``native.draw_native``) and with the torch path (``MEGATRON_KD_NATIVE=0``) in
interleaved rounds; medians of the process CPU time, one intra-op thread (fixed here, before torch is
imported, so a plain invocation gives the figure). Checks that both paths draw the same ids.

Usage::

    python benchmarks/bench_sampled_draws.py                      # 2,048 rows x V 4,096, 12 draws
    python benchmarks/bench_sampled_draws.py --vocab 151936 --rows 256 --draws 24
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402

from megatron_kd.logits import native  # noqa: E402
from megatron_kd.logits.sampling import draw_tokens  # noqa: E402
from megatron_kd.logits.selection import TargetSelector  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="positions per call")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size V")
    ap.add_argument("--draws", type=int, default=12, help="draws per position N")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each times both paths)")
    ap.add_argument("--scale", type=float, default=3.0, help="logit standard deviation")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.vocab, generator=g) * args.scale
    pos = torch.arange(args.rows) * 7919 + 12345
    selector = TargetSelector(method="sample", num_samples=args.draws, seed=1234, audit_fraction=0.001)
    cases = {"draw_tokens": lambda: draw_tokens(x, args.vocab, pos, args.draws, 1234),
             "selector": lambda: selector(x, args.vocab, pos)}
    times: dict[str, dict[str, list[float]]] = {p: {c: [] for c in cases} for p in ("c", "torch")}
    outs = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for path in ("c", "torch"):
            os.environ[native.ENV] = "1" if path == "c" else "0"
            for name, fn in cases.items():
                t0 = time.process_time()
                out = fn()
                dt = time.process_time() - t0
                if rnd:
                    times[path][name].append(dt)
                if name == "draw_tokens":
                    outs[path] = out
    os.environ.pop(native.ENV, None)
    ms = {p: {c: round(statistics.median(v) * 1e3, 2) for c, v in d.items()} for p, d in times.items()}
    print(json.dumps({
        "benchmark": "sampled_draws", "machine": platform.processor() or platform.machine(), "threads": 1,
        "clock": "process CPU time", "rows": args.rows, "vocab": args.vocab, "draws": args.draws,
        "rounds": args.rounds, "c_kernel_available": native.available(),
        "ms_per_call": ms,
        "us_per_position": {p: {c: round(v * 1e3 / args.rows, 2) for c, v in d.items()} for p, d in ms.items()},
        "torch_over_c": {c: round(ms["torch"][c] / ms["c"][c], 2) for c in cases},
        "same_draws": bool(torch.equal(outs["c"], outs["torch"])),
    }))


if __name__ == "__main__":
    main()
