"""The default language-modelling forward step and loss for megatron-core schedules.

Contract of a forward step (what :class:`megatron_kd.training.loop.Trainer` accepts)::

    forward_step_func(data_iterator, model) -> (output_tensor, loss_func)
    loss_func(output_tensor) -> (loss_sum, num_tokens, report)     # last pipeline stage only

``loss_sum`` is the summed (not averaged) loss of the micro-batch, ``num_tokens`` its token count
(int tensor); megatron-core (``calculate_per_token_loss=True``) sums both over micro-batches and
data-parallel ranks and scales the gradients by 1/total tokens. ``report`` maps a metric name to a
2-element tensor ``[sum, count]`` (reported as sum/count over the global batch) or to a scalar
tensor (reported as the mean over micro-batches and DP ranks).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Iterator

import torch
from megatron.core import tensor_parallel

from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.runtime.distributed import device


def batch_to_device(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Move a batch dict's tensors to this rank's device (non-blocking on GPU)."""
    dev = device()
    return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def vocab_parallel_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token cross entropy [b, s] (fp32) from vocab-parallel logits [b, s, V/tp].

    Padded vocabulary columns (ids >= ``vocab_size``) are masked to -inf first, so the result
    equals CE over the real vocabulary (the megatron kernel subtracts the row max before ``exp``,
    and the target column is always a real one, so -inf gives exact zeros and no NaN). The input
    is not modified (megatron's kernel works in place, so an aliasing fp32 input is copied first).
    """
    masked = mask_padded_vocab(logits.float(), vocab_size)
    if masked.data_ptr() == logits.data_ptr():
        masked = masked.clone()  # megatron's kernel works in place: keep the caller's logits intact
    return tensor_parallel.vocab_parallel_cross_entropy(masked, labels)


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, *, labels: torch.Tensor,
                 vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, num_tokens, {"lm": [sum, count]})`` for logits ``output_tensor`` [b, s, V/tp]."""
    per_token = vocab_parallel_lm_loss(output_tensor, labels, vocab_size)
    mask = loss_mask.to(per_token.dtype)
    loss_sum = (per_token * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm": torch.stack([loss_sum.detach(), mask.sum().detach()])}
    return loss_sum, num_tokens, report


def lm_forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module,
                    vocab_size: int | None = None):
    """Default pre-training forward step: next-token CE on ``tokens``/``labels``/``loss_mask``.

    Every pipeline stage reads the same batch (only the first uses tokens, only the last the
    labels). ``vocab_size`` is the real (unpadded) vocabulary; None masks nothing, so pass it
    (:func:`make_lm_forward_step`).
    """
    batch = batch_to_device(next(data_iterator))
    output = model(batch["tokens"], batch["position_ids"], None)
    if vocab_size is None:
        vocab_size = 1 << 62  # no padded columns to mask
    return output, partial(lm_loss_func, batch["loss_mask"], labels=batch["labels"], vocab_size=vocab_size)


def make_lm_forward_step(vocab_size: int):
    """``lm_forward_step`` bound to the real vocabulary size (what the Trainer takes)."""
    return partial(lm_forward_step, vocab_size=vocab_size)
