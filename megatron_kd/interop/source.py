"""A local Hugging Face model directory used wherever a checkpoint is: no conversion step.

Importing this module registers the source with
:func:`megatron_kd.training.checkpoint.register_checkpoint_source`; then ``read_checkpoint_meta``,
``load_checkpoint`` and ``load_model_for_inference`` accept a directory holding ``config.json`` and
``*.safetensors`` (and no ``latest``) as they accept a megatron-kd checkpoint. So does every
command built on them: ``distill teacher.load=HF_DIR``, ``logits --teacher HF_DIR``, ``miniplm
score --teacher/--reference HF_DIR``, ``eval --checkpoint HF_DIR``, and a student started from it
with ``checkpoint.load=HF_DIR checkpoint.finetune=true`` (the model shape is taken from its
``config.json``: no ``model.*`` field to restate).

The weights are read straight into this rank's shard at the current TP/PP (and expert
parallelism): one HF weight kind at a time (e.g. one layer's QKV) is assembled in megatron's full
layout (:mod:`megatron_kd.interop.hf_weights`) and sliced with
:func:`megatron_kd.models.sharding.shard_full_state`, so peak extra memory is one full weight. The
tokenizer is the directory itself (its ``tokenizer.json`` etc.). Families: those of
:mod:`megatron_kd.interop.hf_config` (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Qwen2-MoE).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from megatron_kd.interop.hf_config import hf_family, hf_to_model_config, read_hf_config
from megatron_kd.interop.hf_weights import WeightMap, check_hf_tensors, fuse_qkv, weight_maps
from megatron_kd.interop.safetensors_io import HFCheckpointReader
from megatron_kd.models.config import ModelConfig
from megatron_kd.training.checkpoint import register_checkpoint_source
from megatron_kd.utils.artifacts import TOKENIZER_FILES

SOURCE_NAME = "Hugging Face model"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_meta_cache: dict[tuple[str, int], dict[str, Any]] = {}


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory with ``config.json`` and safetensors weights (and no megatron-kd ``latest``)."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file() or (p / "latest").is_file():
        return False
    return (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file() or \
        any(p.glob("*.safetensors"))


def hf_meta(path: str | Path, iteration: int | None = None) -> dict[str, Any]:
    """``meta.json``-shaped description of HF directory ``path`` (one-line error if its
    architecture or tensors do not fit)."""
    p = Path(path)
    key = (str(p.resolve()), (p / "config.json").stat().st_mtime_ns)
    if key in _meta_cache:
        return dict(_meta_cache[key])
    if iteration not in (None, 0):
        raise ValueError(f"{p} is a Hugging Face model directory: it has no iteration {iteration}")
    hf_cfg = read_hf_config(p)
    cfg, _ = hf_to_model_config(hf_cfg)
    family = hf_family(hf_cfg)
    check_hf_tensors(HFCheckpointReader(p), cfg, family)
    has_tok = any((p / n).is_file() for n in TOKENIZER_FILES)
    meta = {"iteration": 0, "padded_vocab_size": cfg.padded_vocab_size(1), "tensor_parallel": 1,
            "pipeline_parallel": 1, "model_config": cfg.to_dict(), "tokenizer": str(p) if has_tok else None,
            "seq_length": None, "has_optimizer": False, "scheduler": None, "path": str(p),
            "source": "huggingface",
            "extra": {"converted_from": "huggingface", "hf_architecture": hf_cfg["architectures"][0],
                      "hf_source": str(p.resolve()), "hf_family": family}}
    _meta_cache[key] = meta
    return dict(meta)


def _full_tensor(reader: HFCheckpointReader, wm: WeightMap, cfg: ModelConfig) -> torch.Tensor:
    """One weight in megatron's full layout (real vocabulary rows; padding is added when sharding)."""
    if wm.kind == "qkv":
        return fuse_qkv(*(reader.read(n) for n in wm.hf), cfg)
    if wm.kind == "fc1":
        return torch.cat([reader.read(wm.hf[0]), reader.read(wm.hf[1])], dim=0)
    return reader.read(wm.hf[0])


def load_hf_into(path: str | Path, model_chunks: list[torch.nn.Module], meta: dict[str, Any] | None = None) -> None:
    """Fill this rank's model stage(s) from HF directory ``path`` at the current TP/PP/EP."""
    from megatron.core import parallel_state

    from megatron_kd.models.sharding import local_padded_vocab_size, shard_full_state
    from megatron_kd.runtime.parallel import unwrap

    meta = meta or hf_meta(path)
    cfg = ModelConfig.from_dict(meta["model_config"])
    family = (meta.get("extra") or {}).get("hf_family")
    if len(model_chunks) != 1:
        raise ValueError("loading a Hugging Face directory into virtual-pipeline model chunks is not supported: "
                         "use one model chunk per pipeline stage")
    model = unwrap(model_chunks[0])
    local = {k: v for k, v in model.state_dict(keep_vars=True).items()
             if v is not None and not k.endswith("_extra_state")}
    keys = set(local)
    padded = local_padded_vocab_size(model)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = cfg.num_layers // pp
    first = parallel_state.get_pipeline_model_parallel_rank() * per_stage
    reader = HFCheckpointReader(path)
    filled: set[str] = set()
    with torch.no_grad():
        for wm in weight_maps(cfg, family):
            m = _LAYER.match(wm.mcore)
            if m and not first <= int(m.group(1)) < first + per_stage:
                continue  # another pipeline stage's layer
            targets = [wm.mcore]
            if wm.mcore == "embedding.word_embeddings.weight" and cfg.tie_embeddings:
                targets.append("output_layer.weight")  # the last stage's copy of tied embeddings
            if not any(t in keys or t.startswith("decoder.layers.") for t in targets):
                continue  # e.g. the embedding on a later pipeline stage
            full = _full_tensor(reader, wm, cfg)
            for target in targets:
                for k, v in shard_full_state({target: full}, cfg, keys, padded).items():
                    if local[k].shape != v.shape:
                        raise ValueError(f"{path}: {k} has shape {tuple(v.shape)} for this rank but the model "
                                         f"expects {tuple(local[k].shape)}")
                    local[k].data.copy_(v)
                    filled.add(k)
            del full
    missing = sorted(keys - filled)
    if missing:
        raise KeyError(f"{len(missing)} model weight(s) were not found in {path}, e.g. {missing[0]}")


register_checkpoint_source(SOURCE_NAME, is_hf_model_dir, hf_meta, load_hf_into)

__all__ = ["SOURCE_NAME", "hf_meta", "is_hf_model_dir", "load_hf_into"]
