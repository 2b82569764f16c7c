"""The MiniLLM loop: rollout round -> several PPO epochs of optimizer steps -> next round.

Each optimizer step (one PPO mini-batch) runs megatron-core's ``forward_backward_func`` twice into
the same gradient buffers: once over the rollout micro-batches (policy-gradient + single-step
terms) and once over pre-training micro-batches (L_PT), then one optimizer step. The per-token
loss of a step is

    sum_t mask_t [ max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps)) + c_ss (w_t) KL(q_t || p_t) ] / N
    + lm_coef * sum_t [ (1 - kd_ratio) CE_t + kd_ratio * (-sum_v p log q)_t ] / N_PT

with N, N_PT the global (all DP ranks, all micro-batches) token counts and rho_t = q_theta(y_t) /
p~(y_t). The teacher forward for the single-step term runs inside every training micro-batch, as
in the reference (full-vocab teacher logits are never stored per rollout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import parallel_state

from megatron_kd.minillm import losses as L
from megatron_kd.minillm.data import iterate_minibatches
from megatron_kd.minillm.evaluate import EvalConfig, evaluate
from megatron_kd.minillm.optim import OptimConfig, build_optimizer, current_lr, optimizer_step, zero_grads
from megatron_kd.minillm.rollout import AdvantageConfig, PromptStream, RolloutConfig, Rollouts, collect
from megatron_kd.minillm.steps import dp_info, dp_sum, run_microbatches
from megatron_kd.models.builder import mask_padded_vocab


@dataclass
class PPOConfig:
    """The policy update on each round of rollouts (defaults: paper App. B.1 / reference scripts)."""

    epochs: int = 4
    """Passes over each round's rollouts (reference --ppo-epochs 4)."""
    batch_size: int = 64
    """Rollouts per optimizer step over all DP ranks (paper: mini-batch 64)."""
    micro_batch_size: int = 8
    """Rollouts per forward/backward on one rank (gradient accumulation inside a step)."""
    clip: float = 0.2
    """PPO ratio clip epsilon."""
    single_step: bool = True
    """Add the exact single-step reverse-KL term (reference --single-step-reg)."""
    single_step_coef: float = 1.0
    """Weight of the single-step term."""
    single_step_importance_weight: bool = False
    """Weight the single-step term by w_t as the paper's Eq. 7 does; the reference code does not."""


@dataclass
class LMTermConfig:
    """The pre-training term L_PT on plain text (reference: --lm-coef 1, --kd-ratio 0.5)."""

    data: str | None = None
    """Prefix of a pre-training indexed dataset (.bin/.idx); None disables L_PT."""
    coef: float = 1.0
    """Weight of L_PT in the total loss."""
    kd_ratio: float = 0.5
    """L_PT = (1 - kd_ratio) * CE + kd_ratio * soft-CE against the teacher (forward KD)."""
    micro_batch_size: int = 8
    """Pre-training sequences per rollout micro-batch on one rank."""
    seq_length: int = 512
    """Tokens per pre-training sequence."""


@dataclass
class TrainLoopConfig:
    """Everything the MiniLLM loop needs besides models and data."""

    total_steps: int = 5000
    """Optimizer steps (reference --total-iters 5000)."""
    seed: int = 10
    """Seed of prompt order, sampling noise and mini-batch shuffles."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    lm: LMTermConfig = field(default_factory=LMTermConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_interval: int = 100
    """Evaluate every N optimizer steps (0 = only at the end)."""
    save_interval: int = 500
    """Checkpoint every N optimizer steps (0 = only at the end)."""


def validate_loop_config(c: TrainLoopConfig, dp: int) -> None:
    """One-line ``ValueError`` when batch sizes do not fit the data-parallel layout (call early)."""
    if c.rollout.num_rollouts % dp or c.ppo.batch_size % dp:
        raise ValueError(f"rollout.num_rollouts={c.rollout.num_rollouts} and ppo.batch_size={c.ppo.batch_size} "
                         f"must be divisible by the data-parallel size {dp}")
    if c.ppo.batch_size > c.rollout.num_rollouts:
        raise ValueError(f"ppo.batch_size={c.ppo.batch_size} exceeds rollout.num_rollouts="
                         f"{c.rollout.num_rollouts}: a round must hold at least one mini-batch")
    if (c.ppo.batch_size // dp) % c.ppo.micro_batch_size:
        raise ValueError(f"per-rank mini-batch {c.ppo.batch_size // dp} is not a multiple of "
                         f"ppo.micro_batch_size={c.ppo.micro_batch_size}")
    if not 0.0 <= c.rollout.mix_alpha <= 1.0:
        raise ValueError(f"rollout.mix_alpha={c.rollout.mix_alpha} must be in [0, 1]")
    if parallel_state.model_parallel_is_initialized() and \
            parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("MiniLLM training supports tensor and data parallelism; set parallel.pipeline_parallel=1")


class MiniLLMTrainer:
    """Reverse-KL policy-gradient distillation of ``student`` (DDP-wrapped) towards ``teacher``."""

    def __init__(self, student, teacher, cfg: TrainLoopConfig, tokenizer, train_data, vocab_size: int,
                 eval_data=None, lm_chunks=None, optimizer=None, scheduler=None):
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.tok, self.train_data, self.eval_data = tokenizer, train_data, eval_data
        self.lm_chunks, self.vocab_size = lm_chunks, vocab_size
        self.dp_rank, self.dp_size, _ = dp_info()
        validate_loop_config(cfg, self.dp_size)
        if cfg.lm.coef > 0 and cfg.lm.data and lm_chunks is None:
            raise ValueError("lm.data is set but no pre-training chunks were given to the trainer")
        if optimizer is None:
            optimizer, scheduler = build_optimizer(student, cfg.optim, cfg.total_steps)
        self.opt, self.sched = optimizer, scheduler
        self.stream = PromptStream(len(train_data), cfg.seed)
        self.step, self.round = 0, 0
        self.device = next(student.parameters()).device

    # ----------------------------------------------------------------- rollouts
    def collect_round(self) -> Rollouts:
        """Rollouts of round ``self.round`` on this rank."""
        c = self.cfg.rollout
        local = c.num_rollouts // self.dp_size
        start = self.round * c.num_rollouts + self.dp_rank * local
        idx, ids = self.stream.slice(start, local)
        prompts = [self.train_data.prompt(i) for i in idx]
        return collect(self.student, self.teacher, prompts, ids, c, self.cfg.advantage, self.vocab_size,
                       self.tok.eod, self.tok.pad, self.cfg.seed)

    # ----------------------------------------------------------------- losses
    def _ppo_loss(self, batch, teacher_logits, output, n_tokens):
        p = self.cfg.ppo
        logits = mask_padded_vocab(output.float(), self.vocab_size)
        mask = batch["mask"]
        per_tok, parts = L.minillm_token_loss(
            logits, teacher_logits if p.single_step else None, batch["labels"], batch["log_behaviour"],
            batch["advantages"], batch["weights"], p.clip, p.single_step_coef, p.single_step_importance_weight)
        total = (per_tok * mask).sum()
        stats = {"pg_loss": (parts["pg"] * mask).sum(), "clip_frac": (parts["clipped"] * mask).sum(),
                 "ratio": (parts["ratio"] * mask).sum(), "tokens": mask.sum()}
        if "single_step" in parts:
            stats["single_step_kl"] = (parts["single_step"] * mask).sum()
        return total / n_tokens, torch.tensor(1), {k: v.detach().double() for k, v in stats.items()}

    def _lm_loss(self, batch, teacher_logits, output, n_tokens):
        lm = self.cfg.lm
        logits = mask_padded_vocab(output.float(), self.vocab_size)
        mask = batch["loss_mask"]
        ce = -L.token_log_probs(logits, batch["labels"])
        per_tok = (1 - lm.kd_ratio) * ce
        stats = {"lm_ce": (ce.detach() * mask).sum(), "lm_tokens": mask.sum()}
        if lm.kd_ratio > 0:
            soft = L.soft_cross_entropy(logits, teacher_logits)
            per_tok = per_tok + lm.kd_ratio * soft
            stats["lm_kd"] = (soft.detach() * mask).sum()
        return lm.coef * (per_tok * mask).sum() / n_tokens, torch.tensor(1), {k: v.double() for k, v in stats.items()}

    def train_step(self, rollouts: Rollouts, idx: list[int]) -> dict[str, float]:
        """One optimizer step on the rollout rows ``idx`` (+ pre-training micro-batches)."""
        p, lm = self.cfg.ppo, self.cfg.lm
        self.student.train()
        zero_grads(self.student, self.opt)
        micro = [rollouts.select(idx[i: i + p.micro_batch_size]) for i in range(0, len(idx), p.micro_batch_size)]
        n_tok = dp_sum(sum(b["mask"].sum() for b in micro)).clamp(min=1).float().to(self.device)
        s = run_microbatches(self.student, micro, partial(self._ppo_loss, n_tokens=n_tok),
                             self.teacher if p.single_step else None, self.vocab_size)
        tokens = max(s.get("tokens", 0.0), 1.0)
        stats = {"pg_loss": s.get("pg_loss", 0.0) / tokens, "clip_frac": s.get("clip_frac", 0.0) / tokens,
                 "ratio": s.get("ratio", 0.0) / tokens}
        if p.single_step:
            stats["single_step_kl"] = s["single_step_kl"] / tokens
        if self.lm_chunks is not None and lm.coef > 0:
            lm_batches = [self.lm_chunks.next_batch(lm.micro_batch_size) for _ in micro]
            n_lm = dp_sum(sum(b["loss_mask"].sum() for b in lm_batches)).clamp(min=1).float().to(self.device)
            s = run_microbatches(self.student, lm_batches, partial(self._lm_loss, n_tokens=n_lm),
                                 self.teacher if lm.kd_ratio > 0 else None, self.vocab_size)
            stats["lm_ce"] = s["lm_ce"] / max(s["lm_tokens"], 1.0)
            if lm.kd_ratio > 0:
                stats["lm_kd"] = s["lm_kd"] / max(s["lm_tokens"], 1.0)
        ok, grad_norm = optimizer_step(self.student, self.opt, self.sched)
        stats.update(grad_norm=grad_norm if grad_norm is not None else float("nan"), lr=current_lr(self.opt),
                     update_applied=float(ok))
        self.step += 1
        return stats

    # ----------------------------------------------------------------- loop
    def evaluate(self) -> dict[str, float]:
        """Held-out ROUGE-L and exact reverse KL (needs ``eval_data``)."""
        if self.eval_data is None:
            return {}
        return evaluate(self.student, self.teacher, self.eval_data, self.tok, self.cfg.eval, self.vocab_size)

    def round_stats(self, r: Rollouts) -> dict[str, float]:
        """Rollout diagnostics summed over DP: mean reward per token, response length, weights."""
        t = dp_sum(torch.stack([r.rewards.sum() / self.cfg.advantage.reward_scale, r.mask.sum(),
                                 r.response_lengths.double().sum(), torch.tensor(float(len(r))),
                                 (r.weights * r.mask).sum()]))
        return {"rollout_reward_per_token": (t[0] / t[1].clamp(min=1)).item(),
                "rollout_response_length": (t[2] / t[3]).item(),
                "rollout_importance_weight": (t[4] / t[1].clamp(min=1)).item(), **r.timings}

    def train(self, on_step=None, on_round=None) -> None:
        """Run until ``total_steps`` optimizer steps. ``on_step(step, stats)`` / ``on_round(round,
        stats)`` are called on every rank (logging, evaluation and checkpointing hooks)."""
        c = self.cfg
        local_batch = c.ppo.batch_size // self.dp_size
        while self.step < c.total_steps:
            rollouts = self.collect_round()
            if on_round is not None:
                on_round(self.round, self.round_stats(rollouts))
            for epoch in range(c.ppo.epochs):
                for idx in iterate_minibatches(len(rollouts), local_batch, c.seed + self.dp_rank,
                                               self.round * c.ppo.epochs + epoch):
                    stats = self.train_step(rollouts, idx)
                    if on_step is not None:
                        on_step(self.step, stats)
                    if self.step >= c.total_steps:
                        break
                if self.step >= c.total_steps:
                    break
            self.round += 1
