#!/usr/bin/env python
"""Online KD step with a mixture-of-experts teacher vs a dense teacher of equal active parameters.

Both teachers share everything but the MLP: the MoE one (preset ``cpu-moe-teacher``: 8 experts,
top-2, expert width 256) routes each token through 2 experts, the dense one has one MLP of width
512 (= 2 x 256), so the active parameters per token match (up to the MoE router, 8 x hidden per
layer). The student (``cpu-student``) trains through the full Trainer step (forward, backward,
AdamW) with each teacher in the job; the two are timed round by round (interleaved, medians).
Prints one JSON line; ``moe_over_dense`` is the cost of megatron-core's MoE machinery (router,
token dispatcher, per-expert GEMMs) at equal FLOPs.

    OMP_NUM_THREADS=1 python benchmarks/bench_moe_teacher.py          # CPU (allgather dispatcher)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                   help="cpu: this process's CPU time (immune to other processes on a loaded machine)")
    return p.parse_args()


def _teacher(path: str, moe: bool, vocab: int) -> "object":
    from megatron_kd.models import build_gpt_model, get_preset
    from megatron_kd.runtime import set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    over = {} if moe else {"num_moe_experts": None, "ffn_hidden_size": 512}
    cfg = get_preset("cpu-moe-teacher", vocab_size=vocab, max_position_embeddings=1024, **over)
    set_seed(3)
    save_checkpoint(path, [build_gpt_model(cfg)], cfg, iteration=1)
    return cfg


def _trainer(teacher: str, args):
    from megatron_kd.config import load_config
    from megatron_kd.distill import DistillConfig
    from megatron_kd.distill.run import build_distill_data_iterators, build_distill_trainer, prepare_distill_config

    items = ["model.preset=cpu-student", f"model.vocab_size={args.vocab_size}", "data.synthetic=true",
             f"train.micro_batch_size={args.micro_batch_size}", f"train.global_batch_size={args.micro_batch_size}",
             f"train.seq_length={args.seq_length}", "train.train_iters=1000", "train.log_interval=0",
             "logging.quiet=true", f"teacher.load={teacher}", "kd.mode=online"]
    cfg = load_config(DistillConfig, None, items)
    model_cfg, spec = prepare_distill_config(cfg)
    make_train, _ = build_distill_data_iterators(cfg, model_cfg)
    return build_distill_trainer(cfg, model_cfg, spec), make_train(0)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig())
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = {name: _teacher(f"{tmp}/{name}", name == "moe", args.vocab_size) for name in ("moe", "dense")}
        set_seed(1)
        runs = {name: _trainer(f"{tmp}/{name}", args) for name in cfgs}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.warmup + args.rounds):
            for name, (trainer, it) in runs.items():
                t0 = clock()
                trainer.train_step(it)
                if r >= args.warmup:
                    times[name].append(clock() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    out = {"bench": "moe_teacher_online_kd_step", "device": "cuda" if torch.cuda.is_available() else "cpu",
           "clock": args.clock, "threads": args.threads, "seq_length": args.seq_length,
           "micro_batch_size": args.micro_batch_size, "vocab_size": args.vocab_size, "rounds": args.rounds,
           "moe_teacher_total_params": cfgs["moe"].num_parameters(),
           "moe_teacher_active_params": cfgs["moe"].num_active_parameters(),
           "dense_teacher_params": cfgs["dense"].num_parameters(),
           "step_s_moe_teacher": round(med["moe"], 4), "step_s_dense_teacher": round(med["dense"], 4),
           "moe_over_dense": round(med["moe"] / med["dense"], 3)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
