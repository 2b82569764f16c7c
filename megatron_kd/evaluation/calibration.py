"""Next-token calibration: expected calibration error (ECE) of a language model's top-1 prediction.

For every held-out position the model predicts ``argmax_v q(v)`` with confidence ``c = max_v q(v)``;
it is correct when that id is the next token. Positions are binned by confidence into ``bins``
equal-width bins over [0, 1]; ``ECE = sum_b (n_b / n) |accuracy_b - mean confidence_b|``.

:class:`CalibrationAccumulator` collects per-bin sums (count, confidence, correct) from chunks of
logits -- vocab-parallel shards work through :func:`top1_confidence` (one all-reduce MAX of the
shard maxima and one SUM of the exp-sums) -- and data-parallel ranks can all-reduce ``sums``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


def top1_confidence(logits: torch.Tensor, labels: torch.Tensor,
                    tp_group: Optional[dist.ProcessGroup] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confidence [...], correct [...] bool)`` of the top-1 prediction of ``logits`` [..., V/tp].

    ``labels`` are global ids; padded vocabulary columns must be -inf. Ties: the smallest id wins.
    """
    from megatron_kd.losses.vocab_parallel import resolve_tp

    tp = resolve_tp(tp_group)
    x = logits.float()
    v_local = x.shape[-1]
    lmax, arg = x.max(-1)
    gmax = lmax.clone()
    if tp.group is not None:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=tp.group)
    z = torch.exp(x - gmax.unsqueeze(-1)).sum(-1)
    big = torch.iinfo(torch.long).max
    cand = torch.where(lmax == gmax, arg + tp.rank * v_local, big)
    if tp.group is not None:
        dist.all_reduce(z, group=tp.group)
        dist.all_reduce(cand, op=dist.ReduceOp.MIN, group=tp.group)
    return 1.0 / z, cand == labels


def logprobs_and_top1(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(log p(label), top-1 confidence, top-1 correct)`` per position of single-process ``logits``
    [..., V_padded] (ids >= ``vocab_size`` are padding), in one pass over the vocabulary.

    The same numbers, to the bit, as ``token_logprobs(logits, labels, vocab_size)`` (megatron's
    cross-entropy steps: max, subtract, exp, sum, log) and :func:`top1_confidence` of
    ``logits[..., :vocab_size]``, which would each take their own max and exp pass: evaluation
    computes both at every held-out position. ``logits`` is not modified. Single process only (the
    vocabulary whole): under TP use those two functions.
    """
    from megatron_kd.losses.vocab_parallel import resolve_tp

    if resolve_tp(None).group is not None:
        raise ValueError("logprobs_and_top1 needs the whole vocabulary (TP = 1): under tensor parallelism use "
                         "token_logprobs and top1_confidence")
    x = logits.float()
    x = x.clone() if x.data_ptr() == logits.data_ptr() else x  # worked on in place below
    v = x.shape[-1]
    if v > vocab_size:
        x[..., vocab_size:] = float("-inf")
    lmax, arg = x.max(-1)
    labels = labels.long()
    x.sub_(lmax.unsqueeze(-1))
    predicted = x.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    e = x.exp_()
    total = e.sum(-1)
    logprob = -(torch.log(total) - predicted)
    # top1_confidence sums exp over the real columns only: the padded zeros change its summation
    z = e[..., :vocab_size].sum(-1) if v > vocab_size else total
    return logprob, 1.0 / z, arg == labels


class CalibrationAccumulator:
    """Per-bin sums of confidence and accuracy over many chunks (see the module docstring)."""

    def __init__(self, bins: int = 15):
        if bins < 1:
            raise ValueError(f"bins={bins} must be >= 1")
        self.bins = bins
        self.sums = np.zeros((3, bins))
        """[count, sum of confidence, sum of correct] per bin."""

    def add(self, confidence, correct, mask=None) -> None:
        """Add positions (tensors or arrays of the same shape; ``mask`` 0 = skip)."""
        c = np.asarray(torch.as_tensor(confidence).detach().double().cpu()).reshape(-1)
        k = np.asarray(torch.as_tensor(correct).detach().double().cpu()).reshape(-1)
        if mask is not None:
            keep = np.asarray(torch.as_tensor(mask).detach().cpu()).reshape(-1) != 0
            c, k = c[keep], k[keep]
        b = np.clip((c * self.bins).astype(np.int64), 0, self.bins - 1)
        self.sums[0] += np.bincount(b, minlength=self.bins)
        self.sums[1] += np.bincount(b, c, minlength=self.bins)
        self.sums[2] += np.bincount(b, k, minlength=self.bins)

    def add_logits(self, logits: torch.Tensor, labels: torch.Tensor, mask=None, tp_group=None) -> None:
        """Add the positions of ``logits`` [..., V/tp] with next tokens ``labels`` [...]."""
        conf, ok = top1_confidence(logits, labels, tp_group)
        self.add(conf, ok, mask)

    @property
    def count(self) -> int:
        """Positions added."""
        return int(self.sums[0].sum())

    def ece(self) -> float:
        """Expected calibration error (NaN when nothing was added)."""
        n = self.sums[0].sum()
        if n == 0:
            return float("nan")
        nz = self.sums[0] > 0
        gap = np.abs(self.sums[2][nz] - self.sums[1][nz])  # n_b * |acc_b - conf_b|
        return float(gap.sum() / n)

    def accuracy(self) -> float:
        """Top-1 accuracy over the added positions."""
        n = self.sums[0].sum()
        return float(self.sums[2].sum() / n) if n else float("nan")


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, mask=None, bins: int = 15) -> float:
    """ECE of full (single-process) ``logits`` [..., V] against ``labels`` [...]."""
    acc = CalibrationAccumulator(bins)
    acc.add_logits(logits, labels, mask)
    return acc.ece()
