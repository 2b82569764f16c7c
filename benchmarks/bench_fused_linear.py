#!/usr/bin/env python
"""Fused output layer + KD loss vs. the plain torch form: peak memory and time of forward+backward.

Cases (student hidden [BT, H] and output weight [V, H], an online teacher's hidden [BT, H] and
weight [V, H], LM cross-entropy + forward KL at alpha 0.5):

* ``torch``: ``logits = h @ W.T`` for both, ``0.5 * CE + 0.5 * KL(softmax(t) || softmax(s))``
  with ``log_softmax``/``kl_div``, plain autograd (the [BT, V] logits, their log-softmax and
  gradient are materialised);
* ``fused``: :func:`megatron_kd.losses.fused_linear_kd` (chunks of tokens, analytic gradients;
  no [BT, V] tensor).

On a GPU the peak is ``torch.cuda.max_memory_allocated`` above the inputs (weights included) and
the time the median of ``--repeats`` CUDA-synchronised runs; on CPU (small shapes, for checking)
the wall time only. Liger-Kernel's FusedLinearJSD reports 8.7 GB vs 56.4 GB for torch at
BT = 8k, V = 128k, H = 4096 on an H100 (no tensor parallelism). Prints one JSON line last.

    python benchmarks/bench_fused_linear.py                        # GPU: BT 8192, V 151936, H 4096, bf16
    python benchmarks/bench_fused_linear.py --bt 256 --vocab 4096 --hidden 64 --dtype fp32   # CPU check
    python benchmarks/bench_fused_linear.py --compile        # kd.compile: eager vs torch.compile chunk kernels

``--compile`` (issue 15 item 4) compares the eager chunk kernels of the fused loss with the
``torch.compile`` ones (:mod:`megatron_kd.losses.compiled`) at 1 thread on the CPU clock: per chunk
(``kd_lm_chunk`` on a [chunk, V] block: LM only, online forward KL, offline sparse top-100) and per
fused output layer + loss step (``fused_linear_kd`` forward + backward), at the default distill
shape (V = 8192, chunk 512, H = 128, 2048 tokens) and at V = 151,936 (chunk 64, H = 896, 128
tokens). Rounds are interleaved (eager, compiled, eager, ...) after warm-up; medians, and the
spread of the per-round compiled/eager ratios (``compiled_over_eager`` and its ``_lo``/``_hi`` =
min/max). Compilation time (``first_call_s_wall``: wall time of the first compiled call of a case,
which compiles the kernels no earlier case needed; inductor's on-disk cache makes later processes
faster) and the peak extra resident memory of one step are reported separately. ``--rounds`` / ``--step-rounds`` trade time for precision (default < 3 min).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bt", type=int, default=8192 if gpu else 256, help="tokens (batch x sequence)")
    p.add_argument("--vocab", type=int, default=151936 if gpu else 4096)
    p.add_argument("--hidden", type=int, default=4096 if gpu else 64)
    p.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--chunk-tokens", type=int, default=None, help="kd.fused_chunk_tokens (default: auto)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cases", default="torch,fused")
    p.add_argument("--compile", action="store_true",
                   help="eager vs torch.compile chunk kernels of the fused loss (kd.compile), CPU clock, 1 thread")
    p.add_argument("--rounds", type=int, default=15, help="--compile: timed rounds per chunk kernel")
    p.add_argument("--step-rounds", type=int, default=4, help="--compile: timed rounds per fused step")
    p.add_argument("--shapes", default="default,qwen", help="--compile: default (V 8192) and/or qwen (V 151936)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.compile:
        print(json.dumps(compile_comparison(args)))
        return 0
    from megatron_kd.losses import fused_linear_kd

    dev = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(args.bt, args.hidden, device=dev, dtype=dtype, generator=g).requires_grad_(True)
    w = (torch.randn(args.vocab, args.hidden, device=dev, generator=g) / args.hidden ** 0.5).to(dtype)
    w.requires_grad_(True)
    th = torch.randn(args.bt, args.hidden, device=dev, dtype=dtype, generator=g)
    tw = (torch.randn(args.vocab, args.hidden, device=dev, generator=g) / args.hidden ** 0.5).to(dtype)
    labels = torch.randint(0, args.vocab, (args.bt,), device=dev, generator=g)

    def torch_case():
        s = (h @ w.t()).float()
        t = (th @ tw.t()).float()
        ce = F.cross_entropy(s, labels, reduction="sum")
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="sum", log_target=True)
        loss = 0.5 * ce + 0.5 * kl
        loss.backward()
        return loss.detach()

    def fused_case():
        loss, _, _ = fused_linear_kd(h, w, labels, None, teacher_hidden=th, teacher_weight=tw,
                                     chunk_tokens=args.chunk_tokens)
        loss.backward()
        return loss.detach()

    cases = {"torch": torch_case, "fused": fused_case}
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    result: dict = {"benchmark": "fused_linear", "device": torch.cuda.get_device_name() if gpu else "cpu",
                    "bt": args.bt, "vocab": args.vocab, "hidden": args.hidden, "dtype": args.dtype,
                    "liger_fused_linear_jsd_GB_reference": 8.7}
    values = {}
    for name in [c for c in args.cases.split(",") if c]:
        fn = cases[name]
        h.grad = w.grad = None
        try:
            if gpu:
                torch.cuda.empty_cache()
                sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            values[name] = float(fn())
            sync()
            if gpu:
                result[f"{name}_peak_extra_GB"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
            times = []
            for _ in range(args.repeats):
                h.grad = w.grad = None
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            result[f"{name}_ms"] = round(1e3 * statistics.median(times), 2)
        except torch.OutOfMemoryError:
            result[f"{name}_error"] = "out of memory"
            h.grad = w.grad = None
    if "torch" in values and "fused" in values:
        result["loss_rel_diff"] = abs(values["fused"] - values["torch"]) / max(abs(values["torch"]), 1e-12)
        if "torch_ms" in result and "fused_ms" in result:
            result["fused_over_torch_time"] = round(result["fused_ms"] / result["torch_ms"], 3)
        if gpu and "torch_peak_extra_GB" in result:
            result["fused_over_torch_memory"] = round(result["fused_peak_extra_GB"] / result["torch_peak_extra_GB"], 3)
    print(json.dumps(result))
    return 0


COMPILE_SHAPES = {"default": dict(chunk=512, vocab=8192, hidden=128, tokens=2048),
                  "qwen": dict(chunk=64, vocab=151936, hidden=896, tokens=128)}
"""--compile shapes: the default distill bench (cpu-student, V 8192: 512-token chunks at 1 thread) and
Qwen's vocabulary (64-token chunks, the fused-linear floor; H 896 as Qwen2.5-0.5B)."""


def _status_mib(key: str) -> float:
    import re
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) / 1024


def _peak_extra_mib(fn) -> float | None:
    """Peak resident memory above the current level while ``fn()`` runs (Linux; None elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_mib("VmRSS")
    except OSError:
        return None
    fn()
    return round(_status_mib("VmHWM") - base, 1)


def _interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """CPU-clock times of each fn, interleaved round by round: medians and paired compiled/eager ratios."""
    times: dict = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for name, (prep, fn) in fns.items():
            state = prep()
            t0 = time.process_time()
            fn(state)
            dt = time.process_time() - t0
            if r >= warmup:
                times[name].append(dt)
    ratios = sorted(c / e for e, c in zip(times["eager"], times["compiled"]))
    med = {k: statistics.median(v) for k, v in times.items()}
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"eager_ms": round(1e3 * med["eager"], 3), "compiled_ms": round(1e3 * med["compiled"], 3),
            "compiled_over_eager": round(med["compiled"] / med["eager"], 4),
            "compiled_over_eager_lo": round(ratios[0], 4), "compiled_over_eager_hi": round(ratios[-1], 4),
            "compiled_over_eager_iqr": [round(q[0], 4), round(q[2], 4)]}


def compile_comparison(args) -> dict:
    """Eager vs compiled chunk kernels and fused steps (``--compile``, module doc)."""
    from megatron_kd.losses import compiled as C
    from megatron_kd.losses import fused_linear_kd
    from megatron_kd.losses.fused import KDSpec, kd_lm_chunk, kd_spec
    from megatron_kd.losses.vocab_parallel import resolve_tp

    tp = resolve_tp(None)
    C.reset()
    t_start = time.perf_counter()
    out: dict = {"benchmark": "fused_linear_compile", "device": "cpu", "threads": torch.get_num_threads(),
                 "clock": "process_time", "torch": torch.__version__, "rounds": args.rounds,
                 "step_rounds": args.step_rounds, "load_avg_1m": round(os.getloadavg()[0], 2), "shapes": {}}
    specs = {"lm": KDSpec("none"), "online": kd_spec("forward_kl"), "offline": kd_spec(sparse=True)}
    for shape in [x for x in args.shapes.split(",") if x]:
        cfg = COMPILE_SHAPES[shape]
        n, vocab, hidden = cfg["chunk"], cfg["vocab"], cfg["hidden"]
        g = torch.Generator().manual_seed(0)
        S0 = torch.randn(n, vocab, generator=g) * 2
        T0 = torch.randn(n, vocab, generator=g) * 2
        labels = torch.randint(0, vocab, (n,), generator=g)
        ids = torch.stack([torch.randperm(vocab, generator=g)[:100] for _ in range(n)])
        lp = torch.log_softmax(torch.randn(n, 100, generator=g) * 3, -1) - 0.05
        res: dict = {**cfg, "chunk_kernel": {}, "step": {}}
        for case, spec in specs.items():
            def chunk_fn(compiled, spec=spec, case=case):
                def prep():
                    return S0.clone(), T0.clone() if case == "online" else None

                def run(st):
                    kd_lm_chunk(spec, st[0], labels, tp, True, 0.5, 1.0 if case == "lm" else 0.5, teacher=st[1],
                                ids=ids if case == "offline" else None, lp=lp if case == "offline" else None,
                                compiled=compiled)
                return prep, run
            t0 = time.perf_counter()
            chunk_fn(True)[1](chunk_fn(True)[0]())
            compile_s = time.perf_counter() - t0
            if not C.enabled():
                res["chunk_kernel"][case] = {"compile_error": C._STATE["error"]}
                continue
            r = _interleaved({"eager": chunk_fn(False), "compiled": chunk_fn(True)}, args.rounds)
            r["first_call_s_wall"] = round(compile_s, 2)  # compiles what this case needs first
            res["chunk_kernel"][case] = r
        # the fused output layer + loss step, forward + backward
        tokens = cfg["tokens"]
        h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
        w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)
        th = torch.randn(tokens, hidden, generator=g)
        tw = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
        lab = torch.randint(0, vocab, (tokens,), generator=g)
        sid = torch.stack([torch.randperm(vocab, generator=g)[:100] for _ in range(tokens)])
        slp = torch.log_softmax(torch.randn(tokens, 100, generator=g) * 3, -1) - 0.05
        step_cases = ("online",) if shape == "qwen" else ("lm", "online", "offline")
        for case in step_cases:
            kw = ({"teacher_hidden": th, "teacher_weight": tw} if case == "online" else
                  {"target_ids": sid, "target_logprobs": slp} if case == "offline" else {})

            def step_fn(compiled, kw=kw):
                def run(_):
                    total, _, _ = fused_linear_kd(h, w, lab, None, chunk_tokens=n, compiled=compiled, **kw)
                    total.backward()
                    h.grad = w.grad = None
                return (lambda: None), run
            t0 = time.perf_counter()
            step_fn(True)[1](None)
            compile_s = time.perf_counter() - t0
            r = _interleaved({"eager": step_fn(False), "compiled": step_fn(True)}, args.step_rounds)
            r["first_call_s_wall"] = round(compile_s, 2)
            r["peak_extra_mib_eager"] = _peak_extra_mib(lambda: step_fn(False)[1](None))
            r["peak_extra_mib_compiled"] = _peak_extra_mib(lambda: step_fn(True)[1](None))
            res["step"][case] = r
        out["shapes"][shape] = res
    out["compiled_over_eager"] = {f"{shape}/{part}/{case}": r["compiled_over_eager"]
                                  for shape, res in out["shapes"].items() for part in ("chunk_kernel", "step")
                                  for case, r in res[part].items() if "compiled_over_eager" in r}
    out["compile_enabled_at_end"] = C.enabled()
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    return out


if __name__ == "__main__":
    sys.exit(main())
