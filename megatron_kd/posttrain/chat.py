"""Chat data for post-training: JSONL records ``{"messages": [{"role": ..., "content": ...}, ...]}``.

Roles are ``system``, ``user`` and ``assistant`` (multi-turn; at least one assistant turn). A
conversation is **one example** (:func:`chat_conversation`), the loss on every assistant turn and
on nothing else (what TRL's ``assistant_only_loss`` does): the *prompt* is everything before the
first assistant turn (rendered, with the assistant prefix), the *response* the rest of the
conversation up to the end of its last assistant turn, with a *response mask* that is 1 on the
assistant turns' tokens and 0 on the user / system turns and assistant prefixes between them.
Turns after the last assistant turn are dropped (nothing to train on).

Too long for the example's length budget (``preprocess-instructions --max-response-length``,
``sft.max_length``): whole trailing turns are dropped — the example keeps the prompt and the
assistant turns that fit completely (:func:`cut_turns`); only when not even the first assistant
turn fits is it cut mid-turn (ended with EOD at preprocessing), so every conversation still trains
on something. The prompt is cut from the left only as far as the first assistant turn needs.

Consumers that need one reply per prompt (MiniLLM / GKD / DistiLLM rollouts and their gold data,
ROUGE-L references) use the prompt and the *first* assistant turn
(:meth:`megatron_kd.posttrain.data.InstructionDataset.reply`). :func:`chat_examples` (one
(prompt, response) pair per assistant turn, each with its whole context) is kept for callers that
want the per-turn view.

Rendering: the tokenizer's own chat template when it has one (Hugging Face ``apply_chat_template``;
the response is what the full conversation adds after the generation prompt), else the default
template :data:`DEFAULT_TURNS`::

    System: {content}\\n      (system turns)
    User: {content}\\n        (user turns)
    Assistant: {content}<eod> (assistant turns; the loss covers {content}<eod>)

Each turn is tokenised separately and the ids concatenated, so the masks are exact.
"""
from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
DEFAULT_TURNS = {"system": "System: {content}\n", "user": "User: {content}\n", "assistant": "Assistant:"}
"""Default template: text of a system / user turn, and the prefix that opens an assistant turn."""


def is_chat_record(record: Any) -> bool:
    """True for a ``{"messages": [...]}`` record."""
    return isinstance(record, dict) and "messages" in record


def validate_messages(record: dict[str, Any], where: str) -> None:
    """One-line ``ValueError`` (naming ``where``, e.g. ``file.jsonl:3``) for a malformed chat record."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: messages[{i}] must be {{\"role\": one of {'/'.join(ROLES)}, "
                             f"\"content\": string}}, got {str(m)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn (nothing to train on)")


def _hf_tokenizer(tokenizer):
    hf = getattr(tokenizer, "hf_tokenizer", None) or getattr(tokenizer, "_tok", None)
    return hf if getattr(hf, "chat_template", None) else None


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def chat_examples(messages: list[dict[str, str]], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) for every assistant turn of ``messages`` (see the module docstring)."""
    hf = _hf_tokenizer(tokenizer)
    out: list[tuple[list[int], list[int]]] = []
    if hf is not None:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = _ids(hf.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
            full = _ids(hf.apply_chat_template(messages[: i + 1], tokenize=True))
            if full[: len(prompt)] != prompt or len(full) == len(prompt):
                raise ValueError("the tokenizer's chat template does not render a conversation as its prefix plus "
                                 "the assistant turn: use a tokenizer without a chat template (default template)")
            response = full[len(prompt):]
            if response[-1] != tokenizer.eod:
                response = response + [tokenizer.eod]
            out.append((prompt, response))
        return out
    context: list[int] = []
    for m in messages:
        if m["role"] == "assistant":
            prompt = context + tokenizer.encode(DEFAULT_TURNS["assistant"])
            response = tokenizer.encode(m["content"]) + [tokenizer.eod]
            out.append((prompt, response))
            context = prompt + response
        else:
            context = context + tokenizer.encode(DEFAULT_TURNS[m["role"]].replace("{content}", m["content"]))
    return out


def _render(hf, messages, add_generation_prompt: bool = False) -> list[int]:
    return _ids(hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))


def chat_conversation(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[int], list[int]]:
    """``(prompt ids, response ids, response mask)`` of a whole conversation (see the module docstring):
    the mask is 1 on every assistant turn (with the template's end-of-turn tokens, or ``{content}<eod>``
    in the default template) and 0 elsewhere; the response ends with ``eod``."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]
    hf = _hf_tokenizer(tokenizer)
    tokens: list[int] = []
    mask: list[int] = []
    first = None  # where the first assistant turn starts
    if hf is not None:
        tokens = _render(hf, messages)
        mask = [0] * len(tokens)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start, end = len(_render(hf, messages[:i], True)), len(_render(hf, messages[: i + 1]))
            if _render(hf, messages[: i + 1]) != tokens[:end] or end <= start or \
                    _render(hf, messages[:i], True) != tokens[:start]:
                raise ValueError("the tokenizer's chat template does not render a conversation as its prefix plus "
                                 "the assistant turn: use a tokenizer without a chat template (default template)")
            mask[start:end] = [1] * (end - start)
            first = start if first is None else first
        if tokens[-1] != tokenizer.eod:
            tokens, mask = tokens + [tokenizer.eod], mask + [1]
    else:
        for m in messages:
            if m["role"] == "assistant":
                prefix = tokenizer.encode(DEFAULT_TURNS["assistant"])
                tokens, mask = tokens + prefix, mask + [0] * len(prefix)
                first = len(tokens) if first is None else first
                turn = tokenizer.encode(m["content"]) + [tokenizer.eod]
                tokens, mask = tokens + turn, mask + [1] * len(turn)
            else:
                text = tokenizer.encode(DEFAULT_TURNS[m["role"]].replace("{content}", m["content"]))
                tokens, mask = tokens + text, mask + [0] * len(text)
    return tokens[:first], tokens[first:], mask[first:]


def turn_ends(mask: list[int]) -> list[int]:
    """Positions just after each assistant turn (each maximal run of 1s) of a response mask."""
    return [j + 1 for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]


def cut_turns(response: list[int], mask: list[int], budget: int) -> int:
    """How many response tokens to keep within ``budget``: all when they fit, else up to the end of the
    last assistant turn that fits completely, else ``budget`` (the first turn cut mid-turn)."""
    if len(response) <= budget:
        return len(response)
    fitting = [e for e in turn_ends(mask) if e <= budget]
    return fitting[-1] if fitting else max(budget, 0)
