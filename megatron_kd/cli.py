"""``megatron-kd <command>``: thin argument parsing; the work lives in the library modules.

Commands are discovered from :mod:`megatron_kd.commands`: every module there that defines
``register(subparsers)`` adds its sub-command (and sets ``func`` on its parser). Command modules
import only the standard library at module level and at ``register`` time (the library, torch and
megatron are imported inside the command functions), so ``megatron-kd --help`` and every
``megatron-kd <cmd> --help`` answer without importing torch (``tests/test_cli_startup.py``).

Global flags (accepted before or after the command name):

* ``--verbose``: show every warning (known-benign ones from megatron-core, e.g. "Transformer Engine
  and Apex are not installed", are otherwise hidden and summarised in one line at exit, on rank 0;
  see :mod:`megatron_kd.utils.quiet`).
* ``--help-config`` (commands with a config dataclass, set as ``config_class`` on their parser):
  print every config key with its type, default and docstring, and exit.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import megatron_kd.commands as commands_pkg
from megatron_kd.commands._flags import alias_hiding
from megatron_kd.utils import quiet


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (sub-commands and their steps), depth first."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found.append(child)
                found.extend(_subparsers(child))
    return found


def resolve_class(path: str) -> type:
    """``"package.module:Class"`` -> the class (imported now, not at parser build time)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class _HelpConfigAction(argparse.Action):
    """``--help-config``: print the command's config keys (type, default, docstring) and exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None,
                 config_class: str = ""):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.config_class = config_class

    def __call__(self, parser, namespace, values, option_string=None):
        from megatron_kd.config import format_config_help

        print(format_config_help(resolve_class(self.config_class), title=parser.prog))
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    """The full ``megatron-kd`` parser with every discovered command."""
    parser = argparse.ArgumentParser(
        prog="megatron-kd",
        description="Knowledge distillation for LLM pre- and post-training on Megatron-core.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show every warning (known-benign megatron/TE/Apex warnings are otherwise "
                             "hidden and summarised in one line)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    for child in [parser, *_subparsers(parser)]:
        child.formatter_class = alias_hiding(child.formatter_class)
    for child in _subparsers(parser):
        child.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        config_class = child.get_default("config_class")
        if config_class and "--help-config" not in child._option_string_actions:
            child.add_argument("--help-config", action=_HelpConfigAction, config_class=config_class,
                               help="print every config key with its type, default and docstring, and exit")
        if config_class and "--dry-run" not in child._option_string_actions:
            # Commands whose function does not validate on its own: load + check the config, print it.
            child.add_argument("--dry-run", dest="generic_dry_run", action="store_true",
                               help="load and check the config (types, choices, unknown keys), print it resolved "
                                    "as YAML, and exit")
    return parser


def explicit_dests(argv: list[str]) -> set[str]:
    """The ``dest``s given explicitly on the command line ``argv`` (not filled in from defaults): a
    flag wins over ``--config``/overrides only when it was given."""
    parser = build_parser()
    for child in [parser, *_subparsers(parser)]:
        child._defaults.clear()
        for action in child._actions:
            if not isinstance(action, argparse._SubParsersAction):
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _generic_dry_run(args: argparse.Namespace) -> int:
    from megatron_kd.config import load_config, resolved_yaml

    cfg = load_config(resolve_class(args.config_class), getattr(args, "config", None), getattr(args, "overrides", []))
    print(resolved_yaml(cfg), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megatron-kd`` console script. Returns the process exit code.

    ``argv=None`` (the console script) also installs the warning summariser for this process;
    in-process calls with an explicit ``argv`` (tests, notebooks) leave warnings alone.
    """
    if argv is None:
        quiet.install("--verbose" in sys.argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        quiet.install(True)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from megatron_kd.utils import exits
    from megatron_kd.utils.processes import children_die_with_parent

    children_die_with_parent()
    try:
        if getattr(args, "wants_explicit", False):
            args.explicit = explicit_dests(sys.argv[1:] if argv is None else argv)
        if getattr(args, "generic_dry_run", False):
            return _generic_dry_run(args)
        result = args.func(args)
    except BaseException as exc:
        # Input problems, filesystem errors (also wrapped ones: torch.save's "unexpected pos", torch's
        # CheckpointException, numpy's short writes) and stopped runs are one line, not a traceback;
        # the exit code says which (see megatron_kd.utils.exits / docs/reliability.md).
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        if not isinstance(exc, (ValueError, OSError, exits.RunStopped)) or (
                isinstance(exc, OSError) and not exits.is_filesystem_error(exc)):
            cause = exits.filesystem_cause(exc, _output_path(args))
            if cause is None:
                raise  # e.g. a lost connection to another rank: not the user's input, keep the traceback
            exc = cause
        if isinstance(exc, OSError) and exc.errno is not None and not exc.filename and not isinstance(
                exc, (exits.FilesystemError, FileNotFoundError, FileExistsError)):
            exc.filename = _output_path(args)  # e.g. ENOSPC from a write(): name the output being written
        print(f"megatron-kd {args.command}: error: {exits.one_line(exc)}", file=sys.stderr)
        if isinstance(exc, exits.RunStopped):
            return exc.exit_code
        if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError)):
            return exits.EXIT_BAD_INPUT
        return exits.EXIT_IO_ERROR
    return int(result or 0)


def _output_path(args: argparse.Namespace) -> str | None:
    """The output path of a command (for a full-disk message), when the flags name one."""
    for name in ("out", "output", "output_prefix", "save"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            return value
    for override in getattr(args, "overrides", None) or []:  # checkpoint.save=DIR, save=DIR
        key, _, value = str(override).partition("=")
        if key in ("checkpoint.save", "save") and value:
            return value
    return None


if __name__ == "__main__":
    sys.exit(main())
