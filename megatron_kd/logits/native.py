"""The optional C kernels of the logits store (``_topk_native.c``, issue 15 item 3): the CPU
top-p/top-k selection, its flattening to id order, the top-k shard encoder and the sampled store's
Gumbel-max draws.

``pip install`` builds them where a C compiler is present (setup.py; x86-64 with AVX2/FMA at run
time); otherwise, or with ``MEGATRON_KD_NATIVE=0`` in the environment, the functions here return
None and their callers (:mod:`~megatron_kd.logits.truncation`, :mod:`~megatron_kd.logits.codec`,
:mod:`~megatron_kd.logits.sampling`) take their torch / numpy paths. The selection makes three passes per row over cached logits (group
maxima, the log-sum-exp, a compare pass against a bisected threshold) and radix-sorts ~k
candidates, instead of a dozen torch ops over the chunk.
"""
from __future__ import annotations

import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

ENV = "MEGATRON_KD_NATIVE"
"""Set to ``0`` to use the torch paths even where the kernel is built."""
_MIN_ROWS_PER_THREAD = 32


@lru_cache(maxsize=1)
def _module():
    try:  # by name: the compiled module is optional (and not a source module of the package graph)
        mod = importlib.import_module("megatron_kd.logits._topk_native")
    except ImportError:
        return None
    return mod if mod.available() else None


def available() -> bool:
    """Whether :func:`select_native` runs here (kernel built, CPU supported, not disabled)."""
    return os.environ.get(ENV, "1") != "0" and _module() is not None


@lru_cache(maxsize=1)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kd-native")


def _takes_rows(x: torch.Tensor) -> bool:
    """Whether the kernels run here on logits ``x``: built and enabled, fp32 [R, V] on CPU, rows contiguous."""
    return (available() and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.stride(1) == 1)


def select_native(x: torch.Tensor, cols: int, k: int, top_p: float
                  ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Top-p/top-k selection of each row of ``x`` over its first ``cols`` columns (the rest: padding).

    Args:
        x: fp32 [R, V] on CPU, rows contiguous (``x.stride(1) == 1``), ``V >= cols``.
        cols: real vocabulary columns, ``1 <= k <= cols``.
        k: entries returned per row (sorted by decreasing log-prob, ties: smaller id first).
        top_p: nucleus mass; ``counts`` = the top-p prefix length (mass before an entry < top_p), >= 1.

    Returns:
        ``(ids int64 [R, k], logprobs fp32 [R, k], counts int64 [R], lse fp32 [R])``, or None where
        the kernel is not available or a row holds a NaN (the caller then takes its torch path).
    """
    if not _takes_rows(x) or not (1 <= k <= cols <= x.shape[1]):
        return None
    mod = _module()
    rows = x.shape[0]
    ids = torch.empty(rows, k, dtype=torch.int64)
    lp = torch.empty(rows, k, dtype=torch.float32)
    counts = torch.empty(rows, dtype=torch.int64)
    lse = torch.empty(rows, dtype=torch.float32)
    ptrs = (ids.data_ptr(), lp.data_ptr(), counts.data_ptr(), lse.data_ptr())

    def run(r0: int, r1: int) -> int:
        return mod.select_rows(x.data_ptr(), x.stride(0), cols, k, float(top_p), r0, r1, *ptrs)

    if any(_over_rows(run, rows)):
        return None
    return ids, lp, counts, lse


def _over_rows(run, rows: int) -> list:
    """``run(r0, r1)`` over row ranges covering ``[0, rows)``: in parallel on torch's intra-op threads
    (the kernels release the GIL), at least ``_MIN_ROWS_PER_THREAD`` rows each; the results in order."""
    workers = min(torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD)
    if workers > 1:
        step = -(-rows // workers)
        return list(_pool(workers).map(lambda r0: run(r0, min(r0 + step, rows)), range(0, rows, step)))
    return [run(0, rows)] if rows else []


def draw_native(x: torch.Tensor, cols: int, lse: torch.Tensor, dkeys: torch.Tensor, block: int
                ) -> Optional[torch.Tensor]:
    """Stages 1 and 2 of :func:`~megatron_kd.logits.sampling.draw_tokens` (TP = 1) in C: per row and
    draw key, the block race ``argmax_b(lse_b + G_b)`` and the id race ``argmax_v(x_v + G_v)`` inside the
    chosen block, with the same counter-based noise (float64, the log within an ulp of torch's).

    Args:
        x: fp32 [R, V] on CPU, rows contiguous; columns at or past ``cols`` are never drawn.
        cols: columns in play, ``B = ceil(cols / block)`` blocks.
        lse: float64 [R, B] block log-sum-exps of ``x`` (-inf: empty block).
        dkeys: int64 [R, N] draw keys (32-bit values).
        block: ids per block.

    Returns:
        int64 [R, N] drawn ids (-1: the row has nothing to draw), or None where the kernel is not
        available or ``lse`` holds a NaN (the caller then takes its torch path).
    """
    if not _takes_rows(x) or not (1 <= cols <= x.shape[1]) or block < 1:
        return None
    mod = _module()
    if not hasattr(mod, "draw_rows"):  # a build from before the draws
        return None
    rows, nb = x.shape[0], -(-cols // block)
    if lse.shape != (rows, nb) or dkeys.dim() != 2 or dkeys.shape[0] != rows or bool(torch.isnan(lse).any()):
        return None
    lse = lse.to(torch.float64).contiguous()
    dkeys = dkeys.to(torch.int64).contiguous()
    n_draws = dkeys.shape[1]
    out = torch.empty(rows, n_draws, dtype=torch.int64)
    _over_rows(lambda r0, r1: mod.draw_rows(x.data_ptr(), x.stride(0), cols, lse.data_ptr(), nb, block,
                                            dkeys.data_ptr(), n_draws, r0, r1, out.data_ptr()), rows)
    return out


def flatten_native(ids: torch.Tensor, logprobs: torch.Tensor, counts: torch.Tensor
                   ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`~megatron_kd.logits.truncation.flatten_selection` in C: each row's first ``counts``
    entries (distinct ids in ``[0, 2^31)``) sorted by id, rows after one another.

    ``ids`` int64 [T, k], ``logprobs`` fp32 [T, k], ``counts`` int64 [T] (``<= k``), contiguous CPU
    tensors. Returns ``(ids [E], logprobs [E])`` (``E = counts.sum()``), or None where the kernel
    is not available (the caller then sorts in torch).
    """
    if not available() or ids.dim() != 2 or not ids.numel():
        return None
    if (ids.device.type != "cpu" or ids.dtype != torch.int64 or logprobs.dtype != torch.float32
            or counts.dtype != torch.int64 or logprobs.shape != ids.shape or counts.shape != ids.shape[:1]):
        return None
    ids, logprobs, counts = ids.contiguous(), logprobs.contiguous(), counts.contiguous()
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1])
    k = ids.shape[1]
    if total and (int(counts.max()) > k or int(counts.min()) < 0):
        return None
    offsets = ends - counts
    out_ids = torch.empty(total, dtype=torch.int64)
    out_lp = torch.empty(total, dtype=torch.float32)
    _module().flatten_rows(ids.data_ptr(), logprobs.data_ptr(), counts.data_ptr(), offsets.data_ptr(), k, 0,
                           ids.shape[0], out_ids.data_ptr(), out_lp.data_ptr())
    return out_ids, out_lp


def encode_topk(counts: np.ndarray, ids: np.ndarray, logprobs: np.ndarray, segment_lengths: np.ndarray,
                id_bits: int, value_step: float, value_widths: np.ndarray, max_q: int):
    """The codec's top-k encoder (:func:`megatron_kd.logits.codec.encode` without draws) in C: the
    same bytes and tables. ``logprobs`` must be float32 (the precompute's); returns
    ``(payload, count, widths, top, segment_bytes)`` or None (kernel missing, other dtypes, or input
    the numpy encoder refuses: it then runs and raises its own error)."""
    mod = _module() if available() else None
    if mod is None or not hasattr(mod, "encode_topk"):
        return None
    if not (isinstance(logprobs, np.ndarray) and logprobs.dtype == np.float32):
        return None
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    logprobs = np.ascontiguousarray(logprobs)
    seg = np.ascontiguousarray(segment_lengths, dtype=np.int64)
    widths_table = np.ascontiguousarray(value_widths, dtype=np.int64)
    T, E, S = len(counts), len(ids), len(seg)
    if len(logprobs) != E:
        return None
    out_count = np.empty(T, np.uint8)
    out_widths = np.empty(T, np.uint8)
    out_top = np.empty(T, np.float16)
    out_seg = np.empty(S, np.int64)
    tok_bits = np.empty(T, np.int64)
    q = np.empty(max(E, 1), np.int64)
    # bound of the payload: every entry at its widest (25-bit gap + 12-bit value), a byte per segment, slack
    cap = int((T * int(id_bits) + 37 * E) // 8 + S + 16)
    payload = np.empty(cap, np.uint8)
    n = mod.encode_topk(counts.ctypes.data, T, ids.ctypes.data, logprobs.ctypes.data, seg.ctypes.data, S,
                        int(id_bits), float(value_step), widths_table.ctypes.data, len(widths_table), int(max_q),
                        out_count.ctypes.data, out_widths.ctypes.data, out_top.ctypes.data, out_seg.ctypes.data,
                        tok_bits.ctypes.data, q.ctypes.data, payload.ctypes.data, cap)
    if n < 0:
        return None
    return payload[:n].copy(), out_count, out_widths, out_top, out_seg
