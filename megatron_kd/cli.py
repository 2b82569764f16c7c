"""``megatron-kd <command>``: thin argument parsing; the work lives in the library modules.

Commands are discovered from :mod:`megatron_kd.commands`: every module there that defines
``register(subparsers)`` adds its sub-command (and sets ``func`` on its parser).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import megatron_kd.commands as commands_pkg


def build_parser() -> argparse.ArgumentParser:
    """The full ``megatron-kd`` parser with every discovered command."""
    parser = argparse.ArgumentParser(
        prog="megatron-kd",
        description="Knowledge distillation for LLM pre- and post-training on Megatron-core.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megatron-kd`` console script. Returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from megatron_kd.utils import exits
    from megatron_kd.utils.processes import children_die_with_parent

    children_die_with_parent()
    try:
        result = args.func(args)
    except (ValueError, OSError, exits.RunStopped) as exc:
        if isinstance(exc, OSError) and not exits.is_filesystem_error(exc):
            raise  # e.g. a lost connection to another rank: not the user's input, keep the traceback
        # Input problems, filesystem errors and stopped runs are reported as one line, not a
        # traceback; the exit code says which (see megatron_kd.utils.exits / docs/reliability.md).
        print(f"megatron-kd {args.command}: error: {exits.one_line(exc)}", file=sys.stderr)
        if isinstance(exc, exits.RunStopped):
            return exc.exit_code
        if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)):
            return exits.EXIT_BAD_INPUT
        return exits.EXIT_IO_ERROR
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
