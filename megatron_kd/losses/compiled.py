"""Compiled chunk kernels of the fused KD + LM loss (issue 15, item 4; ``kd.compile``).

The fused loss makes one pass over each ``[n, V_local]`` logits chunk: row max, exp-sums (the
log-sum-exp), the divergence's dot product, the label logit, then the analytic gradient. In eager
mode every step is its own kernel over the whole chunk (about 20 memory passes). Here the same
maths is written as pure tensor functions between the TP collectives, so ``torch.compile`` can
fuse each stage into one loop:

* ``*_sums_``: everything summed over the vocabulary (before the TP sum), and the chunk(s)
  overwritten by their shifted exps (one read, one write: the chunks are scratch);
* ``*_grad_``: the gradient ``c_s exp(S - m_s) - c_t exp(T - m_t) - w_lm onehot``, written in place
  over the student's exps (no new ``[n, V]`` buffer: above glibc's mmap threshold, 32 MiB, every
  fresh buffer costs page faults).

The row max (one ``amax`` per tensor, eager) and the small ``[n]`` / ``[n, k]`` arithmetic stay in
:mod:`megatron_kd.losses.fused`. Weights and per-row coefficients are tensors, never Python floats,
so a changing alpha does not recompile; the row dimension is marked dynamic, so the last (shorter)
chunk does not either. When compilation fails (no C++ compiler, an unsupported backend, a dynamo
error) :func:`call` logs one line, turns compilation off for the process and returns the eager
result of the same function; the callers then use their in-place eager kernels.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

_log = logging.getLogger(__name__)

_STATE = {"enabled": True, "error": None}
_COMPILED: dict[Callable, Callable] = {}


def dense_sums_(S: torch.Tensor, T: torch.Tensor, ms: torch.Tensor, mt: torch.Tensor, li: torch.Tensor,
                own: torch.Tensor, soft_ce: bool) -> torch.Tensor:
    """[4, n]: ``sum exp(S-ms)``, ``sum exp(T-mt)``, ``sum exp(T-mt) * D``, label logit ``S[li]`` (0
    where not owned); ``D = S-ms`` (soft CE) or ``(T-mt) - (S-ms)`` (forward KL). Overwrites ``S``
    with ``exp(S-ms)`` and ``T`` with ``exp(T-mt)`` (for :func:`dense_grad_`). Clean chunks (no -inf)."""
    sl = torch.where(own, S.gather(-1, li.unsqueeze(-1)).squeeze(-1), 0.0)
    s = S - ms.unsqueeze(-1)
    t = T - mt.unsqueeze(-1)
    es, et = s.exp(), t.exp()
    d = s if soft_ce else t - s
    sums = torch.stack((es.sum(-1), et.sum(-1), (d * et).sum(-1), sl))
    S.copy_(es)
    T.copy_(et)
    return sums


def dense_grad_(Es: torch.Tensor, Et: torch.Tensor, cs: torch.Tensor, ct: torch.Tensor, li: torch.Tensor,
                own: torch.Tensor, w_lm: torch.Tensor) -> None:
    """``Es := cs Es - ct Et - w_lm onehot(li)`` in place (onehot only where ``own``)."""
    Es.copy_(_sub_onehot(cs.unsqueeze(-1) * Es - ct.unsqueeze(-1) * Et, li, own, w_lm))


def lm_sums_(S: torch.Tensor, m: torch.Tensor, li: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """[2, n]: ``sum exp(S-m)`` and the label logit ``S[li]`` (0 where not owned); overwrites ``S``
    with ``exp(S-m)`` (for :func:`lm_grad_`)."""
    sl = torch.where(own, S.gather(-1, li.unsqueeze(-1)).squeeze(-1), 0.0)
    e = (S - m.unsqueeze(-1)).exp()
    sums = torch.stack((e.sum(-1), sl))
    S.copy_(e)
    return sums


def lm_grad_(E: torch.Tensor, c: torch.Tensor, li: torch.Tensor, own: torch.Tensor, w_lm: torch.Tensor) -> None:
    """``E := c E - w_lm onehot(li)`` in place (onehot only where ``own``)."""
    E.copy_(_sub_onehot(c.unsqueeze(-1) * E, li, own, w_lm))


def _sub_onehot(g: torch.Tensor, li: torch.Tensor, own: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    cols = torch.arange(g.shape[-1], device=g.device)
    hit = (cols == li.unsqueeze(-1)) & own.unsqueeze(-1)
    return torch.where(hit, g - w, g)


def enabled() -> bool:
    """False once a compilation failed in this process (or after :func:`disable`)."""
    return _STATE["enabled"]


def disable(reason: str = "disabled") -> None:
    """Turn compiled kernels off for this process (the eager kernels run instead)."""
    _STATE["enabled"], _STATE["error"] = False, reason


def reset() -> None:
    """Allow compilation again and forget the compiled code (tests, benchmarks: resets dynamo)."""
    _STATE["enabled"], _STATE["error"] = True, None
    _COMPILED.clear()
    torch._dynamo.reset()


def call(fn: Callable, *args):
    """``torch.compile(fn)(*args)`` with dim 0 of every tensor argument dynamic; on any compilation
    error: one log line, compilation off for the process, and ``fn(*args)`` (eager)."""
    if not _STATE["enabled"]:
        return fn(*args)
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=None)
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            torch._dynamo.maybe_mark_dynamic(a, 0)
    try:
        return compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler/backend failure: fall back to eager
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        disable(msg)
        _log.warning("kd.compile: torch.compile of the fused loss kernels failed (%s); using the eager kernels", msg)
        return fn(*args)
