"""End to end: a teacher pre-trained with `megatron-kd pretrain`'s loop on a synthetic Markov-chain
language makes a smaller student's held-out LM loss lower, after the same steps on the same data,
than the same student trained without KD; and the `distill` CLI validates and runs."""
import json
from pathlib import Path

import pytest

from dist_helpers import run_workers

REPO = Path(__file__).resolve().parents[2]
# A first-order Markov chain over 64 ids where the preferred successor has probability ~0.5: noisy
# hard labels, so the teacher's full next-token distribution carries much more per token.
COMMON = ["model.vocab_size=64", "model.max_position_embeddings=64", "data.synthetic=true",
          "data.synthetic_concentration=0.5", "train.micro_batch_size=8", "train.global_batch_size=8",
          "train.seq_length=32", "train.eval_iters=4", "train.log_interval=0", "logging.quiet=true",
          "optim.lr_schedule=constant", "optim.lr=1e-2", "optim.min_lr=1e-2"]
TEACHER = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
           "train.train_iters=60"]
STUDENT = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
           "train.train_iters=15"]


def _e2e_worker(rank, world_size, tmp):
    from megatron_kd.config import load_config
    from megatron_kd.distill import DistillConfig
    from megatron_kd.distill.run import run_distill
    from megatron_kd.training import PretrainConfig
    from megatron_kd.training.pretrain import run_pretrain

    teacher = run_pretrain(load_config(PretrainConfig, None, COMMON + TEACHER + [f"checkpoint.save={tmp}/teacher"]))
    out = {"teacher": teacher["valid"]["lm"]}
    for name, extra in (("none", ["kd.mode=none"]),
                        ("kd", [f"teacher.load={tmp}/teacher", "kd.alpha=0.9", f"checkpoint.save={tmp}/student"])):
        result = run_distill(load_config(DistillConfig, None, COMMON + STUDENT + extra))
        out[name] = result["valid"]["lm"]
        out[name + "_train"] = result["train"]
    return out


def test_kd_from_a_stronger_teacher_lowers_held_out_loss(tmp_path):
    (out,) = run_workers(_e2e_worker, 1, str(tmp_path))
    # The teacher learnt the chain (entropy ~2.73 nats; uniform is ln 64 = 4.16) ...
    assert out["teacher"] < 2.95
    # ... and the student distilled from it is clearly better than the same student without KD.
    assert out["kd"] < out["none"] - 0.05, out
    assert out["teacher"] < out["kd"]
    train = out["kd_train"]
    assert train["alpha"] == pytest.approx(0.9) and train["kd"] > 0
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert {"lm", "kd", "total", "alpha", "tokens_per_s", "teacher_time_s", "student_time_s"} <= set(records[0])
    assert records[-1]["split"] == "valid" and "lm" in records[-1]


def _cli(capsys, *args):
    from megatron_kd.cli import main

    code = main(["distill", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_one_line_errors_and_dry_run(tmp_path, capsys):
    code, _, err = _cli(capsys, "kd.mode=online", "data.synthetic=true")
    last = err.strip().splitlines()[-1]  # (megatron's import-time warnings may come before it)
    assert code == 2 and last.startswith("megatron-kd distill: error:") and "needs teacher.load" in last
    assert "Traceback" not in err
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    code, _, err = _cli(capsys, "data.synthetic=true", f"teacher.load={hf}")  # HF dirs serve directly, with weights
    assert code == 2 and "config.json + *.safetensors" in err
    code, _, err = _cli(capsys, "data.synthetic=true", "kd.mode=offline", f"kd.logits_store={tmp_path}")
    assert code == 2 and "exactly one indexed dataset" in err
    code, _, err = _cli(capsys, "data.synthetic=true", "kd.mode=none", "kd.kind=bogus")
    assert code == 2 and "kd.kind" in err
    code, out, err = _cli(capsys, "--dry-run", "--config", str(REPO / "examples/cpu/distill_tiny.yaml"),
                          "kd.mode=none")
    assert code == 0, err
    assert "mode: none" in out and "resolved_model" in out
