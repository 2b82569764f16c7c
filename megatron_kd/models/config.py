"""``ModelConfig``: the shape of a Llama/Qwen2/Qwen3/Mistral-style decoder (dense or mixture of experts),
independent of parallelism."""
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
    # --- mixture of experts (megatron-core MoELayer; see docs/moe.md) ---
    num_moe_experts: int | None = None
    """Routed experts per MoE layer; None = a dense model (every layer has one SwiGLU MLP)."""
    moe_router_topk: int = 2
    """Experts each token is routed to (Mixtral 2, Qwen2-MoE 4, Qwen3-MoE 8)."""
    moe_router_pre_softmax: bool = False
    """Router normalisation. False: top-k of the router logits, then softmax over those k (equal to
    softmax over all experts, top-k, renormalised: Mixtral, Qwen3-MoE ``norm_topk_prob: true``).
    True: softmax over all experts, then top-k, NOT renormalised (Qwen2-MoE and Qwen3-MoE with
    ``norm_topk_prob: false``)."""
    moe_ffn_hidden_size: int | None = None
    """SwiGLU inner width of each routed expert; None = ffn_hidden_size."""
    moe_shared_expert_intermediate_size: int | None = None
    """Inner width of the shared expert that every token also passes through (Qwen2-MoE); None = none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(x . w_gate) (Qwen2-MoE's ``shared_expert_gate``)."""
    moe_layer_pattern: list[int] | None = None
    """Which layers are MoE: one 0 (dense MLP of ffn_hidden_size) or 1 (MoE) per layer; None = all MoE
    (HF ``decoder_sparse_step``/``mlp_only_layers`` map onto it)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing (switch) loss coefficient for a MoE *student*; 0 = no aux loss. Frozen teachers
    never compute it."""
    moe_router_dtype: str | None = None
    """Router logits/softmax precision: None = the activations' dtype (as transformers does), 'fp32'
    or 'fp64' (more stable routing in bf16)."""
    moe_token_dispatcher_type: str = "auto"
    """megatron-core token dispatcher: 'alltoall' (GPU), 'allgather', or 'auto' = alltoall with CUDA,
    allgather without (megatron's alltoall dispatcher needs CUDA streams)."""

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
        self._validate_moe()

    def _validate_moe(self) -> None:
        if self.num_moe_experts is None:
            return
        if self.num_moe_experts < 1:
            raise ValueError(f"model.num_moe_experts={self.num_moe_experts} must be >= 1 (or null for a dense model)")
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        if not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ValueError(f"model.moe_router_topk={self.moe_router_topk} must be between 1 and "
                             f"model.num_moe_experts={self.num_moe_experts}")
        if self.moe_ffn_hidden_size < 1:
            raise ValueError(f"model.moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be a positive integer")
        if self.moe_shared_expert_intermediate_size is not None and self.moe_shared_expert_intermediate_size < 1:
            raise ValueError(f"model.moe_shared_expert_intermediate_size={self.moe_shared_expert_intermediate_size} "
                             "must be a positive integer or null")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ValueError("model.moe_shared_expert_gate=true needs model.moe_shared_expert_intermediate_size")
        if self.moe_layer_pattern is not None:
            pattern = [int(v) for v in self.moe_layer_pattern]
            if len(pattern) != self.num_layers or set(pattern) - {0, 1}:
                raise ValueError(f"model.moe_layer_pattern={self.moe_layer_pattern} must list one 0 (dense) or 1 "
                                 f"(MoE) per layer ({self.num_layers} entries)")
            self.moe_layer_pattern = None if all(pattern) else pattern
        if self.moe_aux_loss_coeff < 0:
            raise ValueError(f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0")
        if self.moe_router_dtype not in (None, "fp32", "fp64"):
            raise ValueError(f"model.moe_router_dtype={self.moe_router_dtype!r}: use null, 'fp32' or 'fp64'")
        if self.moe_token_dispatcher_type not in ("auto", "alltoall", "allgather"):
            raise ValueError(f"model.moe_token_dispatcher_type={self.moe_token_dispatcher_type!r}: use 'auto', "
                             "'alltoall' or 'allgather'")

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model."""
        return self.num_moe_experts is not None

    def moe_layers(self) -> list[bool]:
        """Per layer: True where the MLP is a MoE layer."""
        if not self.is_moe:
            return [False] * self.num_layers
        if self.moe_layer_pattern is None:
            return [True] * self.num_layers
        return [bool(v) for v in self.moe_layer_pattern]

    @property
    def head_dim(self) -> int:
        """Per-head dimension."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Embedding rows: vocab_size rounded up to a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate_parallel(self, tensor_parallel: int, pipeline_parallel: int, expert_parallel: int = 1) -> None:
        """Raise ``ValueError`` (one line) if the model cannot be split this way."""
        # A dense model ignores expert parallelism (e.g. a dense student next to an EP-split MoE teacher).
        if self.is_moe and self.num_moe_experts % expert_parallel:
            raise ValueError(f"parallel.expert_parallel={expert_parallel} does not divide model.num_moe_experts="
                             f"{self.num_moe_experts}: choose an EP size that divides the expert count")
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
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0)
        attn += 2 * d if self.qk_layernorm else 0
        total = self.num_layers * (attn + 2 * h) + h
        for moe in self.moe_layers():
            total += self._mlp_parameters(moe, active_only=False)
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return total

    def _mlp_parameters(self, moe: bool, active_only: bool) -> int:
        """Weights of one layer's MLP (all experts, or only those one token uses)."""
        h = self.hidden_size
        if not moe:
            return 3 * h * self.ffn_hidden_size
        experts = self.moe_router_topk if active_only else self.num_moe_experts
        n = h * self.num_moe_experts + experts * 3 * h * self.moe_ffn_hidden_size  # router + experts
        if self.moe_shared_expert_intermediate_size:
            n += 3 * h * self.moe_shared_expert_intermediate_size + (h if self.moe_shared_expert_gate else 0)
        return n

    def num_active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters one token passes through (MoE: router, its top-k experts, the shared expert);
        equals :meth:`num_parameters` for a dense model."""
        dense = self.num_parameters(include_embeddings)
        for moe in self.moe_layers():
            dense += self._mlp_parameters(moe, active_only=True) - self._mlp_parameters(moe, active_only=False)
        return dense

    def flops_per_token(self, seq_length: int) -> float:
        """Forward FLOPs per token (matmuls incl. attention scores and the LM head), at TP=1."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h
        attn_scores = 2 * seq_length * q  # QK^T and AV, causal average ~ half, counted full as MFU convention
        mlp = sum(self._mlp_parameters(moe, active_only=True) for moe in self.moe_layers())
        return 2.0 * (self.num_layers * (attn + attn_scores) + mlp + h * self.vocab_size)

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
