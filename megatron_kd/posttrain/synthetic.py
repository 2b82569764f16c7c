"""A synthetic instruction task (tests, benchmarks, CPU demos); its word tokenizer is data.tokenizers.WordTokenizer.

Prompts are an operation word and a short list of symbols ("rev q c h e ="), responses are the
deterministic transformation ("e h c q"). Small enough that a tiny teacher learns it in a few
hundred steps on a CPU, structured enough that a smaller, briefly trained student is clearly worse.
"""
from __future__ import annotations

import json
import os

import numpy as np

from megatron_kd.data.tokenizers import WORD_SPECIALS as SPECIALS, WordTokenizer

__all__ = ["SPECIALS", "WordTokenizer", "make_records", "task_tokenizer", "write_jsonl"]

SYMBOLS = [chr(c) for c in range(ord("a"), ord("a") + 12)]
OPS = ("copy", "rev", "sort")


def task_tokenizer() -> WordTokenizer:
    """The tokenizer of the synthetic task (ops, symbols, '=')."""
    return WordTokenizer(list(OPS) + SYMBOLS + ["="])


def _apply(op: str, seq: list[str]) -> list[str]:
    if op == "copy":
        return list(seq)
    if op == "rev":
        return seq[::-1]
    return sorted(seq)


def make_records(n: int, seed: int = 0, min_len: int = 3, max_len: int = 6, ops: tuple[str, ...] = OPS) -> list[dict]:
    """``n`` records ``{"prompt": "rev a c b =", "response": "b c a"}``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        op = ops[int(rng.integers(len(ops)))]
        seq = [SYMBOLS[int(i)] for i in rng.integers(0, len(SYMBOLS), size=int(rng.integers(min_len, max_len + 1)))]
        out.append({"prompt": " ".join([op] + seq + ["="]), "response": " ".join(_apply(op, seq))})
    return out


def write_jsonl(records: list[dict], path: str | os.PathLike) -> None:
    """Write records as JSONL."""
    from megatron_kd.utils.io import atomic_write

    with atomic_write(path) as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
