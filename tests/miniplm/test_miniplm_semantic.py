"""Difference sampling does what the paper says, on models that really learned something.

Two synthetic "languages" over one 64-token vocabulary: A and B are different sparse Markov
chains (each token has 3 possible successors). The teacher is trained on A+B, the reference on
A only. On a fresh mixed corpus the teacher predicts both well, the reference only A, so
r = NLL_ref - NLL_teacher is large on B and near zero on A: selection at alpha = 0.5 must keep
(almost) only B. No formula of the inputs can produce this without the two trained models.
"""
import numpy as np
import torch

from dist_helpers import run_workers
from miniplm_testlib import make_dataset

V, DOC_LEN, CHUNK = 64, 64, 32
SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
             vocab_size=V, max_position_embeddings=128)


def _chain(seed):
    rng = np.random.default_rng(seed)
    succ = np.stack([rng.choice(V, 3, replace=False) for _ in range(V)])
    return succ


def _sample(succ, n_docs, rng):
    docs = np.empty((n_docs, DOC_LEN), dtype=np.int64)
    docs[:, 0] = rng.integers(0, V, n_docs)
    for t in range(1, DOC_LEN):
        docs[:, t] = succ[docs[:, t - 1], rng.integers(0, 3, n_docs)]
    return docs


def _train(docs, steps, seed):
    """Tiny self-contained trainer: AdamW on the megatron GPTModel at TP=1 (CPU)."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import set_seed

    set_seed(seed)
    cfg = ModelConfig(**SHAPE)
    model = build_gpt_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    pos = torch.arange(DOC_LEN - 1)[None].expand(16, -1)
    for _ in range(steps):
        batch = torch.from_numpy(docs[rng.integers(0, len(docs), 16)])
        logits = model(batch[:, :-1], pos, None)[..., :V]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, cfg, float(loss)


def _worker(rank, world_size, root):
    from megatron_kd.miniplm.score import ScoreConfig, score_corpus
    from megatron_kd.miniplm.select import SelectConfig, select_corpus
    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    rng = np.random.default_rng(0)
    chain_a, chain_b = _chain(1), _chain(2)
    train_a, train_b = _sample(chain_a, 400, rng), _sample(chain_b, 400, rng)
    teacher, tcfg, t_loss = _train(np.concatenate([train_a, train_b]), 200, seed=1)
    reference, rcfg, r_loss = _train(train_a, 120, seed=2)
    save_checkpoint(f"{root}/teacher", [teacher], tcfg, 200, tokenizer="markov-64")
    save_checkpoint(f"{root}/reference", [reference], rcfg, 120, tokenizer="markov-64")
    # the scored corpus: fresh documents, A and B interleaved, labelled by domain
    test_a, test_b = _sample(chain_a, 30, rng), _sample(chain_b, 30, rng)
    docs, domains = [], []
    for a, b in zip(test_a, test_b):
        docs += [a, b]
        domains += ["A", "B"]
    data = make_dataset(f"{root}/mixed", docs, domains, tokenizer="markov-64")
    score_corpus(ScoreConfig(teacher=f"{root}/teacher", reference=f"{root}/reference", data=data,
                             out=f"{root}/scores", chunk_length=CHUNK, shard_size=64, micro_batch_size=8))
    report = select_corpus(SelectConfig(scores=f"{root}/scores", alpha=0.5, out=f"{root}/refined"))
    return report, t_loss, r_loss


def test_difference_sampling_keeps_what_only_the_teacher_knows(tmp_path):
    (report, t_loss, r_loss), = run_workers(_worker, 1, str(tmp_path))
    assert t_loss < 1.6 and r_loss < 1.4  # both learned their data (uniform would be ln 64 = 4.16)
    dom = report["domains"]
    assert report["num_instances"] == 120 and report["kept_instances"] == 60
    kept_b = dom["B"]["kept_instances"] / report["kept_instances"]
    assert kept_b >= 0.8, report["domains"]  # the bar; in practice it is 1.0
    assert dom["B"]["mean_r"] - dom["A"]["mean_r"] > 1.0  # a wide margin in nats/token
    assert abs(dom["A"]["mean_r"]) < 0.5  # both models know A about equally well
