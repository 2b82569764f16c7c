"""Zero-shot multiple-choice accuracy over JSONL tasks (documented in ``docs/evaluation.md``).

One example per line::

    {"context": "The capital of France is", "choices": ["Paris", "Rome"], "label": 0, "id": "q1"}

Each choice is scored as the continuation ``delimiter + choice`` after ``context`` (delimiter
``" "`` by default, as lm-evaluation-harness's ``target_delimiter``): the summed log-likelihood of
its tokens (see :mod:`megatron_kd.evaluation.scoring`). ``acc``: the argmax of the sums is the
label. ``acc_norm``: the argmax of sum / len(choice) in *characters* (of the choice text without
the delimiter) — lm-evaluation-harness's ``acc_norm``, so numbers compare with published ones.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from megatron_kd.evaluation.scoring import encode_pair, score_continuations


def load_mc_task(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read and validate a JSONL multiple-choice task (first ``limit`` examples).

    Raises ``FileNotFoundError``/``ValueError`` naming ``file:line`` and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist: pass a JSONL file of "
                                '{"context", "choices", "label"} lines')
    examples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and len(examples) >= limit:
                break
            where = f"{path}:{lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON ({exc.msg}): fix the line") from None
            if not isinstance(ex, dict) or not isinstance(ex.get("context"), str):
                raise ValueError(f'{where} needs a string "context" field')
            choices = ex.get("choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise ValueError(f'{where} needs "choices": a list of >= 2 non-empty strings')
            label = ex.get("label")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
                raise ValueError(f'{where} needs an integer "label" in [0, {len(choices)})')
            examples.append(ex)
    if not examples:
        raise ValueError(f"task file {path} holds no examples")
    return examples


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_examples(examples: list[dict[str, Any]], loglikelihoods: list[float]) -> dict[str, Any]:
    """acc / acc_norm (and their standard errors) from the flat per-choice log-likelihoods."""
    accs, norms, k = [], [], 0
    for ex in examples:
        lls = loglikelihoods[k:k + len(ex["choices"])]
        k += len(ex["choices"])
        pred = max(range(len(lls)), key=lambda j: lls[j])
        normed = [ll / len(c) for ll, c in zip(lls, ex["choices"])]
        pred_norm = max(range(len(lls)), key=lambda j: normed[j])
        accs.append(float(pred == ex["label"]))
        norms.append(float(pred_norm == ex["label"]))
    return {"acc": sum(accs) / len(accs), "acc_stderr": _stderr(accs), "acc_norm": sum(norms) / len(norms),
            "acc_norm_stderr": _stderr(norms), "n": len(examples)}


def evaluate_multiple_choice(model: torch.nn.Module, tokenizer: Any, task_path: str | Path,
                             vocab_size: int | None = None, batch_size: int = 16, max_length: int | None = None,
                             limit: int | None = None, delimiter: str = " ", prefix_eod: bool = True,
                             return_loglikelihoods: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` (this rank's stage; any TP/PP/DP) on a JSONL task.

    ``vocab_size``: the model's real vocabulary (default ``tokenizer.vocab_size``);
    ``max_length``: longest scored input (default: the model's max sequence length).
    Returns ``{"task", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"}`` on every rank
    (plus ``"loglikelihoods"``, one list per example, with ``return_loglikelihoods``).
    """
    examples = load_mc_task(task_path, limit)
    vocab_size = vocab_size or tokenizer.vocab_size
    max_length = max_length or getattr(model, "max_sequence_length", 2048)
    pairs = [encode_pair(tokenizer, ex["context"], delimiter + choice, prefix_eod)
             for ex in examples for choice in ex["choices"]]
    scored = score_continuations(model, pairs, vocab_size, max_length, batch_size,
                                 desc=f"eval {Path(task_path).stem}", show_progress=show_progress)
    lls = [ll for ll, _ in scored]
    result = {"task": Path(task_path).stem, **score_examples(examples, lls)}
    if return_loglikelihoods:
        per, k = [], 0
        for ex in examples:
            per.append(lls[k:k + len(ex["choices"])])
            k += len(ex["choices"])
        result["loglikelihoods"] = per
    return result
