"""Vocab-parallel next-token sampling: temperature, top-k, top-p, greedy, teacher mixing.

No rank ever holds the full vocabulary. Sampling is Gumbel-max: ``argmax_v(score_v + G_v)`` with
i.i.d. Gumbel noise ``G``. The noise of vocabulary id ``v`` for sequence ``i`` at position ``t``
is a counter-based hash of ``(seed, i, t, v)`` -- every rank computes it for its own columns
only, and the same ``(seed, i, t)`` gives the same noise at any TP size, batch composition or
data-parallel layout. The global argmax is one MIN/MAX all-reduce of a [b] vector.

top-k: each rank sends its k best values (all-gather of [tp, b, k]) and keeps columns >= the
global k-th value (ties at the k-th value are all kept). top-p: the nucleus threshold is found
by bisection on the log-probability (one [b] all-reduce per step, 50 steps: exact for float32
inputs), keeping the smallest set of most probable ids whose mass reaches ``top_p``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_kd.posttrain import vocab as vp

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31 so that (x < 2**32) * c never overflows int64.
_C1, _C2, _C3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39


@dataclass
class SamplingConfig:
    """How the next token is drawn from a (possibly teacher-mixed) distribution."""

    temperature: float = 1.0
    """Logits are divided by this; 0 means greedy decoding."""
    top_k: int = 0
    """Keep only the k most probable ids (0 = off)."""
    top_p: float = 1.0
    """Keep the smallest set of most probable ids whose probability reaches top_p (1 = off)."""
    greedy: bool = False
    """Take the argmax instead of sampling (same as temperature 0)."""

    def validate(self) -> None:
        """Raise ``ValueError`` (one line) on out-of-range settings."""
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        """True when decoding takes the argmax."""
        return self.greedy or self.temperature == 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 15)
    x = (x * _C3) & _M32
    return x ^ (x >> 16)


def hash_uniform(seed: int, rows: torch.Tensor, step: torch.Tensor | int, cols: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) float64 noise of shape [len(rows), len(cols)], a pure function of the ids.

    ``rows``: [b] sequence ids; ``step``: position (int or [b]); ``cols``: [n] global vocab ids.
    """
    dev = cols.device
    h = _mix32(torch.tensor(seed & _M32, dtype=torch.long, device=dev) ^ ((seed >> 32) & _M32))
    r = _mix32(h ^ (rows.to(dev, torch.long) & _M32))
    step_t = torch.as_tensor(step, dtype=torch.long, device=dev)
    r = _mix32(r ^ ((step_t * 2 + 1) & _M32))
    x = _mix32(r[:, None] ^ ((cols.to(torch.long) * 0x9E3779B1 >> 3) & _M32)[None, :])
    x = _mix32(x ^ (cols.to(torch.long) & _M32)[None, :])
    return (x.double() + 0.5) / 4294967296.0


def gumbel_noise(seed: int, rows: torch.Tensor, step, local_vocab: int, device) -> torch.Tensor:
    """Standard Gumbel noise [b, local_vocab] for this TP rank's vocabulary columns (float64)."""
    start = vp.shard_offset(local_vocab)
    cols = torch.arange(start, start + local_vocab, device=device)
    u = hash_uniform(seed, rows, step, cols)
    return -torch.log(-torch.log(u))


def apply_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Set every column below the global k-th largest score (per row) to -inf. scores: [b, V/tp]."""
    if k <= 0:
        return scores
    kk = min(k, scores.shape[-1])
    local = scores.topk(kk, dim=-1).values  # [b, kk]
    if vp.tp_size() > 1:
        parts = [torch.empty_like(local) for _ in range(vp.tp_size())]
        dist.all_gather(parts, local.contiguous(), group=vp._tp_group())
        local = torch.cat(parts, dim=-1)
    kth = local.topk(min(k, local.shape[-1]), dim=-1).values[:, -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, p: float, iters: int = 50) -> torch.Tensor:
    """Keep the nucleus (smallest most-probable set with mass >= p) of softmax(scores), per row."""
    if p >= 1.0:
        return scores
    logp = vp.log_softmax(scores.double())
    finite = torch.isfinite(logp)
    hi = vp.all_reduce_max(logp.max(dim=-1).values)
    lo = -vp.all_reduce_max((-logp).masked_fill(~finite, float("-inf")).max(dim=-1).values)
    lo = torch.minimum(lo, hi)
    probs = logp.exp()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        mass = vp.all_reduce_sum(torch.where(logp >= mid[:, None], probs, torch.zeros_like(probs)).sum(-1))
        ok = mass >= p
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    # The most probable id always survives (p_max may exceed p on its own).
    top = vp.all_reduce_max(logp.max(dim=-1).values)
    thresh = torch.minimum(lo, top)
    return scores.masked_fill(logp < thresh[:, None], float("-inf"))


def mixture_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float,
                      temperature: float = 1.0) -> torch.Tensor:
    """log((1-alpha) q + alpha p) for this shard's columns; q, p = softmax(logits / temperature)."""
    t = temperature if temperature > 0 else 1.0
    lq = vp.log_softmax(student_logits.float() / t)
    if alpha <= 0:
        return lq
    lp = vp.log_softmax(teacher_logits.float() / t)
    if alpha >= 1:
        return lp
    return torch.logaddexp(lq + math.log1p(-alpha), lp + math.log(alpha))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, seed: int, rows: torch.Tensor, step,
                teacher_logits: torch.Tensor | None = None, mix_alpha: float = 0.0) -> torch.Tensor:
    """Global ids [b] drawn from softmax(logits / T) (or the teacher mixture), filtered by top-k/p.

    ``logits``/``teacher_logits``: [b, V/tp] with padded columns already at -inf. ``rows``: [b]
    sequence ids keying the noise; ``step``: the position being generated. Identical on all TP
    ranks. With ``teacher_logits`` and ``mix_alpha > 0`` the distribution is
    ``(1 - mix_alpha) * q + mix_alpha * p`` (temperature applied to both before mixing).
    """
    if teacher_logits is not None and mix_alpha > 0:
        scores = mixture_log_probs(logits, teacher_logits, mix_alpha, cfg.temperature)
    elif cfg.is_greedy:
        scores = logits.float()
    else:
        scores = logits.float() / cfg.temperature
    if cfg.is_greedy:
        return vp.argmax(scores)
    scores = apply_top_k(scores, cfg.top_k)
    scores = apply_top_p(scores, cfg.top_p)
    noise = gumbel_noise(seed, rows, step, scores.shape[-1], scores.device)
    return vp.argmax(scores.double() + noise)
