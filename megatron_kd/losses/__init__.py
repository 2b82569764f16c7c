"""Distillation losses: vocab-parallel divergences, sparse targets, the distillation loss layer.

See ``docs/losses.md``. Everything works on megatron's vocab-sharded logits [..., V/tp] without
gathering the vocabulary, chunked over tokens with analytic gradients.
"""
from megatron_kd.losses.config import ALPHA_SCHEDULES, KDLossConfig
from megatron_kd.losses.distillation import DistillationLoss, lm_loss_func, lm_per_token
from megatron_kd.losses.divergences import KINDS, kd_loss
from megatron_kd.losses.fused import fused_kd_lm_loss
from megatron_kd.losses.fused_linear import fused_linear_kd
from megatron_kd.losses.schedules import alpha_at
from megatron_kd.losses.sparse import sparse_kd_loss
from megatron_kd.losses.uld import hybrid_kd_loss, projected_kd_loss, uld_loss
from megatron_kd.losses.vocab_parallel import TPContext, resolve_tp

__all__ = [
    "ALPHA_SCHEDULES",
    "DistillationLoss",
    "KDLossConfig",
    "KINDS",
    "TPContext",
    "alpha_at",
    "fused_kd_lm_loss",
    "fused_linear_kd",
    "hybrid_kd_loss",
    "kd_loss",
    "lm_loss_func",
    "lm_per_token",
    "projected_kd_loss",
    "resolve_tp",
    "sparse_kd_loss",
    "uld_loss",
]
