"""Merge indexed datasets into one (Megatron-LM's ``tools/merge_datasets.py``, with manifests).

Documents keep their order: all of input 1, then all of input 2, ... The inputs must share the
token dtype and the tokenizer (checked through their manifests before any byte is copied). The
metadata side files are concatenated, their ``file`` indices shifted so they point into the merged
manifest's ``sources`` list.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from megatron_kd.data.manifest import (MANIFEST_FORMAT, _strip_ext, dataset_paths, read_dataset_manifest,
                                       validate_indexed_files)
from megatron_kd.data.tokenizers import Tokenizer, load_tokenizer
from megatron_kd.data.writer import StagedDatasets, check_outputs


def expand_dataset_inputs(inputs: Sequence[str]) -> list[str]:
    """Dataset prefixes named by ``inputs``: prefixes (``.bin``/``.idx`` suffixes are dropped) or
    directories (every ``*.idx`` in it, sorted by name)."""
    prefixes: list[str] = []
    for item in map(str, inputs):
        if os.path.isdir(item):
            found = sorted(str(p)[:-4] for p in Path(item).glob("*.idx"))
            if not found:
                raise FileNotFoundError(f"directory {item} holds no .idx dataset: pass dataset prefixes")
            prefixes.extend(found)
        else:
            prefixes.append(_strip_ext(item))
    if len(prefixes) < 1:
        raise ValueError("no datasets to merge: pass --input PREFIX [PREFIX ...] or a directory")
    return prefixes


def merge_datasets(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: Tokenizer | str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Concatenate the datasets ``inputs`` into ``output_prefix.{bin,idx}`` with megatron-core's
    ``IndexedDatasetBuilder.add_index``, atomically, and write its manifest (returned).

    ``tokenizer`` (optional) must match every input manifest; it is required for inputs that have
    no manifest (e.g. made by Megatron-LM), vouching for what tokenized them.
    """
    prefixes = expand_dataset_inputs(inputs)
    output_prefix = _strip_ext(output_prefix)
    if os.path.abspath(output_prefix) in {os.path.abspath(p) for p in prefixes}:
        raise ValueError(f"output {output_prefix} is also an input: choose another --output-prefix")
    check_outputs([output_prefix], overwrite)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    infos, manifests = [], []
    for prefix in prefixes:
        infos.append(validate_indexed_files(prefix))
        if dataset_paths(prefix)["manifest"].is_file():
            manifests.append(read_dataset_manifest(prefix))
        elif tok is None:
            raise FileNotFoundError(f"{prefix} has no manifest, so its tokenizer is unknown: pass "
                                    "--tokenizer with the tokenizer that made it")
        else:
            manifests.append(None)
    dtypes = {info["dtype"] for info in infos}
    if len(dtypes) > 1:
        raise ValueError(f"inputs have different token dtypes {sorted(dtypes)}: re-preprocess them with "
                         "one tokenizer")
    reference = tok.identity if tok is not None else next(m for m in manifests if m)["tokenizer"]["identity"]
    for prefix, manifest in zip(prefixes, manifests):
        if manifest is not None and manifest["tokenizer"]["identity"] != reference:
            raise ValueError(f"{prefix} was tokenized with {manifest['tokenizer'].get('path')} "
                             f"({manifest['tokenizer']['identity'][-12:]}), not the tokenizer of the "
                             f"other inputs ({reference[-12:]}): re-preprocess it with one tokenizer")
    tok_desc = tok.describe() if tok is not None else next(m for m in manifests if m)["tokenizer"]
    with_meta = all(dataset_paths(p)["meta"].is_file() for p in prefixes)
    staged = StagedDatasets([output_prefix], dtype=dtypes.pop(), with_meta=with_meta)
    sources: list[dict] = []
    merged_from = []
    try:
        for prefix, info, manifest in zip(prefixes, infos, manifests):
            staged.add_index(output_prefix, prefix)
            if with_meta:
                _append_meta(staged, output_prefix, prefix, offset=len(sources))
            src = manifest["sources"] if manifest else [{"path": prefix + ".bin"}]
            sources.extend({**s, "dataset": Path(prefix).name} for s in src)
            merged_from.append({"prefix": prefix, "num_documents": info["num_documents"],
                                "num_tokens": info["num_tokens"],
                                "checksums": manifest["checksums"] if manifest else None})
        final = staged.finalize()[output_prefix]
        n_docs = sum(i["num_documents"] for i in infos)
        manifest_out = {
            "format": MANIFEST_FORMAT, "version": 1, "name": Path(output_prefix).name,
            "json_key": next((m.get("json_key") for m in manifests if m), None),
            "tokenizer": tok_desc, "num_documents": n_docs,
            "num_sequences": sum(i["sequence_count"] for i in infos),
            "num_tokens": sum(i["num_tokens"] for i in infos), "dtype": infos[0]["dtype"],
            "files": {k: Path(output_prefix + ext).name for k, ext in
                      (("bin", ".bin"), ("idx", ".idx"), ("meta", ".meta.jsonl")) if k in final["checksums"]},
            "sizes": final["sizes"], "checksums": final["checksums"], "sources": sources,
            "merged_from": merged_from,
            "created_by": {"tool": "megatron-kd merge-datasets", "python": platform.python_version(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        }
        staged.commit({output_prefix: manifest_out})
    except BaseException:
        staged.abort()
        raise
    return manifest_out


def _append_meta(staged: StagedDatasets, out_prefix: str, prefix: str, offset: int) -> None:
    """Copy ``prefix.meta.jsonl`` with ``file`` indices shifted by ``offset``."""
    lines = []
    with open(dataset_paths(prefix)["meta"], encoding="utf-8") as fh:
        for line in fh:
            meta = json.loads(line)
            if "file" in meta:
                meta["file"] += offset
            lines.append(json.dumps(meta, ensure_ascii=False) + "\n")
    staged.add_meta(out_prefix, "".join(lines).encode("utf-8"))
