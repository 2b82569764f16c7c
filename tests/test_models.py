"""Model building: TP=2 logits equal TP=1 logits; config validation."""
import pytest
import torch

from dist_helpers import run_workers
from megatron_kd.models import ModelConfig

CFG = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
           vocab_size=300, add_qkv_bias=True, qk_layernorm=True)


def _gathered_logits(rank, world_size, tp, state):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_kd.models.sharding import gather_full_state, load_full_state
    from megatron_kd.models import build_gpt_model, mask_padded_vocab
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig(tensor_parallel=tp))
    set_seed(0)
    cfg = ModelConfig(**CFG)
    model = build_gpt_model(cfg)
    if state is None:
        assert tp == 1
        state = gather_full_state(model, cfg)
    load_full_state(model, state, cfg)
    tokens = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(12)[None].expand(2, -1)
    with torch.no_grad():
        logits = mask_padded_vocab(model(tokens, pos, None), cfg.vocab_size)
        full = gather_from_tensor_model_parallel_region(logits)[..., : cfg.vocab_size]
    return full, state if parallel_state.get_tensor_model_parallel_rank() == 0 else None


def test_tp2_logits_equal_tp1():
    (ref, state), = run_workers(_gathered_logits, 1, 1, None)
    out = run_workers(_gathered_logits, 2, 2, state)
    for logits, _ in out:
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)


def test_bad_parallel_layout_fails_in_one_line():
    cfg = ModelConfig(**CFG)
    with pytest.raises(ValueError, match="tensor_parallel=3 does not divide model.num_attention_heads"):
        cfg.validate_parallel(3, 1)
    with pytest.raises(ValueError, match="pipeline_parallel=4 does not divide"):
        cfg.validate_parallel(1, 4)
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"num_layer": 2})


def test_padded_vocab_and_param_count():
    cfg = ModelConfig(**CFG)
    assert cfg.padded_vocab_size(1) == 384 and cfg.padded_vocab_size(2) == 512
    assert cfg.num_parameters() > 0
