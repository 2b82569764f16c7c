"""The teacher side: cheap checkpoint checks with one-line errors, the vocabulary rule (identical
tokenizers or equal vocab sizes), KD over the shared real vocabulary only (columns beyond masked on
both sides, against a float64 reference), and the student's padding following the teacher's."""
import types

import pytest
import torch
import torch.nn.functional as F

from distkit import SEQ, STUDENT, TEACHER, make_teacher_checkpoint


def _tok(identity, vocab_size):
    return types.SimpleNamespace(identity=identity, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def teacher_ckpt(dist1, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "ckpt")
    make_teacher_checkpoint(path)
    return path


def test_inspect_teacher_checks_before_building(teacher_ckpt):
    from megatron_kd.distill import inspect_teacher
    from megatron_kd.models import ModelConfig

    student = ModelConfig(**STUDENT)
    spec = inspect_teacher(teacher_ckpt, student, 2, 2, SEQ)
    assert spec.model_config == ModelConfig(**TEACHER) and spec.padded_vocab_size == 256 and spec.iteration == 1
    assert spec.vocab.kd_vocab_size == 200 and not spec.vocab.tokenizer_checked
    with pytest.raises(ValueError, match="pipeline_parallel=3 does not divide model.num_layers=4"):
        inspect_teacher(teacher_ckpt, student, 1, 3, SEQ)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        inspect_teacher(teacher_ckpt, student, 1, 1, 65)
    with pytest.raises(ValueError, match="vocab_size=200 and student vocab_size=190 differ"):
        inspect_teacher(teacher_ckpt, ModelConfig(**{**STUDENT, "vocab_size": 190}), 1, 1, SEQ)
    with pytest.raises(FileNotFoundError):
        inspect_teacher(teacher_ckpt + "_missing", student, 1, 1, SEQ)


def test_vocab_rule_with_tokenizers():
    from megatron_kd.distill import check_vocab
    from megatron_kd.models import ModelConfig

    t, s = ModelConfig(**TEACHER), ModelConfig(**{**STUDENT, "vocab_size": 190})
    plan = check_vocab(t, s, _tok("A", 180), _tok("A", 180))
    assert plan.kd_vocab_size == 180 and plan.tokenizer_checked
    with pytest.raises(ValueError, match="differ"):
        check_vocab(t, s, _tok("A", 180), _tok("B", 180))
    with pytest.raises(ValueError, match="student vocab_size=190 is smaller than the tokenizer's 195"):
        check_vocab(t, s, _tok("A", 195), _tok("A", 195))


def test_student_padding_follows_the_teacher(teacher_ckpt):
    from megatron_kd.distill import inspect_teacher
    from megatron_kd.distill.teacher import student_padded_vocab
    from megatron_kd.models import ModelConfig

    student = ModelConfig(**STUDENT)
    spec = inspect_teacher(teacher_ckpt, student, 1, 1, SEQ)
    assert student_padded_vocab(spec, student, 1, None) == 256
    assert student_padded_vocab(spec, student, 1, 384) == 384  # resumed student: re-aligned at TP=1
    with pytest.raises(ValueError, match="do not line up"):
        student_padded_vocab(spec, student, 2, 384)


def test_kd_runs_over_the_shared_vocabulary_only(dist1):
    """Teacher vocab 200, student 190, tokenizer 180: ids >= 180 are masked in both logits."""
    from megatron_kd.distill import DistillationModel, DistillForwardStep, KDConfig
    from megatron_kd.distill.teacher import freeze
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import set_seed

    set_seed(8)
    student = build_gpt_model(ModelConfig(**{**STUDENT, "vocab_size": 190}), padded_vocab_size=256)
    teacher = freeze(build_gpt_model(ModelConfig(**TEACHER), padded_vocab_size=256))
    wrapper = DistillationModel(student, teacher, STUDENT["hidden_size"], TEACHER["hidden_size"])
    g = torch.Generator().manual_seed(5)
    batch = dict(tokens=torch.randint(0, 180, (2, SEQ), generator=g), labels=torch.randint(0, 180, (2, SEQ), generator=g),
                 loss_mask=torch.ones(2, SEQ), position_ids=torch.arange(SEQ).expand(2, SEQ).clone())
    kd = KDConfig(kind="reverse_kl", alpha=0.5, temperature=2.0)
    output, loss_func = DistillForwardStep("online", kd, 180)(iter([batch]), wrapper)
    loss_sum, _, report = loss_func(output)
    with torch.no_grad():  # (output holds hidden states when kd.fused_linear is on)
        s = student(batch["tokens"], batch["position_ids"], None)[..., :180].double()
        t = teacher(batch["tokens"], batch["position_ids"], None)[..., :180].double()
    log_q, log_p = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    ce = F.cross_entropy(s.reshape(-1, 180), batch["labels"].reshape(-1), reduction="none")
    assert report["kd"][0].item() == pytest.approx(rkl.sum().item(), rel=1e-5)
    assert report["lm"][0].item() == pytest.approx(ce.sum().item(), rel=1e-5)
    assert loss_sum.item() == pytest.approx(0.5 * (rkl.sum() + ce.sum()).item(), rel=1e-5)
