"""KD loss benchmark: forward+backward time and peak extra memory on CPU, printed as JSON.

Compares, per vocabulary size V and ``--tokens`` tokens (fp32 logits [tokens, V]):

* ``naive``: the plain PyTorch form, ``kl_div(log_softmax(student), log_softmax(teacher),
  log_target=True).sum(-1)``, full fp32, then ``backward``;
* ``kd_loss``: :func:`megatron_kd.losses.kd_loss` (forward_kl), chunked with analytic gradients;
* ``sparse_kd_loss``: :func:`megatron_kd.losses.sparse_kd_loss` with ``--k`` stored targets;
* ``naive_sparse`` (context): log_softmax(student) gathered at the k ids, plain autograd;
* ``fused_linear`` (issue 15): :func:`megatron_kd.losses.fused_linear_kd` - the output layer
  (hidden [tokens, ``--hidden``] x weight [V, ``--hidden``]) and LM + forward-KL loss against an
  online teacher's hidden states and weight, chunk by chunk: no [tokens, V] tensor is ever held.
  Its ``peak_extra_mib`` includes the gradients of the hidden states and of the output weight that
  any output layer produces; ``kd_peak_extra_frac`` = (peak extra - those gradients) / one fp32
  [tokens, V] tensor (target <= 0.10 at 4096 x 151936), printed at the top level of the JSON.

Memory method: every case runs in a fresh Python subprocess. After the inputs are allocated (and
a small warm-up has loaded the kernels), the process resets its kernel-tracked peak resident set
(``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``) and records ``VmRSS`` as the baseline; after
one forward+backward, ``VmHWM - baseline`` is the peak extra memory. It is the real high-water
mark of resident pages (torch's CPU allocator returns large blocks to the OS, so RSS tracks live
tensors), and it includes the [tokens, V] gradient that every method must produce.
Time: wall clock of that forward+backward and the best of ``--repeats`` further runs
(``time_s``), plus the process CPU time (``cpu_s``, all threads), which is less sensitive to other
load on a shared machine.

Usage::

    python benchmarks/bench_kd_loss.py                       # V = 32000 and 151936, 4096 tokens
    python benchmarks/bench_kd_loss.py --vocab 32000 --tokens 1024 --methods kd_loss,naive

A case whose estimated memory exceeds 85% of ``MemAvailable`` is skipped (reported as such).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

METHODS = ("naive", "kd_loss", "sparse_kd_loss", "naive_sparse", "fused_linear")
COPIES_NEEDED = {"naive": 7.5, "kd_loss": 3.5, "sparse_kd_loss": 2.5, "naive_sparse": 4.5, "fused_linear": 0.5}
"""Rough [tokens, V] fp32 copies a case needs in total (inputs included), for the memory guard."""


def _status_mib(key: str) -> float:
    text = open("/proc/self/status").read()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024


def _mem_available_mib() -> float:
    text = open("/proc/meminfo").read()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) / 1024


def _make_case(method: str, tokens: int, vocab: int, k: int, hidden: int = 896):
    import torch
    import torch.nn.functional as F

    from megatron_kd.losses import fused_linear_kd, kd_loss, sparse_kd_loss

    g = torch.Generator().manual_seed(0)
    if method == "fused_linear":
        h = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
        w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_(True)
        th = torch.randn(tokens, hidden, generator=g)
        tw = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
        labels = torch.randint(0, vocab, (tokens,), generator=g)

        def run_fused():
            total, _, _ = fused_linear_kd(h, w, labels, None, teacher_hidden=th, teacher_weight=tw)
            total.backward()
            h.grad = w.grad = None

        return run_fused
    student = (torch.randn(tokens, vocab, generator=g) * 2).requires_grad_(True)
    if method in ("naive", "kd_loss"):
        teacher = torch.randn(tokens, vocab, generator=g) * 2
    else:  # stored top-k targets: random ids with a plausible decreasing log-prob profile
        ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(min(tokens, 64))])
        ids = ids.repeat((tokens + 63) // 64, 1)[:tokens].contiguous()
        lps = torch.log_softmax(torch.randn(tokens, k, generator=g) * 3, -1) - 0.1

    def run():
        if method == "naive":
            loss = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                            reduction="none", log_target=True).sum(-1)
        elif method == "kd_loss":
            loss = kd_loss(student, teacher, "forward_kl")
        elif method == "sparse_kd_loss":
            loss = sparse_kd_loss(student, ids, lps)
        else:
            ls = F.log_softmax(student, -1).gather(-1, ids)
            p = torch.softmax(lps, -1)
            loss = (p * (p.log() - ls)).sum(-1)
        loss.sum().backward()
        student.grad = None

    return run


def run_case(method: str, tokens: int, vocab: int, k: int, repeats: int, threads: int, hidden: int = 896) -> dict:
    """Measure one case in this process (called in a fresh subprocess by :func:`main`)."""
    import torch

    try:  # on a shared machine, be the first process the OOM killer picks
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    torch.set_num_threads(threads)
    _make_case(method, 64, vocab, k, hidden)()  # warm-up: load kernels, allocator, thread pool
    run = _make_case(method, tokens, vocab, k, hidden)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    first, cpu = time.perf_counter() - t0, [time.process_time() - c0]
    peak = _status_mib("VmHWM") - base
    times = [first]
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    copy_mib = tokens * vocab * 4 / 2**20
    out = {
        "method": method, "vocab": vocab, "tokens": tokens, "k": k if "sparse" in method else None,
        "threads": threads, "time_s": round(min(times), 3), "time_first_s": round(first, 3),
        "cpu_s": round(min(cpu), 3),
        "peak_extra_mib": round(peak, 1), "peak_extra_copies": round(peak / copy_mib, 2),
    }
    if method == "fused_linear":
        grads_mib = (vocab + tokens) * hidden * 4 / 2**20  # d weight + d hidden: any output layer's
        out.update(hidden=hidden, param_grads_mib=round(grads_mib, 1),
                   kd_peak_extra_frac=round(max(peak - grads_mib, 0.0) / copy_mib, 4))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936], help="vocabulary sizes V")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch (rows of the logits)")
    ap.add_argument("--k", type=int, default=64, help="stored targets per token for the sparse loss")
    ap.add_argument("--hidden", type=int, default=896, help="hidden size of the fused_linear case")
    ap.add_argument("--methods", default="naive,kd_loss,sparse_kd_loss,fused_linear",
                    help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the measured one")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--case", nargs=3, metavar=("METHOD", "TOKENS", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        method, tokens, vocab = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(method, tokens, vocab, args.k, args.repeats, args.threads, args.hidden)))
        return
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = []
    for vocab in args.vocab:
        for method in methods:
            need = COPIES_NEEDED[method] * args.tokens * vocab * 4 / 2**20
            avail = _mem_available_mib()
            if need > 0.85 * avail:
                results.append({"method": method, "vocab": vocab, "tokens": args.tokens,
                                "skipped": f"needs ~{need:.0f} MiB, {avail:.0f} MiB available"})
                continue
            cmd = [sys.executable, __file__, "--case", method, str(args.tokens), str(vocab),
                   "--k", str(args.k), "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--hidden", str(args.hidden)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                results.append({"method": method, "vocab": vocab, "error": proc.stderr.strip()[-500:]})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    by_key = {(r["method"], r["vocab"]): r for r in results if "time_s" in r}
    for r in results:
        naive = by_key.get(("naive", r.get("vocab")))
        if "time_s" in r and naive and r["method"] != "naive":
            r["time_vs_naive"] = round(r["time_s"] / naive["time_s"], 3)
            r["cpu_vs_naive"] = round(r["cpu_s"] / naive["cpu_s"], 3)
            r["memory_vs_naive"] = round(r["peak_extra_mib"] / naive["peak_extra_mib"], 3)
    fused = [r for r in results if r.get("method") == "fused_linear" and "kd_peak_extra_frac" in r]
    print(json.dumps({
        "benchmark": "kd_loss", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kd_peak_extra_frac": max(fused, key=lambda r: r["vocab"])["kd_peak_extra_frac"] if fused else None,
        "kd_peak_extra_target": 0.10,
        "machine": {"cpus": os.cpu_count(), "mem_total_gib": round(_meminfo_total_gib(), 1),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m": os.getloadavg()[0]},
        "results": results,
    }))


def _meminfo_total_gib() -> float:
    text = open("/proc/meminfo").read()
    return int(re.search(r"MemTotal:\s+(\d+) kB", text).group(1)) / 2**20


if __name__ == "__main__":
    main()
