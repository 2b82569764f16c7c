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
    from megatron_kd.minillm.data import InMemoryInstructions, InstructionTemplate, encode_records
    from megatron_kd.minillm.synthetic import make_records, task_tokenizer
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


def test_minillm_improves_sft_student_on_synthetic_task():
    from megatron_kd.minillm.baselines import SFTConfig, SFTTrainer
    from megatron_kd.minillm.evaluate import EvalConfig, evaluate
    from megatron_kd.minillm.optim import OptimConfig, wrap_model
    from megatron_kd.minillm.rollout import RolloutConfig
    from megatron_kd.minillm.trainer import MiniLLMTrainer, PPOConfig, TrainLoopConfig
    from megatron_kd.models import build_gpt_model

    tok, ds = _setup()
    V = tok.vocab_size
    train, held = ds(2000, 0), ds(64, 1)
    tcfg, scfg = _model_cfgs(V)
    teacher = wrap_model(build_gpt_model(tcfg))
    sft = SFTTrainer(teacher, SFTConfig(total_steps=250, batch_size=32, micro_batch_size=32,
                                        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10, schedule="cosine",
                                                          weight_decay=0.0)), train, tok.pad, V)
    sft.train()
    teacher = _freeze(teacher)
    student = wrap_model(build_gpt_model(scfg))
    SFTTrainer(student, SFTConfig(total_steps=40, batch_size=32, micro_batch_size=32,
                                  optim=OptimConfig(lr=3e-3, min_lr=3e-3, warmup_steps=0, weight_decay=0.0)),
               train, tok.pad, V).train()
    ev = EvalConfig(num_prompts=64, max_new_tokens=10, batch_size=64, seed=5)
    t_eval = evaluate(teacher, teacher, held, tok, ev, V)
    before = evaluate(student, teacher, held, tok, ev, V)
    assert t_eval["rouge_l"] > before["rouge_l"] + 30  # the teacher is clearly better
    cfg = TrainLoopConfig(total_steps=64, seed=3,
                          rollout=RolloutConfig(num_rollouts=64, chunk_size=64, max_prompt_length=16, max_new_tokens=10),
                          ppo=PPOConfig(epochs=4, batch_size=32, micro_batch_size=32),
                          optim=OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, weight_decay=0.0), eval=ev)
    trainer = MiniLLMTrainer(student, teacher, cfg, tok, train, V, eval_data=held)
    history = []
    trainer.train(on_step=lambda s, st: history.append(st))
    after = trainer.evaluate()
    assert len(history) == 64 and all(np.isfinite(h["pg_loss"]) for h in history)
    assert 0.0 < np.mean([h["clip_frac"] for h in history]) < 0.6
    assert after["reverse_kl"] < 0.85 * before["reverse_kl"], (before, after)
    assert after["reverse_kl_per_token"] < 0.9 * before["reverse_kl_per_token"], (before, after)
    assert after["rouge_l"] > before["rouge_l"] + 5.0, (before, after)


def _train_worker(rank, world_size, tp, states, lm_prefix):
    from megatron_kd.minillm.data import LMChunks
    from megatron_kd.minillm.optim import OptimConfig, wrap_model
    from megatron_kd.minillm.rollout import RolloutConfig
    from megatron_kd.minillm.trainer import LMTermConfig, MiniLLMTrainer, PPOConfig, TrainLoopConfig
    from megatron_kd.models import build_gpt_model
    from megatron_kd.models.sharding import gather_full_state, load_full_state
    from megatron_kd.minillm.steps import dp_info

    tok, ds = _setup(tp, seed=1)
    V = tok.vocab_size
    tcfg, scfg = _model_cfgs(V)
    teacher, student = build_gpt_model(tcfg), build_gpt_model(scfg)
    load_full_state(teacher, states[0], tcfg)
    load_full_state(student, states[1], scfg)
    teacher.eval()
    student = wrap_model(student)
    dp_rank, dp_size, _ = dp_info()
    cfg = TrainLoopConfig(total_steps=2, seed=4,
                          rollout=RolloutConfig(num_rollouts=8, chunk_size=4 // dp_size, max_prompt_length=16,
                                                max_new_tokens=6),
                          ppo=PPOConfig(epochs=2, batch_size=8, micro_batch_size=4 // dp_size),
                          lm=LMTermConfig(data=lm_prefix, micro_batch_size=2 // dp_size, seq_length=12, kd_ratio=0.5),
                          optim=OptimConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, adam_eps=1e-4, weight_decay=0.0))
    chunks = LMChunks(lm_prefix, 12, seed=2, dp_rank=0)
    if dp_size > 1:  # both DP ranks draw the same LM chunks here; give each its half
        orig = chunks.next_batch
        chunks.next_batch = lambda n: {k: v[dp_rank * n:(dp_rank + 1) * n] for k, v in orig(n * dp_size).items()}
    trainer = MiniLLMTrainer(student, teacher, cfg, tok, ds(40, 0), V, lm_chunks=chunks)
    r = trainer.collect_round()
    stats = []
    trainer.train(on_step=lambda s, st: stats.append(st))
    full = gather_full_state(student.module, scfg)
    return plain({"tokens": r.tokens, "adv": r.advantages, "state": full, "stats": stats})


def _initial_states():
    from megatron_kd.minillm.synthetic import task_tokenizer
    from megatron_kd.models import build_gpt_model
    from megatron_kd.models.sharding import gather_full_state
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig())
    set_seed(7)
    tcfg, scfg = _model_cfgs(task_tokenizer().vocab_size)
    return [gather_full_state(build_gpt_model(c), c) for c in (tcfg, scfg)]


@pytest.mark.slow
def test_trainer_tp2_and_dp2_equal_tp1(tmp_path):
    from megatron_kd.minillm.synthetic import task_tokenizer

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
