#!/usr/bin/env python
"""Hugging Face <-> megatron-kd checkpoint conversion (same as ``megatron-kd convert``).

    python tools/convert_checkpoint.py hf-to-mcore --hf /models/Qwen2.5-0.5B --out ckpt/qwen-0.5b
    python tools/convert_checkpoint.py mcore-to-hf --ckpt ckpt/student --out hf/student
"""
import sys

from megatron_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
