"""The tokenizer side of a Hugging Face export: a directory ``AutoTokenizer`` loads, for every
tokenizer megatron-kd trains with, plus the special-token ids ``generate`` needs.

- SentencePiece ``.model`` (what ``train-tokenizer`` and the quickstart write): converted to a fast
  tokenizer (``tokenizer.json``) with transformers' SentencePiece converter, which follows the
  model's own normaliser settings, so ids equal ``SentencePieceProcessor.encode`` (checked on the
  demo corpus in tests/interop/test_hf_export.py); control pieces (``<s>``, ``</s>``, ``<pad>``,
  ``<unk>``) become special tokens; ``tokenizer.model`` is kept beside it.
- Hugging Face tokenizer directory: its files are copied; an ``eos_token`` is required.

:func:`special_token_ids` gives ``eos/bos/pad`` ids for ``config.json`` and
``generation_config.json`` (:func:`generation_config`), so that ``generate`` stops at EOS.
Offline: nothing is downloaded.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megatron_kd.utils.artifacts import SPM_FILE, copy_tokenizer_files

#: SentencePiece piece types (sentencepiece_model.proto): 2 unknown, 3 control.
_UNKNOWN, _CONTROL = 2, 3


def spm_model_file(src: str | Path) -> Path | None:
    """The SentencePiece model of tokenizer ``src`` (a ``.model`` file, or a directory holding only
    ``tokenizer.model`` and no ``tokenizer.json``), else None."""
    p = Path(src)
    if p.is_file():
        return p
    if (p / SPM_FILE).is_file() and not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        return p / SPM_FILE
    return None


def sentencepiece_to_fast(model_file: str | Path):
    """A ``PreTrainedTokenizerFast`` equivalent to the SentencePiece model ``model_file``."""
    import sentencepiece.sentencepiece_model_pb2 as model_pb2
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.convert_slow_tokenizer import SpmConverter

        build = SpmConverter.build_tokenizer_from_spm_proto
    except (ImportError, AttributeError):
        raise ValueError("this transformers version cannot convert a SentencePiece model to a fast tokenizer "
                         "(SpmConverter.build_tokenizer_from_spm_proto is missing): pip install -U transformers "
                         "or pass --tokenizer with a Hugging Face tokenizer directory") from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    pieces = list(proto.pieces)
    if proto.trainer_spec.model_type == 2:  # BPE: merges follow piece scores
        vocab: Any = {p.piece: i for i, p in enumerate(pieces)}
    elif proto.trainer_spec.model_type == 1:  # Unigram
        vocab = [(p.piece, p.score) for p in pieces]
    else:
        raise ValueError(f"SentencePiece model {model_file} has model_type {proto.trainer_spec.model_type} "
                         "(word/char): only BPE and Unigram models convert to a fast tokenizer")
    backend = build(proto, vocab)
    if backend is None:
        raise ValueError(f"cannot convert SentencePiece model {model_file} to a fast tokenizer")
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in pieces if p.type in (_UNKNOWN, _CONTROL)])

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    spec = proto.trainer_spec
    eos = piece(spec.eos_id)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=piece(spec.unk_id), bos_token=piece(spec.bos_id),
                                   eos_token=eos, pad_token=piece(spec.pad_id) or eos)


def export_tokenizer(src: str | Path, out_dir: str | Path) -> dict[str, int | None]:
    """Write tokenizer ``src`` into the HF model directory ``out_dir`` so that ``AutoTokenizer``
    loads it; return its :func:`special_token_ids`. SentencePiece models are converted (see the
    module doc), HF tokenizer directories copied."""
    out_dir = Path(out_dir)
    spm = spm_model_file(src)
    if spm is not None:
        fast = sentencepiece_to_fast(spm)
        fast.save_pretrained(str(out_dir))
        _portable_tokenizer_config(out_dir)
        shutil.copyfile(spm, out_dir / SPM_FILE)
    elif not copy_tokenizer_files(src, out_dir):
        raise ValueError(f"tokenizer {src} has no tokenizer files to export: pass --tokenizer with a SentencePiece "
                         ".model or a Hugging Face tokenizer directory")
    return special_token_ids(out_dir)


def _portable_tokenizer_config(out_dir: Path) -> None:
    """Name the generic fast class (transformers 4.x has no ``TokenizersBackend``)."""
    from megatron_kd.utils.io import read_json, write_json_atomic

    path = out_dir / "tokenizer_config.json"
    cfg = read_json(path, "tokenizer config")
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    write_json_atomic(path, cfg)


def special_token_ids(tok_dir: str | Path) -> dict[str, int | None]:
    """``eos_token_id``, ``bos_token_id``, ``pad_token_id`` of the tokenizer in ``tok_dir`` (loaded
    with ``AutoTokenizer``, offline); pad falls back to eos. One-line error without an eos token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"the exported tokenizer in {tok_dir} does not load with AutoTokenizer ({first})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tok_dir} has no eos token: set \"eos_token\" in its tokenizer_config.json "
                         "so that generation can stop")
    eos = int(tok.eos_token_id)
    bos = int(tok.bos_token_id) if tok.bos_token_id is not None else None
    pad = int(tok.pad_token_id) if tok.pad_token_id is not None else eos
    return {"eos_token_id": eos, "bos_token_id": bos, "pad_token_id": pad}


def generation_config(ids: dict[str, int | None], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``generation_config.json`` content: ``base`` (e.g. the imported model's) with missing
    ``eos/bos/pad_token_id`` filled from ``ids``."""
    out = dict(base or {})
    for key, value in ids.items():
        if out.get(key) is None and value is not None:
            out[key] = value
    out.setdefault("_from_model_config", False)
    return out


__all__ = ["export_tokenizer", "generation_config", "sentencepiece_to_fast", "special_token_ids", "spm_model_file"]
