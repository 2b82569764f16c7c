"""Held-out evaluation of an instruction-following student against its teacher.

* ``rouge_l``: mean ROUGE-L F1 (x100) of greedy responses against the gold responses
  (``megatron_kd.evaluation.rouge``, stemming on as in MiniLLM's evaluation).
* ``reverse_kl``: the exact sequence-level reverse KL estimate E_{y~q}[sum_t KL(q(.|y<t) || p(.|y<t))]
  on student samples (temperature 1, fixed seed): each per-position KL is summed exactly over the
  vocabulary (vocab-parallel), only the trajectory expectation is sampled.
* ``reverse_kl_per_token``: the same KLs averaged over response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kd.posttrain import losses as L
from megatron_kd.posttrain.generation import GenerationConfig, forward_logits, generate
from megatron_kd.posttrain.rollout import response_mask
from megatron_kd.posttrain.sampling import SamplingConfig


@dataclass
class EvalConfig:
    """Held-out evaluation settings."""

    num_prompts: int = 500
    """Held-out prompts evaluated (the first N of the eval set, split over DP ranks)."""
    max_new_tokens: int = 256
    """Longest generated response."""
    batch_size: int = 16
    """Prompts per generate() call on one rank."""
    max_prompt_length: int = 256
    """Prompts truncated from the left to this many tokens."""
    seed: int = 1234
    """Seed of the sampled generations used for the reverse KL."""


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1] with MiniLLM's scorer settings (rouge-score tokenisation, Porter stemming)."""
    from megatron_kd.evaluation.rouge import rouge_l_max

    return float(rouge_l_max(prediction, [reference], use_stemmer=True))


def _dp() -> tuple[int, int, object]:
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
            parallel_state.get_data_parallel_group())


def reverse_kl_of_samples(student, teacher, out, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence sum of exact KL(q||p) over the response [b], response lengths [b])."""
    tokens = out.tokens
    s = forward_logits(student, tokens[:, :-1], vocab_size)
    t = forward_logits(teacher, tokens[:, :-1], vocab_size)
    mask = response_mask(out.prompt_lengths.cpu(), out.response_lengths.cpu(), tokens.shape[1] - 1)
    if s is None:
        return torch.zeros(tokens.shape[0], dtype=torch.float64), out.response_lengths.cpu()
    kl = L.single_step_reverse_kl(s, t).detach().double().cpu()
    return (kl * mask).sum(-1), out.response_lengths.cpu()


def evaluate(student, teacher, dataset, tokenizer, cfg: EvalConfig, vocab_size: int) -> dict[str, float]:
    """ROUGE-L (greedy) and exact reverse KL (sampled) on the first ``cfg.num_prompts`` examples."""
    dp_rank, dp_size, group = _dp()
    n = min(cfg.num_prompts, len(dataset))
    mine = list(range(dp_rank, n, dp_size))
    totals = torch.zeros(5, dtype=torch.float64)  # rouge sum, count, kl sum, kl tokens, greedy len
    greedy = GenerationConfig(max_new_tokens=cfg.max_new_tokens, sampling=SamplingConfig(greedy=True),
                              eos_id=tokenizer.eod, pad_id=tokenizer.pad)
    sampled = GenerationConfig(max_new_tokens=cfg.max_new_tokens, sampling=SamplingConfig(temperature=1.0),
                               eos_id=tokenizer.eod, pad_id=tokenizer.pad, seed=cfg.seed)
    for s in range(0, len(mine), cfg.batch_size):
        idx = mine[s: s + cfg.batch_size]
        prompts = [dataset.prompt(i)[-cfg.max_prompt_length:] for i in idx]
        out = generate(student, prompts, greedy, vocab_size)
        for i, resp in zip(idx, out.responses()):
            gold = dataset.reply(i) if hasattr(dataset, "reply") else dataset.response(i)  # a conversation: turn 1
            ref = [t for t in gold if t != tokenizer.eod]
            hyp = [t for t in resp if t != tokenizer.eod]
            totals[0] += rouge_l(tokenizer.decode(hyp), tokenizer.decode(ref))
            totals[1] += 1
            totals[4] += len(resp)
        out = generate(student, prompts, sampled, vocab_size, sample_ids=torch.tensor(idx))
        kl, lens = reverse_kl_of_samples(student, teacher, out, vocab_size)
        totals[2] += kl.sum()
        totals[3] += lens.sum()
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # KL sums live on the last stage only.
        dist.all_reduce(totals, op=dist.ReduceOp.MAX, group=parallel_state.get_pipeline_model_parallel_group())
    if group is not None and dp_size > 1:
        dist.all_reduce(totals, group=group)
    count = max(totals[1].item(), 1)
    return {"rouge_l": 100.0 * totals[0].item() / count, "reverse_kl": totals[2].item() / count,
            "reverse_kl_per_token": totals[2].item() / max(totals[3].item(), 1),
            "greedy_length": totals[4].item() / count, "num_prompts": int(totals[1].item())}
