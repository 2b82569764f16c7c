"""Settings of ``megatron-kd logits`` and the checks that run before a teacher is loaded: one store's
flags (:class:`PrecomputeConfig`), its manifest header, the dataset / teacher / resume checks, and
which stores can share one teacher pass (:data:`SHARED_FIELDS`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megatron_kd.logits import codec, manifest as mf
from megatron_kd.logits.selection import DRAWS_ENCODING, METHODS, TARGET_KINDS, TargetSelector, max_entries


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


def check_inputs(cfg: PrecomputeConfig) -> tuple[dict, dict, Any]:
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


SHARED_FIELDS = ("teacher", "data", "seq_length", "overlap", "micro_batch_size", "shard_tokens", "dtype",
                 "tensor_parallel", "pipeline_parallel", "iteration", "max_shards", "tokenizer")
"""Settings every store of one teacher pass (:func:`precompute_stores`) must share: they fix the
teacher, its windows and its micro-batches."""


def check_pass(cfgs: list[PrecomputeConfig]) -> None:
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


