"""Hugging Face ``config.json`` <-> :class:`ModelConfig` for the supported dense decoder families.

Supported ``architectures``: ``LlamaForCausalLM`` (Llama 2 / 3.x), ``MistralForCausalLM``,
``Qwen2ForCausalLM`` (Qwen2 / Qwen2.5) and ``Qwen3ForCausalLM`` (dense Qwen3). The raw JSON is
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
}
FAMILY_ARCHITECTURE = {v: k for k, v in ARCHITECTURES.items()}

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
    """Family name (llama, mistral, qwen2, qwen3) of a config dict; one-line ValueError otherwise."""
    archs = hf_cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"unsupported Hugging Face architectures={archs}: megatron-kd converts "
                         f"{sorted(ARCHITECTURES)} (dense decoders)")
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
    if family in ("llama", "qwen3") and g("attention_bias"):
        raise ValueError(f"{family} attention_bias=true (bias on o_proj too) is not supported: only Qwen2-style "
                         "q/k/v biases map onto megatron-core here")
    if g("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported: megatron-kd models have bias-free MLPs")
    if hf_cfg.get("pretraining_tp", 1) not in (None, 1):
        warnings.append(f"pretraining_tp={hf_cfg['pretraining_tp']} is ignored (it only changes how HF splits "
                        "the matmuls, not the maths)")
    window = g("sliding_window")
    uses_window = family == "mistral" and window or family in ("qwen2", "qwen3") and g("use_sliding_window")
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
        add_qkv_bias=family == "qwen2", qk_layernorm=family == "qwen3",
        init_method_std=float(g("initializer_range") or 0.02), attention_dropout=float(g("attention_dropout") or 0.0),
    )
    return cfg, warnings


def guess_family(cfg: ModelConfig) -> str:
    """The HF family that represents ``cfg`` exactly: qwen3 (QK-norm), qwen2 (QKV bias), else llama."""
    if cfg.qk_layernorm and cfg.add_qkv_bias:
        raise ValueError("model has both QK-norm and QKV bias: no supported Hugging Face family has both")
    return "qwen3" if cfg.qk_layernorm else "qwen2" if cfg.add_qkv_bias else "llama"


def _check_family_fits(cfg: ModelConfig, family: str) -> None:
    if cfg.qk_layernorm != (family == "qwen3"):
        raise ValueError(f"model.qk_layernorm={cfg.qk_layernorm} cannot be expressed as a {family} model: "
                         f"use --arch {guess_family(cfg)}")
    if cfg.add_qkv_bias != (family == "qwen2"):
        raise ValueError(f"model.add_qkv_bias={cfg.add_qkv_bias} cannot be expressed as a {family} model: "
                         f"use --arch {guess_family(cfg)}")


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
    if family in ("llama", "mistral", "qwen3") or cfg.kv_channels:
        out["head_dim"] = cfg.head_dim
    if family in ("llama", "qwen3"):
        out["attention_bias"] = False
    if family == "llama":
        out["mlp_bias"] = False
    if family == "mistral" and "sliding_window" not in out:
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


def same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    """True when two configs describe the same weights and maths (ignores dropout/init/padding knobs)."""
    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "head_dim",
            "vocab_size", "rotary_base", "rope_scaling", "norm_epsilon", "tie_embeddings", "add_qkv_bias",
            "qk_layernorm")
    return all(getattr(a, k) == getattr(b, k) for k in keys) and (
        not a.rope_scaling or a.rope_scaling_factor == b.rope_scaling_factor)
