"""The embedded demo corpus: English + code-flavoured text that every CPython installation ships.

Documents are (a) the ``pydoc_data.topics`` help pages (domain ``"topics"``) and (b) one page per
standard-library module, rendered from its source with :mod:`ast` (module, class and function
docstrings with their signatures; domain = the top-level package, e.g. ``"email"``). No module is
imported, so nothing with side effects runs; files are visited in sorted order and the document
order is a fixed-seed shuffle of that list, so the output is byte-identical on every run of the
same Python build (and the train/valid/test split of a GPT dataset sees every domain).

    megatron-kd demo-corpus --out data/demo.jsonl      # ~3 MB, ~750 documents on CPython 3.11
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import random
import sysconfig
import tokenize
from pathlib import Path
from typing import Iterator

# Directories of the standard library that hold tests, vendored wheels or demos, not API docs.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "_bundled", "turtledemo", "__phello__"}


def stdlib_dir() -> Path:
    """The directory of this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> list[str]:
    """Public stdlib ``.py`` files under ``root`` as sorted POSIX relative paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            parts = rel.parts + (name,)
            # Private modules (``_pydecimal``, ``_collections_abc``) duplicate public docs.
            if parts[0].startswith("_"):
                continue
            found.append("/".join(parts))
    return sorted(found)


def _module_name(rel: str) -> str:
    parts = rel[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    sig = f"({ast.unparse(node.args)})"
    if node.returns is not None:
        sig += f" -> {ast.unparse(node.returns)}"
    return sig


def _render_body(body: list[ast.stmt], prefix: str, out: list[str]) -> None:
    """Append ``name(signature)\\n docstring`` blocks for documented classes and functions."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(f"{prefix}{node.name}{_signature(node)}\n{doc}")
        elif isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node)
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            if doc:
                out.append(f"class {prefix}{node.name}" + (f"({bases})" if bases else "") + f"\n{doc}")
            _render_body(node.body, f"{prefix}{node.name}.", out)


def render_module(path: Path, name: str) -> str | None:
    """Text page of one module's docstrings (``None`` if it has none or does not parse)."""
    try:
        with tokenize.open(path) as fh:  # honours PEP 263 coding declarations
            tree = ast.parse(fh.read(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None
    blocks: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        blocks.append(doc)
    _render_body(tree.body, "", blocks)
    if not blocks:
        return None
    return f"Module {name}\n\n" + "\n\n".join(blocks) + "\n"


def _topics(root: Path) -> dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py``, read as a literal (not imported)."""
    path = root / "pydoc_data" / "topics.py"
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def iter_demo_documents(shuffle_seed: int | None = 0, include_code: bool = False) -> Iterator[dict]:
    """Yield demo documents ``{"text", "domain", "meta": {"kind", "name", "source"}}`` lazily.

    The unit order (topics, then modules, by name) is shuffled with ``random.Random(seed)`` when
    ``shuffle_seed`` is not None; rendering is lazy so taking the first N documents is cheap.
    ``include_code`` adds every module's full source as a document of kind ``"code"`` (about
    11.5 MB more on CPython 3.11).
    """
    root = stdlib_dir()
    topics = _topics(root)
    files = _module_files(root)
    units: list[tuple[str, str]] = [("topic", k) for k in sorted(topics)]
    units += [("module", rel) for rel in files]
    if include_code:
        units += [("code", rel) for rel in files]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(units)
    for kind, key in units:
        if kind == "topic":
            text = topics[key].strip("\n") + "\n"
            yield {"text": text, "domain": "topics",
                   "meta": {"kind": "topic", "name": key, "source": "pydoc_data/topics.py"}}
        elif kind == "code":
            try:
                with tokenize.open(root / key) as fh:
                    text = f"# Lib/{key}\n" + fh.read()
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            name = _module_name(key)
            yield {"text": text, "domain": name.split(".")[0],
                   "meta": {"kind": "code", "name": name, "source": key}}
        else:
            name = _module_name(key)
            text = render_module(root / key, name)
            if text is not None:
                yield {"text": text, "domain": name.split(".")[0],
                       "meta": {"kind": "module", "name": name, "source": key}}


def build_demo_corpus(
    out_path: str, max_docs: int | None = None, shuffle_seed: int | None = 0, include_code: bool = False
) -> dict:
    """Write the demo corpus as JSONL (``text``, ``domain``, ``meta`` per line) to ``out_path``,
    atomically, plus ``{out_path}.manifest.json``. Returns the stats: documents, bytes, characters,
    documents per domain, sha256 of the file and the Python version it came from.

    Deterministic: the same Python build always gives the same bytes. ``max_docs`` keeps the first
    N documents of the (shuffled) order, so a small corpus is a prefix of the full one.
    ``include_code`` also adds each module's source code (kind ``"code"``, ~4x the text).
    """
    from megatron_kd.utils.io import atomic_write, write_json_atomic

    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs={max_docs} must be >= 1 (or None for the whole corpus)")
    out = Path(out_path)
    domains: dict[str, int] = {}
    n_docs = n_chars = n_bytes = 0
    digest = hashlib.sha256()
    with atomic_write(out, "wb") as fh:
        for doc in iter_demo_documents(shuffle_seed, include_code):
            line = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
            fh.write(line)
            digest.update(line)
            n_docs += 1
            n_chars += len(doc["text"])
            n_bytes += len(line)
            domains[doc["domain"]] = domains.get(doc["domain"], 0) + 1
            if max_docs is not None and n_docs >= max_docs:
                break
    stats = {
        "path": str(out), "num_documents": n_docs, "num_bytes": n_bytes, "num_text_chars": n_chars,
        "num_domains": len(domains), "domains": dict(sorted(domains.items())),
        "sha256": digest.hexdigest(), "python": platform.python_version(),
        "shuffle_seed": shuffle_seed, "max_docs": max_docs, "include_code": include_code,
    }
    write_json_atomic(f"{out}.manifest.json", {
        "format": "megatron-kd/demo-corpus", "version": 1, "file": out.name, **stats,
        "created_by": {"tool": "megatron_kd.data.demo_corpus.build_demo_corpus"},
    })
    return stats
