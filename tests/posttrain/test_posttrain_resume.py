"""Post-training runs on the shared Trainer survive faults (issue 14): `sft`, `minillm` and `onpolicy`
are stopped with SIGTERM (they save and exit 75) and later killed with SIGKILL mid-run; rerunning the
same command resumes, and the per-step metrics equal those of an uninterrupted run, each step once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "megatron_kd"]
TIMING_KEYS = {"step_time_s", "tokens_per_s", "time"}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def _train_steps(path: Path) -> list[int]:
    return [r["step"] for r in _records(path) if r.get("split") == "train"]


def _comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _records(path)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from megatron_kd.cli import main
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.posttrain.synthetic import make_records, task_tokenizer, write_jsonl
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("posttrain_resume")
    tok = task_tokenizer()
    tok.save(root / "tok.json")
    for split, n in (("train", 96), ("valid", 8)):
        write_jsonl(make_records(n, n), root / f"{split}.jsonl")
        assert main(["preprocess-instructions", "--input", str(root / f"{split}.jsonl"), "--tokenizer",
                     str(root / "tok.json"), "--template", "raw", "--output-prefix", str(root / split)]) == 0
    init_distributed(ParallelConfig())
    for name, layers in (("teacher", 2), ("student", 1)):
        set_seed(layers)
        cfg = ModelConfig(num_layers=layers, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                          vocab_size=tok.vocab_size, make_vocab_size_divisible_by=8, max_position_embeddings=64)
        save_checkpoint(root / name, [build_gpt_model(cfg)], cfg, 0, tokenizer=str(root / "tok.json"))
    return root


def _command(name: str, root: Path, save: Path) -> list[str]:
    common = [f"train_data={root / 'train'}", f"save={save}", "save_interval=2", "eval_interval=4",
              "logging.quiet=true"]
    if name == "sft":
        return ["sft", f"student={root / 'student'}", f"valid_data={root / 'valid'}", "sft.total_steps=10",
                "sft.batch_size=8", "sft.micro_batch_size=4", "sft.optim.warmup_iters=2", *common]
    if name == "minillm":
        return ["minillm", f"student={root / 'student'}", f"teacher={root / 'teacher'}",
                f"eval_data={root / 'valid'}", "total_steps=10", "seed=3",
                "rollout.num_rollouts=8", "rollout.chunk_size=8", "rollout.max_new_tokens=5",
                "rollout.max_prompt_length=16", "ppo.epochs=2", "ppo.batch_size=4", "ppo.micro_batch_size=2",
                "optim.lr=1.0e-3", "optim.warmup_iters=2", "eval.num_prompts=4", "eval.max_new_tokens=4", *common]
    return ["onpolicy", f"student={root / 'student'}", f"teacher={root / 'teacher'}", f"valid_data={root / 'valid'}",
            "onpolicy.method=distillm", "onpolicy.init_threshold=0.8", "onpolicy.total_steps=10",
            "onpolicy.batch_size=4", "onpolicy.micro_batch_size=2", "onpolicy.max_new_tokens=4",
            "onpolicy.loss_eps=0.0", *common]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(CLI + args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not any(s >= step for s in _train_steps(metrics)):
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft", "minillm", "onpolicy"])
def test_sigterm_and_kill9_resume_equal_uninterrupted(inputs, tmp_path, name):
    ref = tmp_path / "ref"
    done = subprocess.run(CLI + _command(name, inputs, ref), env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _train_steps(ref / "metrics.jsonl") == list(range(1, 11))
    expected = _comparable(ref / "metrics.jsonl")

    run = tmp_path / "run"
    args = _command(name, inputs, run)
    metrics = run / "metrics.jsonl"
    # SIGTERM after the first step: the step finishes, a checkpoint is saved, exit code 75.
    proc = _start(args)
    _wait_for_step(proc, metrics, 1)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 75, err[-3000:]
    assert "interrupted by SIGTERM" in err
    from megatron_kd.training.checkpoint import read_checkpoint_meta

    stopped = read_checkpoint_meta(run)["iteration"]
    assert stopped >= 1 and _train_steps(metrics) == list(range(1, stopped + 1))
    # Rerun, then kill -9 between two checkpoints (after step 5; checkpoints every 2 steps).
    proc = _start(args)
    _wait_for_step(proc, metrics, 5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # Rerun the same command: it resumes from the last checkpoint and finishes.
    done = subprocess.run(CLI + args, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    keys = [(r["step"], r["split"]) for r in _records(metrics)]
    assert len(keys) == len(set(keys)), f"duplicate metric lines: {keys}"
    got = _comparable(metrics)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in expected]
    for a, b in zip(got, expected):
        assert a == b, (a, b)


def _minillm_run(tmp, teacher, student_state, exit_interval):
    """MiniLLM in memory on the shared Trainer, checkpointing every step into ``tmp``."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.posttrain.config import MiniLLMOptimConfig, RunControl
    from megatron_kd.posttrain.data import InMemoryInstructions, InstructionTemplate, encode_records
    from megatron_kd.posttrain.minillm import PPOConfig, PPOStep, RolloutSource, TrainLoopConfig
    from megatron_kd.posttrain.rollout import RolloutConfig
    from megatron_kd.posttrain.steps import fit, setup_student
    from megatron_kd.posttrain.synthetic import make_records, task_tokenizer
    from megatron_kd.training.config import LoggingConfig

    tok = task_tokenizer()
    data = InMemoryInstructions(*encode_records(make_records(32, 0), tok, InstructionTemplate.raw()))
    scfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                       vocab_size=tok.vocab_size, make_vocab_size_divisible_by=8, max_position_embeddings=64)
    student = build_gpt_model(scfg)
    student.load_state_dict(student_state)
    cfg = TrainLoopConfig(total_steps=6, seed=3, rollout=RolloutConfig(num_rollouts=8, chunk_size=8, max_new_tokens=5,
                                                                       max_prompt_length=16),
                          ppo=PPOConfig(epochs=2, batch_size=4, micro_batch_size=2),
                          optim=MiniLLMOptimConfig(lr=1e-3, min_lr=1e-3, warmup_iters=2))
    ddp, opt, sched = setup_student(student, cfg.optim, cfg.total_steps)
    source = RolloutSource(ddp, teacher, cfg, tok, data, tok.vocab_size)
    run = RunControl(save=str(tmp), save_interval=1, eval_interval=0, log_interval=0, exit_interval=exit_interval,
                     logging=LoggingConfig(quiet=True))
    trainer, _ = fit(ddp, opt, sched, scfg, step=PPOStep(ddp, teacher, cfg, tok.vocab_size), run=run,
                     batch_size=4, total_steps=cfg.total_steps, make_iterator=lambda consumed: iter(source),
                     rank_state=source.state, load_rank_state=source.load_state)
    return trainer.iteration


def test_minillm_resume_mid_round_in_process(tmp_path):
    """A MiniLLM run stopped mid-round (exit_interval) and resumed records the same per-step metrics
    as an uninterrupted one: the round's rollouts and position come back from rank_state."""
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.posttrain.synthetic import task_tokenizer
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed

    init_distributed(ParallelConfig())
    set_seed(5)
    common = dict(vocab_size=task_tokenizer().vocab_size, make_vocab_size_divisible_by=8, max_position_embeddings=64)
    teacher = build_gpt_model(ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=2, **common)).eval()
    state = build_gpt_model(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                                        **common)).state_dict()
    assert _minillm_run(tmp_path / "ref", teacher, state, 0) == 6
    assert _minillm_run(tmp_path / "run", teacher, state, 3) == 3  # 4 steps per round: stops mid-round 0
    assert _minillm_run(tmp_path / "run", teacher, state, 0) == 6
    got, want = _comparable(tmp_path / "run/metrics.jsonl"), _comparable(tmp_path / "ref/metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7))
    assert got == want
