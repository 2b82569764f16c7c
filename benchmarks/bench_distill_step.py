#!/usr/bin/env python
"""Cost of distillation per training step, in one run on the same student/teacher sizes.

Prints one JSON object with the median step time (forward + backward + AdamW, through the Trainer)
of: a plain LM step (kd.mode=none), an offline-KD step (stored sparse top-k targets in the batch),
an online-KD step (frozen teacher in the job, DistillationModel) and the teacher's forward alone
over the same micro-batches, and the ratios the issue sets targets for:

* ``offline_over_plain``      = offline-KD step / plain step                     (target <= 1.10)
* ``online_over_plain_plus_teacher`` = online-KD step / (plain step + teacher forward) (target <= 1.05)

The four measurements are interleaved round by round (medians); on CPU the default clock is the
process's CPU time, so other processes sharing the cores do not distort the ratios. On GPU it also reports the MFU of the online step counting the teacher's forward FLOPs:
(3 x student + 1 x teacher forward FLOPs per token) x tokens/s / peak.

    python benchmarks/bench_distill_step.py        # CPU: cpu-student <- cpu-teacher, vocab 8192, seq 256
    python benchmarks/bench_distill_step.py --preset realistic   # Qwen2.5-0.5B shape <- same width, 2x depth
    python benchmarks/bench_distill_step.py --preset realistic --layers 2 --micro-batch-size 1   # CPU-sized
    python benchmarks/bench_distill_step.py --no-fused   # the unfused loss (kd.one_pass/fused_linear off)
    python benchmarks/bench_distill_step.py --compile    # + the three steps with kd.compile=true, interleaved
    python benchmarks/bench_distill_step.py --student qwen-200m --teacher qwen2.5-1.5b   # GPU defaults
    torchrun --nproc-per-node 2 benchmarks/bench_distill_step.py --tp 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


def _fix_threads() -> int:
    """Intra-op threads from ``--threads`` (default 1 on CPU), set before torch is imported: spinning
    OpenMP threads would otherwise be counted by the CPU clock (issue 15: 2.16 / 3.69 vs 1.24 / 1.27)."""
    threads = 1
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            threads = int(sys.argv[i + 1])
        elif arg.startswith("--threads="):
            threads = int(arg.split("=", 1)[1])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


THREADS = _fix_threads()

import torch  # noqa: E402

torch.set_num_threads(THREADS)

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="qwen-200m" if gpu else "cpu-student", help="student model preset")
    p.add_argument("--teacher", default="qwen2.5-1.5b" if gpu else "cpu-teacher", help="teacher model preset")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary of both (CPU default 8192)")
    p.add_argument("--seq-length", type=int, default=2048 if gpu else 256, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=2 if gpu else 8, help="sequences per micro-batch")
    p.add_argument("--num-microbatches", type=int, default=1, help="gradient accumulation steps per optimizer step")
    p.add_argument("--precision", default="bf16" if gpu else "fp32", choices=["fp32", "bf16"],
                   help="student precision (bf16 needs a GPU)")
    p.add_argument("--teacher-dtype", default=None, choices=["fp32", "bf16"], help="default: --precision")
    p.add_argument("--top-k", type=int, default=100, help="stored targets per token (offline)")
    p.add_argument("--kind", default="forward_kl", help="online divergence (kd.kind)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (PP is 1: the teacher is timed alone)")
    p.add_argument("--rounds", type=int, default=6 if gpu else 5, help="timed rounds (each times all four)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    p.add_argument("--clock", default="wall" if gpu else "cpu", choices=["wall", "cpu"],
                   help="wall: elapsed time (GPU); cpu: this process's CPU time (default on CPU: immune to other "
                        "processes sharing the cores; run with OMP_NUM_THREADS=1 so it equals compute time)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per GPU for MFU")
    p.add_argument("--preset", default=None, choices=["realistic"],
                   help="realistic: student of Qwen2.5-0.5B shape (24 x 896, V=151,936, tied) <- teacher of the same "
                        "width and 2x the depth, seq 256 (overrides --student/--teacher/--seq-length)")
    p.add_argument("--layers", type=int, default=None,
                   help="student layers (teacher: 2x) - shrinks --preset realistic for CPU runs; vocabulary and "
                        "width stay, so the loss/head share of the step is larger than at full depth")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op CPU threads (set before torch is imported; default 1)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="the unfused loss (kd.one_pass=false, kd.fused_linear=false): the before figure")
    p.add_argument("--one-pass-only", action="store_true",
                   help="kd.one_pass on, kd.fused_linear off (logits materialised, one pass over them)")
    p.add_argument("--compile", action="store_true",
                   help="also time the plain/offline/online steps with kd.compile=true (torch.compile chunk "
                        "kernels) in the same rounds: JSON compiled_over_eager per step, compile_first_round_extra_s")
    args = p.parse_args()
    if args.preset == "realistic":
        args.student = args.teacher = "qwen2.5-0.5b"
        if "--seq-length" not in " ".join(sys.argv):
            args.seq_length = 256
    return args


def synthetic_batches(n: int, mbs: int, seq: int, vocab: int, top_k: int, dev: torch.device) -> list[dict]:
    """Random token micro-batches with store-shaped targets: k unique ids per token, sorted log-probs."""
    g = torch.Generator().manual_seed(0)
    out = []
    stride = max(1, vocab // top_k)
    for _ in range(n):
        tokens = torch.randint(0, vocab, (mbs, seq + 1), generator=g)
        base = torch.randint(0, vocab, (mbs, seq, 1), generator=g)
        ids = (base + torch.arange(top_k) * stride) % vocab  # unique per token
        lp = torch.log_softmax(torch.randn(mbs, seq, top_k, generator=g) * 3, -1).sort(-1, descending=True).values
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(mbs, seq),
                 "position_ids": torch.arange(seq).expand(mbs, seq).clone(), "target_ids": ids,
                 "target_logprobs": lp - 0.05}  # ~5% of the mass outside the kept ids, as after top-p 0.95
        out.append({k: v.to(dev) for k, v in batch.items()})
    return out


def main() -> int:
    args = parse_args()
    from megatron.core import parallel_state

    from megatron_kd.distill import DistillationModel, DistillForwardStep, KDConfig, KDState
    from megatron_kd.distill.pipeline import install_schedule_hooks
    from megatron_kd.distill.run import DistillTrainer
    from megatron_kd.distill.teacher import freeze
    from megatron_kd.models import build_gpt_model, get_preset
    from megatron_kd.runtime import (ParallelConfig, destroy_distributed, device, init_distributed, is_main_process,
                                     set_seed, world_size)
    from megatron_kd.training import LoggingConfig, OptimConfig, TrainConfig, setup_model_and_optimizer

    gpu = torch.cuda.is_available()
    vocab = args.vocab_size or (None if gpu or args.preset else 8192)
    over = {"max_position_embeddings": max(args.seq_length, 2048), **({"vocab_size": vocab} if vocab else {})}
    s_cfg, t_cfg = get_preset(args.student, **over), get_preset(args.teacher, **over)
    if args.preset == "realistic":
        t_cfg.num_layers = 2 * s_cfg.num_layers
    if args.layers:
        s_cfg.num_layers, t_cfg.num_layers = args.layers, 2 * args.layers
    if s_cfg.vocab_size != t_cfg.vocab_size:  # e.g. Qwen2.5-7B 152,064 vs 151,936: bench on the common size
        s_cfg.vocab_size = t_cfg.vocab_size = min(s_cfg.vocab_size, t_cfg.vocab_size)
    parallel = ParallelConfig(tensor_parallel=args.tp)
    init_distributed(parallel)
    set_seed(0)
    dp = parallel_state.get_data_parallel_world_size()
    gbs = args.micro_batch_size * dp * args.num_microbatches
    total = args.warmup + args.rounds
    train = TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=gbs, seq_length=args.seq_length,
                        train_iters=10 * total, log_interval=0)
    optim = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_iters=1, precision=args.precision)
    padded = s_cfg.padded_vocab_size(args.tp)
    chunks, optimizer, scheduler = setup_model_and_optimizer(s_cfg, parallel, optim, 10 * total, padded_vocab_size=padded)
    teacher = freeze(build_gpt_model(t_cfg, params_dtype=args.teacher_dtype or args.precision, padded_vocab_size=padded))
    if (args.teacher_dtype or args.precision) != "fp32":
        teacher.to(torch.bfloat16)
    wrapper = DistillationModel(chunks[0], teacher, s_cfg.hidden_size, t_cfg.hidden_size)
    install_schedule_hooks(wrapper)
    state = KDState(0, 10 * total)
    kd = KDConfig(kind=args.kind, alpha=0.5, one_pass=args.fused or args.one_pass_only,
                  fused_linear=args.fused and not args.one_pass_only)
    common = dict(logging=LoggingConfig(quiet=True), kd_state=state)
    kd_c = dataclasses.replace(kd, compile=True)
    trainers = {
        "plain": DistillTrainer(chunks, optimizer, scheduler, DistillForwardStep("none", kd, s_cfg.vocab_size, state),
                                s_cfg, train, **common),
        "offline": DistillTrainer(chunks, optimizer, scheduler,
                                  DistillForwardStep("offline", kd, s_cfg.vocab_size, state), s_cfg, train, **common),
        "online": DistillTrainer([wrapper], optimizer, scheduler,
                                 DistillForwardStep("online", kd, s_cfg.vocab_size, state), s_cfg, train,
                                 distill_model=wrapper, **common),
    }
    if args.compile:
        trainers.update({
            "plain_compiled": DistillTrainer(chunks, optimizer, scheduler,
                                             DistillForwardStep("none", kd_c, s_cfg.vocab_size, state), s_cfg, train,
                                             **common),
            "offline_compiled": DistillTrainer(chunks, optimizer, scheduler,
                                               DistillForwardStep("offline", kd_c, s_cfg.vocab_size, state), s_cfg,
                                               train, **common),
            "online_compiled": DistillTrainer([wrapper], optimizer, scheduler,
                                              DistillForwardStep("online", kd_c, s_cfg.vocab_size, state), s_cfg,
                                              train, distill_model=wrapper, **common),
        })
    batches = synthetic_batches(args.num_microbatches, args.micro_batch_size, args.seq_length, s_cfg.vocab_size,
                                args.top_k, device())

    def cycle():
        while True:
            yield from batches

    data = cycle()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def teacher_forward() -> None:
        with torch.no_grad():
            for b in batches:
                teacher.set_input_tensor([None])
                teacher(b["tokens"], b["position_ids"], None)

    names = ("plain", "offline", "online", "teacher_forward")
    if args.compile:
        names += ("plain_compiled", "offline_compiled", "online_compiled")
    times: dict[str, list[float]] = {k: [] for k in names}
    first_wall: dict[str, float] = {}
    metrics: dict[str, dict] = {}
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for r in range(total):
        for name in times:
            sync()
            t0, w0 = clock(), time.perf_counter()
            if name == "teacher_forward":
                teacher_forward()
            else:
                metrics[name] = trainers[name].train_step(data)
            sync()
            if r == 0:
                first_wall[name] = time.perf_counter() - w0
            if r >= args.warmup:
                times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = gbs * args.seq_length
    online_tps = tokens / med["online"]
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else
            next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None) if gpu else None)
    online_flops = (3 * s_cfg.flops_per_token(args.seq_length) + t_cfg.flops_per_token(args.seq_length)) * online_tps
    result = {
        "benchmark": "distill_step",
        "device": torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()} threads",
        "world_size": world_size(), "tp": args.tp, "dp": dp,
        "student": args.student, "teacher": args.teacher, "vocab_size": s_cfg.vocab_size,
        "student_params_M": round(s_cfg.num_parameters() / 1e6, 2),
        "teacher_params_M": round(t_cfg.num_parameters() / 1e6, 2),
        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "global_batch_size": gbs,
        "precision": args.precision, "teacher_dtype": args.teacher_dtype or args.precision, "top_k": args.top_k,
        "kind": args.kind, "timed_rounds": args.rounds, "clock": args.clock, "threads": torch.get_num_threads(),
        "preset": args.preset, "student_layers": s_cfg.num_layers, "teacher_layers": t_cfg.num_layers,
        "one_pass": kd.one_pass, "fused_linear": kd.fused_linear,
        **{f"{k}_step_s" if k != "teacher_forward" else "teacher_forward_s": round(v, 4) for k, v in med.items()},
        "offline_over_plain": round(med["offline"] / med["plain"], 4),
        "online_over_plain_plus_teacher": round(med["online"] / (med["plain"] + med["teacher_forward"]), 4),
        "teacher_share_of_online_step": round(med["teacher_forward"] / med["online"], 4),
        # the same ratios round by round (the steps of one round run back to back): their spread shows how
        # far a median of this many rounds can be trusted on a shared machine
        "per_round": {"offline_over_plain": [round(o / p, 4) for p, o in zip(times["plain"], times["offline"])],
                      "online_over_plain_plus_teacher": [round(o / (p + t), 4) for p, o, t in zip(
                          times["plain"], times["online"], times["teacher_forward"])]},
        "online_tokens_per_s": round(online_tps, 1),
        "online_model_tflops_per_s": round(online_flops / 1e12, 4),
        "online_mfu": round(online_flops / (peak * world_size()), 4) if peak else None,
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
        "targets": {"offline_over_plain": 1.10, "online_over_plain_plus_teacher": 1.05},
    }
    if args.compile:
        from megatron_kd.losses import compiled as compiled_kernels

        result["compile"] = {
            "compiled_enabled_at_end": compiled_kernels.enabled(),
            **{f"{k}_compiled_step_s": round(med[f"{k}_compiled"], 4) for k in ("plain", "offline", "online")},
            "compiled_over_eager": {k: round(med[f"{k}_compiled"] / med[k], 4) for k in ("plain", "offline", "online")},
            "compiled_over_eager_per_round": {
                k: [round(c / e, 4) for e, c in zip(times[k], times[f"{k}_compiled"])]
                for k in ("plain", "offline", "online")},
            # wall time of the first round's three compiled steps minus the three eager ones: ~ compilation
            "compile_first_round_extra_s": round(sum(first_wall[f"{k}_compiled"] - first_wall[k]
                                                     for k in ("plain", "offline", "online")), 2),
        }
    if is_main_process():
        print(json.dumps(result))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
