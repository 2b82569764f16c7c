"""Data commands: ``preprocess``, ``merge-datasets``, ``demo-corpus``, ``train-tokenizer``.

    megatron-kd demo-corpus --out data/demo.jsonl
    megatron-kd train-tokenizer --input data/demo.jsonl --vocab-size 4096 --out-prefix data/tok
    megatron-kd preprocess --input data/demo.jsonl --tokenizer data/tok.model \\
        --output-prefix data/demo --workers 2          # -> data/demo_text_document.{bin,idx,...}
    megatron-kd merge-datasets --input data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_kd.commands._flags import flag


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``preprocess`` (shared with ``tools/preprocess_data.py``)."""
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="JSONL (.jsonl/.json/.ndjson, optionally .gz) or plain text files, or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="JSON fields to tokenize, one dataset each (default: text)")
    g.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="input format; auto = by file suffix (default: auto)")
    g.add_argument("--text-unit", choices=["file", "paragraph", "line"], default="file",
                   help="plain text only: one document per file, blank-line paragraph or line (default: file)")
    g.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="bad record (invalid JSON/UTF-8, missing key): fail with file:line, or skip and "
                        "count it in the manifest (default: fail)")
    g.add_argument("--max-documents", type=int, default=None,
                   help="stop after this many documents (default: all)")
    g = p.add_argument_group("tokenization")
    g.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   help="SentencePiece .model file or local Hugging Face tokenizer directory")
    g.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the end-of-document token after each document (default: on)")
    g.add_argument("--split-sentences", action="store_true",
                   help="one sequence per sentence (nltk Punkt; outputs named _sentence)")
    g.add_argument("--lang", default="english",
                   help="Punkt language if nltk's model is installed; else Punkt is trained on the input")
    g = p.add_argument_group("output")
    flag(g, "--output", "--output-prefix", "--out", dest="output_prefix", required=True,
                   help="outputs are {prefix}_{key}_document.bin/.idx/.manifest.json/.meta.jsonl")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (atomically)")
    g.add_argument("--meta-keys", nargs="*", default=None, metavar="KEY",
                   help="JSON fields copied into the per-document .meta.jsonl "
                        "(default: domain meta id source url title)")
    g.add_argument("--no-meta", action="store_true", help="do not write the .meta.jsonl side file")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes; the output does not depend on it (default: 1)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_preprocess(args: argparse.Namespace) -> int:
    """``preprocess``: tokenize into indexed datasets and print a one-line summary."""
    from megatron_kd.data.preprocess import DEFAULT_META_KEYS, preprocess

    m = preprocess(
        args.input, args.output_prefix, args.tokenizer, json_keys=args.json_keys,
        append_eod=args.append_eod, workers=args.workers, overwrite=args.overwrite,
        input_format=args.input_format, text_unit=args.text_unit, split_sentences=args.split_sentences,
        lang=args.lang, meta_keys=DEFAULT_META_KEYS if args.meta_keys is None else args.meta_keys,
        write_meta=not args.no_meta, on_error=args.on_error, max_documents=args.max_documents,
        progress=not args.no_progress,
    )
    s = m["stats"]
    more = f" (and {len(m['options']['json_keys']) - 1} more key(s))" if len(m["options"]["json_keys"]) > 1 else ""
    print(f"wrote {m['name']}{more}: {m['num_documents']} documents, {m['num_tokens']} tokens ({m['dtype']}), "
          f"{m['skipped']['bad_records']} bad records skipped; {s['mb_per_s']} MB/s, "
          f"{s['tokens_per_s']:.0f} tokens/s")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """``merge-datasets``."""
    from megatron_kd.data.merge import merge_datasets

    m = merge_datasets(args.input, args.output_prefix, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote {m['name']}: {m['num_documents']} documents, {m['num_tokens']} tokens "
          f"from {len(m['merged_from'])} datasets")
    return 0


def run_demo_corpus(args: argparse.Namespace) -> int:
    """``demo-corpus``."""
    from megatron_kd.data.demo_corpus import build_demo_corpus

    stats = build_demo_corpus(args.out, max_docs=args.max_docs, include_code=args.include_code)
    print(f"wrote {stats['path']}: {stats['num_documents']} documents, {stats['num_bytes'] / 1e6:.2f} MB, "
          f"{stats['num_domains']} domains (Python {stats['python']})")
    return 0


def run_train_tokenizer(args: argparse.Namespace) -> int:
    """``train-tokenizer``: SentencePiece on the ``--json-key`` texts of JSONL files (or text files)."""
    from megatron_kd.data.inputs import Source, detect_format, expand_inputs, iter_records
    from megatron_kd.data.tokenizers import train_sentencepiece

    files = expand_inputs(args.input)

    def texts():
        for f in files:
            fmt = detect_format(f)
            for line_no, raw, _ in iter_records(Source(f, fmt), "line" if fmt == "text" else "file"):
                try:
                    text = raw.decode("utf-8")
                    yield json.loads(text)[args.json_key] if fmt == "jsonl" else text
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(f"{f}:{line_no}: cannot read {args.json_key!r} "
                                     f"({type(exc).__name__}): fix the line") from None

    tok = train_sentencepiece(texts(), args.vocab_size, args.out_prefix, model_type=args.model_type,
                              max_lines=args.max_lines)
    print(f"wrote {tok.path}: vocab {tok.vocab_size}, eod {tok.eod}, pad {tok.pad}, identity {tok.identity[-16:]}")
    return 0


def add_merge_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``merge-datasets`` (shared with ``tools/merge_datasets.py``)."""
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX",
                   help="dataset prefixes (path without .bin/.idx) or directories of them, in order")
    flag(p, "--output", "--output-prefix", "--out", dest="output_prefix", required=True, help="merged dataset prefix (path without .bin/.idx)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to check the inputs against (required for inputs without a manifest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")


def register(subparsers) -> None:
    """Add the data commands to ``megatron-kd``."""
    p = subparsers.add_parser("preprocess", help="tokenize JSONL/text into megatron indexed datasets",
                              description="Tokenize JSONL or text into megatron .bin/.idx datasets with a "
                                          "manifest and a per-document metadata file.")
    add_preprocess_args(p)
    p.set_defaults(func=run_preprocess)

    p = subparsers.add_parser("merge-datasets", help="concatenate indexed datasets into one")
    add_merge_args(p)
    p.set_defaults(func=run_merge)

    p = subparsers.add_parser("demo-corpus", help="write the offline demo corpus (stdlib docs) as JSONL")
    flag(p, "--output", "--out", dest="out", required=True, help="output JSONL file")
    p.add_argument("--max-docs", type=int, default=None, help="keep the first N documents (default: all)")
    p.add_argument("--include-code", action="store_true",
                   help="also add each module's source code as documents (~4x larger)")
    p.set_defaults(func=run_demo_corpus)

    p = subparsers.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on JSONL/text")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL or text files, or globs")
    p.add_argument("--json-key", default="text", help="JSON field with the text (default: text)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default: 4096)")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="default: bpe")
    p.add_argument("--max-lines", type=int, default=2_000_000,
                   help="train on at most this many non-empty lines (default: 2000000)")
    flag(p, "--output", "--out-prefix", "--output-prefix", "--out", dest="out_prefix", required=True, help="writes {prefix}.model and {prefix}.manifest.json")
    p.set_defaults(func=run_train_tokenizer)


def tool_main(add_args, run, description: str, argv: list[str] | None = None) -> int:
    """Entry of the ``tools/*.py`` wrappers: same flags and errors as the CLI command."""
    parser = argparse.ArgumentParser(description=description)
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
