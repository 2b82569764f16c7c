"""Ids that mean the same text in two vocabularies (the matched support of the hybrid KD loss).

:func:`build_vocab_map` pairs student id ``a`` with teacher id ``b`` when both stand for the same
bytes (:func:`megatron_kd.data.alignment.token_bytes`), with these rules:

* byte-fallback pieces (``<0xNN>``) pair only with byte-fallback pieces of the same byte, text
  pieces only with text pieces (SentencePiece's ``<0x41>`` and ``A`` are different predictions);
* special ids have no bytes; the end-of-document ids pair with each other, other specials
  (unk, bos, pad, chat markers) are unmatched;
* a byte string held by several ids of one vocabulary pairs its lowest such id (the others are
  unmatched and go to the ULD remainder);
* two tokenizers with the same identity pair every id with itself.

Built once per run on the host; a few hundred milliseconds for 150k-id vocabularies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_kd.data.alignment import TokenBytes, token_bytes


@dataclass(frozen=True)
class VocabMap:
    """Matched id pairs of a student and a teacher vocabulary (sorted by student id)."""

    student_ids: np.ndarray
    """int64 [M]: student ids of the matched pairs."""
    teacher_ids: np.ndarray
    """int64 [M]: the teacher id paired with each ``student_ids`` entry."""
    student_vocab_size: int
    """Ids of the student tokenizer."""
    teacher_vocab_size: int
    """Ids of the teacher tokenizer."""

    def __len__(self) -> int:
        return int(len(self.student_ids))

    @classmethod
    def identity(cls, vocab_size: int) -> "VocabMap":
        """Every id paired with itself (one tokenizer on both sides)."""
        ids = np.arange(vocab_size, dtype=np.int64)
        return cls(ids, ids.copy(), vocab_size, vocab_size)

    def describe(self) -> dict:
        """Counts for logs and reports."""
        return {"matched": len(self), "student_vocab": self.student_vocab_size,
                "teacher_vocab": self.teacher_vocab_size,
                "student_matched_frac": round(len(self) / max(self.student_vocab_size, 1), 4)}


def _keys(table: TokenBytes) -> dict[tuple[bytes, bool] | str, int]:
    out: dict[tuple[bytes, bool] | str, int] = {}
    for i, piece in enumerate(table.pieces):
        if piece is None or piece == b"":
            continue
        out.setdefault((piece, i in table.byte_fallback), i)
    out["<eod>"] = table.eod
    return out


def build_vocab_map(student_tok: Any, teacher_tok: Any) -> VocabMap:
    """Pair the ids of two project tokenizers that decode to the same bytes (rules: module docs)."""
    n_s, n_t = int(student_tok.vocab_size), int(teacher_tok.vocab_size)
    if str(student_tok.identity) == str(teacher_tok.identity):
        return VocabMap.identity(n_s)
    ts, tt = token_bytes(student_tok), token_bytes(teacher_tok)
    for name, tok, table in (("student", student_tok, ts), ("teacher", teacher_tok, tt)):
        if table is None:
            raise ValueError(f"{name} tokenizer {getattr(tok, 'path', tok)} has no byte-level vocabulary "
                             "(WordPiece?): kd.cross_tokenizer=hybrid needs one; use kd.cross_tokenizer=uld")
    ks, kt = _keys(ts), _keys(tt)
    pairs = sorted((ks[k], kt[k]) for k in ks.keys() & kt.keys())
    a = np.asarray([p[0] for p in pairs], dtype=np.int64)
    b = np.asarray([p[1] for p in pairs], dtype=np.int64)
    return VocabMap(a, b, n_s, n_t)


def build_projection(student_tok: Any, teacher_tok: Any) -> np.ndarray:
    """``proj[u]`` = the student id a continuation starting with teacher token ``u`` begins with
    (-1: none), for :func:`megatron_kd.losses.projected_kd_loss`.

    The teacher token's text is encoded by the student tokenizer and its first id is kept: a
    teacher ``"▁function"`` maps to the student's ``"▁fun"`` when that is how the student starts
    the word, so the teacher's mass lands on the student token the student itself would emit.
    Exact when the student's first token lies inside the teacher's token (the usual case when the
    student vocabulary is the smaller one). Byte pieces that are not text on their own (byte
    fallback, byte-level fragments of a character) map to the student's byte-fallback piece of
    their first byte, or -1; the end-of-document ids map to each other; other specials to -1.
    """
    n_t = int(teacher_tok.vocab_size)
    if str(student_tok.identity) == str(teacher_tok.identity):
        return np.arange(n_t, dtype=np.int64)
    ts, tt = token_bytes(student_tok), token_bytes(teacher_tok)
    if ts is None or tt is None:
        raise ValueError("a projection between the vocabularies needs byte-level tokenizers on both sides "
                         "(SentencePiece or byte-level/metaspace HF)")
    byte_ids = {ts.pieces[i][0]: i for i in sorted(ts.byte_fallback)}
    proj = np.full(n_t, -1, dtype=np.int64)
    for u, piece in enumerate(tt.pieces):
        if not piece:
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            proj[u] = byte_ids.get(piece[0], -1)
            continue
        ids = student_tok.encode(text)
        if ids:
            proj[u] = ids[0]
    proj[tt.eod] = ts.eod
    return proj
