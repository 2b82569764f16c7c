"""Shared pieces of the logits-store tests: a tiny peaked teacher, a tiny indexed dataset, GPT
samples, and a float64 reference of the stored targets computed from direct teacher forwards."""
from __future__ import annotations

import os
import types

import numpy as np
import torch

TEACHER = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
               vocab_size=1000, max_position_embeddings=256)
DOC_LENGTHS = [1, 2, 5, 64, 65, 66, 150, 300, 7, 120, 33, 200, 3, 90]
EOD = 0
SEQ, OVERLAP = 64, 16
TOP_P, TOP_K = 0.9, 40


def make_teacher(rank, world_size, ckpt_dir):
    """Save a random teacher whose logits are peaked enough to give 1..TOP_K kept ids."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    set_seed(3)
    cfg = ModelConfig(**TEACHER)
    model = build_gpt_model(cfg)
    with torch.no_grad():
        # Random weights give nearly uniform distributions; a wide output layer, scaled per
        # vocabulary row, gives a realistic mix of sharp and flat ones.
        w = model.output_layer.weight
        w.mul_(torch.linspace(2.0, 30.0, w.shape[0])[torch.randperm(w.shape[0])].unsqueeze(1))
    save_checkpoint(ckpt_dir, [model], cfg, iteration=1, tokenizer="synthetic-1000")
    return True


def make_dataset(prefix: str, tokenizer_identity: str = "synthetic-tokenizer-A") -> None:
    """Indexed dataset of DOC_LENGTHS random documents, each ending in EOD, with a manifest like
    the one ``megatron-kd preprocess`` writes (tokenizer identity, checksums)."""
    import json

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_kd.utils.io import sha256_file

    rng = np.random.default_rng(0)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in DOC_LENGTHS:
        x = rng.integers(1, TEACHER["vocab_size"], n)
        x[-1] = EOD
        b.add_document(torch.from_numpy(x.astype(np.int64)), [n])
    b.finalize(prefix + ".idx")
    with open(prefix + ".manifest.json", "w") as fh:
        json.dump({"format": "megatron-kd/indexed-dataset", "num_documents": len(DOC_LENGTHS),
                   "num_tokens": sum(DOC_LENGTHS), "dtype": "uint16",
                   "tokenizer": {"identity": tokenizer_identity, "path": "synthetic"},
                   "checksums": {"bin": sha256_file(prefix + ".bin"), "idx": sha256_file(prefix + ".idx")}}, fh)


def gpt_dataset(prefix: str, seed: int, seq_length: int, num_samples: int, cache: str):
    """A megatron GPTDataset over the whole indexed dataset."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    tok = types.SimpleNamespace(eod=EOD, pad=-1, vocab_size=TEACHER["vocab_size"], unique_identifiers={"t": 1},
                                special_tokens_dict={})
    cfg = GPTDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
                           tokenizer=tok, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                           path_to_cache=cache, mid_level_dataset_surplus=0.005)
    ds = IndexedDataset(prefix)
    return GPTDataset(ds, prefix, np.arange(len(ds), dtype=np.int32), num_samples, Split.train, cfg)


def window_start(o: int, seq: int = SEQ, overlap: int = OVERLAP) -> int:
    """Closed form of the documented window rule: the teacher context of position o starts here."""
    stride = seq - overlap
    return max(0, (o - overlap) // stride) * stride


def reference_worker(rank, world_size, ckpt_dir, prefix):
    """Direct teacher forwards (TP=1) -> per document float64 log-softmax [L-1, V] of every target."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.training.checkpoint import load_model_for_inference

    init_distributed(ParallelConfig())  # TP=1: every rank holds the whole model
    model, cfg, _ = load_model_for_inference(ckpt_dir)
    ds = IndexedDataset(prefix)
    out = []
    for d in range(len(ds)):
        doc = ds[d].astype(np.int64)
        L = len(doc)
        ref = np.zeros((max(L - 1, 0), cfg.vocab_size))
        for s in sorted({window_start(o) for o in range(L - 1)}):
            x = torch.from_numpy(doc[s:s + SEQ])[None]
            with torch.no_grad():
                logits = model(x, torch.arange(x.shape[1])[None], None)[0, :, :cfg.vocab_size].double()
            lsm = torch.log_softmax(logits, -1).numpy()
            for o in range(s, min(s + SEQ, L - 1)):
                if window_start(o) == s:
                    ref[o] = lsm[o - s]
        out.append(ref)
    return out


def truncate_reference(logprobs: np.ndarray, top_p: float = TOP_P, top_k: int = TOP_K) -> dict[int, float]:
    """Float64 top-p-then-top-k selection of one token: {id: logprob}."""
    order = np.lexsort((np.arange(len(logprobs)), -logprobs))
    p = np.exp(logprobs[order])
    before = np.cumsum(p) - p
    n = int(min(max((before < top_p).sum(), 1), top_k))
    return {int(i): float(logprobs[i]) for i in order[:n]}


def precompute_worker(rank, world_size, tp, pp, ckpt_dir, prefix, out, extra):
    """Run precompute_logits in a (spawned) rank; returns its summary."""
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits

    settings = dict(top_p=TOP_P, top_k=TOP_K, seq_length=SEQ, overlap=OVERLAP, micro_batch_size=2, shard_tokens=300)
    cfg = PrecomputeConfig(teacher=ckpt_dir, data=prefix, out=out, tensor_parallel=tp, pipeline_parallel=pp,
                           **{**settings, **extra})
    return precompute_logits(cfg)


def cache_dir(base: str) -> str:
    return os.path.join(base, "gpt_cache")


def all_worker(rank, world_size, base):
    """Two processes build everything: the teacher; the store at TP=1 (so DP=2: each rank takes
    half of the shards), TP=2 and PP=2; resume scenarios; the direct-forward reference (rank 0)."""
    import shutil

    from megatron_kd.logits import manifest as mf
    from megatron_kd.runtime import ParallelConfig, barrier, init_distributed

    ckpt, prefix = os.path.join(base, "ckpt"), os.path.join(base, "ds")
    make_teacher(rank, world_size, ckpt)
    run = lambda name, tp=1, pp=1, **extra: precompute_worker(  # noqa: E731
        rank, world_size, tp, pp, ckpt, prefix, os.path.join(base, name), extra)
    out = {"tp1": run("tp1"), "tp2": run("tp2", tp=2), "pp2": run("pp2", pp=2)}
    # A run stopped after one shard per rank, then resumed.
    out["partial"] = run("resume", max_shards=1)
    out["partial_complete"] = mf.read_store_manifest(os.path.join(base, "resume"), require_complete=False)["complete"]
    out["resumed"] = run("resume")
    # A complete store with one shard deleted (file and record), then recomputed.
    holed = os.path.join(base, "holed")
    if rank == 0:
        shutil.copytree(os.path.join(base, "tp1"), holed)
        mf.shard_file(holed, 2).unlink()
        mf.shard_record_file(holed, 2).unlink()
    barrier()
    out["refilled"] = run("holed")
    # Re-running a complete store recomputes nothing.
    out["rerun"] = run("tp1")
    init_distributed(ParallelConfig())
    ref = reference_worker(rank, world_size, ckpt, prefix)  # loading a checkpoint is collective
    out["reference"] = ref if rank == 0 else None
    return out
