"""``hf_to_mcore`` / ``mcore_to_hf``: Hugging Face model directories <-> megatron-kd checkpoints.

Both run as ONE process at TP=1/PP=1. The megatron checkpoint is a ``dist_checkpointing``
directory, so it loads at any TP/PP afterwards; ``tensor_parallel`` at import only chooses the
vocabulary padding (a multiple of ``make_vocab_size_divisible_by * tensor_parallel``, Megatron's
rule) and is validated against the head counts; any loading TP that divides the padded size
works. Peak memory is the model in its dtype plus the largest single tensor.

What an imported checkpoint directory holds besides the weights (so ``distill``/``eval`` need no
hand-written teacher YAML)::

    CKPT/model_config.json          the ModelConfig (also in iter_*/meta.json)
    CKPT/hf_config.json             the original config.json (export restores family + extra fields)
    CKPT/hf_generation_config.json  the original generation_config.json, if any
    CKPT/tokenizer/                 copied tokenizer files; meta["tokenizer"] = "tokenizer" (relative
                                    to CKPT: resolve it with checkpoint_tokenizer())
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron_kd.interop.hf_config import (hf_family, hf_to_model_config, model_config_to_hf, read_hf_config,
                                           same_shape)
from megatron_kd.interop.hf_tokenizer import export_tokenizer, generation_config
from megatron_kd.interop.hf_weights import check_hf_tensors, hf_tensor_specs, load_hf_weights
from megatron_kd.interop.safetensors_io import HFCheckpointReader, parse_size, write_hf_weights
from megatron_kd.interop.vocab import vocab_fingerprint
from megatron_kd.models.builder import build_gpt_model, parse_dtype
from megatron_kd.models.config import ModelConfig
from megatron_kd.training.checkpoint import checkpoint_tokenizer
from megatron_kd.utils.artifacts import TOKENIZER_DIR, TOKENIZER_FILES, copy_tokenizer_files
from megatron_kd.utils.io import read_json, replace_dir_atomic, write_json_atomic
from megatron_kd.utils.progress import progress

HF_CONFIG = "hf_config.json"
HF_GENERATION_CONFIG = "hf_generation_config.json"
_LAYER_INDEX = re.compile(r"^decoder\.layers\.\d+\.")
_EXPERT_INDEX = re.compile(r"\.local_experts\.\d+\.")
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _warn(msg: str) -> None:
    print(f"megatron-kd convert: warning: {msg}", file=sys.stderr)


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """A TP=1/PP=1 parallel_state for this one process (torch.distributed set up and torn down here
    unless the caller already did)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_kd.runtime import ParallelConfig, destroy_distributed, init_distributed

    started = not dist.is_initialized()
    if not started and dist.get_world_size() > 1:
        raise ValueError("checkpoint conversion runs as one process: launch it without torchrun")
    had_state = parallel_state.model_parallel_is_initialized()
    env = {k: os.environ.get(k) for k in _DIST_ENV}
    init_distributed(ParallelConfig())
    try:
        yield
    finally:
        if started:
            destroy_distributed()
            for k, v in env.items():  # leave the caller's environment as it was (notebooks, tests)
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        elif not had_state:
            parallel_state.destroy_model_parallel()


def _hf_dtype(hf_cfg: dict[str, Any]) -> torch.dtype:
    name = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _copy_tokenizer(src: Path, dest: Path) -> bool:
    """Copy tokenizer files of directory (or SentencePiece file) ``src`` into ``dest``; True if any."""
    dest.mkdir(parents=True, exist_ok=True)
    return copy_tokenizer_files(src, dest)


def _tokenizer_vocab(hf_dir: Path, cfg: ModelConfig) -> dict[str, Any] | None:
    """Fingerprint and id count of the tokenizer shipped with a HF model (None if it has none)."""
    if not any((hf_dir / n).is_file() for n in TOKENIZER_FILES):
        return None
    try:
        fingerprint, n_ids = vocab_fingerprint(hf_dir)
    except (FileNotFoundError, ValueError, KeyError, ImportError):
        return None  # unusual tokenizer layout: it is still copied, just not fingerprinted
    if n_ids > cfg.vocab_size:
        raise ValueError(f"the tokenizer in {hf_dir} has {n_ids} ids but config.json vocab_size={cfg.vocab_size}: "
                         "the model cannot embed every token")
    return {"fingerprint": fingerprint, "vocab_size": n_ids}


def _prepare_out(out_dir: Path, overwrite: bool, what: str, source: Path) -> None:
    if out_dir.resolve() == source.resolve() or out_dir.resolve() in source.resolve().parents:
        raise ValueError(f"--out {out_dir} must not be or contain the source directory {source}: choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{what} {out_dir} already exists and is not empty: pass --overwrite or choose "
                                  "another --out")


def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                dtype: str = "auto", overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Convert a local HF model directory into a megatron-kd checkpoint at ``out_dir``.

    ``tensor_parallel``/``pipeline_parallel`` are validated against the model and pick the vocab
    padding (see the module doc); ``dtype``: ``auto`` (config.json's torch dtype), fp32, bf16, fp16.
    Returns stats: ``seconds``, ``bytes`` read, ``padded_vocab_size``, ``warnings``.
    """
    from megatron_kd.training.checkpoint import save_checkpoint

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf_cfg = read_hf_config(hf_dir)
    cfg, warnings = hf_to_model_config(hf_cfg)
    cfg.validate_parallel(tensor_parallel, pipeline_parallel)
    params_dtype = _hf_dtype(hf_cfg) if dtype == "auto" else parse_dtype(dtype)
    reader = HFCheckpointReader(hf_dir)
    family = hf_family(hf_cfg)
    check_hf_tensors(reader, cfg, family)
    tok_vocab = _tokenizer_vocab(hf_dir, cfg)
    _prepare_out(out_dir, overwrite, "checkpoint directory", hf_dir)
    for w in warnings:
        _warn(w)
    start = time.perf_counter()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    # Side files first: `latest` (written last by save_checkpoint) makes the directory loadable.
    write_json_atomic(out_dir / HF_CONFIG, hf_cfg)
    if (hf_dir / "generation_config.json").is_file():
        shutil.copyfile(hf_dir / "generation_config.json", out_dir / HF_GENERATION_CONFIG)
    tokenizer = str(out_dir / TOKENIZER_DIR) if _copy_tokenizer(hf_dir, out_dir / TOKENIZER_DIR) else None
    if tokenizer is None:
        (out_dir / TOKENIZER_DIR).rmdir()
        _warn(f"{hf_dir} has no tokenizer files: pass the tokenizer to distill/eval yourself")
    padded = cfg.padded_vocab_size(tensor_parallel)
    total = reader.total_bytes()
    with single_process():
        model = build_gpt_model(cfg, params_dtype=params_dtype, padded_vocab_size=padded, use_te=False,
                                perform_initialization=False)
        bar = progress(total, "hf-to-mcore: read", unit="B", disable=not show_progress)
        load_hf_weights(reader, model, cfg, on_tensor=bar.update, family=family)
        bar.close()
        _presplit_gated_weights(model)
        extra = {"converted_from": "huggingface", "hf_architecture": hf_cfg["architectures"][0],
                 "hf_source": str(hf_dir.resolve()), "params_dtype": _SHORT[params_dtype],
                 "conversion_tensor_parallel": tensor_parallel, "conversion_pipeline_parallel": pipeline_parallel,
                 "tokenizer_vocab": tok_vocab}
        save_checkpoint(out_dir, [model], cfg, iteration=0, extra=extra, tokenizer=tokenizer)
        del model
    return {"seconds": time.perf_counter() - start, "bytes": total, "padded_vocab_size": padded,
            "dtype": _SHORT[params_dtype], "warnings": warnings}


def _presplit_gated_weights(model: torch.nn.Module) -> None:
    """Make ``model.sharded_state_dict()`` return fc1's gate and up halves as tensors of their own.

    megatron saves the fused [gate; up] fc1 as two halves (views), and dist_checkpointing clones
    every view before writing, all at once: 58% of each layer's weights held twice. Splitting here
    layer by layer, freeing each fused weight as we go, keeps the peak at the model plus one fc1.
    The model is only good for saving afterwards.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    sharded = model.sharded_state_dict(prefix="")
    params = dict(model.named_parameters())
    for key in list(sharded):
        if not isinstance(sharded[key], ShardedTensorFactory):
            continue
        parts = sharded[key].build()
        for part in parts:
            part.data = part.data.clone()
        sharded[key] = parts
        if key in params:
            params[key].data = torch.empty(0, dtype=params[key].dtype)
    # save_checkpoint asks the model for its sharded state dict: hand it the pre-split one.
    model.sharded_state_dict = lambda prefix="", **kwargs: sharded


def _stored_dtype(iter_dir: Path, meta: dict[str, Any]) -> torch.dtype:
    """dtype of the checkpoint's embedding (what the weights were saved in)."""
    from megatron.core import dist_checkpointing

    saved = (meta.get("extra") or {}).get("params_dtype")
    if saved:
        return parse_dtype(saved)
    for key, ten in dist_checkpointing.load_tensors_metadata(str(iter_dir)).items():
        if key.endswith("word_embeddings.weight") or key.endswith("output_layer.weight"):
            return ten.dtype
    return torch.float32


def _group(key: str) -> str:
    """Load unit of a state-dict key: one weight across all layers (megatron stores each as one
    stacked [num_layers, ...] tensor; a single-process load must read such a tensor whole) and, for
    MoE routed experts, across all experts (stacked [num_layers, num_experts, ...] likewise)."""
    return _EXPERT_INDEX.sub(".local_experts.", _LAYER_INDEX.sub("decoder.layers.", key))


class _GroupLoader:
    """Loads a checkpoint into an uninitialised TP=1/PP=1 model one weight kind (all layers) at a
    time and frees it once the next is asked for, so export never holds the whole model: peak
    memory is the largest group (e.g. every layer's fc1) plus the read buffer of one stored chunk."""

    def __init__(self, model: torch.nn.Module, iter_dir: Path):
        self.iter_dir = iter_dir
        self.sharded: dict[str, Any] = dict(model.sharded_state_dict(prefix=""))
        self.params = {k: v for k, v in model.state_dict(keep_vars=True).items()
                       if v is not None and not k.endswith("_extra_state")}
        self.current: str | None = None

    def get(self, key: str) -> torch.Tensor:
        """The loaded tensor ``key`` (full layout, padded vocab)."""
        group = _group(key)
        if group != self.current:
            self.release()
            self._load(group)
        return self.params[key].detach()

    def _load(self, group: str) -> None:
        from megatron.core import dist_checkpointing

        keys = [k for k in self.sharded if _group(k) == group and not k.endswith("_extra_state")]
        if not keys:
            raise KeyError(f"checkpoint model has no weights for {group}")
        sub = {k: self.sharded.pop(k) for k in keys}
        loaded = dist_checkpointing.load({"model": sub}, str(self.iter_dir))["model"]
        with torch.no_grad():
            for k, v in loaded.items():
                param = self.params.get(k)
                if param is not None and isinstance(v, torch.Tensor) and v.data_ptr() != param.data_ptr():
                    param.data.copy_(v)  # strategies that do not load in place
        self.current = group

    def release(self) -> None:
        """Free the storage of the current group's parameters."""
        if self.current is None:
            return
        for k, p in self.params.items():
            if _group(k) == self.current:
                p.data = torch.empty(0, dtype=p.dtype)
        self.current = None


def _base_hf_config(ckpt_dir: Path, hf_config: str | Path | None) -> dict[str, Any] | None:
    if hf_config is not None:
        path = Path(hf_config)
        return read_json(path / "config.json" if path.is_dir() else path, "Hugging Face config")
    if (ckpt_dir / HF_CONFIG).is_file():
        return read_json(ckpt_dir / HF_CONFIG, "Hugging Face config")
    return None


def mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path, dtype: str = "auto", max_shard_size: str | int = "5GB",
                arch: str | None = None, hf_config: str | Path | None = None, tokenizer: str | Path | None = None,
                iteration: int | None = None, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Export a megatron-kd checkpoint (any TP/PP it was saved at) as a HF model directory.

    ``dtype``: ``auto`` (the checkpoint's) or fp32/bf16/fp16. ``arch``: llama|mistral|qwen2|qwen3
    (default: the imported family, else guessed from QK-norm/QKV bias). ``hf_config``: a config.json
    (or directory) whose extra fields to keep (default: ``CKPT/hf_config.json``). ``tokenizer``:
    tokenizer or directory to export (default: the checkpoint's, ``CKPT/tokenizer``): SentencePiece
    models are converted to a fast tokenizer (:mod:`megatron_kd.interop.hf_tokenizer`); eos/bos/pad
    ids go into config.json and generation_config.json. Written to ``out_dir.tmp`` then renamed.
    """
    from megatron_kd.training.checkpoint import read_checkpoint_meta

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    meta = read_checkpoint_meta(ckpt_dir, iteration)
    cfg = ModelConfig.from_dict(meta["model_config"])
    base = _base_hf_config(ckpt_dir, hf_config)
    if base is not None and arch is None and hf_config is None:
        try:
            if not same_shape(hf_to_model_config(base)[0], cfg):
                _warn(f"{ckpt_dir / HF_CONFIG} describes another shape than the checkpoint: only its extra "
                      "fields are kept")
        except ValueError:
            base = None
    stored = _stored_dtype(Path(meta["path"]), meta)
    out_dtype = stored if dtype == "auto" else parse_dtype(dtype)
    hf_cfg = model_config_to_hf(cfg, base, family=arch, dtype=_DTYPE_NAMES[out_dtype])
    if not same_shape(hf_to_model_config(hf_cfg)[0], cfg):  # the written config must reproduce the model
        raise RuntimeError("internal error: exported config.json does not reproduce the model config")
    max_bytes = parse_size(max_shard_size)
    tok_src = Path(tokenizer) if tokenizer else (Path(t) if (t := checkpoint_tokenizer(ckpt_dir, meta)) else None)
    if tok_src is not None and not tok_src.exists():
        raise FileNotFoundError(f"tokenizer {tok_src} does not exist: pass --tokenizer DIR")
    _prepare_out(out_dir, overwrite, "output directory", ckpt_dir)
    start = time.perf_counter()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with single_process():
            model = build_gpt_model(cfg, params_dtype=stored, padded_vocab_size=meta["padded_vocab_size"], use_te=False,
                                    perform_initialization=False)
            loader = _GroupLoader(model, Path(meta["path"]))
            del model
            specs = hf_tensor_specs(loader.get, cfg, out_dtype, family=hf_family(hf_cfg))
            order = {g: i for i, g in enumerate(dict.fromkeys(_group(s.source) for s in specs))}
            specs.sort(key=lambda s: order[_group(s.source)])  # group-major: each group loaded once
            total = sum(s.nbytes for s in specs)
            bar = progress(total, "mcore-to-hf: write", unit="B", disable=not show_progress)
            files = write_hf_weights(tmp, specs, max_bytes, on_tensor=lambda s: bar.update(s.nbytes))
            bar.close()
            loader.release()
            del specs, loader
        base_gen = (read_json(ckpt_dir / HF_GENERATION_CONFIG, "generation config")
                    if (ckpt_dir / HF_GENERATION_CONFIG).is_file() else None)
        ids: dict[str, Any] = {}
        if tok_src is None:
            _warn("no tokenizer files to copy: add them to the output directory before using it with transformers")
        else:
            ids = export_tokenizer(tok_src, tmp)  # AutoTokenizer-loadable (SentencePiece converted)
            # generate() stops at EOS (generation_config.json below). A fresh config.json gets
            # eos/bos/pad too; an imported model's is left as it was (the round trip stays exact).
            for key in tuple(ids) if base is None else ():
                if hf_cfg.get(key) is None and ids.get(key) is not None:
                    hf_cfg[key] = ids[key]
        write_json_atomic(tmp / "config.json", hf_cfg)
        if base_gen is not None or ids:
            write_json_atomic(tmp / "generation_config.json", generation_config(ids, base_gen))
        replace_dir_atomic(tmp, out_dir)
    except BaseException:  # full disk, read-only, Ctrl-C: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"seconds": time.perf_counter() - start, "bytes": total, "files": files,
            "architecture": hf_cfg["architectures"][0], "dtype": _SHORT[out_dtype]}


__all__ = ["checkpoint_tokenizer", "hf_family", "hf_to_mcore", "mcore_to_hf", "single_process"]
