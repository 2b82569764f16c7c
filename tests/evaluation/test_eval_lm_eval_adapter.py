"""lm-evaluation-harness adapter: a local toy task driven by lm_eval gives the same acc/acc_norm as
our own multiple-choice scorer; rolling log-likelihood and generate_until agree with our paths."""
import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON only: never try the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from evalkit import EOD, MC_EXAMPLES, ByteTokenizer, build_model  # noqa: E402

TASK_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def lm(dist1):
    from megatron_kd.evaluation.lm_eval_adapter import MegatronKDLM

    model, _ = build_model()
    return MegatronKDLM(model=model, tokenizer=ByteTokenizer(), vocab_size=300, batch_size=4)


def test_lm_eval_toy_task_matches_our_scorer(lm, tmp_path):
    from megatron_kd.evaluation import evaluate_multiple_choice
    from megatron_kd.evaluation.lm_eval_adapter import run_harness

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in MC_EXAMPLES))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy_mc.yaml").write_text(TASK_YAML.format(data=data))
    out = run_harness(lm, ["toy_mc"], include_path=str(tmp_path / "tasks"), include_defaults=False)
    ours = evaluate_multiple_choice(lm.model, lm.tokenizer, data, vocab_size=300, show_progress=False)
    got = out["results"]["toy_mc"]
    assert got["acc,none"] == pytest.approx(ours["acc"]) and got["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    assert out["headline"] == {"per_task": {"toy_mc": pytest.approx(ours["acc_norm"])},
                               "average": pytest.approx(ours["acc_norm"])}
    limited = run_harness(lm, ["toy_mc"], include_path=str(tmp_path / "tasks"), limit=2, include_defaults=False)
    assert limited["results"]["toy_mc"]["acc,none"] == pytest.approx(
        evaluate_multiple_choice(lm.model, lm.tokenizer, data, vocab_size=300, limit=2, show_progress=False)["acc"])


def test_rolling_loglikelihood_and_generate_until(lm):
    from lm_eval.api.instance import Instance

    from megatron_kd.evaluation import evaluate_lm_loss, generate

    text = ("A rolling window test sentence, longer than the model window of 16 tokens. " * 2)[:80]
    assert len(text.encode()) == 5 * 16  # whole windows: lm_eval's last window reuses earlier context
    lm.max_length = 16
    try:
        (total,) = lm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    finally:
        lm.max_length = 64
    # lm_eval's disjoint rolling windows = our document windows over [EOD] + text (seq_length 16).
    doc = np.array([EOD] + ByteTokenizer().encode(text))
    ours = evaluate_lm_loss(lm.model, [doc], 300, seq_length=16, show_progress=False)
    assert total == pytest.approx(-ours["nll_sum"], rel=1e-5)

    reqs = [Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 5}), 0),
            Instance("generate_until", {}, ("Once", {"until": ["zz"], "max_gen_toks": 4, "do_sample": False}), 1)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    want = [generate(lm.model, lm.tokenizer, ["Hello"], 5, stop=["\n"], vocab_size=300, show_progress=False)[0],
            generate(lm.model, lm.tokenizer, ["Once"], 4, stop=["zz"], vocab_size=300, show_progress=False)[0]]
    assert got == want


def test_registered_under_megatron_kd_name():
    from lm_eval.api.registry import get_model

    from megatron_kd.evaluation.lm_eval_adapter import MegatronKDLM

    assert get_model("megatron-kd") is MegatronKDLM
    with pytest.raises(ValueError, match="needs ckpt=CKPT_DIR"):
        MegatronKDLM()
