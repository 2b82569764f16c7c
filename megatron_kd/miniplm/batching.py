"""Batch planning for scoring: one window per row, sorted by length, right-padded.

Why one window per row and not several packed into a row: the causal SDPA/TE attention of the
model would let a packed window attend to the one before it unless a block-diagonal mask (or
THD packed-sequence kernels) were passed, which the local spec does not support. Sorting the
windows of a shard by length makes neighbours in a batch nearly equally long, so padding stays
small; with fixed-length chunks (the paper's setting) every window but a document's tail is full
and padding is close to zero. Right padding is exact under causal attention: real positions never
attend to the pad positions after them, and padded positions are masked out of the loss.

A *step* is what one call of megatron's forward-only schedule runs: ``num_microbatches``
micro-batches of identical shape [rows, seq] (the pipeline's p2p buffers need one shape), the
last ones padded with empty rows when the windows run out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Step:
    """One schedule call: micro-batches of window indices (``-1`` = empty padding row)."""

    rows: list[np.ndarray]
    """Per micro-batch, the window index of each row ([rows] int64, -1 for padding rows)."""
    seq_length: int
    """Model input length of every micro-batch in this step (predictions per full row)."""


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def plan_steps(window_lengths: np.ndarray, tokens_per_microbatch: int, num_microbatches: int = 1,
               pad_multiple: int = 8, max_seq_length: int | None = None) -> list[Step]:
    """Group windows (sorted longest first) into steps of equally shaped micro-batches.

    ``window_lengths``: tokens per window (a window of L tokens is fed as L-1 inputs).
    ``tokens_per_microbatch``: input-token budget of one micro-batch (rows * seq_length);
    ``pad_multiple``: round each step's seq_length up to this (GPU kernel friendliness), capped
    by ``max_seq_length``. Every window appears in exactly one row of one step.
    """
    lengths = np.asarray(window_lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    steps: list[Step] = []
    i = 0
    while i < len(order):
        longest = int(lengths[order[i]]) - 1
        seq = _round_up(max(longest, 1), pad_multiple)
        if max_seq_length is not None:
            seq = max(longest, min(seq, max_seq_length))
        rows = max(1, tokens_per_microbatch // seq)
        take = order[i:i + rows * num_microbatches]
        i += len(take)
        mbs = []
        for m in range(num_microbatches):
            part = take[m * rows:(m + 1) * rows]
            if len(part) == 0 and m > 0:
                break
            mbs.append(np.concatenate([part, np.full(rows - len(part), -1, dtype=np.int64)]))
        steps.append(Step(rows=mbs, seq_length=seq))
    return steps


def build_microbatch(dataset, windows: np.ndarray, rows: np.ndarray, seq_length: int,
                     device: torch.device, vocab_size: int | None = None,
                     prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch: tokens/labels/mask/position_ids, all [rows, seq_length].

    Row r holds window ``rows[r]``: inputs = its first L-1 tokens, labels = tokens 1..L-1,
    mask True on those L-1 positions; padding (and empty rows) has token 0, label -1 (the NLL
    head skips negative labels) and mask False.
    """
    b = len(rows)
    tokens = np.zeros((b, seq_length), dtype=np.int64)
    labels = np.full((b, seq_length), -1, dtype=np.int64)
    mask = np.zeros((b, seq_length), dtype=bool)
    for r, w in enumerate(rows):
        if w < 0:
            continue
        win = windows[w]
        ids = dataset.get(int(win["doc"]), offset=int(win["offset"]), length=int(win["length"]))
        n = len(ids) - 1
        tokens[r, :n] = ids[:-1]
        labels[r, :n] = ids[1:]
        mask[r, :n] = True
    if vocab_size is not None:  # a corrupt .bin is a one-line error naming it, not an IndexError
        from megatron_kd.data.manifest import check_batch_token_ids

        check_batch_token_ids(tokens, vocab_size, prefix, what="dataset --data")
        check_batch_token_ids(labels[mask], vocab_size, prefix, what="dataset --data")
    pos = torch.arange(seq_length, dtype=torch.long).unsqueeze(0).expand(b, -1)
    return {
        "tokens": torch.from_numpy(tokens).to(device, non_blocking=True),
        "labels": torch.from_numpy(labels).to(device, non_blocking=True),
        "mask": torch.from_numpy(mask).to(device, non_blocking=True),
        "position_ids": pos.to(device),
    }
