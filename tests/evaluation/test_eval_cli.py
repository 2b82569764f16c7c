"""``megatron-kd eval`` and ``run_evaluation`` on a saved tiny checkpoint: results equal the
library evaluators on the same weights; results JSON carries the checkpoint identity; bad inputs
fail in one line before any model loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evalkit import MC_EXAMPLES, ByteTokenizer, build_model, model_config, random_docs, write_indexed_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(dist1, tmp_path_factory):
    from megatron_kd.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("evalcli")
    model, _ = build_model(seed=5)
    save_checkpoint(root / "ckpt", [model], model_config(), iteration=7)
    docs = random_docs(2, [3, 12, 30, 7])
    write_indexed_dataset(str(root / "held"), docs)
    (root / "mc.jsonl").write_text("".join(json.dumps(e) + "\n" for e in MC_EXAMPLES))
    rows = [{"prompt": "Hello", "output": "world"}, {"prompt": "Say", "output": ["a", "b c"]}]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, docs


def test_run_evaluation_matches_library_calls(setup, monkeypatch):
    from megatron_kd.evaluation import evaluate_lm_loss, evaluate_multiple_choice, evaluate_rouge
    from megatron_kd.evaluation import loading
    from megatron_kd.evaluation.runner import EvalConfig, run_evaluation

    root, model, docs = setup
    tok = ByteTokenizer()
    monkeypatch.setattr(loading, "load_tokenizer_from", lambda ref: tok if ref == "BYTES" else ref)
    (root / "BYTES").write_text("")  # the runner checks that a --tokenizer path exists
    monkeypatch.chdir(root)
    out = root / "res" / "eval.json"
    res = run_evaluation(EvalConfig(ckpt=str(root / "ckpt"), tokenizer="BYTES", data=[str(root / "held")],
                                    seq_length=8, tasks=[str(root / "mc.jsonl")], rouge=[str(root / "gen.jsonl")],
                                    max_new_tokens=4, out=str(out)))
    written = json.loads(out.read_text())
    assert written["format"] == "megatron-kd-eval-v1" and written["checkpoint"]["iteration"] == 7
    assert written["checkpoint"]["iteration_dir"] == "iter_0000007" and len(written["checkpoint"]["meta_sha256"]) == 64
    lm = evaluate_lm_loss(model, [np.array(d) for d in docs], 300, 8, show_progress=False, tokenizer=tok)
    assert written["lm_loss"]["held"]["loss"] == pytest.approx(lm["loss"], rel=1e-6)
    assert written["lm_loss"]["held"]["bits_per_byte"] == pytest.approx(lm["bits_per_byte"], rel=1e-6)
    mc = evaluate_multiple_choice(model, tok, root / "mc.jsonl", vocab_size=300, show_progress=False)
    assert written["multiple_choice"]["mc"]["acc"] == mc["acc"]
    assert written["multiple_choice"]["mc"]["acc_norm"] == mc["acc_norm"]
    rouge = evaluate_rouge(model, tok, root / "gen.jsonl", max_new_tokens=4, vocab_size=300)
    assert written["rouge"]["gen"]["rougeL"] == pytest.approx(rouge["rougeL"])
    assert res["lm_loss"] == written["lm_loss"]
    sections = [json.loads(line)["section"] for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert sections == ["lm_loss", "multiple_choice", "rouge"]


def _cli(*args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # a fresh world of one
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_kd", "eval", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_lm_loss_in_a_fresh_process(setup):
    from megatron_kd.evaluation import evaluate_lm_loss

    root, model, docs = setup
    out = root / "cli.json"
    proc = _cli("--ckpt", str(root / "ckpt"), "--data", str(root / "held"), "--seq-length", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())["lm_loss"]["held"]
    want = evaluate_lm_loss(model, [np.array(d) for d in docs], 300, 8, show_progress=False)
    assert got["tokens"] == want["tokens"] and got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert json.loads(proc.stdout)["lm_loss"]["held"]["tokens"] == want["tokens"]


def test_cli_bad_inputs_fail_in_one_line(setup, capsys, monkeypatch):
    from megatron_kd.cli import main
    from megatron_kd.training import checkpoint

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was reported")

    monkeypatch.setattr(checkpoint, "load_model_for_inference", no_loading)

    root, _, _ = setup
    cases = [(["--ckpt", str(root / "nope"), "--data", str(root / "held")], "has no 'latest' file"),
             (["--ckpt", str(root / "ckpt")], "nothing to evaluate"),
             (["--ckpt", str(root / "ckpt"), "--data", str(root / "missing")], "missing.bin does not exist"),
             (["--ckpt", str(root / "ckpt"), "--tasks", str(root / "gen.jsonl")], 'gen.jsonl:1 needs a string "context"'),
             (["--ckpt", str(root / "ckpt"), "--data", str(root / "held"), "--seq-length", "999"], "--seq-length 999"),
             (["--ckpt", str(root / "ckpt"), "--tasks", str(root / "mc.jsonl")], "records no tokenizer")]
    for argv, message in cases:
        assert main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("megatron-kd eval: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_evaluate_checkpoint_lm_loss(setup):
    from megatron_kd.evaluation import evaluate_checkpoint_lm_loss, evaluate_lm_loss

    root, model, docs = setup
    got = evaluate_checkpoint_lm_loss(root / "ckpt", root / "held", seq_length=8, micro_batch_size=2)
    want = evaluate_lm_loss(model, [np.array(d) for d in docs], 300, 8, show_progress=False)
    assert got["tokens"] == want["tokens"] and got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["dataset"] == str(root / "held") and got["seq_length"] == 8


def test_cli_with_the_checkpoint_tokenizer(setup, tmp_path, capsys):
    """With megatron_kd.data present: the tokenizer recorded in the checkpoint is used."""
    tokenizers = pytest.importorskip("megatron_kd.data.tokenizers")
    from megatron_kd.cli import main
    from megatron_kd.evaluation import evaluate_multiple_choice
    from megatron_kd.training.checkpoint import save_checkpoint

    root, model, _ = setup
    texts = [e["context"] + " " + " ".join(e["choices"]) for e in MC_EXAMPLES] * 20
    tok = tokenizers.train_sentencepiece(texts, 300, str(tmp_path / "tok"))
    save_checkpoint(tmp_path / "ckpt", [model], model_config(), iteration=1, tokenizer=str(tmp_path / "tok.model"))
    out = tmp_path / "r.json"
    assert main(["eval", "--ckpt", str(tmp_path / "ckpt"), "--tasks", str(root / "mc.jsonl"), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["multiple_choice"]["mc"]
    want = evaluate_multiple_choice(model, tok, root / "mc.jsonl", vocab_size=300, show_progress=False)
    assert (got["acc"], got["acc_norm"], got["n"]) == (want["acc"], want["acc_norm"], want["n"])
    assert json.loads(capsys.readouterr().out)["multiple_choice"]["mc"]["n"] == len(MC_EXAMPLES)
