"""Checkpoints: megatron-core ``dist_checkpointing`` directories with a ``latest`` pointer.

Layout (a contract: ``distill``, ``logits``, ``miniplm``, ``eval`` and ``convert`` read it)::

    CKPT/
      latest                  text: name of the newest complete iteration directory
      model_config.json       the student's ModelConfig (so consumers need no hand-written YAML)
      tokenizer/              the tokenizer files, copied at save (the checkpoint is self-contained:
                              copy or move the directory and every command still finds them)
      iter_0000100/
        <dist_checkpointing files>   model (+ optimizer) sharded tensors: any DP size, and any
                                     TP/PP when the padded vocabulary divides the new TP
        meta.json             iteration, padded_vocab_size, model config, tokenizer (a path
                              relative to CKPT: "tokenizer"), training seq_length, extra state
        rng/rank_00000.pt     per-rank RNG states (training checkpoints only)

Atomicity: every rank writes into ``iter_X.tmp``; after a barrier rank 0 renames it to
``iter_X`` and only then rewrites ``latest`` (atomic rename). A crash at any point leaves the
previous ``latest`` intact and loadable.
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_kd.models.builder import build_gpt_model
from megatron_kd.models.config import ModelConfig
from megatron_kd.models.sharding import local_padded_vocab_size
from megatron_kd.runtime.distributed import barrier, is_main_process, rank
from megatron_kd.runtime.parallel import unwrap
from megatron_kd.utils.artifacts import bundle_tokenizer, resolve_ref
from megatron_kd.utils.exits import FilesystemError, filesystem_cause
from megatron_kd.utils.io import atomic_write, read_json, replace_dir_atomic, write_json_atomic

LATEST = "latest"
MODEL_CONFIG = "model_config.json"


class CheckpointSource:
    """A kind of directory that serves as a checkpoint without being one (e.g. a Hugging Face model
    directory: :mod:`megatron_kd.interop.source`). ``detect(path)`` says whether ``path`` is one;
    ``read_meta(path, iteration)`` returns a ``meta.json``-shaped dict (``iteration``,
    ``padded_vocab_size``, ``model_config``, ``tokenizer``, ``path``, ...); ``load(path, model_chunks,
    meta)`` fills this rank's model stage(s) at the current TP/PP."""

    def __init__(self, name: str, detect, read_meta, load):
        self.name, self.detect, self.read_meta, self.load = name, detect, read_meta, load


_SOURCES: dict[str, CheckpointSource] = {}


def register_checkpoint_source(name: str, detect, read_meta, load) -> None:
    """Make every checkpoint consumer (``read_checkpoint_meta``, ``load_checkpoint``,
    ``load_model_for_inference``, ``has_checkpoint``) accept directories ``detect`` recognises."""
    _SOURCES[name] = CheckpointSource(name, detect, read_meta, load)


def checkpoint_source(path: str | Path | None) -> CheckpointSource | None:
    """The registered source that ``path`` is (None for a megatron-kd checkpoint or anything else)."""
    if not path or (Path(path) / LATEST).is_file():
        return None
    for source in _SOURCES.values():
        if source.detect(Path(path)):
            return source
    return None


def iteration_dir_name(iteration: int) -> str:
    """``iter_0000100`` for iteration 100."""
    return f"iter_{iteration:07d}"


_unwrap = unwrap


def _padded_vocab(model_chunks: list[torch.nn.Module]) -> int:
    from megatron_kd.runtime.distributed import world_size
    import torch.distributed as dist

    local = local_padded_vocab_size(_unwrap(model_chunks[0])) or 0
    if world_size() > 1:
        t = torch.tensor([local], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        local = int(t.item())
    return local


def _model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict[str, Any]:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict(prefix="")}
    return {f"model{i}": _unwrap(m).sharded_state_dict(prefix="") for i, m in enumerate(model_chunks)}


def resolve_checkpoint(ckpt_dir: str | Path, iteration: int | None = None) -> Path:
    """The iteration directory to load: ``iteration`` if given, else the one ``latest`` names."""
    ckpt_dir = Path(ckpt_dir)
    if iteration is not None:
        path = ckpt_dir / iteration_dir_name(iteration)
    else:
        pointer = ckpt_dir / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(
                f"checkpoint directory {ckpt_dir} has no '{LATEST}' file: pass a directory written by "
                "megatron-kd pretrain/distill/convert"
            )
        path = ckpt_dir / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete or missing (no meta.json)")
    check_checkpoint_complete(path)
    return path


_complete_cache: dict[tuple[str, int], None] = {}


def check_checkpoint_complete(path: str | Path) -> None:
    """One-line ``ValueError`` if an iteration directory's tensor files are missing or shorter than
    its ``dist_checkpointing`` index says (a truncated copy, a disk that filled up): cheap, it only
    reads the index and stats the files; cached per directory and index mtime."""
    import pickle

    path = Path(path)
    index = path / ".metadata"
    shards = list(path.glob("*.distcp"))
    if not index.is_file():
        if shards:
            raise ValueError(f"checkpoint {path} is incomplete: its index .metadata is missing; copy it again "
                             "or use another checkpoint")
        return
    key = (str(path.resolve()), index.stat().st_mtime_ns)
    if key in _complete_cache:
        return
    try:
        with open(index, "rb") as fh:
            metadata = pickle.load(fh)
        needed: dict[str, int] = {}
        for info in metadata.storage_data.values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    except Exception as exc:  # noqa: BLE001 - any unreadable index means an unusable checkpoint
        raise ValueError(f"checkpoint {path} is incomplete: its index .metadata cannot be read "
                         f"({type(exc).__name__}); copy it again or use another checkpoint") from None
    for name, end in sorted(needed.items()):
        f = path / name
        size = f.stat().st_size if f.is_file() else None
        if size is None or size < end:
            have = "missing" if size is None else f"{size:,} bytes"
            raise ValueError(f"checkpoint {path} is incomplete: {name} is {have} but its index needs {end:,} "
                             "bytes (truncated copy or full disk); copy it again or use another checkpoint")
    _complete_cache[key] = None


def read_checkpoint_meta(ckpt_dir: str | Path, iteration: int | None = None) -> dict[str, Any]:
    """``meta.json`` of the chosen iteration, plus ``path`` (its directory). A registered
    :class:`CheckpointSource` (e.g. a Hugging Face model directory) answers for its directories."""
    source = checkpoint_source(ckpt_dir)
    if source is not None:
        return source.read_meta(Path(ckpt_dir), iteration)
    path = resolve_checkpoint(ckpt_dir, iteration)
    meta = read_json(path / "meta.json", "checkpoint metadata")
    meta["path"] = str(path)
    return meta


def checkpoint_tokenizer(ckpt_dir: str | Path, meta: dict[str, Any] | None = None,
                         override: str | Path | None = None) -> str | None:
    """The tokenizer to use with a checkpoint: ``override`` (a ``--tokenizer`` flag) when given, else
    ``meta["tokenizer"]`` resolved against the checkpoint directory (``CKPT/tokenizer``, written at
    save), then the iteration directory, then as recorded (older checkpoints recorded a path
    relative to the launch directory). None when the checkpoint names none."""
    if override:
        return str(override)
    meta = meta if meta is not None else read_checkpoint_meta(ckpt_dir)
    bases = [Path(meta["path"]).parent] if meta.get("path") else []
    bases.append(Path(ckpt_dir))
    if meta.get("path"):
        bases.append(Path(meta["path"]))
    return resolve_ref(meta.get("tokenizer"), *bases)


def training_seq_length(ckpt_dir: str | Path, meta: dict[str, Any] | None = None) -> int | None:
    """The sequence length the checkpoint was trained at: ``meta["seq_length"]`` (recorded at save),
    else ``train.seq_length`` of the run config saved beside it; None when unknown."""
    meta = meta if meta is not None else read_checkpoint_meta(ckpt_dir)
    if meta.get("seq_length"):
        return int(meta["seq_length"])
    root = Path(meta["path"]).parent if meta.get("path") else Path(ckpt_dir)
    for name in ("pretrain_config.yaml", "distill_config.yaml", "config.yaml"):
        f = root / name
        if f.is_file():
            try:
                import yaml

                value = ((yaml.safe_load(f.read_text()) or {}).get("train") or {}).get("seq_length")
            except Exception:  # noqa: BLE001 - an unreadable side file only loses the default
                value = None
            if value:
                return int(value)
    return None


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ``ModelConfig`` stored with a checkpoint."""
    path = Path(ckpt_dir) / MODEL_CONFIG
    return ModelConfig.from_dict(read_json(path, "model config"))


def has_checkpoint(ckpt_dir: str | Path | None) -> bool:
    """True when ``ckpt_dir`` holds a complete checkpoint to resume from (or is a registered
    checkpoint source, e.g. a Hugging Face model directory, to load weights from)."""
    return bool(ckpt_dir) and ((Path(ckpt_dir) / LATEST).is_file() or checkpoint_source(ckpt_dir) is not None)


def _in_process_write_results() -> None:
    """Make megatron-core's synchronous checkpoint writer collect its results in this process.

    By default it starts a ``multiprocessing.Manager`` server process once (for *async* saves),
    which a process-group SIGTERM (Slurm ``scancel``, preemption) kills before the graceful save
    runs (``BrokenPipeError``) and which outlives a SIGKILLed trainer. Our saves are synchronous:
    the results queue is only ever used inside this process, so a plain thread-safe queue serves.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue):
        filesystem_async._results_queue = queue.Queue()


_ITER_DIR = re.compile(r"iter_\d{7}")


def _complete_iteration_dirs(ckpt_dir: Path) -> list[Path]:
    """Complete iteration directories (``iter_NNNNNNN`` with a ``meta.json``), oldest write first."""
    found = [p for p in ckpt_dir.iterdir() if _ITER_DIR.fullmatch(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: ((p / "meta.json").stat().st_mtime_ns, p.name))


def rotate_checkpoints(ckpt_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` most recently *written* complete iteration directories,
    never the one ``latest`` names; returns the deleted ones. Recency is write order (``meta.json``
    time), not the iteration number: a run restarted from an earlier step keeps its new saves."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    current = pointer.read_text().strip() if pointer.is_file() else None
    dirs = [p for p in _complete_iteration_dirs(ckpt_dir) if p.name != current]
    keep_others = max(keep_last - (1 if current else 0), 0)
    doomed = dirs[: len(dirs) - keep_others] if keep_others else dirs
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _state_bytes(sharded: dict[str, Any]) -> int:
    """Approximate bytes of the tensors a save writes (for 'disk full' messages)."""
    total = 0
    stack: list[Any] = [sharded]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            data = getattr(item, "data", None)
            if isinstance(data, torch.Tensor):
                total += data.numel() * data.element_size()
    return total


class _DropFilesystemErrors(logging.Filter):
    """Drops megatron-core's writer log line for a filesystem error that save_checkpoint re-raises
    as its own one-line message (full disk, read-only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(t in text for t in ("No space left", "Read-only file system", "Disk quota", "Permission denied",
                                            "unexpected pos", "PytorchStreamWriter failed", "file write failed"))


@contextlib.contextmanager
def _quiet_writer_errors():
    log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    drop = _DropFilesystemErrors()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def save_checkpoint(ckpt_dir: str | Path, model_chunks: list[torch.nn.Module], model_config: ModelConfig,
                    iteration: int, optimizer=None, scheduler=None, extra: dict[str, Any] | None = None,
                    tokenizer: str | None = None, keep_last: int | None = None,
                    seq_length: int | None = None, rank_state: dict[str, Any] | None = None) -> Path:
    """Save model (+ optimizer, scheduler, RNG, ``extra`` state) as iteration ``iteration``.

    Collective: every rank must call it. ``extra`` is JSON-serialisable run state (e.g. the data
    position ``consumed_samples``, KD schedule step). Returns the final iteration directory.
    ``keep_last`` keeps the N most recently written iteration directories (see
    :func:`rotate_checkpoints`). ``rank_state`` is this rank's own state (any torch-picklable
    object, e.g. a rollout buffer), saved per rank and read back by :func:`load_rank_state`. A failed save (e.g. disk full) removes its temporary directory and
    leaves ``latest`` and every earlier checkpoint untouched; filesystem errors are re-raised as an
    ``OSError`` whose message names the path and the space needed/free. ``tokenizer`` (a path) is
    copied into ``CKPT/tokenizer/`` and recorded relative to ``CKPT``; ``seq_length`` (the training
    sequence length) becomes ``eval``'s default context.
    """
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / iteration_dir_name(iteration)
    tmp = ckpt_dir / (final.name + ".tmp")
    _in_process_write_results()
    sharded: dict[str, Any] = {}
    try:
        if is_main_process():
            # Remnants of saves that crashed (never renamed, never pointed to by ``latest``).
            for stale in ckpt_dir.glob("iter_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in ckpt_dir.glob("iter_*.old"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
            model_config.save(ckpt_dir / MODEL_CONFIG)
            tokenizer = bundle_tokenizer(ckpt_dir, tokenizer)
        barrier()
        sharded = _model_sharded_state_dict(model_chunks)
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(sharded.get("model") or sharded)
        with _quiet_writer_errors():  # a filesystem error is reported once, as one line (below)
            dist_checkpointing.save(sharded, str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "tracker": _rng_tracker_states()}, tmp / "rng" / f"rank_{rank():05d}.pt")
        if rank_state is not None:
            (tmp / "rank_state").mkdir(exist_ok=True)
            torch.save(rank_state, tmp / "rank_state" / f"rank_{rank():05d}.pt")
        padded = _padded_vocab(model_chunks)
        barrier()
        if is_main_process():
            meta = {
                "iteration": iteration,
                "padded_vocab_size": padded,
                "tensor_parallel": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
                "model_config": model_config.to_dict(),
                "tokenizer": tokenizer,
                "seq_length": seq_length,
                "has_optimizer": optimizer is not None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "extra": extra or {},
            }
            write_json_atomic(tmp / "meta.json", meta)
            # Re-saving an iteration (e.g. the one ``latest`` names): the old copy stays complete
            # under ``iter_X.old`` until the new one is in place.
            replace_dir_atomic(tmp, final)
            with atomic_write(ckpt_dir / LATEST) as fh:
                fh.write(final.name + "\n")
            if keep_last:
                rotate_checkpoints(ckpt_dir, keep_last)
    except BaseException as exc:
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise FilesystemError(exc, "checkpoint save failed", _state_bytes(sharded) or None) from None
        # megatron-core / torch.save may wrap the OSError (or lose its errno: "unexpected pos ...").
        # (torch's CheckpointException derives from BaseException, not Exception.)
        cause = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else filesystem_cause(exc, tmp)
        if cause is not None:
            if not cause.filename:
                cause.filename = str(tmp)
            raise FilesystemError(cause, "checkpoint save failed", _state_bytes(sharded) or None) from None
        raise
    barrier()
    return final


def load_rank_state(path: str | Path) -> dict[str, Any] | None:
    """This rank's ``rank_state`` saved in the iteration directory ``path`` (None when there is none)."""
    f = Path(path) / "rank_state" / f"rank_{rank():05d}.pt"
    return torch.load(f, weights_only=False) if f.is_file() else None


def _rng_tracker_states() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker().get_states()


def load_checkpoint(ckpt_dir: str | Path, model_chunks: list[torch.nn.Module], optimizer=None, scheduler=None,
                    iteration: int | None = None, load_rng: bool = True,
                    meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load model (+ optimizer, scheduler, RNG) in place; return the checkpoint's ``meta``.

    Works with any data-parallel size. RNG states are restored only when this rank's file exists
    (same world size); otherwise the caller's seeding stands. ``meta``: the iteration's meta as
    :func:`read_checkpoint_meta` returned it earlier (a resolved plan), so it is not read again.
    """
    meta = meta if meta is not None else read_checkpoint_meta(ckpt_dir, iteration)
    source = checkpoint_source(ckpt_dir)
    if source is not None:
        if optimizer is not None:
            raise ValueError(f"{ckpt_dir} is a {source.name} directory: it holds weights only; start from it with "
                             "checkpoint.finetune=true")
        source.load(Path(ckpt_dir), model_chunks, meta)
        return meta
    path = Path(meta["path"])
    sharded = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise ValueError(f"checkpoint {path} has no optimizer state: it cannot be resumed, only loaded as weights")
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded.get("model") or sharded, is_loading=True)
    state = dist_checkpointing.load(sharded, str(path))
    if len(model_chunks) == 1:
        _unwrap(model_chunks[0]).load_state_dict(state["model"], strict=False)
    else:
        for i, m in enumerate(model_chunks):
            _unwrap(m).load_state_dict(state[f"model{i}"], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / "rng" / f"rank_{rank():05d}.pt"
    if load_rng and rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(rng["tracker"])
    return meta


def load_model_for_inference(ckpt_dir: str | Path, params_dtype: str | torch.dtype = "fp32",
                             iteration: int | None = None, meta: dict[str, Any] | None = None,
                             model_config: ModelConfig | None = None
                             ) -> tuple[torch.nn.Module, ModelConfig, dict[str, Any]]:
    """Build this rank's model stage from a checkpoint's own config and load its weights (eval mode).

    Any TP/PP (parallel_state must be initialised); returns ``(model, model_config, meta)``.
    The model is frozen (``requires_grad=False``) — the form a teacher or scorer needs. ``meta`` /
    ``model_config``: already resolved (e.g. a distill plan's TeacherSpec), not read again.
    """
    meta = meta if meta is not None else read_checkpoint_meta(ckpt_dir, iteration)
    cfg = model_config if model_config is not None else ModelConfig.from_dict(meta["model_config"])
    model = build_gpt_model(cfg, params_dtype=params_dtype, padded_vocab_size=meta["padded_vocab_size"])
    load_checkpoint(ckpt_dir, [model], iteration=None if checkpoint_source(ckpt_dir) else meta["iteration"],
                    load_rng=False, meta=meta)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg, meta
