"""One shard file of the teacher-logits store: written once (temp + rename), then memory-mapped.

Layout (little-endian; every section starts on an 8-byte boundary)::

    0   magic b"MKDLOGT1"
    8   uint64 num_tokens, payload_offset, payload_bytes, segments_offset, num_segments,
        headers_offset, reserved                                        (64-byte preamble)
    payload_offset   payload bytes (bit strings of :mod:`megatron_kd.logits.codec`) + 8 zero bytes
    segments_offset  int64 [num_segments, 2]: (first token, first payload byte), sorted by token
    headers_offset   uint8 count [T], uint8 widths [T], float16 top [T]   (T = num_tokens)

Token ``t`` (relative to the shard's first token) starts at bit
``8 * byte(s) + sum(bit lengths of tokens seg_token(s) .. t-1)`` where ``s`` is the last segment
starting at or before ``t``. Tokens without entries (a document's last token) take no bits.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from megatron_kd.logits import codec
from megatron_kd.utils.io import remove_dead_temps

MAGIC = b"MKDLOGT1"
_PREAMBLE = struct.Struct("<8s7Q")
_PAD = 8


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


class ShardWriter:
    """Stream segments into ``path`` (via a temp file beside it); :meth:`close` makes it appear."""

    def __init__(self, path: str | Path, num_tokens: int):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # What a killed run left of this shard (its writer pid is gone): the rerun rewrites it.
        remove_dead_temps(self.path.parent, f".{self.path.name}.*.tmp", r"\.(\d+)\.tmp$")
        self.num_tokens = num_tokens
        self.count = np.zeros(num_tokens, dtype=np.uint8)
        self.widths = np.zeros(num_tokens, dtype=np.uint8)
        self.top = np.zeros(num_tokens, dtype=np.float16)
        self.seg_tokens: list[np.ndarray] = []
        self.seg_bytes: list[np.ndarray] = []
        self.payload_bytes = 0
        self.num_entries = 0
        self._fh = open(self.tmp, "wb")
        self._fh.write(b"\0" * _PREAMBLE.size)

    def add(self, chunk: codec.EncodedChunk, token_starts: np.ndarray, segment_lengths: np.ndarray) -> None:
        """Append an encoded chunk whose segments cover tokens ``token_starts[i] + [0, len_i)``."""
        token_starts = np.asarray(token_starts, dtype=np.int64)
        seg_len = np.asarray(segment_lengths, dtype=np.int64)
        tok = np.concatenate([np.arange(s, s + n) for s, n in zip(token_starts, seg_len)]) if len(seg_len) else \
            np.zeros(0, np.int64)
        if len(tok) != len(chunk.count) or (len(tok) and (tok.min() < 0 or tok.max() >= self.num_tokens)):
            raise ValueError("chunk tokens do not match the segment layout or fall outside the shard")
        self.count[tok] = chunk.count
        self.widths[tok] = chunk.widths
        self.top[tok] = chunk.top
        self.seg_tokens.append(token_starts)
        self.seg_bytes.append(self.payload_bytes + np.concatenate([[0], np.cumsum(chunk.segment_bytes)[:-1]]))
        self._fh.write(chunk.payload.tobytes())
        self.payload_bytes += len(chunk.payload)
        self.num_entries += chunk.num_entries

    def close(self) -> dict:
        """Write tables and preamble, fsync, rename into place. Returns ``{bytes, sha256, entries}``."""
        fh = self._fh
        fh.write(b"\0" * (_align(_PREAMBLE.size + self.payload_bytes + _PAD) - _PREAMBLE.size - self.payload_bytes))
        seg_off = fh.tell()
        seg_tok = np.concatenate(self.seg_tokens) if self.seg_tokens else np.zeros(0, np.int64)
        seg_byte = np.concatenate(self.seg_bytes) if self.seg_bytes else np.zeros(0, np.int64)
        order = np.argsort(seg_tok, kind="stable")
        fh.write(np.stack([seg_tok[order], seg_byte[order]], axis=1).astype("<i8").tobytes())
        hdr_off = fh.tell()
        for arr in (self.count, self.widths, self.top.astype("<f2")):
            fh.write(arr.tobytes())
        fh.write(b"\0" * (_align(fh.tell()) - fh.tell()))
        fh.seek(0)
        fh.write(_PREAMBLE.pack(MAGIC, self.num_tokens, _PREAMBLE.size, self.payload_bytes, seg_off, len(seg_tok),
                                hdr_off, 0))
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        digest = _sha256(self.tmp)
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return {"bytes": size, "sha256": digest, "entries": int(self.num_entries),
                "targets": int(np.count_nonzero(self.count))}

    def abort(self) -> None:
        """Drop the temp file (on error)."""
        if not self._fh.closed:
            try:  # closing flushes, which fails again on a full disk: the temp file must still go
                self._fh.close()
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


class ShardReader:
    """Random access to one shard file through a read-only memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        if len(self.mm) < _PREAMBLE.size:
            raise ValueError(f"logits shard {self.path} is truncated: run --verify and recompute the store")
        magic, T, p_off, p_bytes, s_off, n_seg, h_off, _ = _PREAMBLE.unpack(bytes(self.mm[:_PREAMBLE.size]))
        if (magic != MAGIC or h_off + 4 * T > len(self.mm) or s_off + 16 * n_seg > h_off
                or p_off + p_bytes + _PAD > s_off):
            raise ValueError(f"logits shard {self.path} has a bad header (not a bitpack-v1 shard or truncated): "
                             "run --verify and recompute the store")
        self.num_tokens = T
        self.payload = self.mm[p_off:p_off + p_bytes + _PAD]
        seg = np.frombuffer(self.mm, dtype="<i8", count=2 * n_seg, offset=s_off).reshape(n_seg, 2)
        self.seg_token, self.seg_byte = seg[:, 0], seg[:, 1]
        self.count = self.mm[h_off:h_off + T]
        self.widths = self.mm[h_off + T:h_off + 2 * T]
        self.top = np.frombuffer(self.mm, dtype="<f2", count=T, offset=h_off + 2 * T)

    def token_positions(self, t0: int, t1: int, id_bits: int, layout: codec.Layout | None = None) -> np.ndarray:
        """Payload bit offset of tokens ``[t0, t1)`` (int64 [t1 - t0])."""
        s0 = max(int(np.searchsorted(self.seg_token, t0, side="right")) - 1, 0)
        base = min(int(self.seg_token[s0]), t0) if len(self.seg_token) else t0
        lengths = codec.token_bit_lengths(self.count[base:t1], self.widths[base:t1], id_bits, layout)
        cs = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cs[1:])
        toks = np.arange(base, t1)
        seg = np.maximum(np.searchsorted(self.seg_token, toks, side="right") - 1, 0)
        if len(self.seg_token):
            seg_first = np.clip(self.seg_token[seg] - base, 0, None)
            pos = self.seg_byte[seg] * 8 + cs[:-1] - cs[seg_first]
        else:
            pos = np.zeros(len(toks), dtype=np.int64)
        return pos[t0 - base:]

    def read(self, t0: int, t1: int, id_bits: int, value_step: float, k_max: int,
             pad_logprob: float = float("-inf"), sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Decoded ``(ids [t1-t0, k_max], logprobs [t1-t0, k_max])`` of tokens ``[t0, t1)``."""
        pos = self.token_positions(t0, t1, id_bits)
        # The payload stays memory-mapped: decoding gathers only the bytes of these tokens.
        return codec.decode(np.asarray(self.payload), pos, np.asarray(self.count[t0:t1]),
                            np.asarray(self.widths[t0:t1]), np.asarray(self.top[t0:t1]), id_bits, value_step,
                            k_max, pad_logprob, sort)

    def read_entries(self, t0: int, t1: int, layout: codec.Layout):
        """Flat entries of tokens ``[t0, t1)``: see :func:`megatron_kd.logits.codec.decode_entries`."""
        pos = self.token_positions(t0, t1, layout.id_bits, layout)
        return codec.decode_entries(np.asarray(self.payload), pos, np.asarray(self.count[t0:t1]),
                                    np.asarray(self.widths[t0:t1]), np.asarray(self.top[t0:t1]), layout)
