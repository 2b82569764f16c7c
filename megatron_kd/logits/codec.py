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

Sampled targets ("bitpack-draws-v1", :class:`Layout` with ``num_draws = N``): the same header
and id fields; the values (log-prob gaps) only when the store keeps them (``values``); then the
*draw counts* ``c_i`` of the entries, in id order, as one unary string: per entry ``c_i - offset``
one-bits and a zero-bit, ``offset = 1`` for ``sample`` stores (every entry was drawn) and 0 for
``topk+sample`` (exact head entries have ``c = 0``). The string is ``N + (1 - offset) * n`` bits
long, so a token's bit length still follows from its header: random access is unchanged.
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


@dataclass(frozen=True)
class Layout:
    """What a token's bit string holds beyond its ids (one per store, from its manifest)."""

    id_bits: int
    """Bits of a token's first id."""
    value_step: float
    """Quantisation step of the stored log-prob gaps (nats)."""
    values: bool = True
    """Per-entry log-prob gaps are stored (top-k stores, and sampled stores that keep log-probs)."""
    num_draws: int = 0
    """N draws per token (sampled stores); 0 = no draw counts (top-k)."""
    draw_offset: int = 1
    """Smallest draw count of an entry: 1 (``sample``) or 0 (``topk+sample``: exact head entries)."""

    def token_bits(self, count: np.ndarray, widths: np.ndarray) -> np.ndarray:
        """Bits each token occupies in the payload (int64 [T])."""
        n = np.asarray(count).astype(np.int64)
        w = np.asarray(widths).astype(np.int64)
        bits = self.id_bits + (n - 1) * (w & 31) + n * VALUE_WIDTHS[w >> 5]
        if self.num_draws:
            bits = bits + self.num_draws + (1 - self.draw_offset) * n
        return np.where(n > 0, bits, 0)


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


def encode(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray | None, segment_lengths: np.ndarray,
           id_bits: int, value_step: float, draws: np.ndarray | None = None,
           layout: Layout | None = None) -> EncodedChunk:
    """Encode ``T`` token positions split into consecutive segments.

    Args:
        counts: int [T] entries kept per token, ``0..255``.
        ids: int [E] (``E = counts.sum()``) vocabulary ids grouped by token, strictly increasing
            inside each token (see :func:`flatten_rows`).
        logprobs: float [E] log-probs (normalised over the full vocabulary) of those ids.
        segment_lengths: int [S] tokens per segment, summing to ``T``.
        id_bits: bits of the first id of a token (:func:`id_bits_for`).
        value_step: quantisation step of the log-prob gaps below the token's top, in nats.
        draws: int [E] draw counts of the entries (sampled stores, with ``layout``).
        layout: a :class:`Layout` with draws and/or without values (default: top-k, values only).
    """
    layout = layout or Layout(id_bits, value_step)
    if layout.values and not layout.num_draws and draws is None:  # top-k layout: the C encoder, same bytes
        from megatron_kd.logits.native import encode_topk  # here: codec itself needs numpy only

        got = encode_topk(counts, ids, logprobs, segment_lengths, layout.id_bits, layout.value_step, VALUE_WIDTHS,
                          MAX_VALUE_Q)
        if got is not None:
            payload, count, widths, top, seg_bytes = got
            return EncodedChunk(payload=payload, count=count, widths=widths, top=top, segment_bytes=seg_bytes,
                                num_entries=len(ids))
    counts = np.asarray(counts, dtype=np.int64)
    seg_len = np.asarray(segment_lengths, dtype=np.int64)
    if len(seg_len) > 1 and len(ids) > 2 * GROUP_ENTRIES and seg_len.sum() == len(counts) and np.all(seg_len >= 0):
        # Segments are independent and byte-aligned: encode cache-sized groups of whole segments and
        # concatenate (the same bytes; numpy's [E] temporaries then stay in cache, ~2x faster).
        tok_cut = _excl_cumsum(seg_len)
        ent_cut = _excl_cumsum(counts)[tok_cut]
        if ent_cut[-1] == len(ids):
            groups, g0 = [], 0
            for s in range(1, len(seg_len) + 1):
                if s == len(seg_len) or ent_cut[s] - ent_cut[g0] >= GROUP_ENTRIES:
                    t0, t1, e0, e1 = tok_cut[g0], tok_cut[s], ent_cut[g0], ent_cut[s]
                    groups.append(_encode(counts[t0:t1], np.asarray(ids)[e0:e1],
                                          None if logprobs is None else np.asarray(logprobs)[e0:e1], seg_len[g0:s],
                                          id_bits, value_step, None if draws is None else np.asarray(draws)[e0:e1],
                                          layout))
                    g0 = s
            return EncodedChunk(payload=np.concatenate([g.payload for g in groups]),
                                count=np.concatenate([g.count for g in groups]),
                                widths=np.concatenate([g.widths for g in groups]),
                                top=np.concatenate([g.top for g in groups]),
                                segment_bytes=np.concatenate([g.segment_bytes for g in groups]),
                                num_entries=sum(g.num_entries for g in groups))
    return _encode(counts, ids, logprobs, seg_len, id_bits, value_step, draws, layout)


GROUP_ENTRIES = 1 << 15
"""Entries per group of segments that :func:`encode` encodes at once (32k: a few hundred positions
of a top-100 store; each [E] int64 temporary is then 256 KiB)."""


def _encode(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray | None, seg_len: np.ndarray, id_bits: int,
            value_step: float, draws: np.ndarray | None, layout: Layout) -> EncodedChunk:
    ids = np.asarray(ids, dtype=np.int64)
    lp = np.asarray(logprobs if layout.values else np.zeros(len(ids)), dtype=np.float64)
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
    if not layout.values:
        vcode[:] = 0
        top16[:] = 0
    vw = VALUE_WIDTHS[vcode]
    widths = (idw | (vcode << 5)).astype(np.uint8)

    tok_bits = layout.token_bits(counts, widths)
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
    pos_f, wid_f, val_f = [id_pos, v_pos], [np.where(first, id_bits, idw_e), vw[tok]], [np.where(first, ids, gaps), q]
    if layout.num_draws:
        d_pos, d_wid, d_val = _unary_fields(tok_pos[tok] + id_bits + (counts[tok] - 1) * idw_e + counts[tok] * vw[tok],
                                            np.asarray(draws, dtype=np.int64), r, counts, starts, layout)
        pos_f.append(d_pos), wid_f.append(d_wid), val_f.append(d_val)
    # One call per field group (each is sorted by position); the groups' bits are disjoint.
    payload = _write_fields(int(seg_byte_start[-1]), pos_f[0], wid_f[0], val_f[0])
    for p_, w_, v_ in zip(pos_f[1:], wid_f[1:], val_f[1:]):
        payload |= _write_fields(int(seg_byte_start[-1]), p_, w_, v_)
    return EncodedChunk(payload=payload, count=counts.astype(np.uint8), widths=widths,
                        top=top16, segment_bytes=seg_bytes, num_entries=E)


_RUN = 24
"""Longest run of one-bits written as one field (``_write_fields`` takes widths <= 25)."""


def _unary_fields(tok_draw_pos: np.ndarray, draws: np.ndarray, r: np.ndarray, counts: np.ndarray,
                  starts: np.ndarray, layout: Layout):
    """Bit fields of the unary draw counts. ``tok_draw_pos`` [E]: first bit of the entry's token's
    draw string; ``r`` [E]: the entry's rank inside its token."""
    E = len(draws)
    m = draws - layout.draw_offset  # one-bits of each entry
    if E and (m.min() < 0):
        raise ValueError(f"draw counts must be >= {layout.draw_offset} for this store kind")
    tok_of = np.repeat(np.arange(len(counts)), counts)
    if E:
        sums = np.add.reduceat(draws, starts[:-1][counts > 0])
        if np.any(sums != layout.num_draws):
            raise ValueError(f"draw counts of a token must sum to num_samples={layout.num_draws}")
    # bit offset of each entry inside its token's string: ones and zeros of the entries before it
    csum = np.cumsum(m + 1) - (m + 1)
    before = csum - csum[starts[tok_of]] if E else csum
    base = tok_draw_pos + before
    nfull = m // _RUN
    nf = nfull + 1  # fields per entry: full runs, then the remainder + the zero bit
    e_of = np.repeat(np.arange(E), nf)
    j = np.arange(int(nf.sum())) - np.repeat(np.cumsum(nf) - nf, nf)
    last = j == nfull[e_of]
    width = np.where(last, m[e_of] - nfull[e_of] * _RUN + 1, _RUN)
    val = np.where(last, (np.int64(1) << (width - 1)) - 1, (1 << _RUN) - 1)
    return base[e_of] + j * _RUN, width, val


def _write_fields(num_bytes: int, pos: np.ndarray, width: np.ndarray, val: np.ndarray) -> np.ndarray:
    """OR disjoint bit fields (width <= 25) into a zeroed byte buffer."""
    pos, width, val = (np.asarray(a, dtype=np.int64) for a in (pos, width, val))
    if np.any(val >= (np.int64(1) << width)):  # also: a width-0 field holds 0, so it may stay in
        raise AssertionError("bit field overflow (encoder bug)")
    if len(pos) > 1 and np.any(pos[1:] < pos[:-1]):  # the encoder's field groups come sorted
        order = np.argsort(pos, kind="stable")
        pos, val = pos[order], val[order]
    # Little-endian 32-bit words: a field starting at bit ``off`` of word ``w`` puts its low
    # ``32 - off`` bits into w and the rest (nonzero only when it crosses the boundary) into w + 1.
    # Fields are disjoint in bits: sorted by position, the ones of one word are a run (OR-reduced
    # at once), and at most one field crosses each word boundary (so the spills never collide).
    words = np.zeros((num_bytes + 3) // 4 + 1, dtype=np.int64)
    if len(pos):
        word, off = pos >> 5, pos & 31
        starts = np.flatnonzero(np.concatenate([[True], word[1:] != word[:-1]]))
        words[word[starts]] = np.bitwise_or.reduceat((val << off) & 0xFFFFFFFF, starts)
        hi = val >> (32 - off)
        spill = np.flatnonzero(hi)
        words[word[spill] + 1] |= hi[spill]
    return words.astype("<u4").view(np.uint8)[:num_bytes].copy()


def _read_fields(buf: np.ndarray, pos: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Read bit fields (width <= 25) from ``buf`` (uint8, padded with >= 4 bytes past the last field)."""
    byte0 = pos >> 3
    word = (buf[byte0].astype(np.int64) | (buf[byte0 + 1].astype(np.int64) << 8)
            | (buf[byte0 + 2].astype(np.int64) << 16) | (buf[byte0 + 3].astype(np.int64) << 24))
    return (word >> (pos & 7)) & ((np.int64(1) << width) - 1)


def token_bit_lengths(count: np.ndarray, widths: np.ndarray, id_bits: int, layout: Layout | None = None) -> np.ndarray:
    """Bits each token occupies in the payload (int64 [T]); ``layout`` for sampled stores."""
    if layout is not None:
        return layout.token_bits(count, widths)
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


def decode_entries(buf: np.ndarray, tok_pos: np.ndarray, count: np.ndarray, widths: np.ndarray, top: np.ndarray,
                   layout: Layout) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Flat entries of ``T`` tokens, grouped by token in increasing id order.

    Returns ``(token [E], ids [E], logprobs [E] float64 or None, draws [E] int64 or None)``:
    log-probs when ``layout.values``, draw counts when ``layout.num_draws``.
    """
    n = np.asarray(count).astype(np.int64)
    idw = np.asarray(widths).astype(np.int64) & 31
    vw = VALUE_WIDTHS[np.asarray(widths).astype(np.int64) >> 5]
    starts = _excl_cumsum(n)
    E = int(starts[-1])
    tok = np.repeat(np.arange(len(n)), n)
    if E == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z, (np.zeros(0) if layout.values else None), (z if layout.num_draws else None)
    r = np.arange(E) - starts[tok]
    first = r == 0
    pos0 = np.asarray(tok_pos).astype(np.int64)[tok]
    ib = layout.id_bits
    fid = _read_fields(buf, pos0 + np.where(first, 0, ib + (r - 1) * idw[tok]), np.where(first, ib, idw[tok]))
    incr = np.where(first, fid, fid + 1)
    cs = np.cumsum(incr)
    has = np.nonzero(n)[0]
    base = np.zeros(len(n), dtype=np.int64)
    base[has] = cs[starts[has]] - incr[starts[has]]
    ids = cs - base[tok]
    lp = None
    if layout.values:
        q = _read_fields(buf, pos0 + ib + (n[tok] - 1) * idw[tok] + r * vw[tok], vw[tok])
        lp = np.asarray(top).astype(np.float64)[tok] - q * layout.value_step
    draws = None
    if layout.num_draws:
        d0 = np.asarray(tok_pos).astype(np.int64) + ib + (n - 1) * idw + n * vw  # [T] (valid where n > 0)
        length = np.where(n > 0, layout.num_draws + (1 - layout.draw_offset) * n, 0)
        lstart = _excl_cumsum(length)
        total = int(lstart[-1])
        t_of_bit = np.repeat(np.arange(len(n)), length)
        bitpos = d0[t_of_bit] + np.arange(total) - lstart[t_of_bit]
        bits = _read_fields(buf, bitpos, np.ones(total, dtype=np.int64))
        zeros = np.nonzero(bits == 0)[0]  # one per entry, in entry order
        if len(zeros) != E:
            raise ValueError("corrupted draw counts in a logits shard: run --verify and recompute the store")
        prev = np.empty(E, dtype=np.int64)
        prev[1:] = zeros[:-1] + 1
        prev[first] = lstart[tok[first]]
        draws = zeros - prev + layout.draw_offset
    return tok, ids, lp, draws
