"""Models: megatron-core GPTModel built from a dataclass ``ModelConfig``; layer specs; presets."""
from megatron_kd.models.builder import (
    build_gpt_model,
    layer_spec,
    mask_padded_vocab,
    parse_dtype,
    transformer_config,
    vocab_shard_range,
)
from megatron_kd.models.config import ModelConfig
from megatron_kd.models.presets import get_preset, preset_names

__all__ = [
    "ModelConfig",
    "build_gpt_model",
    "get_preset",
    "layer_spec",
    "mask_padded_vocab",
    "parse_dtype",
    "preset_names",
    "transformer_config",
    "vocab_shard_range",
]
