"""One config vocabulary (issue 14): Literal choices checked by the loader in one line, ModelSpec a real
dataclass mirroring ModelConfig, --help-config showing every key with type, default and docstring."""
from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from megatron_kd.config import ConfigError, describe_config, field_docs, format_config_help, load_config


def test_model_spec_is_a_real_dataclass_mirroring_model_config():
    from megatron_kd.models.config import ModelConfig
    from megatron_kd.training.config import ModelSpec

    assert "class ModelSpec" in inspect.getsource(ModelSpec)  # written out, not make_dataclass
    spec = [f.name for f in dataclasses.fields(ModelSpec)]
    assert spec == ["preset"] + [f.name for f in dataclasses.fields(ModelConfig)], \
        "ModelSpec must list every ModelConfig field (add new ModelConfig fields to ModelSpec too)"
    hints, model_hints = typing.get_type_hints(ModelSpec), typing.get_type_hints(ModelConfig)
    for name in spec[1:]:
        inner = [a for a in typing.get_args(hints[name]) if a is not type(None)]
        model = [a for a in (typing.get_args(model_hints[name]) or (model_hints[name],)) if a is not type(None)]
        assert inner == model, name
    docs = field_docs(ModelSpec)
    assert docs["hidden_size"] == field_docs(ModelConfig)["hidden_size"] and docs["preset"]


@pytest.mark.parametrize("cls_path, override, key, choices", [
    ("megatron_kd.training.config:PretrainConfig", "optim.lr_schedule=step", "optim.lr_schedule", "constant, cosine, linear, wsd"),
    ("megatron_kd.training.config:PretrainConfig", "optim.precision=fp8", "optim.precision", "fp32, bf16, fp16"),
    ("megatron_kd.distill.config:DistillConfig", "kd.kind=kl", "kd.kind", "forward_kl"),
    ("megatron_kd.distill.config:DistillConfig", "kd.mode=live", "kd.mode", "online, offline, none"),
    ("megatron_kd.distill.config:DistillConfig", "teacher.dtype=int8", "teacher.dtype", "fp32, bf16, fp16"),
])
def test_literal_choices_fail_in_one_line(cls_path, override, key, choices):
    from megatron_kd.cli import resolve_class

    with pytest.raises(ConfigError) as err:
        load_config(resolve_class(cls_path), None, [override])
    msg = str(err.value)
    value = override.split("=", 1)[1]
    assert "\n" not in msg and msg.startswith(f"{key}={value!r} must be one of: ") and choices in msg


def test_code_built_configs_are_checked_too():
    from megatron_kd.distill.config import IntermediatePair, KDConfig
    from megatron_kd.losses.config import KDLossConfig

    with pytest.raises(ValueError, match="kd.kind='bogus' must be one of"):
        KDLossConfig(kind="bogus")
    with pytest.raises(ValueError, match=r"kd.intermediate\[0\].loss='l1' must be one of: cosine, mse"):
        KDConfig(intermediate=[IntermediatePair(loss="l1")])
    assert load_config(KDLossConfig, None, ["kind=jsd", "alpha_schedule=wsd"]).kind == "jsd"


def test_help_config_lists_every_key_with_type_default_doc():
    from megatron_kd.distill.config import DistillConfig

    rows = {key: (tp, default, doc) for key, tp, default, doc in describe_config(DistillConfig)}
    assert rows["kd.alpha"][1] == 0.5 and rows["kd.alpha"][0] == "float" and "KD weight" in rows["kd.alpha"][2]
    assert "forward_kl" in rows["kd.kind"][0] and rows["optim.lr_schedule"][0] == "constant | cosine | linear | wsd"
    assert rows["data.eod_mask_loss"][1] is False and rows["data.weights"][2]
    undocumented = [k for k, (_, _, doc) in rows.items() if not doc]
    assert not undocumented, f"config keys without a docstring: {undocumented}"
    text = format_config_help(DistillConfig)
    assert "kd.temperature: float = 1.0" in text


def test_help_config_flag(capsys):
    from megatron_kd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--help-config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "train.micro_batch_size: int = 4" in out and "model.preset: str | None = None" in out


def test_post_training_configs_document_every_key_and_share_optim_names():
    from megatron_kd.posttrain.run import MiniLLMRunConfig, OnPolicyRunConfig, SFTRunConfig

    for cls, optim in ((SFTRunConfig, "sft.optim"), (MiniLLMRunConfig, "optim"), (OnPolicyRunConfig, "onpolicy.optim")):
        rows = {key: doc for key, _, _, doc in describe_config(cls)}
        assert not [k for k, doc in rows.items() if not doc], cls
        for name in ("lr", "min_lr", "warmup_iters", "lr_schedule", "precision", "clip_grad"):
            assert f"{optim}.{name}" in rows, (cls, name)
        for name in ("checkpoint.save", "checkpoint.save_interval", "train.eval_interval", "checkpoint.keep_last",
                     "train.exit_interval", "train.train_iters", "train.seed", "logging.metrics_path"):
            assert name in rows, (cls, name)


def test_post_training_old_key_names_are_aliases(capsys):
    from megatron_kd.config import load_config
    from megatron_kd.posttrain.run import SFTRunConfig

    cfg = load_config(SFTRunConfig, None, ["model=tiny", "model_overrides.num_layers=1", "sft.optim.warmup_steps=3",
                                           "sft.optim.schedule=linear"])
    assert cfg.model.preset == "tiny" and cfg.model.num_layers == 1
    assert cfg.sft.optim.warmup_iters == 3 and cfg.sft.optim.lr_schedule == "linear"
    err = capsys.readouterr().err
    assert "'sft.optim.warmup_steps' is deprecated: use 'sft.optim.warmup_iters'" in err


# One vocabulary across commands: post-training spells run control as pretrain does; the old flat
# spellings stay accepted (a one-line note each) and resolve to the identical config.
OLD_NEW = {
    "sft": (["save=out", "save_interval=3", "keep_last=2", "eval_interval=4", "log_interval=5", "exit_interval=6",
             "exit_duration_mins=7.5", "sft.total_steps=8", "sft.seed=9"],
            ["checkpoint.save=out", "checkpoint.save_interval=3", "checkpoint.keep_last=2", "train.eval_interval=4",
             "train.log_interval=5", "train.exit_interval=6", "train.exit_duration_mins=7.5", "train.train_iters=8",
             "train.seed=9"]),
    "onpolicy": (["save=out", "eval_interval=4", "onpolicy.total_steps=8", "onpolicy.seed=9"],
                 ["checkpoint.save=out", "train.eval_interval=4", "train.train_iters=8", "train.seed=9"]),
    "minillm": (["save=out", "save_interval=3", "eval_interval=4", "total_steps=8", "seed=9"],
                ["checkpoint.save=out", "checkpoint.save_interval=3", "train.eval_interval=4", "train.train_iters=8",
                 "train.seed=9"]),
}


def _run_config_class(command):
    from megatron_kd.posttrain import run

    return {"sft": run.SFTRunConfig, "onpolicy": run.OnPolicyRunConfig, "minillm": run.MiniLLMRunConfig}[command]


@pytest.mark.parametrize("command", sorted(OLD_NEW))
def test_post_training_old_and_new_run_keys_resolve_identically(command, capsys):
    from megatron_kd.config import to_dict

    cls = _run_config_class(command)
    old, new = OLD_NEW[command]
    a, b = load_config(cls, None, old), load_config(cls, None, new)
    assert to_dict(a) == to_dict(b) and a == b
    assert b.train.train_iters == 8 and b.train.seed == 9 and b.checkpoint.save == "out"
    loop = b if command == "minillm" else getattr(b, command)
    assert (loop.total_steps, loop.seed) == (8, 9), "the algorithm reads the shared train.* values"
    assert "total_steps" not in to_dict(b) and "total_steps" not in to_dict(b).get(command, {})


@pytest.mark.parametrize("command", sorted(OLD_NEW))
def test_example_yaml_in_the_old_spelling_resolves_identically(command, tmp_path):
    """The shipped example, rewritten with the flat keys it used before, gives the same config."""
    from pathlib import Path

    import yaml

    from megatron_kd.config import to_dict

    cls = _run_config_class(command)
    example = Path(__file__).resolve().parents[2] / "examples/minillm" / f"{command}_cpu.yaml"
    new = yaml.safe_load(example.read_text())
    old = {k: v for k, v in new.items() if k not in ("train", "checkpoint")}
    own = old if command == "minillm" else old.setdefault(command, {})  # where total_steps / seed lived
    for key, value in (new.get("train") or {}).items():
        if key in ("train_iters", "seed"):
            own["total_steps" if key == "train_iters" else "seed"] = value
        else:
            old[key] = value
    old.update(new.get("checkpoint") or {})
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert to_dict(load_config(cls, tmp_path / "old.yaml")) == to_dict(load_config(cls, example))


def test_override_in_either_spelling_wins_over_the_yaml(tmp_path):
    from megatron_kd.posttrain.run import MiniLLMRunConfig

    (tmp_path / "old.yaml").write_text("total_steps: 5\nsave: a\n")
    (tmp_path / "new.yaml").write_text("train: {train_iters: 5}\ncheckpoint: {save: a}\n")
    for yaml_file in ("old.yaml", "new.yaml"):
        for over in (["total_steps=9", "save=b"], ["train.train_iters=9", "checkpoint.save=b"]):
            cfg = load_config(MiniLLMRunConfig, tmp_path / yaml_file, over)
            assert (cfg.train.train_iters, cfg.total_steps, cfg.checkpoint.save) == (9, 9, "b"), (yaml_file, over)


def test_post_training_help_config_shows_the_nested_keys(capsys):
    from megatron_kd.cli import main

    with pytest.raises(SystemExit):
        main(["sft", "--help-config"])
    out = capsys.readouterr().out
    assert "train.train_iters: int = 0" in out and "checkpoint.save: str | None = None" in out
    assert "checkpoint.save_interval: int = 100" in out and "logging.metrics_path" in out
    assert "sft.total_steps" not in out and "sft.seed" not in out and "\nsave:" not in out
