"""A converted mixture-of-experts model (Mixtral, top-2) as the model of ``eval`` (held-out LM loss) and as
the teacher/policy of MiniLLM/GKD generation, at TP=2: the LM loss equals ``transformers``' mean NLL,
greedy KV-cache generation reproduces ``transformers``' greedy ``generate`` token for token and equals the
no-cache path, and teacher-mixed sampling runs with the MoE model as teacher."""
import numpy as np
import pytest
import torch

from dist_helpers import run_workers
from moe_hf import VOCAB, make_hf_moe

DOCS = [np.random.default_rng(i).integers(2, VOCAB, n) for i, n in enumerate((12, 30, 7, 25, 19))]
PROMPTS = [[5, 17, 42, 7], [9, 3], [100, 200, 11, 12, 13]]
NEW = 8


def _convert(rank, world_size, hf_dir, ckpt):
    from megatron_kd.interop import hf_to_mcore

    hf_to_mcore(hf_dir, ckpt, tensor_parallel=2, show_progress=False)
    return True


def _tp2(rank, world_size, ckpt):
    from megatron_kd.evaluation.lm_loss import evaluate_lm_loss
    from megatron_kd.posttrain.generation import GenerationConfig, generate
    from megatron_kd.posttrain.sampling import SamplingConfig
    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.training.checkpoint import load_model_for_inference

    init_distributed(ParallelConfig(tensor_parallel=2))
    model, cfg, _ = load_model_for_inference(ckpt)
    lm = evaluate_lm_loss(model, DOCS, cfg.vocab_size, seq_length=32, show_progress=False)
    out = {"loss": lm["loss"], "tokens": lm["tokens"]}
    for cache in (True, False):
        gen = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, sampling=SamplingConfig(greedy=True),
                                                         use_cache=cache), cfg.vocab_size)
        out[f"greedy_cache={cache}"] = gen.responses()
    mixed = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, seed=3), cfg.vocab_size,
                     teacher=model, mix_alpha=0.5)
    out["mixed_lengths"] = mixed.response_lengths.tolist()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe_eval")
    hf_dir = make_hf_moe("mixtral", base / "hf")
    assert run_workers(_convert, 1, str(hf_dir), str(base / "ckpt")) == [True]
    return hf_dir, run_workers(_tp2, 2, str(base / "ckpt"), timeout=900)


def test_moe_eval_and_generation_match_transformers(results):
    from transformers import AutoModelForCausalLM

    hf_dir, ranks = results
    assert ranks[0] == ranks[1]  # every rank returns the same numbers and tokens
    out = ranks[0]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for d in DOCS:
            ids = torch.as_tensor(d, dtype=torch.long)[None]
            logp = torch.log_softmax(hf(ids[:, :-1]).logits[0].double(), -1)
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            n += len(d) - 1
    assert out["tokens"] == n and out["loss"] == pytest.approx(nll / n, abs=1e-4)
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW,
                            pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    assert out["greedy_cache=True"] == want
    assert out["greedy_cache=False"] == want
    assert out["mixed_lengths"] == [NEW] * len(PROMPTS)
