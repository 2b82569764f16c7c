"""Interop building blocks, in-process and fast: config mapping and refusals, RoPE scaling tables,
QKV layout, the streaming safetensors reader/writer, the vocabulary rule, CLI one-line errors.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/interop/test_interop_units.py``
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_kd.interop.hf_config import (FAMILY_DEFAULTS, hf_to_model_config, model_config_to_hf,
                                           rope_settings)
from megatron_kd.interop.hf_weights import fuse_qkv, hf_shapes, split_qkv
from megatron_kd.interop.safetensors_io import (HFCheckpointReader, SafetensorsFile, TensorSpec, parse_size,
                                                plan_shards, write_hf_weights, write_safetensors)
from megatron_kd.interop.vocab import check_vocab_compatible
from megatron_kd.models import ModelConfig

BASE = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300}
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "qwen3_moe": "Qwen3MoeConfig", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig"}


@pytest.mark.parametrize("family", sorted(CONFIG_CLASSES))
def test_family_defaults_match_transformers(family):
    import transformers

    ref = getattr(transformers, CONFIG_CLASSES[family])()
    for key, value in FAMILY_DEFAULTS[family].items():
        got = ref.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(ref, key)
        assert got == value, f"{family}.{key}: transformers {got!r} vs ours {value!r}"


def test_rope_spellings_and_llama3_tables():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = {**BASE, "rope_theta": 5e5, "rope_scaling": scaling}
    new = {**BASE, "rope_parameters": {**scaling, "rope_theta": 5e5}}
    assert rope_settings(old, "llama") == rope_settings(new, "llama") == (5e5, True, 32.0)
    assert rope_settings({**BASE, "rope_theta": 1e6}, "llama") == (1e6, False, 8.0)
    # megatron's scaled inverse frequencies equal transformers' for a real head size (128).
    hf = LlamaRotaryEmbedding(LlamaConfig(**{**BASE, "hidden_size": 512, "rope_parameters": new["rope_parameters"],
                                             "max_position_embeddings": 131072}))
    mc = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500000, rope_scaling=True,
                         rope_scaling_factor=32.0, use_cpu_initialization=True)
    torch.testing.assert_close(mc.inv_freq, hf.inv_freq.float(), rtol=1e-6, atol=0)
    unscaled = RotaryEmbedding(kv_channels=128, rotary_percent=1.0, rotary_base=500000, use_cpu_initialization=True)
    assert not torch.allclose(unscaled.inv_freq, hf.inv_freq.float())  # the scaling matters


@pytest.mark.parametrize("bad, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architectures=\['GPT2LMHeadModel'\]"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, r"DeepseekV3ForCausalLM.*multi-head latent attention"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}}, "high_freq_factor=2.0"),
])
def test_unsupported_configs_fail_in_one_line(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        hf_to_model_config({**BASE, **bad})
    assert "\n" not in str(info.value)


def test_sliding_window_warns_and_head_dim_maps():
    cfg, warnings = hf_to_model_config({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    assert len(warnings) == 1 and "4096" in warnings[0] and cfg.kv_channels is None
    cfg, warnings = hf_to_model_config({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": None})
    assert warnings == []
    cfg, _ = hf_to_model_config({**BASE, "architectures": ["Qwen3ForCausalLM"]})  # Qwen3 default head_dim 128
    assert cfg.head_dim == 128 and cfg.qk_layernorm and not cfg.add_qkv_bias
    cfg, _ = hf_to_model_config({**BASE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True})
    assert cfg.add_qkv_bias and cfg.tie_embeddings and cfg.num_query_groups == 2


def test_config_export_without_base_round_trips_and_refuses_wrong_arch():
    import transformers

    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                      vocab_size=300, rope_scaling=True, rope_scaling_factor=32.0, rotary_base=5e5)
    hf = model_config_to_hf(cfg)
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["rope_scaling"]["rope_type"] == "llama3"
    assert hf_to_model_config(hf)[0] == cfg
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if k != "lm_head.weight" or not cfg.tie_embeddings}
    assert shapes == hf_shapes(cfg)
    with pytest.raises(ValueError, match="use --arch qwen2"):
        model_config_to_hf(ModelConfig(vocab_size=300, add_qkv_bias=True), family="llama")


def test_qkv_layout_is_grouped_per_kv_head():
    cfg = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2, kv_channels=3, vocab_size=10)
    q, k, v = torch.randn(12, 8), torch.randn(6, 8), torch.randn(6, 8)
    fused = fuse_qkv(q, k, v, cfg)
    d = 3  # independent construction: group g = [q heads 2g, 2g+1; k_g; v_g]
    expected = torch.cat([torch.cat([q[2 * g * d:(2 * g + 2) * d], k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                          for g in range(2)])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], cfg)
    assert torch.equal(bias, expected[:, 0])


def test_streaming_safetensors_matches_reference_library(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"a": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6, dtype=torch.int64),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "ref.safetensors")
    f = SafetensorsFile(tmp_path / "ref.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.read(k), v) and f.shape(k) == tuple(v.shape)
    out = torch.empty(5, 3, dtype=torch.float64)  # read with a cast, into a destination
    f.read("a", out=out)
    assert torch.equal(out, tensors["a"].double())
    specs = [TensorSpec(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "ours.safetensors", specs)
    back = load_file(tmp_path / "ours.safetensors")
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    # sharded output with an index json, read back through HFCheckpointReader
    files = write_hf_weights(tmp_path / "sharded", specs, max_shard_bytes=40)
    assert files[-1] == "model.safetensors.index.json" and len(files) > 2
    reader = HFCheckpointReader(tmp_path / "sharded")
    assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
    assert reader.total_bytes() == sum(v.numel() * v.element_size() for v in tensors.values())


def test_sizes_and_shard_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("five gigs")
    specs = [TensorSpec(str(i), torch.float32, (n,), lambda: None) for i, n in enumerate([10, 10, 30, 5])]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 80)] == [["0", "1"], ["2"], ["3"]]


class _Tok:
    def __init__(self, identity, vocab_size):
        self.identity, self.vocab_size = identity, vocab_size


def test_vocab_rule():
    qwen_tok = _Tok("huggingface:sha256:q", 151665)
    plan = check_vocab_compatible(ModelConfig(vocab_size=152064), {"model_config": {"vocab_size": 151936}},
                                  qwen_tok, _Tok("huggingface:sha256:q", 151665))
    assert plan.kd_vocab_size == 151665 and plan.tokenizer_checked
    assert plan.padded_vocab_size(1) == 152064 and plan.padded_vocab_size(2) == 152064
    assert check_vocab_compatible(4096, 4096).kd_vocab_size == 4096
    with pytest.raises(ValueError, match="tokenizers are not both known"):
        check_vocab_compatible(152064, 151936, qwen_tok)
    with pytest.raises(ValueError, match="differ: logit KD needs the same tokenizer"):
        check_vocab_compatible(152064, 151936, qwen_tok, _Tok("huggingface:sha256:llama", 128256))
    with pytest.raises(ValueError, match="student vocab_size=1000 is smaller than the tokenizer's 151665"):
        check_vocab_compatible(152064, 1000, qwen_tok, qwen_tok)


def _hf_dir(tmp_path: Path, **overrides) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**BASE, **overrides}))
    return d


def test_cli_errors_are_one_line(tmp_path, capsys):
    from megatron_kd.cli import main

    def run(*argv):
        code = main(["convert", *argv])
        err = capsys.readouterr().err.strip()
        return code, err

    code, err = run("hf-to-mcore", "--hf", str(_hf_dir(tmp_path, architectures=["BertForMaskedLM"])), "--out",
                    str(tmp_path / "ck"))
    assert code == 2 and len(err.splitlines()) == 1 and "architectures=['BertForMaskedLM']" in err
    code, err = run("hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "ck"))
    assert code == 2 and "does not exist" in err
    code, err = run("hf-to-mcore", "--hf", str(_hf_dir(tmp_path)), "--out", str(tmp_path / "ck"), "--tp", "3")
    assert code == 2 and "tensor_parallel=3 does not divide" in err
    code, err = run("hf-to-mcore", "--hf", str(_hf_dir(tmp_path)), "--out", str(tmp_path / "ck"))
    assert code == 2 and "has no model.safetensors" in err
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("iter_0000000\n")
    save = {k: torch.zeros(v) for k, v in hf_shapes(hf_to_model_config(BASE)[0]).items()}
    from safetensors.torch import save_file

    save_file(save, _hf_dir(tmp_path) / "model.safetensors")
    code, err = run("hf-to-mcore", "--hf", str(_hf_dir(tmp_path)), "--out", str(tmp_path / "ck"))
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, err = run("mcore-to-hf", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and "has no 'latest' file" in err


def _tokenizer_dir(path: Path, n: int, max_len: int) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, n)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", model_max_length=max_len)
    tok.save_pretrained(path)
    return path


def test_vocab_rule_with_tokenizer_directories(tmp_path):
    from megatron_kd.interop.vocab import vocab_fingerprint

    a = _tokenizer_dir(tmp_path / "a", 250, 1024)
    b = _tokenizer_dir(tmp_path / "b", 250, 4096)  # same ids, different tokenizer_config.json
    c = _tokenizer_dir(tmp_path / "c", 260, 1024)
    assert vocab_fingerprint(a) == vocab_fingerprint(b) != vocab_fingerprint(c)
    assert (a / "tokenizer_config.json").read_bytes() != (b / "tokenizer_config.json").read_bytes()
    plan = check_vocab_compatible(300, 384, str(a), str(b))
    assert plan.kd_vocab_size == 250 and plan.tokenizer_checked
    # Tokenizer objects whose file hashes differ fall back to the id -> token map of their path.
    plan = check_vocab_compatible(300, 300, _TokAt("hash-a", 250, str(a)), _TokAt("hash-b", 250, str(b)))
    assert plan.kd_vocab_size == 250
    with pytest.raises(ValueError, match="logit KD needs the same tokenizer"):
        check_vocab_compatible(300, 300, str(a), str(c))


class _TokAt(_Tok):
    def __init__(self, identity, vocab_size, path):
        super().__init__(identity, vocab_size)
        self.path = path
