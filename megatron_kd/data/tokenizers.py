"""One tokenizer interface over SentencePiece models and local Hugging Face tokenizer directories.

Every tokenizer exposes ``encode``/``decode``, the end-of-document id ``eod``, a ``pad`` id, the
``vocab_size`` (largest id + 1) and an ``identity``: a stable hash of the files that define the
vocabulary. The identity goes into every dataset manifest, so a dataset is never silently read
with a different tokenizer than the one that wrote it::

    tok = load_tokenizer("out/tokenizer.model")          # SentencePiece
    tok = load_tokenizer("/models/Qwen2.5-0.5B")         # HF directory (tokenizer.json), no hub
    tok = train_sentencepiece(texts, 4096, "out/tok")    # writes out/tok.model + manifest

Nothing here downloads anything.
"""
from __future__ import annotations

import abc
import hashlib
import io
import os
import platform
from pathlib import Path
from typing import Iterable, Iterator, Sequence

# Files of a Hugging Face tokenizer directory that change how text maps to ids (hashed, in order).
_HF_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
)


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses pickle by path (cheap to send to worker processes)."""

    kind: str = "abstract"
    path: str = ""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added: preprocessing appends ``eod`` itself)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, single-threaded (callers parallelise with processes)."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of token ids."""

    @property
    @abc.abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended after every document by ``preprocess --append-eod``."""

    @property
    @abc.abstractmethod
    def pad(self) -> int:
        """Padding id: the vocabulary's pad piece, or ``eod`` when it has none (always a valid id)."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (largest id + 1), including added/special tokens."""

    @property
    @abc.abstractmethod
    def identity(self) -> str:
        """Stable ``"<kind>:sha256:<hex>"`` hash of the files that define the vocabulary."""

    def describe(self) -> dict:
        """What a manifest records about this tokenizer."""
        return {"kind": self.kind, "path": self.path, "identity": self.identity,
                "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}

    def __reduce__(self):
        return (load_tokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file. ``eod`` is its ``</s>`` (eos) piece."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = str(path)
        data = Path(path).read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception:  # noqa: BLE001 - sentencepiece raises bare RuntimeError/OSError
            raise ValueError(f"{path} is not a valid SentencePiece model: pass a .model file "
                             "written by SentencePiece (or an HF tokenizer directory)") from None
        self._identity = "sentencepiece:sha256:" + hashlib.sha256(data).hexdigest()
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {path} has no end-of-sequence piece (eos_id=-1): "
                             "retrain it with eos_id >= 0 so documents can be separated")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # num_threads=1: parallelism is the caller's job (worker processes); the sentencepiece
        # default would use every core and make "1 worker" meaningless.
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def eod(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad(self) -> int:
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else self.eod

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def identity(self) -> str:
        return self._identity

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id ``i`` (for debugging and tests)."""
        return self._sp.id_to_piece(int(i))


def _hash_files(directory: Path, names: Iterable[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        f = directory / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


class HFTokenizer(Tokenizer):
    """A local Hugging Face tokenizer directory (``tokenizer.json`` etc.), loaded offline."""

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"cannot load a Hugging Face tokenizer from {path} ({first[:200]}): "
                             "pass a directory holding tokenizer.json / tokenizer_config.json") from None
        # The Rust backend encodes without the "sequence longer than model_max_length" warning.
        self._fast = getattr(self._tok, "backend_tokenizer", None)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {path} has no eos token: set \"eos_token\" in its "
                             "tokenizer_config.json so documents can be separated")
        self._eod = int(eos)
        pad = self._tok.pad_token_id
        self._pad = int(pad) if pad is not None else self._eod
        self._vocab_size = len(self._tok)
        self._identity = "huggingface:sha256:" + _hash_files(Path(self.path), _HF_FILES)

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def identity(self) -> str:
        return self._identity


WORD_SPECIALS = ("<pad>", "<eos>")


class WordTokenizer(Tokenizer):
    """Whitespace tokenizer over a fixed word list (synthetic tasks, tests, CPU demos); id 0 = ``<pad>``,
    id 1 = ``<eos>``. Saved as a JSON file ``{"kind": "word", "words": [...]}`` that
    :func:`load_tokenizer` reads like any other tokenizer path. Unknown words raise ``ValueError``."""

    kind = "word"

    def __init__(self, words: Iterable[str], path: str = ""):
        self.words = list(WORD_SPECIALS) + [w for w in words if w not in WORD_SPECIALS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.path = str(path)
        self._identity = "word:sha256:" + hashlib.sha256("\n".join(self.words).encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Ids of the whitespace-separated words of ``text``."""
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as exc:
            raise ValueError(f"word {exc.args[0]!r} is not in the tokenizer vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces (special tokens dropped)."""
        return " ".join(self.words[i] for i in ids if i >= len(WORD_SPECIALS))

    @property
    def eod(self) -> int:
        return 1

    @property
    def pad(self) -> int:
        return 0

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def identity(self) -> str:
        return self._identity

    def save(self, path: str | os.PathLike) -> None:
        """Write the word list as JSON (atomically; reload with :func:`load_tokenizer` or :meth:`load`)."""
        import json

        from megatron_kd.utils.io import atomic_write

        with atomic_write(path) as fh:
            fh.write(json.dumps({"kind": self.kind, "words": self.words[len(WORD_SPECIALS):]}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        """Read a word list written by :meth:`save`."""
        import json

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"tokenizer {path} is not readable JSON ({exc}): pass a word-list file written "
                             "by WordTokenizer.save, a SentencePiece .model or a Hugging Face directory") from None
        if not isinstance(data, dict) or data.get("kind") != cls.kind or not isinstance(data.get("words"), list):
            raise ValueError(f"{path} is not a word-tokenizer file (expected {{\"kind\": \"word\", \"words\": "
                             "[...]}): pass a SentencePiece .model or a Hugging Face tokenizer directory instead")
        return cls(data["words"], path=str(path))

    def __reduce__(self):  # pickles by value: a task tokenizer may never have been saved
        return (WordTokenizer, (self.words[len(WORD_SPECIALS):], self.path))


def load_tokenizer(path: str | os.PathLike | Tokenizer) -> Tokenizer:
    """Load a tokenizer from ``path``: a SentencePiece ``.model`` file, a Hugging Face tokenizer
    directory (``tokenizer.json`` / ``tokenizer_config.json``) or its ``tokenizer.json``, a directory
    holding only a SentencePiece ``tokenizer.model``, or a word-list JSON (:class:`WordTokenizer`). A :class:`Tokenizer` is returned unchanged."""
    if isinstance(path, Tokenizer):
        return path
    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        if p.name == "tokenizer.json":  # a Hugging Face tokenizer file: load its directory
            return HFTokenizer(p.parent)
        return WordTokenizer.load(p)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer {p} does not exist: pass a SentencePiece .model file or "
                                "a local Hugging Face tokenizer directory (or run train-tokenizer)")
    if p.is_dir():
        if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
            return HFTokenizer(p)
        if (p / "word_tokenizer.json").is_file():  # a checkpoint's bundled word-list tokenizer
            return WordTokenizer.load(p / "word_tokenizer.json")
        if (p / "tokenizer.model").is_file():
            return SentencePieceTokenizer(p / "tokenizer.model")
        raise ValueError(f"tokenizer directory {p} has no tokenizer.json, tokenizer_config.json or "
                         "tokenizer.model: pass a Hugging Face tokenizer directory or a .model file")
    return SentencePieceTokenizer(p)


def _lines(texts: Iterable[str], max_lines: int | None) -> Iterator[str]:
    """Non-empty lines of ``texts``: SentencePiece trains on sentences without newlines (the
    newline itself is a user-defined piece, so no piece ever spans one)."""
    n = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
                n += 1
                if max_lines is not None and n >= max_lines:
                    return


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_prefix: str,
    model_type: str = "bpe",
    max_lines: int | None = 2_000_000,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Train a SentencePiece tokenizer on ``texts`` and write ``{out_prefix}.model`` (+ a manifest
    ``{out_prefix}.manifest.json``), atomically. Returns the loaded tokenizer.

    Deterministic (one trainer thread, no sampling: the first ``max_lines`` non-empty lines are
    used). Byte fallback means any text encodes with no ``<unk>``; the text is not normalised and
    whitespace is kept, so ``decode(encode(s)) == s``. Special ids: unk 0, bos 1, eos (= eod) 2,
    pad 3; ``"\\n"`` is a piece of its own.
    """
    import sentencepiece as spm

    from megatron_kd.utils.io import atomic_write, write_json_atomic

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}: choose 'bpe' or 'unigram'")
    if vocab_size < 4 + 256 + 2:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs at least 262 ids")
    stats = {"lines": 0, "chars": 0}

    def counted(lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            stats["lines"] += 1
            stats["chars"] += len(line)
            yield line

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(_lines(texts, max_lines)), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            character_coverage=character_coverage, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True, user_defined_symbols=["\n"], max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=1, minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else "training failed"
        import re

        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if need:  # more distinct characters than ids: the vocabulary must grow (byte fallback adds 256)
            raise ValueError(f"vocab_size {vocab_size} is too small for {out_prefix}.model: the text has "
                             f"{int(need.group(1))} required characters and special pieces; use a vocab_size "
                             f"of at least {int(need.group(1)) + 1}") from None
        raise ValueError(f"SentencePiece training for {out_prefix}.model failed ({msg}): use a "
                         "smaller vocab_size or more text") from None
    if stats["lines"] == 0:
        raise ValueError(f"no text to train the tokenizer {out_prefix}.model on: pass non-empty texts")
    model_path = Path(f"{out_prefix}.model")
    with atomic_write(model_path, "wb") as fh:
        fh.write(model.getvalue())
    tok = SentencePieceTokenizer(model_path)
    write_json_atomic(f"{out_prefix}.manifest.json", {
        "format": "megatron-kd/tokenizer", "version": 1, "file": model_path.name,
        "tokenizer": tok.describe(), "model_type": model_type, "vocab_size": vocab_size,
        "trained_on": {"lines": stats["lines"], "chars": stats["chars"], "max_lines": max_lines},
        "created_by": {"tool": "megatron_kd.data.tokenizers.train_sentencepiece",
                       "sentencepiece": spm.__version__, "python": platform.python_version()},
    })
    return tok
