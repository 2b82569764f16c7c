"""Full (TP=1, PP=1, unpadded-vocab) megatron state dicts <-> this rank's TP/PP shard.

The *full* layout uses megatron-core local-spec names with global layer indices and the real
vocabulary (no padding rows), so it is independent of the parallel layout:

* ``embedding.word_embeddings.weight`` / ``output_layer.weight``: [vocab_size, hidden]
* ``decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}``: megatron's fused QKV, grouped per
  KV head: for each query group g, [q heads of g; k_g; v_g] rows (head_dim rows per head)
* ``decoder.layers.{i}.mlp.linear_fc1.weight``: [gate; up] (2*ffn rows)
* row-parallel ``linear_proj`` / ``linear_fc2``; replicated norms.
* MoE layers: ``mlp.router.weight`` [experts, hidden] (replicated); routed expert j (GLOBAL index)
  ``mlp.experts.local_experts.{j}.linear_fc1/2.weight`` (gated / row-parallel over the expert-TP
  group, and held only by the expert-parallel rank that owns expert j); the shared expert
  ``mlp.shared_experts.linear_fc1/2.weight`` (gated / row-parallel over TP) and its replicated
  ``gate_weight``. Transformer Engine's grouped experts (``mlp.experts.linear_fc1.weight{j}``, local
  index) are recognised too.

:func:`shard_full_state` slices it for a TP/PP rank (used by HF import and tests);
:func:`gather_full_state` is the inverse (HF export).
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_kd.models.config import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12]\.weight)(\d+)$")
_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
_GATED = ("mlp.linear_fc1.weight", "mlp.shared_experts.linear_fc1.weight")
_ROW = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight", "mlp.shared_experts.linear_fc2.weight")
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
# Transformer Engine spec fuses the pre-norms into the following linear layer.
_TE_RENAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
               "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _layer_offset(cfg: ModelConfig) -> tuple[int, int]:
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = cfg.num_layers // pp
    return parallel_state.get_pipeline_model_parallel_rank() * per_stage, per_stage


def _split(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return torch.chunk(t, size, dim=dim)[rank].contiguous()


def _split_gated(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    gate, up = t.chunk(2, dim=0)
    return torch.cat([_split(gate, 0, rank, size), _split(up, 0, rank, size)], dim=0)


def _expert_layout() -> tuple[int, int, int, int]:
    """(expert-parallel rank, size, expert-TP rank, size) of this process."""
    return (parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size())


def _shard_expert(rest: str, value: torch.Tensor, cfg: ModelConfig, local_prefix: str,
                  local_keys: set[str] | None) -> tuple[str, torch.Tensor] | None:
    """(local name, shard) of a routed-expert weight for this rank, or None if another EP rank owns it."""
    m = _EXPERT.match(rest)
    ep_rank, ep, etp_rank, etp = _expert_layout()
    per_rank = cfg.num_moe_experts // ep
    expert, weight = int(m.group(1)), m.group(2)
    if expert // per_rank != ep_rank:
        return None
    local = expert - ep_rank * per_rank
    name = f"{local_prefix}mlp.experts.local_experts.{local}.{weight}"
    if local_keys is not None and name not in local_keys:
        name = f"{local_prefix}mlp.experts.{weight}{local}"  # TE grouped GEMM experts
    if weight.startswith("linear_fc1"):
        return name, _split_gated(value, etp_rank, etp)
    return name, _split(value, 1, etp_rank, etp)


def shard_full_state(full: dict[str, torch.Tensor], cfg: ModelConfig, local_keys: set[str] | None = None,
                     padded_vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Slice a full state dict into this rank's TP/PP shard (local layer indices, padded vocab).

    ``local_keys``: the keys of the local model's state dict; used to pick the TE or local
    spelling of the fused norms and to skip keys this stage does not own.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    first, per_stage = _layer_offset(cfg)
    padded = padded_vocab_size or cfg.padded_vocab_size(tp)
    out: dict[str, torch.Tensor] = {}
    for key, value in full.items():
        m = _LAYER.match(key)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if not first <= layer < first + per_stage:
                continue
            if _EXPERT.match(rest):
                sharded = _shard_expert(rest, value, cfg, f"decoder.layers.{layer - first}.", local_keys)
                if sharded is not None:
                    out[sharded[0]] = sharded[1]
                continue
            name = f"decoder.layers.{layer - first}.{rest}"
            if local_keys is not None and name not in local_keys and rest in _TE_RENAMES:
                name = f"decoder.layers.{layer - first}.{_TE_RENAMES[rest]}"
            if rest in _COLUMN:
                value = _split(value, 0, tp_rank, tp)
            elif rest in _GATED:
                value = _split_gated(value, tp_rank, tp)
            elif rest in _ROW:
                value = _split(value, 1, tp_rank, tp)
            out[name] = value
        elif key in _VOCAB:
            pad = torch.zeros(padded - value.shape[0], value.shape[1], dtype=value.dtype)
            out[key] = _split(torch.cat([value, pad], dim=0), 0, tp_rank, tp)
        else:
            out[key] = value
    if local_keys is not None:
        out = {k: v for k, v in out.items() if k in local_keys}
    return out


def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Copy a full state dict into ``model`` (this rank's stage and shard). Strict on real weights."""
    local = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    padded = local_padded_vocab_size(model)
    shard = shard_full_state(full, cfg, set(local), padded)
    missing = sorted(set(local) - set(shard))
    if cfg.tie_embeddings:
        missing = [k for k in missing if k != "output_layer.weight"]
    if missing:
        raise KeyError(f"full state is missing {len(missing)} weight(s) for this stage, e.g. {missing[0]}")
    with torch.no_grad():
        for k, v in shard.items():
            if local[k].shape != v.shape:
                raise ValueError(f"shape mismatch for {k}: model {tuple(local[k].shape)} vs state {tuple(v.shape)}")
            local[k].copy_(v.to(local[k].dtype))


def local_padded_vocab_size(model: torch.nn.Module) -> int | None:
    """Global padded vocab size of a (possibly DDP-wrapped) GPTModel stage; None on middle stages."""
    model = getattr(model, "module", model)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for name in ("embedding", "output_layer"):
        sub = getattr(model, name, None)
        if sub is not None:
            weight = sub.word_embeddings.weight if name == "embedding" else sub.weight
            if weight is not None:
                return weight.shape[0] * tp
    return None


def _all_gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _gather_expert(rest: str, value: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full-layout (global expert index) routed-expert weights from this rank's shard: gathered over
    expert TP, then over EP (every EP rank contributes its own experts)."""
    m = _EXPERT.match(rest) or _TE_EXPERT.match(rest)
    local, weight = (int(m.group(1)), m.group(2)) if _EXPERT.match(rest) else (int(m.group(2)), m.group(1))
    etp_group = parallel_state.get_expert_tensor_parallel_group()
    if weight.startswith("linear_fc1"):
        gate, up = value.chunk(2, dim=0)
        value = torch.cat([_all_gather(gate, 0, etp_group), _all_gather(up, 0, etp_group)], dim=0)
    else:
        value = _all_gather(value, 1, etp_group)
    ep_group = parallel_state.get_expert_model_parallel_group()
    ep = dist.get_world_size(ep_group) if dist.is_initialized() else 1
    per_rank = cfg.num_moe_experts // ep
    parts = [value] if ep == 1 else [torch.empty_like(value) for _ in range(ep)]
    if ep > 1:
        dist.all_gather(parts, value.contiguous(), group=ep_group)
    return {f"mlp.experts.local_experts.{r * per_rank + local}.{weight}": part for r, part in enumerate(parts)}


def gather_full_state(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_full_state`: collective over TP, EP and PP; every rank gets the result."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    first, _ = _layer_offset(cfg)
    te_back = {v: k for k, v in _TE_RENAMES.items()}
    stage: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if value is None or key.endswith("_extra_state"):
            continue
        value = value.detach().float().cpu().clone()  # a snapshot, never an alias of live weights
        m = _LAYER.match(key)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            rest = te_back.get(rest, rest)
            if _EXPERT.match(rest) or _TE_EXPERT.match(rest):
                for name, full in _gather_expert(rest, value, cfg).items():
                    stage[f"decoder.layers.{layer + first}.{name}"] = full
                continue
            if rest in _COLUMN:
                value = _all_gather(value, 0, tp_group)
            elif rest in _GATED:
                gate, up = value.chunk(2, dim=0)
                value = torch.cat([_all_gather(gate, 0, tp_group), _all_gather(up, 0, tp_group)], dim=0)
            elif rest in _ROW:
                value = _all_gather(value, 1, tp_group)
            stage[f"decoder.layers.{layer + first}.{rest}"] = value
        elif key in _VOCAB:
            stage[key] = _all_gather(value, 0, tp_group)[: cfg.vocab_size]
        else:
            stage[key] = value
    if cfg.tie_embeddings:
        stage.pop("output_layer.weight", None)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) == 1:
        return stage
    gathered: list = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(gathered, stage, group=pp_group)
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            full.setdefault(k, v)  # tied embeddings exist on first and last stage
    return full
