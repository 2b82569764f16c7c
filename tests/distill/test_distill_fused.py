"""The fused distillation head (kd.fused_linear, issue 15) equals the unfused one through real
megatron-core GPT models: loss, report and every student gradient, online and offline, tied and
untied embeddings, training and evaluation steps; the output layer is untouched outside the step."""
import pytest
import torch

from distkit import SEQ, STUDENT, TEACHER

V = STUDENT["vocab_size"]


def _models(tied):
    from megatron_kd.distill import DistillationModel
    from megatron_kd.distill.teacher import freeze
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import set_seed

    set_seed(5)
    student = build_gpt_model(ModelConfig(**STUDENT, tie_embeddings=tied))
    teacher = freeze(build_gpt_model(ModelConfig(**TEACHER)))
    return student, teacher, DistillationModel(student, teacher, STUDENT["hidden_size"], TEACHER["hidden_size"])


def _batch(b=2):
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, SEQ)
    mask[0, :4] = 0
    return dict(tokens=torch.randint(0, V, (b, SEQ), generator=g), labels=torch.randint(0, V, (b, SEQ), generator=g),
                loss_mask=mask, position_ids=torch.arange(SEQ).expand(b, SEQ).clone(),
                target_ids=torch.stack([torch.randperm(V, generator=g)[:8] for _ in range(b * SEQ)]).view(b, SEQ, 8),
                target_logprobs=torch.log_softmax(torch.randn(b, SEQ, V, generator=g), -1)[..., :8].contiguous())


def _step(mode, fused, model, student, batch, evaluation=False):
    from megatron_kd.distill import DistillForwardStep, KDConfig, KDState

    kd = KDConfig(kind="forward_kl", alpha=0.6, fused_linear=fused, fused_chunk_tokens=5, mode=mode)
    student.zero_grad(set_to_none=True)
    output, loss_func = DistillForwardStep(mode, kd, V, KDState(1, 4), evaluation=evaluation)(iter([batch]), model)
    loss, count, report = loss_func(output)
    if not evaluation:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return output, loss.detach(), int(count), report, grads


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("mode", ["online", "offline", "none"])
def test_fused_head_equals_unfused(dist1, mode, tied):
    student, teacher, wrapper = _models(tied)
    model = wrapper if mode == "online" else student
    batch = _batch()
    out_f, loss_f, n_f, rep_f, g_f = _step(mode, True, model, student, batch)
    out_u, loss_u, n_u, rep_u, g_u = _step(mode, False, model, student, batch)
    assert out_f.shape[-1] == STUDENT["hidden_size"] and out_u.shape[-1] >= V  # hidden states vs logits
    assert n_f == n_u and loss_f.item() == pytest.approx(loss_u.item(), rel=1e-5)
    assert set(rep_f) == set(rep_u)
    for key in rep_u:
        torch.testing.assert_close(rep_f[key], rep_u[key], rtol=1e-5, atol=1e-5, msg=key)
    assert set(g_f) == set(g_u)
    for name, g in g_u.items():
        torch.testing.assert_close(g_f[name], g, rtol=1e-4, atol=1e-6, msg=name)
    for evaluation_mode in (True,):
        with torch.no_grad():
            ev_f = _step(mode, True, model, student, batch, evaluation=evaluation_mode)
            ev_u = _step(mode, False, model, student, batch, evaluation=evaluation_mode)
        assert set(ev_f[3]) == set(ev_u[3])
        for key in ev_u[3]:
            torch.testing.assert_close(ev_f[3][key], ev_u[3][key], rtol=1e-5, atol=1e-5, msg=key)
    with torch.no_grad():  # outside the step the models still give logits
        logits = student(batch["tokens"], batch["position_ids"], None)
        assert logits.shape[-1] >= V
        assert teacher(batch["tokens"], batch["position_ids"], None).shape[-1] >= V


def test_cross_tokenizer_falls_back_to_the_unfused_head():
    from megatron_kd.distill import DistillForwardStep, KDConfig

    kd = KDConfig(fused_linear=True)
    assert DistillForwardStep("online", kd, V).fused
    kd.cross_tokenizer = "uld"
    assert not DistillForwardStep("online", kd, V).fused
    assert DistillForwardStep("none", KDConfig(fused_linear=True), V).fused  # LM only, fused too
