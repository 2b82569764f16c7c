"""On-policy neighbours of MiniLLM on the shared Trainer: GKD and DistiLLM = a response source + their losses.

Both train with a per-token divergence between teacher and student over the full vocabulary
(``megatron_kd.losses.kd_loss``, vocab-parallel) on the response tokens of a batch whose
*responses* come from one of several sources, decided per optimizer step (identically on all ranks):

* **GKD** (Agarwal et al. 2024; TRL ``GKDTrainer`` defaults): with probability ``lmbda`` the student
  samples the responses (temperature ``temperature``), else the gold responses are used (or teacher
  samples with ``seq_kd``). Loss: generalised JSD with ``beta`` at ``temperature`` (beta=0 is forward
  KL, beta=1 reverse KL, as TRL defines the endpoints).
* **DistiLLM** (Ko et al. 2024; ``distillm/finetune.py``): skew KL (``skl``) or skew reverse KL
  (``srkl``) with ``skew_alpha``; *adaptive off-policy* data: with probability
  ``thr * (1 - step / total)`` the student generates fresh responses (T=1) which also go into a
  replay buffer; otherwise with probability ``thr`` a batch is replayed from the buffer; otherwise
  gold data. ``thr`` starts at ``init_threshold`` and rises by ``threshold_step`` whenever the
  validation loss rises by at least ``loss_eps`` between evaluations.

:class:`ResponseSource` is the batch source (step ``k``'s source draw and prompts depend only on
``k``; the replay buffer is this rank's ``rank_state``, the threshold the run's extra state),
:class:`DivergenceStep` the :class:`megatron_kd.training.loop.TrainStep`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Literal

import numpy as np
import torch

from megatron_kd.config import DERIVED
from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.posttrain.config import PostTrainOptimConfig
from megatron_kd.posttrain.data import sft_batch
from megatron_kd.posttrain.generation import GenerationConfig, forward_logits, generate
from megatron_kd.posttrain.rollout import PromptStream
from megatron_kd.posttrain.sampling import SamplingConfig
from megatron_kd.posttrain.sft import truncate
from megatron_kd.posttrain.steps import dp_info, dp_sum, finish_grads, run_microbatches


@dataclass
class OnPolicyConfig:
    """GKD / DistiLLM settings (defaults: TRL GKD and the DistiLLM scripts)."""

    method: Literal["gkd", "distillm"] = "gkd"
    """gkd | distillm."""
    total_steps: int = field(default=1000, metadata={DERIVED: "train.train_iters"})
    """Optimizer steps (DistiLLM's generation schedule spans them); the command sets it from train.train_iters."""
    batch_size: int = 32
    """Examples per optimizer step over all DP ranks."""
    micro_batch_size: int = 8
    """Examples per forward/backward on one rank."""
    max_prompt_length: int = 256
    """Prompts truncated from the left."""
    max_new_tokens: int = 128
    """Longest generated response (TRL GKD default 128)."""
    max_length: int = 512
    """Prompt+response tokens kept for gold/replayed examples."""
    seed: int = field(default=1, metadata={DERIVED: "train.seed"})
    """Seed of the data order, the source draws and the sampling noise; the command sets it from train.seed."""
    lmbda: float = 0.5
    """GKD: probability of a student-generated (on-policy) batch."""
    beta: float = 0.5
    """GKD: generalised-JSD interpolation (0 = forward KL, 1 = reverse KL, TRL's convention)."""
    temperature: float = 0.9
    """GKD: sampling and loss temperature (TRL default 0.9); DistiLLM samples at 1."""
    seq_kd: bool = False
    """GKD: use teacher samples instead of gold responses for the off-policy batches."""
    loss: Literal["skl", "srkl"] = "srkl"
    """DistiLLM: skl (skew forward KL) | srkl (skew reverse KL)."""
    skew_alpha: float = 0.1
    """DistiLLM: skew alpha."""
    init_threshold: float = 0.0
    """DistiLLM: initial student-generation threshold."""
    threshold_step: float = 0.1
    """DistiLLM: threshold increase when the validation loss rises."""
    loss_eps: float = 0.1
    """DistiLLM: validation-loss rise that triggers a threshold increase."""
    buffer_size: int = 1000
    """DistiLLM: replay buffer capacity (examples per rank)."""
    optim: PostTrainOptimConfig = field(default_factory=PostTrainOptimConfig)
    """Optimizer and LR schedule (the shared `optim` keys)."""

    def validate(self) -> None:
        """One-line ``ValueError`` on bad settings."""
        if self.method not in ("gkd", "distillm"):
            raise ValueError(f"onpolicy.method={self.method!r} must be gkd or distillm")
        if self.loss not in ("skl", "srkl"):
            raise ValueError(f"onpolicy.loss={self.loss!r} must be skl or srkl")
        for name in ("lmbda", "beta", "skew_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"onpolicy.{name}={getattr(self, name)} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"onpolicy.temperature={self.temperature} must be > 0")

    def check_batches(self, dp_size: int) -> None:
        """One-line ``ValueError`` unless ``batch_size`` splits into ``dp_size`` ranks of whole micro-batches."""
        for name in ("batch_size", "micro_batch_size", "max_new_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"onpolicy.{name}={getattr(self, name)} must be >= 1")
        if self.batch_size % dp_size or (self.batch_size // dp_size) % self.micro_batch_size:
            raise ValueError(f"onpolicy.batch_size={self.batch_size} must split into DP={dp_size} ranks of "
                             f"whole micro-batches of {self.micro_batch_size}")


def _reply(data, i: int) -> list[int]:
    """Gold response of example ``i``: a conversation's first assistant turn (what the student's samples for
    the same prompt stand in for)."""
    return data.reply(i) if hasattr(data, "reply") else data.response(i)


class ResponseSource:
    """Batch source: step ``k`` -> ``{"source", "pairs"}``: this rank's (prompt, response) pairs."""

    def __init__(self, student, teacher, cfg: OnPolicyConfig, data, tokenizer, vocab_size: int):
        cfg.validate()
        self.student, self.teacher, self.cfg, self.data = student, teacher, cfg, data
        self.tok, self.vocab_size = tokenizer, vocab_size
        self.dp_rank, self.dp_size, _ = dp_info()
        cfg.check_batches(self.dp_size)
        self.stream = PromptStream(len(data), cfg.seed)
        self.step = 0
        self.threshold = cfg.init_threshold
        self.buffer: list[tuple[list[int], list[int]]] = []
        self._last_valid: float | None = None
        self.source_counts = {"student": 0, "teacher": 0, "gold": 0, "replay": 0}

    def choose_source(self) -> str:
        """The response source of step ``self.step`` (same on every rank: seeded by the step)."""
        c = self.cfg
        u1, u2 = np.random.default_rng([c.seed, 7, self.step]).random(2)
        if c.method == "gkd":
            if u1 < c.lmbda:
                return "student"
            return "teacher" if c.seq_kd else "gold"
        if u1 < self.threshold * (1.0 - self.step / max(c.total_steps, 1)):
            return "student"
        if u2 < self.threshold and self.buffer:
            return "replay"
        return "gold"

    def _generate(self, model, prompts, ids, temperature) -> list[list[int]]:
        gen = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, sampling=SamplingConfig(temperature=temperature),
                               eos_id=self.tok.eod, pad_id=self.tok.pad, seed=self.cfg.seed)
        return generate(model, prompts, gen, self.vocab_size, sample_ids=torch.tensor(ids)).responses()

    def examples(self, source: str) -> list[tuple[list[int], list[int]]]:
        """This rank's (prompt, response) pairs for step ``self.step`` from ``source``."""
        c = self.cfg
        local = c.batch_size // self.dp_size
        start = self.step * c.batch_size + self.dp_rank * local
        if source == "replay":
            rng = np.random.default_rng([c.seed, 11, self.step, self.dp_rank])
            return [self.buffer[int(i)] for i in rng.integers(0, len(self.buffer), size=local)]
        idx, ids = self.stream.slice(start, local)
        prompts = [self.data.prompt(i)[-c.max_prompt_length:] for i in idx]
        if source == "gold":
            return [truncate(p, _reply(self.data, i), c.max_length) for p, i in zip(prompts, idx)]
        model = self.student if source == "student" else self.teacher
        temp = c.temperature if c.method == "gkd" else 1.0
        responses = self._generate(model, prompts, ids, temp)
        pairs = list(zip(prompts, responses))
        if c.method == "distillm" and source == "student":
            self.buffer.extend(pairs)
            del self.buffer[: max(len(self.buffer) - c.buffer_size, 0)]
        return pairs

    def next_item(self) -> dict[str, Any]:
        """The batch of step ``self.step`` (then advance)."""
        source = self.choose_source()
        pairs = self.examples(source)
        self.source_counts[source] += 1
        self.step += 1
        return {"source": source, "pairs": pairs, "threshold": self.threshold}

    def iterator(self, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """Batches of steps ``start_step``, ``start_step + 1``, ..."""
        self.step = start_step
        while True:
            yield self.next_item()

    def update_threshold(self, valid_loss: float) -> None:
        """DistiLLM's adaptive schedule: raise the threshold when the validation loss went up."""
        if self._last_valid is not None and valid_loss - self._last_valid >= self.cfg.loss_eps:
            self.threshold = min(1.0, self.threshold + self.cfg.threshold_step)
        self._last_valid = valid_loss

    def extra_state(self) -> dict[str, Any]:
        """Run-wide state (same on every rank): threshold, last validation loss, source counts."""
        return {"threshold": self.threshold, "last_valid": self._last_valid, "source_counts": dict(self.source_counts)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""
        if state:
            self.threshold, self._last_valid = float(state["threshold"]), state.get("last_valid")
            self.source_counts.update(state.get("source_counts") or {})

    def rank_state(self) -> dict[str, Any]:
        """This rank's replay buffer."""
        return {"buffer": list(self.buffer)}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`rank_state`."""
        self.buffer = list(state.get("buffer") or [])


class DivergenceStep:
    """TrainStep: the GKD / DistiLLM divergence on the response tokens of one step's pairs."""

    def __init__(self, student, teacher, cfg: OnPolicyConfig, pad_id: int, eod_id: int, vocab_size: int):
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.pad_id, self.eod_id, self.vocab_size = pad_id, eod_id, vocab_size

    def loss(self, batch, teacher_logits, output, n_tokens):
        """Per-micro-batch loss (pre-normalised by the global token count) and summed stats."""
        from megatron_kd.losses import kd_loss

        c = self.cfg
        logits = mask_padded_vocab(output.float(), self.vocab_size)
        mask = batch["loss_mask"]
        if c.method == "gkd":
            per_tok = kd_loss(logits, teacher_logits, kind="jsd", beta=c.beta, temperature=c.temperature,
                              loss_mask=mask)
        else:
            kind = "skew_forward_kl" if c.loss == "skl" else "skew_reverse_kl"
            per_tok = kd_loss(logits, teacher_logits, kind=kind, skew=c.skew_alpha, loss_mask=mask)
        total = (per_tok * mask).sum()
        return total / n_tokens, torch.tensor(1), {"loss": total.detach().double(), "tokens": mask.sum().double()}

    def __call__(self, item: dict[str, Any]) -> dict[str, float]:
        pairs, source, m = item["pairs"], item["source"], self.cfg.micro_batch_size
        self.student.train()
        micro = [sft_batch([p for p, _ in pairs[s: s + m]], [r or [self.eod_id] for _, r in pairs[s: s + m]],
                           self.pad_id) for s in range(0, len(pairs), m)]
        n_tok = dp_sum(sum(b["loss_mask"].sum() for b in micro)).clamp(min=1).float()
        n_tok = n_tok.to(next(self.student.parameters()).device)
        s = run_microbatches(self.student, micro, partial(self.loss, n_tokens=n_tok), self.teacher, self.vocab_size)
        finish_grads(self.student)
        return {"total": s["loss"] / max(s["tokens"], 1.0), "source_student": float(source == "student"),
                "source_replay": float(source == "replay"), "threshold": item["threshold"]}

    @torch.no_grad()
    def validation_loss(self, data, max_examples: int = 500) -> float:
        """Mean per-token divergence to the teacher on the gold responses of ``data`` (over DP)."""
        c = self.cfg
        dp_rank, dp_size, _ = dp_info()
        n = min(len(data), max_examples)
        mine = list(range(dp_rank, n, dp_size))
        total = torch.zeros(2, dtype=torch.float64)
        self.student.eval()
        for s in range(0, len(mine), c.micro_batch_size):
            idx = mine[s: s + c.micro_batch_size]
            pairs = [truncate(data.prompt(i)[-c.max_prompt_length:], _reply(data, i), c.max_length) for i in idx]
            b = sft_batch([p for p, _ in pairs], [r for _, r in pairs], self.pad_id)
            st = forward_logits(self.student, b["tokens"], self.vocab_size)
            te = forward_logits(self.teacher, b["tokens"], self.vocab_size)
            if st is not None:
                _, _, stats = self.loss(b, te, st, torch.tensor(1.0))
                total += torch.stack([stats["loss"].cpu(), stats["tokens"].cpu()])
        self.student.train()
        total = dp_sum(total)
        return (total[0] / total[1].clamp(min=1)).item()
