"""HF <-> megatron conversion, end to end, against ``transformers`` models with random weights.

For each family (Llama tied/untied with llama3 RoPE scaling, Mistral, Qwen2 with QKV bias,
Qwen3 with QK-norm and head_dim != hidden/heads): save a tiny model (vocab 300, not a multiple
of 128; some saves sharded with an index json) -> ``megatron-kd convert hf-to-mcore`` -> load at
TP=1 and TP=2 -> logits equal HF's (fp32, max abs diff <= 1e-4); weights at PP=2 equal; then
``mcore-to-hf`` -> safetensors equal to the original, exactly, and transformers loads it.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/interop/test_convert.py``
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_helpers import run_workers

SEQ = 16
VOCAB = 300
TOKENIZER_SIZE = 250  # the model vocab (300) is padded beyond the tokenizer, like Qwen's
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
VARIANTS = {
    # name: (config class, extra config kwargs, save with small shards?)
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE,
                                                   max_position_embeddings=16384), True),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True, rms_norm_eps=1e-5), False),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False), True),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}), False),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32), True),
}


def _save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, TOKENIZER_SIZE)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)


def _make_hf_model(name: str, root: Path) -> Path:
    import transformers

    cls_name, extra, sharded = VARIANTS[name]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra})
    torch.manual_seed(hash(name) % 1000)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise everything
        for pname, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.15) + (1.0 if "norm" in pname else 0.0))
    path = root / name
    model.save_pretrained(path, max_shard_size="150KB" if sharded else "5GB")
    _save_tokenizer(path)
    return path


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _make_hf_model(name, root) for name in VARIANTS}


@pytest.fixture(scope="module")
def hf_logits(hf_models):
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in hf_models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(_tokens()).logits
    return out


def _megatron_logits(ckpt: str, padded_vocab_size: int | None = None) -> torch.Tensor:
    """Full-vocab logits [b, s, VOCAB] of a checkpoint loaded under the current parallel_state."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_kd.models import build_gpt_model, mask_padded_vocab
    from megatron_kd.training.checkpoint import load_checkpoint, load_model_for_inference, read_checkpoint_meta

    if padded_vocab_size is None:
        model, cfg, _ = load_model_for_inference(ckpt)
    else:  # a different padding than saved (the VocabPlan route): extra rows load as zeros
        meta = read_checkpoint_meta(ckpt)
        from megatron_kd.models import ModelConfig

        cfg = ModelConfig.from_dict(meta["model_config"])
        model = build_gpt_model(cfg, padded_vocab_size=padded_vocab_size).eval()
        load_checkpoint(ckpt, [model], load_rng=False)
    tokens = _tokens()
    with torch.no_grad():
        logits = mask_padded_vocab(model(tokens, torch.arange(SEQ)[None].expand(2, -1), None), cfg.vocab_size)
        return gather_from_tensor_model_parallel_region(logits)[..., : cfg.vocab_size].clone()


def _full_state(ckpt: str) -> dict[str, torch.Tensor]:
    """The checkpoint's full (TP=1-layout) state, gathered under the current parallel_state."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.models.sharding import gather_full_state
    from megatron_kd.training.checkpoint import load_checkpoint, read_checkpoint_meta

    meta = read_checkpoint_meta(ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = build_gpt_model(cfg, padded_vocab_size=meta["padded_vocab_size"])
    load_checkpoint(ckpt, [model], load_rng=False)
    return gather_full_state(model, cfg)


def _convert_load_export(rank, world_size, models: dict, root: str):
    """1 process: CLI import of every model; TP=1 logits and full state; CLI export."""
    from megatron_kd.cli import main
    from megatron_kd.interop.convert import single_process

    logits, states = {}, {}
    for name, hf_dir in models.items():
        ckpt, exported = f"{root}/ckpt_{name}", f"{root}/export_{name}"
        shard = ["--max-shard-size", "100KB"] if name == "qwen3" else []
        assert main(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", ckpt, "--tp", "2", "--quiet"]) == 0
        with single_process():
            logits[name] = _megatron_logits(ckpt)
            states[name] = _full_state(ckpt)
        assert main(["convert", "mcore-to-hf", "--ckpt", ckpt, "--out", exported, "--quiet", *shard]) == 0
    return logits, states


STUDENT = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
               kv_channels=24, vocab_size=VOCAB, qk_layernorm=True, rotary_base=1e6, norm_epsilon=1e-6)


def _load_tp2_pp2(rank, world_size, root: str, names: list, full_states: dict):
    """2 processes: TP=2 logits per checkpoint (one with a larger padding); PP=2 weights; a random
    megatron-native student saved at TP=2 (exported to HF afterwards)."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig(tensor_parallel=2))
    logits = {name: _megatron_logits(f"{root}/ckpt_{name}") for name in names}
    for padded in (384, 1024):  # saved with 512 rows: load into fewer and into more
        logits[f"qwen2@{padded}"] = _megatron_logits(f"{root}/ckpt_qwen2", padded_vocab_size=padded)
    set_seed(3)
    cfg = ModelConfig(**STUDENT, init_method_std=0.2)
    student = build_gpt_model(cfg)
    with torch.no_grad():
        for i, (name, p) in enumerate(student.named_parameters()):
            if "layernorm" in name:  # same generator on both ranks: replicated norms stay equal
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    save_checkpoint(f"{root}/student", [student], cfg, iteration=5)
    logits["student"] = _megatron_logits(f"{root}/student")
    init_distributed(ParallelConfig(pipeline_parallel=2))
    pp_equal = {}
    for name in names:
        gathered = _full_state(f"{root}/ckpt_{name}")
        pp_equal[name] = sorted(gathered) == sorted(full_states[name]) and all(
            torch.equal(gathered[k], full_states[name][k]) for k in gathered)
    return logits, pp_equal


def _export_student(rank, world_size, root: str):
    from megatron_kd.cli import main

    return [main(["convert", "mcore-to-hf", "--ckpt", f"{root}/student", "--out", f"{root}/student_hf{suffix}",
                  *dtype, "--quiet"]) for suffix, dtype in (("", []), ("_bf16", ["--dtype", "bf16"]))]


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore")
    ((logits, states),) = run_workers(_convert_load_export, 1, hf_models, str(root))
    return root, logits, states


def test_import_tp1_logits_match_transformers(converted, hf_logits):
    _, tp1, _ = converted
    for name, ref in hf_logits.items():
        diff = (tp1[name] - ref).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs logit diff {diff}"


def test_import_loads_at_tp2_and_pp2_and_student_exports(converted, hf_logits):
    from transformers import AutoModelForCausalLM

    root, _, states = converted
    names = sorted(VARIANTS)
    (logits, pp_equal), _ = run_workers(_load_tp2_pp2, 2, str(root), names, states)
    for name in names:
        diff = (logits[name] - hf_logits[name]).abs().max().item()
        assert diff <= 1e-4, f"{name} at TP=2: max abs logit diff {diff}"
        assert pp_equal[name], f"{name}: PP=2 stages do not hold the TP=1 weights"
    for padded in (384, 1024):
        diff = (logits[f"qwen2@{padded}"] - hf_logits["qwen2"]).abs().max().item()
        assert diff <= 1e-4, f"qwen2 loaded with padded vocab {padded}: max abs logit diff {diff}"
    # A megatron-native student (saved at TP=2, no hf_config.json) exports as Qwen3 (QK-norm).
    assert run_workers(_export_student, 1, str(root)) == [[0, 0]]
    hf_cfg = json.loads((root / "student_hf" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["Qwen3ForCausalLM"] and hf_cfg["head_dim"] == 24
    hf = AutoModelForCausalLM.from_pretrained(root / "student_hf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(_tokens()).logits
    diff = (logits["student"] - ref).abs().max().item()
    assert diff <= 1e-4, f"exported student: max abs logit diff {diff}"
    fp32, bf16 = _safetensors_state(root / "student_hf"), _safetensors_state(root / "student_hf_bf16")
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in fp32.items())
    assert json.loads((root / "student_hf_bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_checkpoint_carries_config_tokenizer_and_padding(converted, hf_models):
    from megatron_kd.interop.convert import checkpoint_tokenizer
    from megatron_kd.models import ModelConfig
    from megatron_kd.training.checkpoint import read_checkpoint_meta

    root = converted[0]
    for name, hf_dir in hf_models.items():
        ckpt = root / f"ckpt_{name}"
        meta = read_checkpoint_meta(ckpt)
        assert meta["padded_vocab_size"] == 512  # 300 rounded up to 128 * --tp 2
        assert meta["extra"]["tokenizer_vocab"]["vocab_size"] == TOKENIZER_SIZE
        assert ModelConfig.load(ckpt / "model_config.json").vocab_size == VOCAB
        assert json.loads((ckpt / "hf_config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
        tok = Path(checkpoint_tokenizer(ckpt))
        assert tok == ckpt / "tokenizer" and (tok / "tokenizer.json").is_file()
    cfg = ModelConfig.load(root / "ckpt_qwen3" / "model_config.json")
    assert cfg.qk_layernorm and cfg.head_dim == 32 and not cfg.tie_embeddings
    cfg = ModelConfig.load(root / "ckpt_qwen2" / "model_config.json")
    assert cfg.add_qkv_bias and cfg.tie_embeddings and cfg.rotary_base == 1e6
    cfg = ModelConfig.load(root / "ckpt_llama_untied" / "model_config.json")
    assert cfg.rope_scaling and cfg.rope_scaling_factor == 32.0 and cfg.rotary_base == 500000.0


def _safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def test_export_equals_original(converted, hf_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = converted[0]
    for name, hf_dir in hf_models.items():
        out = root / f"export_{name}"
        original, exported = _safetensors_state(hf_dir), _safetensors_state(out)
        assert sorted(original) == sorted(exported), name
        for k, v in original.items():
            assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), f"{name}: {k} differs"
        assert json.loads((out / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
        a = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
        b = AutoModelForCausalLM.from_pretrained(out).state_dict()
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), name
        assert (out / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
        text = "w5 w7 w249 <eos>"
        assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(hf_dir).encode(text)
    assert (root / "export_qwen3" / "model.safetensors.index.json").is_file()  # --max-shard-size 100KB
