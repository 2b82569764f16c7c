"""Word-level KD, GKD and DistiLLM on the rollout machinery: source schedules (lambda, adaptive threshold, replay
buffer), the per-token losses against float64 references, and a few training steps that lower the
divergence to the teacher on a fixed batch."""
import json

import numpy as np
import pytest
import torch

V, PAD = 24, 18


@pytest.fixture(scope="module")
def setup():
    from megatron_kd.posttrain.data import InMemoryInstructions, InstructionTemplate, encode_records
    from megatron_kd.posttrain.synthetic import make_records, task_tokenizer
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig())
    set_seed(3)
    tok = task_tokenizer()
    p, r = encode_records(make_records(200, 0), tok, InstructionTemplate.raw())
    common = dict(vocab_size=tok.vocab_size, make_vocab_size_divisible_by=8, max_position_embeddings=64)
    teacher = build_gpt_model(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, **common))
    teacher.eval()
    student_cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, **common)
    return tok, InMemoryInstructions(p, r), teacher, lambda: build_gpt_model(student_cfg)


class _Distiller:
    """A GKD / DistiLLM run in memory: the response source (its attributes are reachable here), the
    divergence step, and ``train`` on the shared Trainer."""

    def __init__(self, setup, **kw):
        from megatron_kd.posttrain.config import PostTrainOptimConfig
        from megatron_kd.posttrain.onpolicy import DivergenceStep, OnPolicyConfig, ResponseSource
        from megatron_kd.posttrain.steps import setup_student

        tok, data, teacher, make_student = setup
        cfg = OnPolicyConfig(total_steps=kw.pop("total_steps", 100), batch_size=8, micro_batch_size=4,
                             max_new_tokens=6, optim=PostTrainOptimConfig(lr=3e-3, warmup_iters=0, weight_decay=0.0),
                             **kw)
        self.model = make_student()
        self.ddp, self.opt, self.sched = setup_student(self.model, cfg.optim, cfg.total_steps)
        self.source = ResponseSource(self.ddp, teacher, cfg, data, tok, tok.vocab_size)
        self.step_fn = DivergenceStep(self.ddp, teacher, cfg, tok.pad, tok.eod, tok.vocab_size)
        self._loss = self.step_fn.loss

    def __getattr__(self, name):
        return getattr(self.__dict__["source"], name)

    def __setattr__(self, name, value):
        if name == "step":
            self.source.step = value
        else:
            object.__setattr__(self, name, value)

    def train(self, on_step=None):
        from megatron_kd.posttrain.steps import fit

        c = self.source.cfg
        fit(self.ddp, self.opt, self.sched, self.model.config, step=self.step_fn, batch_size=c.batch_size,
            total_steps=c.total_steps, make_iterator=lambda consumed: self.source.iterator(consumed // c.batch_size),
            on_step_end=on_step)


def _distiller(setup, **kw):
    return _Distiller(setup, **kw)


def _ref_jsd(s, t, beta, temp):
    """TRL's generalised JSD: beta=0 is KL(teacher || student), beta=1 is KL(student || teacher)."""
    lq, lp = torch.log_softmax(s.double() / temp, -1), torch.log_softmax(t.double() / temp, -1)
    if beta == 0:
        return (lp.exp() * (lp - lq)).sum(-1)
    if beta == 1:
        return (lq.exp() * (lq - lp)).sum(-1)
    lm = torch.logsumexp(torch.stack([lp + np.log(beta), lq + np.log(1 - beta)]), 0)
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)


def _ref_skew(s, t, a, reverse):
    lq, lp = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    if reverse:  # KL(q || a q + (1-a) p)
        mix = (a * lq.exp() + (1 - a) * lp.exp()).log()
        return (lq.exp() * (lq - mix)).sum(-1)
    mix = (a * lp.exp() + (1 - a) * lq.exp()).log()  # KL(p || a p + (1-a) q)
    return (lp.exp() * (lp - mix)).sum(-1)


@pytest.mark.parametrize("method,loss,beta", [("gkd", None, 0.0), ("gkd", None, 0.5), ("gkd", None, 1.0),
                                              ("distillm", "skl", None), ("distillm", "srkl", None)])
def test_losses_equal_float64_reference(setup, method, loss, beta):
    kw = {"loss": loss} if loss else {"beta": beta}
    d = _distiller(setup, method=method, **kw)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, V, generator=g) * 2
    t = torch.randn(2, 5, V, generator=g) * 2
    t[..., PAD:] = float("-inf")
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    x = s.clone().requires_grad_(True)
    n = mask.sum()
    out, _, stats = d._loss({"loss_mask": mask}, t, x, n)
    out.backward()
    c = d.cfg
    if method == "gkd":
        ref_fn = lambda z: _ref_jsd(z[..., :PAD], t[..., :PAD], c.beta, c.temperature)  # noqa: E731
    else:
        ref_fn = lambda z: _ref_skew(z[..., :PAD], t[..., :PAD], c.skew_alpha, loss == "srkl")  # noqa: E731
    ref_in = s.double().requires_grad_(True)
    ref = (ref_fn(ref_in) * mask).sum() / n
    ref.backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-5)
    assert out.item() > 1e-3  # GKD at beta 0 / 1 trains on something (the endpoints were once exactly 0)


def test_sources_gkd_lambda_and_distillm_threshold(setup):
    d = _distiller(setup, method="gkd", lmbda=0.5)
    draws = []
    for step in range(400):
        d.step = step
        draws.append(d.choose_source())
    frac = np.mean([x == "student" for x in draws])
    assert abs(frac - 0.5) < 0.08 and set(draws) == {"student", "gold"}
    d = _distiller(setup, method="gkd", lmbda=0.0, seq_kd=True)
    assert d.choose_source() == "teacher"
    d = _distiller(setup, method="distillm", init_threshold=0.0, total_steps=10)
    assert all(d.choose_source() == "gold" for d.step in range(10))
    d.update_threshold(1.0)
    d.update_threshold(1.05)  # below loss_eps: unchanged
    assert d.threshold == 0.0
    d.update_threshold(1.2)
    assert d.threshold == pytest.approx(0.1)
    d = _distiller(setup, method="distillm", init_threshold=1.0, total_steps=10)
    d.step = 0
    assert d.choose_source() == "student"
    pairs = d.examples("student")
    assert len(d.buffer) == 8 and d.buffer == pairs
    assert all(len(r) <= 6 for _, r in pairs)
    d.step = 9  # late in training student generation is rare: replay from the buffer instead
    assert d.choose_source() in ("replay", "gold")
    assert all(p in d.buffer for p in d.examples("replay"))


@pytest.mark.parametrize("method", ["gkd", "distillm"])
def test_training_lowers_divergence_on_fixed_batch(setup, method):
    from megatron_kd.posttrain.data import sft_batch
    from megatron_kd.posttrain.generation import forward_logits

    tok, data, teacher, _ = setup
    d = _distiller(setup, method=method, lmbda=1.0, init_threshold=1.0, total_steps=12)
    b = sft_batch([data.prompt(i) for i in range(16)], [data.response(i) for i in range(16)], tok.pad)

    def divergence():
        s = forward_logits(d.student, b["tokens"], tok.vocab_size)
        t = forward_logits(teacher, b["tokens"], tok.vocab_size)
        loss, _, _ = d._loss(b, t, s, b["loss_mask"].sum())
        return loss.item()

    before = divergence()
    stats = []
    d.train(on_step=lambda s, st: stats.append(st))
    assert d.step == 12 and all(np.isfinite(s["loss"]) for s in stats)
    assert sum(s["source_student"] for s in stats) >= 6
    assert divergence() < 0.9 * before


def test_cli_onpolicy_gkd_and_distillm(tmp_path, setup):
    from megatron_kd.cli import main
    from megatron_kd.posttrain.synthetic import make_records, task_tokenizer, write_jsonl
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.training.checkpoint import read_checkpoint_meta, save_checkpoint

    tok = task_tokenizer()
    tok.save(tmp_path / "tok.json")
    for split, n in (("train", 32), ("valid", 8)):
        write_jsonl(make_records(n, n), tmp_path / f"{split}.jsonl")
        assert main(["preprocess-instructions", "--input", str(tmp_path / f"{split}.jsonl"), "--tokenizer",
                     str(tmp_path / "tok.json"), "--template", "raw", "--output-prefix", str(tmp_path / split)]) == 0
    for name, layers in (("teacher", 2), ("student", 1)):
        cfg = ModelConfig(num_layers=layers, hidden_size=32, num_attention_heads=2, vocab_size=tok.vocab_size,
                          make_vocab_size_divisible_by=8, max_position_embeddings=64)
        save_checkpoint(tmp_path / name, [build_gpt_model(cfg)], cfg, 0, tokenizer=str(tmp_path / "tok.json"))
    for method in ("gkd", "distillm"):
        out = tmp_path / method
        assert main(["onpolicy", f"student={tmp_path / 'student'}", f"teacher={tmp_path / 'teacher'}",
                     f"train_data={tmp_path / 'train'}", f"valid_data={tmp_path / 'valid'}",
                     f"eval_data={tmp_path / 'valid'}", f"save={out}", f"onpolicy.method={method}",
                     "onpolicy.total_steps=3", "onpolicy.batch_size=4", "onpolicy.micro_batch_size=2",
                     "onpolicy.max_new_tokens=4", "onpolicy.init_threshold=0.5", "eval_interval=2",
                     "eval.num_prompts=4", "eval.max_new_tokens=4"]) == 0
        assert read_checkpoint_meta(out)["iteration"] == 3
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
        valid = [r for r in records if r["split"] == "valid"]
        assert [r["step"] for r in valid] == [2, 3] and all("rouge_l" in r and "valid_loss" in r for r in valid)
    assert main(["onpolicy", f"student={tmp_path / 'student'}", "onpolicy.method=ppo"]) == 2


def test_word_level_kd_loss_equals_float64_reference(setup):
    """SFT baseline with word-level KD: (1 - r) CE + r KL(p || q) on response tokens."""
    from megatron_kd.posttrain.sft import SFTConfig, SFTStep

    tok, data, teacher, make_student = setup
    tr = SFTStep(make_student(), SFTConfig(total_steps=1, batch_size=8, micro_batch_size=8, kd_ratio=0.5,
                                           kd_temperature=2.0), V, teacher=teacher)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 5, V, generator=g) * 2
    t = torch.randn(2, 5, V, generator=g) * 2
    s[..., PAD:] = t[..., PAD:] = float("-inf")
    labels = torch.randint(0, PAD, (2, 5), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float32)
    x = s.clone().requires_grad_(True)
    out, _, _ = tr.loss({"loss_mask": mask, "labels": labels}, t, x, mask.sum())
    out.backward()
    ref_in = s.double().requires_grad_(True)
    lq = torch.log_softmax(ref_in[..., :PAD], -1)
    ce = -lq.gather(-1, labels[..., None]).squeeze(-1)
    lq_t, lp_t = torch.log_softmax(ref_in[..., :PAD] / 2.0, -1), torch.log_softmax(t.double()[..., :PAD] / 2.0, -1)
    kl = (lp_t.exp() * (lp_t - lq_t)).sum(-1)
    ref = ((0.5 * ce + 0.5 * kl) * mask).sum() / mask.sum()
    ref.backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_in.grad, atol=1e-6, rtol=1e-5)
