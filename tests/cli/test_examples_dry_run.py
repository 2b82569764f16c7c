"""Every pretrain / distill / post-training YAML in examples/ is a valid config of its command (issue 14).

* Schema level, all of them: loaded by the command's own config class (unknown keys, types,
  ``Literal`` choices) and, for pretrain/distill, checked by ``validate_pretrain_config`` against the
  launch it is written for (GPU examples: 8 GPUs; inputs such as /data/... are not on this machine).
* ``--dry-run`` through the CLI for the ones whose inputs a test can provide without training:
  pretrain_tiny (synthetic data), distill_tiny with kd.mode=none, and the post-training YAMLs (with a
  tokenizer, tiny instruction datasets and random-weight student / teacher checkpoints; the GPU one
  under WORLD_SIZE=8, the launch it is written for).
"""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "examples").rglob("*.yaml"))


def command_of(path: str) -> str:
    """The command a YAML in examples/ is written for (from its name and folder)."""
    name = Path(path).name
    for prefix, command in (("sft", "sft"), ("minillm", "minillm"), ("onpolicy", "onpolicy"),
                            ("distill", "distill"), ("pretrain", "pretrain")):
        if name.startswith(prefix):
            return command
    if path.startswith("examples/miniplm/reference"):
        return "pretrain"  # the MiniPLM reference LM is a pretrain run
    walkthrough = {"teacher": "pretrain", "reference": "pretrain", "student": "distill"}  # README's walkthrough
    if path.startswith("examples/walkthrough/") and Path(path).stem in walkthrough:
        return walkthrough[Path(path).stem]
    raise AssertionError(f"{path}: which command is it for? Name it <command>_*.yaml or extend command_of()")


def config_class_of(command: str):
    from megatron_kd.cli import build_parser, resolve_class

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return resolve_class(sub.choices[command].get_default("config_class"))


def test_examples_are_found():
    commands = {command_of(p) for p in EXAMPLES}
    assert {"pretrain", "distill", "sft", "minillm", "onpolicy"} <= commands, commands


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_config_is_valid(path):
    from megatron_kd.config import load_config

    command = command_of(path)
    cfg = load_config(config_class_of(command), REPO / path)
    assert isinstance(cfg, config_class_of(command))
    if command in ("pretrain", "distill"):
        from megatron_kd.training.config import validate_pretrain_config

        on_gpu = "/gpu/" in path or "/miniplm/" in path
        p = cfg.parallel
        world = 8 if on_gpu else p.tensor_parallel * p.pipeline_parallel
        validate_pretrain_config(cfg, world_size=world, on_gpu=on_gpu)  # raises on an invalid config
        assert cfg.train.train_iters > 0 and cfg.train.seq_length > 0


def _cli(capsys, *argv):
    from megatron_kd.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_pretrain_tiny_dry_run(capsys):
    code, out, err = _cli(capsys, "pretrain", "--config", str(REPO / "examples/cpu/pretrain_tiny.yaml"), "--dry-run")
    assert code == 0, err
    assert "resolved_model" in out and "synthetic: true" in out


@pytest.fixture(scope="module")
def posttrain_inputs(tmp_path_factory):
    from posttrain_inputs import make_inputs

    return make_inputs(tmp_path_factory.mktemp("posttrain_inputs"))


@pytest.mark.parametrize("path", [p for p in EXAMPLES if command_of(p) in ("sft", "minillm", "onpolicy")])
def test_post_training_dry_run(path, capsys, posttrain_inputs, tmp_path, monkeypatch):
    import yaml

    from posttrain_inputs import command_inputs

    command = command_of(path)
    if "/gpu" in path or "_gpu" in path:
        monkeypatch.setenv("WORLD_SIZE", "8")  # the launch it is written for (torchrun --nproc-per-node 8)
    code, out, err = _cli(capsys, command, "--config", str(REPO / path), "--dry-run",
                          *command_inputs(command, posttrain_inputs, str(tmp_path / "run")))
    assert code == 0, err
    plan = yaml.safe_load(out)
    assert plan["resolved_model"]["num_layers"] == 1 and plan["resolved_plan"]["train_iters"] > 0
    assert ("resolved_teacher" in plan) == (command != "sft")
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_dry_run_reports_bad_choice_in_one_line(capsys):
    code, _, err = _cli(capsys, "minillm", "--config", str(REPO / "examples/minillm/minillm_cpu.yaml"),
                        "--dry-run", "bogus_key=1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bogus_key" in err
