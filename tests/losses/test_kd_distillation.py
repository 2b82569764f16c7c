"""The distillation loss layer: alpha mixing, T^2, masks, report format, schedules, config."""
import pytest
import torch
import torch.nn.functional as F

import kd_reference as R
from megatron_kd.config import ConfigError, load_config
from megatron_kd.losses import (
    DistillationLoss,
    KDLossConfig,
    alpha_at,
    kd_loss,
    lm_loss_func,
    sparse_kd_loss,
)

V = 23


def _batch(seed=0, b=3, s=4):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, V + 3, generator=g) * 2
    teacher = torch.randn(b, s, V + 3, generator=g) * 2
    student[..., V:] = teacher[..., V:] = float("-inf")  # padded vocabulary columns
    labels = torch.randint(0, V, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.25).float()
    return student, teacher, labels, mask


def _reference_total(student, teacher, labels, mask, alpha, kind="forward_kl", temperature=1.0, t2=False):
    x = student.double().requires_grad_(True)
    ce = F.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)
    kd = R.dense(x, teacher.double(), kind, temperature)
    scale = temperature ** 2 if t2 else 1.0
    m = mask.double()
    total = ((1 - alpha) * ce * m + alpha * scale * kd * m).sum()
    (grad,) = torch.autograd.grad(total, x)
    return total.item(), (ce * m).sum().item(), (kd * m).sum().item(), grad


@pytest.mark.parametrize("alpha,kind,temperature,t2", [
    (0.3, "forward_kl", 1.0, False), (0.7, "jsd", 2.0, True), (0.5, "reverse_kl", 0.5, False),
])
def test_alpha_mixing_values_gradients_and_report(alpha, kind, temperature, t2):
    student, teacher, labels, mask = _batch()
    cfg = KDLossConfig(kind=kind, alpha=alpha, temperature=temperature, t2_scale=t2)
    x = student.clone().requires_grad_(True)
    loss_sum, count, report = DistillationLoss(cfg)(x, labels, mask, teacher_logits=teacher)
    loss_sum.backward()
    total, lm, kd, grad = _reference_total(student, teacher, labels, mask, alpha, kind, temperature, t2)
    assert count.dtype == torch.int32 and count.item() == int(mask.sum())
    assert loss_sum.item() == pytest.approx(total, rel=1e-5)
    torch.testing.assert_close(x.grad.double(), grad, rtol=1e-5, atol=1e-6)
    assert set(report) == {"lm", "kd", "total", "alpha"}
    for key, val in (("lm", lm), ("kd", kd), ("total", total)):
        assert report[key].shape == (2,) and report[key].dtype == torch.float32
        assert not report[key].requires_grad
        assert report[key][0].item() == pytest.approx(val, rel=1e-5)
        assert report[key][1].item() == count.item()
    assert report["alpha"].tolist() == pytest.approx([alpha, 1.0])
    assert torch.equal(x.detach(), student)  # logits untouched


def test_ignore_index_and_all_masked_batch():
    student, teacher, labels, mask = _batch(1)
    labels[0, 1] = -100
    mask[0, 1] = 1
    full = DistillationLoss(KDLossConfig(alpha=0.5))
    loss_sum, count, _ = full(student, labels, mask, teacher_logits=teacher)
    mask2 = mask.clone()
    mask2[0, 1] = 0
    ref_sum, ref_count, _ = full(student, labels.clamp_min(0), mask2, teacher_logits=teacher)
    assert count == ref_count and loss_sum.item() == pytest.approx(ref_sum.item(), rel=1e-6)
    x = student.clone().requires_grad_(True)
    zero_sum, zero_count, report = full(x, labels, torch.zeros_like(mask), teacher_logits=teacher)
    zero_sum.backward()
    assert zero_sum.item() == 0 and zero_count.item() == 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0
    assert all(torch.isfinite(v).all() for v in report.values())


def test_alpha_endpoints_and_missing_teacher():
    student, teacher, labels, mask = _batch(2)
    x = student.clone().requires_grad_(True)
    kd_only, _, report = DistillationLoss(KDLossConfig(alpha=1.0))(x, labels, mask, teacher_logits=teacher)
    kd_only.backward()
    kd = kd_loss(student, teacher) * mask
    assert kd_only.item() == pytest.approx(kd.sum().item(), rel=1e-6)
    assert report["lm"][0] > 0  # still reported
    _, kd_grad = R.loss_and_grad(lambda z: kd_loss(z, teacher) * mask, student)
    torch.testing.assert_close(x.grad, kd_grad)
    lm_sum, count, report = DistillationLoss(KDLossConfig(alpha=0.0))(student, labels, mask)
    ref_sum, ref_count, _ = lm_loss_func(student, labels, mask)
    assert "kd" not in report and lm_sum.item() == pytest.approx(ref_sum.item()) and count == ref_count
    with pytest.raises(ValueError, match="no teacher_logits"):
        DistillationLoss(KDLossConfig(alpha=0.2))(student, labels, mask)
    with pytest.raises(ValueError, match="either teacher_logits"):
        DistillationLoss()(student, labels, mask, teacher_logits=teacher,
                           target_ids=labels[..., None], target_logprobs=torch.zeros(3, 4, 1))


def test_sparse_targets_through_the_layer():
    student, teacher, labels, mask = _batch(3)
    ids = torch.topk(teacher, 5, dim=-1).indices
    lps = torch.log_softmax(teacher, -1).gather(-1, ids)
    for residual in (False, True):
        cfg = KDLossConfig(alpha=0.6, residual=residual)
        loss_sum, _, report = DistillationLoss(cfg)(student, labels, mask, target_ids=ids, target_logprobs=lps)
        kd = (sparse_kd_loss(student, ids, lps, residual=residual) * mask).sum()
        lm = lm_loss_func(student, labels, mask)[0]
        assert report["kd"][0].item() == pytest.approx(kd.item(), rel=1e-6)
        assert loss_sum.item() == pytest.approx(0.4 * lm.item() + 0.6 * kd.item(), rel=1e-6)


def test_lm_loss_func_matches_cross_entropy():
    student, _, labels, mask = _batch(4)
    x = student.clone().requires_grad_(True)
    loss_sum, count, report = lm_loss_func(x, labels, mask)
    ref = (F.cross_entropy(student.reshape(-1, V + 3), labels.reshape(-1), reduction="none") * mask.reshape(-1))
    assert loss_sum.item() == pytest.approx(ref.sum().item(), rel=1e-6)
    assert count.dtype == torch.int32 and count.item() == int(mask.sum())
    assert report["lm"].tolist() == pytest.approx([ref.sum().item(), mask.sum().item()], rel=1e-6)
    loss_sum.backward()
    assert torch.isfinite(x.grad).all() and x.grad[..., V:].abs().max() == 0


def test_alpha_schedules():
    const = KDLossConfig(alpha=0.7)
    assert alpha_at(const, 0, 100) == alpha_at(const, 99, 100) == pytest.approx(0.7)
    lin = KDLossConfig(alpha_schedule="linear", alpha_start=0.9, alpha_end=0.1)
    assert [alpha_at(lin, s, 100) for s in (0, 50, 100, 150, -5)] == pytest.approx([0.9, 0.5, 0.1, 0.1, 0.9])
    assert alpha_at(KDLossConfig(alpha=0.4, alpha_schedule="linear"), 30, 100) == pytest.approx(0.4)
    wsd = KDLossConfig(alpha=0.9, alpha_schedule="wsd", wsd_warmup_fraction=0.1, wsd_decay_fraction=0.2)
    got = [alpha_at(wsd, s, 100) for s in (0, 5, 10, 50, 80, 90, 100)]
    assert got == pytest.approx([0.0, 0.45, 0.9, 0.9, 0.9, 0.45, 0.0])
    wsd2 = KDLossConfig(alpha=0.8, alpha_schedule="wsd", alpha_start=0.2, alpha_end=0.4,
                        wsd_warmup_fraction=0.0, wsd_decay_fraction=0.5)
    assert [alpha_at(wsd2, s, 10) for s in (0, 5, 10)] == pytest.approx([0.8, 0.8, 0.4])
    with pytest.raises(ValueError, match="total_steps"):
        alpha_at(lin, 0, 0)
    student, teacher, labels, mask = _batch(5)
    _, _, report = DistillationLoss(wsd)(student, labels, mask, teacher_logits=teacher, step=5, total_steps=100)
    assert report["alpha"][0].item() == pytest.approx(0.45)


def test_config_validation_and_loading():
    for kwargs, match in (
        (dict(kind="kl"), "kd.kind"), (dict(alpha=1.5), "kd.alpha"), (dict(temperature=0.0), "temperature"),
        (dict(alpha_schedule="cosine"), "alpha_schedule"), (dict(residual=True, temperature=2.0), "residual"),
        (dict(wsd_warmup_fraction=0.6, wsd_decay_fraction=0.6), "wsd"),
    ):
        with pytest.raises(ValueError, match=match):
            KDLossConfig(**kwargs)
    cfg = load_config(KDLossConfig, None, ["kind=jsd", "alpha=0.9", "alpha_schedule=wsd", "t2_scale=true"])
    assert (cfg.kind, cfg.alpha, cfg.alpha_schedule, cfg.t2_scale) == ("jsd", 0.9, "wsd", True)
    with pytest.raises(ConfigError, match="kd.alpha"):
        load_config(KDLossConfig, None, ["alpha=2"])
