"""ECE against a direct numpy computation; TP=2 shards give the same confidences."""
import numpy as np
import torch

from dist_helpers import run_workers
from megatron_kd.evaluation.calibration import CalibrationAccumulator, expected_calibration_error, top1_confidence


def _numpy_ece(logits, labels, mask, bins):
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    conf, pred = p.max(-1), p.argmax(-1)
    keep = mask != 0
    conf, ok = conf[keep], (pred == labels)[keep]
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        sel = (conf >= edges[b]) & ((conf < edges[b + 1]) if b < bins - 1 else (conf <= 1))
        if sel.any():
            total += sel.sum() / len(conf) * abs(ok[sel].mean() - conf[sel].mean())
    return total


def test_ece_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, 30, generator=g) * torch.linspace(0.2, 4, 4).view(4, 1, 1)
    labels = torch.randint(0, 30, (4, 50), generator=g)
    labels[:, ::3] = logits.argmax(-1)[:, ::3]  # some correct predictions
    mask = (torch.rand(4, 50, generator=g) > 0.1).float()
    for bins in (1, 10, 15):
        want = _numpy_ece(logits.numpy(), labels.numpy(), mask.numpy(), bins)
        assert abs(expected_calibration_error(logits, labels, mask, bins) - want) < 1e-6
    acc = CalibrationAccumulator(10)
    acc.add_logits(logits[:2], labels[:2], mask[:2])
    acc.add_logits(logits[2:], labels[2:], mask[2:])
    assert abs(acc.ece() - _numpy_ece(logits.numpy(), labels.numpy(), mask.numpy(), 10)) < 1e-6
    assert acc.count == int(mask.sum())


def _worker(rank, world_size, logits, labels):
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2))
    half = logits.shape[-1] // 2
    return top1_confidence(logits[..., rank * half:(rank + 1) * half].contiguous(), labels)


def test_tp2_confidence_equals_tp1():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 32, generator=g) * 3
    logits[:, 30:] = float("-inf")
    labels = logits.argmax(-1)
    labels[::2] = 3
    c1, k1 = top1_confidence(logits, labels)
    for c2, k2 in run_workers(_worker, 2, logits, labels):
        torch.testing.assert_close(c2, c1)
        assert torch.equal(k2, k1)


def test_one_pass_logprobs_and_top1_give_the_two_calls_bits(dist1):
    """Held-out evaluation's one pass equals token_logprobs + top1_confidence exactly (padded or not)."""
    from megatron_kd.evaluation.calibration import logprobs_and_top1
    from megatron_kd.evaluation.vocab import token_logprobs

    g = torch.Generator().manual_seed(0)
    for width, vocab in [(512, 512), (384, 300), (128, 127)]:
        for scale in (1.0, 8.0):
            x = torch.randn(4, 33, width, generator=g) * scale
            labels = torch.randint(0, vocab, (4, 33), generator=g)
            before = x.clone()
            lp, conf, correct = logprobs_and_top1(x, labels, vocab)
            assert torch.equal(x, before)
            ref_conf, ref_correct = top1_confidence(x[..., :vocab], labels)
            assert torch.equal(lp, token_logprobs(x.clone(), labels, vocab))
            assert torch.equal(conf, ref_conf) and torch.equal(correct, ref_correct)
            # and they are what they claim to be (float64 reference)
            ref = torch.log_softmax(x[..., :vocab].double(), -1)
            torch.testing.assert_close(lp.double(), ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1), rtol=0,
                                       atol=1e-5)
            torch.testing.assert_close(conf.double(), ref.exp().amax(-1), rtol=1e-6, atol=1e-7)
