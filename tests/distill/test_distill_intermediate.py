"""Intermediate-layer losses: the value against an independent recomputation (layer outputs captured
by the test, float64 cosine / MSE, explicit projection), gradients reaching the projection, and
pair placement errors. (PP/TP equality of the training curves: test_distill_parallel.py.)"""
import pytest
import torch
import torch.nn.functional as F

from distkit import SEQ, STUDENT, TEACHER

V = STUDENT["vocab_size"]


def _pairs(spec):
    from megatron_kd.distill import IntermediatePair

    return [IntermediatePair(s, t, loss) for s, t, loss in spec]


def test_resolve_pairs_placement_and_errors():
    from megatron_kd.distill.intermediate import resolve_pairs
    from megatron_kd.models import ModelConfig

    s, t = ModelConfig(**STUDENT), ModelConfig(**TEACHER)  # 2 and 4 layers
    (a, b) = resolve_pairs(_pairs([(0, 1, "cosine"), (-1, -1, "mse")]), s, t, 2)
    assert (a.stage, a.student_local, a.teacher_local) == (0, 0, 1)
    assert (b.student_layer, b.teacher_layer, b.stage, b.student_local, b.teacher_local) == (1, 3, 1, 0, 1)
    with pytest.raises(ValueError, match="same stage"):
        resolve_pairs(_pairs([(0, 2, "cosine")]), s, t, 2)
    assert resolve_pairs(_pairs([(0, 2, "cosine")]), s, t, 1)[0].stage == 0  # fine without PP
    with pytest.raises(ValueError, match="outside the model's 4 layers"):
        resolve_pairs(_pairs([(0, 4, "mse")]), s, t, 1)
    from megatron_kd.distill import KDConfig

    with pytest.raises(ValueError, match="kd.intermediate\\[0\\].loss"):
        KDConfig(intermediate=_pairs([(0, 0, "l1")]))


def test_intermediate_loss_value_and_gradients(dist1):
    from megatron_kd.distill import DistillationModel, DistillForwardStep, KDConfig, KDState
    from megatron_kd.distill.intermediate import IntermediateLosses, attach_projections, resolve_pairs
    from megatron_kd.distill.teacher import freeze
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import set_seed

    set_seed(4)
    s_cfg, t_cfg = ModelConfig(**STUDENT), ModelConfig(**TEACHER)
    pairs = resolve_pairs(_pairs([(0, 1, "cosine"), (1, 3, "mse")]), s_cfg, t_cfg, 1)
    student = build_gpt_model(s_cfg)
    attach_projections(student, pairs, 32, 48, seed=9)
    teacher = freeze(build_gpt_model(t_cfg))
    kd = KDConfig(alpha=0.25, alpha_schedule="linear", alpha_start=0.25, alpha_end=0.75, intermediate_weight=3.0,
                  intermediate=_pairs([(0, 1, "cosine"), (1, 3, "mse")]))
    state = KDState(step=2, total_steps=4)  # alpha = 0.5
    inter = IntermediateLosses(student, teacher, pairs, kd, state)
    wrapper = DistillationModel(student, teacher, 32, 48, intermediate=inter)
    g = torch.Generator().manual_seed(2)
    batch = dict(tokens=torch.randint(0, V, (2, SEQ), generator=g), labels=torch.randint(0, V, (2, SEQ), generator=g),
                 loss_mask=torch.ones(2, SEQ), position_ids=torch.arange(SEQ).expand(2, SEQ).clone())
    batch["loss_mask"][1, 5:] = 0
    output, loss_func = DistillForwardStep("online", kd, V, state)(iter([batch]), wrapper)
    loss_sum, _, report = loss_func(output)

    # Independent recomputation: capture the layer outputs with our own hooks, float64 maths.
    captured = {}
    hooks = [student.decoder.layers[0].register_forward_hook(lambda m, a, o: captured.__setitem__("s0", o[0])),
             student.decoder.layers[1].register_forward_hook(lambda m, a, o: captured.__setitem__("s1", o[0])),
             teacher.decoder.layers[1].register_forward_hook(lambda m, a, o: captured.__setitem__("t1", o[0])),
             teacher.decoder.layers[3].register_forward_hook(lambda m, a, o: captured.__setitem__("t3", o[0]))]
    with torch.no_grad():
        student(batch["tokens"], batch["position_ids"], None)
        teacher(batch["tokens"], batch["position_ids"], None)
    for h in hooks:
        h.remove()
    w0 = student.kd_projections.p0.weight.detach().double()
    w1 = student.kd_projections.p1.weight.detach().double()
    s0, s1 = captured["s0"].double() @ w0.T, captured["s1"].double() @ w1.T
    cos = 1 - F.cosine_similarity(s0, captured["t1"].double(), dim=-1)
    mse = (s1 - captured["t3"].double()).pow(2).mean(-1)
    mask = batch["loss_mask"].T.bool()  # hidden states are [s, b]
    aux = cos[mask].sum() + mse[mask].sum()
    logits_part = 0.5 * report["lm"][0] + 0.5 * report["kd"][0]
    assert report["alpha"][0].item() == pytest.approx(0.5)
    assert loss_sum.item() == pytest.approx((logits_part + 0.5 * 3.0 * aux).item(), rel=1e-5)
    assert inter.take_report() == pytest.approx((aux.item(), 2 * int(mask.sum())), rel=1e-5)

    loss_sum.backward()
    for name in ("p0", "p1"):
        assert student.kd_projections[name].weight.grad.abs().sum() > 0
    assert student.decoder.layers[0].mlp.linear_fc2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
