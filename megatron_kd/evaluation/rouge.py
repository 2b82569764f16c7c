"""ROUGE-L (longest-common-subsequence F-measure) and generation-task evaluation (MiniLLM style).

Tokenisation (the ``rouge-score`` package's default, re-implemented): lowercase; every run of
characters outside ``[a-z0-9]`` becomes a space (so non-ASCII letters are dropped); split on
spaces; optionally Porter-stem tokens longer than 3 characters (NLTK's ``PorterStemmer``, as
``rouge-score`` with ``use_stemmer=True``). ROUGE-L of a prediction against a reference:
P = LCS / len(prediction), R = LCS / len(reference), F = 2PR / (P + R) (0 when LCS = 0).

:func:`evaluate_rouge` follows MiniLLM's evaluation (adapted from Super-NaturalInstructions):
the score of an example is the *maximum* F over its references, the task score is the mean over
examples times 100, and stemming is on by default (``use_stemmer=True``, as there).
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Sequence

from megatron_kd.evaluation.generate import GenerateFn, generate

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


def rouge_tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """Tokens of ``text`` as ROUGE sees them (see the module docstring)."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    if use_stemmer:
        stem = _stemmer().stem
        tokens = [stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, use_stemmer: bool = False) -> dict[str, float]:
    """ROUGE-L ``{"precision", "recall", "fmeasure"}`` of ``prediction`` against ``reference``."""
    pred, ref = rouge_tokenize(prediction, use_stemmer), rouge_tokenize(reference, use_stemmer)
    if not pred or not ref:
        return {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0}
    lcs = lcs_length(pred, ref)
    p, r = lcs / len(pred), lcs / len(ref)
    f = 2 * p * r / (p + r) if lcs else 0.0
    return {"precision": p, "recall": r, "fmeasure": f}


def rouge_l_max(prediction: str, references: Sequence[str], use_stemmer: bool = True) -> float:
    """Best ROUGE-L F over several references (0 without references)."""
    return max((rouge_l(prediction, ref, use_stemmer)["fmeasure"] for ref in references), default=0.0)


def load_generation_task(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a JSONL generation task: ``{"prompt": str, "output": str | [str, ...]}`` per line.

    ``output`` holds the reference answer(s); ``response`` (the key of the post-training
    instruction JSONL, e.g. MiniLLM's test split) is read when ``output`` is absent. Raises
    one-line errors naming ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generation task {path} does not exist: pass a JSONL file of "
                                '{"prompt", "output"} lines')
    examples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if limit is not None and len(examples) >= limit:
                break
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({exc.msg}): fix the line") from None
            refs = ex.get("output", ex.get("response")) if isinstance(ex, dict) else None
            refs = [refs] if isinstance(refs, str) else refs
            if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) or not refs \
                    or not all(isinstance(r, str) for r in refs):
                raise ValueError(f'{path}:{lineno} needs a string "prompt" and an "output" (or "response") string or list '
                                 'of strings')
            examples.append({**ex, "references": refs})
    if not examples:
        raise ValueError(f"generation task {path} holds no examples")
    return examples


def evaluate_rouge(model: Any, tokenizer: Any, jsonl_path: str | Path, generate_fn: GenerateFn | None = None,
                   max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   seed: int = 0, batch_size: int = 8, limit: int | None = None, use_stemmer: bool = True,
                   vocab_size: int | None = None, max_length: int | None = None,
                   return_predictions: bool = False) -> dict[str, Any]:
    """Generate an answer for every prompt of a JSONL task and score it with ROUGE-L.

    ``generate_fn(prompts) -> completions`` replaces the built-in generator (then the sampling
    arguments are ignored; ``model`` may be None). Returns ``{"task", "rougeL" (mean best F x 100),
    "n", "use_stemmer", "temperature", "top_p", "seed"}`` (+ ``"predictions"`` if asked).
    Collective when the built-in generator is used: call it on every rank.
    """
    examples = load_generation_task(jsonl_path, limit)
    prompts = [ex["prompt"] for ex in examples]
    if generate_fn is None:
        generate_fn = functools.partial(
            generate, model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, seed=seed, batch_size=batch_size, vocab_size=vocab_size, max_length=max_length)
    predictions = list(generate_fn(prompts))
    if len(predictions) != len(prompts):
        raise ValueError(f"generate_fn returned {len(predictions)} completions for {len(prompts)} prompts")
    scores = [rouge_l_max(p, ex["references"], use_stemmer) for p, ex in zip(predictions, examples)]
    result = {"task": Path(jsonl_path).stem, "rougeL": 100.0 * sum(scores) / len(scores), "n": len(scores),
              "use_stemmer": use_stemmer, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "seed": seed, "max_new_tokens": max_new_tokens}
    if return_predictions:
        result["predictions"] = predictions
    return result
