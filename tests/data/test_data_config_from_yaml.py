"""The `data:` section of pretrain/distill configs *is* a DataConfig: every field (blend `weights`,
`valid_prefixes`, `eod_mask_loss`, ...) set from YAML reaches the datasets (issue 14)."""
import numpy as np
import pytest

from megatron_kd.config import ConfigError, load_config
from megatron_kd.data.gpt_dataset import DataConfig, build_gpt_datasets
from megatron_kd.training.config import PretrainConfig, PretrainDataConfig
from megatron_kd.training.pretrain import _data_config

SEQ = 32


def test_yaml_blend_weights_valid_prefixes_and_eod_mask_reach_the_datasets(demo_dataset, sp_tok, tmp_path):
    yaml_path = tmp_path / "pretrain.yaml"
    yaml_path.write_text(
        "model: {preset: tiny, vocab_size: 1000}\n"
        f"train: {{seq_length: {SEQ}, seed: 7}}\n"
        "data:\n"
        f"  prefixes: [{demo_dataset}, {demo_dataset}]\n"
        "  weights: [1, 3]\n"
        f"  valid_prefixes: [{demo_dataset}]\n"
        "  eod_mask_loss: true\n"
        f"  tokenizer: {sp_tok.path}\n"
        f"  cache_dir: {tmp_path / 'cache'}\n")
    cfg = load_config(PretrainConfig, yaml_path)
    assert isinstance(cfg.data, DataConfig)
    dc = _data_config(cfg)
    assert type(dc) is DataConfig
    assert (dc.train_prefixes, dc.weights, dc.valid_prefixes) == ([demo_dataset] * 2, [1.0, 3.0], [demo_dataset])
    assert (dc.eod_mask_loss, dc.seq_length, dc.seed) == (True, SEQ, 7)
    train, valid, _ = build_gpt_datasets(dc, sp_tok, 400, 20, 0)
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    assert abs((ids == 1).mean() - 0.75) < 0.01            # the blend follows the YAML weights
    assert valid is not None and len(valid) >= 20          # built from valid_prefixes
    tokens = train[0]["tokens"].numpy()
    for i in range(len(train)):
        tokens = train[i]["tokens"].numpy()
        assert np.array_equal(train[i]["loss_mask"].numpy(), (tokens != sp_tok.eod).astype(np.float32))


def test_data_section_spellings_and_errors():
    assert PretrainDataConfig(train_prefixes=["a"]).prefixes == ["a"]
    assert PretrainDataConfig(prefixes=["a"]).train_prefixes == ["a"]
    with pytest.raises(ValueError, match="set only one of them"):
        PretrainDataConfig(prefixes=["a"], train_prefixes=["b"])
    with pytest.raises(ConfigError, match="one weight per prefix"):
        load_config(PretrainConfig, None, ["data.prefixes=[a,b]", "data.weights=[1]"])
    cfg = load_config(PretrainConfig, None, ["data.prefixes=[a]", "data.seq_length=64", "train.seq_length=32"])
    with pytest.raises(ValueError, match="differs from train.seq_length=32"):
        _data_config(cfg)
