"""Build megatron-core ``GPTModel``s from a :class:`ModelConfig` and the current parallel layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_kd.models.attention import SDPACoreAttention
from megatron_kd.models.config import ModelConfig

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return _DTYPES[name]


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and CUDA is present (then the TE spec is used)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def layer_spec(cfg: ModelConfig, use_te: bool | None = None, moe: bool | None = None) -> ModuleSpec:
    """Transformer-layer spec: TE when available (and not disabled), else local + SDPA attention.

    ``moe`` (default: ``cfg.is_moe``) picks megatron-core's MoE layer (router, token dispatcher,
    experts, shared expert) for the MLP: TE grouped-GEMM experts with TE, else ``SequentialMLP``
    (one local MLP per expert; grouped GEMM needs CUDA kernels).
    """
    if use_te is None:
        use_te = transformer_engine_available()
    if moe is None:
        moe = cfg.is_moe
    num_experts = cfg.num_moe_experts if moe else None
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=moe,
                                                          qk_layernorm=cfg.qk_layernorm)
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm",
                                    qk_layernorm=cfg.qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def decoder_spec(cfg: ModelConfig, use_te: bool | None = None):
    """The GPTModel's ``transformer_layer_spec``: one layer spec for a dense model; for a MoE model a
    block spec with this pipeline stage's layers (dense or MoE per ``cfg.moe_layer_pattern``)."""
    if not cfg.is_moe:
        return layer_spec(cfg, use_te)
    from megatron.core.transformer.transformer_block import LayerNormImpl, TransformerBlockSubmodules

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = cfg.num_layers // pp
    first = parallel_state.get_pipeline_model_parallel_rank() * per_stage
    dense, sparse = layer_spec(cfg, use_te, moe=False), layer_spec(cfg, use_te, moe=True)
    specs = [sparse if moe else dense for moe in cfg.moe_layers()[first:first + per_stage]]
    # The final norm megatron picks for a single-layer spec too (TENorm / apex / torch).
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LayerNormImpl)


def resolve_dispatcher(kind: str) -> str:
    """megatron-core token dispatcher for ``model.moe_token_dispatcher_type`` on this machine."""
    if kind == "auto":
        return "alltoall" if torch.cuda.is_available() else "allgather"
    if kind == "alltoall" and not torch.cuda.is_available():
        raise ValueError("model.moe_token_dispatcher_type='alltoall' needs CUDA (megatron-core's alltoall "
                         "dispatcher uses CUDA streams): use 'auto' or 'allgather' on CPU")
    return kind


def moe_transformer_kwargs(cfg: ModelConfig) -> dict:
    """megatron-core ``TransformerConfig`` MoE fields for ``cfg`` (empty for a dense model)."""
    if not cfg.is_moe:
        return {}
    aux = cfg.moe_aux_loss_coeff
    return dict(
        num_moe_experts=cfg.num_moe_experts, moe_router_topk=cfg.moe_router_topk,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax, moe_router_score_function="softmax",
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=cfg.moe_shared_expert_gate,
        moe_layer_freq=list(cfg.moe_layer_pattern) if cfg.moe_layer_pattern is not None else 1,
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none", moe_aux_loss_coeff=aux,
        moe_router_dtype=cfg.moe_router_dtype, moe_token_dispatcher_type=resolve_dispatcher(cfg.moe_token_dispatcher_type),
        moe_grouped_gemm=False, moe_permute_fusion=False, moe_router_fusion=False,
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
    )


def transformer_config(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                       **overrides) -> TransformerConfig:
    """megatron-core ``TransformerConfig`` for ``cfg`` under the initialised parallel_state."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg.validate_parallel(tp, pp, parallel_state.get_expert_model_parallel_world_size())
    kwargs = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=cfg.add_qkv_bias,
        qk_layernorm=cfg.qk_layernorm, init_method_std=cfg.init_method_std,
        hidden_dropout=cfg.hidden_dropout, attention_dropout=cfg.attention_dropout,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        pipeline_dtype=params_dtype, params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=True,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        calculate_per_token_loss=True,
        **moe_transformer_kwargs(cfg),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(cfg: ModelConfig, params_dtype: torch.dtype | str = torch.float32,
                    use_te: bool | None = None, pre_process: bool | None = None,
                    post_process: bool | None = None, padded_vocab_size: int | None = None,
                    **config_overrides) -> GPTModel:
    """The local pipeline stage of a ``GPTModel`` for ``cfg`` (parallel_state must be initialised).

    Logits come out vocab-parallel ([b, s, padded_vocab/TP]); the padded columns beyond
    ``cfg.vocab_size`` are meaningless and should be masked with :func:`mask_padded_vocab`.
    ``padded_vocab_size`` overrides the Megatron rule (multiple of 128*TP); checkpoints record the
    size they were saved with so they load at another TP (it must be divisible by the new TP).
    """
    params_dtype = parse_dtype(params_dtype)
    if use_te is None:
        use_te = transformer_engine_available()
    if cfg.is_moe and use_te:  # TE's grouped-GEMM experts (same checkpoint layout as SequentialMLP)
        config_overrides.setdefault("moe_grouped_gemm", True)
    tconf = transformer_config(cfg, params_dtype, **config_overrides)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = padded_vocab_size or cfg.padded_vocab_size(tp)
    if padded % tp or padded < cfg.vocab_size:
        raise ValueError(f"padded vocab size {padded} must be >= model.vocab_size={cfg.vocab_size} and "
                         f"divisible by tensor_parallel={tp}")
    model = GPTModel(
        config=tconf, transformer_layer_spec=decoder_spec(cfg, use_te),
        vocab_size=padded, max_sequence_length=cfg.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=parallel_state.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings, position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base), rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor, parallel_output=True,
    )
    model.model_type = ModelType.encoder_or_decoder
    if torch.cuda.is_available():
        from megatron_kd.runtime.distributed import device

        model.to(device())
    return model


def vocab_shard_range(padded_vocab: int) -> tuple[int, int]:
    """[start, end) of the vocabulary columns held by this TP rank."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    per = padded_vocab // tp
    return rank * per, (rank + 1) * per


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the padded vocabulary columns (ids >= ``vocab_size``) of a TP shard to -inf.

    ``logits``: [..., V/tp] of this rank's shard. Returns a new tensor (gradients flow to the
    real columns). Softmax over the result gives padded ids exactly zero probability, so CE and
    KD losses match an unpadded model (e.g. Hugging Face) exactly.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    start, end = vocab_shard_range(logits.shape[-1] * tp)
    if end <= vocab_size:
        return logits
    cols = torch.arange(start, end, device=logits.device)
    return logits.masked_fill(cols >= vocab_size, float("-inf"))
