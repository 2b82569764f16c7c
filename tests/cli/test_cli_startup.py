"""Start-up and noise (issue 13 item 7): the CLI parser is built without torch; benign warnings are
summarised in one line; ``--verbose`` shows them; every command answers ``--help``."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "megatron", "numpy", "transformers")


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("MEGATRON_KD_VERBOSE", None)
    env.update(extra)
    return env


def test_cli_import_and_parser_do_not_import_torch():
    code = ("import sys, megatron_kd.cli as c; c.build_parser(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_command_help_without_torch():
    """Every (nested) command prints --help; none imports torch to do so."""
    sys.path.insert(0, str(ROOT))
    import argparse

    from megatron_kd.cli import build_parser

    def walk(parser, prefix):
        yield prefix
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, prefix + [name])

    cmds = list(walk(build_parser(), []))
    assert ["pretrain"] in cmds and ["miniplm", "score"] in cmds and ["eval"] in cmds
    code = ("import sys, contextlib, io\nfrom megatron_kd.cli import main\n"
            f"for argv in {cmds!r}:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n            main(argv + ['--help'])\n"
            "        except SystemExit as e:\n            assert e.code == 0, (argv, e.code)\n"
            "    assert 'usage: megatron-kd' in buf.getvalue(), argv\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_benign_warnings_summarised_once_and_verbose_shows_them(tmp_path):
    """Warnings as megatron-core emits them are hidden and summarised in one line; --verbose shows them;
    other warnings are untouched; a torchrun rank other than 0 prints no summary."""
    fake = tmp_path / "megatron" / "core"
    fake.mkdir(parents=True)
    (tmp_path / "megatron" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text(
        "import warnings\n"
        "warnings.warn('Transformer Engine and Apex are not installed. Falling back to Torch optimizers.')\n"
        "warnings.warn('Apex is not installed. Falling back to Torch Norm')\n"
        "warnings.warn('torch.cuda.amp.custom_fwd is deprecated', FutureWarning)\n"
        "warnings.warn('something the user must see')\n")
    code = ("import sys\nfrom megatron_kd.utils import quiet\n"
            "quiet.install('--verbose' in sys.argv)\nimport megatron.core\n")
    env = _env(PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stderr.strip().splitlines()
    assert "not installed" not in out.stderr and "custom_fwd" not in out.stderr
    assert any("something the user must see" in line for line in lines)
    summary = [line for line in lines if line.startswith("megatron-kd: hid")]
    assert summary == ["megatron-kd: hid 3 known-benign warnings (TE/Apex absent x2, megatron FutureWarning x1); "
                       "--verbose shows them"]
    out = subprocess.run([sys.executable, "-c", code, "--verbose"], env=env, capture_output=True, text=True,
                         check=True)
    assert "UserWarning: Transformer Engine and Apex" in out.stderr and "UserWarning: Apex is not" in out.stderr
    assert "custom_fwd" in out.stderr and "hid" not in out.stderr
    out = subprocess.run([sys.executable, "-c", code], env={**env, "RANK": "1"}, capture_output=True, text=True,
                         check=True)
    assert "not installed" not in out.stderr and "hid" not in out.stderr


def test_benign_label_rules():
    from megatron_kd.utils.quiet import benign_label

    mfile = "/x/site-packages/megatron/core/optimizer/__init__.py"
    assert benign_label("Transformer Engine and Apex are not installed.", UserWarning, mfile) == "TE/Apex absent"
    assert benign_label("cuda_graph_impl 'local' is deprecated", DeprecationWarning, mfile) == \
        "CUDA-graph deprecation"
    assert benign_label("x", FutureWarning, mfile) == "megatron FutureWarning"
    assert benign_label("x", FutureWarning, "/my/code.py") is None
    assert benign_label("loss is nan", UserWarning, mfile) is None
    assert benign_label("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
                        "/repo/megatron_kd/runtime/cpu.py") == "ShardedTensor deprecation"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from megatron_kd.utils import quiet  # noqa: F401  (stdlib only: nothing to warn about)
