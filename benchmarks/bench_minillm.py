"""MiniLLM throughput on this machine (prints JSON).

1. Rollout generation tokens/s (wall clock and per CPU second) with the KV cache vs. recomputing the prefix every step, at
   ``--new-tokens`` (128) new tokens per sequence, pure student sampling and teacher-mixed sampling.
2. Where one MiniLLM round's time goes: generation, teacher scoring (and student re-scoring),
   and training (PPO epochs incl. the teacher forward of the single-step term).

Usage: python benchmarks/bench_minillm.py [--student cpu-student --teacher cpu-teacher --vocab 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--student", default="cpu-student", help="student model preset")
    ap.add_argument("--teacher", default="cpu-teacher", help="teacher model preset")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    ap.add_argument("--batch", type=int, default=8, help="sequences per generation batch")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("--student-only", action="store_true", help="only the pure-student KV-cache comparison")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the fastest is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default; 1 avoids oversubscription on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_kd.posttrain.data import InMemoryInstructions
    from megatron_kd.posttrain.generation import GenerationConfig, generate
    from megatron_kd.posttrain.config import MiniLLMOptimConfig
    from megatron_kd.posttrain.minillm import PPOConfig, PPOStep, RolloutSource, TrainLoopConfig
    from megatron_kd.posttrain.rollout import RolloutConfig
    from megatron_kd.posttrain.steps import setup_student
    from megatron_kd.models import build_gpt_model, get_preset
    from megatron_kd.runtime import init_distributed, set_seed

    init_distributed()
    set_seed(0)
    scfg = get_preset(args.student, vocab_size=args.vocab)
    tcfg = get_preset(args.teacher, vocab_size=args.vocab)
    student, teacher = build_gpt_model(scfg), build_gpt_model(tcfg)
    teacher.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, args.vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                    "student": args.student, "teacher": args.teacher, "vocab": args.vocab, "batch": args.batch,
                    "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens,
                    "load_average_1m": os.getloadavg()[0], "repeats": args.repeats}
    settings = [("student", None, 0.0)] + ([] if args.student_only else [("teacher_mixed", teacher, 0.2)])
    for name, mix_teacher, alpha in settings:
        for use_cache in (True, False):
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, eos_id=None, seed=1, use_cache=use_cache)
            generate(student, prompts[:2], GenerationConfig(max_new_tokens=4, use_cache=use_cache), args.vocab,
                     teacher=mix_teacher, mix_alpha=alpha)  # warm-up
            dt = cpu = float("inf")
            for _ in range(args.repeats):  # best of N: the machine may be shared
                t0, c0 = time.perf_counter(), time.process_time()
                out = generate(student, prompts, cfg, args.vocab, teacher=mix_teacher, mix_alpha=alpha)
                dt, cpu = min(dt, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
            key = f"{name}_{'kv_cache' if use_cache else 'no_cache'}"
            n_tok = out.response_lengths.sum().item()
            result[f"{key}_tokens_per_s"] = n_tok / dt
            result[f"{key}_tokens_per_cpu_s"] = n_tok / cpu
            print(f"{key}: {n_tok / dt:.1f} tokens/s, {n_tok / cpu:.1f} tokens/CPU-s", file=sys.stderr, flush=True)
        result[f"{name}_kv_cache_speedup"] = (result[f"{name}_kv_cache_tokens_per_s"]
                                              / result[f"{name}_no_cache_tokens_per_s"])
        result[f"{name}_kv_cache_speedup_cpu_time"] = (result[f"{name}_kv_cache_tokens_per_cpu_s"]
                                                       / result[f"{name}_no_cache_tokens_per_cpu_s"])

    if args.student_only:
        print(json.dumps(result))
        return
    # One MiniLLM round: 2 x batch rollouts, 2 PPO epochs of mini-batches of `batch`.
    class _Tok:
        eod, pad, vocab_size, path = 1, 0, args.vocab, ""

    data = InMemoryInstructions(prompts * 2, [[1]] * (2 * args.batch))
    loop = TrainLoopConfig(total_steps=4, rollout=RolloutConfig(num_rollouts=2 * args.batch, chunk_size=args.batch,
                                                              max_new_tokens=args.new_tokens),
                           ppo=PPOConfig(epochs=2, batch_size=args.batch, micro_batch_size=max(args.batch // 2, 1)),
                           optim=MiniLLMOptimConfig(lr=1e-5, warmup_iters=0))
    ddp, optimizer, scheduler = setup_student(student, loop.optim, loop.total_steps)
    source = RolloutSource(ddp, teacher, loop, _Tok(), data, args.vocab)
    step = PPOStep(ddp, teacher, loop, args.vocab)
    t0, c0 = time.perf_counter(), time.process_time()
    rollouts = source.collect_round()
    t_round = time.perf_counter() - t0
    t1 = time.perf_counter()
    steps = 0
    for epoch in range(loop.ppo.epochs):
        for s in range(0, len(rollouts), args.batch):
            ddp.zero_grad_buffer()  # what the Trainer does around each step
            optimizer.zero_grad()
            step({"rollouts": rollouts, "idx": list(range(s, s + args.batch)), "round": 0})
            scheduler.step(1)
            optimizer.step()
            steps += 1
    t_train = time.perf_counter() - t1
    total = t_round + t_train
    cpu_total = time.process_time() - c0
    gen_s, score_s = rollouts.timings["generate_s"], rollouts.timings["score_s"]
    result["round"] = {
        "rollouts": len(rollouts), "rollout_tokens": int(rollouts.response_lengths.sum()), "optimizer_steps": steps,
        "generation_s": gen_s, "scoring_s": score_s, "advantages_other_s": t_round - gen_s - score_s,
        "training_s": t_train, "total_s": total, "total_cpu_s": cpu_total,
        "share": {"generation": gen_s / total, "scoring": score_s / total, "training": t_train / total},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
