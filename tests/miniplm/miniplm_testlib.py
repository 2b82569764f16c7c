"""Shared helpers of the MiniPLM tests: tiny datasets, checkpoints, float64 reference scores."""
from __future__ import annotations

import numpy as np
import torch

VOCAB = 300
TEACHER = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
               vocab_size=VOCAB, add_qkv_bias=True, max_position_embeddings=256)
REFERENCE = dict(num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64,
                 vocab_size=VOCAB, max_position_embeddings=256)


def make_dataset(prefix, docs, domains=None, tokenizer="test-tokenizer"):
    """Write ``docs`` (list of int arrays) as an indexed dataset with meta + manifest."""
    from megatron_kd.miniplm.dataset_io import IndexedDatasetWriter

    with IndexedDatasetWriter(prefix, np.int32, {"tokenizer": tokenizer}) as w:
        for i, d in enumerate(docs):
            w.add(np.asarray(d), {"domain": domains[i]} if domains is not None else {})
    return str(prefix)


def random_docs(n, min_len, max_len, seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(min_len, max_len + 1))) for _ in range(n)]


def save_models_worker(rank, world_size, out_dir, seed=0, tokenizer=("test-tokenizer", "test-tokenizer")):
    """TP=1 worker: random teacher and reference checkpoints in out_dir/{teacher,reference}."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    paths = []
    for i, (name, shape) in enumerate((("teacher", TEACHER), ("reference", REFERENCE))):
        set_seed(seed + i)
        cfg = ModelConfig(**shape)
        model = build_gpt_model(cfg)
        save_checkpoint(f"{out_dir}/{name}", [model], cfg, 3, tokenizer=tokenizer[i])
        paths.append(f"{out_dir}/{name}")
    return paths


def float64_mean_nll(model, vocab_size, tokens) -> float:
    """Reference score: one unpadded forward, float64 log-softmax over the real vocabulary (TP=1)."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
    pos = torch.arange(ids.shape[1] - 1)[None]
    with torch.no_grad():
        logits = model(ids[:, :-1], pos, None)[0, :, :vocab_size].double()
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(nll.mean())
