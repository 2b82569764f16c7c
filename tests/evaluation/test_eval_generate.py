"""Generation: greedy equals an independent full-logits loop; sampling rules; stop strings."""
import pytest
import torch

from evalkit import EOD, ByteTokenizer, build_model, ref_greedy
from megatron_kd.evaluation.generate import generate, sample_next

PROMPTS = ["Hello", "The quick brown fox", "", "x" * 70]


def test_greedy_equals_reference_loop(dist1):
    model, _ = build_model()
    tok = ByteTokenizer()
    outs = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, vocab_size=300, show_progress=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = ([EOD] + tok.encode(prompt))[-(64 - 6):]  # left-truncated so prompt + new fit 64
        assert out == tok.decode(ref_greedy(model, ids, 6))
    # Stop strings cut the text before the first occurrence and end that row early.
    full = outs[1]
    if len(full) >= 2:
        cut = generate(model, tok, [PROMPTS[1]], max_new_tokens=6, stop=[full[1]], vocab_size=300, show_progress=False)
        assert cut == [full[:full.index(full[1])]]


def test_sampling_is_seeded_per_prompt_and_batch_independent(dist1):
    model, _ = build_model()
    tok = ByteTokenizer()
    kw = dict(max_new_tokens=5, temperature=1.0, top_p=0.9, vocab_size=300, show_progress=False)
    a = generate(model, tok, PROMPTS[:3], seed=7, batch_size=1, **kw)
    b = generate(model, tok, PROMPTS[:3], seed=7, batch_size=3, **kw)
    c = generate(model, tok, PROMPTS[:3], seed=8, batch_size=3, **kw)
    assert a == b and a != c


def test_sample_next_rules():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert sample_next(logits, 0.0, 1.0, 0, [None]).tolist() == [0]  # greedy
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, 0.7, 0, [g]) for _ in range(4000)]).flatten()
    # top_p 0.7 keeps {0, 1} (0.5 < 0.7 before id 1; 0.8 >= 0.7 before id 2), renormalised 5/8, 3/8.
    assert (draws == 2).sum() == 0
    assert (draws == 0).float().mean().item() == pytest.approx(5 / 8, abs=0.03)
    draws = torch.stack([sample_next(logits, 1.0, 1.0, 1, [g]) for _ in range(50)]).flatten()
    assert (draws == 0).all()  # top_k 1 = greedy
    draws = torch.stack([sample_next(logits, 1.0, 0.01, 0, [g]) for _ in range(50)]).flatten()
    assert (draws == 0).all()  # the most likely id always stays
    draws = torch.stack([sample_next(logits, 1.0, 1.0, 0, [g]) for _ in range(4000)]).flatten()
    assert (draws == 2).float().mean().item() == pytest.approx(0.2, abs=0.03)
