"""``megatron-kd logits``: run a teacher over an indexed dataset and write the logits store.

Parallelism: the teacher runs at any TP/PP through megatron-core's forward-only schedule; the
data-parallel replicas take disjoint shards. Inside a model-parallel group every rank walks the
same shards and micro-batches; the last pipeline stage's TP rank 0 encodes and writes them (in a
background thread, overlapping the next forward).

Resumable and idempotent: a shard is complete when its record ``shards/shard_i.json`` exists (it
is written after the shard file was renamed into place); a new run recomputes only the missing
shards, and the same inputs always give the same plan and the same bytes.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from megatron_kd.logits import codec, manifest as mf
from megatron_kd.logits.selection import DRAWS_ENCODING, METHODS, TARGET_KINDS, Selection, TargetSelector
from megatron_kd.logits.selection import label_logprobs, max_entries, store_layout
from megatron_kd.logits.shard import ShardWriter
from megatron_kd.logits.windows import MicroBatch, document_windows, plan_micro_batches, plan_shards
from megatron_kd.models.head import cache_chunks
from megatron_kd.utils.io import read_json, write_json_atomic


@dataclass
class PrecomputeConfig:
    """Settings of one precompute run (CLI flags of ``megatron-kd logits``)."""

    teacher: str
    """Teacher checkpoint directory (``CKPT/latest`` + ``iter_*``)."""
    data: str
    """Indexed dataset prefix (``PREFIX.bin``/``PREFIX.idx``)."""
    out: str
    """Store directory to create or resume."""
    top_p: float = 0.95
    """Nucleus mass kept per token (0 < top_p <= 1)."""
    top_k: int = 100
    """Cap on kept ids per token (1..255)."""
    seq_length: Optional[int] = None
    """Teacher window in tokens (students may train on any sequence length up to this); None =
    min(1024, the teacher's max_position_embeddings)."""
    overlap: int = 0
    """Context tokens a window shares with the previous one of the same document."""
    micro_batch_size: int = 4
    """Rows of ``seq_length`` tokens per teacher forward (shorter windows get more rows)."""
    shard_tokens: int = 1 << 22
    """Dataset tokens per shard (the unit of resumption and of data-parallel work)."""
    value_step: float = 1.0 / 16
    """Log-prob quantisation step in nats (error <= step/2; KL distortion ~ step^2/24)."""
    dtype: str | None = None
    """Teacher weights dtype: fp32 | bf16 | fp16 (default bf16 on GPU, fp32 on CPU)."""
    tensor_parallel: int = 1
    """Teacher tensor-parallel size."""
    pipeline_parallel: int = 1
    """Teacher pipeline-parallel size."""
    iteration: int | None = None
    """Checkpoint iteration (default: the one ``latest`` names)."""
    max_shards: int | None = None
    """Stop after this many shards per data-parallel rank in this run (time-boxed runs)."""
    tokenizer: str | None = None
    """Teacher tokenizer (default: the one the checkpoint carries); checked against the dataset's."""
    method: str = "topk"
    """What is kept per position: topk (top-p/top-k log-probs), sample (N i.i.d. teacher draws as
    (id, count) pairs: unbiased weighted targets) or topk+sample (exact top-p/top-k head + N draws
    from the rest). See docs/logits_store.md."""
    num_samples: int = 24
    """sample / topk+sample: draws N per position."""
    proposal_temperature: float = 1.0
    """sample / topk+sample: draws come from r ∝ p^(1/tau) (1 = the teacher); weights w ∝ c p / r."""
    seed: int = 1234
    """Sampling seed (draws and audit positions are a hash of seed and dataset position)."""
    audit_fraction: float = 0.0
    """Fraction of positions whose dense teacher distribution is kept (for ``--stats``; 0 = none)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored in the manifest."""
    byte_key_tokenizer: str | None = None
    """Tokenizer of --data for the byte-offset key (cross-tokenizer students, docs/cross_tokenizer.md);
    default: the one the dataset manifest names, else the teacher's; "none" = no byte key."""
    label_logprobs: bool = False
    """Also keep the teacher's log-prob of the actual next token at every position (float32 per
    position, ``shards/shard_i.labels.npy``): the teacher NLL that ``megatron-kd miniplm score
    --teacher-store`` reads instead of running the teacher a second time."""

    def selector(self) -> TargetSelector:
        """The per-chunk target selection of this run."""
        return TargetSelector(self.method, self.top_p, self.top_k, self.num_samples, self.proposal_temperature,
                              self.seed, self.audit_fraction)

    def validate(self, vocab_size: int | None = None) -> None:
        """One-line ``ValueError`` for out-of-range settings (``vocab_size``: the teacher's, when known)."""
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method != "topk":
            if self.num_samples < 1:
                raise ValueError(f"--num-samples {self.num_samples} must be >= 1 (draws per position)")
            if not (np.isfinite(self.proposal_temperature) and self.proposal_temperature > 0):
                raise ValueError(f"--proposal-temperature {self.proposal_temperature} must be a finite number > 0")
            if vocab_size is not None:
                if self.method == "topk+sample" and self.top_k >= vocab_size:
                    raise ValueError(f"--top-k {self.top_k} leaves no tail to sample in a vocabulary of {vocab_size}: "
                                     "lower --top-k or use --method topk")
                most = max_entries(self.method, self.top_k, self.num_samples, vocab_size)
                if most > codec.MAX_COUNT:
                    raise ValueError(f"--method {self.method} with --num-samples {self.num_samples} can keep {most} "
                                     f"entries per position, the store holds at most {codec.MAX_COUNT}: lower "
                                     "--num-samples (or --top-k)")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"--audit-fraction {self.audit_fraction} must be in [0, 1]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1]")
        if not 1 <= self.top_k <= codec.MAX_COUNT:
            raise ValueError(f"--top-k {self.top_k} must be in 1..{codec.MAX_COUNT}")
        if self.seq_length is not None and (self.seq_length < 2 or not 0 <= self.overlap < self.seq_length):
            raise ValueError(f"need --seq-length >= 2 and 0 <= --overlap < --seq-length (got {self.seq_length}, "
                             f"{self.overlap})")
        if not 0.0 < self.value_step <= 1.0:
            raise ValueError(f"--value-step {self.value_step} must be in (0, 1] nats")
        if self.micro_batch_size < 1 or self.shard_tokens < 1:
            raise ValueError("--micro-batch-size and --shard-tokens must be >= 1")


def _store_header(cfg: PrecomputeConfig, teacher: dict, dataset: dict, vocab: int) -> dict[str, Any]:
    sel = cfg.selector()
    sampled = cfg.method != "topk"
    method = {"method": cfg.method, "target_kind": TARGET_KINDS[cfg.method],
              "max_entries": max_entries(cfg.method, cfg.top_k, cfg.num_samples, vocab),
              "audit_fraction": cfg.audit_fraction, "seed": cfg.seed}
    if sampled:
        method.update(num_samples=cfg.num_samples, proposal_temperature=cfg.proposal_temperature,
                      store_logprobs=sel.store_logprobs, sample_block=sel.block)
    if cfg.label_logprobs:  # only when on: stores written before the option keep their exact header
        method["label_logprobs"] = True
    return {
        "format": mf.FORMAT, "version": mf.VERSION, "complete": False,
        "settings": {"encoding": DRAWS_ENCODING if sampled else codec.ENCODING, "vocab_size": vocab,
                     "id_bits": codec.id_bits_for(vocab),
                     "value_step": cfg.value_step, "top_p": cfg.top_p, "top_k": cfg.top_k,
                     "seq_length": cfg.seq_length, "overlap": cfg.overlap, "shard_tokens": cfg.shard_tokens,
                     **method,
                     "logprob_normalisation": "log_softmax over the full vocabulary at temperature 1",
                     "target": "position (d, o) -> distribution of token o+1 of document d"},
        "teacher": teacher, "dataset": dataset, "tokenizer": dataset.get("tokenizer") or
        ({"identity": None, "path": teacher.get("tokenizer")} if teacher.get("tokenizer") else None),
        "extra": cfg.extra,
    }


def _check_dataset_against_teacher(cfg: PrecomputeConfig, meta: dict, vocab_size: int) -> None:
    """The dataset's files are sound, its token ids fit the teacher's vocabulary (sampled), and it
    was tokenized with the teacher's tokenizer (as distill and miniplm score require)."""
    from megatron_kd.data.manifest import check_token_ids, check_tokenizer, dataset_paths, read_dataset_manifest
    from megatron_kd.interop.convert import checkpoint_tokenizer

    prefix = mf.strip_dataset_prefix(cfg.data)
    check_token_ids(prefix, vocab_size, what="dataset --data")
    ref = checkpoint_tokenizer(cfg.teacher, meta, cfg.tokenizer)
    if not ref or not Path(ref).exists() or not dataset_paths(prefix)["manifest"].is_file():
        return
    from megatron_kd.data.tokenizers import load_tokenizer

    try:
        tok = load_tokenizer(ref)
    except Exception as exc:  # noqa: BLE001 - any tokenizer that does not load is a bad input here
        raise ValueError(f"the teacher {cfg.teacher} names tokenizer {ref}, which does not load "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}): "
                         "record a SentencePiece .model or HF tokenizer directory with the teacher") from None
    check_tokenizer(read_dataset_manifest(prefix), tok, what="dataset --data")


DEFAULT_SEQ_LENGTH = 1024
"""Teacher window when ``--seq-length`` is not given (capped at the teacher's positions)."""


def _check_inputs(cfg: PrecomputeConfig) -> tuple[dict, dict, Any]:
    """Everything that can fail cheaply, before the teacher is loaded."""
    from megatron_kd.models.config import ModelConfig
    from megatron_kd.training.checkpoint import read_checkpoint_meta
    import megatron_kd.interop.source  # noqa: F401 - a Hugging Face model directory serves as a checkpoint

    cfg.validate()
    meta = read_checkpoint_meta(cfg.teacher, cfg.iteration)
    mcfg = ModelConfig.from_dict(meta["model_config"])
    codec.id_bits_for(mcfg.vocab_size)
    if cfg.seq_length is None:  # the default window never exceeds the teacher's positions
        cfg.seq_length = min(DEFAULT_SEQ_LENGTH, mcfg.max_position_embeddings)
    cfg.validate(mcfg.vocab_size)
    if cfg.seq_length > mcfg.max_position_embeddings:
        raise ValueError(f"--seq-length {cfg.seq_length} exceeds the teacher's max_position_embeddings "
                         f"{mcfg.max_position_embeddings}: lower --seq-length")
    _check_dataset_against_teacher(cfg, meta, mcfg.vocab_size)
    from megatron_kd.utils.artifacts import relative_ref

    # Paths also recorded relative to the store (copy store + dataset + teacher together and the
    # relative ones still point at them); identities, not paths, decide compatibility.
    teacher = {**mf.teacher_identity(cfg.teacher, meta), "checkpoint_relative": relative_ref(cfg.teacher, cfg.out)}
    dataset = {**mf.dataset_identity(cfg.data), "prefix_relative": relative_ref(mf.strip_dataset_prefix(cfg.data),
                                                                                cfg.out)}
    header = _store_header(cfg, teacher, dataset, mcfg.vocab_size)
    existing = Path(cfg.out) / mf.MANIFEST
    if existing.is_file():
        mf.check_resume(mf.read_store_manifest(cfg.out, require_complete=False), header, Path(cfg.out))
    elif Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
        raise FileExistsError(f"--out {cfg.out} exists and is not a logits store: choose an empty or new directory")
    return header, meta, mcfg


class _BatchSource:
    """Builds the input tensors and the target-position index of micro-batches."""

    def __init__(self, dataset, vocab_size: int, device: torch.device, doc_start: np.ndarray,
                 prefix: str | None = None, labels: bool = False):
        self.ds, self.vocab, self.device, self.doc_start = dataset, vocab_size, device, doc_start
        self.prefix, self.labels = prefix, labels

    def __call__(self, mb: MicroBatch) -> dict[str, Any]:
        tokens = np.zeros((mb.rows, mb.length), dtype=np.int64)
        sel, positions, labels = [], [], []
        for r, w in enumerate(mb.windows):
            if self.labels:  # a window ends before its document's last token: token `end` exists
                row = self.ds.get(w.doc, offset=w.start, length=w.length + 1)
                tokens[r, :w.length] = row[:-1]
                labels.append(row[w.emit - w.start + 1:])
            else:
                tokens[r, :w.length] = self.ds.get(w.doc, offset=w.start, length=w.length)
            sel.append(r * mb.length + np.arange(w.emit - w.start, w.length))
            positions.append(self.doc_start[w.doc] + np.arange(w.emit, w.end))
        if tokens.max(initial=0) >= self.vocab or tokens.min(initial=0) < 0:
            from megatron_kd.data.manifest import check_batch_token_ids

            # Names the .bin whose sha256 no longer matches its manifest (flipped bytes) before
            # blaming another tokenizer.
            check_batch_token_ids(tokens, self.vocab, self.prefix, what="dataset --data")
        pos = torch.arange(mb.length, device=self.device).unsqueeze(0).expand(mb.rows, -1)
        out = {"tokens": torch.from_numpy(tokens).to(self.device), "position_ids": pos,
               "sel": torch.from_numpy(np.concatenate(sel)).to(self.device),
               "positions": torch.from_numpy(np.concatenate(positions).astype(np.int64)).to(self.device)}
        if self.labels:  # the actual next token of every emitted position, in ``sel`` order
            out["labels"] = torch.from_numpy(np.concatenate(labels).astype(np.int64)).to(self.device)
        return out


def _collect(batch: dict, output: torch.Tensor, non_loss_data: bool = True, *, vocab: int,
             selectors: list[TargetSelector], keep: bool, forward_only: bool, labels: bool = False, head: Any = None):
    """Select the targets of the emitted positions of one micro-batch, for every store of the pass.

    ``output``: the teacher's logits [b, s, V/tp], or with ``head = (weight, sequence_parallel)``
    its final hidden states [b, s, H] (``[b, s/tp, H]`` sequence-parallel, see
    :mod:`megatron_kd.models.head`): then the LM head runs here, on the emitted positions only and
    chunk by chunk, and the [tokens, V] logits are never held whole. Each chunk of logits serves
    every selector (one store each) and, with ``labels``, the label log-probs.

    Returns ``(selections, label_logprobs)`` on writing ranks (``label_logprobs``: float32 numpy
    [emitted positions] or None), None elsewhere.
    """
    if forward_only and head is None:
        return None  # the "model" baseline: the model's forward made the full logits
    if head is not None:
        weight, sequence_parallel = head
        if sequence_parallel:
            from megatron_kd.losses.fused_linear import gather_dim0
            from megatron_kd.losses.vocab_parallel import resolve_tp

            output = gather_dim0(output.transpose(0, 1), resolve_tp()).transpose(0, 1)
    flat = output.reshape(-1, output.shape[-1])
    if forward_only:  # the "logits" baseline: the emitted positions' logits in one matmul, nothing else
        torch.matmul(flat.index_select(0, batch["sel"]).to(weight.dtype), weight.t())
        return None
    width = weight.shape[0] if head is not None else flat.shape[-1]
    chunk = max(1, (1 << 26) // width)  # bounds the chunk's logits (~256 MiB fp32)
    n = len(batch["sel"])
    # With the head here, on CPU: cache-sized chunks (the selection reads the logits while cached).
    bounds = (cache_chunks(n, chunk, width, flat.device) if head is not None
              else [(c0, min(c0 + chunk, n)) for c0 in range(0, n, chunk)])
    parts: list[list[Selection]] = [[] for _ in selectors]
    label_parts = []
    for c0, c1 in bounds:
        rows = flat.index_select(0, batch["sel"][c0:c1])
        if head is not None:
            rows = torch.matmul(rows.to(weight.dtype), weight.t())
        for selector, out in zip(selectors, parts):
            part = selector(rows, vocab, batch["positions"][c0:c1], keep=keep)
            if keep:
                out.append(part)
        if labels:
            label_parts.append(label_logprobs(rows, vocab, batch["labels"][c0:c1]))
    if not keep:
        return None
    lps = torch.cat(label_parts).cpu().numpy() if labels else None
    return [Selection.concat(p) for p in parts], lps


def _forward_calls(model, calls, source: _BatchSource, collect, pp: int, fused_head: bool = True):
    """Yield ``(micro_batch, result)`` for every micro-batch (results only on the last stage).

    ``fused_head``: the last stage's output layer is captured (:mod:`megatron_kd.models.head`) and
    :func:`_collect` runs it on the emitted positions only (off for the ``forward_only="model"``
    baseline: the model's own forward with full logits).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_kd.models.head import capture_for

    fb = get_forward_backward_func()
    cap = capture_for(model) if fused_head else None
    for mbs in calls:
        batches = [source(mb) for mb in mbs]
        it = iter(batches)

        def step(data_iterator, model_):
            b = next(data_iterator)
            if cap is None:
                return model_(b["tokens"], b["position_ids"], None), partial(collect, b)
            cap.active = True
            try:
                out = model_(b["tokens"], b["position_ids"], None)
            finally:
                cap.active = False
            return out, partial(collect, b, head=(cap.pop_weight(), cap.sequence_parallel))

        with torch.no_grad():
            res = fb(forward_step_func=step, data_iterator=it, model=[model], num_microbatches=len(mbs),
                     seq_length=mbs[0].length, micro_batch_size=mbs[0].rows, forward_only=True,
                     collect_non_loss_data=True)
        res = res if res else [None] * len(mbs)
        yield from zip(mbs, res)


def _write_chunk(writer: ShardWriter, result: Selection, mb: MicroBatch, token_lo: np.ndarray, layout: codec.Layout,
                 audit: list):
    seg_len = np.array([w.end - w.emit for w in mb.windows], dtype=np.int64)
    starts = np.array([token_lo[w.doc] + w.emit for w in mb.windows], dtype=np.int64)
    writer.add(codec.encode(result.counts, result.ids, result.logprobs, seg_len, layout.id_bits, layout.value_step,
                            draws=result.draws, layout=layout), starts, seg_len)
    if len(result.audit_positions):
        audit.append((result.audit_positions, result.audit_logprobs))


def _put_labels(labels: np.ndarray, lps: np.ndarray, mb: MicroBatch, token_lo: np.ndarray) -> None:
    """Scatter one micro-batch's label log-probs (emitted positions, window order) into the shard's array."""
    at = 0
    for w in mb.windows:
        n = w.end - w.emit
        lo = token_lo[w.doc] + w.emit
        labels[lo:lo + n] = lps[at:at + n]
        at += n


def _save_labels(store: Path, index: int, labels: np.ndarray) -> dict[str, Any]:
    """Write shard ``index``'s label log-probs atomically; returns its record keys."""
    from megatron_kd.utils.io import sha256_file

    path = mf.labels_file(store, index)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, labels.astype(np.float32))
    tmp.replace(path)
    return {"labels_file": path.name, "labels_sha256": sha256_file(path)}


SHARED_FIELDS = ("teacher", "data", "seq_length", "overlap", "micro_batch_size", "shard_tokens", "dtype",
                 "tensor_parallel", "pipeline_parallel", "iteration", "max_shards", "tokenizer")
"""Settings every store of one teacher pass (:func:`precompute_stores`) must share: they fix the
teacher, its windows and its micro-batches."""


def _check_pass(cfgs: list[PrecomputeConfig]) -> None:
    """One-line errors for stores that cannot share one teacher pass."""
    if not cfgs:
        raise ValueError("precompute_stores needs at least one store")
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for name in SHARED_FIELDS:
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(f"stores written in one teacher pass must share {name}: {cfg.out} has "
                                 f"{getattr(cfg, name)!r}, {first.out} has {getattr(first, name)!r}")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) != len(outs):
        raise ValueError(f"two stores of one teacher pass have the same --out ({', '.join(c.out for c in cfgs)}): "
                         "give each its own directory")


@dataclass
class _StoreRun:
    """One store of a teacher pass: its settings, header and the shard being written."""

    cfg: PrecomputeConfig
    header: dict[str, Any]
    layout: codec.Layout
    writer: Optional[ShardWriter] = None
    audit: list = field(default_factory=list)

    @property
    def path(self) -> Path:
        return Path(self.cfg.out)


def precompute_logits(cfg: PrecomputeConfig, forward_only: bool | str = False) -> dict[str, Any]:
    """Compute (or resume) the store ``cfg.out``. Collective over all ranks (torchrun or single).

    ``forward_only`` runs the same teacher forwards on the same micro-batches and writes nothing
    (throughput baselines): ``True`` / ``"logits"`` = a plain teacher forward that ends with the
    logits of the emitted positions (the same captured output layer, one matmul, no selection);
    ``"model"`` = the model's own forward (logits of every position, padding included, in
    ``[b, s, V]`` layout). Returns a summary: shards written by this rank's group, positions,
    seconds and CPU seconds of the shard loop (``process_time``: every thread of the process,
    the encoder's included), ``complete``.
    """
    return precompute_stores([cfg], forward_only)[0]


def precompute_stores(cfgs: list[PrecomputeConfig], forward_only: bool | str = False) -> list[dict[str, Any]]:
    """Compute (or resume) several stores of the same teacher over the same data in ONE teacher pass.

    The stores may differ in what they keep (``method``, ``top_p``, ``top_k``, ``num_samples``,
    ``seed``, ``audit_fraction``, ``value_step``, ``label_logprobs``, ...) but share
    :data:`SHARED_FIELDS`; each chunk of teacher logits is computed once and serves every store.
    Each store stays a complete store on its own (manifest, shard records, resume): a shard is
    computed when any store lacks it, and written only to the stores that lack it. Every store is
    byte-identical to the one :func:`precompute_logits` writes alone. Returns one summary per store
    (the pass's seconds and positions; ``complete`` per store).
    """
    if forward_only not in (False, True, "logits", "model"):
        raise ValueError(f"forward_only={forward_only!r}: use False, True / 'logits' or 'model'")
    cfgs = list(cfgs)
    _check_pass(cfgs)
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_kd.runtime import ParallelConfig, barrier, device, init_distributed, is_main_process
    from megatron_kd.training.checkpoint import load_model_for_inference
    from megatron_kd.utils.progress import JsonlWriter, progress

    runs = []
    for cfg in cfgs:
        if cfg.seq_length is None:  # the first store's default window serves the pass
            cfg.seq_length = cfgs[0].seq_length
        header, meta, mcfg = _check_inputs(cfg)
        runs.append(_StoreRun(cfg, header, store_layout(header["settings"])))
    lead = cfgs[0]
    init_distributed(ParallelConfig(lead.tensor_parallel, lead.pipeline_parallel))
    barrier()  # every rank has checked the existing stores before rank 0 writes to them
    ds = IndexedDataset(mf.strip_dataset_prefix(lead.data), mmap=True)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_start = np.concatenate([[0], np.cumsum(lengths)])
    shards = plan_shards(lengths, lead.shard_tokens)
    if is_main_process() and not forward_only:
        for run in runs:
            if not (run.path / mf.MANIFEST).is_file():
                (run.path / mf.SHARDS).mkdir(parents=True, exist_ok=True)
                np.save(run.path / mf.DOCUMENTS, doc_start)  # before the manifest: it marks a started store
                write_json_atomic(run.path / mf.MANIFEST, {**run.header, "num_documents": len(lengths),
                                                           "num_tokens": int(doc_start[-1]),
                                                           "num_shards": len(shards)})
    barrier()
    lacking = {i: ([run for run in runs] if forward_only
                   else [run for run in runs if not mf.shard_record_file(run.path, i).is_file()])
               for i in range(len(shards))}
    todo = [i for i in range(len(shards)) if lacking[i]]
    barrier()  # all ranks read the same set of finished shards before any new one appears
    dtype = lead.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    model, _, _ = load_model_for_inference(lead.teacher, dtype, lead.iteration)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = todo[dp_rank::dp_size][: lead.max_shards]
    writer_rank = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and not forward_only
    vocab = mcfg.vocab_size
    want_labels = any(run.cfg.label_logprobs for run in runs) and not forward_only
    source = _BatchSource(ds, vocab, device(), doc_start, mf.strip_dataset_prefix(lead.data), labels=want_labels)
    plans = {i: [w for d in range(*shards[i]) for w in document_windows(d, int(lengths[d]), lead.seq_length,
                                                                          lead.overlap)] for i in mine}
    total = sum(w.end - w.emit for i in mine for w in plans[i])
    bar = progress(total, "teacher logits", unit="tok")
    metrics = [JsonlWriter(None if forward_only else run.path / "metrics.jsonl") for run in runs]
    pool = ThreadPoolExecutor(max_workers=1)  # encoding + writing overlap the next forward
    pending: list[Future] = []
    done_positions, t_start, c_start = 0, time.perf_counter(), time.process_time()
    active: list[_StoreRun] = []
    try:
        for i in mine:
            t0 = time.perf_counter()
            lo, hi = shards[i]
            active = lacking[i]
            labels = want_labels and any(run.cfg.label_logprobs for run in active)
            for run in active:
                run.audit = []
                run.writer = (ShardWriter(mf.shard_file(run.path, i), int(doc_start[hi] - doc_start[lo]))
                              if writer_rank else None)
            shard_labels = (np.full(int(doc_start[hi] - doc_start[lo]), np.nan, dtype=np.float32)
                            if labels and writer_rank else None)
            collect = partial(_collect, vocab=vocab, selectors=[run.cfg.selector() for run in active],
                              keep=writer_rank, forward_only=forward_only, labels=labels)
            calls = plan_micro_batches(plans[i], lead.seq_length, lead.micro_batch_size,
                                       fixed_rows=lead.pipeline_parallel > 1)
            token_lo = doc_start - doc_start[lo]
            for mb, result in _forward_calls(model, calls, source, collect, lead.pipeline_parallel,
                                             fused_head=forward_only != "model"):
                if writer_rank:
                    selections, lps = result
                    for run, sel in zip(active, selections):
                        pending.append(pool.submit(_write_chunk, run.writer, sel, mb, token_lo, run.layout, run.audit))
                    if shard_labels is not None:
                        _put_labels(shard_labels, lps, mb, token_lo)
                    while len(pending) > 4 * len(active):
                        pending.pop(0).result()
                n = sum(w.end - w.emit for w in mb.windows)
                bar.update(n)
                done_positions += n
            if writer_rank:
                for f in pending:
                    f.result()
                pending.clear()
                for run in active:
                    _finish_shard(run, i, lo, hi, doc_start, shard_labels if run.cfg.label_logprobs else None)
            dt = time.perf_counter() - t0
            for run, m in zip(runs, metrics):
                if run in active:
                    m.write({"shard": i, "positions": int(doc_start[hi] - doc_start[lo]), "seconds": round(dt, 3),
                             "stores_in_pass": len(active)})
    except BaseException:
        for f in pending:
            f.cancel()
        for run in active:
            if run.writer is not None:
                run.writer.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        for m in metrics:
            m.close()
    seconds = time.perf_counter() - t_start
    cpu_seconds = time.process_time() - c_start
    barrier()
    summaries = []
    for run in runs:
        complete = False
        if not forward_only:
            complete = all(mf.shard_record_file(run.path, i).is_file() for i in range(len(shards)))
            if complete and is_main_process():
                finalize_manifest(run.path)
                _write_byte_key(run.cfg, meta)
        summaries.append({"shards": sum(1 for i in mine if run in lacking[i]), "positions": done_positions,
                          "seconds": seconds, "positions_per_s": done_positions / max(seconds, 1e-9),
                          "complete": complete, "cpu_seconds": cpu_seconds,
                          "cpu_positions_per_s": done_positions / max(cpu_seconds, 1e-9), "stores_in_pass": len(runs)})
    barrier()
    return summaries


def _finish_shard(run: _StoreRun, i: int, lo: int, hi: int, doc_start: np.ndarray,
                  labels: np.ndarray | None) -> None:
    """Close store ``run``'s shard ``i``: audit sample, label log-probs, then the record (its completion marker)."""
    audit_info = write_audit(run.path, i, run.audit) if run.cfg.audit_fraction > 0 else {}
    label_info = _save_labels(run.path, i, labels) if labels is not None else {}
    info = run.writer.close()
    hist = np.bincount(np.asarray(run.writer.count), minlength=1)
    write_json_atomic(mf.shard_record_file(run.path, i), {
        "index": i, "file": mf.shard_file(run.path, i).name, "doc_lo": lo, "doc_hi": hi,
        "token_lo": int(doc_start[lo]), "token_hi": int(doc_start[hi]), **info,
        "count_histogram": hist.tolist(), **audit_info, **label_info})
    run.writer = None


def _write_byte_key(cfg: PrecomputeConfig, meta: dict) -> None:
    """The byte-offset key (megatron_kd.logits.byte_key) when the data's tokenizer has byte spans."""
    from megatron_kd.interop.convert import checkpoint_tokenizer
    from megatron_kd.logits.byte_key import byte_table, default_key_tokenizer, write_byte_key

    if cfg.byte_key_tokenizer == "none":
        return
    tok = cfg.byte_key_tokenizer or default_key_tokenizer(cfg.data, checkpoint_tokenizer(cfg.teacher, meta,
                                                                                              cfg.tokenizer))
    if tok is None:
        return
    if cfg.byte_key_tokenizer:
        write_byte_key(cfg.out, cfg.data, tok)
        return
    try:
        byte_table(tok, "the data's")
        write_byte_key(cfg.out, cfg.data, tok)
    except (ValueError, OSError) as exc:  # auto: the store still serves the teacher's tokenizer
        print(f"megatron-kd logits: no byte-offset key ({str(exc).splitlines()[0]})", flush=True)


def write_audit(store: Path, index: int, audit: list) -> dict[str, Any]:
    """Write shard ``index``'s audit sample (positions + dense teacher log-probs); returns its record keys."""
    from megatron_kd.utils.io import sha256_file

    pos = np.concatenate([a[0] for a in audit]) if audit else np.zeros(0, np.int64)
    lps = np.concatenate([a[1] for a in audit]) if audit else np.zeros((0, 0), np.float32)
    order = np.argsort(pos, kind="stable")
    path = mf.audit_file(store, index)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, positions=pos[order], logprobs=lps[order].astype(np.float32))
    tmp.replace(path)
    return {"audit_file": path.name, "audit_positions": int(len(pos)), "audit_sha256": sha256_file(path)}


def finalize_manifest(store: str | Path) -> dict[str, Any]:
    """Fold the shard records into ``manifest.json`` (``complete: true``) with store statistics."""
    from megatron_kd.utils.io import sha256_file

    store = Path(store)
    man = mf.read_store_manifest(store, require_complete=False)
    recs = [read_json(mf.shard_record_file(store, i), "shard record") for i in range(man["num_shards"])]
    hist = np.zeros(256, dtype=np.int64)
    for r in recs:
        hist[: len(r["count_histogram"])] += r["count_histogram"]
    entries = sum(r["entries"] for r in recs)
    targets = sum(r["targets"] for r in recs)
    data_bytes = sum(r["bytes"] for r in recs)
    man.update(complete=True, shards=[{k: v for k, v in r.items() if k != "count_histogram"} for r in recs],
               documents_sha256=sha256_file(store / mf.DOCUMENTS),
               stats={"positions": man["num_tokens"], "targets": targets, "entries": entries,
                      "mean_entries_per_target": entries / max(targets, 1), "bytes": data_bytes,
                      "bytes_per_target": data_bytes / max(targets, 1), "bytes_per_entry": data_bytes / max(entries, 1),
                      "count_histogram": np.trim_zeros(hist, "b").tolist()})
    write_json_atomic(store / mf.MANIFEST, man)
    return man
