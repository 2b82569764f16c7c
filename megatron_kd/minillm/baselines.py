"""MiniLLM's baselines: SFT, word-level KD and SeqKD data generation.

* SFT: next-token cross entropy on the gold responses (response-only loss mask).
* Word-level KD: ``(1 - kd_ratio) * CE + kd_ratio * KD`` per response token, KD = forward KL
  KL(p || q) from ``megatron_kd.losses.kd_loss`` (vocab-parallel; same gradient as the reference's
  soft cross entropy). The reference uses kd_ratio 0.5.
* SeqKD: the teacher samples responses for the training prompts (:func:`generate_jsonl`, T=1,
  top-p 1 by default) and the student is fine-tuned on them with SFT.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from megatron_kd.minillm import losses as L
from megatron_kd.minillm.data import InstructionTemplate, encode_records, iterate_minibatches, read_instruction_jsonl, sft_batch
from megatron_kd.minillm.generation import GenerationConfig, generate
from megatron_kd.minillm.optim import OptimConfig, build_optimizer, current_lr, optimizer_step, zero_grads
from megatron_kd.minillm.steps import dp_info, dp_sum, run_microbatches
from megatron_kd.models.builder import mask_padded_vocab
from megatron_kd.utils.io import atomic_write


@dataclass
class SFTConfig:
    """Supervised fine-tuning (optionally with word-level KD) on instruction data."""

    epochs: int = 3
    """Passes over the training data (reference: 3 for the MiniLLM SFT stage, 10-20 for baselines)."""
    total_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
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
    seed: int = 1
    """Shuffling seed."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, min_lr=0.0, warmup_steps=0,
                                                                   schedule="cosine", weight_decay=1e-2))


def _truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    keep_p = max(1, min(len(prompt), max_length - len(response)))
    prompt = prompt[-keep_p:]
    return prompt, response[: max(max_length - len(prompt), 1)]


class SFTTrainer:
    """SFT / word-level KD of a DDP-wrapped ``student`` on an instruction dataset."""

    def __init__(self, student, cfg: SFTConfig, data, pad_id: int, vocab_size: int, teacher=None,
                 optimizer=None, scheduler=None):
        if cfg.kd_ratio > 0 and teacher is None:
            raise ValueError("sft.kd_ratio > 0 (word-level KD) needs a teacher: pass --teacher")
        self.student, self.cfg, self.data, self.teacher = student, cfg, data, teacher
        self.pad_id, self.vocab_size = pad_id, vocab_size
        self.dp_rank, self.dp_size, _ = dp_info()
        if cfg.batch_size % self.dp_size or (cfg.batch_size // self.dp_size) % cfg.micro_batch_size:
            raise ValueError(f"sft.batch_size={cfg.batch_size} must split into DP={self.dp_size} ranks of "
                             f"whole micro-batches of {cfg.micro_batch_size}")
        self.steps_per_epoch = len(data) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training data has {len(data)} examples, fewer than sft.batch_size={cfg.batch_size}")
        self.total_steps = cfg.total_steps or cfg.epochs * self.steps_per_epoch
        if optimizer is None:
            optimizer, scheduler = build_optimizer(student, cfg.optim, self.total_steps)
        self.opt, self.sched = optimizer, scheduler
        self.step = 0

    def _loss(self, batch, teacher_logits, output, n_tokens):
        logits = mask_padded_vocab(output.float(), self.vocab_size)
        mask = batch["loss_mask"]
        ce = -L.token_log_probs(logits, batch["labels"])
        per_tok = (1 - self.cfg.kd_ratio) * ce
        stats = {"ce": (ce.detach() * mask).sum(), "tokens": mask.sum()}
        if self.cfg.kd_ratio > 0:
            from megatron_kd.losses import kd_loss

            kd = kd_loss(logits, teacher_logits, kind="forward_kl", temperature=self.cfg.kd_temperature)
            per_tok = per_tok + self.cfg.kd_ratio * kd
            stats["kd"] = (kd.detach() * mask).sum()
        return (per_tok * mask).sum() / n_tokens, torch.tensor(1), {k: v.double() for k, v in stats.items()}

    def batches(self, idx: list[int]) -> list[dict[str, torch.Tensor]]:
        """Micro-batches (response-only loss masks) of the examples ``idx``."""
        out = []
        m = self.cfg.micro_batch_size
        for s in range(0, len(idx), m):
            pairs = [_truncate(self.data.prompt(i), self.data.response(i), self.cfg.max_length) for i in idx[s: s + m]]
            out.append(sft_batch([p for p, _ in pairs], [r for _, r in pairs], self.pad_id))
        return out

    def train_step(self, idx: list[int]) -> dict[str, float]:
        """One optimizer step on this rank's examples ``idx``."""
        self.student.train()
        zero_grads(self.student, self.opt)
        micro = self.batches(idx)
        n_tok = dp_sum(sum(b["loss_mask"].sum() for b in micro)).clamp(min=1).float()
        n_tok = n_tok.to(next(self.student.parameters()).device)
        s = run_microbatches(self.student, micro, partial(self._loss, n_tokens=n_tok),
                             self.teacher if self.cfg.kd_ratio > 0 else None, self.vocab_size)
        ok, gnorm = optimizer_step(self.student, self.opt, self.sched)
        self.step += 1
        tok = max(s["tokens"], 1.0)
        stats = {"ce": s["ce"] / tok, "lr": current_lr(self.opt), "grad_norm": gnorm if gnorm is not None else float("nan")}
        if "kd" in s:
            stats["kd"] = s["kd"] / tok
        return stats

    def train(self, on_step=None) -> None:
        """Run ``total_steps`` optimizer steps (epochs of shuffled data, each rank its slice)."""
        local = self.cfg.batch_size // self.dp_size
        epoch = 0
        while self.step < self.total_steps:
            for idx in iterate_minibatches(len(self.data), self.cfg.batch_size, self.cfg.seed, epoch):
                stats = self.train_step(idx[self.dp_rank * local:(self.dp_rank + 1) * local])
                if on_step is not None:
                    on_step(self.step, stats)
                if self.step >= self.total_steps:
                    break
            epoch += 1

    @torch.no_grad()
    def validation_loss(self, data, max_examples: int = 1000) -> float:
        """Mean response-token cross entropy on ``data`` (its first ``max_examples``), over DP."""
        n = min(len(data), max_examples)
        mine = list(range(self.dp_rank, n, self.dp_size))
        total = torch.zeros(2, dtype=torch.float64)
        self.student.eval()
        saved, self.data = self.data, data
        try:
            for s in range(0, len(mine), self.cfg.micro_batch_size):
                b = self.batches(mine[s: s + self.cfg.micro_batch_size])[0]
                from megatron_kd.minillm.generation import forward_logits

                logits = forward_logits(self.student, b["tokens"], self.vocab_size)
                if logits is not None:
                    ce = -L.token_log_probs(logits, b["labels"]).double().cpu()
                    total += torch.stack([(ce * b["loss_mask"]).sum(), b["loss_mask"].sum().double()])
        finally:
            self.data = saved
        total = dp_sum(total)
        return (total[0] / total[1].clamp(min=1)).item()


def generate_jsonl(model, source_jsonl: str | os.PathLike, output_jsonl: str | os.PathLike, tokenizer,
                   gen: GenerationConfig, vocab_size: int, template: InstructionTemplate | None = None,
                   max_prompt_length: int = 256, batch_size: int = 16, limit: int | None = None,
                   progress=None) -> dict[str, Any]:
    """SeqKD data: ``model`` answers every prompt of ``source_jsonl``; write the records with the
    generated ``response`` (the gold one kept as ``gold_response``) to ``output_jsonl``.

    Collective over TP/PP/DP: each DP rank answers its share, rank 0 writes the file atomically.
    Returns a small summary (records, mean response tokens).
    """
    import torch.distributed as dist

    from megatron_kd.runtime.distributed import is_main_process

    template = template or InstructionTemplate()
    records = read_instruction_jsonl(source_jsonl)[:limit]
    prompts, _ = encode_records(records, tokenizer, template, max_prompt_length)
    dp_rank, dp_size, group = dp_info()
    mine = list(range(dp_rank, len(records), dp_size))
    answers: dict[int, list[int]] = {}
    for s in range(0, len(mine), batch_size):
        idx = mine[s: s + batch_size]
        out = generate(model, [prompts[i] for i in idx], gen, vocab_size, sample_ids=torch.tensor(idx))
        for i, resp in zip(idx, out.responses()):
            answers[i] = [t for t in resp if t != tokenizer.eod]
        if progress is not None:
            progress.update(len(idx) * dp_size)
    if dp_size > 1:
        parts: list = [None] * dp_size
        dist.all_gather_object(parts, answers, group=group)
        answers = {k: v for p in parts for k, v in p.items()}
    lengths = [len(answers[i]) for i in range(len(records))]
    if is_main_process():
        with atomic_write(output_jsonl, "w", encoding="utf-8") as fh:
            for i, rec in enumerate(records):
                out_rec = {k: v for k, v in rec.items() if k != "response"}
                out_rec["response"] = tokenizer.decode(answers[i])
                out_rec["gold_response"] = rec.get("response", "")
                fh.write(json.dumps(out_rec, ensure_ascii=False) + "\n")
    return {"records": len(records), "mean_response_tokens": sum(lengths) / max(len(lengths), 1)}
