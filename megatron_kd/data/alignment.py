"""Byte spans of tokens and the byte-offset alignment of two tokenisations of the same text.

Cross-tokenizer distillation (``docs/cross_tokenizer.md``) needs, for every student position, the
teacher position that predicts the *same continuation of the text*. Both tokenisations are laid
over the UTF-8 bytes of the source; a position ``j`` (input token ``j``, predicting token
``j + 1``) has seen the text up to the end byte ``b_j`` of token ``j`` and predicts "the text after
byte ``b_j``". The alignment rule:

* ``exact`` (default): student position ``j`` is aligned to the (last) teacher position ``k`` whose
  token ends at the same byte, ``d_k == b_j``. Where the teacher has no token boundary at ``b_j``
  (a teacher token spans it) the position is unaligned: masked out of the KD term and counted.
* ``nearest_earlier``: the last teacher position with ``d_k <= b_j`` (the teacher has seen a
  prefix of the student's context, at most one teacher token shorter). Never unaligned except
  before the teacher's first boundary; a weaker signal.

What the spans are made of:

* SentencePiece: each piece's bytes (``▁`` is a space, ``<0xNN>`` byte-fallback pieces are one
  byte each); their concatenation is the text (models with a dummy prefix: the text after a leading
  space). A multi-byte character split into byte-fallback pieces gives the first pieces ends that
  are *inside* the character; they align only with a teacher that splits it the same way.
* Hugging Face fast tokenizers: ids' bytes from the byte-level alphabet (GPT-2/Qwen/Llama-3
  style) or the SentencePiece-style metaspace/byte-fallback vocabulary when their concatenation
  is the text; otherwise the ``offsets_mapping`` (character offsets) converted to byte offsets,
  where tokens sharing one character (a character split across tokens) all but the last get no
  boundary (``end = -1``, never aligned).
* Special tokens (end of document, ...) have no bytes. In a stream they occupy one *unit* of the
  coordinate axis (:func:`window_units`): an end-of-document in the student stream is matched by
  the teacher's end-of-document at the same unit, so both predict "the start of the next
  document"; other special ids advance the axis with no teacher counterpart.

Everything here is plain NumPy/Python on the host (the data pipeline), a few microseconds per
token (``benchmarks/bench_cross_tokenizer.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

RULES = ("exact", "nearest_earlier")
"""Alignment rules (see the module docstring)."""

SPACE_MARK = "\u2581"  # SentencePiece's "▁"


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2 style): printable character -> the byte it stands for.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes are
    mapped, in order, to code points 256, 257, ... so every byte has a visible character.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


@dataclass(frozen=True)
class TokenBytes:
    """Per-id byte strings of a vocabulary (``None``: a special/control token with no text)."""

    pieces: tuple[Optional[bytes], ...]
    """``pieces[i]``: the bytes id ``i`` stands for, or None for special ids."""
    byte_fallback: frozenset[int]
    """Ids that are byte-fallback pieces (``<0xNN>``): one raw byte, distinct from a text piece
    with the same byte (they are matched only with byte-fallback ids of another vocabulary)."""
    dummy_prefix: bool
    """The tokenizer prepends a space to the text (SentencePiece ``add_dummy_prefix``)."""
    eod: int
    """End-of-document id."""

    def __len__(self) -> int:
        return len(self.pieces)


def _piece_bytes(piece: str) -> tuple[bytes, bool]:
    """Bytes of a SentencePiece-style piece: ``▁`` -> space, ``<0xNN>`` -> that byte (fallback)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)]), True
        except ValueError:
            pass
    return piece.replace(SPACE_MARK, " ").encode("utf-8"), False


def _sentencepiece_bytes(tok: Any) -> TokenBytes:
    sp = tok._sp
    pieces: list[Optional[bytes]] = []
    fallback = set()
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            pieces.append(None)
            continue
        b, is_fb = _piece_bytes(sp.id_to_piece(i))
        if is_fb and sp.is_byte(i):
            fallback.add(i)
        pieces.append(b)
    dummy = bool(sp.encode("a") and sp.id_to_piece(sp.encode("a")[0]).startswith(SPACE_MARK))
    return TokenBytes(tuple(pieces), frozenset(fallback), dummy, int(tok.eod))


def _decoder_kind(spec: dict) -> str:
    """'byte_level' | 'metaspace' | 'other' from a tokenizer.json's decoder."""
    dec = spec.get("decoder") or {}
    types = [dec.get("type")] + [d.get("type") for d in dec.get("decoders") or []]
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or "ByteFallback" in types:
        return "metaspace"
    for d in dec.get("decoders") or []:
        if d.get("type") == "Replace" and SPACE_MARK in json.dumps(d, ensure_ascii=False):
            return "metaspace"
    return "other"


def _hf_bytes(tok: Any) -> Optional[TokenBytes]:
    """Byte table of an HF fast tokenizer with a byte-level or metaspace vocabulary (else None)."""
    fast = getattr(tok, "_fast", None)
    if fast is None:
        return None
    spec = json.loads(fast.to_str())
    kind = _decoder_kind(spec)
    if kind == "other":
        return None
    n = int(tok.vocab_size)
    special = {int(t["id"]) for t in spec.get("added_tokens") or [] if t.get("special")}
    added = {int(t["id"]): t["content"] for t in spec.get("added_tokens") or [] if not t.get("special")}
    alphabet = byte_level_alphabet()
    pieces: list[Optional[bytes]] = []
    fallback = set()
    for i in range(n):
        token = fast.id_to_token(i)
        if token is None or i in special:
            pieces.append(None)
        elif i in added:
            pieces.append(added[i].encode("utf-8"))
        elif kind == "byte_level":
            if all(c in alphabet for c in token):
                pieces.append(bytes(alphabet[c] for c in token))
            else:  # not a byte-level token: keep its UTF-8 text
                pieces.append(token.encode("utf-8"))
        else:
            b, is_fb = _piece_bytes(token)
            if is_fb:
                fallback.add(i)
            pieces.append(b)
    pre = json.dumps(spec.get("pre_tokenizer") or {}) + json.dumps(spec.get("normalizer") or {})
    dummy = kind == "metaspace" and ('"prepend_scheme": "always"' in pre or '"prepend_scheme": "first"' in pre
                                     or '"add_prefix_space": true' in pre or '"prepend": "\\u2581"' in pre)
    return TokenBytes(tuple(pieces), frozenset(fallback), dummy, int(tok.eod))


_TABLES: dict[str, Optional[TokenBytes]] = {}


def token_bytes(tok: Any) -> Optional[TokenBytes]:
    """The per-id byte table of a project tokenizer (:mod:`megatron_kd.data.tokenizers`), cached
    by its identity; None when the vocabulary does not define bytes (e.g. WordPiece ``##``)."""
    key = str(tok.identity)
    cached = _TABLES.get(key)
    if cached is None and key not in _TABLES:
        if getattr(tok, "kind", "") == "sentencepiece":
            cached = _sentencepiece_bytes(tok)
        else:
            cached = _hf_bytes(tok)
        _TABLES[key] = cached
    return cached


@dataclass
class TokenSpans:
    """A tokenisation with each token's byte span in the text (``ends[i] == -1``: token ``i`` ends
    inside a character, no boundary)."""

    ids: np.ndarray
    """Token ids, int64 [n]."""
    starts: np.ndarray
    """Byte offset of each token's first byte, int64 [n]."""
    ends: np.ndarray
    """Byte offset after each token's last byte (or -1), int64 [n]."""


def char_to_byte_offsets(text: str) -> np.ndarray:
    """``out[c]`` = UTF-8 byte offset of character ``c`` (``out[len(text)]`` = total bytes)."""
    lengths = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
    out = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _spans_from_table(ids: Sequence[int], table: TokenBytes, data: bytes) -> Optional[TokenSpans]:
    """Cumulative spans when the ids' bytes concatenate to ``data`` (after a dummy-prefix space)."""
    lengths = np.array([len(table.pieces[i] or b"") if 0 <= i < len(table) else 0 for i in ids], dtype=np.int64)
    joined = b"".join((table.pieces[i] or b"") if 0 <= i < len(table) else b"" for i in ids)
    shift = 0
    if joined != data:
        if table.dummy_prefix and joined == b" " + data:
            shift = 1
        else:
            return None
    ends = np.cumsum(lengths) - shift
    starts = ends - lengths
    return TokenSpans(np.asarray(ids, dtype=np.int64), np.maximum(starts, 0), np.maximum(ends, 0))


def _hf_offsets_spans(tok: Any, text: str) -> TokenSpans:
    enc = tok._fast.encode(text, add_special_tokens=False)
    c2b = char_to_byte_offsets(text)
    offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = c2b[offs[:, 0]], c2b[offs[:, 1]].copy()
    # Tokens sharing one character (split across tokens): only the last one ends at a boundary.
    for i in range(len(ends) - 1):
        if offs[i + 1, 0] < offs[i, 1]:
            ends[i] = -1
    return TokenSpans(np.asarray(enc.ids, dtype=np.int64), starts, ends)


def encode_with_spans(tok: Any, text: str) -> TokenSpans:
    """Encode ``text`` with a project tokenizer and give every token its byte span in ``text``.

    SentencePiece and byte-level / metaspace HF tokenizers: exact byte spans from the ids' bytes.
    Other HF fast tokenizers: offsets mapping (characters) converted to bytes. Raises a one-line
    ``ValueError`` for a tokenizer that defines neither (or a normalising SentencePiece model).
    """
    ids = tok.encode(text)
    data = text.encode("utf-8")
    table = token_bytes(tok)
    if table is not None:
        spans = _spans_from_table(ids, table, data)
        if spans is not None:
            return spans
    if getattr(tok, "_fast", None) is not None:
        return _hf_offsets_spans(tok, text)
    raise ValueError(f"tokenizer {getattr(tok, 'path', tok)} does not reproduce the text's bytes (a normalising "
                     "SentencePiece model?): cross-tokenizer alignment needs a lossless tokenizer "
                     "(train_sentencepiece's identity normalisation, or an HF fast tokenizer)")


def align_ends(student_ends: np.ndarray, teacher_ends: np.ndarray, rule: str = "exact") -> np.ndarray:
    """Teacher position for every student position (-1: unaligned), from token end offsets.

    ``*_ends``: int64 end offset of each position's input token on one axis (-1 = no boundary;
    the valid teacher ends must be non-decreasing). Ties go to the last teacher position.
    """
    if rule not in RULES:
        raise ValueError(f"alignment rule {rule!r} is not one of {', '.join(RULES)}")
    s = np.asarray(student_ends, dtype=np.int64)
    t = np.asarray(teacher_ends, dtype=np.int64)
    valid = np.flatnonzero(t >= 0)
    tv = t[valid]
    if len(tv) and np.any(np.diff(tv) < 0):
        raise ValueError("teacher token ends must be non-decreasing along the sequence")
    out = np.full(len(s), -1, dtype=np.int64)
    if len(tv) == 0:
        return out
    k = np.searchsorted(tv, s, side="right") - 1  # last valid teacher end <= s
    ok = (k >= 0) & (s >= 0)
    if rule == "exact":
        ok &= tv[np.clip(k, 0, None)] == s
    out[ok] = valid[k[ok]]
    return out


def align_texts(student_tok: Any, teacher_tok: Any, text: str, rule: str = "exact"
                ) -> tuple[TokenSpans, TokenSpans, np.ndarray]:
    """Both tokenisations of one ``text`` and the alignment (student position -> teacher position)."""
    s = encode_with_spans(student_tok, text)
    t = encode_with_spans(teacher_tok, text)
    return s, t, align_ends(s.ends, t.ends, rule)


# ----------------------------------------------------------------------------- token windows

def _utf8_valid_range(data: bytes) -> tuple[int, int]:
    """``(lo, hi)``: ``data[lo:hi]`` drops a partial character at either end (window edges)."""
    lo = 0
    while lo < min(len(data), 3) and 0x80 <= data[lo] < 0xC0:
        lo += 1
    hi = len(data)
    for back in range(1, min(4, hi - lo) + 1):
        b = data[hi - back]
        if b < 0x80:
            break
        if b >= 0xC0:  # lead byte: complete only if its sequence fits
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if back < need:
                hi -= back
            break
    return lo, hi


@dataclass
class WindowAlignment:
    """The teacher's view of one student window and the alignment of their positions."""

    teacher_tokens: np.ndarray
    """Teacher input ids [teacher_length] (padded with the teacher's end-of-document id)."""
    teacher_index: np.ndarray
    """For each student input position, the aligned teacher position, or -1 [student_length]."""
    teacher_ends: np.ndarray
    """Unit end offset of each teacher input position (-1 for padding/no boundary)."""
    student_ends: np.ndarray
    """Unit end offset of each student input position (-1: no boundary)."""


def window_units(ids: Sequence[int], table: TokenBytes) -> tuple[np.ndarray, list[tuple[int, int, bytes | None, int]]]:
    """Unit end offsets of a token window and its segments.

    Returns ``(ends[n], segments)`` where each segment is ``(start_unit, token_lo, bytes, token_hi)``
    for a run of text tokens (bytes = their concatenation) or ``(unit, i, None, id)`` for a special
    token ``ids[i]`` (one unit wide).
    """
    n = len(ids)
    ends = np.empty(n, dtype=np.int64)
    segments: list[tuple[int, int, bytes | None, int]] = []
    run: list[bytes] = []
    pos, run_lo, run_start = 0, 0, 0
    for i, tid in enumerate(ids):
        piece = table.pieces[tid] if 0 <= tid < len(table) else None
        if piece is None:
            if run:
                segments.append((run_start, run_lo, b"".join(run), i))
                run = []
            segments.append((pos, i, None, int(tid)))
            pos += 1
            ends[i] = pos
            run_lo, run_start = i + 1, pos
        else:
            if not run:
                run_lo, run_start = i, pos
            run.append(piece)
            pos += len(piece)
            ends[i] = pos
    if run:
        segments.append((run_start, run_lo, b"".join(run), n))
    return ends, segments


def align_window(student_ids: Sequence[int], student_table: TokenBytes, teacher_tok: Any, teacher_length: int,
                 rule: str = "exact", input_length: Optional[int] = None) -> WindowAlignment:
    """Re-tokenise a student token window with the teacher and align the positions.

    ``student_ids``: the window's tokens (inputs plus the final label: ``input_length + 1`` ids).
    The window's text is rebuilt from the student ids' bytes, split at special ids; each text
    segment is encoded by the teacher (a partial character at a window edge is left to no teacher
    token); a student end-of-document becomes the teacher's. The teacher sequence is cut or padded
    (with its end-of-document id) to ``teacher_length``.
    """
    ids = [int(i) for i in student_ids]
    n_in = len(ids) - 1 if input_length is None else input_length
    s_ends, segments = window_units(ids, student_table)
    t_ids: list[int] = []
    t_ends: list[int] = []
    t_eod = int(teacher_tok.eod)
    for start, _lo, data, special in segments:
        if data is None:
            if special == student_table.eod:
                t_ids.append(t_eod)
                t_ends.append(start + 1)
            continue
        lo, hi = _utf8_valid_range(data)
        try:
            text = data[lo:hi].decode("utf-8")
        except UnicodeDecodeError:
            continue  # not text: no teacher tokens (every student position here is unaligned)
        if not text:
            continue
        spans = encode_with_spans(teacher_tok, text)
        t_ids.extend(int(i) for i in spans.ids)
        t_ends.extend(int(e) + start + lo if e >= 0 else -1 for e in spans.ends)
        if len(t_ids) >= teacher_length:
            break
    t_ids, t_ends = t_ids[:teacher_length], t_ends[:teacher_length]
    pad = teacher_length - len(t_ids)
    teacher_tokens = np.asarray(t_ids + [t_eod] * pad, dtype=np.int64)
    teacher_ends = np.asarray(t_ends + [-1] * pad, dtype=np.int64)
    index = align_ends(s_ends[:n_in], teacher_ends, rule)
    return WindowAlignment(teacher_tokens, index, teacher_ends, s_ends[:n_in])
