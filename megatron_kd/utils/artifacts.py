"""Self-contained, relocatable artifacts: paths recorded relative to the file that records them.

A checkpoint, a dataset (``.bin/.idx/.manifest.json``) or a logits store can be copied or moved
anywhere: every path it records is written relative to its own directory and resolved against it
when read (:func:`relative_ref` / :func:`resolve_ref`). Old artifacts that recorded absolute or
launch-directory-relative paths still load: a relative path that does not exist next to the
artifact is tried as given.

A checkpoint carries its own tokenizer: :func:`bundle_tokenizer` copies the tokenizer files into
``CKPT/tokenizer/`` (content-checked, atomic) and the checkpoint's ``meta.json`` records
``"tokenizer": "tokenizer"`` (relative to ``CKPT``).

Standard library only (layer 1): nothing here loads a tokenizer or a model.
"""
from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

#: Sub-directory of a checkpoint that holds its tokenizer files.
TOKENIZER_DIR = "tokenizer"
#: Files of a HF tokenizer directory that are copied along (whichever exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")
#: Name of a SentencePiece model inside a bundled tokenizer directory.
SPM_FILE = "tokenizer.model"
#: Name of a word-list tokenizer (``data.tokenizers.WordTokenizer`` JSON) inside a bundled directory.
WORD_FILE = "word_tokenizer.json"


def relative_ref(path: str | os.PathLike | None, base: str | os.PathLike) -> str | None:
    """``path`` written relative to directory ``base`` (``../data/x`` etc.), for recording in a
    file under ``base``; None stays None. Paths on another drive stay absolute."""
    if path is None or str(path) == "":
        return None
    try:
        return os.path.relpath(Path(path).resolve(), Path(base).resolve())
    except ValueError:  # another drive (Windows)
        return str(Path(path).resolve())


def resolve_ref(ref: str | os.PathLike | None, base: str | os.PathLike, *more_bases: str | os.PathLike) -> str | None:
    """The path a recorded reference ``ref`` points to: absolute as is; relative, against ``base``
    (then ``more_bases``) when it exists there, else as given (launch-directory relative, the
    form older artifacts recorded). None stays None."""
    if ref is None or str(ref) == "":
        return None
    p = Path(ref)
    if p.is_absolute():
        return str(p)
    for b in (base, *more_bases):
        if b is not None and (Path(b) / p).exists():
            return str(Path(b) / p)
    return str(p)


def _tokenizer_files(src: Path) -> list[tuple[Path, str]]:
    """(source file, name in the bundle) pairs of tokenizer ``src`` (a file or a directory)."""
    if src.is_file():
        return [(src, WORD_FILE if src.suffix == ".json" else SPM_FILE)]
    return [(src / n, n) for n in TOKENIZER_FILES if (src / n).is_file()]


def copy_tokenizer_files(src: str | os.PathLike, dest: str | os.PathLike) -> bool:
    """Copy tokenizer ``src`` (SentencePiece ``.model`` file -> ``dest/tokenizer.model``, word-list
    ``.json`` -> ``dest/word_tokenizer.json``, or the
    :data:`TOKENIZER_FILES` of a HF directory) into directory ``dest``; True if anything was copied."""
    files = _tokenizer_files(Path(src))
    if not files:
        return False
    Path(dest).mkdir(parents=True, exist_ok=True)
    for f, name in files:
        shutil.copyfile(f, Path(dest) / name)
    return True


def _same_bundle(files: list[tuple[Path, str]], dest: Path) -> bool:
    if not dest.is_dir():
        return False
    present = sorted(p.name for p in dest.iterdir() if p.is_file())
    if present != sorted(name for _, name in files):
        return False
    return all(filecmp.cmp(f, dest / name, shallow=False) for f, name in files)


def bundle_tokenizer(artifact_dir: str | os.PathLike, tokenizer: str | os.PathLike | None) -> str | None:
    """Copy tokenizer ``tokenizer`` into ``artifact_dir/tokenizer/`` and return the reference to
    record (``"tokenizer"``). Idempotent (identical files are not rewritten; another tokenizer
    replaces the bundle atomically). A reference that is not an existing path (None, an identity
    string) is returned unchanged; so is one that already is the bundle."""
    if tokenizer is None or str(tokenizer) == "":
        return None
    src = Path(tokenizer)
    dest = Path(artifact_dir) / TOKENIZER_DIR
    if not src.exists():
        return str(tokenizer)
    if src.resolve() == dest.resolve() or dest.resolve() in src.resolve().parents:
        return TOKENIZER_DIR if src.resolve() == dest.resolve() else relative_ref(src, artifact_dir)
    files = _tokenizer_files(src)
    if not files:
        return str(tokenizer)
    if not _same_bundle(files, dest):
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            copy_tokenizer_files(src, tmp)
        except OSError as exc:  # full disk / read-only: no half-copied bundle; name the destination
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno is not None:
                raise OSError(exc.errno, exc.strerror, str(tmp)) from None
            raise
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    return TOKENIZER_DIR


__all__ = ["SPM_FILE", "TOKENIZER_DIR", "TOKENIZER_FILES", "WORD_FILE", "bundle_tokenizer", "copy_tokenizer_files",
           "relative_ref", "resolve_ref"]
