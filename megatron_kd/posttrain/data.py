"""Instruction data for MiniLLM and its baselines, and pre-training chunks for the L_PT term.

Instruction JSONL: one ``{"prompt": ..., "response": ..., "input": ...(optional)}`` per line, or a chat
record ``{"messages": [{"role", "content"}, ...]}`` (multi-turn; one example per conversation with the
loss on every assistant turn, see :mod:`megatron_kd.posttrain.chat`).
:func:`preprocess_instructions` renders each prompt through an :class:`InstructionTemplate`,
tokenises prompt and response separately (the response gets ``eod`` appended, so models learn to
stop) and writes two megatron-core indexed datasets with one manifest::

    {prefix}_prompt_document.bin/.idx     prompt ids (the only input MiniLLM rollouts need)
    {prefix}_response_document.bin/.idx   response ids (gold; SFT/KD targets, ROUGE references)
    {prefix}_response_mask_document.bin/.idx   only with multi-turn chat records: per response token,
                                          1 = trained (assistant turns), 0 = not (user turns between)
    {prefix}.instruct.json                tokenizer identity, template, counts, sha256 of the files

Loss masks are response-only: :func:`sft_batch` puts 1 on the response tokens (EOD included), or
the response mask where the example has one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from megatron_kd.posttrain.chat import chat_conversation, cut_turns, is_chat_record, turn_ends, validate_messages
from megatron_kd.utils.io import read_json, sha256_file, write_json_atomic

FORMAT = "megatron-kd-instruction-v1"

_DOLLY = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")
_DOLLY_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{prompt}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass
class InstructionTemplate:
    """How a record becomes the prompt text (default: the Alpaca/Dolly template MiniLLM uses)."""

    template: str = _DOLLY
    """Prompt text for records without ``input``; ``{prompt}`` is replaced by the instruction."""
    template_with_input: str = _DOLLY_INPUT
    """Prompt text for records with a non-empty ``input`` (``{prompt}`` and ``{input}``)."""

    def render(self, record: dict[str, Any]) -> str:
        """The prompt string of ``record``."""
        inp = record.get("input") or ""
        tpl = self.template_with_input if inp else self.template
        return tpl.replace("{prompt}", record["prompt"]).replace("{input}", inp)

    @classmethod
    def raw(cls) -> "InstructionTemplate":
        """Identity template: the prompt text as is (inputs appended after a newline)."""
        return cls(template="{prompt}", template_with_input="{prompt}\n{input}")


def read_instruction_jsonl(path: str | os.PathLike, require_response: bool = False) -> list[dict[str, Any]]:
    """Records of an instruction JSONL file; one-line ``ValueError`` naming ``file:line`` of a bad
    line (invalid JSON or UTF-8, a missing or non-string field). ``require_response``: a record
    without ``response`` is an error (training data), not an empty answer (prompts to generate for)."""
    return [rec for _, rec in _read_instruction_lines(path, require_response)]


def _read_instruction_lines(path: str | os.PathLike, require_response: bool) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every record of an instruction JSONL (see :func:`read_instruction_jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {path} does not exist: pass a JSONL file of "
                                '{"prompt": ..., "response": ...} records')
    records = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid UTF-8 (byte {exc.start}): re-encode the file as UTF-8 "
                                 "or remove the line") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid JSON ({exc.msg}): fix or remove the line") from None
            if is_chat_record(rec):
                validate_messages(rec, f"{path}:{n}")
                records.append((n, rec))
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise ValueError(f"{path}:{n} needs string fields 'prompt' and 'response' (optional 'input'), "
                                 "or a 'messages' list")
            if require_response and "response" not in rec:
                raise ValueError(f"{path}:{n} has no 'response' field: training data needs a response per record "
                                 "(an empty answer is written as \"response\": \"\")")
            if not isinstance(rec.get("response", ""), str) or not isinstance(rec.get("input") or "", str):
                raise ValueError(f"{path}:{n} needs string fields 'prompt' and 'response' (optional 'input')")
            records.append((n, rec))
    if not records:
        raise ValueError(f"instruction data {path} holds no records")
    return records


def encode_records(records: list[dict[str, Any]], tokenizer, template: InstructionTemplate,
                   max_prompt_length: int | None = None, max_response_length: int | None = None
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids + [eod]) per record (see :func:`encode_examples`, which also returns the
    response masks of chat records)."""
    prompts, responses, _ = encode_examples(records, tokenizer, template, max_prompt_length, max_response_length)
    return prompts, responses


def encode_examples(records: list[dict[str, Any]], tokenizer, template: InstructionTemplate,
                    max_prompt_length: int | None = None, max_response_length: int | None = None
                    ) -> tuple[list[list[int]], list[list[int]], list[list[int] | None]]:
    """(prompt ids, response ids, response mask or None) per record: a prompt/response record gives
    (prompt, response + [eod], None), a chat record its whole conversation
    (:func:`megatron_kd.posttrain.chat.chat_conversation`). Prompts are truncated from the left (the end
    of a prompt matters most), responses from the right (a cut plain response keeps its eod; a
    conversation keeps the assistant turns that fit, see :func:`megatron_kd.posttrain.chat.cut_turns`)."""
    prompts, responses, masks = [], [], []
    for rec in records:
        if is_chat_record(rec):
            p, r, m = chat_conversation(rec["messages"], tokenizer)
        else:
            p, r, m = tokenizer.encode(template.render(rec)), tokenizer.encode(rec.get("response", "")) + [tokenizer.eod], None
        if max_prompt_length and len(p) > max_prompt_length:
            p = p[-max_prompt_length:]
        if max_response_length and len(r) > max_response_length:
            keep = cut_turns(r, m, max_response_length) if m is not None else 0
            if m is not None and keep in turn_ends(m):  # the assistant turns that fit whole
                r, m = r[:keep], m[:keep]
            else:  # a plain response, or a first assistant turn too long to keep whole: cut, end with eod
                r = r[: max_response_length - 1] + [tokenizer.eod]
                m = None if m is None else m[: max_response_length - 1] + [1]
        if not p:
            shown = "<chat>" if is_chat_record(rec) else rec["prompt"][:40]
            raise ValueError(f"a record's prompt {shown!r} encodes to no tokens: check the template")
        if m is not None and all(m):
            m = None  # one assistant turn: the plain response-only mask
        prompts.append(p)
        responses.append(r)
        masks.append(m)
    return prompts, responses, masks


def dataset_files(prefix: str | os.PathLike) -> dict[str, Path]:
    """Paths of an instruction dataset's files."""
    prefix = str(prefix)
    return {"prompt_bin": Path(f"{prefix}_prompt_document.bin"), "prompt_idx": Path(f"{prefix}_prompt_document.idx"),
            "response_bin": Path(f"{prefix}_response_document.bin"),
            "response_idx": Path(f"{prefix}_response_document.idx"),
            "mask_bin": Path(f"{prefix}_response_mask_document.bin"),
            "mask_idx": Path(f"{prefix}_response_mask_document.idx"), "manifest": Path(f"{prefix}.instruct.json")}


def _write_indexed(prefix: str, seqs: list[list[int]], dtype) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for s in seqs:
        builder.add_document(np.asarray(s, dtype=dtype), [len(s)])
    builder.finalize(f"{prefix}.idx")


def preprocess_instructions(jsonl: str | os.PathLike, tokenizer, output_prefix: str | os.PathLike,
                            template: InstructionTemplate | None = None, max_prompt_length: int | None = None,
                            max_response_length: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Tokenise an instruction JSONL into prompt/response indexed datasets; return the manifest.

    Files are written under temporary names and renamed (manifest last), so a crash never leaves a
    half-written dataset under the final names.
    """
    template = template or InstructionTemplate()
    files = dataset_files(output_prefix)
    if not overwrite:
        for f in files.values():
            if f.exists():
                raise FileExistsError(f"{f} already exists: pass --overwrite or choose another output prefix")
    numbered = _read_instruction_lines(jsonl, require_response=True)
    records = [rec for _, rec in numbered]
    prompts, responses, masks = [], [], []
    for n, rec in numbered:  # one record at a time: an encoding error names its file:line
        try:
            ps, rs, ms = encode_examples([rec], tokenizer, template, max_prompt_length, max_response_length)
        except ValueError as exc:
            raise ValueError(f"{jsonl}:{n}: {exc}") from None
        prompts.extend(ps)  # a chat record is one example (its whole conversation)
        responses.extend(rs)
        masks.extend(ms)
    with_mask = any(m is not None for m in masks)
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    files["manifest"].parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    tmp_files = dataset_files(tmp)
    try:
        _write_indexed(f"{tmp}_prompt_document", prompts, dtype)
        _write_indexed(f"{tmp}_response_document", responses, dtype)
        if with_mask:
            _write_indexed(f"{tmp}_response_mask_document",
                           [m if m is not None else [1] * len(r) for m, r in zip(masks, responses)], np.uint8)
    except BaseException:  # full disk, read-only, interrupted: leave nothing half-written behind
        for f in tmp_files.values():
            f.unlink(missing_ok=True)
        raise
    manifest = {
        "format": FORMAT, "source": str(jsonl), "source_sha256": sha256_file(jsonl),
        "tokenizer": {"identity": tokenizer.identity, "vocab_size": tokenizer.vocab_size,
                      "eod": tokenizer.eod, "pad": tokenizer.pad, "path": getattr(tokenizer, "path", "")},
        "template": asdict(template), "num_examples": len(prompts), "num_records": len(records),
        "dtype": np.dtype(dtype).name,
        "num_prompt_tokens": int(sum(map(len, prompts))), "num_response_tokens": int(sum(map(len, responses))),
        "max_prompt_length": max_prompt_length, "max_response_length": max_response_length,
        "response_mask": with_mask,
        "checksums": {k: sha256_file(tmp_files[k]) for k in tmp_files if k != "manifest" and tmp_files[k].is_file()},
    }
    for k in tmp_files:
        if k != "manifest":
            if tmp_files[k].is_file():
                os.replace(tmp_files[k], files[k])
            else:  # no mask this time: a stale one from an overwritten dataset must not be read
                files[k].unlink(missing_ok=True)
    write_json_atomic(files["manifest"], manifest)
    return manifest


class InstructionDataset:
    """A preprocessed instruction dataset: ``prompt(i)``, ``response(i)`` as lists of ids."""

    def __init__(self, prefix: str | os.PathLike, tokenizer=None, verify: bool = False):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        files = dataset_files(prefix)
        if not files["manifest"].is_file():
            raise FileNotFoundError(f"instruction dataset {self.prefix}: {files['manifest']} does not exist: pass the "
                                    "--output-prefix of megatron-kd preprocess-instructions")
        self.manifest = read_json(files["manifest"], "instruction dataset manifest")
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{files['manifest']} is not a {FORMAT} manifest: re-run megatron-kd preprocess-instructions")
        self.has_mask = bool(self.manifest.get("response_mask"))
        parts = ("prompt_bin", "prompt_idx", "response_bin", "response_idx") + (
            ("mask_bin", "mask_idx") if self.has_mask else ())
        for k in parts:
            if not files[k].is_file():
                raise FileNotFoundError(f"{files[k]} is missing: re-run megatron-kd preprocess-instructions")
            if verify and sha256_file(files[k]) != self.manifest["checksums"][k]:
                raise ValueError(f"{files[k]} does not match its sha256 in {files['manifest']}: re-run preprocessing")
        if tokenizer is not None and self.manifest["tokenizer"]["identity"] != tokenizer.identity:
            raise ValueError(f"instruction dataset {self.prefix} was tokenised with "
                             f"{self.manifest['tokenizer'].get('path') or self.manifest['tokenizer']['identity']}, "
                             "not with the given tokenizer: re-run preprocessing with this tokenizer")
        self._prompts = IndexedDataset(f"{self.prefix}_prompt_document")
        self._responses = IndexedDataset(f"{self.prefix}_response_document")
        self._masks = IndexedDataset(f"{self.prefix}_response_mask_document") if self.has_mask else None
        if len(self._prompts) != len(self._responses) or len(self._prompts) != self.manifest["num_examples"] or (
                self._masks is not None and len(self._masks) != len(self._prompts)):
            raise ValueError(f"instruction dataset {self.prefix}: prompt/response counts disagree with the manifest")

    def __len__(self) -> int:
        return len(self._prompts)

    def prompt(self, i: int) -> list[int]:
        """Prompt ids of example ``i``."""
        return self._prompts[i].astype(np.int64).tolist()

    def response(self, i: int) -> list[int]:
        """Response ids (with the trailing eod) of example ``i`` (a chat record: the rest of the conversation)."""
        return self._responses[i].astype(np.int64).tolist()

    def response_mask(self, i: int) -> list[int] | None:
        """Loss mask over :meth:`response` (1 = assistant-turn token), or None when all of it is trained."""
        if self._masks is None:
            return None
        mask = self._masks[i].astype(np.int64).tolist()
        return None if all(mask) else mask

    def reply(self, i: int) -> list[int]:
        """The first reply after the prompt: the response, or a conversation's first assistant turn
        (what rollouts are compared with and ROUGE-L is scored against)."""
        return first_reply(self.response(i), self.response_mask(i))


def first_reply(response: list[int], mask: list[int] | None) -> list[int]:
    """``response`` up to the end of its first assistant turn (all of it without a mask)."""
    return response if mask is None else response[: turn_ends(mask)[0]]


class InMemoryInstructions:
    """Same interface as :class:`InstructionDataset` over lists (tests, tiny data, SeqKD output)."""

    def __init__(self, prompts: list[list[int]], responses: list[list[int]]):
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        self.prompts, self.responses = prompts, responses

    def __len__(self) -> int:
        return len(self.prompts)

    def prompt(self, i: int) -> list[int]:
        """Prompt ids of example ``i``."""
        return list(self.prompts[i])

    def response(self, i: int) -> list[int]:
        """Response ids of example ``i``."""
        return list(self.responses[i])

    def response_mask(self, i: int) -> list[int] | None:
        """No response masks in memory: every response token is trained."""
        return None

    def reply(self, i: int) -> list[int]:
        """The response."""
        return self.response(i)


def sft_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
              length: int | None = None, response_masks: list[list[int] | None] | None = None
              ) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch with a response-only loss mask.

    Returns ``tokens`` [b, L], ``labels`` [b, L] (tokens shifted left), ``loss_mask`` [b, L]
    (1 where the label is a response token, or where ``response_masks[i]`` is 1 for the label's
    response position). ``L`` = longest prompt+response - 1 (or ``length``).
    """
    seqs = [p + r for p, r in zip(prompts, responses)]
    L = max(len(s) for s in seqs) - 1 if length is None else length
    b = len(seqs)
    tokens = torch.full((b, L), pad_id, dtype=torch.long)
    labels = torch.full((b, L), pad_id, dtype=torch.long)
    mask = torch.zeros((b, L), dtype=torch.float32)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        s = s[: L + 1]
        n = len(s) - 1
        tokens[i, :n] = torch.tensor(s[:-1])
        labels[i, :n] = torch.tensor(s[1:])
        mask[i, max(len(p) - 1, 0):n] = 1.0
        rmask = response_masks[i] if response_masks is not None else None
        if rmask is not None:  # label at position t is s[t + 1]: response token t + 1 - len(p)
            start = max(len(p) - 1, 0)
            keep = torch.tensor(rmask[: n - start], dtype=torch.float32)
            mask[i, start:start + len(keep)] = keep
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


class LMChunks:
    """Random fixed-length chunks of a pre-training indexed dataset (for the L_PT term).

    A chunk starts at a uniformly random token of the corpus (documents concatenated, as megatron's
    GPTDataset packs them) and spans ``seq_length + 1`` tokens. Deterministic given ``seed``,
    the data-parallel rank and the number of chunks drawn so far (resumable).
    """

    @staticmethod
    def check_files(prefix: str | os.PathLike) -> None:
        """One-line ``FileNotFoundError`` unless ``{prefix}.bin`` and ``.idx`` exist."""
        for ext in (".bin", ".idx"):
            if not Path(f"{prefix}{ext}").is_file():
                raise FileNotFoundError(f"pre-training dataset {prefix}{ext} does not exist: pass the prefix "
                                        "of an indexed dataset written by megatron-kd preprocess")

    def __init__(self, prefix: str | os.PathLike, seq_length: int, seed: int = 0, dp_rank: int = 0):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.check_files(prefix)
        self.ds = IndexedDataset(str(prefix))
        self.lengths = np.asarray(self.ds.sequence_lengths, dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.lengths)])
        if self.cum[-1] < seq_length + 1:
            raise ValueError(f"pre-training dataset {prefix} has {self.cum[-1]} tokens, fewer than seq_length+1")
        self.seq_length, self.seed, self.dp_rank = seq_length, seed, dp_rank
        self.drawn = 0

    def _tokens(self, start: int, n: int) -> np.ndarray:
        out, doc = [], int(np.searchsorted(self.cum, start, side="right") - 1)
        off = start - self.cum[doc]
        while n > 0:
            take = min(n, int(self.lengths[doc] - off))
            out.append(self.ds.get(doc, offset=int(off), length=take))
            n -= take
            doc, off = (doc + 1) % len(self.lengths), 0
        return np.concatenate(out).astype(np.int64)

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``tokens``/``labels``/``loss_mask`` [batch_size, seq_length]."""
        rng = np.random.default_rng([self.seed, self.dp_rank, self.drawn])
        self.drawn += 1
        starts = rng.integers(0, self.cum[-1] - self.seq_length - 1, size=batch_size, endpoint=True)
        chunks = torch.from_numpy(np.stack([self._tokens(int(s), self.seq_length + 1) for s in starts]))
        return {"tokens": chunks[:, :-1], "labels": chunks[:, 1:],
                "loss_mask": torch.ones(batch_size, self.seq_length)}


def iterate_minibatches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> Iterator[list[int]]:
    """Shuffled index batches of ``range(n)`` for one epoch (deterministic in seed and epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        yield order[i: i + batch_size]
