"""Named model shapes: tiny ones for CPU tests and the quickstart, and real sizes for GPU recipes."""
from __future__ import annotations

from megatron_kd.models.config import ModelConfig

_PRESETS: dict[str, dict] = {
    # CPU-sized (tests, quickstart). vocab_size is a placeholder: set it from the tokenizer.
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=176),
    "cpu-student": dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352),
    "cpu-teacher": dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=704),
    # Tiny mixtures of experts (megatron-core MoE layers), Qwen3-MoE-like: QK-norm, head_dim != hidden/heads,
    # top-k renormalised routing. tiny-moe: 8 experts top-2; tiny-moe-top8: 16 experts top-8, last layer dense;
    # tiny-moe-shared: Qwen2-MoE-like (QKV bias, top-4 un-renormalised, a sigmoid-gated shared expert).
    "tiny-moe": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                     ffn_hidden_size=176, qk_layernorm=True, num_moe_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=48),
    "tiny-moe-top8": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                          ffn_hidden_size=176, qk_layernorm=True, num_moe_experts=16, moe_router_topk=8,
                          moe_ffn_hidden_size=32, moe_layer_pattern=[1, 0]),
    "tiny-moe-shared": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=176, add_qkv_bias=True, num_moe_experts=8, moe_router_topk=4,
                            moe_router_pre_softmax=True, moe_ffn_hidden_size=32,
                            moe_shared_expert_intermediate_size=96, moe_shared_expert_gate=True),
    "cpu-moe-teacher": dict(num_layers=4, hidden_size=192, num_attention_heads=8, num_query_groups=4, kv_channels=32,
                            ffn_hidden_size=512, qk_layernorm=True, num_moe_experts=8, moe_router_topk=2,
                            moe_ffn_hidden_size=256),
    # Real shapes (vocab included) for GPU recipes.
    "qwen2.5-0.5b": dict(num_layers=24, hidden_size=896, num_attention_heads=14, num_query_groups=2,
                         ffn_hidden_size=4864, vocab_size=151936, rotary_base=1e6, norm_epsilon=1e-6,
                         tie_embeddings=True, add_qkv_bias=True, max_position_embeddings=32768),
    "qwen2.5-1.5b": dict(num_layers=28, hidden_size=1536, num_attention_heads=12, num_query_groups=2,
                         ffn_hidden_size=8960, vocab_size=151936, rotary_base=1e6, norm_epsilon=1e-6,
                         tie_embeddings=True, add_qkv_bias=True, max_position_embeddings=32768),
    "qwen2.5-7b": dict(num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                       ffn_hidden_size=18944, vocab_size=152064, rotary_base=1e6, norm_epsilon=1e-6,
                       add_qkv_bias=True, max_position_embeddings=32768),
    "qwen3-0.6b": dict(num_layers=28, hidden_size=1024, num_attention_heads=16, num_query_groups=8, kv_channels=128,
                       ffn_hidden_size=3072, vocab_size=151936, rotary_base=1e6, norm_epsilon=1e-6,
                       tie_embeddings=True, qk_layernorm=True, max_position_embeddings=40960),
    "llama-3.2-1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                         ffn_hidden_size=8192, vocab_size=128256, rotary_base=5e5, norm_epsilon=1e-5,
                         rope_scaling=True, rope_scaling_factor=32.0, tie_embeddings=True,
                         max_position_embeddings=131072),
    "llama-3.2-3b": dict(num_layers=28, hidden_size=3072, num_attention_heads=24, num_query_groups=8,
                         ffn_hidden_size=8192, vocab_size=128256, rotary_base=5e5, norm_epsilon=1e-5,
                         rope_scaling=True, rope_scaling_factor=32.0, tie_embeddings=True,
                         max_position_embeddings=131072),
    # Qwen3-30B-A3B (Qwen3MoeForCausalLM): 48 layers, 128 experts, top-8 renormalised, ~30.5B total / ~3.3B
    # active parameters. Teacher of examples/gpu/distill_qwen3-30b-a3b_to_0.6b.yaml (docs/moe.md).
    "qwen3-30b-a3b": dict(num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4,
                          kv_channels=128, ffn_hidden_size=6144, vocab_size=151936, rotary_base=1e6,
                          norm_epsilon=1e-6, qk_layernorm=True, max_position_embeddings=40960,
                          num_moe_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768),
    # ~200M student for the Qwen2.5 tokenizer (GPU recipes).
    "qwen-200m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=4,
                      ffn_hidden_size=2048, vocab_size=151936, rotary_base=1e6, norm_epsilon=1e-6,
                      tie_embeddings=True, max_position_embeddings=4096),
}


def preset_names() -> list[str]:
    """All preset names."""
    return sorted(_PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """``ModelConfig`` of a named preset, with field overrides (e.g. ``vocab_size=4096``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()}")
    return ModelConfig(**{**_PRESETS[name], **overrides})
