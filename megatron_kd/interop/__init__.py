"""Hugging Face <-> Megatron checkpoint conversion."""
