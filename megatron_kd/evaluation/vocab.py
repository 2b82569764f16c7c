"""Per-token log-probabilities from vocab-parallel logits, without gathering the vocabulary.

Logits come out of a megatron-core ``GPTModel`` split over the tensor-parallel (TP) group along
the vocabulary ([..., padded_vocab/TP] per rank). The padded columns (ids >= ``vocab_size``) are
masked to ``-inf`` first (:func:`megatron_kd.models.mask_padded_vocab`); megatron's
``vocab_parallel_cross_entropy`` handles ``-inf`` columns exactly: it subtracts the global max
(finite, real columns exist) and ``exp(-inf) = 0`` contributes nothing to the partition sum.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from megatron_kd.models.builder import mask_padded_vocab, vocab_shard_range
from megatron_kd.runtime.parallel import all_reduce_, tp_group


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                   return_greedy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) at every position, computed vocab-parallel (collective over the TP group).

    ``logits``: this rank's vocab shard, [..., padded_vocab/TP], any float dtype (computed in fp32).
    ``targets``: int64 ids in [0, vocab_size), shape ``logits.shape[:-1]``.
    Returns fp32 log-probabilities (nats, <= 0) of shape ``targets.shape``; with
    ``return_greedy`` also a bool tensor: the target is an argmax of the distribution (ties count).
    ``logits`` may be overwritten (megatron's cross entropy works in place to save memory).
    """
    logits = mask_padded_vocab(logits.float(), vocab_size)
    targets = targets.long()
    greedy = None
    if return_greedy:
        # Must run before the cross entropy, which rewrites the logits in place.
        tp = tp_group()
        start, end = vocab_shard_range(logits.shape[-1] * tp.world_size)
        global_max = all_reduce_(logits.max(dim=-1).values.clone(), tp, "max")
        in_shard = (targets >= start) & (targets < end)
        local_idx = (targets - start).clamp(0, logits.shape[-1] - 1)
        target_logit = logits.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(~in_shard, float("-inf"))
        target_logit = all_reduce_(target_logit.contiguous(), tp, "max")
        greedy = target_logit >= global_max
    nll = vocab_parallel_cross_entropy(logits.contiguous(), targets)
    logprobs = -nll
    return (logprobs, greedy) if return_greedy else logprobs


def gather_full_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """All-gather a small vocab-parallel logits tensor ([..., V/TP]) to the real vocabulary
    ([..., vocab_size], fp32). For sampling from a few positions only: it materialises the vocab."""
    full = gather_from_tensor_model_parallel_region(logits.float().contiguous())
    return full[..., :vocab_size]
