"""Known-benign warnings: hidden from the console and summarised once per process in one line.

megatron-core warns at import that Transformer Engine / Apex are absent (expected on CPU and on
plain-PyTorch GPU installs), and emits FutureWarnings / DeprecationWarnings (e.g. about CUDA
graphs) that a user cannot act on. :func:`install` (called by ``megatron-kd``'s entry point) hides
exactly those, counts them, and at exit prints one line on rank 0::

    megatron-kd: hid 6 known-benign warnings (TE/Apex absent x6); --verbose shows them

Every other warning is shown as usual. ``--verbose`` (or ``MEGATRON_KD_VERBOSE=1``, which
``--verbose`` sets so that child processes inherit it) leaves all warnings alone.

This module imports only the standard library (it runs before ``--help`` answers).
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import warnings
from collections import Counter

VERBOSE_ENV = "MEGATRON_KD_VERBOSE"
"""Environment variable: ``1`` = show every warning (set by ``--verbose``; inherited by children)."""

# (label, category or None for any, regex on the message, regex on the emitting file or None)
_BENIGN: tuple[tuple[str, type[Warning] | None, re.Pattern, re.Pattern | None], ...] = (
    ("TE/Apex absent", None,
     re.compile(r"(Transformer Engine|Apex|TransformerEngine|\bTE\b|nvidia[-_ ]modelopt).{0,40}not (be )?installed"
                r"|not installed.{0,40}(Transformer Engine|Apex)", re.I), None),
    ("CUDA-graph deprecation", None, re.compile(r"cuda[_ -]?graph", re.I), re.compile(r"[/\\]megatron[/\\]")),
    ("megatron FutureWarning", FutureWarning, re.compile(""), re.compile(r"[/\\]megatron[/\\]")),
    ("megatron deprecation", DeprecationWarning, re.compile(""), re.compile(r"[/\\]megatron[/\\]")),
    ("megatron deprecation", UserWarning, re.compile(r"deprecat", re.I), re.compile(r"[/\\]megatron[/\\]")),
    # torch deprecates ShardedTensor, which megatron-core's dist_checkpointing uses (the warning is
    # attributed to whichever frame calls into it, e.g. the CPU shims)
    ("ShardedTensor deprecation", FutureWarning, re.compile(r"deprecating ShardedTensor"), None),
)

_hidden: Counter = Counter()
_original_showwarning = None
_summary_registered = False


def is_verbose() -> bool:
    """True when ``--verbose`` (or ``MEGATRON_KD_VERBOSE=1``) asked for every warning."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false", "False")


def benign_label(message: str, category: type[Warning], filename: str) -> str | None:
    """The summary label of a known-benign warning, or None for a warning that must be shown."""
    for label, cat, msg_re, file_re in _BENIGN:
        if cat is not None and not issubclass(category, cat):
            continue
        if file_re is not None and not file_re.search(filename or ""):
            continue
        if msg_re.search(message):
            return label
    return None


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def summary_line() -> str | None:
    """The one-line summary of the warnings hidden so far (None when none were)."""
    if not _hidden:
        return None
    parts = ", ".join(f"{label} x{n}" for label, n in sorted(_hidden.items()))
    return (f"megatron-kd: hid {sum(_hidden.values())} known-benign warnings ({parts}); "
            "--verbose shows them")


def _print_summary() -> None:
    line = summary_line()
    if line and _is_rank_zero():
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr already closed at interpreter exit
            pass


def install(verbose: bool = False) -> None:
    """Hide known-benign warnings for this process (idempotent); summarise them at exit on rank 0.

    ``verbose=True`` sets ``MEGATRON_KD_VERBOSE=1`` (inherited by child processes) and hides nothing.
    """
    global _original_showwarning, _summary_registered
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if is_verbose():
        if _original_showwarning is not None:  # --verbose after all: show from here on
            warnings.showwarning, _original_showwarning = _original_showwarning, None
        return
    if _original_showwarning is not None:
        return
    shown = _original_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        label = benign_label(str(message), category, filename)
        if label is None:
            shown(message, category, filename, lineno, file, line)
        else:
            _hidden[label] += 1

    warnings.showwarning = showwarning
    if not _summary_registered:
        _summary_registered = True
        atexit.register(_print_summary)
