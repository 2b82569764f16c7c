"""``kd.eval_with_teacher=false``: online KD's held-out evaluation runs the student only. Training is
unchanged to the bit, the held-out LM loss too; the teacher's forward is skipped in evaluation (at
PP = 2 the stage sends zeros in the teacher's part of the activation), and ``kd`` leaves the held-out
metrics."""
import pytest

from dist_helpers import run_workers
from distkit import build, distill_config, fit, make_teacher_checkpoint, packed, unpacked

EVAL = ["train.eval_interval=1", "train.train_iters=3"]


def _run(teacher, pp, state, with_teacher):
    cfg = distill_config(teacher, pp=pp, overrides=EVAL + [f"kd.eval_with_teacher={str(with_teacher).lower()}"])
    trainer, make_train, make_valid, state = build(cfg, state)
    calls = {"train": 0, "eval": 0}
    wrapper = trainer.model_chunks[0]  # the DistillationModel: .training is False while evaluating
    wrapper.teacher.register_forward_pre_hook(lambda module, args: calls.__setitem__(
        "train" if wrapper.training else "eval", calls["train" if wrapper.training else "eval"] + 1))
    steps, valid = fit(trainer, make_train, make_valid)
    keep = ("loss", "lm", "kd", "grad_norm")
    return [{k: s[k] for k in keep if k in s} for s in steps], valid, calls, state


def _worker(rank, world_size, tmp, state=None):
    teacher = f"{tmp}/teacher"
    if world_size == 1:  # the PP = 2 runs reuse it, and the student's initial weights
        make_teacher_checkpoint(teacher)
    with_t = _run(teacher, world_size, state, True)
    without = _run(teacher, world_size, with_t[3], False)
    return packed({"with": with_t[:3], "without": without[:3], "state": with_t[3]})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_teacher")
    (one,) = run_workers(_worker, 1, str(tmp))
    return unpacked(one), tmp


def test_training_is_bit_identical_and_the_teacher_skips_evaluation(runs):
    got, _ = runs
    with_steps, with_valid, with_calls = got["with"]
    steps, valid, calls = got["without"]
    assert steps == with_steps  # every training metric, exactly
    assert valid["lm"] == with_valid["lm"] and valid["loss"] == with_valid["lm"]
    assert "kd" in with_valid and "kd" not in valid
    assert calls["train"] == with_calls["train"] > 0
    assert with_calls["eval"] > 0 and calls["eval"] == 0


def test_pp2_evaluation_without_teacher(runs):
    """At PP = 2 the first stage sends zeros for the teacher's part: the held-out LM loss is PP = 1's."""
    got, tmp = runs
    outs = run_workers(_worker, 2, str(tmp), got["state"])
    for data in outs:
        pp2 = unpacked(data)
        steps, valid, calls = pp2["without"]
        assert valid["lm"] == pytest.approx(got["without"][1]["lm"], abs=1e-5)
        assert "kd" not in valid and calls["eval"] == 0
        for a, b in zip(steps, got["without"][0]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
