"""Teacher/student vocabulary compatibility for logit distillation.

Logit KD compares the teacher's and the student's distributions id by id, so both must use the
same tokenizer. Their *model* vocabulary sizes may still differ: model authors pad the embedding
beyond the tokenizer (Qwen2.5-7B has 152,064 rows, Qwen2.5-0.5B 151,936, over the same 151,665
tokenizer ids), and megatron pads again to a multiple of 128*TP. The rule:

1. Tokenizers: when both are known they must map ids to the same tokens: equal ``identity``
   (hash of the tokenizer files), or else equal :func:`vocab_fingerprint` (so a chat-template or
   ``model_max_length`` difference between two releases of one tokenizer does not count).
2. Each model must have a row for every tokenizer id: ``tokenizer_vocab <= model vocab_size``.
3. KD runs over the *real* vocabulary ``[0, kd_vocab_size)`` where ``kd_vocab_size`` is the
   tokenizer's size when known, else the (then required equal) model vocab size. Columns at or
   beyond it are padding in at least one model: mask them to -inf on BOTH sides
   (``mask_padded_vocab(logits, plan.kd_vocab_size)``) before any softmax, so the teacher's
   probability mass on ids the tokenizer never produces is dropped and its softmax renormalised.
4. Unless both tokenizers are known, different model vocab sizes are refused (nothing proves the
   vocabularies agree); pass the tokenizers.
5. Vocab-parallel logits only line up shard by shard if both models have the same padded size:
   build both with ``plan.padded_vocab_size(tp)`` (checkpoints load into a different padded size,
   the extra rows are zero).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from megatron_kd.models.config import ModelConfig


@dataclass(frozen=True)
class VocabPlan:
    """How teacher and student logits are compared."""

    kd_vocab_size: int
    """Ids [0, kd_vocab_size) take part in KD; mask every column beyond on both sides."""
    teacher_vocab_size: int
    """Teacher model's (unpadded) vocab_size."""
    student_vocab_size: int
    """Student model's (unpadded) vocab_size."""
    tokenizer_checked: bool
    """True when both tokenizers were known and found identical."""
    make_vocab_size_divisible_by: int = 128
    """Megatron padding granularity per TP rank."""

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Common padded embedding size for both models so their vocab shards align at this TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(max(self.teacher_vocab_size, self.student_vocab_size) / multiple) * multiple)


def _vocab_size(side: str, obj: ModelConfig | Mapping[str, Any] | int) -> int:
    if isinstance(obj, ModelConfig):
        return obj.vocab_size
    if isinstance(obj, int):
        return obj
    if isinstance(obj, Mapping):
        if "model_config" in obj:  # checkpoint meta
            return int(obj["model_config"]["vocab_size"])
        if "vocab_size" in obj:
            return int(obj["vocab_size"])
    raise ValueError(f"{side}: expected a ModelConfig, checkpoint meta or model-config dict, got {type(obj).__name__}")


@dataclass(frozen=True)
class TokenizerInfo:
    """What the rule needs to know about a tokenizer."""

    identity: str
    """Hash of the tokenizer's files (``Tokenizer.identity``) or, for a path, its vocab fingerprint."""
    vocab_size: int
    """Number of ids (largest id + 1, added tokens included)."""
    path: str | None = None
    """Where it was loaded from (to compute the vocab fingerprint when identities differ)."""


def vocab_fingerprint(path: str | Path) -> tuple[str, int]:
    """``("vocab:sha256:<hex>", n_ids)`` of the id -> token map of a tokenizer directory or .model file.

    Only the mapping matters for logit KD (not chat templates or max lengths, which the file hash
    in ``Tokenizer.identity`` also covers): HF ``tokenizer.json`` (model vocab + added tokens) or
    ``vocab.json`` (+ ``added_tokens.json``), or a SentencePiece model's pieces.
    """
    p = Path(path)
    pairs: dict[int, str] = {}
    if p.is_dir() and (p / "tokenizer.json").is_file():
        data = json.loads((p / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab") or {}
        if isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            pairs.update({i: piece for i, (piece, _) in enumerate(vocab)})
        else:
            pairs.update({int(i): tok for tok, i in vocab.items()})
        pairs.update({int(t["id"]): t["content"] for t in data.get("added_tokens") or []})
    elif p.is_dir() and (p / "vocab.json").is_file():
        pairs.update({int(i): t for t, i in json.loads((p / "vocab.json").read_text(encoding="utf-8")).items()})
        if (p / "added_tokens.json").is_file():
            added = json.loads((p / "added_tokens.json").read_text(encoding="utf-8"))
            pairs.update({int(i): t for t, i in added.items()})
    else:
        model = p / "tokenizer.model" if p.is_dir() else p
        if not model.is_file():
            raise FileNotFoundError(f"tokenizer {p} has no tokenizer.json, vocab.json or SentencePiece .model")
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
        pairs.update({i: sp.id_to_piece(i) for i in range(sp.get_piece_size())})
    h = hashlib.sha256()
    for i in sorted(pairs):
        h.update(f"{i}\t{pairs[i]}\n".encode())
    return "vocab:sha256:" + h.hexdigest(), (max(pairs) + 1 if pairs else 0)


def _tokenizer(tok: Any) -> TokenizerInfo | None:
    if tok is None or isinstance(tok, TokenizerInfo):
        return tok
    if hasattr(tok, "identity") and hasattr(tok, "vocab_size"):
        return TokenizerInfo(str(tok.identity), int(tok.vocab_size), getattr(tok, "path", None) or None)
    if isinstance(tok, (str, Path)):
        identity, size = vocab_fingerprint(tok)
        return TokenizerInfo(identity, size, str(tok))
    raise ValueError(f"tokenizer must be a path or a Tokenizer (with identity and vocab_size), "
                     f"got {type(tok).__name__}")


def _same_tokenizer(a: TokenizerInfo, b: TokenizerInfo) -> bool:
    if a.identity == b.identity:
        return True
    if a.path is None or b.path is None:
        return False
    # Different files (e.g. chat template, model_max_length) can still carry the same id -> token map.
    return vocab_fingerprint(a.path) == vocab_fingerprint(b.path)


def check_vocab_compatible(teacher_cfg_or_meta: ModelConfig | Mapping[str, Any] | int,
                           student_cfg_or_meta: ModelConfig | Mapping[str, Any] | int,
                           teacher_tokenizer: Any = None, student_tokenizer: Any = None) -> VocabPlan:
    """Apply the module's rule; return the :class:`VocabPlan` or raise a one-line ``ValueError``.

    Models: ``ModelConfig``, checkpoint meta (``read_checkpoint_meta``), a model-config dict or a
    vocab size. Tokenizers: ``megatron_kd.data.tokenizers.Tokenizer`` objects (anything with
    ``identity`` and ``vocab_size``, optionally ``path``), :class:`TokenizerInfo`, paths (HF
    tokenizer directory or SentencePiece .model; identified by :func:`vocab_fingerprint`) or None.
    """
    v_t = _vocab_size("teacher", teacher_cfg_or_meta)
    v_s = _vocab_size("student", student_cfg_or_meta)
    tok_t, tok_s = _tokenizer(teacher_tokenizer), _tokenizer(student_tokenizer)
    checked = tok_t is not None and tok_s is not None
    if checked and not _same_tokenizer(tok_t, tok_s):
        raise ValueError(f"teacher tokenizer ({tok_t.identity}) and student tokenizer ({tok_s.identity}) differ: "
                         "logit KD needs the same tokenizer for both models, or set kd.cross_tokenizer=uld "
                         "or hybrid to distil across tokenizers (docs/cross_tokenizer.md)")
    if not checked and v_t != v_s:
        raise ValueError(f"teacher vocab_size={v_t} and student vocab_size={v_s} differ and the tokenizers are "
                         "not both known to prove they share ids: pass both models' tokenizers")
    known = tok_t or tok_s
    if known is None:
        return VocabPlan(v_t, v_t, v_s, False)
    n_tok = int(known.vocab_size)
    for side, v in (("teacher", v_t), ("student", v_s)):
        if n_tok > v:
            fix = (f"set model.vocab_size=null (the student's vocabulary then comes from data.tokenizer) or >= {n_tok}"
                   if side == "student" else "use a teacher trained with this tokenizer (or pass teacher.tokenizer if "
                   "its checkpoint names the wrong one)")
            raise ValueError(f"{side} vocab_size={v} is smaller than the tokenizer's {n_tok} ids: the {side} model "
                             f"cannot score every token: {fix}")
    return VocabPlan(n_tok, v_t, v_s, checked)
