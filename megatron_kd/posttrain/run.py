"""Command drivers of post-training: config dataclasses, model/tokenizer/data loading, one Trainer.

``megatron-kd sft`` -> :func:`run_sft`, ``minillm`` -> :func:`run_minillm`, ``onpolicy`` ->
:func:`run_onpolicy`, ``generate`` -> :func:`run_generate` (see :mod:`megatron_kd.commands.minillm`).
Every training command builds its student on the shared stack (``training.model_setup`` /
``training.optim``) and runs :class:`megatron_kd.training.loop.Trainer` with its step and batch
source: iterations, evaluation and save cadence, resume (``checkpoint.save`` holding a checkpoint),
metrics (``<checkpoint.save>/metrics.jsonl``, split ``train`` per step and ``valid`` per evaluation),
SIGTERM (save, exit 75), ``train.exit_interval``, ``checkpoint.keep_last`` and the resolved
``config.yaml`` are the Trainer's. Run control is spelled as in ``pretrain``: ``train.*`` (a
:class:`~megatron_kd.training.config.TrainScheduleConfig`), ``checkpoint.*``, ``logging.*``; the old
flat spellings (``save``, ``total_steps``, ``sft.seed``, ...) are accepted with a one-line note.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_kd.posttrain.config import (RUN_KEY_MOVES, MiniLLMCheckpointConfig, MiniLLMScheduleConfig,
                                         OnPolicyScheduleConfig, PostTrainCheckpointConfig, SFTScheduleConfig,
                                         deprecation_note, move_keys)
from megatron_kd.posttrain.data import InstructionDataset, LMChunks
from megatron_kd.posttrain.evaluate import EvalConfig
from megatron_kd.posttrain.minillm import TrainLoopConfig, validate_loop_config
from megatron_kd.posttrain.onpolicy import OnPolicyConfig
from megatron_kd.posttrain.sft import SFTConfig
from megatron_kd.runtime.distributed import ParallelConfig, init_distributed, is_main_process, set_seed
from megatron_kd.training.checkpoint import checkpoint_tokenizer
from megatron_kd.training.config import LoggingConfig, ModelSpec
from megatron_kd.utils.progress import progress


def load_any_tokenizer(path: str):
    """A word-list JSON (synthetic demos) or anything ``megatron_kd.data.tokenizers`` loads."""
    if path is None:
        raise ValueError("no tokenizer: pass tokenizer=PATH (or use a checkpoint that records one)")
    if str(path).endswith(".json") and Path(path).is_file():
        from megatron_kd.posttrain.synthetic import WordTokenizer

        return WordTokenizer.load(path)
    from megatron_kd.data.tokenizers import load_tokenizer

    return load_tokenizer(path)


def _moves(section: str) -> dict[str, str]:
    """Old flat spellings of a post-training command -> the shared names (``section``: the command's own
    section that held ``total_steps`` / ``seed``; "" = the top level)."""
    own = {"total_steps": "train.train_iters", "seed": "train.seed"}
    return {**RUN_KEY_MOVES, **{(section + "." if section else "") + k: v for k, v in own.items()}}


@dataclass
class MiniLLMRunConfig(TrainLoopConfig):
    """``megatron-kd minillm`` (YAML + ``key.sub=value`` overrides). Loop settings: see TrainLoopConfig."""

    student: str = ""
    """Checkpoint directory of the SFT-initialised student (stage 1)."""
    teacher: str = ""
    """Checkpoint directory of the teacher (same tokenizer and padded vocabulary)."""
    tokenizer: Optional[str] = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset (prompts are used)."""
    eval_data: Optional[str] = None
    """Prefix of a held-out instruction dataset (ROUGE-L, reverse KL)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1 for training)."""
    params_dtype: str = "fp32"
    """fp32 | bf16 for both models."""
    train: MiniLLMScheduleConfig = field(default_factory=MiniLLMScheduleConfig)
    """Run length, evaluation / log cadence, stop conditions, seed (pretrain's `train` keys)."""
    checkpoint: MiniLLMCheckpointConfig = field(default_factory=MiniLLMCheckpointConfig)
    """Where and when checkpoints are written (pretrain's `checkpoint` keys)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs (metrics_path default `<checkpoint.save>/metrics.jsonl`, TensorBoard, W&B, quiet)."""

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Copy train.train_iters / train.seed into the loop settings the algorithm reads."""
        self.total_steps, self.seed = self.train.train_iters, self.train.seed

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        return move_keys(data, prefix, _moves(""))


@dataclass
class SFTRunConfig:
    """``megatron-kd sft``: SFT baseline, word-level KD (sft.kd_ratio > 0), SeqKD (SFT on teacher data)."""

    student: str = ""
    """Checkpoint directory to start from (the student's pre-trained weights)."""
    model: Optional[ModelSpec] = None
    """Instead of ``student``: a model trained from random weights: `preset` and/or ModelConfig fields
    (`model: tiny` = `model: {preset: tiny}`; `model_overrides.X` is the old spelling of `model.X`)."""
    teacher: Optional[str] = None
    """Teacher checkpoint for word-level KD (needed when sft.kd_ratio > 0)."""
    tokenizer: Optional[str] = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset."""
    valid_data: Optional[str] = None
    """Prefix of a validation instruction dataset (response-token loss `lm`, split `valid`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1)."""
    params_dtype: str = "fp32"
    """fp32 | bf16."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Optimisation settings."""
    train: SFTScheduleConfig = field(default_factory=SFTScheduleConfig)
    """Run length, evaluation / log cadence, stop conditions, seed (pretrain's `train` keys)."""
    checkpoint: PostTrainCheckpointConfig = field(default_factory=PostTrainCheckpointConfig)
    """Where and when checkpoints are written (pretrain's `checkpoint` keys)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs (metrics_path default `<checkpoint.save>/metrics.jsonl`, TensorBoard, W&B, quiet)."""

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Copy train.train_iters / train.seed into the sft settings the algorithm reads."""
        self.sft.total_steps, self.sft.seed = self.train.train_iters, self.train.seed

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        data = move_keys(data, prefix, _moves("sft"))
        if "model_overrides" in data:
            deprecation_note(prefix + "model_overrides", prefix + "model")
            extra = data.pop("model_overrides") or {}
            model = data.get("model")
            model = {"preset": model} if isinstance(model, str) else dict(model or {})
            data["model"] = {**model, **extra}
        return data


@dataclass
class OnPolicyRunConfig:
    """``megatron-kd onpolicy``: GKD (onpolicy.method=gkd) or DistiLLM (onpolicy.method=distillm)."""

    student: str = ""
    """Checkpoint directory of the (SFT-initialised) student."""
    teacher: str = ""
    """Teacher checkpoint directory (same tokenizer and padded vocabulary)."""
    tokenizer: Optional[str] = None
    """Tokenizer path; default: the one recorded in the student checkpoint."""
    train_data: str = ""
    """Prefix of the preprocessed instruction dataset."""
    valid_data: Optional[str] = None
    """Validation instruction dataset: divergence on gold responses (DistiLLM's adaptive threshold)."""
    eval_data: Optional[str] = None
    """Held-out instruction dataset for ROUGE-L and exact reverse KL."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor / pipeline parallel sizes (pipeline must be 1)."""
    params_dtype: str = "fp32"
    """fp32 | bf16."""
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """GKD / DistiLLM settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """ROUGE-L / reverse-KL evaluation settings."""
    train: OnPolicyScheduleConfig = field(default_factory=OnPolicyScheduleConfig)
    """Run length, evaluation / log cadence, stop conditions, seed (pretrain's `train` keys)."""
    checkpoint: PostTrainCheckpointConfig = field(default_factory=PostTrainCheckpointConfig)
    """Where and when checkpoints are written (pretrain's `checkpoint` keys)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics outputs (metrics_path default `<checkpoint.save>/metrics.jsonl`, TensorBoard, W&B, quiet)."""

    def __post_init__(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Copy train.train_iters / train.seed into the onpolicy settings the algorithm reads."""
        self.onpolicy.total_steps, self.onpolicy.seed = self.train.train_iters, self.train.seed

    @classmethod
    def _normalise_keys(cls, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        return move_keys(data, prefix, _moves("onpolicy"))


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _load_student(ckpt: str, params_dtype: str):
    from megatron_kd.models.builder import build_gpt_model
    from megatron_kd.models.config import ModelConfig
    from megatron_kd.training.checkpoint import load_checkpoint, read_checkpoint_meta

    meta = read_checkpoint_meta(ckpt)
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


def _load_student_and_teacher(cfg):
    """``(student, its ModelConfig, frozen teacher, tokenizer, vocab size)`` for minillm / onpolicy."""
    from megatron_kd.training.checkpoint import load_model_for_inference

    student, s_cfg, s_meta = _load_student(cfg.student, cfg.params_dtype)
    teacher, t_cfg, t_meta = load_model_for_inference(cfg.teacher, cfg.params_dtype)
    tok = load_any_tokenizer(checkpoint_tokenizer(cfg.student, s_meta, cfg.tokenizer))
    return student, s_cfg, teacher, tok, _vocab(s_cfg, t_cfg, tok, s_meta, t_meta)


def _check_run(name: str, cfg) -> None:
    """The shared run-control keys (``train.*``, ``checkpoint.*``) of a post-training command config."""
    from megatron_kd.training.config import validate_schedule

    cfg.sync()
    validate_schedule(cfg.train, min_iters=0 if name == "sft" else 1)  # sft: 0 = sft.epochs passes
    for key in ("save_interval", "keep_last"):
        _require(getattr(cfg.checkpoint, key) >= 0, f"checkpoint.{key}={getattr(cfg.checkpoint, key)} must be >= 0")
    _require(bool(cfg.checkpoint.save), f"{name} needs checkpoint.save=DIR: set it in the YAML or as an override")
    _require(not cfg.checkpoint.finetune or bool(cfg.checkpoint.load),
             "checkpoint.finetune=true needs checkpoint.load=<dir> with the weights to start from")


def run_minillm(cfg: MiniLLMRunConfig) -> dict:
    """Stage-2 MiniLLM training from checkpoints; returns the last evaluation (rank-local copy)."""
    from megatron_kd.posttrain.evaluate import evaluate
    from megatron_kd.posttrain.minillm import PPOStep, RolloutSource
    from megatron_kd.posttrain.steps import dp_info, fit, setup_student

    for name in ("student", "teacher", "train_data"):
        _require(bool(getattr(cfg, name)), f"minillm needs {name}=...: set it in the YAML or as an override")
    _check_run("minillm", cfg)
    _require(cfg.parallel.pipeline_parallel == 1, "MiniLLM training supports TP and DP only: set parallel.pipeline_parallel=1")
    init_distributed(cfg.parallel)
    validate_loop_config(cfg, dp_info()[1])
    set_seed(cfg.seed)
    student, s_cfg, teacher, tok, vocab = _load_student_and_teacher(cfg)
    train = InstructionDataset(cfg.train_data, tok)
    evald = InstructionDataset(cfg.eval_data, tok) if cfg.eval_data else None
    lm = None
    if cfg.lm.data and cfg.lm.coef > 0:
        lm = LMChunks(cfg.lm.data, cfg.lm.seq_length, seed=cfg.seed, dp_rank=dp_info()[0])
    cfg.optim.precision = cfg.params_dtype  # bf16 params train with fp32 master weights
    ddp, opt, sched = setup_student(student, cfg.optim, cfg.total_steps)
    source = RolloutSource(ddp, teacher, cfg, tok, train, vocab, lm_chunks=lm)
    step = PPOStep(ddp, teacher, cfg, vocab, lm_chunks=lm)
    evaluator = (lambda: evaluate(ddp, teacher, evald, tok, cfg.eval, vocab)) if evald is not None else None
    trainer, last = fit(ddp, opt, sched, s_cfg, step=step, run=cfg, cfg=cfg, name="minillm", batch_size=cfg.ppo.batch_size,
                         total_steps=cfg.total_steps, make_iterator=lambda consumed: iter(source),
                         tokenizer=tok.path or None, seed=cfg.seed, evaluator=evaluator,
                         rank_state=source.state, load_rank_state=source.load_state)
    if is_main_process():
        print(f"minillm: {trainer.iteration} steps done; last evaluation {last.get('valid')}", flush=True)
    return last.get("valid") or {}


def run_sft(cfg: SFTRunConfig) -> dict:
    """SFT / word-level KD from a checkpoint or a model preset; returns the last validation metrics."""
    from megatron_kd.posttrain.sft import InstructionBatches, SFTStep
    from megatron_kd.posttrain.steps import fit, setup_student
    from megatron_kd.training.checkpoint import load_model_for_inference

    _require(bool(cfg.train_data), "sft needs train_data=...: set it in the YAML or as an override")
    _check_run("sft", cfg)
    _require(bool(cfg.student) != bool(cfg.model), "sft needs exactly one of student=CKPT or model=PRESET")
    _require(bool(cfg.student) or bool(cfg.tokenizer), "sft with model=PRESET needs tokenizer=PATH")
    _require(cfg.sft.kd_ratio == 0 or bool(cfg.teacher), "sft.kd_ratio > 0 (word-level KD) needs teacher=CKPT")
    _require(cfg.parallel.pipeline_parallel == 1, "sft supports TP and DP only: set parallel.pipeline_parallel=1")
    init_distributed(cfg.parallel)
    set_seed(cfg.sft.seed)
    if cfg.student:
        student, s_cfg, s_meta = _load_student(cfg.student, cfg.params_dtype)
        tok = load_any_tokenizer(checkpoint_tokenizer(cfg.student, s_meta, cfg.tokenizer))
    else:
        from dataclasses import replace

        from megatron_kd.models import build_gpt_model
        from megatron_kd.training.config import resolve_model_config

        tok = load_any_tokenizer(cfg.tokenizer)
        spec = cfg.model if cfg.model.vocab_size is not None else replace(cfg.model, vocab_size=tok.vocab_size)
        s_cfg = resolve_model_config(spec)
        student = build_gpt_model(s_cfg, params_dtype=cfg.params_dtype)
        s_meta = {"padded_vocab_size": s_cfg.padded_vocab_size(cfg.parallel.tensor_parallel)}
    teacher = t_cfg = t_meta = None
    if cfg.teacher and cfg.sft.kd_ratio > 0:
        teacher, t_cfg, t_meta = load_model_for_inference(cfg.teacher, cfg.params_dtype)
    vocab = _vocab(s_cfg, t_cfg, tok, s_meta, t_meta)
    batches = InstructionBatches(InstructionDataset(cfg.train_data, tok), cfg.sft, tok.pad)
    valid = InstructionBatches(InstructionDataset(cfg.valid_data, tok), cfg.sft, tok.pad, training=False) if cfg.valid_data else None
    cfg.sft.optim.precision = cfg.params_dtype
    ddp, opt, sched = setup_student(student, cfg.sft.optim, batches.total_steps)
    step = SFTStep(ddp, cfg.sft, vocab, teacher=teacher)
    evaluator = (lambda: step.validation_loss(valid)) if valid is not None else None
    trainer, last = fit(ddp, opt, sched, s_cfg, step=step, run=cfg, cfg=cfg, name="sft", batch_size=cfg.sft.batch_size,
                         total_steps=batches.total_steps, make_iterator=lambda consumed: batches.iterator(
                             consumed // cfg.sft.batch_size), tokenizer=tok.path or None, seed=cfg.sft.seed,
                         evaluator=evaluator)
    if is_main_process():
        print(f"sft: {trainer.iteration} steps; last validation {last.get('valid')}", flush=True)
    return last.get("valid") or {}


def run_generate(checkpoint: str, input_jsonl: str, output_jsonl: str, tokenizer: str | None, gen, template,
                 parallel: ParallelConfig, batch_size: int, max_prompt_length: int, limit: int | None,
                 params_dtype: str = "fp32") -> dict:
    """SeqKD data: answer every prompt of ``input_jsonl`` with the checkpoint's model."""
    from megatron_kd.posttrain.seqkd import generate_jsonl
    from megatron_kd.training.checkpoint import load_model_for_inference

    if not Path(input_jsonl).is_file():
        raise FileNotFoundError(f"--input {input_jsonl} does not exist: pass an instruction JSONL file")
    if Path(output_jsonl).exists():
        raise FileExistsError(f"--output {output_jsonl} already exists: remove it or choose another path")
    init_distributed(parallel)
    model, cfg, meta = load_model_for_inference(checkpoint, params_dtype)
    tok = load_any_tokenizer(checkpoint_tokenizer(checkpoint, meta, tokenizer))
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


def run_onpolicy(cfg: OnPolicyRunConfig) -> dict:
    """GKD / DistiLLM from checkpoints; returns the last evaluation."""
    from megatron_kd.posttrain.evaluate import evaluate
    from megatron_kd.posttrain.onpolicy import DivergenceStep, ResponseSource
    from megatron_kd.posttrain.steps import fit, setup_student

    for name in ("student", "teacher", "train_data"):
        _require(bool(getattr(cfg, name)), f"onpolicy needs {name}=...: set it in the YAML or as an override")
    _check_run("onpolicy", cfg)
    _require(cfg.parallel.pipeline_parallel == 1, "onpolicy supports TP and DP only: set parallel.pipeline_parallel=1")
    cfg.onpolicy.validate()
    init_distributed(cfg.parallel)
    set_seed(cfg.onpolicy.seed)
    student, s_cfg, teacher, tok, vocab = _load_student_and_teacher(cfg)
    train = InstructionDataset(cfg.train_data, tok)
    valid = InstructionDataset(cfg.valid_data, tok) if cfg.valid_data else None
    evald = InstructionDataset(cfg.eval_data, tok) if cfg.eval_data else None
    cfg.onpolicy.optim.precision = cfg.params_dtype
    ddp, opt, sched = setup_student(student, cfg.onpolicy.optim, cfg.onpolicy.total_steps)
    source = ResponseSource(ddp, teacher, cfg.onpolicy, train, tok, vocab)
    step = DivergenceStep(ddp, teacher, cfg.onpolicy, tok.pad, tok.eod, vocab)

    def evaluator() -> dict[str, float]:
        out: dict[str, float] = {}
        if valid is not None:
            out["valid_loss"] = step.validation_loss(valid)
            source.update_threshold(out["valid_loss"])
            out["threshold"] = source.threshold
        if evald is not None:
            out.update(evaluate(ddp, teacher, evald, tok, cfg.eval, vocab))
        return out

    has_eval = valid is not None or evald is not None
    trainer, last = fit(ddp, opt, sched, s_cfg, step=step, run=cfg, cfg=cfg, name=cfg.onpolicy.method,
                         batch_size=cfg.onpolicy.batch_size, total_steps=cfg.onpolicy.total_steps,
                         make_iterator=lambda consumed: source.iterator(consumed // cfg.onpolicy.batch_size),
                         tokenizer=tok.path or None, seed=cfg.onpolicy.seed,
                         evaluator=evaluator if has_eval else None, extra_state=source.extra_state,
                         load_extra_state=source.load_extra_state, rank_state=source.rank_state,
                         load_rank_state=source.load_rank_state)
    if is_main_process():
        print(f"{cfg.onpolicy.method}: {trainer.iteration} steps; sources {source.source_counts}; "
              f"last {last.get('valid')}", flush=True)
    return last.get("valid") or {}
