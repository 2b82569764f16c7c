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


def vocab_parallel_lm_loss(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                           inplace: bool = False) -> torch.Tensor:
    """Per-token cross entropy [b, s] (fp32) from vocab-parallel logits [b, s, V/tp] (any two leading
    dims: [s, b, V/tp] with [s, b] labels gives [s, b]).

    Padded vocabulary columns (ids >= ``vocab_size``) are masked to -inf first, so the result
    equals CE over the real vocabulary (the megatron kernel subtracts the row max before ``exp``,
    and the target column is always a real one, so -inf gives exact zeros and no NaN). The input
    is not modified (megatron's kernel works in place, so an aliasing fp32 input is copied first)
    unless ``inplace``: logits nobody reads afterwards (the output layer's backward needs only its
    input and weight) are overwritten, which saves a [tokens, V] copy.
    """
    masked = mask_padded_vocab(logits.float(), vocab_size)
    if masked.data_ptr() == logits.data_ptr() and not inplace:
        masked = masked.clone()  # megatron's kernel works in place: keep the caller's logits intact
    return tensor_parallel.vocab_parallel_cross_entropy(masked, labels)


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, *, labels: torch.Tensor,
                 vocab_size: int, seq_first: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, num_tokens, {"lm": [sum, count]})`` for logits ``output_tensor`` [b, s, V/tp].

    ``seq_first``: ``output_tensor`` is [s, b, V/tp], megatron's own layout, and private to this loss
    (:func:`lm_forward_step`): the cross entropy runs on it in place and in that layout. Every row's
    arithmetic is the same, and the per-token losses are put back in [b, s] order before the sum, so
    the result has the same bits as the [b, s] form."""
    if seq_first:
        per_token = vocab_parallel_lm_loss(output_tensor, labels.t().contiguous(), vocab_size, inplace=True)
        per_token = per_token.t().contiguous()
    else:
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
    (:func:`make_lm_forward_step`). On the last stage the output layer keeps its logits in its own
    ``[s, b, V/tp]`` layout (:class:`megatron_kd.models.head.HeadCapture` ``keep_logits``) and the
    loss reads them there: megatron's ``[b, s]`` transposed copy of the logits, and the two copies
    of its gradient in the output layer's backward, are not made (-4.6% per one-thread CPU step of
    the quickstart's teacher; the same bits: tests/training/test_trainer.py).
    """
    from megatron_kd.models.head import capture_for

    batch = batch_to_device(next(data_iterator))
    if vocab_size is None:
        vocab_size = 1 << 62  # no padded columns to mask
    cap = capture_for(model)
    if cap is None:  # not the last pipeline stage: its output is the activation sent on
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, partial(lm_loss_func, batch["loss_mask"], labels=batch["labels"], vocab_size=vocab_size)
    with cap.capturing(keep_logits=True):
        model(batch["tokens"], batch["position_ids"], None)
    return cap.pop_logits(), partial(lm_loss_func, batch["loss_mask"], labels=batch["labels"], vocab_size=vocab_size,
                                     seq_first=True)


def fused_lm_loss_func(loss_mask: torch.Tensor, hidden: torch.Tensor, *, labels: torch.Tensor, weight: torch.Tensor,
                       vocab_size: int, sequence_parallel: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`lm_loss_func` from the final hidden states ``hidden`` [b, s, H] (``[b, s/tp, H]`` sequence
    parallel) and the output weight shard ``weight`` [V/tp, H]: the output layer and the cross-entropy
    run chunk by chunk over the tokens (:func:`megatron_kd.losses.fused_linear.fused_linear_kd`, LM
    only), so the [tokens, V] logits are never held whole, in forward or backward. Tokens count where
    ``loss_mask`` is non-zero (GPT datasets' masks are 0/1)."""
    from megatron_kd.losses.fused_linear import fused_linear_kd

    mask = loss_mask != 0
    loss_sum, _, _ = fused_linear_kd(hidden, weight, labels.masked_fill(~mask, 0), mask, w_lm=1.0,
                                     vocab_size=vocab_size, sequence_parallel=sequence_parallel)
    count = mask.sum()
    report = {"lm": torch.stack([loss_sum.detach().float(), count.detach().float()])}
    return loss_sum, count.to(torch.int), report


def fused_lm_forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module,
                          vocab_size: int):
    """:func:`lm_forward_step` with the fused output layer + cross-entropy (:func:`fused_lm_loss_func`).

    On the last pipeline stage the output layer is captured (:mod:`megatron_kd.models.head`): the
    model returns its final hidden states and the loss runs the output layer itself. Other stages
    have no output layer and run as before.
    """
    from megatron_kd.models.head import capture_for

    cap = capture_for(model)
    if cap is None:
        return lm_forward_step(data_iterator, model, vocab_size)
    batch = batch_to_device(next(data_iterator))
    with cap.capturing():
        hidden = model(batch["tokens"], batch["position_ids"], None)
    return hidden, partial(fused_lm_loss_func, batch["loss_mask"], labels=batch["labels"], weight=cap.pop_weight(),
                           vocab_size=vocab_size, sequence_parallel=cap.sequence_parallel)


def make_lm_forward_step(vocab_size: int, fused: bool = False):
    """``lm_forward_step`` bound to the real vocabulary size (what the Trainer takes); ``fused``:
    :func:`fused_lm_forward_step` (``train.fused_lm_loss``)."""
    return partial(fused_lm_forward_step if fused else lm_forward_step, vocab_size=vocab_size)
