"""Every ``megatron-kd ...`` command written in README.md, docs/ and examples/ (comments, scripts)
parses (issue 13 item 1): the real parser accepts its command and flags, and where it names a
config file of this repository, that file plus its ``key=value`` overrides loads into the command's
config class (unknown keys, types, choices). The README's ``## Walkthrough`` is not checked here:
tests/test_walkthrough.py runs it verbatim.

Extraction: fenced code blocks of Markdown files, comment lines of YAML files, every line of shell
scripts; ``\\``-continued lines are joined; the command ends at ``|``, ``&&``, ``;``, ``>``, a
`` # `` comment or prose after two spaces and a parenthesis. Lines with placeholders (``<dir>``, ``...``) are skipped."""
from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INVOCATION = re.compile(r"(?:\bmegatron-kd|-m megatron_kd)\s+(?=[a-z-])")


def _logical_lines(text: str) -> list[str]:
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        out.append(buf + stripped)
        buf = ""
    if buf:
        out.append(buf)
    return out


def _sources(path: Path) -> list[str]:
    """The lines of ``path`` that can hold a command."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        if path.name == "README.md" and path.parent == REPO and "\n## Walkthrough\n" in text:
            start = text.index("\n## Walkthrough\n")
            end = text.find("\n## ", start + 1)
            text = text[:start] + (text[end:] if end >= 0 else "")
        blocks = re.findall(r"^```[a-z]*\n(.*?)^```$", text, flags=re.S | re.M)
        return [ln for b in blocks for ln in _logical_lines(b)]
    if path.suffix in (".yaml", ".yml"):
        # comment lines, and trailing comments ("load: /ckpt/x   # megatron-kd convert ...")
        comments = [re.sub(r"^\s*#\s?", "", ln) if ln.lstrip().startswith("#") else ln.split(" # ", 1)[1]
                    for ln in text.splitlines() if ln.lstrip().startswith("#") or " # " in ln]
        return _logical_lines("\n".join(comments))
    return [re.sub(r"^\s*#\s?", "", ln) for ln in _logical_lines(text)]


def _files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted(p for p in (REPO / "examples").rglob("*") if p.is_file()
                    and p.suffix in (".md", ".yaml", ".yml", ".sh", ".sbatch") and "walkthrough" not in p.relative_to(REPO).parts)
    return files


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command line after 'megatron-kd')`` for every documented invocation."""
    from megatron_kd.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = set(sub.choices) | {"--help", "-h", "--verbose"}
    found = []
    for path in _files():
        for line in _sources(path):
            # the last invocation whose next word is a command ("docker run IMAGE megatron-kd --help")
            # (an inline `megatron-kd cmd` in prose is a mention, not a command)
            starts = [m.end() for m in INVOCATION.finditer(line)
                      if line[m.end():].split()[0] in names and not line[:m.start()].endswith("`")]
            if not starts:
                continue
            cmd = line[starts[-1]:]
            # ends at a pipe / && / ; / redirection, a comment, a backtick or prose "   (once)"
            cmd = re.split(r"\s(?:\||&&|;|>|2>|#)\s|\s#\s?|\s(?:\||&&)$|`|\s{2,}\(", cmd)[0].strip()
            if any(p in cmd for p in ("<", "...", "…", "[--", "{")):
                continue  # a usage pattern with placeholders, not a command
            found.append((f"{path.relative_to(REPO)}: {cmd[:60]}", cmd))
    return found


COMMANDS = documented_commands()


@functools.lru_cache(maxsize=1)
def _parser():
    from megatron_kd.cli import build_parser

    return build_parser()


def test_commands_are_found():
    assert len(COMMANDS) > 50
    names = {c.split()[0] for _, c in COMMANDS}
    assert {"pretrain", "distill", "logits", "eval", "convert", "miniplm", "preprocess"} <= names, names


@pytest.mark.parametrize("cmd", [c for _, c in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(cmd):
    from megatron_kd.cli import resolve_class
    from megatron_kd.config import load_config

    argv = shlex.split(cmd)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        assert exc.code == 0, f"megatron-kd {cmd}: rejected by the parser"
        return
    config = getattr(args, "config", None)
    cls = getattr(args, "config_class", None)
    if config and cls and (REPO / config).is_file():
        overrides = [o for o in getattr(args, "overrides", []) or [] if "$" not in o]
        load_config(resolve_class(cls), REPO / config, overrides)
