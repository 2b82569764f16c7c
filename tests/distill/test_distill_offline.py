"""Offline KD from stored sparse targets equals online forward-KL KD when the targets are the full
teacher distribution: the loss layer against a float64 reference (loss and gradients), and whole
training curves through the megatron-core schedule (offline batches vs. a live teacher)."""
import pytest
import torch
import torch.nn.functional as F

from distkit import SEQ, STUDENT, TEACHER, build, distill_config, fit, make_teacher_checkpoint

V = STUDENT["vocab_size"]


def _models():
    from megatron_kd.distill import DistillationModel
    from megatron_kd.distill.teacher import freeze
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import set_seed

    set_seed(3)
    student = build_gpt_model(ModelConfig(**STUDENT))
    teacher = freeze(build_gpt_model(ModelConfig(**TEACHER)))
    return student, teacher, DistillationModel(student, teacher, STUDENT["hidden_size"], TEACHER["hidden_size"])


def _batch(b=2):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (b, SEQ), generator=g)
    labels = torch.randint(0, V, (b, SEQ), generator=g)
    loss_mask = torch.ones(b, SEQ)
    loss_mask[0, :3] = 0
    loss_mask[1, -2:] = 0
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                position_ids=torch.arange(SEQ).expand(b, SEQ).clone())


def _loss_and_grads(step, batch, model, student):
    student.zero_grad(set_to_none=True)
    output, loss_func = step(iter([batch]), model)
    loss_sum, num_tokens, report = loss_func(output)
    loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
    return output.detach(), loss_sum.detach(), int(num_tokens), report, grads


def _full_targets(teacher, batch, shuffle=False, pad=0):
    """Store-shaped targets [b, s, V (+pad)] holding the whole teacher distribution at T=1."""
    with torch.no_grad():
        logits = teacher(batch["tokens"], batch["position_ids"], None)[..., :V].float()
    lp = torch.log_softmax(logits, dim=-1)
    ids = torch.arange(V).expand_as(lp).clone()
    if shuffle:  # a store gives its ids in any order
        perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
        ids, lp = ids[..., perm], lp[..., perm]
    if pad:
        ids = torch.cat([ids, torch.full((*ids.shape[:-1], pad), -1)], dim=-1)
        lp = torch.cat([lp, torch.full((*lp.shape[:-1], pad), float("-inf"))], dim=-1)
    return dict(batch, target_ids=ids, target_logprobs=lp)


@pytest.mark.parametrize("temperature,t2", [(1.0, False), (2.0, True)])
def test_offline_full_targets_equal_online_forward_kl(dist1, temperature, t2):
    from megatron_kd.distill import DistillForwardStep, KDConfig

    student, teacher, wrapper = _models()
    kd = KDConfig(kind="forward_kl", alpha=0.7, temperature=temperature, t2_scale=t2)
    batch = _batch()
    out, on_loss, on_n, on_rep, on_grads = _loss_and_grads(DistillForwardStep("online", kd, V), batch, wrapper,
                                                           student)
    # float64 reference: (1 - a) CE + a [T^2] KL(softmax(t/T) || softmax(s/T)), summed over unmasked tokens
    with torch.no_grad():  # (out holds hidden states when kd.fused_linear is on)
        s64 = student(batch["tokens"], batch["position_ids"], None)[..., :V].double()
    with torch.no_grad():
        t64 = teacher(batch["tokens"], batch["position_ids"], None)[..., :V].double()
    p = F.softmax(t64 / temperature, -1)
    kl = (p * (F.log_softmax(t64 / temperature, -1) - F.log_softmax(s64 / temperature, -1))).sum(-1)
    ce = F.cross_entropy(s64.reshape(-1, V), batch["labels"].reshape(-1), reduction="none").view(kl.shape)
    mask = batch["loss_mask"].bool()
    ref = (0.3 * ce + 0.7 * (temperature ** 2 if t2 else 1.0) * kl)[mask].sum()
    assert on_n == int(mask.sum())
    assert on_loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert on_rep["kd"][0].item() == pytest.approx(kl[mask].sum().item(), rel=1e-5)

    for shuffle, pad in ((False, 0), (True, 5)):
        step = DistillForwardStep("offline", kd, V)
        _, off_loss, off_n, off_rep, off_grads = _loss_and_grads(step, _full_targets(teacher, batch, shuffle, pad),
                                                                 student, student)
        assert off_n == on_n
        assert off_loss.item() == pytest.approx(on_loss.item(), rel=1e-5)
        for key in ("lm", "kd", "total", "alpha"):
            torch.testing.assert_close(off_rep[key], on_rep[key], rtol=1e-5, atol=1e-6)
        for name, g in on_grads.items():
            torch.testing.assert_close(off_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_none_mode_is_the_lm_loss(dist1):
    from megatron_kd.distill import DistillForwardStep, KDConfig

    student, _, _ = _models()
    batch = _batch()
    _, loss, n, report, _ = _loss_and_grads(DistillForwardStep("none", KDConfig(), V), batch, student, student)
    with torch.no_grad():  # the step's output is the hidden states (fused head): logits from a plain forward
        out = student(batch["tokens"], batch["position_ids"], None)
    ce = F.cross_entropy(out[..., :V].double().reshape(-1, V), batch["labels"].reshape(-1), reduction="none")
    assert loss.item() == pytest.approx(ce[batch["loss_mask"].reshape(-1).bool()].sum().item(), rel=1e-6)
    assert "kd" not in report


class _TargetsIterator:
    """Synthetic batches plus the (full-distribution) targets a logits store would give for them."""

    def __init__(self, batches, teacher):
        self.batches, self.teacher = batches, teacher

    def __iter__(self):
        return self

    def __next__(self):
        return _full_targets(self.teacher, next(self.batches), shuffle=True, pad=3)


def test_offline_training_curve_equals_online(dist1, tmp_path):
    from megatron_kd.distill.run import prepare_distill_config
    from megatron_kd.distill.teacher import load_teacher

    make_teacher_checkpoint(str(tmp_path / "teacher"))
    online = distill_config(str(tmp_path / "teacher"))
    trainer, make_train, make_valid, state = build(online)
    want, _ = fit(trainer, make_train, make_valid)
    teacher = load_teacher(prepare_distill_config(online)[1])

    offline = distill_config(str(tmp_path / "teacher"))
    trainer, make_train, make_valid, _ = build(offline, state, mode="offline")
    assert not hasattr(trainer.model_chunks[0], "teacher")  # the student alone
    got, _ = fit(trainer, lambda consumed: _TargetsIterator(make_train(consumed), teacher), make_valid)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        for key in ("lm", "kd", "total", "alpha"):
            assert g[key] == pytest.approx(w[key], abs=2e-5), key
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)
