"""Online KD from a mixture-of-experts teacher (megatron-core MoE layers: router, allgather token
dispatcher, SequentialMLP experts, a sigmoid-gated shared expert, one dense layer, head_dim !=
hidden/heads): TP=2, PP=2 and EP=2 give the TP=1 losses, gradient norms and trained student
weights; the teacher stays frozen, outside the optimizer and the checkpoint, and adds no router
loss. A MoE *student* logs its router (load-balancing) loss."""
import pytest
import torch

from dist_helpers import run_workers
from distkit import build, distill_config, fit, packed, teacher_snapshot, unpacked

MOE_TEACHER = dict(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                   ffn_hidden_size=96, vocab_size=200, max_position_embeddings=64, init_method_std=0.08,
                   num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
                   moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True, moe_layer_pattern=[1, 0, 1, 1])
MOE_STUDENT = [f"model.{k}={v}" for k, v in dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                                  moe_aux_loss_coeff=0.01).items()]


def make_moe_teacher(path: str, seed: int = 13) -> None:
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    set_seed(seed)
    cfg = ModelConfig(**MOE_TEACHER)
    save_checkpoint(path, [build_gpt_model(cfg)], cfg, iteration=1)


def _run(teacher, tp, pp, state, ep=1, overrides=None):
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_kd.models.sharding import gather_full_state
    from megatron_kd.training import unwrap_model

    cfg = distill_config(teacher, tp, pp, overrides=[f"parallel.expert_parallel={ep}", *(overrides or [])])
    trainer, make_train, make_valid, state = build(cfg, state)
    wrapper = trainer.model_chunks[0]
    before = teacher_snapshot(trainer)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    steps, valid = fit(trainer, make_train, make_valid)
    after = teacher_snapshot(trainer)
    final = gather_full_state(unwrap_model(wrapper), trainer.model_cfg if hasattr(trainer, "model_cfg")
                              else _model_cfg(cfg))
    facts = dict(
        teacher_identical=all(torch.equal(before[k], after[k]) for k in before),
        teacher_frozen=all(p.grad is None and not p.requires_grad for p in wrapper.teacher.parameters())
        and not wrapper.teacher.training,
        teacher_not_optimized=not ({id(p) for p in wrapper.teacher.parameters()} & optimized),
        teacher_not_in_state_dict=not any(k.startswith("teacher") for k in wrapper.state_dict()),
        tracker_empty=not get_moe_layer_wise_logging_tracker(),
    )
    return steps, valid, state, facts, final


def _model_cfg(cfg):
    from megatron_kd.distill.run import prepare_distill_config

    return prepare_distill_config(cfg)[0]


def _reference(rank, world_size, tmp):
    make_moe_teacher(f"{tmp}/moe_teacher")
    ref = _run(f"{tmp}/moe_teacher", 1, 1, None)
    student = _run(f"{tmp}/moe_teacher", 1, 1, None, overrides=MOE_STUDENT)
    return packed(dict(ref=ref, moe_student=student[0]))


def _parallel(rank, world_size, tmp, state):
    teacher = f"{tmp}/moe_teacher"
    return packed({"tp2": _run(teacher, 2, 1, state), "pp2": _run(teacher, 1, 2, state),
                   "ep2": _run(teacher, 1, 1, state, ep=2)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill_moe")
    (ref,) = run_workers(_reference, 1, str(tmp))
    ref = unpacked(ref)
    par = [unpacked(r) for r in run_workers(_parallel, 2, str(tmp), ref["ref"][2], timeout=900)]
    return dict(ref=ref, par=par)


def test_moe_teacher_kd_is_real_and_teacher_frozen(runs):
    steps, valid, _, facts, _ = runs["ref"]["ref"]
    assert all(s["kd"] > 0.05 for s in steps) and steps[-1]["total"] < steps[0]["total"]
    assert all(facts.values()), facts
    assert not any(k.startswith("moe_") for k in steps[0])  # a dense student: no router metric


@pytest.mark.parametrize("layout", ["tp2", "pp2", "ep2"])
def test_moe_teacher_parallel_layouts_match_tp1(runs, layout):
    want_steps, want_valid, _, _, want_final = runs["ref"]["ref"]
    for rank_out in runs["par"]:
        got_steps, got_valid, _, facts, got_final = rank_out[layout]
        assert all(facts.values()), (layout, facts)
        assert len(got_steps) == len(want_steps)
        for g, w in zip(got_steps, want_steps):
            for key in ("total", "lm", "kd", "loss"):
                assert g[key] == pytest.approx(w[key], abs=2e-5), (layout, key, g["step"])
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4, abs=1e-5), (layout, g["step"])
        for key in ("lm", "kd"):
            assert got_valid[key] == pytest.approx(want_valid[key], abs=2e-5)
        assert sorted(got_final) == sorted(want_final)
        for k, v in want_final.items():  # three optimizer steps: the gradients were the same
            torch.testing.assert_close(got_final[k], v, atol=2e-5, rtol=1e-4, msg=f"{layout}: {k}")


def test_moe_student_logs_router_loss(runs):
    steps = runs["ref"]["moe_student"]
    assert all(s["moe_aux_loss"] > 0 for s in steps)
    # switch loss (before its coefficient) of a near-uniform router is ~ top-k: 2 for top-2
    assert all(1.0 < s["moe_aux_loss"] < 4.0 for s in steps), [s["moe_aux_loss"] for s in steps]
