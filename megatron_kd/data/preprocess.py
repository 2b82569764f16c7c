"""Tokenize JSONL or plain text into megatron-core indexed datasets (``.bin``/``.idx``).

Megatron-LM's ``tools/preprocess_data.py`` contract, plus what it lacks: ordered multi-process
output that is byte-identical for any ``workers``, a manifest per dataset (tokenizer identity,
counts, checksums, sources), a per-document metadata side file, sentence splitting without a
network download, atomic writes, and one-line errors naming ``file:line``::

    preprocess(["corpus.jsonl"], "data/corpus", "tok.model", workers=2)
    # -> data/corpus_text_document.{bin,idx,manifest.json,meta.jsonl}
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from megatron_kd.data.encoding import BatchResult, Encoder, EncodeOptions, encode_in_worker, init_worker
from megatron_kd.data.inputs import (TEXT_UNITS, Source, detect_format, expand_inputs, iter_batches,
                                     total_input_bytes)
from megatron_kd.data.manifest import MANIFEST_FORMAT
from megatron_kd.data.tokenizers import Tokenizer, load_tokenizer
from megatron_kd.data.workers import OrderedPool
from megatron_kd.data.writer import StagedDatasets, check_outputs

DEFAULT_META_KEYS = ("domain", "meta", "id", "source", "url", "title")
_MAX_ERROR_EXAMPLES = 20


def output_prefixes(output_prefix: str, keys: Sequence[str], split_sentences: bool = False) -> list[str]:
    """Megatron's naming: ``{output_prefix}_{key}_{document|sentence}`` per key."""
    level = "sentence" if split_sentences else "document"
    return [f"{output_prefix}_{key}_{level}" for key in keys]


def _validate(json_keys: Sequence[str], workers: int, on_error: str, text_unit: str) -> None:
    if not json_keys or any(not k or "/" in k for k in json_keys):
        raise ValueError(f"json_keys={list(json_keys)} must be non-empty names without '/'")
    if len(set(json_keys)) != len(json_keys):
        raise ValueError(f"json_keys={list(json_keys)} has duplicates: list each key once")
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose 'fail' or 'skip'")
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit={text_unit!r}: choose one of {TEXT_UNITS}")


def _sample_texts(sources: list[Source], opts: EncodeOptions, text_unit: str) -> Iterator[str]:
    """Texts of the input (valid records only) for training the sentence splitter."""
    from megatron_kd.data.encoding import _record_texts
    from megatron_kd.data.inputs import iter_records

    for src in sources:
        probe = Source(src.path, src.format)
        for _, raw, _ in iter_records(probe, text_unit):
            texts, _, error = _record_texts(raw, opts)
            if error is None:
                yield from texts


def token_dtype(vocab_size: int) -> type:
    """Token dtype of the ``.bin``: numpy.uint16 below 65,500 ids, else numpy.int32 (the rule of
    megatron-core's ``DType.optimal_dtype``, which :func:`preprocess` asserts it agrees with)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def preprocess(
    inputs: list[str] | str,
    output_prefix: str,
    tokenizer: Tokenizer | str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    overwrite: bool = False,
    input_format: str = "auto",
    text_unit: str = "file",
    split_sentences: bool = False,
    lang: str = "english",
    punkt_train_chars: int = 1_000_000,
    meta_keys: Sequence[str] = DEFAULT_META_KEYS,
    write_meta: bool = True,
    on_error: str = "fail",
    max_documents: int | None = None,
    batch_bytes: int = 1 << 16,
    progress: bool = True,
    start_method: str | None = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``{output_prefix}_{key}_document.{bin,idx}`` (one dataset per key).

    Args:
        inputs: JSONL files (``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``) or plain text
            files, or glob patterns; all must have the same format.
        output_prefix: Path prefix of the outputs; the directory is created.
        tokenizer: A :class:`Tokenizer` or a path for :func:`load_tokenizer`.
        json_keys: JSON fields to tokenize (plain text input always uses the key ``text``).
        append_eod: Append ``tokenizer.eod`` to every document.
        workers: Tokenizer processes (1 = in this process). Output bytes do not depend on it.
        overwrite: Replace existing outputs (atomically, once the new ones are complete).
        input_format: ``auto`` (by suffix), ``jsonl`` or ``text``.
        text_unit: For plain text: one document per ``file``, ``paragraph`` (blank-line
            separated) or ``line``.
        split_sentences: One sequence per sentence (nltk Punkt); outputs are named ``_sentence``.
        lang: Punkt language if its pretrained model is installed; else Punkt is trained on the
            first ``punkt_train_chars`` characters of the input.
        meta_keys: JSON fields copied into the metadata side file (when present).
        write_meta: Write ``{dataset}.meta.jsonl``: line i = document i's source file index
            (into ``manifest["sources"]``), 1-based line number and ``meta_keys`` fields.
        on_error: ``fail`` on the first bad record (invalid JSON or UTF-8, missing or non-string
            key) with ``file:line`` in the message, or ``skip`` it and count it in the manifest.
        max_documents: Stop after this many documents.
        batch_bytes: Bytes of input per work item sent to a worker.
        progress: Show a progress bar (bytes/s, documents/s, tokens/s) on stderr.
        start_method: multiprocessing start method of the workers (default ``fork`` where available).

    Returns:
        The manifest of the first key's dataset (each dataset's manifest is also written as
        ``{dataset}.manifest.json``). Fields: see ``docs/data.md``.
    """
    json_keys = tuple(json_keys)
    _validate(json_keys, workers, on_error, text_unit)
    files = expand_inputs(inputs)
    formats = {detect_format(f, input_format) for f in files}
    if len(formats) > 1:
        raise ValueError(f"inputs mix JSONL and plain text ({files[0]} ...): preprocess them separately "
                         "or force one with --input-format")
    fmt = formats.pop()
    if fmt == "text" and json_keys != ("text",):
        raise ValueError(f"--json-keys {' '.join(json_keys)} applies to JSONL input only, but {files[0]} is "
                         "plain text (its dataset key is 'text'): drop --json-keys or pass JSONL")
    prefixes = output_prefixes(output_prefix, json_keys if fmt == "jsonl" else ("text",), split_sentences)
    check_outputs(prefixes, overwrite)
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    opts = EncodeOptions(json_keys=json_keys, input_format=fmt, append_eod=append_eod,
                         meta_keys=tuple(meta_keys), write_meta=write_meta, dtype=dtype.__name__)
    sources = [Source(path=f, format=fmt) for f in files]
    splitter_info = None
    if split_sentences:
        from megatron_kd.data.sentences import build_splitter

        opts.sentence_splitter, splitter_info = build_splitter(
            lang, _sample_texts(sources, opts, text_unit), punkt_train_chars)
    if workers > 1 and isinstance(tok, Tokenizer) and tok.kind == "huggingface":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes, not Rust threads

    counts = {"documents": 0, "tokens": {p: 0 for p in prefixes}, "sequences": {p: 0 for p in prefixes},
              "skipped": 0, "empty": 0, "bytes": 0}
    error_examples: list[dict] = []
    bar = staged = None
    t_start = time.perf_counter()  # stats time: workers, read, tokenize, write (not imports)
    # Workers start before megatron-core/torch are imported here, so they fork a small process.
    pool = OrderedPool(workers, encode_in_worker, init_worker, (tok, opts), start_method) if workers > 1 else None
    try:
        from megatron.core.datasets.indexed_dataset import DType

        from megatron_kd.utils.progress import progress as progress_bar

        assert DType.optimal_dtype(tok.vocab_size) is dtype, "megatron-core changed its dtype rule"
        staged = StagedDatasets(prefixes, dtype, with_meta=write_meta)
        batches = iter_batches(sources, text_unit, batch_bytes)
        if pool is None:
            encoder = Encoder(tok, opts)
            results: Iterator[BatchResult] = (encoder.encode_batch(*job) for job in batches)
        else:
            # Results come back in input order, so the bytes are identical for any worker count.
            results = pool.imap(batches)
        bar = progress_bar(total_input_bytes(files), desc=f"preprocess {Path(output_prefix).name}",
                           unit="B", disable=not progress)
        for res in results:
            src = sources[res.source]
            if res.errors:
                line_no, reason = res.errors[0]
                if on_error == "fail":
                    raise ValueError(f"{src.path}:{line_no}: {reason}: fix the input or pass "
                                     "--on-error skip to skip bad records")
                src.skipped += len(res.errors)
                counts["skipped"] += len(res.errors)
                for line_no, reason in res.errors[: max(0, _MAX_ERROR_EXAMPLES - len(error_examples))]:
                    error_examples.append({"file": res.source, "line": line_no, "reason": reason})
            n_docs = res.num_docs
            if max_documents is not None:
                n_docs = min(n_docs, max_documents - counts["documents"])
                if n_docs < res.num_docs:
                    res = _truncate(res, n_docs)
            for key, prefix in zip(opts.output_keys, prefixes):
                staged.add_documents(prefix, res.tokens[key], res.seq_lengths[key], res.doc_seqs[key])
                counts["tokens"][prefix] += int(res.tokens[key].size)
                counts["sequences"][prefix] += int(res.seq_lengths[key].size)
                if write_meta:
                    staged.add_meta(prefix, b"".join(res.meta_lines))
            src.documents += n_docs
            src.empty += res.num_empty
            counts["documents"] += n_docs
            counts["empty"] += res.num_empty
            counts["bytes"] += res.bytes_in
            bar.update(res.bytes_in)
            elapsed = max(time.perf_counter() - t_start, 1e-9)
            bar.set_postfix_str(f"{counts['documents']} docs, {counts['documents'] / elapsed:.0f} docs/s, "
                                f"{counts['tokens'][prefixes[0]] / elapsed / 1e3:.0f}k tok/s", refresh=False)
            if max_documents is not None and counts["documents"] >= max_documents:
                break
        bar.close()
        if counts["documents"] == 0:
            raise ValueError(f"no documents in {', '.join(files[:3])}{' ...' if len(files) > 3 else ''} "
                             f"({counts['skipped']} bad and {counts['empty']} empty records): "
                             "check the input and --json-keys")
        finals = staged.finalize()
        elapsed = time.perf_counter() - t_start
        manifests = {}
        for key, prefix in zip(opts.output_keys, prefixes):
            manifests[prefix] = _manifest(
                prefix, key, tok, dtype, counts, finals[prefix], sources, error_examples,
                splitter_info, elapsed,
                options={"append_eod": append_eod, "split_sentences": split_sentences, "input_format": fmt,
                         "text_unit": text_unit if fmt == "text" else None, "json_keys": list(json_keys),
                         "meta_keys": list(meta_keys), "on_error": on_error, "max_documents": max_documents,
                         "workers": workers})
        staged.commit(manifests)
    except BaseException:
        if bar is not None:
            bar.close()
        if staged is not None:
            staged.abort()
        if pool is not None:
            pool.close(graceful=False)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.close()
    return manifests[prefixes[0]]


def _truncate(res: BatchResult, n_docs: int) -> BatchResult:
    """Keep the first ``n_docs`` documents of a batch (for ``max_documents``)."""
    for key in list(res.tokens):
        n_seq = int(res.doc_seqs[key][:n_docs].sum())
        n_tok = int(res.seq_lengths[key][:n_seq].sum())
        res.tokens[key] = res.tokens[key][:n_tok]
        res.seq_lengths[key] = res.seq_lengths[key][:n_seq]
        res.doc_seqs[key] = res.doc_seqs[key][:n_docs]
    res.meta_lines = res.meta_lines[:n_docs]
    res.num_docs = n_docs
    return res


def _manifest(prefix, key, tok, dtype, counts, final, sources, error_examples, splitter_info,
              elapsed, options) -> dict[str, Any]:
    import megatron.core

    from megatron_kd import __version__
    from megatron_kd.utils.artifacts import relative_ref

    paths = {k: Path(prefix + ext).name for k, ext in
             (("bin", ".bin"), ("idx", ".idx"), ("meta", ".meta.jsonl")) if k in final["checksums"]}
    total_bytes = max(counts["bytes"], 1)
    return {
        "format": MANIFEST_FORMAT, "version": 1, "name": Path(prefix).name, "json_key": key,
        "tokenizer": {**tok.describe(), "path": relative_ref(tok.path, Path(prefix).parent)},
        "num_documents": counts["documents"], "num_sequences": counts["sequences"][prefix],
        "num_tokens": counts["tokens"][prefix], "dtype": dtype.__name__,
        "files": paths, "sizes": final["sizes"], "checksums": final["checksums"],
        "sources": [s.describe() for s in sources],
        "skipped": {"bad_records": counts["skipped"], "empty_records": counts["empty"],
                    "examples": error_examples},
        "sentence_splitter": splitter_info, "options": options,
        "stats": {"seconds": round(elapsed, 3), "input_bytes": counts["bytes"],
                  "mb_per_s": round(total_bytes / 1e6 / max(elapsed, 1e-9), 3),
                  "docs_per_s": round(counts["documents"] / max(elapsed, 1e-9), 1),
                  "tokens_per_s": round(counts["tokens"][prefix] / max(elapsed, 1e-9), 1)},
        "created_by": {"tool": "megatron-kd preprocess", "megatron_kd": __version__,
                       "megatron_core": getattr(megatron.core, "__version__", "?"),
                       "python": platform.python_version(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }


def read_meta(dataset_prefix: str) -> list[dict]:
    """All lines of ``{dataset_prefix}.meta.jsonl`` (line i describes document i)."""
    path = Path(str(dataset_prefix) + ".meta.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"metadata file {path} does not exist: re-run preprocess without --no-meta")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]
