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
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
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


if __name__ == "__main__":
    sys.exit(main())
