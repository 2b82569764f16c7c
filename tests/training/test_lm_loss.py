"""Vocab-parallel LM loss with a padded vocabulary vs a float64 cross entropy on the real vocabulary."""
import torch
import torch.nn.functional as F

from dist_helpers import run_workers

VOCAB, PADDED = 300, 512  # TP=2 pads to 512: rank 1 holds [256, 512) of which 212 columns are padding


def _loss_worker(rank, world_size, logits_full, labels, mask):
    from megatron.core import parallel_state

    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.training.lm_loss import lm_loss_func, vocab_parallel_lm_loss

    init_distributed(ParallelConfig(tensor_parallel=world_size))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    per = PADDED // world_size
    # Garbage (large) values in the padded columns: masking must remove them exactly.
    padded = torch.cat([logits_full, torch.full((*logits_full.shape[:-1], PADDED - VOCAB), 30.0)], dim=-1)
    shard = padded[..., tp_rank * per:(tp_rank + 1) * per].clone().requires_grad_(True)
    before = shard.detach().clone()
    per_token = vocab_parallel_lm_loss(shard, labels, VOCAB)
    assert torch.equal(shard.detach(), before), "the caller's logits were modified"
    loss_sum, num_tokens, report = lm_loss_func(mask, shard, labels=labels, vocab_size=VOCAB)
    loss_sum.backward()
    return per_token.detach(), loss_sum.detach(), int(num_tokens), report["lm"], shard.grad, tp_rank


def _reference(logits_full, labels, mask):
    x = logits_full.double().requires_grad_(True)
    per_token = F.cross_entropy(x.reshape(-1, VOCAB), labels.reshape(-1), reduction="none").view(labels.shape)
    loss_sum = (per_token * mask.double()).sum()
    loss_sum.backward()
    return per_token.detach(), loss_sum.detach(), x.grad


def test_vocab_parallel_lm_loss_matches_float64_reference_tp2():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (2, 5), generator=g)
    mask = (torch.rand(2, 5, generator=g) > 0.3).float()
    ref_tok, ref_sum, ref_grad = _reference(logits, labels, mask)
    for tp in (2,):  # rank 0: no padding in its shard (aliasing path); rank 1: padded columns
        for per_token, loss_sum, n, lm, grad, tp_rank in run_workers(_loss_worker, tp, logits, labels, mask):
            torch.testing.assert_close(per_token.double(), ref_tok, atol=1e-5, rtol=0)
            torch.testing.assert_close(loss_sum.double(), ref_sum, atol=1e-4, rtol=0)
            assert n == int(mask.sum()) and torch.allclose(lm, torch.stack([loss_sum, mask.sum()]))
            assert torch.isfinite(grad).all()
            per = PADDED // tp
            cols = torch.arange(tp_rank * per, (tp_rank + 1) * per)
            real = cols < VOCAB
            torch.testing.assert_close(grad[..., real].double(), ref_grad[..., cols[real]], atol=1e-6, rtol=0)
            assert torch.all(grad[..., ~real] == 0)  # padded columns get exactly zero gradient
