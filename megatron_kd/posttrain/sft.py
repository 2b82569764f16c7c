"""SFT and word-level KD on the shared Trainer: an instruction batch source + the distill forward step.

* SFT: next-token cross entropy on the response tokens (response-only loss mask), reported as ``lm``.
* Word-level KD: ``(1 - kd_ratio) * CE + kd_ratio * KD`` per response token, KD = forward KL
  KL(p || q) from ``megatron_kd.losses.kd_loss`` (vocab-parallel; same gradient as the MiniLLM
  reference's soft cross entropy; kd_ratio 0.5 there). Reported as ``lm``, ``kd`` and ``total``.
* SeqKD: SFT on teacher samples (``megatron-kd generate``, :mod:`megatron_kd.posttrain.seqkd`).

:class:`InstructionBatches` is the batch source (epochs of shuffled examples, each DP rank its
slice of every global batch; step ``k``'s batch depends only on ``k``, so a resumed run continues
exactly), :class:`SFTStep` the :class:`megatron_kd.training.loop.TrainStep`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch

from megatron_kd.config import DERIVED
from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.posttrain import losses as L
from megatron_kd.posttrain.config import PostTrainOptimConfig
from megatron_kd.posttrain.data import iterate_minibatches, sft_batch
from megatron_kd.posttrain.generation import forward_logits
from megatron_kd.posttrain.steps import dp_info, dp_sum, finish_grads, run_microbatches


@dataclass
class SFTConfig:
    """Supervised fine-tuning (optionally with word-level KD) on instruction data."""

    epochs: int = 3
    """Passes over the training data (reference: 3 for the MiniLLM SFT stage, 10-20 for baselines)."""
    total_steps: int = field(default=0, metadata={DERIVED: "train.train_iters"})
    """Stop after this many optimizer steps (0 = run all epochs); the command sets it from train.train_iters."""
    batch_size: int = 32
    """Examples per optimizer step over all DP ranks."""
    micro_batch_size: int = 8
    """Examples per forward/backward on one rank."""
    max_length: int = 512
    """Prompt+response tokens kept per example (prompts truncated from the left first)."""
    kd_ratio: float = 0.0
    """Word-level KD weight: loss = (1 - kd_ratio) CE + kd_ratio KL(p || q); needs a teacher."""
    kd_temperature: float = 1.0
    """Temperature of the KD term."""
    seed: int = field(default=1, metadata={DERIVED: "train.seed"})
    """Shuffling seed; the command sets it from train.seed."""
    optim: PostTrainOptimConfig = field(default_factory=PostTrainOptimConfig)
    """Optimizer and LR schedule (the shared `optim` keys)."""


def truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep at most ``max_length`` tokens: the prompt is cut from the left first, then the response."""
    keep_p = max(1, min(len(prompt), max_length - len(response)))
    prompt = prompt[-keep_p:]
    return prompt, response[: max(max_length - len(prompt), 1)]


def truncate_example(prompt: list[int], response: list[int], mask: list[int] | None, max_length: int
                     ) -> tuple[list[int], list[int], list[int] | None]:
    """:func:`truncate` for an example that may carry a response mask (a multi-turn conversation): the
    prompt is cut from the left only as far as the first assistant turn needs, then the response keeps
    the assistant turns that fit whole (:func:`megatron_kd.posttrain.chat.cut_turns`; the first turn is
    cut mid-turn only when it alone does not fit)."""
    if mask is None:
        return (*truncate(prompt, response, max_length), None)
    from megatron_kd.posttrain.chat import cut_turns, turn_ends

    keep_p = max(1, min(len(prompt), max_length - turn_ends(mask)[0]))
    prompt = prompt[-keep_p:]
    keep = max(cut_turns(response, mask, max_length - len(prompt)), 1)
    return prompt, response[:keep], mask[:keep]


def check_batches(cfg: SFTConfig, dp_size: int, num_examples: int | None) -> int:
    """One-line ``ValueError`` unless ``sft.batch_size`` splits into ``dp_size`` ranks of whole
    micro-batches (and, with ``num_examples``, the training data holds one batch); returns the run's
    optimizer steps (``total_steps``, or ``epochs`` passes)."""
    for name in ("batch_size", "micro_batch_size", "max_length") + (() if cfg.total_steps else ("epochs",)):
        if getattr(cfg, name) < 1:
            raise ValueError(f"sft.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.batch_size % dp_size or (cfg.batch_size // dp_size) % cfg.micro_batch_size:
        raise ValueError(f"sft.batch_size={cfg.batch_size} must split into DP={dp_size} ranks of "
                         f"whole micro-batches of {cfg.micro_batch_size}")
    if num_examples is None:
        return cfg.total_steps
    if num_examples < cfg.batch_size:
        raise ValueError(f"the training data has {num_examples} examples, fewer than sft.batch_size={cfg.batch_size}")
    return cfg.total_steps or cfg.epochs * (num_examples // cfg.batch_size)


class InstructionBatches:
    """Batch source: step ``k`` -> this rank's micro-batches of global batch ``k`` (epochs of shuffles)."""

    def __init__(self, data, cfg: SFTConfig, pad_id: int, training: bool = True):
        self.data, self.cfg, self.pad_id = data, cfg, pad_id
        self.dp_rank, self.dp_size, _ = dp_info()
        self.total_steps = check_batches(cfg, self.dp_size, len(data) if training else None)
        self.steps_per_epoch = len(data) // cfg.batch_size

    def micro_batches(self, idx: list[int]) -> list[dict[str, torch.Tensor]]:
        """Micro-batches (response-only loss masks; a conversation's: its assistant turns) of the examples ``idx``."""
        out, m = [], self.cfg.micro_batch_size
        mask_of = getattr(self.data, "response_mask", lambda i: None)
        for s in range(0, len(idx), m):
            ex = [truncate_example(self.data.prompt(i), self.data.response(i), mask_of(i), self.cfg.max_length)
                  for i in idx[s: s + m]]
            out.append(sft_batch([p for p, _, _ in ex], [r for _, r, _ in ex], self.pad_id,
                                 response_masks=[k for _, _, k in ex]))
        return out

    def iterator(self, start_step: int = 0) -> Iterator[list[dict[str, torch.Tensor]]]:
        """This rank's micro-batches for steps ``start_step``, ``start_step + 1``, ..."""
        local = self.cfg.batch_size // self.dp_size
        epoch, k = divmod(start_step, self.steps_per_epoch)
        while True:
            batches = list(iterate_minibatches(len(self.data), self.cfg.batch_size, self.cfg.seed, epoch))
            for idx in batches[k:]:
                yield self.micro_batches(idx[self.dp_rank * local:(self.dp_rank + 1) * local])
            epoch, k = epoch + 1, 0


class SFTStep:
    """TrainStep: cross entropy (+ word-level KD against ``teacher``) on the response tokens."""

    def __init__(self, student, cfg: SFTConfig, vocab_size: int, teacher=None):
        if cfg.kd_ratio > 0 and teacher is None:
            raise ValueError("sft.kd_ratio > 0 (word-level KD) needs a teacher: pass teacher=CKPT")
        self.student, self.cfg, self.vocab_size = student, cfg, vocab_size
        self.teacher = teacher if cfg.kd_ratio > 0 else None

    def loss(self, batch, teacher_logits, output, n_tokens):
        """Per-micro-batch loss (pre-normalised by the global token count) and summed stats."""
        logits = mask_padded_vocab(output.float(), self.vocab_size)
        mask = batch["loss_mask"]
        ce = -L.token_log_probs(logits, batch["labels"])
        per_tok = (1 - self.cfg.kd_ratio) * ce
        stats = {"lm": (ce.detach() * mask).sum(), "tokens": mask.sum()}
        if self.cfg.kd_ratio > 0:
            from megatron_kd.losses import kd_loss

            kd = kd_loss(logits, teacher_logits, kind="forward_kl", temperature=self.cfg.kd_temperature)
            per_tok = per_tok + self.cfg.kd_ratio * kd
            stats["kd"] = (kd.detach() * mask).sum()
        total = (per_tok * mask).sum()
        stats["total"] = total.detach()
        return total / n_tokens, torch.tensor(1), {k: v.double() for k, v in stats.items()}

    def __call__(self, micro: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        self.student.train()
        n_tok = dp_sum(sum(b["loss_mask"].sum() for b in micro)).clamp(min=1).float()
        n_tok = n_tok.to(next(self.student.parameters()).device)
        s = run_microbatches(self.student, micro, partial(self.loss, n_tokens=n_tok), self.teacher, self.vocab_size)
        finish_grads(self.student)
        tok = max(s["tokens"], 1.0)
        out = {"lm": s["lm"] / tok}
        if "kd" in s:
            out = {"total": s["total"] / tok, **out, "kd": s["kd"] / tok}
        out["tokens"] = s["tokens"]
        return out

    @torch.no_grad()
    def validation_loss(self, batches: InstructionBatches, max_examples: int = 1000) -> dict[str, float]:
        """``{"lm": mean response-token cross entropy}`` on ``batches.data`` (its first ``max_examples``), over DP."""
        n = min(len(batches.data), max_examples)
        mine = list(range(batches.dp_rank, n, batches.dp_size))
        total = torch.zeros(2, dtype=torch.float64)
        self.student.eval()
        for s in range(0, len(mine), self.cfg.micro_batch_size):
            b = batches.micro_batches(mine[s: s + self.cfg.micro_batch_size])[0]
            logits = forward_logits(self.student, b["tokens"], self.vocab_size)
            if logits is not None:
                ce = -L.token_log_probs(logits, b["labels"]).double().cpu()
                total += torch.stack([(ce * b["loss_mask"]).sum(), b["loss_mask"].sum().double()])
        self.student.train()
        total = dp_sum(total)
        return {"lm": (total[0] / total[1].clamp(min=1)).item()}
