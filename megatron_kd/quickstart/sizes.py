"""Quickstart sizes: how big each model is and how long each stage runs.

``full`` (the default of ``megatron-kd quickstart``) takes about 9 minutes on 2 idle CPU cores (544-546 s
measured with two workers, 2026-12-07, evening; 729 s that morning, 777 s the day before, 872 s before the
shared teacher pass; docs/quickstart.md),
``tiny`` at a few minutes (CI smoke use; 303 s of stage time with all eight students, measured
2026-12-06 on a 2-core machine at load average ~30). Both keep
the teacher clearly stronger than the students (2x deeper, 2x wider, more tokens), so that
distillation has something to transfer.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class QuickstartSize:
    """Sizes and budgets of one quickstart run."""

    name: str
    """Size name (``tiny`` | ``full``)."""
    max_docs: int | None
    """Demo-corpus documents to use (None = all)."""
    vocab_size: int
    """SentencePiece BPE vocabulary trained on the corpus."""
    seq_length: int
    """Training / teacher window length in tokens."""
    teacher: dict = field(default_factory=dict)
    """Teacher ModelConfig fields."""
    reference: dict = field(default_factory=dict)
    """MiniPLM reference-model ModelConfig fields (small, trained on a held-out slice)."""
    student: dict = field(default_factory=dict)
    """Student ModelConfig fields (the same for all five students)."""
    teacher_iters: int = 200
    """Teacher optimizer steps."""
    reference_iters: int = 100
    """Reference-model optimizer steps."""
    student_iters: int = 100
    """Optimizer steps of every student (same token budget for all)."""
    global_batch_size: int = 16
    """Sequences per optimizer step."""
    micro_batch_size: int = 8
    """Sequences per forward pass."""
    teacher_lr: float = 3e-3
    """Peak learning rate of the teacher and the reference model."""
    student_lr: float = 3e-3
    """Peak learning rate of the students."""
    eval_docs: int = 200
    """Held-out documents for the final evaluation (None = all)."""
    kd_alpha: float = 0.9
    """Weight of the KD term, (1-α)·LM + α·KD, of the students with dense or unbiased teacher targets
    (online_kd, miniplm_kd, offline_sampled_kd). 0.9: the PD paper's best static α; at ``tiny`` it beat
    0.5 on every training seed tried (online KD: 3 of 3, sampled: 2 of 2; docs/quickstart.md "KD settings")."""
    topk_alpha: float = 0.5
    """KD weight of the offline top-k student (truncated targets: the KD term says nothing about the ids
    outside the store, so the LM term must keep a real weight; at ``tiny`` α = 0.9 was 0.07-0.17 nats worse
    than 0.5 with the remainder bucket and 0.5-0.6 worse without it)."""
    kd_temperature: float = 1.0
    """KD temperature."""
    kd_residual: bool = True
    """Offline top-k student: ``kd.residual`` (the stored mass as is plus one remainder bucket) instead of
    renormalising the teacher over the kept ids. The quickstart teachers are weak (top-1 confidence
    ~0.12 at ``tiny``): top-16 keeps only ~42% of the teacher's mass there, so renormalising inflates the
    kept ids ~2.4x and makes the student overconfident (measured 2026-12-06 at ``tiny``: held-out
    +0.31 -> +0.19 nats vs no KD with seed 1234, +0.13 -> +0.03 with seed 1235, but +0.11 -> +0.17 with
    seed 1236; ECE 0.039-0.042 -> 0.019-0.026 on all three; docs/quickstart.md "KD settings")."""
    miniplm_alpha: float = 0.5
    """Fraction of instances MiniPLM keeps."""
    top_k: int = 16
    """Offline store cap on kept ids per token (after top-p)."""
    top_p: float = 0.95
    """Offline store nucleus mass."""
    heldout_percent: int = 15
    """Held-out documents, percent of the corpus (after the 10% reference slice; the rest trains).
    15% gives ~100 documents at ``full`` (5% gave 27, too few to separate the methods)."""
    eval_interval: int = 10
    """Students evaluate on the held-out split every this many steps (the held-out curves)."""
    eval_iters: int = 2
    """Global batches per held-out curve point (the same batches each time)."""
    bootstrap_samples: int = 2000
    """Paired bootstrap resamples of held-out documents for each student's interval vs no KD."""
    calibration_bins: int = 15
    """Equal-width confidence bins of the next-token expected calibration error."""
    sample_draws: int = 12
    """Sampled store (``offline_sampled_kd``): teacher draws per position (``logits --method sample``;
    about 12 matches full distillation in Anshumann et al. 2025, and the store is then about half the
    bytes per token of the top-k store at ``tiny``)."""
    audit_fraction: float = 0.001
    """Positions of each store whose dense teacher distribution is kept for the store diagnostics
    (kept teacher mass, KL(teacher || stored)) in the report."""
    xtok_vocab_size: int | None = None
    """Cross-tokenizer students: their own SentencePiece vocabulary size (None = no such students)."""
    xtok_loss: str = "projected"
    """kd.cross_tokenizer of the cross-tokenizer student (projected | hybrid | uld)."""
    xtok_alpha: float = 0.8
    """KD weight of the cross-tokenizer student (0.8: what tests/distill/test_distill_cross_tokenizer.py
    measured best for projected/hybrid)."""


def _model(layers: int, hidden: int, heads: int, groups: int, ffn: int) -> dict:
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
                ffn_hidden_size=ffn, tie_embeddings=True, max_position_embeddings=1024)


SIZES: dict[str, QuickstartSize] = {
    "tiny": QuickstartSize(
        name="tiny", max_docs=100, vocab_size=1024, seq_length=128,
        teacher=_model(3, 128, 4, 2, 352), reference=_model(1, 64, 2, 1, 176), student=_model(1, 64, 2, 1, 176),
        teacher_iters=120, reference_iters=30, student_iters=50, global_batch_size=16, micro_batch_size=16,
        teacher_lr=4e-3, student_lr=4e-3, eval_docs=60, top_k=16, heldout_percent=20, eval_interval=10,
        sample_draws=12, xtok_vocab_size=768,
    ),
    "full": QuickstartSize(
        name="full", max_docs=None, vocab_size=4096, seq_length=128,
        teacher=_model(4, 256, 8, 4, 704), reference=_model(2, 128, 4, 2, 352), student=_model(2, 128, 4, 2, 352),
        teacher_iters=300, reference_iters=100, student_iters=150, global_batch_size=16, micro_batch_size=16,
        teacher_lr=2e-3, student_lr=3e-3, eval_docs=300, top_k=32, heldout_percent=15, eval_interval=15,
        sample_draws=12, xtok_vocab_size=3000,
    ),
}


STUDENTS = [  # (run name, label): the students every quickstart trains and reports
    ("no_kd", "No KD (plain LM loss)"),
    ("online_kd", "Online KD (teacher in the job, forward KL)"),
    ("offline_kd", "Offline top-k KD (stored teacher logits)"),
    ("miniplm_data", "MiniPLM data (difference-sampled corpus), no KD"),
    ("miniplm_kd", "MiniPLM data + online KD"),
    ("offline_sampled_kd", "Offline sampled KD (stored teacher draws, unbiased weights)"),
]

XTOK_STUDENTS = [  # the same student shape with its own SentencePiece vocabulary (sizes with xtok_vocab_size)
    ("xtok_no_kd", "Own-tokenizer student, no KD"),
    ("xtok_kd", "Own-tokenizer student, cross-tokenizer online KD"),
]


def students_of(size: QuickstartSize) -> list[tuple[str, str]]:
    """(run name, label) of every student a quickstart of ``size`` trains, in report order."""
    return STUDENTS + (XTOK_STUDENTS if size.xtok_vocab_size else [])
