"""Zero-shot multiple choice: log-likelihoods equal a float64 reference; acc / acc_norm rules;
lm-eval tokenisation conventions; one-line errors on bad task files."""
import json

import numpy as np
import pytest

from evalkit import EOD, MC_EXAMPLES, ByteTokenizer, build_model, ref_choice_loglikelihoods
from megatron_kd.evaluation.multiple_choice import evaluate_multiple_choice, load_mc_task, score_examples
from megatron_kd.evaluation.scoring import encode_pair, score_continuations


def _write(path, examples):
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    return path


def _expected_acc(examples, lls):
    acc = np.mean([int(np.argmax(ll)) == ex["label"] for ex, ll in zip(examples, lls)])
    norm = np.mean([int(np.argmax(np.array(ll) / [len(c) for c in ex["choices"]])) == ex["label"]
                    for ex, ll in zip(examples, lls)])
    return acc, norm


def test_choice_loglikelihoods_equal_float64_reference(dist1, tmp_path):
    model, _ = build_model()
    task = _write(tmp_path / "toy.jsonl", MC_EXAMPLES)
    ref = ref_choice_loglikelihoods(model)
    for bs in (1, 4):
        out = evaluate_multiple_choice(model, ByteTokenizer(), task, vocab_size=300, batch_size=bs,
                                       return_loglikelihoods=True, show_progress=False)
        np.testing.assert_allclose(np.concatenate(out["loglikelihoods"]), np.concatenate(ref), rtol=1e-5)
    acc, norm = _expected_acc(MC_EXAMPLES, ref)
    assert out["task"] == "toy" and out["n"] == len(MC_EXAMPLES)
    assert out["acc"] == pytest.approx(acc) and out["acc_norm"] == pytest.approx(norm)
    # A task whose labels are the reference argmax scores acc = 1 (the answer is determined).
    determined = [{**ex, "label": int(np.argmax(ll))} for ex, ll in zip(MC_EXAMPLES, ref)]
    out = evaluate_multiple_choice(model, ByteTokenizer(), _write(tmp_path / "det.jsonl", determined),
                                   vocab_size=300, limit=4, show_progress=False)
    assert out["acc"] == 1.0 and out["n"] == 4


def test_acc_norm_divides_by_choice_characters():
    examples = [{"context": "", "choices": ["a", "bbbb"], "label": 1}]
    # Sums favour "a"; per character "bbbb" wins (-3/4 > -1/1).
    out = score_examples(examples, [-1.0, -3.0])
    assert out["acc"] == 0.0 and out["acc_norm"] == 1.0


def test_truncation_keeps_the_last_tokens(dist1):
    model, _ = build_model()
    ctx, cont = [EOD] + list(range(40, 100)), [5, 6, 7]  # 64 tokens; max_length 16 keeps the last 17
    (full,), = [score_continuations(model, [(ctx, cont)], 300, max_length=16, show_progress=False)]
    (short,), = [score_continuations(model, [(ctx[-14:], cont)], 300, max_length=64, show_progress=False)]
    assert full[0] == pytest.approx(short[0], rel=1e-6)


class _MergingTokenizer(ByteTokenizer):
    """Bytes, except that "ab" is one token (id 300 - 1): splits may cross the boundary."""

    vocab_size = 300

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(299)
                i += 2
            else:
                out.extend(text[i].encode())
                i += 1
        return out


def test_encode_pair_follows_lm_eval_conventions():
    tok = ByteTokenizer()
    assert encode_pair(tok, "Hi ", "there") == ([EOD] + list(b"Hi"), list(b" there"))  # space moves
    assert encode_pair(tok, "Hi", " there", prefix_eod=False) == (list(b"Hi"), list(b" there"))
    assert encode_pair(tok, "", "x", prefix_eod=False) == ([EOD], list(b"x"))  # empty context -> EOD
    # The whole string is encoded; the continuation is what follows len(encode(context)).
    ctx, cont = encode_pair(_MergingTokenizer(), "xa", "b", prefix_eod=False)
    assert ctx == list(b"xa") and cont == []


def test_bad_task_files_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mc_task(tmp_path / "none.jsonl")
    bad = [({"context": "c", "choices": ["a", "b"], "label": 2}, 'integer "label"'),
           ({"context": "c", "choices": ["a"], "label": 0}, ">= 2 non-empty strings"),
           ({"choices": ["a", "b"], "label": 0}, 'string "context"')]
    for example, message in bad:
        path = _write(tmp_path / "bad.jsonl", [MC_EXAMPLES[0], example])
        with pytest.raises(ValueError, match=message) as info:
            load_mc_task(path)
        assert "bad.jsonl:2" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1 is not valid JSON"):
        load_mc_task(tmp_path / "broken.jsonl")


def test_is_greedy_flags(dist1):
    from evalkit import ref_greedy

    model, _ = build_model()
    ctx = [EOD] + list(b"Once upon a time")
    greedy = ref_greedy(model, ctx, 4, eod=-1)
    wrong = greedy[:-1] + [(greedy[-1] + 1) % 257]
    out = score_continuations(model, [(ctx, greedy), (ctx, wrong), (ctx, greedy[:1])], 300, 64, show_progress=False)
    assert [g for _, g in out] == [True, False, True]
    assert out[1][0] < out[0][0]
