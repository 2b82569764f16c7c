"""Command-level drivers: config dataclasses, model/tokenizer/data loading, logging, checkpoints.

``megatron-kd minillm --config x.yaml`` -> :func:`run_minillm`; ``megatron-kd sft`` ->
:func:`run_sft`; ``megatron-kd generate`` -> :func:`run_generate` (see
:mod:`megatron_kd.commands.minillm`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_kd.minillm.baselines import SFTConfig, SFTTrainer
from megatron_kd.minillm.data import InstructionDataset, LMChunks
from megatron_kd.minillm.evaluate import EvalConfig
from megatron_kd.minillm.onpolicy import OnPolicyConfig
from megatron_kd.minillm.optim import build_optimizer, wrap_model
from megatron_kd.minillm.trainer import MiniLLMTrainer, TrainLoopConfig, validate_loop_config
from megatron_kd.runtime.distributed import ParallelConfig, init_distributed, is_main_process, set_seed
from megatron_kd.utils.progress import JsonlWriter, progress


def load_any_tokenizer(path: str):
    """A word-list JSON (synthetic demos) or anything ``megatron_kd.data.tokenizers`` loads."""
    if path is None:
        raise ValueError("no tokenizer: pass tokenizer=PATH (or use a checkpoint that records one)")
    if str(path).endswith(".json") and Path(path).is_file():
        from megatron_kd.minillm.synthetic import WordTokenizer

        return WordTokenizer.load(path)
    from megatron_kd.data.tokenizers import load_tokenizer

    return load_tokenizer(path)


@dataclass
class MiniLLMRunConfig(TrainLoopConfig):
    """``megatron-kd minillm`` (YAML + ``key.sub=value`` overrides). Loop settings: see TrainLoopConfig."""

    student: str = ""
    """Checkpoint directory of the SFT-initialised student (stage 1)."""
    teacher: str = ""
    """Checkpoint directory of the teacher (same tokenizer and padded vocabulary)."""
    tokenizer: str | None = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset (prompts are used)."""
    eval_data: str | None = None
    """Prefix of a held-out instruction dataset (ROUGE-L, reverse KL)."""
    save: str = ""
    """Output checkpoint directory (resumed from when it holds a checkpoint)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1 for training)."""
    params_dtype: str = "fp32"
    """fp32 | bf16 for both models."""


@dataclass
class SFTRunConfig:
    """``megatron-kd sft``: SFT baseline, word-level KD (sft.kd_ratio > 0), SeqKD (SFT on teacher data)."""

    student: str = ""
    """Checkpoint directory to start from (the student's pre-trained weights)."""
    model: str | None = None
    """Instead of ``student``: a model preset (e.g. cpu-student) trained from random weights."""
    model_overrides: dict = field(default_factory=dict)
    """ModelConfig fields overriding the preset (e.g. {num_layers: 1})."""
    teacher: str | None = None
    """Teacher checkpoint for word-level KD (needed when sft.kd_ratio > 0)."""
    tokenizer: str | None = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset."""
    valid_data: str | None = None
    """Prefix of a validation instruction dataset (response-token loss; best checkpoint kept)."""
    save: str = ""
    """Output checkpoint directory."""
    eval_interval: int = 100
    """Validate every N steps (0 = only at the end)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1)."""
    params_dtype: str = "fp32"
    """fp32 | bf16."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Optimisation settings."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _load_student(ckpt: str, params_dtype: str):
    from megatron_kd.models.builder import build_gpt_model
    from megatron_kd.training.checkpoint import load_checkpoint, read_checkpoint_meta

    meta = read_checkpoint_meta(ckpt)
    from megatron_kd.models.config import ModelConfig

    cfg = ModelConfig.from_dict(meta["model_config"])
    model = build_gpt_model(cfg, params_dtype=params_dtype, padded_vocab_size=meta["padded_vocab_size"])
    load_checkpoint(ckpt, [model], load_rng=False)
    return model, cfg, meta


def _vocab(student_cfg, teacher_cfg, tokenizer, s_meta, t_meta) -> int:
    if teacher_cfg is not None and s_meta["padded_vocab_size"] != t_meta["padded_vocab_size"]:
        raise ValueError(f"student padded vocab {s_meta['padded_vocab_size']} != teacher padded vocab "
                         f"{t_meta['padded_vocab_size']}: convert both with the same padded vocabulary size")
    sizes = [student_cfg.vocab_size, tokenizer.vocab_size] + ([teacher_cfg.vocab_size] if teacher_cfg else [])
    return min(sizes)


def run_minillm(cfg: MiniLLMRunConfig) -> dict:
    """Stage-2 MiniLLM training from checkpoints; returns the last evaluation (rank-local copy)."""
    from megatron_kd.training.checkpoint import has_checkpoint, load_checkpoint, load_model_for_inference, save_checkpoint

    for name in ("student", "teacher", "train_data", "save"):
        _require(bool(getattr(cfg, name)), f"minillm needs {name}=...: set it in the YAML or as an override")
    _require(cfg.parallel.pipeline_parallel == 1, "MiniLLM training supports TP and DP only: set parallel.pipeline_parallel=1")
    init_distributed(cfg.parallel)
    from megatron_kd.minillm.steps import dp_info

    validate_loop_config(cfg, dp_info()[1])
    set_seed(cfg.seed)
    student, s_cfg, s_meta = _load_student(cfg.student, cfg.params_dtype)
    teacher, t_cfg, t_meta = load_model_for_inference(cfg.teacher, cfg.params_dtype)
    tok = load_any_tokenizer(cfg.tokenizer or s_meta.get("tokenizer"))
    vocab = _vocab(s_cfg, t_cfg, tok, s_meta, t_meta)
    train = InstructionDataset(cfg.train_data, tok)
    evald = InstructionDataset(cfg.eval_data, tok) if cfg.eval_data else None
    lm = None
    if cfg.lm.data and cfg.lm.coef > 0:
        from megatron_kd.minillm.steps import dp_info

        lm = LMChunks(cfg.lm.data, cfg.lm.seq_length, seed=cfg.seed, dp_rank=dp_info()[0])
    cfg.optim.precision = cfg.params_dtype  # bf16 params train with fp32 master weights
    ddp = wrap_model(student, cfg.params_dtype)
    opt, sched = build_optimizer(ddp, cfg.optim, cfg.total_steps)
    trainer = MiniLLMTrainer(ddp, teacher, cfg, tok, train, vocab, eval_data=evald, lm_chunks=lm,
                             optimizer=opt, scheduler=sched)
    if has_checkpoint(cfg.save):
        meta = load_checkpoint(cfg.save, [ddp], opt, sched)
        trainer.step = int(meta["iteration"])
        trainer.round = int(meta["extra"].get("next_round", 0))
        if lm is not None:
            lm.drawn = int(meta["extra"].get("lm_drawn", 0))
    save = Path(cfg.save)
    metrics = JsonlWriter(save / "metrics.jsonl")
    evals = JsonlWriter(save / "eval.jsonl")
    bar = progress(cfg.total_steps, "minillm", unit="step", initial=trainer.step)
    last_eval: dict = {}

    def checkpoint(step):
        save_checkpoint(cfg.save, [ddp], s_cfg, step, optimizer=opt, scheduler=sched, tokenizer=tok.path or None,
                        extra={"next_round": trainer.round + 1, "lm_drawn": lm.drawn if lm else 0,
                               "eval": last_eval})

    def on_round(r, stats):
        metrics.write({"round": r, "step": trainer.step, **stats})

    def on_step(step, stats):
        nonlocal last_eval
        bar.update(1)
        bar.set_postfix(pg=f"{stats['pg_loss']:.3f}", kl=f"{stats.get('single_step_kl', 0):.3f}")
        metrics.write({"step": step, "round": trainer.round, **stats})
        final = step >= cfg.total_steps
        if evald is not None and ((cfg.eval_interval and step % cfg.eval_interval == 0) or final):
            last_eval = trainer.evaluate()
            evals.write({"step": step, **last_eval})
        if (cfg.save_interval and step % cfg.save_interval == 0) or final:
            checkpoint(step)

    if trainer.step < cfg.total_steps:
        trainer.train(on_step=on_step, on_round=on_round)
    bar.close()
    if is_main_process():
        print(f"minillm: {trainer.step} steps done; last evaluation {last_eval}", flush=True)
    return last_eval


def run_sft(cfg: SFTRunConfig) -> dict:
    """SFT / word-level KD from a checkpoint; keeps the lowest-validation-loss checkpoint as latest."""
    from megatron_kd.training.checkpoint import load_model_for_inference, save_checkpoint

    for name in ("train_data", "save"):
        _require(bool(getattr(cfg, name)), f"sft needs {name}=...: set it in the YAML or as an override")
    _require(bool(cfg.student) != bool(cfg.model), "sft needs exactly one of student=CKPT or model=PRESET")
    _require(bool(cfg.student) or bool(cfg.tokenizer), "sft with model=PRESET needs tokenizer=PATH")
    _require(cfg.sft.kd_ratio == 0 or bool(cfg.teacher), "sft.kd_ratio > 0 (word-level KD) needs teacher=CKPT")
    _require(cfg.parallel.pipeline_parallel == 1, "sft supports TP and DP only: set parallel.pipeline_parallel=1")
    init_distributed(cfg.parallel)
    set_seed(cfg.sft.seed)
    if cfg.student:
        student, s_cfg, s_meta = _load_student(cfg.student, cfg.params_dtype)
        tok = load_any_tokenizer(cfg.tokenizer or s_meta.get("tokenizer"))
    else:
        from megatron_kd.models import build_gpt_model, get_preset

        tok = load_any_tokenizer(cfg.tokenizer)
        s_cfg = get_preset(cfg.model, **{"vocab_size": tok.vocab_size, **cfg.model_overrides})
        student = build_gpt_model(s_cfg, params_dtype=cfg.params_dtype)
        s_meta = {"padded_vocab_size": s_cfg.padded_vocab_size(cfg.parallel.tensor_parallel)}
    teacher = t_cfg = t_meta = None
    if cfg.teacher and cfg.sft.kd_ratio > 0:
        teacher, t_cfg, t_meta = load_model_for_inference(cfg.teacher, cfg.params_dtype)
    vocab = _vocab(s_cfg, t_cfg, tok, s_meta, t_meta)
    train = InstructionDataset(cfg.train_data, tok)
    valid = InstructionDataset(cfg.valid_data, tok) if cfg.valid_data else None
    cfg.sft.optim.precision = cfg.params_dtype
    ddp = wrap_model(student, cfg.params_dtype)
    trainer = SFTTrainer(ddp, cfg.sft, train, tok.pad, vocab, teacher=teacher)
    metrics = JsonlWriter(Path(cfg.save) / "metrics.jsonl")
    bar = progress(trainer.total_steps, "sft", unit="step")
    best = {"valid_loss": float("inf"), "step": 0}

    def on_step(step, stats):
        bar.update(1)
        bar.set_postfix(ce=f"{stats['ce']:.3f}")
        metrics.write({"step": step, **stats})
        final = step >= trainer.total_steps
        if valid is None:
            if final:
                save_checkpoint(cfg.save, [ddp], s_cfg, step, tokenizer=tok.path or None)
            return
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or final:
            loss = trainer.validation_loss(valid)
            metrics.write({"step": step, "valid_loss": loss})
            if loss < best["valid_loss"]:  # the reference keeps the lowest-validation-loss SFT model
                best.update(valid_loss=loss, step=step)
                save_checkpoint(cfg.save, [ddp], s_cfg, step, tokenizer=tok.path or None, keep_last=1,
                                extra={"valid_loss": loss})

    trainer.train(on_step=on_step)
    bar.close()
    if is_main_process():
        print(f"sft: {trainer.step} steps; best {best}", flush=True)
    return best


def run_generate(checkpoint: str, input_jsonl: str, output_jsonl: str, tokenizer: str | None, gen, template,
                 parallel: ParallelConfig, batch_size: int, max_prompt_length: int, limit: int | None,
                 params_dtype: str = "fp32") -> dict:
    """SeqKD data: answer every prompt of ``input_jsonl`` with the checkpoint's model."""
    from megatron_kd.minillm.baselines import generate_jsonl
    from megatron_kd.training.checkpoint import load_model_for_inference

    if not Path(input_jsonl).is_file():
        raise FileNotFoundError(f"--input {input_jsonl} does not exist: pass an instruction JSONL file")
    if Path(output_jsonl).exists():
        raise FileExistsError(f"--output {output_jsonl} already exists: remove it or choose another path")
    init_distributed(parallel)
    model, cfg, meta = load_model_for_inference(checkpoint, params_dtype)
    tok = load_any_tokenizer(tokenizer or meta.get("tokenizer"))
    vocab = min(cfg.vocab_size, tok.vocab_size)
    gen.eos_id, gen.pad_id = tok.eod, tok.pad
    bar = progress(None, "generate", unit="prompt")
    out = generate_jsonl(model, input_jsonl, output_jsonl, tok, gen, vocab, template, max_prompt_length,
                         batch_size, limit, progress=bar)
    bar.close()
    if is_main_process():
        print(f"generate: wrote {out['records']} records to {output_jsonl} "
              f"(mean {out['mean_response_tokens']:.1f} response tokens)", flush=True)
    return out


@dataclass
class OnPolicyRunConfig:
    """``megatron-kd onpolicy``: GKD (onpolicy.method=gkd) or DistiLLM (onpolicy.method=distillm)."""

    student: str = ""
    """Checkpoint directory of the (SFT-initialised) student."""
    teacher: str = ""
    """Teacher checkpoint directory (same tokenizer and padded vocabulary)."""
    tokenizer: str | None = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset."""
    valid_data: str | None = None
    """Validation instruction dataset: divergence on gold responses (DistiLLM's adaptive threshold)."""
    eval_data: str | None = None
    """Held-out instruction dataset for ROUGE-L and exact reverse KL."""
    save: str = ""
    """Output checkpoint directory."""
    eval_interval: int = 100
    """Validate / evaluate every N steps (0 = only at the end)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1)."""
    params_dtype: str = "fp32"
    """fp32 | bf16."""
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """GKD / DistiLLM settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """ROUGE-L / reverse-KL evaluation settings."""


def run_onpolicy(cfg: OnPolicyRunConfig) -> dict:
    """GKD / DistiLLM from checkpoints; returns the last evaluation."""
    from megatron_kd.minillm.evaluate import evaluate
    from megatron_kd.minillm.onpolicy import OnPolicyDistiller
    from megatron_kd.training.checkpoint import load_model_for_inference, save_checkpoint

    for name in ("student", "teacher", "train_data", "save"):
        _require(bool(getattr(cfg, name)), f"onpolicy needs {name}=...: set it in the YAML or as an override")
    _require(cfg.parallel.pipeline_parallel == 1, "onpolicy supports TP and DP only: set parallel.pipeline_parallel=1")
    cfg.onpolicy.validate()
    init_distributed(cfg.parallel)
    set_seed(cfg.onpolicy.seed)
    student, s_cfg, s_meta = _load_student(cfg.student, cfg.params_dtype)
    teacher, t_cfg, t_meta = load_model_for_inference(cfg.teacher, cfg.params_dtype)
    tok = load_any_tokenizer(cfg.tokenizer or s_meta.get("tokenizer"))
    vocab = _vocab(s_cfg, t_cfg, tok, s_meta, t_meta)
    train = InstructionDataset(cfg.train_data, tok)
    valid = InstructionDataset(cfg.valid_data, tok) if cfg.valid_data else None
    evald = InstructionDataset(cfg.eval_data, tok) if cfg.eval_data else None
    cfg.onpolicy.optim.precision = cfg.params_dtype
    ddp = wrap_model(student, cfg.params_dtype)
    trainer = OnPolicyDistiller(ddp, teacher, cfg.onpolicy, train, tok, vocab)
    metrics = JsonlWriter(Path(cfg.save) / "metrics.jsonl")
    bar = progress(cfg.onpolicy.total_steps, cfg.onpolicy.method, unit="step")
    last: dict = {}

    def on_step(step, stats):
        nonlocal last
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
        metrics.write({"step": step, **stats})
        final = step >= cfg.onpolicy.total_steps
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or final:
            if valid is not None:
                loss = trainer.validation_loss(valid)
                trainer.update_threshold(loss)
                last["valid_loss"] = loss
            if evald is not None:
                last.update(evaluate(ddp, teacher, evald, tok, cfg.eval, vocab))
            metrics.write({"step": step, **last})
        if final:
            save_checkpoint(cfg.save, [ddp], s_cfg, step, tokenizer=tok.path or None, extra={"eval": last})

    trainer.train(on_step=on_step)
    bar.close()
    if is_main_process():
        print(f"{cfg.onpolicy.method}: {trainer.step} steps; sources {trainer.source_counts}; last {last}", flush=True)
    return last
