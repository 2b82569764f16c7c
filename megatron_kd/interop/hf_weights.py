"""Weight names and layouts: Hugging Face Llama/Mistral/Qwen2/Qwen3 (+ Qwen3-MoE, Mixtral, Qwen2-MoE)
<-> megatron-core full state.

The megatron side is the *full* layout of :mod:`megatron_kd.models.sharding` (TP=1/PP=1 local-spec
names, global layer indices) plus vocabulary padding rows. Layout changes:

* fused QKV: HF ``q_proj`` [heads*d, h], ``k_proj``/``v_proj`` [groups*d, h] become megatron's
  ``linear_qkv`` [(heads + 2*groups)*d, h] grouped per KV head: for each group g the rows of its
  heads/groups query heads, then k_g, then v_g (same for the Qwen2 biases);
* gated MLP: ``linear_fc1`` = [gate_proj; up_proj];
* embeddings / output layer: HF rows [0, vocab_size) then zero padding rows up to the padded size;
* tied embeddings: no ``lm_head.weight`` / ``output_layer.weight``;
* MoE layers: router ``mlp.gate`` (Mixtral ``block_sparse_moe.gate``) -> ``mlp.router.weight``;
  expert j's gate/up/down (Mixtral w1/w3/w2) -> ``mlp.experts.local_experts.{j}.linear_fc1`` =
  [gate; up] and ``linear_fc2`` (global expert index j in the full layout); Qwen2-MoE's
  ``shared_expert`` -> ``mlp.shared_experts.linear_fc1/2`` and ``shared_expert_gate`` -> its
  ``gate_weight``.

Everything else is a rename. Import reads each HF tensor straight into the model's parameter
(no full second copy); export yields HF tensors one at a time (views where the layout allows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megatron_kd.interop.safetensors_io import HFCheckpointReader, TensorSpec
from megatron_kd.models.config import ModelConfig

# HF tensors that carry no weights (buffers some old checkpoints saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class WeightMap:
    """One megatron tensor and the HF tensor(s) it is made of.

    ``kind``: ``copy`` (rename), ``vocab`` (rename + padding rows), ``qkv`` (hf = q, k, v),
    ``fc1`` (hf = gate, up; split at half the fused rows). ``shapes``: the HF tensors' shapes where
    the name alone does not tell them (expert and shared-expert MLPs, routers).
    """

    mcore: str
    hf: tuple[str, ...]
    kind: str = "copy"
    shapes: tuple[tuple[int, ...], ...] | None = None


def _mlp_maps(m: str, h: str, names: tuple[str, str, str], hidden: int, ffn: int) -> list[WeightMap]:
    """fc1 = [gate; up] and fc2 = down of one SwiGLU MLP (megatron prefix m, HF names gate/up/down)."""
    gate, up, down = names
    return [WeightMap(m + "linear_fc1.weight", (h + gate, h + up), "fc1", ((ffn, hidden), (ffn, hidden))),
            WeightMap(m + "linear_fc2.weight", (h + down,), "copy", ((hidden, ffn),))]


def _moe_maps(cfg: ModelConfig, m: str, h: str, mixtral: bool) -> list[WeightMap]:
    """Router, routed experts and the (gated) shared expert of one MoE layer."""
    hid, e, f = cfg.hidden_size, cfg.num_moe_experts, cfg.moe_ffn_hidden_size
    block = h + ("block_sparse_moe." if mixtral else "mlp.")
    names = ("w1.weight", "w3.weight", "w2.weight") if mixtral else \
        ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
    maps = [WeightMap(m + "mlp.router.weight", (block + "gate.weight",), "copy", ((e, hid),))]
    for j in range(e):
        maps += _mlp_maps(f"{m}mlp.experts.local_experts.{j}.", f"{block}experts.{j}.", names, hid, f)
    if cfg.moe_shared_expert_intermediate_size:
        maps += _mlp_maps(m + "mlp.shared_experts.", block + "shared_expert.", names, hid,
                          cfg.moe_shared_expert_intermediate_size)
        if cfg.moe_shared_expert_gate:
            maps.append(WeightMap(m + "mlp.shared_experts.gate_weight", (block + "shared_expert_gate.weight",),
                                  "copy", ((1, hid),)))
    return maps


def weight_maps(cfg: ModelConfig, family: str | None = None) -> list[WeightMap]:
    """Every weight of a ``cfg`` model, in HF file order (embeddings, layers, final norm, head).

    ``family``: the HF family (only Mixtral names its MoE tensors differently); default: Mixtral
    when :func:`megatron_kd.interop.hf_config.guess_family` says so.
    """
    if family is None and cfg.is_moe:
        from megatron_kd.interop.hf_config import guess_family

        family = guess_family(cfg)
    moe_layers = cfg.moe_layers()


    maps = [WeightMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        maps.append(WeightMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",)))
        maps.append(WeightMap(m + "self_attention.linear_qkv.weight",
                              tuple(f"{attn}{p}_proj.weight" for p in "qkv"), "qkv"))
        if cfg.add_qkv_bias:
            maps.append(WeightMap(m + "self_attention.linear_qkv.bias",
                                  tuple(f"{attn}{p}_proj.bias" for p in "qkv"), "qkv"))
        if cfg.qk_layernorm:
            maps.append(WeightMap(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",)))
            maps.append(WeightMap(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",)))
        maps.append(WeightMap(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)))
        maps.append(WeightMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)))
        if moe_layers[i]:
            maps += _moe_maps(cfg, m, h, mixtral=family == "mixtral")
        else:
            maps += _mlp_maps(m + "mlp.", h + "mlp.", ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
                              cfg.hidden_size, cfg.ffn_hidden_size)
    maps.append(WeightMap("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        maps.append(WeightMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


def _qkv_view(fused: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[groups, heads_per_group + 2, head_dim, *rest] view of a fused QKV weight or bias."""
    g = cfg.num_query_groups
    return fused.view(g, cfg.num_attention_heads // g + 2, cfg.head_dim, *fused.shape[1:])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """megatron's grouped QKV from HF q [heads*d, ...], k and v [groups*d, ...] (into ``out`` if given)."""
    g, hpg, d = cfg.num_query_groups, cfg.num_attention_heads // cfg.num_query_groups, cfg.head_dim
    rest = tuple(q.shape[1:])
    if out is None:
        out = torch.empty((g * (hpg + 2) * d, *rest), dtype=q.dtype)
    view = _qkv_view(out, cfg)
    with torch.no_grad():
        view[:, :hpg].copy_(q.reshape(g, hpg, d, *rest))
        view[:, hpg].copy_(k.reshape(g, d, *rest))
        view[:, hpg + 1].copy_(v.reshape(g, d, *rest))
    return out


def split_qkv(fused: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: HF (q, k, v), each a new contiguous tensor."""
    hpg = cfg.num_attention_heads // cfg.num_query_groups
    view = _qkv_view(fused, cfg)
    rest = tuple(fused.shape[1:])
    q = view[:, :hpg].reshape(cfg.num_attention_heads * cfg.head_dim, *rest).clone()
    k = view[:, hpg].reshape(cfg.num_query_groups * cfg.head_dim, *rest).clone()
    v = view[:, hpg + 1].reshape(cfg.num_query_groups * cfg.head_dim, *rest).clone()
    return q, k, v


def hf_shapes(cfg: ModelConfig, family: str | None = None) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor of a ``cfg`` model."""
    h, d, f, v = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    by_suffix = {"embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
                 "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (h, q),
                 "q_norm.weight": (d,), "k_norm.weight": (d,), "gate_proj.weight": (f, h),
                 "up_proj.weight": (f, h), "down_proj.weight": (h, f)}
    out = {}
    for wm in weight_maps(cfg, family):
        if wm.shapes is not None:
            out.update(zip(wm.hf, wm.shapes))
            continue
        for name in wm.hf:
            suffix = max((s for s in by_suffix if name.endswith(s)), key=len)
            out[name] = by_suffix[suffix]
    return out


def check_hf_tensors(reader: HFCheckpointReader, cfg: ModelConfig, family: str | None = None) -> None:
    """One-line errors for missing, unexpected or mis-shaped HF tensors (before any heavy work)."""
    want = hf_shapes(cfg, family)
    have = set(reader.keys())
    missing = sorted(set(want) - have)
    if missing:
        raise ValueError(f"Hugging Face checkpoint lacks {len(missing)} tensor(s) its config.json implies, "
                         f"e.g. {missing[0]}: config and weights do not match")
    extra = sorted(k for k in have - set(want) if not k.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_embeddings:
        extra = [k for k in extra if k != "lm_head.weight"]  # some tied checkpoints store the copy anyway
    if extra:
        raise ValueError(f"Hugging Face checkpoint has {len(extra)} tensor(s) megatron-kd does not map, e.g. "
                         f"{extra[0]}: this architecture variant is not supported")
    for name, shape in want.items():
        if reader.shape(name) != shape:
            raise ValueError(f"tensor {name} has shape {reader.shape(name)}, config.json implies {shape}")


def load_hf_weights(reader: HFCheckpointReader, model: torch.nn.Module, cfg: ModelConfig,
                    on_tensor: Callable[[int], None] | None = None, family: str | None = None) -> None:
    """Copy every HF tensor into a TP=1/PP=1 ``model`` in place (casting to its dtype).

    ``on_tensor(nbytes)`` is called after each HF tensor (progress reporting). Padding rows of the
    vocabulary are zeroed. Raises ``KeyError`` if a model parameter is left unfilled.
    """
    local = {k: v for k, v in model.state_dict(keep_vars=True).items()
             if v is not None and not k.endswith("_extra_state")}
    filled: set[str] = set()
    notify = on_tensor or (lambda n: None)
    with torch.no_grad():
        for wm in weight_maps(cfg, family):
            if wm.mcore not in local:
                raise KeyError(f"model has no parameter {wm.mcore}: is parallel_state TP=1/PP=1?")
            dest = local[wm.mcore].data
            if wm.kind == "copy":
                reader.read(wm.hf[0], out=dest)
            elif wm.kind == "vocab":
                reader.read(wm.hf[0], out=dest[: cfg.vocab_size])
                dest[cfg.vocab_size:].zero_()
            elif wm.kind == "fc1":
                f = dest.shape[0] // 2
                reader.read(wm.hf[0], out=dest[:f])
                reader.read(wm.hf[1], out=dest[f:])
            else:  # qkv
                fuse_qkv(*(reader.read(n) for n in wm.hf), cfg, out=dest)
            for n in wm.hf:
                notify(reader.shape_bytes(n))
            filled.add(wm.mcore)
    unfilled = sorted(k for k in set(local) - filled if not (k == "output_layer.weight" and cfg.tie_embeddings))
    if unfilled:
        raise KeyError(f"{len(unfilled)} model parameter(s) have no HF source, e.g. {unfilled[0]}")


def model_tensors(model: torch.nn.Module) -> Callable[[str], torch.Tensor]:
    """``get(name)`` over a model's state dict (the tensor source :func:`hf_tensor_specs` reads)."""
    local = {k: v for k, v in model.state_dict().items() if v is not None and not k.endswith("_extra_state")}
    return local.__getitem__


def hf_tensor_specs(get: Callable[[str], torch.Tensor] | torch.nn.Module, cfg: ModelConfig,
                    dtype: torch.dtype, family: str | None = None) -> list[TensorSpec]:
    """Lazy HF tensors (unpadded vocab, ``dtype``) in HF file order.

    ``get(mcore_name)`` returns a full-layout megatron tensor when a spec is produced (so a caller
    can load weights group by group); a TP=1/PP=1 model may be passed instead.
    """
    if isinstance(get, torch.nn.Module):
        get = model_tensors(get)
    shapes = hf_shapes(cfg, family)
    specs: list[TensorSpec] = []

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype)

    for wm in weight_maps(cfg, family):
        k = wm.mcore
        if wm.kind == "copy":
            producers = [lambda k=k: cast(get(k))]
        elif wm.kind == "vocab":
            producers = [lambda k=k: cast(get(k)[: cfg.vocab_size])]
        elif wm.kind == "fc1":
            producers = [lambda k=k: cast(_half(get(k), 0)), lambda k=k: cast(_half(get(k), 1))]
        else:
            producers = [lambda k=k, j=j: cast(split_qkv(get(k), cfg)[j]) for j in range(3)]
        specs += [TensorSpec(n, dtype, shapes[n], p, source=k) for n, p in zip(wm.hf, producers)]
    return specs


def _half(fused: torch.Tensor, which: int) -> torch.Tensor:
    """Gate (0) or up (1) rows of a fused [gate; up] fc1 weight."""
    f = fused.shape[0] // 2
    return fused[:f] if which == 0 else fused[f:]


def iter_hf_state(model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype,
                  family: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, tensor)`` pairs of a TP=1/PP=1 model, produced one at a time."""
    for spec in hf_tensor_specs(model, cfg, dtype, family):
        yield spec.name, spec.produce()
