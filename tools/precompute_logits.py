"""Megatron-style entry script: ``python tools/precompute_logits.py --teacher CKPT --data PREFIX --out STORE``.

Same flags as ``megatron-kd logits`` (launch with ``torchrun`` for TP/PP/DP).
"""
import sys

from megatron_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["logits", *sys.argv[1:]]))
