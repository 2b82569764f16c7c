"""``DistillConfig``: everything ``megatron-kd distill`` needs (the pretrain config + teacher + kd).

The student side (``model``, ``parallel``, ``data``, ``train``, ``optim``, ``checkpoint``,
``logging``) is exactly :class:`megatron_kd.training.PretrainConfig`; distillation adds::

    teacher: {load, dtype, iteration, tokenizer}
    kd:      {mode, kind, temperature, alpha, alpha_schedule, t2_scale, logits_store, ...}

``kd`` extends :class:`megatron_kd.losses.KDLossConfig` (the loss fields and their validation live
there) with the source of the teacher signal and optional intermediate-layer losses.
:func:`validate_distill_config` checks what can be checked before anything is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from megatron_kd.config import validate_choices
from megatron_kd.losses.config import KDLossConfig
from megatron_kd.training.config import PretrainConfig

CROSS_TOKENIZER_LOSSES = ("uld", "hybrid", "projected")
"""kd.cross_tokenizer values (megatron_kd.distill.cross_tokenizer)."""
ALIGNMENT_RULES = ("exact", "nearest_earlier")
"""kd.alignment values (megatron_kd.data.alignment)."""
MODES = ("online", "offline", "none")
"""online: teacher in the job; offline: stored sparse targets; none: the student alone (LM loss)."""
INTERMEDIATE_LOSSES = ("cosine", "mse")
TEACHER_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class TeacherConfig:
    """The frozen teacher of online distillation."""

    load: Optional[str] = None
    """megatron-kd checkpoint directory of the teacher (from `megatron-kd pretrain`/`distill`, or a
    Hugging Face model converted with `megatron-kd convert hf-to-mcore`). Its own model_config is
    used (any depth/width); it is loaded at the student's TP/PP layout."""
    dtype: Optional[Literal[TEACHER_DTYPES]] = None  # type: ignore[valid-type]
    """fp32 | bf16 | fp16: parameter dtype of the teacher; None = the student's optim.precision.
    A bf16 teacher with an fp32 student halves teacher memory and time on GPU."""
    iteration: Optional[int] = None
    """Teacher checkpoint iteration to load; None = the one its `latest` file names."""
    tokenizer: Optional[str] = None
    """Tokenizer of the teacher (the vocabulary check; with kd.cross_tokenizer also the one the
    teacher reads the documents with); None = the one recorded in its checkpoint."""


@dataclass
class IntermediatePair:
    """One intermediate-layer loss between a student and a teacher transformer layer output."""

    student_layer: int = -1
    """Global (0-based) student layer index whose output is matched; negative counts from the end."""
    teacher_layer: int = -1
    """Global (0-based) teacher layer index; negative counts from the end."""
    loss: Literal[INTERMEDIATE_LOSSES] = "cosine"  # type: ignore[valid-type]
    """cosine (1 - cosine similarity per token) | mse (mean squared error per token)."""


@dataclass
class KDConfig(KDLossConfig):
    """The distillation loss (every :class:`KDLossConfig` field) plus where the teacher signal comes from."""

    mode: Literal[MODES] = "online"  # type: ignore[valid-type]
    """online: run the teacher (teacher.load) in this job on the same TP/PP grid; offline: read
    sparse top-k targets from kd.logits_store (needs indexed data); none: no teacher, plain LM
    loss (the baseline a KD run is compared with)."""
    logits_store: Optional[str] = None
    """offline: directory of a teacher-logits store (`megatron-kd logits`) computed on data.prefixes."""
    logits_top_k: Optional[int] = None
    """offline: use at most this many stored entries per token (None = all the store keeps)."""
    intermediate: list[IntermediatePair] = field(default_factory=list)
    """online: extra losses between chosen student and teacher layer outputs (a learned linear
    projection maps student width to teacher width when they differ). Any pipeline stage."""
    intermediate_weight: float = 1.0
    """Weight of the summed intermediate losses inside the KD term: KD = logits + w * intermediate."""
    cross_tokenizer: Optional[str] = None
    """Teacher with another tokenizer (online; or offline from a logits store with a byte-offset key): uld (Universal Logit Distillation: sorted
    probabilities) | hybrid (exact KL on ids with the same text in both vocabularies + ULD on the
    rest) | projected (forward KL to the teacher distribution mapped onto the student token each
    teacher token's text starts with); None = same tokenizer, id-by-id KD (kd.kind).
    docs/cross_tokenizer.md."""
    uld_top_m: Optional[int] = None
    """cross_tokenizer: compare only the m largest probabilities of each side (+ the tail masses);
    None = exact (whole sorted vectors; under TP each chunk's logits are all-gathered)."""
    hybrid_matched_weight: float = 1.0
    """cross_tokenizer=hybrid: weight of the KL over the matched (same-text) ids."""
    hybrid_unmatched_weight: float = 1.0
    """cross_tokenizer=hybrid: weight of the ULD over the unmatched ids' probabilities."""
    alignment: str = "exact"
    """cross_tokenizer: exact (teacher position ending at the same byte, else unaligned) |
    nearest_earlier (the last teacher position ending at or before it)."""
    eval_with_teacher: bool = True
    """online: held-out evaluation also runs the teacher and reports the held-out KD term (``kd`` of
    the ``valid`` metrics); false: the student's held-out LM loss only, without the teacher's forward
    (one teacher forward less per evaluation batch; training is unchanged, to the bit)."""

    def __post_init__(self) -> None:
        super().__post_init__()  # validates the Literal fields (kd.kind, kd.mode, ...)
        if self.logits_top_k is not None and self.logits_top_k < 1:
            raise ValueError(f"kd.logits_top_k={self.logits_top_k} must be >= 1 or null")
        if self.intermediate_weight < 0:
            raise ValueError(f"kd.intermediate_weight={self.intermediate_weight} must be >= 0")
        if self.cross_tokenizer is not None and self.cross_tokenizer not in CROSS_TOKENIZER_LOSSES:
            raise ValueError(f"kd.cross_tokenizer={self.cross_tokenizer!r} is not one of "
                             f"{', '.join(CROSS_TOKENIZER_LOSSES)} (or null)")
        if self.uld_top_m is not None and self.uld_top_m < 1:
            raise ValueError(f"kd.uld_top_m={self.uld_top_m} must be >= 1 or null (exact)")
        if self.hybrid_matched_weight < 0 or self.hybrid_unmatched_weight < 0:
            raise ValueError("kd.hybrid_matched_weight and kd.hybrid_unmatched_weight must be >= 0")
        if self.alignment not in ALIGNMENT_RULES:
            raise ValueError(f"kd.alignment={self.alignment!r} is not one of {', '.join(ALIGNMENT_RULES)}")
        for i, pair in enumerate(self.intermediate):
            validate_choices(pair, f"kd.intermediate[{i}].")


@dataclass
class DistillConfig(PretrainConfig):
    """Everything `megatron-kd distill` needs: the student's pretrain config + teacher + kd."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen teacher (online mode)."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Distillation mode and loss."""


def validate_kd_settings(cfg: DistillConfig) -> None:
    """One-line ``ValueError``/``FileNotFoundError`` for inconsistent teacher/kd settings (no I/O
    beyond checking that the named paths exist)."""
    kd, teacher = cfg.kd, cfg.teacher
    validate_choices(teacher, "teacher.")
    if kd.mode == "online":
        if not teacher.load:
            raise ValueError("kd.mode=online needs teacher.load=<teacher checkpoint dir> "
                             "(or use kd.mode=offline with a logits store, or kd.mode=none)")
        path = Path(teacher.load)
        from megatron_kd.interop.source import is_hf_model_dir  # a HF model directory serves as is

        if not (path / "latest").is_file() and not is_hf_model_dir(path):
            raise FileNotFoundError(f"teacher.load={path} holds no megatron-kd checkpoint (no 'latest' file) and is "
                                    "no Hugging Face model directory (config.json + *.safetensors): pass a directory "
                                    "written by megatron-kd pretrain/distill/convert, or a HF model directory")
    elif kd.intermediate:
        raise ValueError(f"kd.intermediate needs kd.mode=online (got kd.mode={kd.mode}): intermediate layers "
                         "come from a live teacher")
    if kd.mode == "offline":
        if not kd.logits_store:
            raise ValueError("kd.mode=offline needs kd.logits_store=<store dir> from `megatron-kd logits`")
        if not Path(kd.logits_store).is_dir():
            raise FileNotFoundError(f"kd.logits_store={kd.logits_store} does not exist: compute it with "
                                    "`megatron-kd logits` on the training data")
        if cfg.data.synthetic or len(cfg.data.prefixes) != 1:
            raise ValueError("kd.mode=offline needs exactly one indexed dataset in data.prefixes (the one the "
                             "logits store was computed on), not synthetic data or a blend")
        if kd.kind not in ("forward_kl", "soft_ce"):
            raise ValueError(f"kd.kind={kd.kind} is not available with stored sparse targets (offline KD is "
                             "forward KL over the kept ids): use kd.kind=forward_kl, or kd.mode=online")
    if kd.cross_tokenizer is not None and kd.mode != "none":
        if kd.intermediate:
            raise ValueError("kd.intermediate cannot be combined with kd.cross_tokenizer: the two models' "
                             "positions do not correspond token by token")
        if cfg.data.synthetic or not cfg.data.tokenizer:
            raise ValueError("kd.cross_tokenizer needs indexed text data and data.tokenizer (the teacher re-reads, "
                             "or the byte key maps, the documents' text), not synthetic data")
    if kd.mode != "offline" and kd.residual:
        raise ValueError("kd.residual=true applies to stored sparse targets only: set kd.mode=offline or "
                         "kd.residual=false")
