"""A synthetic instruction task and a whitespace word tokenizer (tests, benchmarks, CPU demos).

Prompts are an operation word and a short list of symbols ("rev q c h e ="), responses are the
deterministic transformation ("e h c q"). Small enough that a tiny teacher learns it in a few
hundred steps on a CPU, structured enough that a smaller, briefly trained student is clearly worse.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

SYMBOLS = [chr(c) for c in range(ord("a"), ord("a") + 12)]
OPS = ("copy", "rev", "sort")
SPECIALS = ("<pad>", "<eos>")


class WordTokenizer:
    """Whitespace tokenizer over a fixed word list; id 0 = ``<pad>``, id 1 = ``<eos>``.

    Implements the project's tokenizer protocol (encode, decode, eod, pad, vocab_size, identity).
    Unknown words raise ``ValueError``.
    """

    kind = "word"

    def __init__(self, words: Iterable[str], path: str = ""):
        self.words = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.path = path
        digest = hashlib.sha256("\n".join(self.words).encode()).hexdigest()
        self._identity = f"word:sha256:{digest}"

    def encode(self, text: str) -> list[int]:
        """Ids of the whitespace-separated words of ``text``."""
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as exc:
            raise ValueError(f"word {exc.args[0]!r} is not in the tokenizer vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces (special tokens dropped)."""
        return " ".join(self.words[i] for i in ids if i >= len(SPECIALS))

    @property
    def eod(self) -> int:
        """End-of-sequence id."""
        return 1

    @property
    def pad(self) -> int:
        """Padding id."""
        return 0

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        return len(self.words)

    @property
    def identity(self) -> str:
        """Stable hash of the word list."""
        return self._identity

    def save(self, path: str | os.PathLike) -> None:
        """Write the word list as JSON (reload with :meth:`load`)."""
        Path(path).write_text(json.dumps({"kind": self.kind, "words": self.words[len(SPECIALS):]}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        """Read a word list written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        if data.get("kind") != cls.kind:
            raise ValueError(f"{path} is not a word-tokenizer file")
        return cls(data["words"], path=str(path))


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
