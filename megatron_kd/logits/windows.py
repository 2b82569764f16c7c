"""Work plan of a precompute run: shards (document ranges), teacher windows, micro-batches.

Positions and targets. Token ``o`` of document ``d`` is position ``(d, o)``. Its target is the
teacher's distribution of token ``o + 1`` of ``d`` given tokens ``w .. o`` of ``d``, where ``w``
is the start of the teacher window holding ``o``. A document's last token has no target (the
next token belongs to another document), nor does a one-token document.

Windows (document-aligned). A document with ``L`` tokens has targets at ``0 .. L-2``; they are
covered by windows of at most ``seq_length`` input tokens. The first window starts at 0; each
next one starts ``overlap`` tokens before the previous one ended and emits targets only from that
end on, so every target after the first window sees at least ``overlap`` tokens of context
(``overlap = 0``: plain non-overlapping windows; the compute overhead is about
``overlap / (seq_length - overlap)`` on long documents). Windows never cross documents.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """One teacher forward row: input tokens ``[start, end)`` of ``doc``, targets ``[emit, end)``."""

    doc: int
    start: int
    end: int
    emit: int

    @property
    def length(self) -> int:
        """Input tokens."""
        return self.end - self.start


def document_windows(doc: int, length: int, seq_length: int, overlap: int) -> list[Window]:
    """Windows of one document of ``length`` tokens (see the module docstring)."""
    last = length - 1  # targets are positions 0 .. length-2
    out: list[Window] = []
    start, emit = 0, 0
    while emit < last:
        end = min(start + seq_length, last)
        out.append(Window(doc, start, end, emit))
        emit, start = end, end - overlap
    return out


def plan_shards(sequence_lengths: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """Contiguous document ranges ``[doc_lo, doc_hi)`` of about ``shard_tokens`` tokens each.

    A document goes to shard ``floor(first_token / shard_tokens)`` (empty ranges dropped), so the
    plan depends only on the dataset and ``shard_tokens``; a document is never split.
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    bucket = first // shard_tokens
    cuts = np.nonzero(np.diff(bucket))[0] + 1
    bounds = np.concatenate([[0], cuts, [len(lengths)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class MicroBatch:
    """Windows run together: ``rows`` x ``length`` tokens (right-padded)."""

    windows: list[Window]
    rows: int
    length: int


def plan_micro_batches(windows: list[Window], seq_length: int, micro_batch_size: int,
                       pad_multiple: int = 64, fixed_rows: bool = False,
                       max_per_call: int = 8) -> list[list[MicroBatch]]:
    """Group windows into micro-batches of similar length, and those into calls of one shape.

    Windows are sorted by decreasing length and padded to a multiple of ``pad_multiple`` (at most
    ``seq_length``); a micro-batch holds ``micro_batch_size * seq_length // length`` rows (the
    same token budget as a full one). Each returned group shares one ``(rows, length)`` shape,
    which a pipeline-parallel schedule needs (at most ``max_per_call`` per group); with ``fixed_rows`` the last micro-batch of a length
    keeps all its rows (the unused ones run padding) so that its shape matches the others.
    """
    order = sorted(windows, key=lambda w: (-w.length, w.doc, w.start))
    calls: list[list[MicroBatch]] = []
    i = 0
    while i < len(order):
        length = min(seq_length, -(-order[i].length // pad_multiple) * pad_multiple)
        rows = max(1, micro_batch_size * seq_length // length)
        j = i
        while j < len(order) and min(seq_length, -(-order[j].length // pad_multiple) * pad_multiple) == length:
            j += 1
        group = order[i:j]
        mbs = [MicroBatch(group[a:a + rows], rows if fixed_rows else min(rows, len(group) - a), length)
               for a in range(0, len(group), rows)]
        calls.extend(mbs[a:a + max_per_call] for a in range(0, len(mbs), max_per_call))
        i = j
    return calls
