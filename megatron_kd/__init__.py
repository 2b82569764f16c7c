"""megatron-kd: knowledge distillation for pre-training and post-training LLMs on Megatron-core."""

__version__ = "0.1.0"
