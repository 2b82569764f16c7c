"""``megatron-kd pretrain``: validate the config, build model/optimizer/data, resume, train.

:func:`run_pretrain` is the library entry point of the command (and of ``tools/pretrain_gpt.py``).
Data: indexed datasets from ``megatron-kd preprocess`` (``data.prefixes`` + ``data.tokenizer``),
or deterministic synthetic tokens (``data.synthetic: true``, for tests and benchmarks).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from megatron.core import parallel_state

import yaml

from megatron_kd.config import to_dict
from megatron_kd.models.config import ModelConfig
from megatron_kd.runtime.distributed import destroy_distributed, init_distributed, is_main_process, set_seed
from megatron_kd.training.checkpoint import read_checkpoint_meta
from megatron_kd.training.config import CheckpointConfig, LoggingConfig, PretrainConfig, validate_pretrain_config
from megatron_kd.training.lm_loss import make_lm_forward_step
from megatron_kd.training.loop import Trainer, resume_dir
from megatron_kd.training.model_setup import setup_model_and_optimizer
from megatron_kd.training.synthetic import SequentialBatchIterator, SyntheticDataset
from megatron_kd.utils.io import atomic_write, check_output_dir

IteratorFactories = tuple[Callable[[int], Iterator], Callable[[], Iterator] | None]


def _launch_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _load_tokenizer(path: str):
    from megatron_kd.data.tokenizers import load_tokenizer  # lands with the data issue

    return load_tokenizer(path)


def _model_from_checkpoint(cfg: PretrainConfig) -> None:
    """A run started from ``checkpoint.load`` (a checkpoint or a Hugging Face model directory) takes
    the model shape from it: every ``model.*`` field left unset (and no ``model.preset``) is filled
    from the checkpoint's model config, so nothing has to be restated."""
    import dataclasses

    from megatron_kd.training.checkpoint import has_checkpoint

    load = cfg.checkpoint.load
    if not load or cfg.model.preset or not has_checkpoint(load):
        return
    saved = read_checkpoint_meta(load)["model_config"]
    for f in dataclasses.fields(cfg.model):
        if f.name != "preset" and getattr(cfg.model, f.name) is None and f.name in saved:
            setattr(cfg.model, f.name, saved[f.name])


def prepare_config(cfg: PretrainConfig) -> ModelConfig:
    """Validate ``cfg`` for this launch (one-line errors, nothing built); return the ModelConfig.

    With indexed data the model's vocabulary comes from the tokenizer unless set explicitly (then
    it must be at least the tokenizer's). A checkpoint to resume must have the same model shape
    and a padded vocabulary divisible by the new TP size.
    """
    _model_from_checkpoint(cfg)
    if cfg.data.prefixes and not cfg.data.tokenizer and not cfg.data.synthetic:
        from megatron_kd.data.manifest import manifest_tokenizer_path

        cfg.data.tokenizer = manifest_tokenizer_path(cfg.data.prefixes[0])  # the one the dataset records
    if cfg.data.tokenizer and cfg.model.vocab_size is None and not cfg.data.synthetic:
        cfg.model.vocab_size = _load_tokenizer(cfg.data.tokenizer).vocab_size
    model_cfg = validate_pretrain_config(cfg, _launch_world_size(), torch.cuda.is_available())
    if cfg.data.tokenizer and not cfg.data.synthetic:
        tok_vocab = _load_tokenizer(cfg.data.tokenizer).vocab_size
        if model_cfg.vocab_size < tok_vocab:
            raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                             f"{tok_vocab}: unset model.vocab_size or raise it")
    check_outputs(cfg.checkpoint, cfg.logging)
    if cfg.data.prefixes and not cfg.data.synthetic:
        from megatron_kd.data.manifest import check_token_ids

        for prefix in cfg.data.prefixes:  # sizes, header and a sampled token-id check, before any work
            check_token_ids(prefix, model_cfg.vocab_size)
    check_resume_point(cfg.checkpoint, model_cfg, cfg.parallel.tensor_parallel)
    return model_cfg


def check_outputs(checkpoint: CheckpointConfig, logging: LoggingConfig) -> None:
    """Before any work (every training command): the metrics file belongs to this run and
    ``checkpoint.save`` can be written (one-line errors; nothing is written)."""
    from megatron_kd.training.metrics import check_metrics_owner, default_metrics_path

    check_metrics_owner(logging.metrics_path or default_metrics_path(checkpoint.save), checkpoint.save)
    if checkpoint.save:
        check_output_dir(checkpoint.save, "checkpoint.save")


def check_resume_point(checkpoint: CheckpointConfig, model_cfg: ModelConfig, tensor_parallel: int
                       ) -> dict[str, Any] | None:
    """The checkpoint a run will start from (``checkpoint.save`` holding one, else ``checkpoint.load``),
    checked against the run's model (same shape; padded vocabulary divisible by the TP size):
    ``{"path", "iteration", "full"}``, or None for a fresh start (every training command; one-line errors)."""
    source, full = resume_dir(checkpoint)
    if source is None:
        return None
    meta = read_checkpoint_meta(source)
    saved = ModelConfig.from_dict(meta["model_config"])
    if saved != model_cfg:
        diff = sorted(k for k, v in saved.to_dict().items() if model_cfg.to_dict()[k] != v)
        raise ValueError(f"checkpoint {source} holds a different model (differs in {diff}): "
                         "use the same model.* settings or another checkpoint.save directory")
    if meta["padded_vocab_size"] % tensor_parallel:
        raise ValueError(f"checkpoint {source} has padded vocab {meta['padded_vocab_size']}, not divisible "
                         f"by parallel.tensor_parallel={tensor_parallel}: choose a TP size that divides it")
    return {"path": str(meta["path"]), "iteration": int(meta["iteration"]), "full": bool(full)}


def _data_config(cfg: PretrainConfig):
    """The ``DataConfig`` the datasets are built from: the ``data:`` section itself (every field),
    with seq_length / seed from ``train``."""
    return cfg.data.dataset_config(cfg.train.seq_length, cfg.train.seed)


def build_data_iterators(cfg: PretrainConfig, model_cfg: ModelConfig) -> IteratorFactories:
    """``(make_train_iterator(consumed_samples), make_valid_iterator())`` for this DP rank.

    Requires parallel_state. Synthetic data: a fixed Markov chain over ``model.vocab_size``;
    validation samples come from a disjoint index range of the same chain.
    """
    train = cfg.train
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if cfg.data.synthetic:
        kw = dict(vocab_size=model_cfg.vocab_size, seq_length=train.seq_length, seed=train.seed,
                  concentration=cfg.data.synthetic_concentration)
        train_ds = SyntheticDataset(**kw)
        valid_ds = SyntheticDataset(**kw, index_offset=1 << 41)
        batch_iter: Callable[..., Iterator] = SequentialBatchIterator
    else:
        from megatron_kd.data.gpt_dataset import ResumableBatchIterator, build_gpt_datasets

        evals = (train.train_iters // train.eval_interval if train.eval_interval else 0) + 1
        train_ds, valid_ds, _ = build_gpt_datasets(
            _data_config(cfg), _load_tokenizer(cfg.data.tokenizer), train.train_iters * train.global_batch_size,
            evals * train.eval_iters * train.global_batch_size, 0)
        batch_iter = functools.partial(ResumableBatchIterator, vocab_size=model_cfg.vocab_size,
                                       prefixes=list(cfg.data.prefixes))

    def make_train(consumed: int) -> Iterator:
        return batch_iter(train_ds, train.micro_batch_size, dp_rank, dp_size, consumed_samples=consumed)

    def make_valid() -> Iterator:
        return batch_iter(valid_ds, train.micro_batch_size, dp_rank, dp_size, consumed_samples=0)

    return make_train, (make_valid if valid_ds is not None and train.eval_iters > 0 else None)


def run_pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) pre-training; returns the final metrics (see :meth:`Trainer.fit`)."""
    model_cfg = prepare_config(cfg)
    init_distributed(cfg.parallel)
    try:
        set_seed(cfg.train.seed)
        source, _ = resume_dir(cfg.checkpoint)
        padded = read_checkpoint_meta(source)["padded_vocab_size"] if source is not None else None
        chunks, optimizer, scheduler = setup_model_and_optimizer(
            model_cfg, cfg.parallel, cfg.optim, cfg.train.train_iters, padded_vocab_size=padded)
        make_train, make_valid = build_data_iterators(cfg, model_cfg)
        if cfg.checkpoint.save and is_main_process():
            Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
            with atomic_write(Path(cfg.checkpoint.save) / "pretrain_config.yaml") as fh:
                yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
        if is_main_process():
            n = model_cfg.num_parameters()
            print(f"pretrain: {n / 1e6:.2f}M parameters, world {_launch_world_size()} "
                  f"(TP {cfg.parallel.tensor_parallel}, PP {cfg.parallel.pipeline_parallel}), "
                  f"{'synthetic data' if cfg.data.synthetic else 'data ' + ','.join(cfg.data.prefixes)}", flush=True)
        trainer = Trainer(chunks, optimizer, scheduler, make_lm_forward_step(model_cfg.vocab_size, cfg.train.fused_lm_loss),
                          model_cfg,
                          cfg.train, cfg.checkpoint, cfg.logging, tokenizer=cfg.data.tokenizer, desc="pretrain")
        trainer.resume()
        result = trainer.fit(make_train, make_valid)
        result["config"] = to_dict(cfg)
        return result
    finally:
        destroy_distributed()
