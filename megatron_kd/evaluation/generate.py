"""Minimal text generation for evaluation: greedy or temperature / top-k / top-p sampling.

No KV cache: every step re-runs the whole (right-padded) batch, which is simple and exactly
correct with causal attention, and fast enough for evaluation-sized prompts on small models. The
MiniLLM generator (``megatron_kd.posttrain.generation``, KV-cached) can replace it wherever a
``generate_fn(prompts) -> completions`` is accepted (:func:`megatron_kd.evaluation.rouge.evaluate_rouge`).

Any TP/PP: the last stage gathers the next-token logits of each row over the TP group (only
[rows, vocab], never the sequence), samples, and broadcasts the ids to every stage. Sampling uses
one generator per prompt seeded from (``seed``, prompt index), so outputs do not depend on the
batch size or the data-parallel layout.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kd.evaluation.forward import dp_gather, dp_shard, forward_reduce, progress_bar
from megatron_kd.evaluation.vocab import gather_full_logits

GenerateFn = Callable[[list[str]], list[str]]
"""``generate_fn(prompts) -> completions`` (one string per prompt, without the prompt)."""


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next ids [b] from full-vocabulary logits [b, V]: argmax when ``temperature == 0``, else a
    sample from softmax(logits / temperature) restricted to the top-k ids (k > 0) and to the
    smallest set of ids whose probability reaches ``top_p`` (the most likely id always stays)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float().cpu() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop an id when the ids ranked before it already reach top_p.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             stop: Sequence[str] | None = None, batch_size: int = 8, vocab_size: int | None = None,
             max_length: int | None = None, prefix_eod: bool = True, show_progress: bool = True) -> list[str]:
    """Completions of ``prompts`` (text after the prompt, end-of-document id and stop strings cut).

    ``temperature`` 0 = greedy. Generation of a prompt ends at the end-of-document id, at the
    first of ``stop`` (the text is cut before it) or after ``max_new_tokens``. Prompts are
    left-truncated so prompt + new tokens fit ``max_length`` (default: the model's maximum).
    Collective over the world: every rank returns all completions.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    vocab_size = vocab_size or tokenizer.vocab_size
    max_length = max_length or getattr(model, "max_sequence_length", 2048)
    budget = max(1, max_length - max_new_tokens)
    eod = int(tokenizer.eod)
    mine = list(dp_shard(len(prompts)))
    results: dict[int, str] = {}
    bar = progress_bar(len(mine), "generating", unit="prompt", enabled=show_progress)
    for lo in range(0, len(mine), batch_size):
        idx = mine[lo:lo + batch_size]
        ids = []
        for i in idx:
            p = list(tokenizer.encode(prompts[i]))
            p = ([eod] + p) if (prefix_eod or not p) else p
            ids.append(p[-budget:])
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i) if temperature > 0 else None for i in idx]
        outs = _generate_batch(model, tokenizer, ids, gens, max_new_tokens, temperature, top_p, top_k,
                               list(stop or []), vocab_size, eod)
        results.update(zip(idx, outs))
        bar.update(len(idx))
    bar.close()
    return dp_gather(len(prompts), results)


def _generate_batch(model, tokenizer, prompt_ids, gens, max_new_tokens, temperature, top_p, top_k,
                    stop, vocab_size, eod) -> list[str]:
    seqs = [list(p) for p in prompt_ids]
    new: list[list[int]] = [[] for _ in seqs]
    texts: list[str | None] = [None] * len(seqs)
    active = list(range(len(seqs)))
    for _ in range(max_new_tokens):
        if not active:
            break
        lengths = [len(seqs[r]) for r in active]
        tokens = torch.zeros(len(active), max(lengths), dtype=torch.long)
        for j, r in enumerate(active):
            tokens[j, :lengths[j]] = torch.tensor(seqs[r])
        last = torch.tensor(lengths) - 1
        row_gens = [gens[r] for r in active]

        def reduce_fn(logits, _):
            rows = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]
            nxt = sample_next(gather_full_logits(rows, vocab_size), temperature, top_p, top_k, row_gens)
            nxt = nxt.to(logits.device).double()
            if parallel_state.get_tensor_model_parallel_world_size() > 1:  # keep TP ranks identical
                dist.broadcast(nxt, src=parallel_state.get_tensor_model_parallel_src_rank(),
                               group=parallel_state.get_tensor_model_parallel_group())
            return nxt.unsqueeze(-1)

        (out,) = forward_reduce(model, [tokens], reduce_fn, width=1)
        still = []
        for j, r in enumerate(active):
            tok = int(out[j, 0])
            if tok == eod:
                continue
            seqs[r].append(tok)
            new[r].append(tok)
            if stop:
                text = tokenizer.decode(new[r])
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    texts[r] = text[:cut]
                    continue
            still.append(r)
        active = still
    return [t if t is not None else tokenizer.decode(n) for t, n in zip(texts, new)]
