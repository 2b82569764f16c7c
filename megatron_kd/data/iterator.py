"""A data-parallel batch iterator that resumes exactly where a checkpoint left off.

The global sample order is the dataset's own order (megatron's ``GPTDataset`` is already
shuffled by its seed). Step ``k`` consumes the global samples
``[c + k*B*D, c + (k+1)*B*D)`` (``c`` = consumed samples at start, ``B`` = micro-batch size,
``D`` = data-parallel size); rank ``r`` takes the ``r``-th block of ``B`` of them, as megatron's
pretraining sampler does. So the next batch depends only on ``consumed_samples``, which is what a
checkpoint stores: resuming at ``consumed_samples=N`` continues exactly, on any number of workers.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class _RankBatchSampler(Sampler):
    """Index lists of one rank's micro-batches, starting at ``consumed`` global samples."""

    def __init__(self, total: int, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.total, self.consumed = total, consumed
        self.mbs, self.rank, self.dp = micro_batch_size, dp_rank, dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.mbs * self.dp))


def _die_with_parent(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    from megatron_kd.utils.processes import set_parent_death_signal

    set_parent_death_signal()


class ResumableBatchIterator:
    """Iterate micro-batches of ``dataset`` for data-parallel rank ``dp_rank`` of ``dp_size``.

    Each batch is the default collation of the samples: ``tokens``, ``labels``, ``position_ids``
    (int64) and ``loss_mask`` (float32) of shape [micro_batch_size, seq_length] (plus
    ``attention_mask`` [b, 1, s, s] if the dataset makes one, ``dataset_id`` [b] for blends).
    Stops (``StopIteration``) when fewer than ``micro_batch_size * dp_size`` samples remain.
    ``consumed_samples`` counts *global* samples (all ranks) and is what to checkpoint.
    """

    def __init__(self, dataset: Any, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, num_workers: int = 0,
                 collate_fn: Callable[[list], Any] | None = None, vocab_size: int | None = None,
                 prefixes: list[str] | None = None):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}: "
                             "need micro_batch_size >= 1 and 0 <= dp_rank < dp_size")
        if dataset is None:
            raise ValueError("dataset is None (a split with weight 0 or not built on this rank): "
                             "do not iterate it, or give that split a share in data.split")
        total = len(dataset)
        if not 0 <= consumed_samples <= total:
            raise ValueError(f"consumed_samples={consumed_samples} is outside the dataset's {total} "
                             "samples: the checkpoint was made with other data or more train samples")
        self.dataset = dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self._consumed = consumed_samples
        self._sampler = _RankBatchSampler(total, consumed_samples, micro_batch_size, dp_rank, dp_size)
        self._loader = DataLoader(dataset, batch_sampler=self._sampler, num_workers=num_workers,
                                  collate_fn=collate_fn, persistent_workers=False,
                                  worker_init_fn=_die_with_parent if num_workers else None)
        self._it: Iterator | None = None
        # Every batch's token ids are checked against the vocabulary (one max/min): a corrupt .bin
        # (flipped bytes the sampled pre-check missed) is a one-line error, not an IndexError.
        self._vocab_size, self._prefixes = vocab_size, prefixes

    @property
    def consumed_samples(self) -> int:
        """Global samples (all data-parallel ranks) consumed so far, including the start offset."""
        return self._consumed

    def __iter__(self) -> "ResumableBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self._loader)
        batch = next(self._it)
        if self._vocab_size is not None and isinstance(batch, dict):
            from megatron_kd.data.manifest import check_batch_token_ids

            for key in ("tokens", "labels"):
                check_batch_token_ids(batch.get(key), self._vocab_size, self._prefixes)
        self._consumed += self.micro_batch_size * self.dp_size
        return batch

    def __len__(self) -> int:
        """Micro-batches left."""
        return (len(self.dataset) - self._consumed) // (self.micro_batch_size * self.dp_size)

    def state_dict(self) -> dict[str, int]:
        """``{"consumed_samples": n}`` for a checkpoint."""
        return {"consumed_samples": self._consumed}
