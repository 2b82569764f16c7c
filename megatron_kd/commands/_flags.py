"""One spelling per concept across commands; older spellings stay accepted as hidden aliases.

==================  =======================================================================
concept             flag (hidden aliases still accepted)
==================  =======================================================================
checkpoint dir      ``--checkpoint`` (``--ckpt``)
output path/prefix  ``--output`` (``--out``, ``--output-prefix``, ``--out-prefix``)
tensor parallel     ``--tensor-parallel`` (``--tp``)
pipeline parallel   ``--pipeline-parallel`` (``--pp``)
no progress bar     ``--no-progress`` (``--quiet``)
greedy decoding     ``--temperature 0`` (``--greedy`` kept as a visible shorthand in ``generate``)
==================  =======================================================================

:func:`flag` adds one argparse action under all spellings; ``--help`` (with the formatter that
``megatron_kd.cli`` installs on every parser) shows only the first. Standard library only.
"""
from __future__ import annotations

import argparse

ALIASES = {
    "--checkpoint": ("--ckpt",),
    "--output": ("--out", "--output-prefix", "--out-prefix"),
    "--tensor-parallel": ("--tp",),
    "--pipeline-parallel": ("--pp",),
    "--no-progress": ("--quiet",),
}
"""Canonical flag -> the older spellings accepted for it (never removed: scripts use them)."""


def flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, canonical: str, *aliases: str,
         **kwargs) -> argparse.Action:
    """``parser.add_argument(canonical, *aliases, **kwargs)`` with the aliases hidden from ``--help``.
    Without explicit ``aliases`` the standard ones of :data:`ALIASES` are used."""
    aliases = aliases or ALIASES.get(canonical, ())
    action = parser.add_argument(canonical, *aliases, **kwargs)
    action.hidden_aliases = tuple(aliases)
    return action


def alias_hiding(base: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """A subclass of the help formatter ``base`` that leaves hidden aliases out of ``--help``."""
    if getattr(base, "_hides_aliases", False):
        return base

    class AliasHidingFormatter(base):  # type: ignore[valid-type, misc]
        _hides_aliases = True

        def _format_action_invocation(self, action: argparse.Action) -> str:
            hidden = getattr(action, "hidden_aliases", ())
            if not hidden:
                return super()._format_action_invocation(action)
            saved = action.option_strings
            action.option_strings = [o for o in saved if o not in hidden]
            try:
                return super()._format_action_invocation(action)
            finally:
                action.option_strings = saved

    AliasHidingFormatter.__name__ = f"AliasHiding{base.__name__}"
    return AliasHidingFormatter
