"""MiniLLM rollouts: teacher-mixed sampling from the student, teacher scoring, advantages.

Per-token arrays use *label coordinates*: a rollout sequence ``tokens`` [L] is trained as input
``tokens[:-1]`` with labels ``tokens[1:]``, so every per-token quantity has length L-1 and the
response occupies label positions ``P-1 .. P+R-2`` (P prompt, R response tokens, EOS included).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_kd.posttrain import losses as L
from megatron_kd.posttrain.generation import GenerationConfig, forward_logits, generate
from megatron_kd.posttrain.sampling import SamplingConfig


@dataclass
class RolloutConfig:
    """Sampling of the experience the student learns from (per round)."""

    num_rollouts: int = 256
    """Rollouts per round, over all data-parallel ranks (the reference's --num-rollouts)."""
    chunk_size: int = 16
    """Prompts per generate() call on one rank (the reference's --chunk-size)."""
    max_prompt_length: int = 256
    """Prompts are truncated from the left to this many tokens."""
    max_new_tokens: int = 256
    """Longest response (reference: max length 512 with prompts <= 256)."""
    temperature: float = 1.0
    """Sampling temperature (reference 1.0)."""
    top_k: int = 0
    """top-k filter (reference 0 = off)."""
    top_p: float = 1.0
    """top-p filter (reference 1.0 = off)."""
    mix_alpha: float = 0.2
    """Teacher-mixed sampling weight alpha: draw from (1-alpha) q + alpha p (paper: 0.2)."""
    use_cache: bool = True
    """KV-cache decoding."""


@dataclass
class AdvantageConfig:
    """How token rewards become advantages (defaults = the reference code; see docs/minillm.md)."""

    gamma: float = 0.95
    """Discount of the long-term return (reference default 0.95; the paper's formula has 1)."""
    include_current: bool = True
    """Return at t includes r_t (reference code); False = the paper's R_{t+1}."""
    length_norm: bool = True
    """Divide each return by the number of response tokens it sums."""
    whiten: bool = True
    """Whiten advantages (masked, over the whole round and all DP ranks)."""
    reward_scale: float = 2.0
    """Rewards are multiplied by this (reference --reward-scaling 0.5 divides by 0.5); whitening
    makes it irrelevant unless ``whiten`` is off."""


@dataclass
class Rollouts:
    """One round of experience on this rank (tensors on CPU, [n, L] / [n, L-1])."""

    tokens: torch.Tensor
    mask: torch.Tensor
    logq: torch.Tensor
    logp: torch.Tensor
    log_behaviour: torch.Tensor
    weights: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    timings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """A training micro-batch: rows ``idx`` trimmed to their longest sequence."""
        rows = torch.as_tensor(idx)
        width = int((self.prompt_lengths[rows] + self.response_lengths[rows]).max())
        out = {"tokens": self.tokens[rows, : width - 1], "labels": self.tokens[rows, 1:width]}
        for k in ("mask", "logq", "logp", "log_behaviour", "weights", "advantages"):
            out[k] = getattr(self, k)[rows, : width - 1]
        return out


def response_mask(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[b, width] label-coordinate mask of the response tokens."""
    j = torch.arange(width)[None, :]
    start = (prompt_lengths - 1)[:, None]
    return ((j >= start) & (j < start + response_lengths[:, None])).float()


def token_scores(student, teacher, tokens: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(label), log p(label)) [b, L-1] from full no-grad forwards (last PP stage, else zeros)."""
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    out = []
    for m in (student, teacher):
        logits = forward_logits(m, inp, vocab_size)
        out.append(torch.zeros(labels.shape, dtype=torch.float64) if logits is None
                   else L.token_log_probs(logits, labels).double().cpu())
    return out[0], out[1]


def _pad_cat(parts: list[torch.Tensor], width: int, value=0) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=value) for p in parts])


def collect(student, teacher, prompts: list[list[int]], sample_ids: list[int], cfg: RolloutConfig,
            adv: AdvantageConfig, vocab_size: int, eos_id: int | None, pad_id: int, seed: int) -> Rollouts:
    """Generate, score and compute advantages for this rank's ``prompts`` (collective over TP/PP/DP)."""
    samp = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    gcfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, sampling=samp, eos_id=eos_id, pad_id=pad_id,
                            seed=seed, use_cache=cfg.use_cache)
    toks, plen, rlen, logq, logp = [], [], [], [], []
    t_gen = t_score = 0.0
    for s in range(0, len(prompts), cfg.chunk_size):
        chunk = [p[-cfg.max_prompt_length:] for p in prompts[s: s + cfg.chunk_size]]
        ids = torch.tensor(sample_ids[s: s + cfg.chunk_size])
        t0 = time.perf_counter()
        out = generate(student, chunk, gcfg, vocab_size, teacher=teacher, mix_alpha=cfg.mix_alpha, sample_ids=ids)
        t1 = time.perf_counter()
        lq, lp = token_scores(student, teacher, out.tokens, vocab_size)
        t_score += time.perf_counter() - t1
        t_gen += t1 - t0
        toks.append(out.tokens.cpu())
        plen.append(out.prompt_lengths.cpu())
        rlen.append(out.response_lengths.cpu())
        logq.append(lq)
        logp.append(lp)
    width = max(t.shape[1] for t in toks)
    tokens = _pad_cat(toks, width, pad_id)
    plen, rlen = torch.cat(plen), torch.cat(rlen)
    mask = response_mask(plen, rlen, width - 1)
    logq = _pad_cat(logq, width - 1) * mask
    logp = _pad_cat(logp, width - 1) * mask
    log_beh = L.mixture_log_prob(logq, logp, cfg.mix_alpha) * mask
    weights = torch.exp(logq - log_beh) * mask
    rewards = L.token_rewards(logp, logq, adv.reward_scale) * mask
    advantages = L.normalized_returns(rewards, mask, adv.gamma, adv.include_current, adv.length_norm)
    if adv.whiten:
        group = parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None
        advantages = L.whiten(advantages, mask, group)
    return Rollouts(tokens=tokens, mask=mask, logq=logq, logp=logp, log_behaviour=log_beh, weights=weights,
                    rewards=rewards, advantages=advantages, prompt_lengths=plen, response_lengths=rlen,
                    timings={"generate_s": t_gen, "score_s": t_score})


class PromptStream:
    """Endless shuffled stream of prompt indices; round r on DP rank k gets a fixed slice.

    Stream position g is also the sequence id that keys the sampling noise, so the experience does
    not depend on the DP layout. Epoch e of the data uses permutation ``rng([seed, e])``.
    """

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("the prompt dataset is empty")
        self.n, self.seed = num_prompts, seed
        self._perms: dict[int, np.ndarray] = {}

    def _at(self, g: int) -> int:
        e, i = divmod(g, self.n)
        if e not in self._perms:
            self._perms = {e: np.random.default_rng([self.seed, e]).permutation(self.n)}
        return int(self._perms[e][i])

    def slice(self, start: int, count: int) -> tuple[list[int], list[int]]:
        """(prompt indices, stream positions) for stream positions start..start+count-1."""
        pos = list(range(start, start + count))
        return [self._at(g) for g in pos], pos
