"""A checkpoint made ready for evaluation: model stage, config, tokenizer and identity."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_kd.models.config import ModelConfig
from megatron_kd.utils.io import sha256_file


@dataclass
class EvalTarget:
    """What the evaluators need about one model."""

    model: torch.nn.Module
    """This rank's model stage (eval mode, frozen)."""
    config: ModelConfig
    """The checkpoint's model shape."""
    tokenizer: Any = None
    """Text <-> ids (``encode``, ``decode``, ``eod``); None when only LM loss on token data is run."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The checkpoint's ``meta.json`` (plus ``path``)."""
    identity: dict[str, Any] = field(default_factory=dict)
    """Checkpoint identity recorded in results: directory, iteration, sha256 of meta.json."""

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size (logit columns beyond it are padding)."""
        return self.config.vocab_size

    @property
    def max_length(self) -> int:
        """Longest sequence the model is built for."""
        return self.config.max_position_embeddings

    @property
    def training_seq_length(self) -> int | None:
        """The sequence length the checkpoint was trained at (None when it does not record one)."""
        from megatron_kd.training.checkpoint import training_seq_length

        if not self.meta.get("path"):
            return self.meta.get("seq_length")
        return training_seq_length(Path(self.meta["path"]).parent, self.meta)

    def resolve_seq_length(self, seq_length: int | None) -> int:
        """``seq_length``, else the checkpoint's training sequence length, else min(1024,
        max_position_embeddings); one-line error if too long."""
        if seq_length is None:
            trained = self.training_seq_length
            return min(trained, self.max_length) if trained else min(1024, self.max_length)
        if not 1 <= seq_length <= self.max_length:
            raise ValueError(f"--seq-length {seq_length} must be in [1, {self.max_length}] "
                             "(the checkpoint's max_position_embeddings)")
        return seq_length

    def check_dataset_tokenizer(self, dataset_prefix: str | Path) -> None:
        """If a tokenizer is loaded and the dataset has a manifest, they must match."""
        if self.tokenizer is None or not hasattr(self.tokenizer, "identity"):
            return
        try:
            from megatron_kd.data.manifest import check_tokenizer, read_dataset_manifest
        except ImportError:
            return
        from megatron_kd.data.manifest import strip_dataset_ext

        prefix = strip_dataset_ext(dataset_prefix)
        if Path(prefix + ".manifest.json").is_file():
            check_tokenizer(read_dataset_manifest(prefix), self.tokenizer)


def checkpoint_identity(ckpt_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What identifies the evaluated weights: path, iteration directory, sha256 of its meta.json."""
    path = Path(meta["path"])
    return {"checkpoint": str(Path(ckpt_dir).resolve()), "iteration": meta.get("iteration"),
            "iteration_dir": path.name,
            # a Hugging Face model directory (no meta.json): its config.json identifies it
            "meta_sha256": sha256_file(path / "meta.json" if (path / "meta.json").is_file() else path / "config.json"),
            "tokenizer": meta.get("tokenizer"), "model_config": meta.get("model_config")}


def load_tokenizer_from(ref: Any) -> Any:
    """A tokenizer object from an object (returned as is) or a path (via megatron_kd.data)."""
    if ref is None or not isinstance(ref, (str, Path)):
        return ref
    try:
        from megatron_kd.data.tokenizers import load_tokenizer
    except ImportError as exc:  # the data module is a sibling package; say what is missing
        raise ValueError(f"cannot load tokenizer {ref}: megatron_kd.data.tokenizers is not available "
                         f"({exc}); pass a tokenizer object instead") from None
    return load_tokenizer(ref)


def load_eval_target(ckpt_dir: str | Path, tokenizer: Any = None, tokenizer_required: bool = True,
                     tensor_parallel: int = 1, pipeline_parallel: int = 1, params_dtype: str = "fp32",
                     iteration: int | None = None) -> EvalTarget:
    """Load ``ckpt_dir`` for evaluation (initialising distributed with the given TP/PP if needed).

    ``tokenizer``: object, path, or None for the path recorded in the checkpoint meta. Raises a
    one-line error before loading weights when the checkpoint or a required tokenizer is missing.
    """
    from megatron.core import parallel_state

    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.training.checkpoint import checkpoint_tokenizer, load_model_for_inference, read_checkpoint_meta
    import megatron_kd.interop.source  # noqa: F401 - a Hugging Face model directory serves as a checkpoint

    meta = read_checkpoint_meta(ckpt_dir, iteration)  # validates the directory first
    ref = tokenizer if tokenizer is not None else checkpoint_tokenizer(ckpt_dir, meta)
    if ref is None and tokenizer_required:
        raise ValueError(f"checkpoint {ckpt_dir} records no tokenizer: pass --tokenizer PATH")
    tok = None
    if ref is not None:
        try:
            tok = load_tokenizer_from(ref)
        except FileNotFoundError:
            if tokenizer is not None:
                raise
            if tokenizer_required:
                raise FileNotFoundError(f"checkpoint {ckpt_dir} names tokenizer {ref}, which does not exist here "
                                        "(a checkpoint saved before tokenizers were bundled, then moved): pass "
                                        "--tokenizer PATH") from None
        except ValueError:
            if tokenizer_required or tokenizer is not None:
                raise
    vocab = ModelConfig.from_dict(meta["model_config"]).vocab_size
    if tok is not None and getattr(tok, "vocab_size", vocab) > vocab:
        raise ValueError(f"tokenizer {ref} has {tok.vocab_size} ids but checkpoint {ckpt_dir} has vocab_size="
                         f"{vocab}: pass the tokenizer the model was trained with")
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel))
    model, cfg, meta = load_model_for_inference(ckpt_dir, params_dtype=params_dtype, iteration=iteration)
    return EvalTarget(model=model, config=cfg, tokenizer=tok, meta=meta,
                      identity=checkpoint_identity(ckpt_dir, meta))
