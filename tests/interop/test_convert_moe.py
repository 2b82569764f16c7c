"""Mixture-of-experts HF <-> megatron conversion against ``transformers`` (random weights, fp32).

Tiny Qwen3-MoE (12 experts, top-8, renormalised, head_dim 32 != hidden/heads, one dense layer),
Mixtral (4 experts, top-2, head_dim 24) and Qwen2-MoE (8 experts, top-4 un-renormalised, a
sigmoid-gated shared expert, QKV bias, tied embeddings) -> ``megatron-kd convert hf-to-mcore`` ->
logits equal HF's within 1e-4 at TP=1, TP=2 and EP=2 (megatron-core's allgather token dispatcher on
gloo); PP=2 stages hold the TP=1 weights; ``mcore-to-hf`` reproduces the safetensors bit for bit.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/interop/test_convert_moe.py``
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_helpers import run_workers
from moe_hf import MOE_VARIANTS, SMALL, VOCAB, make_hf_moe

SEQ = 16


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    return {name: make_hf_moe(name, root) for name in MOE_VARIANTS}


@pytest.fixture(scope="module")
def hf_logits(hf_models):
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in hf_models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(_tokens()).logits
    return out


def _megatron_logits(ckpt: str) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_kd.models import mask_padded_vocab
    from megatron_kd.training.checkpoint import load_model_for_inference

    model, cfg, _ = load_model_for_inference(ckpt)
    with torch.no_grad():
        logits = mask_padded_vocab(model(_tokens(), torch.arange(SEQ)[None].expand(2, -1), None), cfg.vocab_size)
        return gather_from_tensor_model_parallel_region(logits)[..., : cfg.vocab_size].clone()


def _full_state(ckpt: str) -> dict[str, torch.Tensor]:
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.models.sharding import gather_full_state
    from megatron_kd.training.checkpoint import load_checkpoint, read_checkpoint_meta

    meta = read_checkpoint_meta(ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    model = build_gpt_model(cfg, padded_vocab_size=meta["padded_vocab_size"])
    load_checkpoint(ckpt, [model], load_rng=False)
    return gather_full_state(model, cfg)


def _convert_load_export(rank, world_size, models: dict, root: str):
    """1 process: CLI import (--tp 2 padding) of every model; TP=1 logits and full state; CLI export."""
    from megatron_kd.cli import main
    from megatron_kd.interop.convert import single_process

    logits, states = {}, {}
    for name, hf_dir in models.items():
        ckpt, exported = f"{root}/ckpt_{name}", f"{root}/export_{name}"
        assert main(["convert", "hf-to-mcore", "--hf", str(hf_dir), "--out", ckpt, "--tp", "2", "--quiet"]) == 0
        with single_process():
            logits[name] = _megatron_logits(ckpt)
            states[name] = _full_state(ckpt)
        shard = ["--max-shard-size", "150KB"] if name == "qwen3_moe" else []
        assert main(["convert", "mcore-to-hf", "--ckpt", ckpt, "--out", exported, "--quiet", *shard]) == 0
    return logits, states


def _load_parallel(rank, world_size, root: str, names: list, full_states: dict):
    """2 processes: logits at TP=2 and at EP=2; PP=2 and EP=2 gathered weights equal the TP=1 ones."""
    from megatron_kd.runtime import ParallelConfig, init_distributed

    out = {}
    for label, layout in (("tp2", ParallelConfig(tensor_parallel=2)), ("ep2", ParallelConfig(expert_parallel=2)),
                          ("pp2", ParallelConfig(pipeline_parallel=2))):
        init_distributed(layout)
        for name in names:
            ckpt = f"{root}/ckpt_{name}"
            if label != "pp2":
                out[f"{name}@{label}"] = _megatron_logits(ckpt)
            if label != "tp2":
                got = _full_state(ckpt)
                out[f"{name}@{label}:state"] = sorted(got) == sorted(full_states[name]) and all(
                    torch.equal(got[k], full_states[name][k]) for k in got)
    return out


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore_moe")
    ((logits, states),) = run_workers(_convert_load_export, 1, hf_models, str(root))
    return root, logits, states


def test_moe_import_tp1_logits_match_transformers(converted, hf_logits):
    from megatron_kd.models import ModelConfig

    root, tp1, states = converted
    for name, ref in hf_logits.items():
        diff = (tp1[name] - ref).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs logit diff {diff}"
    q3 = ModelConfig.load(root / "ckpt_qwen3_moe" / "model_config.json")
    assert (q3.num_moe_experts, q3.moe_router_topk, q3.moe_router_pre_softmax, q3.head_dim) == (12, 8, False, 32)
    assert q3.moe_layer_pattern == [1, 0] and q3.qk_layernorm
    mx = ModelConfig.load(root / "ckpt_mixtral" / "model_config.json")
    assert (mx.num_moe_experts, mx.moe_router_topk, mx.moe_ffn_hidden_size, mx.head_dim) == (4, 2, 40, 24)
    q2 = ModelConfig.load(root / "ckpt_qwen2_moe" / "model_config.json")
    assert q2.moe_router_pre_softmax and q2.moe_shared_expert_intermediate_size == 48 and q2.moe_shared_expert_gate
    assert q2.add_qkv_bias and q2.tie_embeddings
    assert "decoder.layers.0.mlp.shared_experts.gate_weight" in states["qwen2_moe"]
    assert "decoder.layers.1.mlp.experts.local_experts.11.linear_fc1.weight" not in states["qwen3_moe"]  # dense
    assert "decoder.layers.0.mlp.experts.local_experts.11.linear_fc1.weight" in states["qwen3_moe"]


def test_moe_logits_at_tp2_and_ep2_and_weights_at_pp2(converted, hf_logits):
    root, _, states = converted
    names = sorted(MOE_VARIANTS)
    out, _ = run_workers(_load_parallel, 2, str(root), names, states)
    for name in names:
        for label in ("tp2", "ep2"):
            diff = (out[f"{name}@{label}"] - hf_logits[name]).abs().max().item()
            assert diff <= 1e-4, f"{name} at {label}: max abs logit diff {diff}"
        assert out[f"{name}@pp2:state"], f"{name}: PP=2 stages do not hold the TP=1 weights"
        assert out[f"{name}@ep2:state"], f"{name}: EP=2 ranks do not hold the TP=1 experts"


def _safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def test_moe_export_equals_original(converted, hf_models, hf_logits):
    from transformers import AutoModelForCausalLM

    root = converted[0]
    for name, hf_dir in hf_models.items():
        out = root / f"export_{name}"
        original, exported = _safetensors_state(hf_dir), _safetensors_state(out)
        assert sorted(original) == sorted(exported), name
        for k, v in original.items():
            assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), f"{name}: {k} differs"
        assert json.loads((out / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(model(_tokens()).logits, hf_logits[name]), name
    assert (root / "export_qwen3_moe" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("arch, extra, match", [
    ("DeepseekV3ForCausalLM", {}, "multi-head latent attention"),
    ("Qwen3MoeForCausalLM", {"scoring_func": "sigmoid"}, "scoring_func"),
    ("Qwen3MoeForCausalLM", {"kv_lora_rank": 512}, "kv_lora_rank"),
    ("MixtralForCausalLM", {"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_moe_variants_fail_in_one_line(arch, extra, match):
    from megatron_kd.interop import hf_to_model_config

    base = {**SMALL, "num_hidden_layers": 2, "architectures": [arch], "num_experts": 4, "num_experts_per_tok": 2}
    with pytest.raises(ValueError, match=match) as info:
        hf_to_model_config({**base, **extra})
    assert "\n" not in str(info.value)
