"""Pretrain config: loading with presets/overrides, and bad configs failing in one line before any model."""
from pathlib import Path

import pytest

from megatron_kd.cli import main
from megatron_kd.config import ConfigError, load_config
from megatron_kd.training.config import PretrainConfig, resolve_model_config, validate_pretrain_config

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.preset=tiny", "model.vocab_size=256", "data.synthetic=true", "train.train_iters=10"]


def test_preset_plus_overrides_resolve():
    cfg = load_config(PretrainConfig, None, TINY + ["model.num_layers=4", "optim.lr_schedule=wsd"])
    model = resolve_model_config(cfg.model)
    assert (model.num_layers, model.hidden_size, model.num_query_groups, model.vocab_size) == (4, 64, 2, 256)
    assert validate_pretrain_config(cfg, world_size=1, on_gpu=False) == model


def test_example_yamls_validate():
    cfg = load_config(PretrainConfig, REPO / "examples/cpu/pretrain_tiny.yaml")
    validate_pretrain_config(cfg, world_size=2, on_gpu=False)
    gpu = load_config(PretrainConfig, REPO / "examples/gpu/pretrain_qwen2.5_0.5b.yaml",
                      ["logging.tensorboard_dir=null"])
    model = validate_pretrain_config(gpu, world_size=8, on_gpu=True)
    assert model.vocab_size == 151936 and gpu.train.global_batch_size // (4 * 8) == 8


@pytest.mark.parametrize("overrides, world, message", [
    (["train.lr=1e-3"], 1, "unknown config key 'train.lr'"),
    (["model.num_layer=2"], 1, "unknown config key 'model.num_layer'"),
    (["parallel.tensor_parallel=3"], 3, "tensor_parallel=3 does not divide model.num_attention_heads=4"),
    (["parallel.pipeline_parallel=4"], 4, "pipeline_parallel=4 does not divide model.num_layers=2"),
    (["parallel.tensor_parallel=2"], 3, "world size 3 is not divisible by"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "not a multiple of train.micro_batch_size"),
    (["optim.lr_schedule=step"], 1, "optim.lr_schedule='step' must be one of"),
    (["optim.precision=bf16"], 1, "needs a CUDA GPU"),
    (["optim.warmup_iters=10"], 1, "warmup (10 steps) must be shorter"),
    (["data.synthetic=false"], 1, "set exactly one data source"),
])
def test_bad_config_fails_in_one_line_before_any_model(overrides, world, message, monkeypatch, capsys):
    import megatron_kd.training.pretrain as pretrain

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the config was validated")

    monkeypatch.setattr(pretrain, "setup_model_and_optimizer", no_model)
    monkeypatch.setattr(pretrain, "init_distributed", no_model)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["pretrain", *TINY, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("megatron-kd pretrain: error:") and message in err, err


def test_missing_config_file_is_one_line(capsys):
    assert main(["pretrain", "--config", "nope.yaml"]) == 2
    assert "config file nope.yaml does not exist" in capsys.readouterr().err


def test_config_error_is_value_error():
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, None, ["checkpoint.keep=1"])
