"""Bit-packed encoding of truncated teacher distributions ("bitpack-v1"), vectorised in numpy.

One token position keeps ``n`` (vocabulary id, log-prob) entries, ``0 <= n <= 255``. It is stored as

* a 4-byte header, kept in three per-token columns so that ranges decode without parsing:
  ``count`` (uint8, n), ``widths`` (uint8: id-delta width ``w`` in the low 5 bits, value-width
  code in the high 3 bits, see :data:`VALUE_WIDTHS`) and ``top`` (float16: the token's largest
  log-prob, rounded to fp16);
* a bit string in the shard payload: the ids sorted ascending, the first one in ``id_bits`` bits
  (``ceil(log2 vocab)``: 18 for Qwen's 151,936, up to 24), every further id as ``id - prev - 1``
  in ``w`` bits (``w`` = bit length of the token's largest gap), then the ``n`` values, in the same
  id order, as ``q = round((top - logprob) / step)`` in ``v`` bits. Decoding gives
  ``logprob = top - q * step``: the quantisation error is at most ``step / 2`` nats per entry and
  a common shift of all entries (the fp16 rounding of ``top``) does not change the renormalised
  distribution. A token with ``n = 1`` costs ``id_bits`` only (its value is ``top``).

Tokens are bit-contiguous inside a *segment* (one teacher window); each segment starts on a byte
boundary, so segments are written independently and located through a small segment table.
All bit fields are little-endian (bit ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENCODING = "bitpack-v1"
MAX_ID_BITS = 24
"""Ids up to 2^24 - 1 (vocabularies up to 16.7M)."""
MAX_COUNT = 255
"""At most 255 entries per token (``count`` is a uint8)."""
VALUE_WIDTHS = np.array([0, 3, 4, 5, 6, 7, 8, 12], dtype=np.int64)
"""Value-field widths selectable by the 3-bit code; 12 bits is the cap (4095 steps below top)."""
MAX_VALUE_Q = (1 << int(VALUE_WIDTHS[-1])) - 1


def id_bits_for(vocab_size: int) -> int:
    """Bits needed for one vocabulary id (at least 1)."""
    if vocab_size < 1 or vocab_size > (1 << MAX_ID_BITS):
        raise ValueError(f"vocab_size={vocab_size} is outside 1..2^{MAX_ID_BITS}: the store encodes ids in "
                         f"at most {MAX_ID_BITS} bits")
    return max(1, int(vocab_size - 1).bit_length())


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Elementwise bit length of non-negative integers below 2^53 (0 -> 0)."""
    x = np.asarray(x, dtype=np.int64)
    # frexp: x = m * 2^e with 0.5 <= m < 1, exact for integers below 2^53, so e is the bit length.
    return np.where(x > 0, np.frexp(x.astype(np.float64))[1], 0).astype(np.int64)


def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x) + 1, dtype=np.int64)
    np.cumsum(x, out=out[1:])
    return out


@dataclass
class EncodedChunk:
    """Encoded tokens of one or more segments, ready to append to a shard."""

    payload: np.ndarray
    """uint8 bytes of all segments, concatenated (each segment byte-aligned)."""
    count: np.ndarray
    """uint8 [T] kept entries per token."""
    widths: np.ndarray
    """uint8 [T] id-delta width | value-width code << 5."""
    top: np.ndarray
    """float16 [T] top log-prob per token (0 for tokens without entries)."""
    segment_bytes: np.ndarray
    """int64 [S] byte length of each segment inside ``payload``."""
    num_entries: int
    """Total kept entries."""


def flatten_rows(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense rows -> the flat, id-sorted entry lists :func:`encode` takes.

    ``ids``/``logprobs``: [T, K]; row ``t`` uses its first ``counts[t]`` entries, in any order.
    Returns ``(ids [E], logprobs [E])``, grouped by token, ids increasing inside each token.
    """
    ids = np.asarray(ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    valid = np.arange(ids.shape[1])[None, :] < counts[:, None]
    key = np.where(valid, ids, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    ids_s = np.take_along_axis(ids, order, axis=1)
    lp_s = np.take_along_axis(np.asarray(logprobs), order, axis=1)
    return ids_s[valid], lp_s[valid]


def encode(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, segment_lengths: np.ndarray,
           id_bits: int, value_step: float) -> EncodedChunk:
    """Encode ``T`` token positions split into consecutive segments.

    Args:
        counts: int [T] entries kept per token, ``0..255``.
        ids: int [E] (``E = counts.sum()``) vocabulary ids grouped by token, strictly increasing
            inside each token (see :func:`flatten_rows`).
        logprobs: float [E] log-probs (normalised over the full vocabulary) of those ids.
        segment_lengths: int [S] tokens per segment, summing to ``T``.
        id_bits: bits of the first id of a token (:func:`id_bits_for`).
        value_step: quantisation step of the log-prob gaps below the token's top, in nats.
    """
    counts = np.asarray(counts, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float64)
    seg_len = np.asarray(segment_lengths, dtype=np.int64)
    T, E = len(counts), int(counts.sum())
    if seg_len.sum() != T or np.any(seg_len < 0):
        raise ValueError(f"segment lengths sum to {int(seg_len.sum())}, expected {T} tokens")
    if np.any(counts < 0) or np.any(counts > MAX_COUNT) or len(ids) != E or len(lp) != E:
        raise ValueError(f"need 0 <= counts <= {MAX_COUNT} and {E} = sum(counts) ids and log-probs")
    if E and (ids.min() < 0 or ids.max() >= (1 << id_bits)):
        raise ValueError(f"an id is negative or does not fit in {id_bits} bits")
    has = counts > 0
    starts = _excl_cumsum(counts)
    tok = np.repeat(np.arange(T), counts)
    first = np.zeros(E, dtype=bool)
    first[starts[:-1][has]] = True
    lp_top = np.zeros(T)
    if E:
        lp_top[has] = np.maximum.reduceat(lp, starts[:-1][has])
    top16 = lp_top.astype(np.float16)
    q = np.clip(np.rint((top16.astype(np.float64)[tok] - lp) / value_step), 0, MAX_VALUE_Q).astype(np.int64)
    gaps = np.zeros(E, dtype=np.int64)
    if E:
        gaps[1:] = ids[1:] - ids[:-1] - 1
    gaps[first] = 0
    if np.any(gaps < 0):
        raise ValueError("ids must be distinct and increasing inside each token (see flatten_rows)")
    idw = np.zeros(T, dtype=np.int64)
    vneed = np.zeros(T, dtype=np.int64)
    if E:
        idw[has] = _bit_length(np.maximum.reduceat(gaps, starts[:-1][has]))
        vneed[has] = _bit_length(np.maximum.reduceat(q, starts[:-1][has]))
    vcode = np.searchsorted(VALUE_WIDTHS, vneed, side="left")
    vw = VALUE_WIDTHS[vcode]

    tok_bits = np.where(has, id_bits + (counts - 1) * idw + counts * vw, 0)
    seg_of_tok = np.repeat(np.arange(len(seg_len)), seg_len)
    seg_start_tok = _excl_cumsum(seg_len)
    cs = _excl_cumsum(tok_bits)
    seg_bits = cs[seg_start_tok[1:]] - cs[seg_start_tok[:-1]]
    seg_bytes = (seg_bits + 7) // 8
    seg_byte_start = _excl_cumsum(seg_bytes)
    tok_pos = seg_byte_start[seg_of_tok] * 8 + (cs[:-1] - cs[seg_start_tok[:-1]][seg_of_tok])

    # Fields (bit position, width, value): every id, then every value, of every entry.
    r = np.arange(E) - starts[tok]
    idw_e = idw[tok]
    id_pos = tok_pos[tok] + np.where(first, 0, id_bits + (r - 1) * idw_e)
    v_pos = tok_pos[tok] + id_bits + (counts[tok] - 1) * idw_e + r * vw[tok]
    payload = _write_fields(int(seg_byte_start[-1]), np.concatenate([id_pos, v_pos]),
                            np.concatenate([np.where(first, id_bits, idw_e), vw[tok]]),
                            np.concatenate([np.where(first, ids, gaps), q]))
    return EncodedChunk(payload=payload, count=counts.astype(np.uint8), widths=(idw | (vcode << 5)).astype(np.uint8),
                        top=top16, segment_bytes=seg_bytes, num_entries=E)


def _write_fields(num_bytes: int, pos: np.ndarray, width: np.ndarray, val: np.ndarray) -> np.ndarray:
    """OR disjoint bit fields (width <= 25) into a zeroed byte buffer."""
    keep = width > 0
    pos, width, val = pos[keep], width[keep], val[keep]
    if np.any(val >= (np.int64(1) << width)):
        raise AssertionError("bit field overflow (encoder bug)")
    shifted = val << (pos & 7)  # < 2^32
    byte0 = pos >> 3
    idx = np.concatenate([byte0 + i for i in range(4)])
    byt = np.concatenate([(shifted >> (8 * i)) & 0xFF for i in range(4)])
    nz = byt != 0
    # Fields are disjoint in bits, so per-byte OR equals per-byte sum: one bincount does it.
    buf = np.bincount(idx[nz], weights=byt[nz].astype(np.float64), minlength=num_bytes + 4)
    return buf[:num_bytes].astype(np.uint8)


def _read_fields(buf: np.ndarray, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Read bit fields (width <= 25) from ``buf`` (uint8, padded with >= 4 bytes past the last field)."""
    byte0 = pos >> 3
    word = (buf[byte0].astype(np.int64) | (buf[byte0 + 1].astype(np.int64) << 8)
            | (buf[byte0 + 2].astype(np.int64) << 16) | (buf[byte0 + 3].astype(np.int64) << 24))
    return (word >> (pos & 7)) & ((np.int64(1) << width) - 1)


def token_bit_lengths(count: np.ndarray, widths: np.ndarray, id_bits: int) -> np.ndarray:
    """Bits each token occupies in the payload (int64 [T])."""
    n = count.astype(np.int64)
    w = widths.astype(np.int64)
    return np.where(n > 0, id_bits + (n - 1) * (w & 31) + n * VALUE_WIDTHS[w >> 5], 0)


def decode(buf: np.ndarray, tok_pos: np.ndarray, count: np.ndarray, widths: np.ndarray, top: np.ndarray,
           id_bits: int, value_step: float, k_max: int, pad_logprob: float = float("-inf"),
           sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``T`` tokens whose bit strings start at ``tok_pos`` (bit offsets into ``buf``).

    Returns ``(ids int64 [T, k_max], logprobs float32 [T, k_max])`` padded with -1 / ``pad_logprob``.
    With ``sort`` the entries of a token are ordered by decreasing log-prob (ties: smaller id first)
    and a token with more than ``k_max`` entries keeps its ``k_max`` most probable ones; otherwise
    they come in increasing id order.
    """
    T = len(count)
    n = count.astype(np.int64)
    idw = widths.astype(np.int64) & 31
    vw = VALUE_WIDTHS[widths.astype(np.int64) >> 5]
    starts = _excl_cumsum(n)
    E = int(starts[-1])
    ids_out = np.full((T, k_max), -1, dtype=np.int64)
    lp_out = np.full((T, k_max), pad_logprob, dtype=np.float32)
    if E == 0 or k_max == 0:
        return ids_out, lp_out
    tok = np.repeat(np.arange(T), n)
    r = np.arange(E) - starts[tok]
    first = r == 0
    pos0 = tok_pos.astype(np.int64)[tok]
    fid = _read_fields(buf, pos0 + np.where(first, 0, id_bits + (r - 1) * idw[tok]), np.where(first, id_bits, idw[tok]))
    incr = np.where(first, fid, fid + 1)
    cs = np.cumsum(incr)
    has = np.nonzero(n)[0]
    base = np.zeros(T, dtype=np.int64)
    base[has] = cs[starts[has]] - incr[starts[has]]
    ids = cs - base[tok]
    q = _read_fields(buf, pos0 + id_bits + (n[tok] - 1) * idw[tok] + r * vw[tok], vw[tok])
    lp = top.astype(np.float64)[tok] - q * value_step
    if sort:
        # Entries are grouped by token in id order; a stable sort on (token, q) orders each token
        # by decreasing log-prob with ties in id order, and leaves ``tok`` and ``r`` valid.
        order = np.argsort(tok * (MAX_VALUE_Q + 1) + q, kind="stable")
        ids, lp = ids[order], lp[order]
    keep = r < k_max
    ids_out[tok[keep], r[keep]] = ids[keep]
    lp_out[tok[keep], r[keep]] = lp[keep]
    return ids_out, lp_out
