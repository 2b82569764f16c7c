"""Chat data for post-training: JSONL records ``{"messages": [{"role": ..., "content": ...}, ...]}``.

Roles are ``system``, ``user`` and ``assistant`` (multi-turn; at least one assistant turn). The loss
is on assistant turns only: a conversation with k assistant turns becomes k (prompt, response)
examples, example i = (everything before assistant turn i, rendered, + the assistant prefix;
assistant turn i), so every assistant turn is trained once with its whole context and nothing
else is (the same response-only masks as instruction data, :func:`megatron_kd.posttrain.data.sft_batch`).

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
