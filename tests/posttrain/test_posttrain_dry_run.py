"""``--dry-run`` of the post-training commands makes the early checks a real run makes (issue 14): files
exist, student and teacher share tokenizer and padded vocabulary, batch sizes fit the layout, a checkpoint
to resume from holds the same model; it prints the resolved plan and exits 0, and bad input exits 2 with
the very line a real run prints (the run calls the same ``prepare_*`` before building anything)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
YAML = {c: str(REPO / "examples/minillm" / f"{c}_cpu.yaml") for c in ("sft", "minillm", "onpolicy")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from posttrain_inputs import make_inputs, save_random_checkpoint

    root = tmp_path_factory.mktemp("pt_dry")
    paths = make_inputs(root)
    from megatron_kd.posttrain.synthetic import WordTokenizer, task_tokenizer

    vocab = task_tokenizer().vocab_size
    # A teacher with another padded vocabulary, and one trained with another tokenizer (same size).
    save_random_checkpoint(root / "teacher_pad", 1, vocab, paths["tok"], divisible_by=128)
    other = WordTokenizer([f"w{i}" for i in range(vocab - 4)])
    other.save(root / "other_tok.json")
    assert other.identity != task_tokenizer().identity
    save_random_checkpoint(root / "teacher_tok", 1, vocab, root / "other_tok.json")
    return {**paths, "teacher_pad": str(root / "teacher_pad"), "teacher_tok": str(root / "teacher_tok")}


def _cli(capsys, *argv):
    from megatron_kd.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, [ln for ln in out.err.splitlines() if ln.strip() and "warning" not in ln.lower()]


def _args(command, inputs, save, *extra):
    from posttrain_inputs import command_inputs

    return [command, "--config", YAML[command], *command_inputs(command, inputs, str(save)), *extra]


def test_dry_run_prints_the_resolved_plan(inputs, capsys, tmp_path):
    code, out, err = _cli(capsys, *_args("minillm", inputs, tmp_path / "run", "--dry-run"))
    assert code == 0, err
    plan = yaml.safe_load(out)
    assert plan["train"]["train_iters"] == 96 and plan["checkpoint"]["save"] == str(tmp_path / "run")
    assert plan["resolved_teacher"]["model"]["num_layers"] == 2
    assert plan["resolved_plan"]["examples"] == {"train_data": 400, "eval_data": 16}
    assert plan["resolved_plan"]["data_parallel"] == 1 and plan["resolved_plan"]["resume_from"] is None
    assert "total_steps" not in plan and not (tmp_path / "run").exists()
    # sft resolves its run length from the data: 3 epochs of 400 // 32 batches.
    code, out, err = _cli(capsys, *_args("sft", inputs, tmp_path / "run", "--dry-run"))
    assert code == 0, err
    assert yaml.safe_load(out)["resolved_plan"]["train_iters"] == 3 * (400 // 32)


def test_dry_run_reports_the_resume_point(inputs, capsys, tmp_path):
    save = tmp_path / "resume"
    shutil.copytree(inputs["student"], save)  # a checkpoint of the same model: the run resumes from it
    code, out, err = _cli(capsys, *_args("onpolicy", inputs, save, "--dry-run"))
    assert code == 0, err
    assert yaml.safe_load(out)["resolved_plan"]["resume_from"]["iteration"] == 0


BAD = [
    ("minillm", ["student=/nonexistent/ckpt"], "student=/nonexistent/ckpt holds no checkpoint"),
    ("onpolicy", ["teacher={teacher_pad}"], "!= teacher padded vocab 128"),
    ("minillm", ["teacher={teacher_tok}"], "needs one tokenizer"),
    ("minillm", ["ppo.batch_size=48"], "per-rank mini-batch 48 is not a multiple of ppo.micro_batch_size=32"),
    ("sft", ["sft.batch_size=30"], "sft.batch_size=30 must split into DP=1 ranks of whole micro-batches of 32"),
    ("onpolicy", ["train_data=/nonexistent/data"], "/nonexistent/data.instruct.json does not exist"),
    ("sft", ["checkpoint.save={teacher}"], "holds a different model (differs in ['num_layers'])"),
]


@pytest.mark.parametrize("command,extra,message", BAD, ids=[f"{c}-{m[:24]}" for c, _, m in BAD])
def test_bad_input_fails_the_same_way_with_and_without_dry_run(inputs, capsys, tmp_path, command, extra, message):
    extra = [e.format(**inputs) for e in extra]
    save = tmp_path / "run"
    lines = {}
    for mode in ("--dry-run", None):
        argv = _args(command, inputs, save, *extra) + ([mode] if mode else [])
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"megatron-kd {command}: error: ") and message in err[0], err[0]
        lines[mode] = err[0]
    assert lines["--dry-run"] == lines[None], "the dry run's error is the real run's"
    assert not save.exists()
