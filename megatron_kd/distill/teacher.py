"""The online teacher: inspect its checkpoint (cheap checks first), load it frozen, check the vocabulary.

:func:`inspect_teacher` reads only the checkpoint's ``meta.json`` and raises one-line errors
(layout, sequence length, vocabulary) before anything heavy is built; :func:`load_teacher` then
builds this rank's teacher stage at the student's TP/PP layout with the teacher's own
``ModelConfig`` and loads its weights, frozen (``requires_grad=False``, eval mode). The teacher is
never wrapped in DDP, never seen by the optimizer and never saved.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from megatron_kd.models.builder import parse_dtype
from megatron_kd.interop.convert import checkpoint_tokenizer
from megatron_kd.interop.vocab import check_vocab_compatible
from megatron_kd.models.config import ModelConfig


@dataclass
class TeacherSpec:
    """What :func:`inspect_teacher` learnt from the teacher checkpoint."""

    path: str
    """Checkpoint directory."""
    iteration: int
    """Iteration that will be loaded."""
    model_config: ModelConfig
    """The teacher's own shape."""
    padded_vocab_size: int
    """Embedding rows of the teacher checkpoint (its vocab shards have padded/TP columns)."""
    vocab: Any
    """The vocabulary plan (``kd_vocab_size`` etc.)."""
    tokenizer: str | None
    """The teacher's tokenizer reference (resolved path), if known."""
    meta: dict | None = None
    """The checkpoint meta read once by :func:`inspect_teacher` (the builders take it from here)."""


def check_vocab(teacher_cfg: ModelConfig, student_cfg: ModelConfig, teacher_tokenizer: Any = None,
                student_tokenizer: Any = None):
    """Vocabulary compatibility of a teacher/student pair; returns a plan with ``kd_vocab_size``.

    Rule (``megatron_kd.interop.vocab.check_vocab_compatible``, documented in docs/interop.md): tokenizers, when both are known, must be identical; otherwise the model vocab sizes must
    be equal. KD then runs over the tokenizer's ids (or the common vocab size) and every column
    beyond is masked on both sides. Raises a one-line ``ValueError``.
    """
    return check_vocab_compatible(teacher_cfg, student_cfg, teacher_tokenizer, student_tokenizer)


def inspect_teacher(load: str, student_cfg: ModelConfig, tensor_parallel: int, pipeline_parallel: int,
                    seq_length: int, iteration: int | None = None, teacher_tokenizer: str | None = None,
                    student_tokenizer: str | None = None, cross_tokenizer: bool = False) -> TeacherSpec:
    """Validate a teacher checkpoint against the student run without building anything.

    Checks: the checkpoint exists; the teacher splits over this TP/PP (heads, KV groups, layers);
    its padded vocabulary divides TP; it was built for ``seq_length`` tokens; its vocabulary is
    compatible with the student's (:func:`check_vocab`; with ``cross_tokenizer`` each model must
    cover its own tokenizer instead, :func:`~megatron_kd.distill.cross_tokenizer.check_cross_tokenizer`).
    One-line errors name the fix.
    """
    from megatron_kd.training.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(load, iteration)
    cfg = ModelConfig.from_dict(meta["model_config"])
    try:
        cfg.validate_parallel(tensor_parallel, pipeline_parallel)
    except ValueError as exc:
        raise ValueError(f"teacher {load}: {exc} (the teacher runs on the student's TP/PP grid)") from None
    padded = int(meta["padded_vocab_size"])
    if padded % tensor_parallel:
        raise ValueError(f"teacher {load} has padded vocab {padded}, not divisible by parallel.tensor_parallel="
                         f"{tensor_parallel}: choose a TP size that divides it")
    if seq_length > cfg.max_position_embeddings:
        raise ValueError(f"train.seq_length={seq_length} exceeds the teacher's max_position_embeddings="
                         f"{cfg.max_position_embeddings}: shorten the sequences")
    tok = teacher_tokenizer or checkpoint_tokenizer(load, meta)
    if cross_tokenizer:
        from megatron_kd.distill.cross_tokenizer import check_cross_tokenizer

        plan = check_cross_tokenizer(cfg, student_cfg, tok, student_tokenizer)
    else:
        plan = check_vocab(cfg, student_cfg, tok, student_tokenizer)
    return TeacherSpec(str(load), int(meta["iteration"]), cfg, padded, plan, tok, meta)


def student_padded_vocab(spec: TeacherSpec, student_cfg: ModelConfig, tensor_parallel: int,
                         resume_padded: int | None) -> int:
    """Padded vocabulary to build the student with, so that its vocab shards line up with the teacher's.

    A fresh student takes the teacher's padded size (a few extra zero rows at most). A student
    resumed from a checkpoint keeps its own size; if that differs from the teacher's, logits are
    re-aligned by slicing/padding, which is only possible at TP=1 (else a one-line error).
    """
    if resume_padded is not None:
        if resume_padded != spec.padded_vocab_size and tensor_parallel > 1:
            raise ValueError(f"the student checkpoint has padded vocab {resume_padded} but the teacher "
                             f"{spec.path} has {spec.padded_vocab_size}: their vocab shards do not line up at "
                             f"tensor_parallel={tensor_parallel}; distil at TP=1 or start the student fresh")
        return resume_padded
    if spec.padded_vocab_size >= student_cfg.vocab_size:
        return spec.padded_vocab_size
    if tensor_parallel > 1:
        raise ValueError(f"teacher {spec.path} has padded vocab {spec.padded_vocab_size} < the student's "
                         f"vocab_size={student_cfg.vocab_size}: the shards cannot line up at TP>1")
    return student_cfg.padded_vocab_size(tensor_parallel)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without changing any RNG stream (Python, NumPy, torch, megatron's tracker).

    Building the teacher initialises (then overwrites) its weights; without this the student's
    later randomness would depend on whether a teacher was built.
    """
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    gpu = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    tracker = get_cuda_rng_tracker().get_states()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state(gpu)
        get_cuda_rng_tracker().set_states(tracker)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``model``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(spec: TeacherSpec, params_dtype: str | torch.dtype = "fp32") -> torch.nn.Module:
    """Build this rank's teacher stage (current TP/PP) from ``spec`` and load its weights, frozen.

    Collective (all ranks). The RNG streams are left as they were (:func:`preserved_rng`).
    """
    from megatron_kd.training.checkpoint import load_model_for_inference

    with preserved_rng():
        model, _, _ = load_model_for_inference(spec.path, params_dtype=params_dtype, iteration=spec.iteration,
                                               meta=spec.meta, model_config=spec.model_config)
    dtype = parse_dtype(params_dtype)
    if dtype != torch.float32:
        # build_gpt_model leaves the (torch) norm weights in fp32; a half-precision teacher must be
        # half precision throughout (what megatron's Float16Module does for a trained model).
        model.to(dtype)
    return freeze(model)
