#!/usr/bin/env python
"""HF <-> megatron conversion speed and memory on a ~0.5B-parameter random model; prints JSON.

Writes a random Qwen2.5-0.5B-shaped model (24 layers, hidden 896, 14/2 heads, ffn 4864, vocab
151,936, tied embeddings, QKV bias; 494M parameters, ~2 GB in fp32) as HF safetensors, then runs
``megatron-kd convert hf-to-mcore`` and ``mcore-to-hf`` each in a fresh process and reports per
direction: seconds and GB/s (checkpoint bytes / wall time, interpreter start and file IO
included; also excluding start-up), CPU seconds, the kernel's peak RSS of the conversion process
(``wait4`` ru_maxrss) and the sampled peak PSS of its process tree (dist_checkpointing forks
writer processes that share the parent's pages; PSS counts shared pages once), as ratios to the
checkpoint size. Finally checks that the round trip reproduced every tensor exactly.

    PYTHONPATH=$PWD python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rms_norm_eps=1e-6)


def make_model(out: Path, layers: int) -> None:
    """Random-weight Qwen2.5-0.5B-shaped model (fp32 safetensors + config.json) in ``out``.

    Written tensor by tensor with the streaming writer (a transformers model would need the whole
    2 GB in memory plus its initialisation); the config comes from transformers' Qwen2Config.
    """
    import torch
    from transformers import Qwen2Config

    from megatron_kd.interop.hf_config import hf_to_model_config
    from megatron_kd.interop.hf_weights import hf_shapes
    from megatron_kd.interop.safetensors_io import TensorSpec, write_hf_weights

    hf_cfg = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers}, architectures=["Qwen2ForCausalLM"],
                         dtype="float32")
    hf_cfg.save_pretrained(out)
    cfg, _ = hf_to_model_config(json.loads((out / "config.json").read_text()))
    gen = torch.Generator().manual_seed(0)
    specs = [TensorSpec(name, torch.float32, shape, lambda shape=shape: torch.randn(shape, generator=gen) * 0.02)
             for name, shape in hf_shapes(cfg).items()]
    write_hf_weights(out, specs, max_shard_bytes=5 * 10**9)


def _tree_pss(pid: int) -> int:
    import psutil

    total = 0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; return wall seconds, kernel peak RSS (bytes) and sampled tree-PSS peak (bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_tree_pss_bytes": peak[0],
            "result": json.loads(out.decode().strip().splitlines()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_convert", help="scratch directory (deleted unless --keep)")
    parser.add_argument("--layers", type=int, default=24, help="transformer layers (24 = Qwen2.5-0.5B)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    hf, ckpt, back = work / "hf", work / "ckpt", work / "hf_back"
    load0 = round(os.getloadavg()[0], 1)  # the machine is shared: record how busy it was
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--make-model", str(hf), str(args.layers)], env=env, check=True,
                   stderr=subprocess.DEVNULL)
    make_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    cli = [sys.executable, "-m", "megatron_kd", "convert"]
    imp = run_measured(cli + ["hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--quiet"], env)
    exp = run_measured(cli + ["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--quiet"], env)
    same = _same_files(hf, back)
    report = {"benchmark": "hf_conversion", "model": f"random Qwen2.5-0.5B shape, {args.layers} layers, fp32",
              "parameters": size // 4, "checkpoint_bytes": size, "make_model_seconds": round(make_s, 1),
              "roundtrip_tensors_equal": same, "load_average_1m": [load0, round(os.getloadavg()[0], 1)]}
    for name, r in (("hf_to_mcore", imp), ("mcore_to_hf", exp)):
        inner = r["result"]["seconds"]
        report[name] = {"seconds": round(r["seconds"], 2), "gb_per_s": round(size / r["seconds"] / 1e9, 3),
                        "cpu_seconds": round(r["cpu_seconds"], 2),
                        "gb_per_s_excluding_startup": round(size / inner / 1e9, 3),
                        "peak_rss_gb": round(r["peak_rss_bytes"] / 1e9, 3),
                        "peak_rss_x_ckpt": round(r["peak_rss_bytes"] / size, 3),
                        "peak_tree_pss_gb": round(r["peak_tree_pss_bytes"] / 1e9, 3),
                        "peak_tree_pss_x_ckpt": round(r["peak_tree_pss_bytes"] / size, 3),
                        "in_process_seconds": round(inner, 2)}
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _same_files(a: Path, b: Path) -> bool:
    """Tensor-by-tensor equality of two HF directories, streamed (one tensor in memory at a time)."""
    import torch

    from megatron_kd.interop.safetensors_io import HFCheckpointReader

    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    return sorted(ra.keys()) == sorted(rb.keys()) and all(torch.equal(ra.read(k), rb.read(k)) for k in ra.keys())


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--make-model":
        make_model(Path(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
