"""Byte-offset key of a logits store: one teacher store serves students of any tokenizer.

The store keys targets by *teacher token position* ``(document d, offset o)``: position ``o``
holds the teacher's distribution of token ``o + 1`` of document ``d``. Next to it
``megatron-kd logits`` writes the **byte key** (when the teacher's tokenizer has a byte table,
:func:`megatron_kd.data.alignment.token_bytes`)::

    STORE/byte_ends.npy     int32/int64 [num_tokens]: byte end of teacher position (d, o) in
                            document d's UTF-8 text, at index documents[d] + o (-1: a special
                            token, which has no bytes)
    STORE/doc_text.npy      int64 [num_documents, 2]: each document's text length in bytes and a
                            63-bit BLAKE2b digest of its bytes (the source-text check)
    STORE/byte_key_tokenizer/  a copy of the tokenizer the offsets were computed with

    manifest.json "byte_key": {files, sha256s, tokenizer {path, identity, vocab_size}, ...}

Position ``(d, o)`` has seen document ``d`` up to byte ``byte_ends[d, o]`` and predicts "the text
after that byte", whatever the tokenizer. A student reads **its own** tokenisation of the same
documents (same order, its own indexed dataset): each student position gets its token's byte end
(computed from the student ids at load time), is aligned with the teacher position ending at the
same byte (:func:`~megatron_kd.data.alignment.align_ends`: ``exact`` or ``nearest_earlier``, as
online), and takes that position's stored sparse targets -- over the *teacher's* vocabulary; the
cross-tokenizer losses (``uld`` / ``hybrid`` / ``projected``) compare them with the student's
distribution (:mod:`megatron_kd.distill.cross_tokenizer`).

The student's documents must be the store's source text: same number of documents, each with the
same bytes (lengths checked for all documents when the dataset is opened, digests for every
document as it is first read). Anything else is refused in one line.
"""
from __future__ import annotations

import hashlib
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megatron_kd.data.alignment import RULES, TokenBytes, align_ends, token_bytes
from megatron_kd.logits import manifest as mf

BYTE_ENDS = "byte_ends.npy"
DOC_TEXT = "doc_text.npy"
TOKENIZER_DIR = "byte_key_tokenizer"
KEY = "byte_key"


class PieceTable:
    """A :class:`~megatron_kd.data.alignment.TokenBytes` as flat numpy arrays (vectorised bytes)."""

    def __init__(self, table: TokenBytes):
        self.table = table
        pieces = [p or b"" for p in table.pieces]
        self.lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        self.special = np.array([p is None for p in table.pieces], dtype=bool)
        self.offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.flat = np.frombuffer(b"".join(pieces), dtype=np.uint8) if self.offsets[-1] else np.zeros(0, np.uint8)

    def _check(self, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.lengths)):
            raise ValueError(f"token id {int(ids.max())} is outside the tokenizer's {len(self.lengths)} ids: the "
                             "dataset was tokenized with another tokenizer")

    def _shift(self, ids: np.ndarray) -> int:
        """1 when the tokenizer prepended a dummy space to this document (its first byte is virtual)."""
        if not self.table.dummy_prefix:
            return 0
        text = ids[~self.special[ids]]
        return int(len(text) > 0 and self.lengths[text[0]] > 0 and self.flat[self.offsets[text[0]]] == 0x20)

    def ends(self, ids: np.ndarray) -> np.ndarray:
        """Byte end (in the document's text) of every token of one document; -1 for special ids."""
        ids = np.asarray(ids, dtype=np.int64)
        self._check(ids)
        ends = np.cumsum(self.lengths[ids]) - self._shift(ids)
        return np.where(self.special[ids], -1, np.maximum(ends, 0))

    def text(self, ids: np.ndarray) -> bytes:
        """The document's UTF-8 text (dummy prefix removed)."""
        ids = np.asarray(ids, dtype=np.int64)
        self._check(ids)
        lens = self.lengths[ids]
        total = int(lens.sum())
        if total == 0:
            return b""
        first = np.repeat(self.offsets[ids] - (np.cumsum(lens) - lens), lens)
        data = self.flat[first + np.arange(total)].tobytes()
        return data[self._shift(ids):]


def text_digest(data: bytes) -> int:
    """63-bit digest of a document's bytes."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def byte_table(tokenizer: Any, what: str):
    """``(Tokenizer, PieceTable)`` of a tokenizer path/object; one-line error without a byte table."""
    from megatron_kd.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    table = token_bytes(tok)
    if table is None:
        raise ValueError(f"{what} tokenizer {getattr(tok, 'path', tokenizer)} has no byte table (WordPiece-style "
                         "vocabulary?): a byte-offset key needs SentencePiece or a byte-level/metaspace HF tokenizer")
    return tok, PieceTable(table)


def compute_byte_key(prefix: str, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(byte_ends [num_tokens], doc_text [num_documents, 2])`` of an indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _, table = byte_table(tokenizer, "the store's")
    ds = IndexedDataset(mf.strip_dataset_prefix(prefix), mmap=True)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    ends = np.empty(int(lengths.sum()), dtype=np.int64)
    docs = np.empty((len(lengths), 2), dtype=np.int64)
    pos = 0
    for d, n in enumerate(lengths):
        ids = np.asarray(ds.get(d), dtype=np.int64)
        ends[pos:pos + n] = table.ends(ids)
        data = table.text(ids)
        docs[d] = (len(data), text_digest(data))
        pos += int(n)
    if len(ends) and ends.max() < 2 ** 31 - 1:
        ends = ends.astype(np.int32)
    return ends, docs


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    tmp.replace(path)


def _copy_tokenizer(src: str, store: Path) -> str:
    dst_dir = store / TOKENIZER_DIR
    tmp = store / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    src_p = Path(src)
    if src_p.is_dir():
        shutil.copytree(src_p, tmp)
        name = ""
    else:
        tmp.mkdir(parents=True)
        shutil.copy2(src_p, tmp / src_p.name)
        name = src_p.name
    shutil.rmtree(dst_dir, ignore_errors=True)
    tmp.replace(dst_dir)
    return f"{TOKENIZER_DIR}/{name}" if name else TOKENIZER_DIR


def write_byte_key(store: str | Path, prefix: str, tokenizer: str) -> dict[str, Any]:
    """Compute the byte key of ``store`` (complete, on dataset ``prefix``, whose ids are
    ``tokenizer``'s) and record it in the manifest. Idempotent: an existing key of the same
    tokenizer and dataset is kept."""
    from megatron_kd.utils.io import sha256_file, write_json_atomic

    store = Path(store)
    man = mf.read_store_manifest(store)
    tok, _ = byte_table(tokenizer, "the store's")
    recorded = mf.tokenizer_identity((mf.dataset_identity(prefix) or {}).get("tokenizer"))
    if recorded and recorded != tok.identity:
        raise ValueError(f"--byte-key-tokenizer {tok.path} is not the tokenizer dataset {prefix} was made with "
                         f"(its manifest records {recorded[-12:]}): pass that tokenizer")
    old = man.get(KEY)
    if (old and old.get("tokenizer", {}).get("identity") == tok.identity
            and all((store / f).is_file() for f in (BYTE_ENDS, DOC_TEXT))):
        return old
    ends, docs = compute_byte_key(prefix, tok)
    if len(ends) != man["num_tokens"] or len(docs) != man["num_documents"]:
        raise ValueError(f"dataset {prefix} has {len(docs)} documents / {len(ends)} tokens but logits store {store} "
                         f"covers {man['num_documents']} / {man['num_tokens']}: pass the store's own --data")
    _save_npy(store / BYTE_ENDS, ends)
    _save_npy(store / DOC_TEXT, docs)
    key = {"byte_ends": BYTE_ENDS, "byte_ends_sha256": sha256_file(store / BYTE_ENDS),
           "doc_text": DOC_TEXT, "doc_text_sha256": sha256_file(store / DOC_TEXT),
           "tokenizer": {"path": _copy_tokenizer(str(tok.path), store), "source": str(tok.path),
                         "identity": tok.identity, "vocab_size": int(tok.vocab_size)},
           "total_bytes": int(docs[:, 0].sum()),
           "rule": "byte_ends[documents[d] + o] = byte offset, in document d's UTF-8 text, after teacher token o "
                   "(-1: special token); doc_text[d] = (bytes, blake2b-63 digest)"}
    man = mf.read_store_manifest(store)
    man[KEY] = key
    write_json_atomic(store / mf.MANIFEST, man)
    return key


def default_key_tokenizer(prefix: str, teacher_tokenizer: Optional[str]) -> Optional[str]:
    """The tokenizer the dataset manifest names (it tokenized the data), else the teacher's."""
    from megatron_kd.data.manifest import manifest_tokenizer_path

    path = manifest_tokenizer_path(prefix)  # recorded relative to the dataset (older: to the launch dir)
    if path:
        return str(path)
    return teacher_tokenizer if teacher_tokenizer and Path(teacher_tokenizer).exists() else None


class ByteKey:
    """Read side of a store's byte key (memory-mapped; cheap to pickle)."""

    def __init__(self, store: Any):
        from megatron_kd.logits.store import LogitsStore

        self.store = store if isinstance(store, LogitsStore) else LogitsStore(store)
        self.meta = self.store.manifest.get(KEY)
        if not self.meta:
            raise ValueError(f"logits store {self.store.path} has no byte-offset key, so it serves only students of "
                             "the teacher's tokenizer: rerun megatron-kd logits with the same arguments and "
                             "--byte-key-tokenizer <the data's tokenizer> to add it")
        self._ends: Optional[np.ndarray] = None
        self._docs: Optional[np.ndarray] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.store.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    @property
    def tokenizer_path(self) -> str:
        """The copy of the key's (teacher's) tokenizer inside the store."""
        return str(self.store.path / self.meta["tokenizer"]["path"])

    @property
    def vocab_size(self) -> int:
        """Ids of the key's (teacher's) tokenizer."""
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def doc_text(self) -> np.ndarray:
        """int64 [num_documents, 2]: bytes and digest of each document."""
        if self._docs is None:
            self._docs = np.load(self.store.path / self.meta["doc_text"], mmap_mode="r")
        return self._docs

    def ends(self, doc: int) -> np.ndarray:
        """Byte ends of every teacher position of ``doc`` (int64)."""
        if self._ends is None:
            self._ends = np.load(self.store.path / self.meta["byte_ends"], mmap_mode="r")
        docs = self.store.documents
        return np.asarray(self._ends[int(docs[doc]):int(docs[doc + 1])], dtype=np.int64)


class StudentText:
    """A student's indexed dataset seen as byte offsets: per-document token byte ends and the
    source-text check against a :class:`ByteKey` (lengths of all documents at once, each
    document's digest on first use)."""

    def __init__(self, indexed: Any, tokenizer: Any, key: ByteKey, cache_docs: int = 64):
        self.ds, self.key = indexed, key
        self.tokenizer, self.table = byte_table(tokenizer, "the student")
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_docs = cache_docs
        self.checked: set[int] = set()
        self.check_lengths()
        n = len(self.ds.sequence_lengths)
        for d in sorted(set(np.linspace(0, n - 1, min(n, 32)).astype(int).tolist())):
            self.ends(d)  # digests of a spread of documents now; every other one when first read

    def _where(self) -> str:
        return str(getattr(self.ds, "path_prefix", "the student dataset"))

    def check_lengths(self) -> None:
        """Same number of documents, each with the same number of bytes, as the store's text."""
        lengths = np.asarray(self.ds.sequence_lengths, dtype=np.int64)
        want = np.asarray(self.key.doc_text[:, 0])
        if len(lengths) != len(want):
            raise ValueError(f"student dataset {self._where()} has {len(lengths)} documents but logits store "
                             f"{self.key.store.path} was computed on {len(want)}: the student's dataset must be the "
                             "store's source text (same documents, same order) tokenized with the student tokenizer")
        for d0 in range(0, len(lengths), 1024):
            d1 = min(d0 + 1024, len(lengths))
            part = self.ds[d0:d1] if d1 - d0 > 1 else [self.ds.get(d0)]
            got = np.array([len(self.table.text(np.asarray(x, dtype=np.int64))) if self.table.table.dummy_prefix
                            else int(self.table.lengths[self._ids(x)].sum()) for x in part], dtype=np.int64)
            bad = np.flatnonzero(got != want[d0:d1])
            if len(bad):
                d = d0 + int(bad[0])
                raise ValueError(f"student dataset {self._where()} is not the source text of logits store "
                                 f"{self.key.store.path}: document {d} has {int(got[bad[0]])} bytes, the store's "
                                 f"has {int(want[d])}; build the student's dataset from the same documents, "
                                 "in the same order")

    def _ids(self, x: Any) -> np.ndarray:
        ids = np.asarray(x, dtype=np.int64)
        self.table._check(ids)
        return ids

    def ends(self, doc: int) -> np.ndarray:
        """Byte ends of the student tokens of ``doc`` (checked against the store's digest once)."""
        hit = self.cache.get(doc)
        if hit is not None:
            self.cache.move_to_end(doc)
            return hit
        ids = np.asarray(self.ds.get(doc), dtype=np.int64)
        if doc not in self.checked:
            data = self.table.text(ids)
            want_n, want_h = (int(x) for x in self.key.doc_text[doc])
            if len(data) != want_n or text_digest(data) != want_h:
                raise ValueError(f"student dataset {self._where()} is not the source text of logits store "
                                 f"{self.key.store.path}: document {doc} differs from the store's (bytes or "
                                 "digest); build the student's dataset from the same documents, in the same order")
            self.checked.add(doc)
        out = self.table.ends(ids)
        self.cache[doc] = out
        if len(self.cache) > self.cache_docs:
            self.cache.popitem(last=False)
        return out


def byte_keyed_targets(gpt_dataset: Any, idx: int, key: ByteKey, student: StudentText, k_max: int,
                       rule: str = "exact", pad_logprob: float = float("-inf")
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher targets of a *student* sample: ``(ids int64 [S, k], logprobs float32 [S, k],
    teacher_pos int64 [S])`` over the teacher's vocabulary, aligned with the sample's labels.

    Student position ``j`` (input token ``(d, o)``, label the next token of the same document)
    takes the stored targets of the teacher position of document ``d`` ending at the same byte
    (``rule``); ``teacher_pos`` is that position's offset in ``d`` (-1: none, the row is padding).
    """
    from megatron_kd.logits.dataset import sample_positions

    store = key.store
    S = gpt_dataset.config.sequence_length
    docs, offs = sample_positions(gpt_dataset, idx)
    if len(docs) == S:
        docs, offs = np.append(docs, -1), np.append(offs, -1)
    ok = (docs[:S] >= 0) & (docs[1:] == docs[:S]) & (offs[1:] == offs[:S] + 1)
    ids = np.full((S, k_max), -1, dtype=np.int64)
    lps = np.full((S, k_max), pad_logprob, dtype=np.float32)
    tpos = np.full(S, -1, dtype=np.int64)
    j = np.flatnonzero(ok)
    if not len(j):
        return ids, lps, tpos
    breaks = np.flatnonzero(docs[j[1:]] != docs[j[:-1]]) + 1
    for run in np.split(j, breaks):
        d = int(docs[run[0]])
        s_ends = student.ends(d)[offs[run]]
        k = align_ends(s_ends, key.ends(d), rule)
        good = k >= 0
        if not good.any():
            continue
        lo, hi = int(k[good].min()), int(k[good].max()) + 1
        i_r, l_r = store.get(d, lo, hi - lo, k_max=k_max, pad_logprob=pad_logprob)
        rows = run[good]
        ids[rows], lps[rows] = i_r[k[good] - lo], l_r[k[good] - lo]
        tpos[rows] = k[good]
    has = ids[:, 0] >= 0
    tpos[~has] = -1
    return ids, lps, tpos


class ByteKeyedTargetsDataset(torch.utils.data.Dataset):
    """A student ``GPTDataset`` (any tokenizer) whose samples carry the store's teacher targets
    through the byte key: ``target_ids`` [S, k] (teacher ids, -1 padding), ``target_logprobs``
    [S, k] and ``xtok_index`` [S] (the aligned teacher position in the document, -1 = none).

    Args:
        gpt_dataset: a megatron ``GPTDataset`` over the student's indexed dataset.
        store: a store with a byte key (a :class:`ByteKey`, ``LogitsStore`` or path).
        student_tokenizer: the student dataset's tokenizer (path or object).
        k_max: entries per position (default: the store's ``max_entries``).
        rule: ``exact`` | ``nearest_earlier`` (:func:`~megatron_kd.data.alignment.align_ends`).
    """

    def __init__(self, gpt_dataset: Any, store: Any, student_tokenizer: Any, k_max: Optional[int] = None,
                 rule: str = "exact", pad_logprob: float = float("-inf")):
        if rule not in RULES:
            raise ValueError(f"kd.alignment={rule!r} is not one of {', '.join(RULES)}")
        self.gpt_dataset = gpt_dataset
        self.key = store if isinstance(store, ByteKey) else ByteKey(store)
        self.k_max = self.key.store.max_entries if k_max is None else int(k_max)
        self.rule, self.pad_logprob = rule, pad_logprob
        self.student = StudentText(gpt_dataset.dataset, student_tokenizer, self.key)

    def __len__(self) -> int:
        return len(self.gpt_dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = dict(self.gpt_dataset[idx])
        ids, lps, tpos = byte_keyed_targets(self.gpt_dataset, idx, self.key, self.student, self.k_max, self.rule,
                                            self.pad_logprob)
        sample["target_ids"] = torch.from_numpy(ids)
        sample["target_logprobs"] = torch.from_numpy(lps)
        sample["xtok_index"] = torch.from_numpy(tpos)
        return sample
