"""MiniLLM end to end on CPU (a small teacher clearly better than an SFT-initialised student):
reverse KL to the teacher on held-out prompts goes down and ROUGE-L goes up. TP=2 and DP=2 runs
of the trainer give the same rollouts and the same weights as TP=1."""
import numpy as np
import pytest
import torch

from dist_helpers import run_workers
from minillm_test_utils import plain, tensors


def _tiny_lm_corpus(prefix, vocab, seed=0):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(20):
        doc = rng.integers(2, vocab, size=int(rng.integers(5, 30))).astype(np.uint16)
        b.add_document(doc, [len(doc)])
    b.finalize(f"{prefix}.idx")


def _setup(tp=1, seed=0):
    from megatron_kd.posttrain.data import InMemoryInstructions, InstructionTemplate, encode_records
    from megatron_kd.posttrain.synthetic import make_records, task_tokenizer
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig(tensor_parallel=tp))
    set_seed(seed)
    tok = task_tokenizer()
    tpl = InstructionTemplate.raw()

    def ds(n, s):
        p, r = encode_records(make_records(n, s), tok, tpl)
        return InMemoryInstructions(p, r)

    return tok, ds


def _model_cfgs(vocab):
    from megatron_kd.models import ModelConfig

    common = dict(vocab_size=vocab, make_vocab_size_divisible_by=8, max_position_embeddings=64)
    teacher = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, **common)
    student = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=2, ffn_hidden_size=64, **common)
    return teacher, student


def _freeze(ddp):
    m = ddp.module
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def sft_train(model, model_cfg, data, pad, vocab, steps, **optim):
    """SFT ``model`` (a GPTModel or an earlier stage's DDP) for ``steps`` steps on the shared Trainer."""
    from megatron_kd.posttrain.config import PostTrainOptimConfig
    from megatron_kd.posttrain.sft import InstructionBatches, SFTConfig, SFTStep
    from megatron_kd.posttrain.steps import fit, setup_student

    cfg = SFTConfig(total_steps=steps, batch_size=32, micro_batch_size=32, optim=PostTrainOptimConfig(**optim))
    ddp, opt, sched = setup_student(model, cfg.optim, steps)
    batches = InstructionBatches(data, cfg, pad)
    fit(ddp, opt, sched, model_cfg, step=SFTStep(ddp, cfg, vocab), batch_size=32, total_steps=steps,
        make_iterator=lambda consumed: batches.iterator(consumed // 32))
    return ddp


def minillm_train(student, teacher, model_cfg, cfg, tok, data, vocab, lm_chunks=None, on_step=None):
    """MiniLLM (rollout source + PPO step) on the shared Trainer; returns the source."""
    from megatron_kd.posttrain.minillm import PPOStep, RolloutSource
    from megatron_kd.posttrain.steps import fit, setup_student

    ddp, opt, sched = setup_student(student, cfg.optim, cfg.total_steps)
    source = RolloutSource(ddp, teacher, cfg, tok, data, vocab, lm_chunks=lm_chunks)
    fit(ddp, opt, sched, model_cfg, step=PPOStep(ddp, teacher, cfg, vocab, lm_chunks=lm_chunks),
        batch_size=cfg.ppo.batch_size, total_steps=cfg.total_steps, make_iterator=lambda consumed: iter(source),
        on_step_end=on_step)
    return source


def test_minillm_improves_sft_student_on_synthetic_task():
    from megatron_kd.posttrain.config import MiniLLMOptimConfig
    from megatron_kd.posttrain.evaluate import EvalConfig, evaluate
    from megatron_kd.posttrain.minillm import PPOConfig, TrainLoopConfig
    from megatron_kd.posttrain.rollout import RolloutConfig
    from megatron_kd.models import build_gpt_model

    tok, ds = _setup()
    V = tok.vocab_size
    train, held = ds(2000, 0), ds(64, 1)
    tcfg, scfg = _model_cfgs(V)
    teacher = sft_train(build_gpt_model(tcfg), tcfg, train, tok.pad, V, 250, lr=3e-3, min_lr=3e-4, warmup_iters=10,
                        lr_schedule="cosine", weight_decay=0.0)
    teacher = _freeze(teacher)
    student = sft_train(build_gpt_model(scfg), scfg, train, tok.pad, V, 40, lr=3e-3, min_lr=3e-3, warmup_iters=0,
                        weight_decay=0.0)
    ev = EvalConfig(num_prompts=64, max_new_tokens=10, batch_size=64, seed=5)
    t_eval = evaluate(teacher, teacher, held, tok, ev, V)
    before = evaluate(student, teacher, held, tok, ev, V)
    assert t_eval["rouge_l"] > before["rouge_l"] + 30  # the teacher is clearly better
    cfg = TrainLoopConfig(total_steps=64, seed=3,
                          rollout=RolloutConfig(num_rollouts=64, chunk_size=64, max_prompt_length=16, max_new_tokens=10),
                          ppo=PPOConfig(epochs=4, batch_size=32, micro_batch_size=32),
                          optim=MiniLLMOptimConfig(lr=1e-3, min_lr=1e-3, warmup_iters=0, weight_decay=0.0), eval=ev)
    history = []
    minillm_train(student, teacher, scfg, cfg, tok, train, V, on_step=lambda s, st: history.append(st))
    after = evaluate(student, teacher, held, tok, ev, V)
    assert len(history) == 64 and all(np.isfinite(h["pg_loss"]) for h in history)
    assert 0.0 < np.mean([h["clip_frac"] for h in history]) < 0.6
    assert after["reverse_kl"] < 0.85 * before["reverse_kl"], (before, after)
    assert after["reverse_kl_per_token"] < 0.9 * before["reverse_kl_per_token"], (before, after)
    assert after["rouge_l"] > before["rouge_l"] + 5.0, (before, after)


def _train_worker(rank, world_size, tp, states, lm_prefix):
    from megatron_kd.posttrain.config import MiniLLMOptimConfig
    from megatron_kd.posttrain.data import LMChunks
    from megatron_kd.posttrain.minillm import LMTermConfig, PPOConfig, RolloutSource, TrainLoopConfig
    from megatron_kd.posttrain.rollout import RolloutConfig
    from megatron_kd.models import build_gpt_model
    from megatron_kd.models.sharding import gather_full_state, load_full_state
    from megatron_kd.posttrain.steps import dp_info

    tok, ds = _setup(tp, seed=1)
    V = tok.vocab_size
    tcfg, scfg = _model_cfgs(V)
    teacher, student = build_gpt_model(tcfg), build_gpt_model(scfg)
    load_full_state(teacher, states[0], tcfg)
    load_full_state(student, states[1], scfg)
    teacher.eval()
    dp_rank, dp_size, _ = dp_info()
    cfg = TrainLoopConfig(total_steps=2, seed=4,
                          rollout=RolloutConfig(num_rollouts=8, chunk_size=4 // dp_size, max_prompt_length=16,
                                                max_new_tokens=6),
                          ppo=PPOConfig(epochs=2, batch_size=8, micro_batch_size=4 // dp_size),
                          lm=LMTermConfig(data=lm_prefix, micro_batch_size=2 // dp_size, seq_length=12, kd_ratio=0.5),
                          optim=MiniLLMOptimConfig(lr=1e-3, min_lr=1e-3, warmup_iters=0, adam_eps=1e-4,
                                                   weight_decay=0.0))
    chunks = LMChunks(lm_prefix, 12, seed=2, dp_rank=0)
    if dp_size > 1:  # both DP ranks draw the same LM chunks here; give each its half
        orig = chunks.next_batch
        chunks.next_batch = lambda n: {k: v[dp_rank * n:(dp_rank + 1) * n] for k, v in orig(n * dp_size).items()}
    data = ds(40, 0)
    r = RolloutSource(student, teacher, cfg, tok, data, V).collect_round()  # round 0, as training sees it
    stats = []
    source = minillm_train(student, teacher, scfg, cfg, tok, data, V, lm_chunks=chunks,
                           on_step=lambda s, st: stats.append(st))
    full = gather_full_state(source.student.module, scfg)
    return plain({"tokens": r.tokens, "adv": r.advantages, "state": full, "stats": stats})


def _initial_states():
    from megatron_kd.posttrain.synthetic import task_tokenizer
    from megatron_kd.models import build_gpt_model
    from megatron_kd.models.sharding import gather_full_state
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig())
    set_seed(7)
    tcfg, scfg = _model_cfgs(task_tokenizer().vocab_size)
    return [gather_full_state(build_gpt_model(c), c) for c in (tcfg, scfg)]


@pytest.mark.slow
def test_trainer_tp2_and_dp2_equal_tp1(tmp_path):
    from megatron_kd.posttrain.synthetic import task_tokenizer

    prefix = str(tmp_path / "lm")
    _tiny_lm_corpus(prefix, task_tokenizer().vocab_size)
    states = _initial_states()
    ref = tensors(_train_worker(0, 1, 1, states, prefix))  # TP=1 reference in this process
    assert any(not torch.equal(ref["state"][k], states[1][k]) for k in ref["state"])
    for tp in (2, 1):  # TP=2 (DP=1), then DP=2 (TP=1)
        outs = tensors(run_workers(_train_worker, 2, tp, states, prefix))
        for rank, out in enumerate(outs):
            if tp == 2:
                assert torch.equal(out["tokens"], ref["tokens"])
                torch.testing.assert_close(out["adv"], ref["adv"], atol=2e-5, rtol=0)
            else:  # each DP rank holds half of the round
                half = ref["tokens"].shape[0] // 2
                rows = slice(rank * half, (rank + 1) * half)
                w = out["tokens"].shape[1]
                assert torch.equal(out["tokens"], ref["tokens"][rows, :w])
                torch.testing.assert_close(out["adv"], ref["adv"][rows, : w - 1], atol=2e-5, rtol=0)
            for k, v in ref["state"].items():
                torch.testing.assert_close(out["state"][k], v, atol=2e-5, rtol=0, msg=lambda m: f"{tp} {k}: {m}")
            for a, b in zip(out["stats"], ref["stats"]):
                for key in ("pg_loss", "single_step_kl", "lm_ce", "lm_kd"):
                    assert abs(a[key] - b[key]) < 1e-4, (tp, key, a[key], b[key])
