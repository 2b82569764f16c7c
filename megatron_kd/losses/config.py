"""``KDLossConfig``: how the distillation loss mixes the LM loss and a KD divergence."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from megatron_kd.config import validate_choices
from megatron_kd.losses.divergences import KINDS

ALPHA_SCHEDULES = ("constant", "linear", "wsd")
"""Shapes the KD weight alpha can follow over training (see :func:`megatron_kd.losses.alpha_at`)."""


@dataclass
class KDLossConfig:
    """Distillation loss: ``total = (1 - alpha) * LM + alpha * KD`` per token (``kd.*`` keys)."""

    kind: Literal[KINDS] = "forward_kl"  # type: ignore[valid-type]
    """Divergence for dense teacher logits: forward_kl, reverse_kl, skew_forward_kl,
    skew_reverse_kl, jsd, tvd, soft_ce or mse. Sparse (stored top-k) targets always use the
    forward KL of :func:`megatron_kd.losses.sparse_kd_loss`."""
    temperature: float = 1.0
    """Softmax temperature T (> 0) of both teacher and student inside the KD term. The LM term is
    always at T = 1. The PD paper found T <= 2 fine and T >= 5 harmful."""
    alpha: float = 0.5
    """KD weight in [0, 1]: the constant value, or the stable-phase (peak) value of ``wsd``.
    1 = KD only (the LM loss is still computed, without gradient, for the report)."""
    alpha_schedule: Literal[ALPHA_SCHEDULES] = "constant"  # type: ignore[valid-type]
    """How alpha moves with the training step: constant | linear | wsd (warmup-stable-decay,
    the PD paper's best recipe together with a WSD learning rate)."""
    alpha_start: Optional[float] = None
    """alpha at step 0. linear: default = ``alpha``; wsd: start of the warmup, default 0."""
    alpha_end: Optional[float] = None
    """alpha at the last step. linear: default = ``alpha``; wsd: end of the decay, default 0."""
    wsd_warmup_fraction: float = 0.01
    """wsd: fraction of ``total_steps`` over which alpha rises linearly from alpha_start to alpha."""
    wsd_decay_fraction: float = 0.1
    """wsd: final fraction of ``total_steps`` over which alpha falls linearly to alpha_end."""
    t2_scale: bool = False
    """Multiply the KD term by T^2 (Hinton et al.: keeps its gradient scale independent of T)."""
    skew: float = 0.1
    """Skew a in [0, 1] of skew_forward_kl / skew_reverse_kl (DistiLLM uses 0.1)."""
    beta: float = 0.5
    """Mixture weight b in [0, 1] of the generalised JSD (GKD)."""
    residual: bool = False
    """Sparse targets only: keep the stored top-k mass un-renormalised and match the rest as one
    remainder bucket (needs temperature 1). False = renormalise over the kept ids (PD paper)."""
    target_kind: Literal["auto", "logprobs", "weights"] = "auto"
    """Sparse targets only: what the stored values are. auto = what the logits store says (offline
    KD reads it from the store); logprobs = teacher log-probs (--method topk); weights = log
    target weights of a sampled store (--method sample|topk+sample: soft cross-entropy, needs
    temperature 1 and residual false). An explicit kind that disagrees with the store fails."""
    chunk_size: Optional[int] = None
    """Tokens per chunk of the KD kernels; None = about 4M logits per CPU thread (max 4), 32M on GPUs."""
    ignore_index: int = -100
    """Labels equal to this are excluded (like a 0 in loss_mask) from both LM and KD terms."""
    lm_inplace: bool = False
    """Let megatron's vocab_parallel_cross_entropy overwrite fp32 student logits in place (saves one
    logits-sized fp32 copy; the logits tensor is garbage after the call). bf16/fp16 logits are
    never modified either way. Only the two-pass path uses it (kd.one_pass is skipped when true)."""
    one_pass: bool = True
    """Compute the LM cross-entropy and the KD divergence in one pass over each logits chunk
    (shared log-sum-exp, one combined analytic gradient; :func:`megatron_kd.losses.fused_kd_lm_loss`).
    Same values and gradients as the two-pass path (false: KD kernel, then megatron's CE)."""
    fused_linear: bool = True
    """Fuse the student's output layer into the loss (:func:`megatron_kd.losses.fused_linear_kd`):
    logits are produced chunk by chunk from the final hidden states and never held whole; online,
    the teacher's too. Distillation runs only (kd.mode online/offline, not with kd.cross_tokenizer,
    which falls back to the unfused head)."""
    fused_chunk_tokens: Optional[int] = None
    """Tokens per chunk of the fused output layer; None = about 4M logits per CPU thread (max 4),
    32M on GPUs (the budget of kd.chunk_size), but at least 64 tokens on CPU and 1024 on GPUs
    (each chunk streams the whole output weight: fewer tokens would be memory-bound)."""
    compile: bool = False
    """Run the fused loss's chunk kernels (LM only, forward KL / soft CE at T = 1, renormalised sparse
    targets at T = 1) through ``torch.compile`` (:mod:`megatron_kd.losses.compiled`), for kd.one_pass
    and kd.fused_linear, the LM-only fused step included. Same values and gradients (to rounding).
    If compilation fails, one log line and the eager kernels. Off by default: see BENCHMARKS.md
    (torch.compile of the fused step) for what it measured."""

    def __post_init__(self) -> None:
        validate_choices(self, "kd.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"kd.temperature={self.temperature} must be a finite number > 0")
        for name in ("alpha", "alpha_start", "alpha_end", "skew", "beta",
                     "wsd_warmup_fraction", "wsd_decay_fraction"):
            val = getattr(self, name)
            if val is not None and not 0.0 <= val <= 1.0:
                raise ValueError(f"kd.{name}={val} must lie in [0, 1]")
        if self.wsd_warmup_fraction + self.wsd_decay_fraction > 1.0:
            raise ValueError(
                f"kd.wsd_warmup_fraction + kd.wsd_decay_fraction = "
                f"{self.wsd_warmup_fraction + self.wsd_decay_fraction} must be <= 1"
            )
        if self.residual and self.temperature != 1.0:
            raise ValueError(f"kd.residual=true needs kd.temperature=1 (got {self.temperature})")
        if self.target_kind not in ("auto", "logprobs", "weights"):
            raise ValueError(f"kd.target_kind={self.target_kind!r} is not one of auto, logprobs, weights")
        if self.target_kind == "weights" and (self.temperature != 1.0 or self.residual):
            raise ValueError("kd.target_kind=weights (sampled store) needs kd.temperature=1 and kd.residual=false")
        if self.fused_chunk_tokens is not None and self.fused_chunk_tokens < 1:
            raise ValueError(f"kd.fused_chunk_tokens={self.fused_chunk_tokens} must be >= 1 or null")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"kd.chunk_size={self.chunk_size} must be >= 1 or null")
