"""Tiny random Hugging Face mixture-of-experts models (config only, random weights) for the MoE tests:
Qwen3-MoE (12 experts, top-8, renormalised, head_dim 32 != hidden/heads, layer 1 dense), Mixtral
(4 experts, top-2, head_dim 24) and Qwen2-MoE (8 experts, top-4 un-renormalised, a sigmoid-gated
shared expert, QKV bias, tied embeddings), each with a word-level tokenizer over every id."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256)
MOE_VARIANTS = {
    # name: (config class, extra config kwargs, save in small shards?)
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=12, num_experts_per_tok=8, moe_intermediate_size=32,
                                         norm_topk_prob=True, head_dim=32, mlp_only_layers=[1]), True),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=24,
                                      intermediate_size=40), False),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False,
                                         tie_word_embeddings=True), True),
}


def make_hf_moe(name: str, root: Path, seed: int = 0, vocab: int = VOCAB, out_scale: float = 0.0) -> Path:
    """A tiny random transformers MoE model of family ``name`` saved under ``root/name`` (fp32),
    with a word-level tokenizer. Every weight is random (HF zero-inits routers)."""
    import transformers

    cls_name, extra, sharded = MOE_VARIANTS[name]
    cfg = getattr(transformers, cls_name)(**{**SMALL, **extra, "vocab_size": vocab})
    torch.manual_seed(1000 + seed + sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.15) + (1.0 if "norm" in pname else 0.0))
        if out_scale:  # peaked next-token distributions (a mix of sharp and flat rows)
            head = model.get_output_embeddings().weight
            head.mul_(torch.linspace(1.0, out_scale, head.shape[0])[torch.randperm(head.shape[0])].unsqueeze(1))
    path = root / name
    model.save_pretrained(path, max_shard_size="200KB" if sharded else "5GB")
    _save_tokenizer(path, vocab)
    return path


def _save_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
