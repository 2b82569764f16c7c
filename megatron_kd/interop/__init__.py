"""Hugging Face <-> Megatron checkpoint conversion (Llama, Mistral, Qwen2/2.5, Qwen3 dense) and the
teacher/student vocabulary rule. See docs/interop.md."""
from megatron_kd.interop.convert import checkpoint_tokenizer, hf_to_mcore, mcore_to_hf
from megatron_kd.interop.hf_config import ARCHITECTURES, hf_to_model_config, model_config_to_hf
from megatron_kd.interop.source import is_hf_model_dir  # registers HF model dirs as checkpoint sources
from megatron_kd.interop.vocab import VocabPlan, check_vocab_compatible

__all__ = [
    "ARCHITECTURES",
    "VocabPlan",
    "check_vocab_compatible",
    "checkpoint_tokenizer",
    "hf_to_mcore",
    "hf_to_model_config",
    "is_hf_model_dir",
    "mcore_to_hf",
    "model_config_to_hf",
]
