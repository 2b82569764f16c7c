"""``megatron-kd convert hf-to-mcore | mcore-to-hf``: Hugging Face <-> megatron-kd checkpoints."""
from __future__ import annotations

import argparse
import json

from megatron_kd.commands._flags import flag


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from megatron_kd.interop.convert import hf_to_mcore

    stats = hf_to_mcore(args.hf, args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp, dtype=args.dtype,
                        overwrite=args.overwrite, show_progress=not args.quiet)
    print(json.dumps({"command": "hf-to-mcore", "out": args.out, **stats}))
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from megatron_kd.interop.convert import mcore_to_hf

    stats = mcore_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, arch=args.arch,
                        hf_config=args.hf_config, tokenizer=args.tokenizer, iteration=args.iteration,
                        overwrite=args.overwrite, show_progress=not args.quiet)
    print(json.dumps({"command": "mcore-to-hf", "out": args.out, **stats}))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hf-to-mcore`` / ``mcore-to-hf`` sub-commands to ``parser`` (also used by the tool script)."""
    sub = parser.add_subparsers(dest="direction", metavar="<direction>")
    imp = sub.add_parser("hf-to-mcore", help="Hugging Face model directory -> megatron-kd checkpoint",
                         description="Import a local HF Llama/Mistral/Qwen2/Qwen3 safetensors model. Runs as one "
                                     "process; the checkpoint then loads at any TP/PP.")
    imp.add_argument("--hf", required=True, help="local HF model directory (config.json + *.safetensors)")
    flag(imp, "--output", dest="out", required=True, help="checkpoint directory to create")
    flag(imp, "--tensor-parallel", "--tp", dest="tp", type=int, default=1, help="tensor-parallel size to pad the vocabulary for "
                                                       "(validated; any TP dividing the padded size loads it)")
    flag(imp, "--pipeline-parallel", "--pp", dest="pp", type=int, default=1, help="pipeline-parallel size to validate the layer count against")
    imp.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="stored weight dtype; auto = config.json's torch dtype")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    flag(imp, "--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=_hf_to_mcore)
    exp = sub.add_parser("mcore-to-hf", help="megatron-kd checkpoint -> Hugging Face model directory",
                         description="Export a megatron-kd checkpoint (saved at any TP/PP) as safetensors + "
                                     "config.json + tokenizer, loadable with AutoModelForCausalLM.")
    flag(exp, "--checkpoint", dest="ckpt", required=True, help="megatron-kd checkpoint directory (with 'latest')")
    flag(exp, "--output", dest="out", required=True, help="HF model directory to create")
    exp.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    exp.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="exported weight dtype; auto = the checkpoint's")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    exp.add_argument("--arch", default=None, choices=["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral",
                                                          "qwen2_moe"],
                     help="HF family (default: the imported one, else qwen3 with QK-norm, qwen2 with QKV bias, "
                          "otherwise llama)")
    exp.add_argument("--hf-config", default=None,
                     help="config.json (or HF dir) whose extra fields to keep (default: CKPT/hf_config.json)")
    exp.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the checkpoint's)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    flag(exp, "--no-progress", "--quiet", dest="quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=_mcore_to_hf)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def register(subparsers) -> None:
    """Add ``convert`` to the ``megatron-kd`` CLI."""
    parser = subparsers.add_parser("convert", help="Hugging Face <-> megatron-kd checkpoint conversion",
                                   description="Convert checkpoints between Hugging Face and megatron-kd.")
    add_arguments(parser)
