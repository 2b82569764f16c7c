#!/usr/bin/env python
"""Throughput of one plain pre-training step (forward + backward + AdamW) through megatron-kd's Trainer.

Prints one JSON object: tokens/s, step time, and model FLOPs utilisation (MFU, on GPU). The step is
pretrain's default (fused output layer + LM loss, ``train.fused_lm_loss``); ``--compare-unfused`` times
megatron's full-logits cross-entropy beside it in the same process (``fused_over_unfused``).

    # CPU (defaults: cpu-student 2x128, vocab 8192, seq 256, micro-batch 8, fp32)
    python benchmarks/bench_train_step.py
    # GPU: ~0.5B Qwen2.5 shape at bf16 (defaults switch when CUDA is present)
    python benchmarks/bench_train_step.py --preset qwen2.5-0.5b --precision bf16 --seq-length 2048
    torchrun --nproc-per-node 8 benchmarks/bench_train_step.py --tp 2   # several GPUs

MFU = 3 * forward FLOPs per token (``ModelConfig.flops_per_token``: matmuls + attention scores +
LM head, at full sequence length) * tokens/s / (peak dense FLOP/s * number of GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

import torch  # noqa: E402

# Dense bf16/fp16 tensor-core peak per GPU (no sparsity), FLOP/s.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2.5-0.5b" if gpu else "cpu-student", help="model preset name")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary (CPU default 8192)")
    p.add_argument("--seq-length", type=int, default=2048 if gpu else 256, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=4 if gpu else 8, help="sequences per micro-batch")
    p.add_argument("--global-batch-size", type=int, default=None, help="default: micro-batch x DP (no accumulation)")
    p.add_argument("--precision", default="bf16" if gpu else "fp32", choices=["fp32", "bf16", "fp16"],
                   help="training precision (bf16/fp16 need a GPU)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--distributed-optimizer", action="store_true", help="shard optimizer state over DP (GPU)")
    p.add_argument("--steps", type=int, default=10 if gpu else 8, help="timed steps")
    p.add_argument("--warmup", type=int, default=3 if gpu else 2, help="untimed warm-up steps")
    p.add_argument("--baseline", action="store_true", help="also time a plain PyTorch step (HF transformers "
                   "LlamaForCausalLM of the same shape, torch AdamW) in the same process, one process only")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per GPU for MFU "
                   "(default: looked up from the GPU name)")
    p.add_argument("--unfused-lm-loss", action="store_true",
                   help="megatron's full-logits cross-entropy instead of pretrain's default fused output layer + "
                        "loss (train.fused_lm_loss=false)")
    p.add_argument("--compare-unfused", action="store_true",
                   help="also time the unfused LM loss in the same process (interleaved rounds of --steps, medians): "
                        "adds unfused_step_s and fused_over_unfused to the JSON")
    p.add_argument("--rounds", type=int, default=3, help="with --compare-unfused: interleaved rounds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU, so that a plain run gives a reproducible figure)")
    return p.parse_args()


def peak_flops(override_tflops: float | None) -> float | None:
    """Per-device peak FLOP/s, or None on CPU / an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def baseline_step_time(cfg, batches, steps: int, warmup: int) -> float:
    """Mean seconds per step of the same model shape as plain PyTorch (HF Llama, torch AdamW)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.add_qkv_bias,
        max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf.to(dev).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1)
    times = []
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = hf(input_ids=batch["tokens"].to(dev)).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].to(dev).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available() or args.threads:
        torch.set_num_threads(args.threads or 1)
    from megatron.core import parallel_state

    from megatron_kd.models import get_preset
    from megatron_kd.runtime import ParallelConfig, init_distributed, is_main_process, set_seed, world_size
    from megatron_kd.training import (OptimConfig, SequentialBatchIterator, SyntheticDataset, Trainer, TrainConfig,
                                      LoggingConfig, make_lm_forward_step, setup_model_and_optimizer)

    overrides = {"max_position_embeddings": max(args.seq_length, 2048)}
    if args.vocab_size or not torch.cuda.is_available():
        overrides["vocab_size"] = args.vocab_size or 8192
    cfg = get_preset(args.preset, **overrides)
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    init_distributed(parallel)
    set_seed(0)
    dp = parallel_state.get_data_parallel_world_size()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    total = args.warmup + args.steps
    train = TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=gbs, seq_length=args.seq_length,
                        train_iters=total, log_interval=0)
    optim = OptimConfig(lr=1e-4, min_lr=1e-5, warmup_iters=1, precision=args.precision,
                        use_distributed_optimizer=args.distributed_optimizer)
    chunks, optimizer, scheduler = setup_model_and_optimizer(cfg, parallel, optim, total)
    steps = {"fused": make_lm_forward_step(cfg.vocab_size, True), "unfused": make_lm_forward_step(cfg.vocab_size, False)}
    main_kind = "unfused" if args.unfused_lm_loss else "fused"
    trainer = Trainer(chunks, optimizer, scheduler, steps[main_kind], cfg, train, logging=LoggingConfig(quiet=True))

    # Pre-generate the micro-batches once, so the timing is the training step only.
    data = SyntheticDataset(cfg.vocab_size, args.seq_length, seed=0)
    it = SequentialBatchIterator(data, args.micro_batch_size, parallel_state.get_data_parallel_rank(), dp)
    batches = [next(it) for _ in range(trainer.num_microbatches * 2)]
    if torch.cuda.is_available():
        batches = [{k: v.cuda() for k, v in b.items()} for b in batches]

    def cycle():
        while True:
            yield from batches

    data_iter = cycle()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    losses, times, cpu_times = [], [], []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in range(total):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = trainer.train_step(data_iter)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        losses.append(metrics["loss"])
    step_time = sum(times) / len(times)
    ab = {}
    if args.compare_unfused:  # the same model and batches, the two losses in interleaved rounds
        import statistics

        rounds: dict[str, list[float]] = {"fused": [], "unfused": []}
        for _ in range(args.rounds):
            for kind in ("unfused", "fused"):
                trainer.forward_step_func = trainer.valid_forward_step_func = steps[kind]
                trainer.train_step(data_iter)  # warm-up of this path
                sync()
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step(data_iter)
                sync()
                spent = (time.perf_counter() - t0) if torch.cuda.is_available() else (time.process_time() - c0)
                rounds[kind].append(spent / args.steps)
        med = {k: statistics.median(v) for k, v in rounds.items()}
        ab = {"fused_step_s": round(med["fused"], 4), "unfused_step_s": round(med["unfused"], 4),
              "fused_over_unfused": round(med["fused"] / med["unfused"], 4),
              "ab_clock": "wall (GPU)" if torch.cuda.is_available() else "process CPU",
              "ab_rounds": {k: [round(x, 4) for x in v] for k, v in rounds.items()}}
    tokens_per_s = gbs * args.seq_length / step_time
    peak = peak_flops(args.peak_tflops)
    model_flops = 3 * cfg.flops_per_token(args.seq_length) * tokens_per_s
    result = {
        "benchmark": "train_step",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads",
        "world_size": world_size(), "tp": args.tp, "pp": args.pp, "dp": dp,
        "model": args.preset, "params_M": round(cfg.num_parameters() / 1e6, 2), "vocab_size": cfg.vocab_size,
        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "global_batch_size": gbs,
        "precision": args.precision, "timed_steps": args.steps, "lm_loss": main_kind,
        "step_time_s": round(step_time, 4), "tokens_per_s": round(tokens_per_s, 1),
        "model_tflops_per_s": round(model_flops / 1e12, 3),
        # CPU seconds this process used per step: on a shared, oversubscribed CPU this shows the
        # work itself, while step_time_s also counts waiting for a core.
        "process_cpu_s_per_step": round(sum(cpu_times) / len(cpu_times), 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "mfu": round(model_flops / (peak * world_size()), 4) if peak else None,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
    }
    result.update(ab)
    if args.baseline and world_size() == 1 and gbs == args.micro_batch_size:
        base = baseline_step_time(cfg, batches, args.steps, args.warmup)
        result["baseline_hf_torch_tokens_per_s"] = round(gbs * args.seq_length / base, 1)
        result["speed_vs_baseline"] = round(base / step_time, 3)
    if is_main_process():
        print(json.dumps(result))
    from megatron_kd.runtime import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
