"""SeqKD data: a checkpoint answers the prompts of an instruction JSONL (``megatron-kd generate``).

The teacher samples responses for the training prompts (T=1, top-p 1 by default) and the student
is then fine-tuned on them with ``megatron-kd sft`` (after ``preprocess-instructions``).
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from megatron_kd.posttrain.data import InstructionTemplate, encode_records, read_instruction_jsonl
from megatron_kd.posttrain.generation import GenerationConfig, generate
from megatron_kd.posttrain.steps import dp_info
from megatron_kd.utils.io import atomic_write


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
    if any("messages" in r for r in records):
        raise ValueError(f"{source_jsonl}: generate answers prompt/response records; chat ('messages') records "
                         "are not supported here")
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
