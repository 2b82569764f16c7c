"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for the supported decoder families.

Supported ``architectures``: ``LlamaForCausalLM`` (Llama 2 / 3.x), ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (Qwen2 / Qwen2.5), ``Qwen3ForCausalLM`` (dense Qwen3) and the mixtures of
experts ``Qwen3MoeForCausalLM``, ``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM``. The raw JSON is
read (both the ``rope_theta``/``rope_scaling`` spelling of older files and the ``rope_parameters``
spelling of transformers >= 5), with each family's own defaults for keys a file leaves out.
Anything megatron-core cannot reproduce exactly is refused with one line; features that are exact
only up to a sequence length (sliding-window attention) are accepted with a warning.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from megatron_kd.models.config import ModelConfig
from megatron_kd.utils.io import read_json

#: ``architectures[0]`` -> family name.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
FAMILY_ARCHITECTURE = {v: k for k, v in ARCHITECTURES.items()}
#: Mixture-of-experts families (megatron-core MoE layers).
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")

#: Mixture-of-experts architectures megatron-kd knows but cannot convert exactly: the feature that stops it.
UNSUPPORTED_FEATURES = {
    "DeepseekV2ForCausalLM": "multi-head latent attention (MLA)",
    "DeepseekV3ForCausalLM": "multi-head latent attention (MLA) and sigmoid routing with expert-bias terms",
    "DeepseekV32ForCausalLM": "multi-head latent attention (MLA) and sigmoid routing with expert-bias terms",
    "Glm4MoeForCausalLM": "sigmoid routing with expert-bias terms (e_score_correction_bias)",
    "GptOssForCausalLM": "biased experts with a clamped SwiGLU and attention sinks",
    "Llama4ForCausalLM": "chunked/no-RoPE attention layers and sigmoid top-1 routing",
    "OlmoeForCausalLM": "QK-norm over the whole projection (not per head)",
    "PhimoeForCausalLM": "sparsemixer routing",
    "DbrxForCausalLM": "fused Wqkv with clipping and its expert layout",
    "GraniteMoeForCausalLM": "embedding/residual/logit multipliers",
    "JambaForCausalLM": "Mamba layers",
    "MiniMaxForCausalLM": "lightning (linear) attention layers",
}
# Config keys that announce a routing or attention variant megatron-kd does not map: key -> (ok values, feature).
_VARIANT_KEYS = {
    "scoring_func": (("softmax",), "router scoring_func"),
    "topk_method": (("greedy",), "router topk_method (group-limited routing)"),
    "q_lora_rank": ((None,), "multi-head latent attention (MLA, q_lora_rank)"),
    "kv_lora_rank": ((None,), "multi-head latent attention (MLA, kv_lora_rank)"),
    "n_group": ((None, 1), "group-limited routing (n_group)"),
    "routed_scaling_factor": ((None, 1, 1.0), "routed_scaling_factor"),
    "n_shared_experts": ((None, 0), "DeepSeek-style shared experts (n_shared_experts)"),
    "first_k_dense_replace": ((None, 0), "DeepSeek-style dense first layers"),
}

#: Defaults of the transformers config classes for keys a config.json may omit (checked against
#: transformers in the tests).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  hidden_act="silu", max_position_embeddings=2048, rope_theta=10000.0, initializer_range=0.02,
                  attention_dropout=0.0),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                    max_position_embeddings=131072, rope_theta=10000.0, sliding_window=4096,
                    initializer_range=0.02, attention_dropout=0.0),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768,
                  rope_theta=10000.0, use_sliding_window=False, initializer_range=0.02, attention_dropout=0.0),
    "qwen3": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
                  max_position_embeddings=32768, rope_theta=10000.0, use_sliding_window=False, head_dim=128,
                  initializer_range=0.02, attention_dropout=0.0),
    "qwen3_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
                      max_position_embeddings=32768, rope_theta=10000.0, use_sliding_window=False,
                      initializer_range=0.02, attention_dropout=0.0, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=131072,
                    rope_theta=1e6, sliding_window=None, initializer_range=0.02, attention_dropout=0.0,
                    num_local_experts=8, num_experts_per_tok=2, router_jitter_noise=0.0),
    "qwen2_moe": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=32768,
                      rope_theta=10000.0, use_sliding_window=False, initializer_range=0.02, attention_dropout=0.0,
                      num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, norm_topk_prob=False, decoder_sparse_step=1,
                      mlp_only_layers=[], qkv_bias=True),
}

# megatron-core's Llama-3 RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling).
_MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a local Hugging Face model directory, as a dict."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist: pass a local directory "
                                "(download it first, e.g. with huggingface-cli download)")
    return read_json(hf_dir / "config.json", "Hugging Face config")


def hf_family(hf_cfg: dict[str, Any]) -> str:
    """Family name (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, qwen2_moe) of a config dict;
    one-line ValueError otherwise (naming the unsupported feature for known MoE architectures)."""
    archs = hf_cfg.get("architectures") or []
    if len(archs) == 1 and archs[0] in UNSUPPORTED_FEATURES:
        raise ValueError(f"unsupported Hugging Face architectures={archs}: {UNSUPPORTED_FEATURES[archs[0]]} is not "
                         f"supported; megatron-kd converts {sorted(ARCHITECTURES)}")
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported Hugging Face architectures={archs}: megatron-kd converts "
                         f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[archs[0]]


def _get(hf_cfg: dict[str, Any], family: str, key: str) -> Any:
    # An explicit null counts (Mistral's "sliding_window": null means no window).
    return hf_cfg[key] if key in hf_cfg else FAMILY_DEFAULTS[family].get(key)


def rope_settings(hf_cfg: dict[str, Any], family: str) -> tuple[float, bool, float]:
    """``(rope_theta, rope_scaling, rope_scaling_factor)``; refuses RoPE variants megatron can't match."""
    params = hf_cfg.get("rope_parameters")
    if isinstance(params, dict) and params and not all(isinstance(v, dict) for v in params.values()):
        theta = params.get("rope_theta", _get(hf_cfg, family, "rope_theta"))
        scaling = params
    elif params:
        raise ValueError(f"per-layer-type rope_parameters={params} are not supported: "
                         "megatron-kd converts models with one RoPE setting")
    else:
        theta = _get(hf_cfg, family, "rope_theta")
        scaling = hf_cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), False, 8.0
    if kind == "llama3":
        for key, want in _MCORE_LLAMA3.items():
            if float(scaling.get(key, want)) != want:
                raise ValueError(f"rope llama3 scaling with {key}={scaling.get(key)} is not supported: "
                                 f"megatron-core implements only {key}={want:g}")
        return float(theta), True, float(scaling.get("factor", 8.0))
    raise ValueError(f"rope_type={kind!r} is not supported (only default and llama3 RoPE map exactly onto "
                     "megatron-core): convert a model without that rope scaling")


def hf_to_model_config(hf_cfg: dict[str, Any]) -> tuple[ModelConfig, list[str]]:
    """``(ModelConfig, warnings)`` for a HF config dict; one-line ValueError on unsupported features."""
    family = hf_family(hf_cfg)
    g = lambda key: _get(hf_cfg, family, key)  # noqa: E731
    warnings: list[str] = []
    if g("hidden_act") != "silu":
        raise ValueError(f"hidden_act={g('hidden_act')!r} is not supported: megatron-kd models use SwiGLU (silu)")
    if family in ("llama", "qwen3", "qwen3_moe") and g("attention_bias"):
        raise ValueError(f"{family} attention_bias=true (bias on o_proj too) is not supported: only Qwen2-style "
                         "q/k/v biases map onto megatron-core here")
    if g("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported: megatron-kd models have bias-free MLPs")
    if hf_cfg.get("pretraining_tp", 1) not in (None, 1):
        warnings.append(f"pretraining_tp={hf_cfg['pretraining_tp']} is ignored (it only changes how HF splits "
                        "the matmuls, not the maths)")
    window = g("sliding_window")
    uses_window = (family in ("mistral", "mixtral") and window
                   or family in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and g("use_sliding_window"))
    if uses_window:
        warnings.append(f"sliding_window={window} is not implemented: attention is full-causal, which equals "
                        f"the HF model only for sequences of at most {window} tokens")
    heads = int(hf_cfg["num_attention_heads"])
    hidden = int(hf_cfg["hidden_size"])
    head_dim = g("head_dim")
    kv_channels = int(head_dim) if head_dim and int(head_dim) * heads != hidden else None
    if head_dim is None and hidden % heads:
        raise ValueError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} and the config "
                         "has no head_dim")
    theta, scaling, factor = rope_settings(hf_cfg, family)
    cfg = ModelConfig(
        num_layers=int(hf_cfg["num_hidden_layers"]), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=int(hf_cfg.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(hf_cfg["intermediate_size"]), kv_channels=kv_channels,
        vocab_size=int(hf_cfg["vocab_size"]), max_position_embeddings=int(g("max_position_embeddings") or 2048),
        rotary_base=theta, rope_scaling=scaling, rope_scaling_factor=factor,
        norm_epsilon=float(g("rms_norm_eps")), tie_embeddings=bool(g("tie_word_embeddings")),
        add_qkv_bias=family == "qwen2" or family == "qwen2_moe" and bool(g("qkv_bias")),
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        init_method_std=float(g("initializer_range") or 0.02), attention_dropout=float(g("attention_dropout") or 0.0),
        **(_moe_fields(hf_cfg, family, warnings) if family in MOE_FAMILIES else {}),
    )
    return cfg, warnings


def _moe_fields(hf_cfg: dict[str, Any], family: str, warnings: list[str]) -> dict[str, Any]:
    """ModelConfig MoE fields of a Qwen3-MoE / Mixtral / Qwen2-MoE config; refuses routing variants."""
    g = lambda key: _get(hf_cfg, family, key)  # noqa: E731
    for key, (ok, feature) in _VARIANT_KEYS.items():
        if key in hf_cfg and hf_cfg[key] not in ok:
            raise ValueError(f"{key}={hf_cfg[key]!r}: {feature} is not supported (megatron-kd maps softmax top-k "
                             "routers of Qwen3-MoE, Mixtral and Qwen2-MoE)")
    layers = int(hf_cfg["num_hidden_layers"])
    if family == "mixtral":
        experts = int(g("num_local_experts"))
        if float(g("router_jitter_noise") or 0.0):
            warnings.append(f"router_jitter_noise={g('router_jitter_noise')} is ignored (it only perturbs routing "
                            "during HF training)")
        return dict(num_moe_experts=experts, moe_router_topk=int(g("num_experts_per_tok")),
                    moe_router_pre_softmax=False, moe_ffn_hidden_size=int(hf_cfg["intermediate_size"]))
    # Qwen3-MoE files spell the count num_experts; transformers 5 writes num_local_experts.
    experts = int(hf_cfg.get("num_experts") or hf_cfg.get("num_local_experts") or g("num_experts"))
    step, dense_only = int(g("decoder_sparse_step") or 1), set(g("mlp_only_layers") or [])
    pattern = [int(i not in dense_only and (i + 1) % step == 0) for i in range(layers)]
    fields: dict[str, Any] = dict(
        num_moe_experts=experts, moe_router_topk=int(g("num_experts_per_tok")),
        moe_router_pre_softmax=not bool(g("norm_topk_prob")), moe_ffn_hidden_size=int(g("moe_intermediate_size")),
        moe_layer_pattern=None if all(pattern) else pattern)
    if family == "qwen2_moe":
        shared = g("shared_expert_intermediate_size")
        if shared:
            fields.update(moe_shared_expert_intermediate_size=int(shared), moe_shared_expert_gate=True)
    return fields


def guess_family(cfg: ModelConfig) -> str:
    """The HF family that represents ``cfg`` exactly: dense qwen3 (QK-norm), qwen2 (QKV bias), else
    llama; MoE qwen2_moe (shared expert), qwen3_moe (QK-norm), else mixtral."""
    if cfg.qk_layernorm and cfg.add_qkv_bias:
        raise ValueError("model has both QK-norm and QKV bias: no supported Hugging Face family has both")
    if cfg.is_moe:
        if cfg.moe_shared_expert_intermediate_size:
            return "qwen2_moe"
        return "qwen3_moe" if cfg.qk_layernorm or cfg.moe_router_pre_softmax or cfg.moe_layer_pattern else "mixtral"
    return "qwen3" if cfg.qk_layernorm else "qwen2" if cfg.add_qkv_bias else "llama"


def _check_family_fits(cfg: ModelConfig, family: str) -> None:
    def refuse(what: str) -> None:
        raise ValueError(f"{what} cannot be expressed as a {family} model: use --arch {guess_family(cfg)}")

    if cfg.is_moe != (family in MOE_FAMILIES):
        refuse(f"model.num_moe_experts={cfg.num_moe_experts}")
    if cfg.qk_layernorm != (family in ("qwen3", "qwen3_moe")):
        refuse(f"model.qk_layernorm={cfg.qk_layernorm}")
    if cfg.add_qkv_bias and family not in ("qwen2", "qwen2_moe") or not cfg.add_qkv_bias and family == "qwen2":
        refuse(f"model.add_qkv_bias={cfg.add_qkv_bias}")
    if not cfg.is_moe:
        return
    shared = cfg.moe_shared_expert_intermediate_size
    if family == "qwen2_moe" and not (shared and cfg.moe_shared_expert_gate):
        refuse("a model without a sigmoid-gated shared expert")
    if family != "qwen2_moe" and shared:
        refuse(f"model.moe_shared_expert_intermediate_size={shared}")
    if family == "mixtral" and (cfg.moe_router_pre_softmax or cfg.moe_layer_pattern is not None
                                or cfg.moe_ffn_hidden_size != cfg.ffn_hidden_size):
        refuse("un-renormalised routing, dense layers or moe_ffn_hidden_size != ffn_hidden_size")


def model_config_to_hf(cfg: ModelConfig, base: dict[str, Any] | None = None, family: str | None = None,
                       dtype: str = "float32") -> dict[str, Any]:
    """A HF ``config.json`` dict for ``cfg``.

    ``base`` (the original config.json kept at import) supplies the family and every field megatron
    does not model (token ids, ``layer_types``, ...); the shape fields are always rewritten from
    ``cfg``. Without ``base`` the family is ``family`` or :func:`guess_family`. ``dtype`` is the
    torch dtype name of the exported weights (``float32``, ``bfloat16``, ``float16``).
    """
    out = copy.deepcopy(base) if base else {}
    family = family or (hf_family(out) if out else guess_family(cfg))
    if family not in FAMILY_ARCHITECTURE:
        raise ValueError(f"unknown --arch {family!r}; choose one of {sorted(FAMILY_ARCHITECTURE)}")
    _check_family_fits(cfg, family)
    if out and hf_family(out) != family:
        out = {}  # a different family was asked for: the base's extra fields would not apply
    out.update(architectures=[FAMILY_ARCHITECTURE[family]], model_type=family, hidden_act="silu",
               hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
               num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
               num_key_value_heads=cfg.num_query_groups, vocab_size=cfg.vocab_size,
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
               tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_method_std,
               attention_dropout=cfg.attention_dropout)
    if family in ("llama", "mistral", "qwen3", "qwen3_moe", "mixtral") or cfg.kv_channels:
        out["head_dim"] = cfg.head_dim
    if family in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if family in MOE_FAMILIES:
        _moe_to_hf(cfg, family, out)
    if family == "llama":
        out["mlp_bias"] = False
    if family in ("mistral", "mixtral") and "sliding_window" not in out:
        out["sliding_window"] = None  # megatron-kd attention is full-causal
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rotary_base, "factor": cfg.rope_scaling_factor,
                **_MCORE_LLAMA3}
    if "rope_parameters" in out:
        out["rope_parameters"] = rope
    else:  # the widely read (transformers 4.x) spelling, which transformers 5 also accepts
        out["rope_theta"] = cfg.rotary_base
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None
    out["torch_dtype" if "torch_dtype" in out or "dtype" not in out else "dtype"] = dtype
    return out


def _moe_to_hf(cfg: ModelConfig, family: str, out: dict[str, Any]) -> None:
    """Write the MoE fields of ``cfg`` into a Qwen3-MoE / Mixtral / Qwen2-MoE config dict (keeping the
    base's spellings: ``num_experts`` or ``num_local_experts``, ``decoder_sparse_step``)."""
    out["num_experts_per_tok"] = cfg.moe_router_topk
    if family == "mixtral":
        out.update(num_local_experts=cfg.num_moe_experts, intermediate_size=cfg.moe_ffn_hidden_size)
        return
    count_key = "num_local_experts" if "num_local_experts" in out and "num_experts" not in out else "num_experts"
    out.update({count_key: cfg.num_moe_experts}, moe_intermediate_size=cfg.moe_ffn_hidden_size,
               norm_topk_prob=not cfg.moe_router_pre_softmax)
    pattern = [int(moe) for moe in cfg.moe_layers()]
    step, dense_only = int(out.get("decoder_sparse_step") or 1), set(out.get("mlp_only_layers") or [])
    if [int(i not in dense_only and (i + 1) % step == 0) for i in range(cfg.num_layers)] != pattern:
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe])
    out.setdefault("decoder_sparse_step", 1)
    out.setdefault("mlp_only_layers", [])
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = cfg.moe_shared_expert_intermediate_size or 0
        if "qkv_bias" in out or not cfg.add_qkv_bias:
            out["qkv_bias"] = cfg.add_qkv_bias


def same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    """True when two configs describe the same weights and maths (ignores dropout/init/padding knobs)."""
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "head_dim",
            "vocab_size", "rotary_base", "rope_scaling", "norm_epsilon", "tie_embeddings", "add_qkv_bias",
            "qk_layernorm", "num_moe_experts", "moe_router_topk", "moe_router_pre_softmax", "moe_ffn_hidden_size",
            "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_layer_pattern")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and (
        not a.rope_scaling or a.rope_scaling_factor == b.rope_scaling_factor)
