"""Deterministic, vocab-parallel sampling of teacher tokens for the logits store.

``draw_tokens`` draws ``N`` i.i.d. tokens per row from ``r ∝ exp(logits / tau)`` (masked ids
excluded) without gathering the vocabulary. The randomness is a counter-based hash of
``(seed, position, draw, vocabulary id or block)``: the same store position gets the same draws at
any TP size, chunking, micro-batch or data-parallel layout, and a resumed run redraws exactly.

Two-level Gumbel-max (exact): the vocabulary is cut into fixed blocks of ``block`` global ids.
(1) Every rank computes its part of each block's log-sum-exp (one all-reduce MAX and one SUM of
``[n, V / block]`` values; a block inside one shard is summed exactly as at TP = 1); a draw picks
the block ``argmax_b(lse_b + G_b)``, which has probability ``mass_b / total``. (2) Inside the
chosen block it picks ``argmax_v(x_v + G_v)`` over the block's ids (probability
``p_v / mass_b``): each rank scores the ids it owns, one all-reduce MAX of ``[n, N]`` values and
one of the winning ids. Cost per draw: ``V / block + block`` hash evaluations instead of ``V``.
At TP = 1 on CPU both races run in C where the kernel is built (:func:`~megatron_kd.logits.native.draw_native`:
the same hash and noise, one pass per draw instead of a dozen over [rows, N, B] tensors).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from megatron_kd.logits.native import draw_native

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: (x < 2**32) * c never overflows int64.
_K1, _K2, _K3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39
_SALT_DRAW, _SALT_BLOCK, _SALT_ID, _SALT_AUDIT = 0x1B873593, 0x68E31DA4, 0x5BD1E995, 0x3C6EF372
DEFAULT_BLOCK = 64
"""Vocabulary ids per first-stage block."""


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing bijection on int64 tensors holding values in [0, 2^32) (a new tensor)."""
    x = x ^ (x >> 16)
    # in place from here: integer ops are exact, so the values are those of the out-of-place formula
    x.mul_(_K1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_K2).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_K3).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def position_keys(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """32-bit key [n] of each (seed, global dataset position) pair."""
    p = positions.to(torch.long)
    s = mix32(torch.tensor((seed & _M32) ^ _SALT_DRAW, dtype=torch.long, device=p.device))
    s = mix32(s ^ ((seed >> 32) & _M32))
    k = mix32(s ^ (p & _M32))
    return mix32(k ^ ((p >> 32) & _M32) ^ _SALT_BLOCK)


def _uniform(keys: torch.Tensor, cols: torch.Tensor, salt: int) -> torch.Tensor:
    """float64 uniforms in (0, 1): [*keys.shape, len(cols)] from keys [...] and ids [m]."""
    c = mix32((cols.to(torch.long) ^ salt) & _M32)
    return _to_unit(mix32(keys.unsqueeze(-1) ^ c))


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    """(h + 0.5) / 2^32 in float64 for 32-bit hashes ``h``: uniforms in (0, 1)."""
    return h.double().add_(0.5).div_(4294967296.0)


def gumbel(keys: torch.Tensor, cols: torch.Tensor, salt: int) -> torch.Tensor:
    """Standard Gumbel noise [*keys.shape, len(cols)] (float64), a pure function of (key, col)."""
    return _uniform(keys, cols, salt).log_().neg_().log_().neg_()  # -log(-log(u))


def audit_mask(seed: int, positions: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool [n]: positions kept (with their dense teacher distribution) in the store's audit sample."""
    if fraction <= 0:
        return torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    k = position_keys(seed ^ _SALT_AUDIT, positions)
    return (k.double() + 0.5) / 4294967296.0 < fraction


def _tp():
    from megatron_kd.losses.vocab_parallel import resolve_tp

    return resolve_tp(None)


def _all_reduce(x: torch.Tensor, tp, op) -> torch.Tensor:
    if tp.group is not None:
        dist.all_reduce(x, op=op, group=tp.group)
    return x


@torch.no_grad()
def draw_tokens(logits: torch.Tensor, vocab_size: int, positions: torch.Tensor, num_samples: int, seed: int,
                temperature: float = 1.0, exclude: Optional[torch.Tensor] = None, block: int = DEFAULT_BLOCK,
                row_chunk: Optional[int] = None) -> torch.Tensor:
    """``num_samples`` i.i.d. draws per row from ``softmax(logits / temperature)`` over the real vocabulary.

    Args:
        logits: [n, V_local] this TP rank's vocabulary shard (megatron's contiguous split).
        vocab_size: real vocabulary size (ids at or beyond it are never drawn).
        positions: [n] int64 global dataset positions (the store key; seeds the draws).
        num_samples: draws per row (N >= 1).
        seed: sampling seed (the store's).
        temperature: proposal temperature tau > 0 (r ∝ p^(1/tau)).
        exclude: optional [n, m] int64 global ids never drawn (-1 = none), e.g. a top-k head.
        block: ids per first-stage block (same for every layout of one store).
        row_chunk: rows per internal chunk (bounds the [rows, N, V/block] noise).

    Returns:
        int64 [n, N] global ids, identical on every TP rank (collective over the TP group).
        A row whose admissible vocabulary is empty gets -1.
    """
    tp = _tp()
    n, v_local = logits.shape
    dev = logits.device
    start = tp.rank * v_local
    num_blocks = -(-max(vocab_size, 1) // block)
    b_lo = start // block
    b_hi = min(-(-(start + v_local) // block), num_blocks)  # local columns touch blocks [b_lo, b_hi)
    if row_chunk is None:
        row_chunk = max(1, (1 << 22) // max(num_samples * max(num_blocks, block), 1))
    out = torch.empty(n, num_samples, dtype=torch.long, device=dev)
    cols_v = torch.arange(start, start + v_local, device=dev)
    blocks_all = torch.arange(num_blocks, device=dev)
    padded = bool((cols_v >= vocab_size).any())
    aligned = start == b_lo * block and v_local == (b_hi - b_lo) * block  # the shard is whole blocks
    id_hash = _id_hashes(num_blocks * block, dev)  # stage 2's per-id hashes (cached per vocabulary)
    for r0 in range(0, n, row_chunk):
        x = logits[r0:r0 + row_chunk].float()
        rows = x.shape[0]
        if temperature != 1.0:  # x / 1 is x: no pass (and no copy unless x is written below)
            x = x / temperature
        if padded:
            x = x.masked_fill((cols_v >= vocab_size).unsqueeze(0), float("-inf"))
        if exclude is not None:
            if x.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
                x = x.clone()  # never write into the caller's logits
            ex = exclude[r0:r0 + row_chunk].to(torch.long) - start
            ok = (ex >= 0) & (ex < v_local)
            r_idx = torch.arange(rows, device=dev).unsqueeze(1).expand_as(ex)
            x[r_idx[ok], ex[ok]] = float("-inf")
        # Block log-sum-exp: local columns padded on both sides to whole blocks.
        if aligned:
            xb = x.reshape(rows, b_hi - b_lo, block)
        else:
            pad_lo = start - b_lo * block
            width = (b_hi - b_lo) * block
            xb = torch.full((rows, width), float("-inf"), device=dev)
            take = min(v_local, width - pad_lo)
            xb[:, pad_lo:pad_lo + take] = x[:, :take]
            xb = xb.view(rows, b_hi - b_lo, block)
        bmax = torch.full((rows, num_blocks), float("-inf"), device=dev)
        bmax[:, b_lo:b_hi] = xb.amax(-1)
        _all_reduce(bmax, tp, dist.ReduceOp.MAX)
        safe = torch.where(torch.isfinite(bmax), bmax, 0.0)
        bsum = torch.zeros(rows, num_blocks, device=dev)
        bsum[:, b_lo:b_hi] = torch.sub(xb, safe[:, b_lo:b_hi].unsqueeze(-1)).exp_().sum(-1)
        _all_reduce(bsum, tp, dist.ReduceOp.SUM)
        lse = (safe + torch.log(bsum)).double()  # -inf for empty blocks
        keys = position_keys(seed, positions[r0:r0 + rows].to(dev))
        dkeys = mix32(keys.unsqueeze(-1) ^ mix32(torch.arange(num_samples, device=dev) ^ _SALT_DRAW))  # [rows, N]
        if tp.group is None:  # both races in C (TP = 1, CPU, kernel built; None: the torch path below)
            drawn = draw_native(x, min(v_local, num_blocks * block), lse, dkeys, block)
            if drawn is not None:
                out[r0:r0 + rows] = drawn
                continue
        score = gumbel(dkeys, blocks_all, _SALT_BLOCK).add_(lse.unsqueeze(1))  # lse + G: [rows, N, B]
        best = score.amax(-1)
        chosen = score.argmax(-1)  # identical on every rank (same inputs)
        empty = ~torch.isfinite(best)
        # Stage 2: ids of the chosen block that this rank owns.
        ids = chosen.unsqueeze(-1) * block + torch.arange(block, device=dev)  # [rows, N, block]
        local = ids - start
        owned = (local >= 0) & (local < v_local)
        xv = torch.gather(x.unsqueeze(1).expand(rows, num_samples, v_local), 2, torch.where(owned, local, 0))
        s2 = torch.where(owned, _stage2_noise(dkeys, ids, id_hash).add_(xv.double()), float("-inf"))
        v2, a2 = s2.max(-1)
        win = torch.gather(ids, 2, a2.unsqueeze(-1)).squeeze(-1)
        gmax = _all_reduce(v2.clone(), tp, dist.ReduceOp.MAX)
        win = torch.where((v2 == gmax) & torch.isfinite(v2), win, -1)
        _all_reduce(win, tp, dist.ReduceOp.MAX)
        out[r0:r0 + rows] = torch.where(empty, -1, win)
    return out


@functools.lru_cache(maxsize=4)
def _id_hashes(n: int, device: torch.device) -> torch.Tensor:
    """``mix32((id ^ salt) & M32)`` of every id in [0, n): stage 2's per-id hash, computed once per
    vocabulary instead of once per (row, draw, id). Read only (indexing copies)."""
    return mix32((torch.arange(n, device=device) ^ _SALT_ID) & _M32)


def _stage2_noise(dkeys: torch.Tensor, ids: torch.Tensor, id_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [rows, N, block] (float64) of draw keys [rows, N] at ids [rows, N, block]; ``id_hash``:
    :func:`_id_hashes` of the vocabulary."""
    return _to_unit(mix32(dkeys.unsqueeze(-1) ^ id_hash[ids])).log_().neg_().log_().neg_()  # -log(-log(u))
