"""log p(continuation | context) for batches of text pairs: the core of zero-shot evaluation.

Tokenisation follows lm-evaluation-harness's conventions for its Hugging Face models, so our
multiple-choice scorer and the lm-eval adapter agree with each other and with published numbers:
trailing whitespace of the context moves to the continuation; ``context + continuation`` is
encoded whole and split after ``len(encode(context))`` tokens (so a merge across the boundary
stays with the continuation); an empty context is replaced by the end-of-document token. With
``prefix_eod`` (default) *every* context is preceded by the end-of-document token, which is how
megatron-kd models see the start of a document during pre-training (documents are packed with an
end-of-document separator).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from megatron_kd.evaluation.forward import dp_gather, dp_shard, forward_reduce, progress_bar
from megatron_kd.evaluation.vocab import token_logprobs

TokenPair = tuple[list[int], list[int]]


def encode_pair(tokenizer: Any, context: str, continuation: str, prefix_eod: bool = True) -> TokenPair:
    """(context ids, continuation ids) for scoring ``continuation`` after ``context``."""
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    if context:
        ctx = list(tokenizer.encode(context))
        cont = list(tokenizer.encode(context + continuation))[len(ctx):]
    else:
        ctx, cont = [], list(tokenizer.encode(continuation))
    if prefix_eod or not ctx:
        ctx = [int(tokenizer.eod)] + ctx
    return ctx, cont


def _batch(pairs: Sequence[TokenPair], max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, targets and continuation mask [b, width] (left-truncated to max_length)."""
    rows = []
    for ctx, cont in pairs:
        full = (list(ctx) + list(cont))[-(max_length + 1):]
        n_cont = min(len(cont), len(full) - 1)
        rows.append((full, n_cont))
    width = max(len(full) - 1 for full, _ in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (full, n_cont) in enumerate(rows):
        n = len(full) - 1
        tokens[r, :n] = torch.tensor(full[:-1])
        targets[r, :n] = torch.tensor(full[1:])
        mask[r, n - n_cont:n] = True
    return tokens, targets, mask


def score_continuations(model: torch.nn.Module, pairs: Sequence[TokenPair], vocab_size: int, max_length: int,
                        batch_size: int = 16, desc: str = "scoring", show_progress: bool = True
                        ) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of log p over continuation tokens in nats,
    whether greedy decoding reproduces the continuation). Any TP/PP; pairs are split over
    data-parallel ranks and the results gathered, so every rank returns the full list.

    Inputs longer than ``max_length`` keep their last ``max_length`` tokens (context first).
    Pairs are sorted longest first so batches pad little; results come back in input order.
    """
    for i, (ctx, _) in enumerate(pairs):
        if not ctx:
            raise ValueError(f"pair {i} has an empty context: prefix it with the end-of-document id")
        top = max(list(ctx) + list(pairs[i][1]))
        if top >= vocab_size:
            raise ValueError(f"pair {i} holds token id {top} >= model vocab_size {vocab_size}: wrong tokenizer")
    mine = list(dp_shard(len(pairs)))
    mine.sort(key=lambda i: -min(len(pairs[i][0]) + len(pairs[i][1]), max_length + 1))
    results: dict[int, tuple[float, bool]] = {}
    bar = progress_bar(len(mine), desc, unit="req", enabled=show_progress)
    for lo in range(0, len(mine), batch_size):
        idx = mine[lo:lo + batch_size]
        scored = [i for i in idx if pairs[i][1]]
        for i in idx:
            if not pairs[i][1]:
                results[i] = (0.0, True)  # nothing to predict
        if scored:
            tokens, targets, mask = _batch([pairs[i] for i in scored], max_length)

            def reduce_fn(logits, _, targets=targets, mask=mask):
                lp, greedy = token_logprobs(logits, targets.to(logits.device), vocab_size, return_greedy=True)
                m = mask.to(lp.device)
                total = (lp.double() * m).sum(-1)
                all_greedy = (greedy | ~m).all(-1).double()
                return torch.stack([total, all_greedy], dim=-1)

            (out,) = forward_reduce(model, [tokens], reduce_fn, width=2)
            for r, i in enumerate(scored):
                results[i] = (float(out[r, 0]), bool(out[r, 1] > 0.5))
        bar.update(len(idx))
    bar.close()
    return dp_gather(len(pairs), results)
