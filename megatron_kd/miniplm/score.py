"""``miniplm score``: mean per-token NLL of every instance under the teacher and the reference.

Parallelism: both models are loaded on the same TP x PP grid (any sizes, from any checkpoint
layout) with :func:`load_model_for_inference`; the remaining data-parallel dimension splits the
work by shards (shard k of the remaining ones goes to DP rank k mod DP). Inside a model-parallel
group every rank plans the same batches; the forward runs through megatron-core's forward-only
schedule (so PP > 1 pipelines micro-batches with p2p), and on the last pipeline stage the
vocab-parallel NLL (:mod:`.nll`) is reduced per row. TP rank 0 of the last stage writes the shard.
"""
from __future__ import annotations

import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megatron_kd.miniplm import dataset_io
from megatron_kd.miniplm.batching import Step, build_microbatch, plan_steps
from megatron_kd.miniplm.instances import scoring_windows, skipped_tokens, split_instances, validate_instance_args
from megatron_kd.miniplm.nll import hidden_nll_sbv, resolve_kernel, token_nll_sbv
from megatron_kd.miniplm.store import SCORE_DTYPE, ScoreStore, config_hash, shard_bounds
from megatron_kd.utils.progress import JsonlWriter, progress
from megatron_kd.utils.artifacts import relative_ref


@dataclass
class ScoreConfig:
    """Settings of one scoring run (the CLI flags of ``megatron-kd miniplm score``)."""

    teacher: str
    """Teacher checkpoint directory (megatron-kd layout: ``latest``, ``iter_*/``)."""
    reference: str
    """Reference-model checkpoint directory (same tokenizer as the teacher)."""
    data: str
    """Indexed-dataset prefix (path without ``.bin``/``.idx``)."""
    out: str
    """Scores directory to create or resume."""
    chunk_length: Optional[int] = None
    """Tokens per instance (chunk mode) / per scoring window (document mode); None = min(1024, the
    models' max_position_embeddings + 1)."""
    mode: str = "chunk"
    """``chunk``: fixed-length chunks that do not cross documents; ``document``: whole documents."""
    min_length: int = 2
    """Instances with fewer tokens are skipped (2 = at least one prediction)."""
    micro_batch_size: int = 8
    """Rows per micro-batch at full chunk length; shorter windows get proportionally more rows."""
    num_microbatches: int = 0
    """Micro-batches per schedule call; 0 = 1 without PP, 2*PP with PP (fills the pipeline)."""
    shard_size: int = 16384
    """Instances per store shard (the unit of resume and of data-parallel work)."""
    tensor_parallel: int = 1
    """Tensor-parallel size for both models."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size for both models (must divide both layer counts)."""
    dtype: str = "auto"
    """Weights/activations dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16."""
    pad_multiple: int = 0
    """Round each batch's sequence length up to a multiple of this; 0 = auto (8 on GPU, 1 on CPU)."""
    ce_chunk_tokens: int = 2048
    """Tokens per NLL chunk (bounds the fp32 logits copy: chunk x vocab/TP x 4 bytes)."""
    nll_kernel: str = "auto"
    """Shard NLL kernel: auto (compiled on GPU, eager on CPU), eager, or compiled (torch.compile)."""
    overwrite: bool = False
    """Replace an existing scores directory of another run instead of refusing."""
    max_shards: int | None = None
    """Stop after this many shards on each DP rank (time-boxed runs; resume later)."""
    tokenizer: str | None = None
    """Tokenizer of both models (overrides the one each checkpoint carries, ``CKPT/tokenizer``)."""
    teacher_store: str | None = None
    """A logits store of this teacher over this dataset written with ``--label-logprobs --overlap 0``
    (``megatron-kd logits``): the teacher's NLL is read from it and the teacher is not run (its
    windows must be ``chunk_length`` tokens; None chunk_length = the store's). See
    :mod:`megatron_kd.miniplm.teacher_store`."""


def _model_identity(meta: dict[str, Any]) -> dict[str, Any]:
    return {"path": str(Path(meta["path"]).resolve()), "iteration": meta["iteration"],
            "config_sha256": config_hash(meta["model_config"]), "tokenizer": meta.get("tokenizer"),
            "vocab_size": meta["model_config"]["vocab_size"]}


def checkpoint_tokenizer(ckpt_dir: str | Path, meta: dict[str, Any], override: str | None = None) -> str | None:
    """The checkpoint's tokenizer (``CKPT/tokenizer``, resolved; see
    :func:`megatron_kd.training.checkpoint.checkpoint_tokenizer`), or ``override``."""
    from megatron_kd.training.checkpoint import checkpoint_tokenizer as _resolve

    ref = _resolve(ckpt_dir, meta, override)
    return str(Path(ref).resolve()) if ref and Path(ref).exists() else ref


def _tokenizer_identity(ref: str | None) -> str | None:
    """A tokenizer reference's content identity when the data package can load it, else the ref."""
    if ref is None:
        return None
    try:
        from megatron_kd.data.tokenizers import load_tokenizer  # type: ignore[import-not-found]
    except ImportError:
        return ref
    try:
        return str(load_tokenizer(ref).identity)
    except Exception:  # noqa: BLE001 - not loadable here (e.g. already an identity string)
        return ref


DEFAULT_CHUNK_LENGTH = 1024
"""``--chunk-length`` when not given (capped at the models' positions + 1)."""


def check_inputs(cfg: ScoreConfig) -> tuple[dict, dict, Any]:
    """Validate flags, checkpoints and dataset before any model is built.

    Returns ``(teacher_meta, reference_meta, dataset)``. Raises one-line ``ValueError`` /
    ``FileNotFoundError`` (tokenizer mismatch, vocab mismatch, bad lengths, missing files).
    """
    from megatron_kd.training.checkpoint import read_checkpoint_meta
    import megatron_kd.interop.source  # noqa: F401 - a Hugging Face model directory serves as a checkpoint

    if cfg.chunk_length is not None:
        validate_instance_args(cfg.chunk_length, cfg.mode, cfg.min_length)
    resolve_kernel(cfg.nll_kernel)
    if cfg.pad_multiple < 0:
        raise ValueError(f"--pad-multiple {cfg.pad_multiple} must be >= 0 (0 = auto)")
    for name in ("micro_batch_size", "shard_size", "ce_chunk_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be >= 1")
    t_meta = read_checkpoint_meta(cfg.teacher)
    r_meta = read_checkpoint_meta(cfg.reference)
    tv, rv = t_meta["model_config"]["vocab_size"], r_meta["model_config"]["vocab_size"]
    if tv != rv:
        raise ValueError(f"teacher vocab_size {tv} != reference vocab_size {rv}: both models must use the same "
                         f"tokenizer and vocabulary (train the reference with model.vocab_size={tv})")
    if cfg.tokenizer and not Path(cfg.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {cfg.tokenizer} does not exist")
    t_meta["tokenizer"] = checkpoint_tokenizer(cfg.teacher, t_meta, cfg.tokenizer)
    r_meta["tokenizer"] = checkpoint_tokenizer(cfg.reference, r_meta, cfg.tokenizer)
    tt, rt = t_meta["tokenizer"], r_meta["tokenizer"]
    for ref, ckpt in ((tt, cfg.teacher), (rt, cfg.reference)):
        if ref and not Path(ref).exists() and ("/" in ref or ref.endswith(".model")):
            raise FileNotFoundError(f"checkpoint {ckpt} names tokenizer {ref}, which does not exist here (saved "
                                    "before checkpoints carried their tokenizer, then moved): pass --tokenizer PATH")
    if tt and rt and tt != rt and _tokenizer_identity(tt) != _tokenizer_identity(rt):
        raise ValueError(f"teacher tokenizer {tt!r} differs from reference tokenizer {rt!r}: "
                         "train the reference model with the teacher's tokenizer")
    ds = dataset_io.open_dataset(cfg.data)
    from megatron_kd.data.manifest import check_token_ids

    check_token_ids(cfg.data, tv, what="dataset --data")  # sizes, header, sampled ids (before any model)
    dt = dataset_io.dataset_tokenizer(dataset_io.read_dataset_manifest(cfg.data))
    model_tok = tt or rt
    if dt and model_tok and dt != model_tok and _tokenizer_identity(dt) != _tokenizer_identity(model_tok):
        raise ValueError(f"dataset {cfg.data} was tokenized with {dt!r} but the models use {model_tok!r}: pass the dataset tokenized with the models' tokenizer (or --tokenizer if the checkpoints name the wrong one)")
    if cfg.teacher_store:
        from megatron_kd.logits import manifest as lmf
        from megatron_kd.miniplm.teacher_store import check_teacher_store

        man = check_teacher_store(cfg.teacher_store, lmf.teacher_identity(cfg.teacher, t_meta),
                                  lmf.dataset_identity(cfg.data), cfg.chunk_length)
        if cfg.chunk_length is None:
            cfg.chunk_length = man["settings"]["seq_length"]
            validate_instance_args(cfg.chunk_length, cfg.mode, cfg.min_length)
    if cfg.chunk_length is None:  # the default never exceeds the models' positions
        positions = [m["model_config"].get("max_position_embeddings") for m in (t_meta, r_meta)]
        cfg.chunk_length = min([DEFAULT_CHUNK_LENGTH] + [p + 1 for p in positions if p])
        validate_instance_args(cfg.chunk_length, cfg.mode, cfg.min_length)
    for meta, who in ((t_meta, "teacher"), (r_meta, "reference")):
        max_pos = meta["model_config"].get("max_position_embeddings") or cfg.chunk_length
        if cfg.chunk_length - 1 > max_pos:
            raise ValueError(f"--chunk-length {cfg.chunk_length} exceeds the {who}'s max_position_embeddings "
                             f"{max_pos} + 1: use a shorter chunk length")
    return t_meta, r_meta, ds


def _on_rank0_raise_everywhere(fn) -> None:
    """Run ``fn`` on rank 0; if it raises an input error, raise the same one-line error on every
    rank (instead of leaving the others waiting in a collective)."""
    import torch.distributed as dist

    from megatron_kd.runtime import is_main_process, world_size

    err: list = [None]
    if is_main_process():
        try:
            fn()
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            err[0] = (type(exc).__name__, str(exc))
    if world_size() > 1:
        dist.broadcast_object_list(err, src=0)
    if err[0] is not None:
        kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
                "FileExistsError": FileExistsError}[err[0][0]]
        raise kind(err[0][1])


def install_nll_head(model, vocab_size: int, ce_chunk: int, kernel: str = "auto", fused: bool = True) -> None:
    """Make ``model(tokens, pos, None, labels=labels)`` return per-token NLL [b, s] (fp32).

    Binds this model instance's ``compute_language_model_loss`` (the hook GPTModel calls with
    the output of its output layer when labels are given): padded vocabulary excluded, padding
    positions (label -1) skipped, and no [b, s, V] transposed copy of the logits is made. With
    ``fused`` (default) the output layer is captured for good (:mod:`megatron_kd.models.head`):
    it hands over the final hidden states and :func:`hidden_nll_sbv` runs the LM head chunk by
    chunk on the real positions only, so no [tokens, V] logits exist. Only models the scorer
    loads itself are changed.
    """
    cap = None
    if fused:
        from megatron_kd.models.head import capture_for

        cap = capture_for(model)
        if cap is not None:
            cap.active = True

    def compute_language_model_loss(self, labels, logits):
        if cap is not None:
            return hidden_nll_sbv(logits, cap.pop_weight(), labels, vocab_size, ce_chunk, kernel,
                                  cap.sequence_parallel)
        return token_nll_sbv(logits, labels, vocab_size, ce_chunk, kernel)

    model.compute_language_model_loss = types.MethodType(compute_language_model_loss, model)


def _forward_step(data_iterator, model):
    """megatron forward-step function: per-token NLL on the last stage, reduced per row."""
    mb = next(data_iterator)
    out = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])

    def reduce(nll, non_loss_data=True):
        return nll.double().sum(dim=1), mb["mask"].sum(dim=1)

    return out, reduce


def _run_model(model, microbatches: list[dict], seq_length: int):
    """Forward ``microbatches`` through one model stage; per-row (sums, counts) on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    with torch.no_grad():
        out = fb(forward_step_func=_forward_step, data_iterator=iter(microbatches), model=[model],
                 num_microbatches=len(microbatches), seq_length=seq_length,
                 micro_batch_size=microbatches[0]["tokens"].shape[0], forward_only=True,
                 collect_non_loss_data=True)
    return out  # list of (sums, counts) per micro-batch on the last stage; [] elsewhere


def _score_shard(models: list, dataset, instances: np.ndarray, cfg: ScoreConfig,
                 num_microbatches: int, device: torch.device,
                 vocab_size: int | None = None, stored: Any = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Score one shard's instances with each model. Returns (nll_sums [n_models, n], n_pred [n], tokens).

    ``stored``: a :class:`~megatron_kd.miniplm.teacher_store.StoreTeacherNLL` whose sums come first
    (the teacher's, read instead of computed), before those of ``models``.
    """
    windows, owner = scoring_windows(instances, cfg.chunk_length)
    pad = cfg.pad_multiple or (8 if device.type == "cuda" else 1)
    steps: list[Step] = plan_steps(windows["length"], cfg.micro_batch_size * cfg.chunk_length,
                                   num_microbatches, pad, cfg.chunk_length - 1)
    sums = [torch.zeros(len(windows), dtype=torch.float64, device=device) for _ in models]
    counts = torch.zeros(len(windows), dtype=torch.int64, device=device)
    for step in steps:
        mbs = [build_microbatch(dataset, windows, rows, step.seq_length, device, vocab_size, cfg.data)
               for rows in step.rows]
        for m, model in enumerate(models):
            results = _run_model(model, mbs, step.seq_length)
            for rows, (s, c) in zip(step.rows, results):
                real = torch.from_numpy(rows[rows >= 0]).to(device)
                sums[m].index_copy_(0, real, s[: len(real)])
                if m == 0:
                    counts.index_copy_(0, real, c[: len(real)])
    n = len(instances)
    window_sums = [s.cpu().numpy() for s in sums]
    if stored is not None:
        window_sums.insert(0, stored.window_sums(windows))
    inst_sums = np.zeros((len(window_sums), n), dtype=np.float64)
    for m, ws in enumerate(window_sums):
        np.add.at(inst_sums[m], owner, ws)
    n_pred = np.zeros(n, dtype=np.int64)
    np.add.at(n_pred, owner, counts.cpu().numpy())
    return inst_sums, n_pred, int(windows["length"].astype(np.int64).sum())


def score_corpus(cfg: ScoreConfig) -> dict[str, Any]:
    """Score ``cfg.data`` into the store ``cfg.out`` (create or resume). Collective over all ranks.

    Returns the store manifest (``complete`` is False when ``max_shards`` stopped the run early).
    """
    from megatron.core import parallel_state

    from megatron_kd.runtime import ParallelConfig, barrier, device, init_distributed, is_main_process
    from megatron_kd.training.checkpoint import load_model_for_inference

    t_meta, r_meta, ds = check_inputs(cfg)
    init_distributed(ParallelConfig(cfg.tensor_parallel, cfg.pipeline_parallel))
    lengths = np.asarray(ds.sequence_lengths)
    instances = split_instances(lengths, cfg.chunk_length, cfg.mode, cfg.min_length)
    identity = {} if not is_main_process() else {
        "teacher": _model_identity(t_meta), "reference": _model_identity(r_meta),
        "dataset": {**dataset_io.dataset_identity(cfg.data, ds),
                    "prefix_relative": relative_ref(cfg.data, cfg.out)},
        "instances": {"mode": cfg.mode, "chunk_length": cfg.chunk_length, "min_length": cfg.min_length},
        "shard_size": cfg.shard_size, "num_instances": int(len(instances)),
        "skipped_tokens": skipped_tokens(lengths, instances),
        "tokenizer": t_meta.get("tokenizer") or r_meta.get("tokenizer"),
        "teacher_nll": ("logits store " + str(Path(cfg.teacher_store).resolve()) if cfg.teacher_store
                        else "teacher forward"),
        "run": {k: v for k, v in asdict(cfg).items() if k not in ("teacher", "reference", "data", "out",
                                                                           "tokenizer")},
    }
    store = ScoreStore(cfg.out)
    _on_rank0_raise_everywhere(lambda: store.create_or_resume(identity, cfg.overwrite))
    man = store.manifest()
    num_shards = man["num_shards"]
    done = store.completed_shards(num_shards, cfg.shard_size, len(instances))
    barrier()  # every rank has listed the shards before anyone writes a new one
    remaining = [k for k in range(num_shards) if k not in done]
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = remaining[dp_rank::dp_size][: cfg.max_shards]
    if mine:
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if torch.cuda.is_available() else "fp32")
        stored = None
        if cfg.teacher_store:  # the teacher's NLL is read from its logits store: only the reference runs
            from megatron_kd.logits.manifest import read_store_manifest
            from megatron_kd.miniplm.teacher_store import StoreTeacherNLL

            stored = StoreTeacherNLL(cfg.teacher_store, read_store_manifest(cfg.teacher_store))
            models = []
        else:
            models = [load_model_for_inference(cfg.teacher, dtype)[0]]
        models.append(load_model_for_inference(cfg.reference, dtype)[0])
        vocab = t_meta["model_config"]["vocab_size"]
        for model in models:
            install_nll_head(model, vocab, cfg.ce_chunk_tokens, cfg.nll_kernel)
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        n_mb = cfg.num_microbatches or (2 * pp if pp > 1 else 1)
        writer = (parallel_state.is_pipeline_last_stage()
                  and parallel_state.get_tensor_model_parallel_rank() == 0)
        metrics = JsonlWriter(Path(cfg.out) / "metrics.jsonl")
        todo_tokens = sum(int(instances["length"][slice(*shard_bounds(k, cfg.shard_size, len(instances)))]
                              .astype(np.int64).sum()) for k in remaining)
        bar = progress(todo_tokens, "miniplm score", unit="tok")
        dev = device()
        for k in mine:
            start, end = shard_bounds(k, cfg.shard_size, len(instances))
            t0, c0 = time.perf_counter(), time.process_time()
            sums, n_pred, tokens = _score_shard(models, ds, instances[start:end], cfg, n_mb, dev, vocab, stored)
            if writer:
                rows = np.empty(end - start, dtype=SCORE_DTYPE)
                rows["instance"] = np.arange(start, end)
                for f in ("doc", "offset", "length"):
                    rows[f] = instances[f][start:end]
                rows["n_pred"] = n_pred
                denom = np.maximum(n_pred, 1)
                rows["nll_teacher"], rows["nll_ref"] = sums[0] / denom, sums[1] / denom
                store.write_shard(k, rows)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            bar.update(tokens * dp_size)  # rank 0's progress stands for every DP rank
            metrics.write({"shard": k, "instances": end - start, "tokens": tokens, "seconds": round(dt, 4), "cpu_seconds": round(cpu, 4),
                           "tokens_per_s": round(tokens / max(dt, 1e-9), 1), "dp_size": dp_size})
        bar.close()
        metrics.close()
    barrier()
    if is_main_process() and len(store.completed_shards(num_shards, cfg.shard_size, len(instances))) == num_shards:
        store.finalize(_summary(store, num_shards))
    barrier()
    return store.manifest()


def _summary(store: ScoreStore, num_shards: int) -> dict[str, Any]:
    """Corpus-level means written into the final manifest (token-weighted)."""
    from megatron_kd.miniplm.store import shard_name

    parts = [np.load(store.root / shard_name(k)) for k in range(num_shards)]
    rows = np.concatenate(parts)
    w = rows["n_pred"].astype(np.float64)
    total = max(w.sum(), 1.0)
    return {"instances": int(len(rows)), "predicted_tokens": int(w.sum()),
            "mean_nll_teacher": float((rows["nll_teacher"] * w).sum() / total),
            "mean_nll_ref": float((rows["nll_ref"] * w).sum() / total)}
