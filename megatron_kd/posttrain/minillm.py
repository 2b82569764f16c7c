"""MiniLLM on the shared Trainer: a rollout batch source + a multi-epoch PPO step.

:class:`RolloutSource` collects a round of rollouts (teacher-mixed sampling, rewards, advantages;
:mod:`megatron_kd.posttrain.rollout`) and yields its PPO mini-batches for ``ppo.epochs`` epochs, then
the next round; its position and the current round's rollouts are this rank's ``rank_state`` in
checkpoints, so a resumed run continues mid-round exactly. :class:`PPOStep` is the
:class:`megatron_kd.training.loop.TrainStep` of one optimizer step (one PPO mini-batch): megatron's
forward/backward over the rollout micro-batches (policy-gradient + single-step terms) and over
pre-training micro-batches (L_PT) into the same gradient buffers. The per-token loss is

    sum_t mask_t [ max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps)) + c_ss (w_t) KL(q_t || p_t) ] / N
    + lm_coef * sum_t [ (1 - kd_ratio) CE_t + kd_ratio * (-sum_v p log q)_t ] / N_PT

with N, N_PT the global (all DP ranks, all micro-batches) token counts and rho_t = q_theta(y_t) /
p~(y_t). The teacher forward for the single-step term runs inside every training micro-batch, as
in the reference (full-vocab teacher logits are never stored per rollout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch

from megatron_kd.config import DERIVED
from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.posttrain import losses as L
from megatron_kd.posttrain.config import MiniLLMOptimConfig
from megatron_kd.posttrain.data import iterate_minibatches
from megatron_kd.posttrain.evaluate import EvalConfig
from megatron_kd.posttrain.rollout import AdvantageConfig, PromptStream, RolloutConfig, Rollouts, collect
from megatron_kd.posttrain.steps import dp_info, dp_sum, finish_grads, run_microbatches
from megatron_kd.runtime import parallel


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

    total_steps: int = field(default=5000, metadata={DERIVED: "train.train_iters"})
    """Optimizer steps (reference --total-iters 5000); the command sets it from train.train_iters."""
    seed: int = field(default=10, metadata={DERIVED: "train.seed"})
    """Seed of prompt order, sampling noise and mini-batch shuffles; the command sets it from train.seed."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout collection: prompts per round, sampling, teacher mixing (alpha)."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Rewards and advantages (discount, length normalisation, whitening)."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The PPO update on each round."""
    lm: LMTermConfig = field(default_factory=LMTermConfig)
    """The pre-training term L_PT."""
    optim: MiniLLMOptimConfig = field(default_factory=MiniLLMOptimConfig)
    """Optimizer and LR schedule (the shared `optim` keys; MiniLLM reference defaults)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out ROUGE-L / reverse-KL evaluation (with eval_data)."""


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
    if parallel.pp_group().world_size > 1:
        raise ValueError("MiniLLM training supports tensor and data parallelism; set parallel.pipeline_parallel=1")


class RolloutSource:
    """Batch source: rounds of rollouts, each yielding ``ppo.epochs`` epochs of shuffled PPO mini-batches.

    Each item is ``{"rollouts", "idx", "round", "round_stats"}`` (``round_stats`` on a round's first
    mini-batch only). :meth:`state` / :meth:`load_state` are this rank's checkpointed position.
    """

    def __init__(self, student, teacher, cfg: TrainLoopConfig, tokenizer, data, vocab_size: int, lm_chunks=None):
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.tok, self.data, self.vocab_size, self.lm_chunks = tokenizer, data, vocab_size, lm_chunks
        self.dp_rank, self.dp_size, _ = dp_info()
        validate_loop_config(cfg, self.dp_size)
        self.stream = PromptStream(len(data), cfg.seed)
        self.round, self.pos = 0, 0
        self.rollouts: Rollouts | None = None

    def collect_round(self) -> Rollouts:
        """Rollouts of round ``self.round`` on this rank."""
        c = self.cfg.rollout
        local = c.num_rollouts // self.dp_size
        start = self.round * c.num_rollouts + self.dp_rank * local
        idx, ids = self.stream.slice(start, local)
        prompts = [self.data.prompt(i) for i in idx]
        return collect(self.student, self.teacher, prompts, ids, c, self.cfg.advantage, self.vocab_size,
                       self.tok.eod, self.tok.pad, self.cfg.seed)

    def round_stats(self, r: Rollouts) -> dict[str, float]:
        """Rollout diagnostics summed over DP: mean reward per token, response length, weights."""
        t = dp_sum(torch.stack([r.rewards.sum() / self.cfg.advantage.reward_scale, r.mask.sum(),
                                 r.response_lengths.double().sum(), torch.tensor(float(len(r))),
                                 (r.weights * r.mask).sum()]))
        return {"rollout_reward_per_token": (t[0] / t[1].clamp(min=1)).item(),
                "rollout_response_length": (t[2] / t[3]).item(),
                "rollout_importance_weight": (t[4] / t[1].clamp(min=1)).item()}

    def plan(self) -> list[list[int]]:
        """The current round's mini-batches (row indices on this rank), all epochs in order."""
        c = self.cfg
        local_batch = c.ppo.batch_size // self.dp_size
        return [idx for epoch in range(c.ppo.epochs)
                for idx in iterate_minibatches(len(self.rollouts), local_batch, c.seed + self.dp_rank,
                                               self.round * c.ppo.epochs + epoch)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            first = self.rollouts is None
            if first:
                self.rollouts, self.pos = self.collect_round(), 0
            plan = self.plan()
            while self.pos < len(plan):
                item = {"rollouts": self.rollouts, "idx": plan[self.pos], "round": self.round,
                        "round_stats": self.round_stats(self.rollouts) if first and self.pos == 0 else None}
                self.pos += 1
                yield item
            self.rollouts, self.round = None, self.round + 1

    def state(self) -> dict[str, Any]:
        """This rank's position: round, mini-batches done in it, its rollouts, L_PT chunks drawn."""
        return {"round": self.round, "pos": self.pos, "rollouts": self.rollouts,
                "lm_drawn": self.lm_chunks.drawn if self.lm_chunks is not None else 0}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (a resumed run continues with the same mini-batch)."""
        if not state:
            return
        self.round, self.pos, self.rollouts = int(state["round"]), int(state["pos"]), state["rollouts"]
        if self.lm_chunks is not None:
            self.lm_chunks.drawn = int(state.get("lm_drawn", 0))


class PPOStep:
    """TrainStep: one PPO mini-batch (+ L_PT micro-batches) of forward/backward into the student's grads."""

    def __init__(self, student, teacher, cfg: TrainLoopConfig, vocab_size: int, lm_chunks=None):
        if cfg.lm.coef > 0 and cfg.lm.data and lm_chunks is None:
            raise ValueError("lm.data is set but no pre-training chunks were given to the step")
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.vocab_size, self.lm_chunks = vocab_size, lm_chunks
        self.device = next(student.parameters()).device

    def _ppo_loss(self, batch, teacher_logits, output, n_tokens):
        p = self.cfg.ppo
        logits = mask_padded_vocab(output.float(), self.vocab_size)
        mask = batch["mask"]
        per_tok, parts = L.minillm_token_loss(
            logits, teacher_logits if p.single_step else None, batch["labels"], batch["log_behaviour"],
            batch["advantages"], batch["weights"], p.clip, p.single_step_coef, p.single_step_importance_weight)
        total = (per_tok * mask).sum()
        stats = {"objective": total, "pg_loss": (parts["pg"] * mask).sum(), "clip_frac": (parts["clipped"] * mask).sum(),
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
        total = lm.coef * (per_tok * mask).sum()
        stats["lm_objective"] = total.detach()
        return total / n_tokens, torch.tensor(1), {k: v.double() for k, v in stats.items()}

    def __call__(self, item: dict[str, Any]) -> dict[str, float]:
        p, lm = self.cfg.ppo, self.cfg.lm
        rollouts, idx = item["rollouts"], item["idx"]
        self.student.train()
        micro = [rollouts.select(idx[i: i + p.micro_batch_size]) for i in range(0, len(idx), p.micro_batch_size)]
        n_tok = dp_sum(sum(b["mask"].sum() for b in micro)).clamp(min=1).float().to(self.device)
        s = run_microbatches(self.student, micro, partial(self._ppo_loss, n_tokens=n_tok),
                             self.teacher if p.single_step else None, self.vocab_size)
        tokens = max(s.get("tokens", 0.0), 1.0)
        total = s.get("objective", 0.0) / tokens
        stats = {"pg_loss": s.get("pg_loss", 0.0) / tokens, "clip_frac": s.get("clip_frac", 0.0) / tokens,
                 "ratio": s.get("ratio", 0.0) / tokens}
        if p.single_step:
            stats["single_step_kl"] = s["single_step_kl"] / tokens
        if self.lm_chunks is not None and lm.coef > 0:
            lm_batches = [self.lm_chunks.next_batch(lm.micro_batch_size) for _ in micro]
            n_lm = dp_sum(sum(b["loss_mask"].sum() for b in lm_batches)).clamp(min=1).float().to(self.device)
            s = run_microbatches(self.student, lm_batches, partial(self._lm_loss, n_tokens=n_lm),
                                 self.teacher if lm.kd_ratio > 0 else None, self.vocab_size)
            lm_tokens = max(s["lm_tokens"], 1.0)
            total += s["lm_objective"] / lm_tokens
            stats["lm_ce"] = s["lm_ce"] / lm_tokens
            if lm.kd_ratio > 0:
                stats["lm_kd"] = s["lm_kd"] / lm_tokens
        finish_grads(self.student)
        out = {"total": total, **stats, "round": item["round"]}
        if item.get("round_stats"):
            out.update(item["round_stats"])
        return out
