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
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        # Input problems are reported as one line, not a traceback.
        print(f"megatron-kd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
