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
        for name in ("save", "save_interval", "eval_interval", "keep_last", "exit_interval", "logging.metrics_path"):
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
