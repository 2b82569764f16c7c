"""Float64 reference implementations of the KD losses, written from the definitions.

Row by row, over the present columns only (a column is absent when the student or the teacher
logit is -inf), with plain autograd: slow, obviously correct, independent of the chunked code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl(a, la, lb):
    """sum a (la - lb) over the entries where a > 0 (0 log 0 = 0, no NaN in value or grad)."""
    nz = (a > 0).nonzero().reshape(-1)
    return (a[nz] * (la[nz] - lb[nz])).sum()


def _log_mix(w, la, lb):
    """log(w * exp(la) + (1 - w) * exp(lb)) in log space (exact under underflow)."""
    if w == 0:
        return lb
    if w == 1:
        return la
    return torch.logaddexp(math.log(w) + la, math.log(1 - w) + lb)


def dense_row(s, t, kind, temperature=1.0, skew=0.1, beta=0.5):
    """Reference loss for one token: ``s``, ``t`` are [V] float64."""
    keep = (~(torch.isneginf(s) | torch.isneginf(t))).nonzero().reshape(-1)
    if keep.numel() == 0:
        return s.new_zeros(()) + 0.0 * s[keep].sum()
    s = s[keep] / temperature
    t = t[keep] / temperature
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    q, p = ls.exp(), lt.exp()
    if kind == "forward_kl":
        return _kl(p, lt, ls)
    if kind == "reverse_kl":
        return _kl(q, ls, lt)
    if kind == "skew_forward_kl":
        return _kl(p, lt, _log_mix(skew, lt, ls))
    if kind == "skew_reverse_kl":
        return _kl(q, ls, _log_mix(skew, ls, lt))
    if kind == "jsd" and beta in (0.0, 1.0):  # TRL's GKD endpoints: forward / reverse KL
        return _kl(p, lt, ls) if beta == 0.0 else _kl(q, ls, lt)
    if kind == "jsd":
        lm = _log_mix(beta, lt, ls)
        return beta * _kl(p, lt, lm) + (1 - beta) * _kl(q, ls, lm)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum()
    if kind == "soft_ce":
        return -(p * ls).sum()
    if kind == "mse":
        return ((s - t) ** 2).mean()
    raise ValueError(kind)


def dense(s, t, kind, temperature=1.0, skew=0.1, beta=0.5):
    """Reference per-token loss for [..., V] logits (float64 recommended)."""
    lead = s.shape[:-1]
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    rows = [dense_row(s2[i], t2[i], kind, temperature, skew, beta) for i in range(s2.shape[0])]
    return torch.stack(rows).reshape(lead)


def sparse_row(s, ids, lps, temperature=1.0, residual=False):
    """Reference sparse loss for one token: ``s`` [V], ``ids`` [k], ``lps`` [k]."""
    V = s.shape[-1]
    finite = ~torch.isneginf(s)
    zero = s.new_zeros(()) + 0.0 * s[finite].sum()
    if finite.sum() == 0:
        return zero
    lse = torch.logsumexp(s[finite] / temperature, -1)
    sel = [j for j in range(ids.numel()) if 0 <= int(ids[j]) < V and bool(finite[int(ids[j])])]
    if not sel:
        return zero if not residual else zero  # empty target: loss 0 in both modes
    cols = ids[sel]
    lq = s[cols] / temperature - lse
    lp = lps[sel].to(s.dtype)
    if not residual:
        lph = F.log_softmax(lp / temperature, -1)
        return _kl(lph.exp(), lph, lq)
    p = lp.exp()
    loss = _kl(p, lp, lq)
    r_p = torch.clamp(1 - p.sum(), min=0)
    r_q = 1 - lq.exp().sum()
    if r_p > 0 and r_q > 0:
        loss = loss + r_p * (torch.log(r_p) - torch.log(r_q))
    return loss


def sparse(s, ids, lps, temperature=1.0, residual=False):
    """Reference per-token sparse loss for [..., V] logits and [..., k] targets."""
    lead = s.shape[:-1]
    s2 = s.reshape(-1, s.shape[-1])
    i2, l2 = ids.reshape(-1, ids.shape[-1]), lps.reshape(-1, lps.shape[-1])
    rows = [sparse_row(s2[i], i2[i], l2[i], temperature, residual) for i in range(s2.shape[0])]
    return torch.stack(rows).reshape(lead)


def loss_and_grad(fn, logits, *args, **kwargs):
    """(loss, d sum(loss) / d logits) of ``fn(logits, *args, **kwargs)``."""
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g
