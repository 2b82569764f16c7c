"""Deterministic synthetic token data and a resumable, data-parallel batch iterator.

Synthetic sequences follow a fixed random first-order Markov chain over the vocabulary: the next
token is the current token's preferred successor with probability ``concentration``, else uniform.
A model can learn it quickly (optimal CE ~0.9 nats at vocab 256 vs. ln 256 = 5.5 at start), which
makes "the loss goes down" a meaningful test. Sample ``i`` depends only on ``(seed, i)``, so a
resumed run sees exactly the samples an uninterrupted one would.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np
import torch


class SampleDataset(Protocol):
    """Map-style dataset of training samples (dicts of equal-length 1-D arrays/tensors)."""

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> dict[str, Any]: ...


class SyntheticDataset:
    """``len`` samples of ``seq_length`` tokens (tokens/labels/loss_mask/position_ids)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, num_samples: int = 1 << 40,
                 concentration: float = 0.9, index_offset: int = 0):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.num_samples, self.concentration, self.index_offset = num_samples, concentration, index_offset
        # The chain is a property of the "corpus" (seed), shared by the train and valid splits.
        self.successor = np.random.default_rng([seed, 0x5EED]).permutation(vocab_size)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(idx)
        rng = np.random.default_rng([self.seed, self.index_offset + idx])
        n = self.seq_length + 1
        keep = rng.random(n) < self.concentration
        noise = rng.integers(0, self.vocab_size, n)
        x = np.empty(n, dtype=np.int64)
        x[0] = noise[0]
        for t in range(1, n):
            x[t] = self.successor[x[t - 1]] if keep[t] else noise[t]
        tokens = torch.from_numpy(x)
        return {
            "tokens": tokens[:-1].clone(),
            "labels": tokens[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a list of sample dicts into [b, s] tensors."""
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


class SequentialBatchIterator:
    """Micro-batches for one data-parallel rank, in Megatron's pre-training sample order.

    Global samples are consumed in order: each round of ``micro_batch_size * dp_size`` samples
    gives rank r the slice ``[r*mbs, (r+1)*mbs)``. So the samples of optimizer step k are
    ``[k*global_batch, (k+1)*global_batch)`` whatever the DP size, and resuming from
    ``consumed_samples`` (saved in checkpoints) continues exactly, even with another DP size.
    Wraps around at the end of the dataset.
    """

    def __init__(self, dataset: SampleDataset, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0):
        self.dataset, self.micro_batch_size = dataset, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        n = len(self.dataset)
        batch = collate([self.dataset[(start + j) % n] for j in range(self.micro_batch_size)])
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return batch
