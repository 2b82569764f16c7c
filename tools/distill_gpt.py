#!/usr/bin/env python
"""Megatron-style entry script: ``torchrun --nproc-per-node N tools/distill_gpt.py --config cfg.yaml [k=v ...]``.

Same as ``megatron-kd distill``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_kd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
