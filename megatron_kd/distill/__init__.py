"""Distillation training: online (teacher in the job, any TP/PP), offline (stored sparse targets), none.

Public API (see ``docs/distill.md``)::

    from megatron_kd.config import load_config
    from megatron_kd.distill import DistillConfig, run_distill
    cfg = load_config(DistillConfig, "examples/cpu/distill_tiny.yaml", ["kd.mode=online"])
    result = run_distill(cfg)      # {"iteration", "train": {...}, "valid": {...}, "config": {...}}

Building blocks: :class:`DistillationModel` (per-stage student + frozen teacher wrapper),
:class:`DistillForwardStep`, :func:`load_teacher` / :func:`inspect_teacher`, :class:`DistillTrainer`.
"""
from megatron_kd.distill.config import DistillConfig, IntermediatePair, KDConfig, TeacherConfig, validate_kd_settings
from megatron_kd.distill.forward_step import DistillForwardStep, KDState
from megatron_kd.distill.pipeline import (DistillationModel, install_schedule_hooks, make_adjust_tensor_shapes_fn,
                                          student_finalize_model_grads)
from megatron_kd.distill.teacher import TeacherSpec, check_vocab, inspect_teacher, load_teacher


def __getattr__(name):
    # run.py imports the whole training stack; load it only when asked for.
    if name in ("DistillTrainer", "build_distill_trainer", "prepare_distill_config", "run_distill",
                "build_distill_data_iterators"):
        from megatron_kd.distill import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = [
    "DistillConfig", "DistillForwardStep", "DistillTrainer", "DistillationModel", "IntermediatePair", "KDConfig",
    "KDState", "TeacherConfig", "TeacherSpec", "build_distill_data_iterators", "build_distill_trainer",
    "check_vocab", "inspect_teacher", "install_schedule_hooks", "load_teacher", "make_adjust_tensor_shapes_fn",
    "prepare_distill_config", "run_distill", "student_finalize_model_grads", "validate_kd_settings",
]
