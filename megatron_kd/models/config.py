"""``ModelConfig``: the shape of a Llama/Qwen2/Qwen3/Mistral-style decoder, independent of parallelism."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    """Decoder-only transformer shape (RMSNorm, SwiGLU, RoPE, GQA), as Llama/Qwen/Mistral use it."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 128
    """Model width (d_model)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None = num_attention_heads (plain MHA)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; None = 4 * hidden_size (gated MLPs usually set ~8/3 * hidden)."""
    kv_channels: int | None = None
    """Per-head dimension; None = hidden_size // num_attention_heads (Qwen3 sets it explicitly)."""
    vocab_size: int = 256
    """Real tokenizer vocabulary size (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the TP size (Megatron convention)."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is built for (RoPE tables)."""
    rotary_base: float = 10000.0
    """RoPE base (theta): 10k Llama-2, 500k Llama-3, 1M Qwen2.5."""
    rope_scaling: bool = False
    """Llama-3.1-style RoPE frequency scaling (megatron-core's fixed low/high frequency factors 1/4
    and original context 8192, as Llama-3.1/3.2 use)."""
    rope_scaling_factor: float = 8.0
    """Scaling factor when ``rope_scaling`` is on (8 for Llama-3.1, 32 for Llama-3.2)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding and the output projection (Qwen2.5-0.5B/1.5B, Llama-3.2)."""
    add_qkv_bias: bool = False
    """Biases on the Q/K/V projections (Qwen2)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    init_method_std: float = 0.02
    """Standard deviation of the random weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (0 for LLM pre-training)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}: set model.kv_channels"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )

    @property
    def head_dim(self) -> int:
        """Per-head dimension."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate_parallel(self, tensor_parallel: int, pipeline_parallel: int) -> None:
        """Raise ``ValueError`` (one line) if the model cannot be split this way."""
        if self.num_attention_heads % tensor_parallel:
            raise ValueError(
                f"parallel.tensor_parallel={tensor_parallel} does not divide model.num_attention_heads="
                f"{self.num_attention_heads}: choose a TP size that divides the head count"
            )
        if self.num_query_groups % tensor_parallel:
            raise ValueError(
                f"parallel.tensor_parallel={tensor_parallel} does not divide model.num_query_groups="
                f"{self.num_query_groups}: choose a TP size that divides the KV head count"
            )
        if self.num_layers % pipeline_parallel:
            raise ValueError(
                f"parallel.pipeline_parallel={pipeline_parallel} does not divide model.num_layers="
                f"{self.num_layers}: choose a PP size that divides the layer count"
            )

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count at TP=1 on the real (unpadded) vocabulary."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0)
        attn += 2 * d if self.qk_layernorm else 0
        per_layer = attn + 3 * h * f + 2 * h
        total = self.num_layers * per_layer + h
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, seq_length: int) -> float:
        """Forward FLOPs per token (matmuls incl. attention scores and the LM head), at TP=1."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        dense = h * (q + 2 * kv) + q * h + 3 * h * self.ffn_hidden_size
        attn_scores = 2 * seq_length * q  # QK^T and AV, causal average ~ half, counted full as MFU convention
        return 2.0 * (self.num_layers * (dense + attn_scores) + h * self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from a dict, refusing unknown keys with a one-line error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write as JSON (next to checkpoints, so consumers need no hand-written YAML)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read a JSON file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))
