"""ROUGE-L: hand-computed values, the rouge-score package (when installed), task evaluation."""
import json
import random

import pytest

from megatron_kd.evaluation.rouge import (
    evaluate_rouge,
    lcs_length,
    load_generation_task,
    rouge_l,
    rouge_l_max,
    rouge_tokenize,
)


def test_tokenisation():
    assert rouge_tokenize("The Cat's hat -- 42, naïve!") == ["the", "cat", "s", "hat", "42", "na", "ve"]
    assert rouge_tokenize("Running dogs ran", use_stemmer=True) == ["run", "dog", "ran"]
    assert rouge_tokenize("  ...  ") == []


def test_hand_computed_values():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    # pred 6 tokens, ref 5 tokens, LCS "the cat the mat" = 4: P = 4/6, R = 4/5, F = 2PR/(P+R) = 8/11.
    score = rouge_l("the cat sat on the mat", "The cat, the fat mat!")
    assert score["precision"] == pytest.approx(4 / 6) and score["recall"] == pytest.approx(4 / 5)
    assert score["fmeasure"] == pytest.approx(8 / 11)
    assert rouge_l("abc", "xyz")["fmeasure"] == 0.0
    assert rouge_l("", "xyz")["fmeasure"] == 0.0
    assert rouge_l("same words", "Same, words.")["fmeasure"] == 1.0
    assert rouge_l_max("the cat", ["a dog", "the cat sat"]) == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    words = ["the", "cat", "Cats", "running", "ran", "dog", "dogs,", "a", "mat!", "42", "über", "quickly"]
    rng = random.Random(0)
    for stem in (False, True):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        for _ in range(200):
            pred = " ".join(rng.choices(words, k=rng.randint(0, 12)))
            ref = " ".join(rng.choices(words, k=rng.randint(1, 12)))
            want = scorer.score(ref, pred)["rougeL"]  # score(target, prediction)
            got = rouge_l(pred, ref, use_stemmer=stem)
            assert got["fmeasure"] == pytest.approx(want.fmeasure, abs=1e-12)
            assert got["precision"] == pytest.approx(want.precision, abs=1e-12)
            assert got["recall"] == pytest.approx(want.recall, abs=1e-12)


def test_evaluate_rouge_with_a_plugged_generator(tmp_path):
    rows = [{"prompt": "Q1", "output": "the cat sat"}, {"prompt": "Q2", "output": ["a dog", "dogs running"]},
            {"prompt": "Q3", "output": "nothing alike"}]
    path = tmp_path / "instr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {"Q1": "the cat sat", "Q2": "dog runs", "Q3": "zzz"}
    out = evaluate_rouge(None, None, path, generate_fn=lambda ps: [answers[p] for p in ps], return_predictions=True)
    # Q1 exact (1.0); Q2 best reference "dogs running" stems to "dog run" = "dog run" (1.0); Q3 0.
    assert out["n"] == 3 and out["rougeL"] == pytest.approx(100 * 2 / 3)
    assert out["predictions"] == ["the cat sat", "dog runs", "zzz"]
    out = evaluate_rouge(None, None, path, generate_fn=lambda ps: [answers[p] for p in ps], use_stemmer=False)
    assert out["rougeL"] == pytest.approx(100 * (1 + 0.5) / 3)  # "dog runs" vs "a dog": P 1/2, R 1/2
    with pytest.raises(ValueError, match="returned 1 completions for 3 prompts"):
        evaluate_rouge(None, None, path, generate_fn=lambda ps: ["x"])


def test_bad_generation_task_fails_in_one_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt": "p", "output": "o"}\n{"prompt": "p"}\n')
    with pytest.raises(ValueError, match='g.jsonl:2 needs a string "prompt" and an "output"'):
        load_generation_task(path)
    assert len(load_generation_task(path, limit=1)) == 1
    with pytest.raises(FileNotFoundError):
        load_generation_task(tmp_path / "missing.jsonl")


def test_post_training_response_key_is_the_reference(tmp_path):
    """Post-training instruction JSONL ({"prompt", "response"}, what MiniLLM's data and its synthetic
    task write) is a ROUGE task as it is (issue 13)."""
    records = [{"prompt": "rev a c b =", "response": "b c a"}, {"prompt": "sort c a =", "response": "a c"}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [e["references"] for e in load_generation_task(path)] == [["b c a"], ["a c"]]
    out = evaluate_rouge(None, None, path, generate_fn=lambda ps: ["b c a", "a c"], use_stemmer=False)
    assert out["rougeL"] == pytest.approx(100.0)
