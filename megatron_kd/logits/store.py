"""Reading a teacher-logits store: random access by (document, offset), checks, verification."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from megatron_kd.logits import codec, manifest as mf
from megatron_kd.logits.selection import DRAWS_ENCODING, TARGET_KINDS, store_layout, target_weights
from megatron_kd.logits.shard import ShardReader


class LogitsStore:
    """Read-only view of a complete store; cheap to pickle (DataLoader workers reopen it lazily).

    ``get(doc, offset, length)`` returns the stored targets of positions ``offset ..
    offset+length-1`` of document ``doc``: position ``o`` holds the teacher's distribution of token
    ``o + 1`` (a document's last position has none and comes back as padding).

    ``target_kind`` says what ``get`` returns as values: ``"logprobs"`` (``method = topk``: teacher
    log-probs) or ``"weights"`` (sampled methods: log target weights, ``sum exp = 1`` per token).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = mf.read_store_manifest(self.path)
        s = self.manifest["settings"]
        if s.get("encoding") not in (codec.ENCODING, DRAWS_ENCODING):
            raise ValueError(f"logits store {self.path} uses encoding {s.get('encoding')!r}; this code reads "
                             f"{codec.ENCODING!r} and {DRAWS_ENCODING!r}: recompute the store")
        self.method: str = s.get("method", "topk")
        if self.method not in TARGET_KINDS:
            raise ValueError(f"logits store {self.path} has unknown method {self.method!r}: recompute the store")
        self.target_kind: str = TARGET_KINDS[self.method]
        self.layout = store_layout(s)
        self.num_samples: int | None = s.get("num_samples")
        self.proposal_temperature: float = float(s.get("proposal_temperature", 1.0))
        self.max_entries: int = int(s.get("max_entries", s["top_k"]))
        """Most entries one position holds (the default ``k_max``)."""
        self.top_k: int = s["top_k"]
        self.top_p: float = s["top_p"]
        self.vocab_size: int = s["vocab_size"]
        self.seq_length: int = s["seq_length"]
        self.id_bits: int = s["id_bits"]
        self.value_step: float = s["value_step"]
        shards = self.manifest["shards"]
        self._shard_doc_lo = np.array([r["doc_lo"] for r in shards], dtype=np.int64)
        self._shard_token_lo = np.array([r["token_lo"] for r in shards], dtype=np.int64)
        self._shard_files = [self.path / mf.SHARDS / r["file"] for r in shards]
        self._docs: np.ndarray | None = None
        self._readers: dict[int, ShardReader] = {}

    VERIFIED_CACHE = ".verified.json"

    def check_integrity(self) -> None:
        """Refuse (one-line ``ValueError``) a store that ``megatron-kd logits --verify`` would reject:
        sizes, headers and every file's sha256 against the manifest. The hashes are read once and
        cached in ``.verified.json`` per file (size, mtime); later opens of an unchanged store only stat."""
        import json

        cache_path = self.path / self.VERIFIED_CACHE
        try:
            cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
        except (OSError, ValueError):
            cache = {}
        key = self.manifest.get("byte_key") or {}
        files = [self.path / mf.DOCUMENTS, *self._shard_files,
                 *(self.path / key[k] for k in ("byte_ends", "doc_text") if k in key)]
        stamps = {}
        for f in files:
            st = f.stat() if f.is_file() else None
            stamps[f.name] = [st.st_size, st.st_mtime_ns] if st else None
        if cache.get("manifest") == self.manifest.get("shards") and cache.get("stamps") == stamps:
            return
        problems = verify_store(self.path, checksums=True)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"logits store {self.path} is damaged: {problems[0]}{more}; recompute the damaged "
                             "shards (delete them and rerun megatron-kd logits) or use another store")
        try:
            from megatron_kd.utils.io import write_json_atomic

            write_json_atomic(cache_path, {"manifest": self.manifest.get("shards"), "stamps": stamps})
        except OSError:
            pass  # a read-only store is verified again next time

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}  # memory maps are reopened in the receiving process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    @property
    def documents(self) -> np.ndarray:
        """int64 [num_documents + 1]: first token of each document (memory-mapped)."""
        if self._docs is None:
            self._docs = np.load(self.path / mf.DOCUMENTS, mmap_mode="r")
        return self._docs

    @property
    def num_documents(self) -> int:
        """Documents of the dataset the store covers."""
        return int(self.manifest["num_documents"])

    def document_length(self, doc: int) -> int:
        """Tokens in document ``doc``."""
        return int(self.documents[doc + 1] - self.documents[doc])

    def _reader(self, shard: int) -> ShardReader:
        r = self._readers.get(shard)
        if r is None:
            r = self._readers[shard] = ShardReader(self._shard_files[shard])
        return r

    def get(self, doc: int, offset: int = 0, length: int | None = None, k_max: int | None = None,
            pad_logprob: float = float("-inf"), sort: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Targets of positions ``[offset, offset + length)`` of document ``doc``.

        Returns ``ids`` int64 [length, k_max] (-1 = padding) and ``logprobs`` float32
        [length, k_max] (``pad_logprob`` at padding), log-probs normalised over the full
        vocabulary at temperature 1 -- or, for a ``weights`` store, log target weights
        (``sum exp = 1`` per token). ``k_max`` defaults to the store's ``max_entries``; with
        ``sort`` entries come by decreasing value (a token with more than ``k_max`` keeps its best).
        """
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} is outside 0..{self.num_documents - 1}")
        n_doc = self.document_length(doc)
        length = n_doc - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > n_doc:
            raise IndexError(f"positions {offset}..{offset + length} are outside document {doc} ({n_doc} tokens)")
        shard, t0 = self._locate(doc, offset, length)
        k_max = self.max_entries if k_max is None else k_max
        if self.target_kind == "logprobs":
            return self._reader(shard).read(t0, t0 + length, self.id_bits, self.value_step, k_max, pad_logprob, sort)
        tok, ids, lp, draws = self._reader(shard).read_entries(t0, t0 + length, self.layout)
        w = target_weights(self.method, lp, draws, tok, length, self.num_samples, self.proposal_temperature)
        ids_out = np.full((length, k_max), -1, dtype=np.int64)
        val_out = np.full((length, k_max), pad_logprob, dtype=np.float32)
        if len(tok) == 0 or k_max == 0:
            return ids_out, val_out
        order = np.lexsort((ids, -w, tok)) if sort else np.arange(len(tok))
        tok, ids, w = tok[order], ids[order], w[order]
        r = np.arange(len(tok)) - np.searchsorted(tok, tok, side="left")
        keep = r < k_max
        ids_out[tok[keep], r[keep]] = ids[keep]
        with np.errstate(divide="ignore"):
            val_out[tok[keep], r[keep]] = np.log(w[keep])
        return ids_out, val_out

    def _locate(self, doc: int, offset: int, length: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._shard_doc_lo, doc, side="right")) - 1
        return shard, int(self.documents[doc]) + offset - int(self._shard_token_lo[shard])

    def get_entries(self, doc: int, offset: int = 0, length: int | None = None):
        """Raw stored entries of positions ``[offset, offset + length)`` of ``doc``, flat in id order:
        ``(position index [E], ids [E], logprobs [E] or None, draws [E] or None)``."""
        n_doc = self.document_length(doc)
        length = n_doc - offset if length is None else length
        shard, t0 = self._locate(doc, offset, length)
        return self._reader(shard).read_entries(t0, t0 + length, self.layout)

    def check_kind(self, expected: str | None) -> str:
        """The store's target kind; one-line ``ValueError`` if ``expected`` (logprobs | weights) differs."""
        if expected not in (None, "auto") and expected != self.target_kind:
            raise ValueError(f"logits store {self.path} holds {self.target_kind} targets (method {self.method}) but "
                             f"kd.target_kind={expected}: set kd.target_kind=auto (or {self.target_kind}), or use a "
                             f"store made with --method {'topk' if expected == 'logprobs' else 'sample'}")
        return self.target_kind

    def check_compatible(self, dataset: str | Path | dict | None = None, tokenizer: Any = None) -> None:
        """Raise a one-line ``ValueError`` unless the store was computed on ``dataset`` (a prefix or
        a :func:`~megatron_kd.logits.manifest.dataset_identity` dict) with ``tokenizer`` (an
        identity string, a ``Tokenizer`` or a dict with ``identity``). ``None`` skips a check."""
        if dataset is not None:
            new = dataset if isinstance(dataset, dict) else mf.dataset_identity(dataset)
            old = self.manifest["dataset"]
            same = (old["idx_sha256"], old["bin_bytes"]) == (new["idx_sha256"], new["bin_bytes"])
            if same and old.get("bin_sha256") and new.get("bin_sha256"):
                same = old["bin_sha256"] == new["bin_sha256"]
            if not same:
                raise ValueError(f"logits store {self.path} was computed on dataset {old['prefix']} "
                                 f"(idx {old['idx_sha256'][:12]}) but {new['prefix']} is different (idx "
                                 f"{new['idx_sha256'][:12]}): train on the store's dataset or recompute the store "
                                 f"with megatron-kd logits --data {new['prefix']}")
        want = mf.tokenizer_identity(tokenizer)
        have = mf.tokenizer_identity(self.manifest.get("tokenizer"))
        if want is not None and have is not None and want != have:
            raise ValueError(f"logits store {self.path} was computed with tokenizer {have[-12:]} but this run "
                             f"uses {want[-12:]}: use the store's tokenizer or recompute the store")


def verify_store(path: str | Path, checksums: bool = True) -> list[str]:
    """Check a store; return the problems found (empty list: the store is sound).

    Checks the manifest, the document table, every shard's size, header and segment table, and
    (with ``checksums``) every shard's sha256, which reads every byte.
    """
    path = Path(path)
    try:
        man = mf.read_store_manifest(path)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    from megatron_kd.utils.io import sha256_file

    problems = []
    docs_file = path / mf.DOCUMENTS
    if not docs_file.is_file():
        problems.append(f"{docs_file} is missing")
    elif checksums and sha256_file(docs_file) != man.get("documents_sha256"):
        problems.append(f"{docs_file} does not match its sha256 in the manifest")
    key = man.get("byte_key") or {}
    for name in ("byte_ends", "doc_text"):
        if name in key:
            f = path / key[name]
            if not f.is_file():
                problems.append(f"byte-offset key file {f} is missing")
            elif checksums and sha256_file(f) != key.get(f"{name}_sha256"):
                problems.append(f"byte-offset key file {f} does not match its sha256 in the manifest")
    for rec in man["shards"]:
        f = path / mf.SHARDS / rec["file"]
        if not f.is_file():
            problems.append(f"shard {f} is missing")
            continue
        if f.stat().st_size != rec["bytes"]:
            problems.append(f"shard {f} is {f.stat().st_size} bytes, the manifest says {rec['bytes']}")
            continue
        if checksums and sha256_file(f) != rec["sha256"]:
            problems.append(f"shard {f} does not match its sha256 in the manifest (corrupted)")
            continue
        if rec.get("audit_file"):
            a = path / mf.SHARDS / rec["audit_file"]
            if not a.is_file():
                problems.append(f"audit sample {a} is missing")
            elif checksums and sha256_file(a) != rec.get("audit_sha256"):
                problems.append(f"audit sample {a} does not match its sha256 in the manifest (corrupted)")
        try:
            r = ShardReader(f)
            bad = r.num_tokens != rec["token_hi"] - rec["token_lo"] or np.any(np.diff(r.seg_token) < 0)
            bad = (bad or int(np.count_nonzero(r.count)) != rec["targets"]
                   or int(r.count.sum(dtype=np.int64)) != rec["entries"])
            if bad:
                problems.append(f"shard {f} disagrees with its manifest record (token, target or entry counts)")
        except ValueError as exc:
            problems.append(str(exc))
    return problems
