"""TP=2, PP=2 and DP=2 evaluation equals TP=1 (same weights): LM loss, choice log-likelihoods,
greedy and sampled generation. One spawned 2-process group per layout runs all evaluators."""
import json

import numpy as np
import pytest

from dist_helpers import run_workers
from evalkit import EOD, MC_EXAMPLES, ByteTokenizer, build_model, random_docs, ref_greedy

DOCS = random_docs(1, [1, 3, 9, 17, 30, 12, 8, 2, 25])
PROMPTS = ["Hello", "The quick brown fox", "", "abc"]


def _evaluate_all(model, task_path, greedy_pair):
    from megatron_kd.evaluation import encode_pair, evaluate_lm_loss, evaluate_multiple_choice, generate
    from megatron_kd.evaluation import score_continuations

    tok = ByteTokenizer()
    pairs = [encode_pair(tok, p, " the end") for p in PROMPTS] + [greedy_pair]
    return {
        "pairs": score_continuations(model, pairs, 300, 64, batch_size=3, show_progress=False),
        "lm": evaluate_lm_loss(model, [np.array(d) for d in DOCS], 300, seq_length=8, micro_batch_size=2,
                               show_progress=False),
        "mc": evaluate_multiple_choice(model, tok, task_path, vocab_size=300, batch_size=4,
                                       return_loglikelihoods=True, show_progress=False),
        "greedy": generate(model, tok, PROMPTS, max_new_tokens=5, vocab_size=300, show_progress=False),
        "sampled": generate(model, tok, PROMPTS, max_new_tokens=5, temperature=1.0, top_p=0.95, seed=3,
                            vocab_size=300, batch_size=2, show_progress=False),
    }


def _worker(rank, world_size, tp, pp, state, task_path, greedy_pair):
    from megatron_kd.runtime import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    model, _ = build_model(state)
    return _evaluate_all(model, task_path, greedy_pair)


@pytest.fixture(scope="module")
def reference(dist1, tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "toy.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in MC_EXAMPLES))
    model, state = build_model()
    ctx = [EOD] + list(b"Once upon a time")
    greedy_pair = (ctx, ref_greedy(model, ctx, 4, eod=-1))  # is_greedy must be True for it
    return state, str(path), greedy_pair, _evaluate_all(model, str(path), greedy_pair)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), pytest.param(1, 1, marks=pytest.mark.slow)],
                         ids=["tp2", "pp2", "dp2"])
def test_parallel_layout_equals_tp1(reference, tp, pp):
    state, task_path, greedy_pair, ref = reference
    assert ref["pairs"][-1][1] is True
    for out in run_workers(_worker, 2, tp, pp, state, task_path, greedy_pair):  # every rank returns the result
        assert out["lm"]["tokens"] == ref["lm"]["tokens"]
        assert out["lm"]["loss"] == pytest.approx(ref["lm"]["loss"], rel=1e-5)
        np.testing.assert_allclose(np.concatenate(out["mc"]["loglikelihoods"]),
                                   np.concatenate(ref["mc"]["loglikelihoods"]), rtol=1e-5)
        assert (out["mc"]["acc"], out["mc"]["acc_norm"]) == (ref["mc"]["acc"], ref["mc"]["acc_norm"])
        assert [g for _, g in out["pairs"]] == [g for _, g in ref["pairs"]]  # is_greedy flags
        np.testing.assert_allclose([ll for ll, _ in out["pairs"]], [ll for ll, _ in ref["pairs"]], rtol=1e-5)
        assert out["greedy"] == ref["greedy"]
        assert out["sampled"] == ref["sampled"]
