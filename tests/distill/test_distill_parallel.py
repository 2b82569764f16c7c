"""Online KD on megatron-core schedules: TP=2 and PP=2 (1F1B, teacher activations through the pipeline)
give the same loss curve as TP=1/PP=1; the teacher (deeper, wider) is bit-identical after training
and in no checkpoint or optimizer; a bf16 teacher pipelines exactly; a resumed run continues the
alpha schedule and reproduces the uninterrupted one."""
from pathlib import Path

import pytest
import torch

from dist_helpers import run_workers
from distkit import (TEACHER, build, distill_config, fit, make_teacher_checkpoint, packed, teacher_snapshot,
                     unpacked)


def _checkpoint_tensors(ckpt_dir: str) -> dict[str, tuple]:
    """Global shapes of the model tensors in the newest checkpoint of ``ckpt_dir``."""
    from megatron.core import dist_checkpointing

    from megatron_kd.training.checkpoint import resolve_checkpoint

    meta = dist_checkpointing.load_tensors_metadata(str(resolve_checkpoint(ckpt_dir)))
    return {k: tuple(v.global_shape) for k, v in meta.items() if not k.startswith("optimizer")}


def _run(teacher, tp, pp, state, save=None, overrides=None):
    """One training run; returns its curve, validation metrics, the student's initial weights and
    integrity facts about the teacher and the checkpoint."""
    from megatron_kd.runtime import rank

    cfg = distill_config(teacher, tp, pp, save=save, overrides=overrides)
    trainer, make_train, make_valid, state = build(cfg, state)
    wrapper = trainer.model_chunks[0]
    if teacher is None:
        steps, valid = fit(trainer, make_train, make_valid)
        return steps, valid, state, {}
    before = teacher_snapshot(trainer)
    teacher_params = {id(p) for p in wrapper.teacher.parameters()}
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    steps, valid = fit(trainer, make_train, make_valid)
    after = teacher_snapshot(trainer)
    facts = dict(
        teacher_identical=before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before),
        teacher_no_grad=all(p.grad is None and not p.requires_grad for p in wrapper.teacher.parameters()),
        teacher_eval=not wrapper.teacher.training,
        teacher_not_optimized=not (teacher_params & optimized),
        teacher_not_in_state_dict=not any(k.startswith("teacher") for k in wrapper.state_dict()),
    )
    if save and rank() == 0:
        facts["ckpt"] = _checkpoint_tensors(save)
    return steps, valid, state, facts


def _reference_worker(rank, world_size, tmp):
    teacher = f"{tmp}/teacher"
    make_teacher_checkpoint(teacher)
    ref = _run(teacher, 1, 1, None, save=f"{tmp}/ckpt_11")
    state = ref[2]
    bf16 = _run(teacher, 1, 1, state, overrides=["teacher.dtype=bf16"])
    none = _run(None, 1, 1, state)
    # Resume: a linear alpha schedule over 4 steps, interrupted after step 2 (exit_interval), resumed.
    sched = ["kd.alpha_schedule=linear", "kd.alpha_start=0.2", "kd.alpha_end=0.8", "train.train_iters=4"]
    straight = _run(teacher, 1, 1, state, overrides=sched)
    cfg = distill_config(teacher, save=f"{tmp}/ckpt_resume", overrides=sched + ["train.exit_interval=2"])
    first, _ = fit(*build(cfg, state)[:3])
    cfg = distill_config(teacher, save=f"{tmp}/ckpt_resume", overrides=sched)
    trainer, make_train, make_valid, _ = build(cfg, state)
    resumed_ok = trainer.resume()
    second, _ = fit(trainer, make_train, make_valid)
    return packed(dict(ref=ref, bf16=bf16, none=none, straight=straight[0], split=first + second,
                       resumed_ok=resumed_ok))


def _parallel_worker(rank, world_size, tmp, tp, pp, state):
    teacher = f"{tmp}/teacher"
    out = {"fp32": _run(teacher, tp, pp, state, save=f"{tmp}/ckpt_{tp}{pp}")}
    if pp > 1:
        out["bf16"] = _run(teacher, tp, pp, state, overrides=["teacher.dtype=bf16"])
    return packed(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill_parallel")
    (ref,) = run_workers(_reference_worker, 1, str(tmp))
    ref = unpacked(ref)
    state = ref["ref"][2]
    tp2 = [unpacked(r) for r in run_workers(_parallel_worker, 2, str(tmp), 2, 1, state)]
    pp2 = [unpacked(r) for r in run_workers(_parallel_worker, 2, str(tmp), 1, 2, state)]
    return dict(ref=ref, tp2=tp2, pp2=pp2, tmp=Path(tmp))


KEYS = ("total", "lm", "kd", "alpha", "loss")


def _assert_same(got, want, atol=2e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in KEYS:
            assert g[key] == pytest.approx(w[key], abs=atol), (key, g["step"])
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4, abs=1e-5)


def test_online_kd_learns_something_real(runs):
    steps = runs["ref"]["ref"][0]
    assert len(steps) == 3
    assert all(s["kd"] > 0.05 for s in steps)  # a peaked random teacher: a real divergence
    for s in steps:  # total = (1 - alpha) * lm + alpha * kd, alpha = 0.6 (kd.t2_scale off)
        assert s["alpha"] == pytest.approx(0.6)
        assert s["total"] == pytest.approx(0.4 * s["lm"] + 0.6 * s["kd"], rel=1e-5)
    assert steps[-1]["total"] < steps[0]["total"]
    assert {"teacher_time_s", "student_time_s", "teacher_time_frac"} <= set(steps[0])
    valid = runs["ref"]["ref"][1]
    assert set(valid) >= {"lm", "kd", "loss"} and valid["loss"] == valid["lm"]  # held-out LM loss


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_parallel_layouts_match_tp1_pp1(runs, layout):
    want_steps, want_valid = runs["ref"]["ref"][:2]
    for rank_out in runs[layout]:
        got_steps, got_valid, _, _ = rank_out["fp32"]
        _assert_same(got_steps, want_steps)
        for key in ("lm", "kd"):
            assert got_valid[key] == pytest.approx(want_valid[key], abs=2e-5)


def test_bf16_teacher_through_the_pipeline(runs):
    want = runs["ref"]["bf16"][0]
    fp32 = runs["ref"]["ref"][0]
    assert want[0]["kd"] != fp32[0]["kd"]  # the bf16 teacher really ran in bf16
    assert want[0]["kd"] == pytest.approx(fp32[0]["kd"], rel=0.05)
    for rank_out in runs["pp2"]:
        _assert_same(rank_out["bf16"][0], want)  # bf16 -> fp32 -> bf16 over the pipeline is exact


def test_teacher_frozen_and_outside_training(runs):
    facts = [runs["ref"][k][3] for k in ("ref", "bf16")]
    facts += [r[k][3] for layout in ("tp2", "pp2") for r in runs[layout] for k in r]
    assert len(facts) == 2 + 2 + 4
    for f in facts:
        assert f["teacher_identical"] and f["teacher_no_grad"] and f["teacher_eval"]
        assert f["teacher_not_optimized"] and f["teacher_not_in_state_dict"]
    assert "kd" not in runs["ref"]["none"][0][0]  # kd.mode=none: the student alone, no teacher


def test_checkpoints_hold_no_teacher(runs):
    from megatron_kd.models import ModelConfig

    from distkit import STUDENT

    ref = runs["ref"]["ref"][3]["ckpt"]
    student = ModelConfig(**STUDENT)
    padded = student.padded_vocab_size(1)
    expected = student.num_parameters() + (padded - student.vocab_size) * student.hidden_size * 2
    assert sum(torch.Size(s).numel() for s in ref.values()) == expected
    teacher_widths = {TEACHER["hidden_size"], TEACHER["ffn_hidden_size"]}
    assert not any(teacher_widths & set(shape) for shape in ref.values())
    for layout in ("tp2", "pp2"):
        assert runs[layout][0]["fp32"][3]["ckpt"] == ref  # same global tensors at any layout


def test_resume_continues_alpha_schedule(runs):
    ref = runs["ref"]
    assert ref["resumed_ok"]
    split, straight = ref["split"], ref["straight"]
    assert [s["step"] for s in split] == [1, 2, 3, 4]
    assert [s["alpha"] for s in straight] == pytest.approx([0.2, 0.35, 0.5, 0.65])  # linear, step 0..3 of 4
    _assert_same(split, straight, atol=1e-6)
