"""Training datasets: megatron-core ``GPTDataset``s built by ``BlendedMegatronDatasetBuilder``.

    cfg = DataConfig(train_prefixes=["data/demo_text_document"], seq_length=256, split="98,1,1")
    train, valid, test = build_gpt_datasets(cfg, tok, train_samples=16_000, valid_samples=320,
                                            test_samples=0)
    it = ResumableBatchIterator(train, micro_batch_size=8, dp_rank=0, dp_size=1, consumed_samples=0)
    batch = next(it)    # {"tokens", "labels", "loss_mask", "position_ids"}: tensors [8, 256]

Every sample is megatron's: ``tokens``/``labels`` are a window of ``seq_length + 1`` tokens shifted
by one (documents packed back to back, EOD between them), ``loss_mask`` is 1.0 except on padding
(and on EOD with ``eod_mask_loss``), ``position_ids`` restart after EOD with
``reset_position_ids``. ``synthetic=True`` builds the same through megatron's mock path, on
random tokens and without files (for tests).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from megatron_kd.data.iterator import ResumableBatchIterator
from megatron_kd.data.manifest import (check_token_ids, check_tokenizer, read_dataset_manifest, validate_indexed_files,
                                      verify_checksums)
from megatron_kd.data.tokenizers import Tokenizer, load_tokenizer

__all__ = ["DataConfig", "MegatronTokenizerAdapter", "ResumableBatchIterator", "build_gpt_datasets"]


@dataclass
class DataConfig:
    """Which indexed datasets to train on and how to cut them into samples."""

    train_prefixes: list[str] = field(default_factory=list)
    """Dataset prefixes (paths without ``.bin``/``.idx``) blended for training. Unless
    ``valid_prefixes``/``test_prefixes`` are given, each is also split into train/valid/test
    by ``split`` (contiguous document ranges, in document order)."""
    weights: list[float] | None = None
    """Blend weights, one per train prefix (normalised); None = in proportion to their sizes."""
    split: str = "98,1,1"
    """Train/valid/test proportions of every prefix's documents, e.g. ``"98,1,1"``."""
    valid_prefixes: list[str] = field(default_factory=list)
    """Separate validation datasets (then ``split`` is ignored and each list is used whole)."""
    test_prefixes: list[str] = field(default_factory=list)
    """Separate test datasets (only with ``valid_prefixes`` or alone, like it)."""
    seq_length: int = 256
    """Tokens per sample (model context length)."""
    seed: int = 1234
    """Seed of the document and sample shuffles (part of the index cache key)."""
    cache_dir: str | None = None
    """Where megatron caches the sample indices (``*.npy``); default ``<dir of the first
    prefix>/index_cache``. Must be shared by all ranks; rank 0 builds, the others load."""
    reset_position_ids: bool = False
    """Restart position ids after every EOD token (documents do not see each other's positions)."""
    reset_attention_mask: bool = False
    """Block attention across EOD (builds a [1, s, s] mask per sample; implies create_attention_mask)."""
    eod_mask_loss: bool = False
    """loss_mask = 0 where the input token is EOD (do not learn to guess a document's first token)."""
    create_attention_mask: bool = False
    """Return ``attention_mask`` [1, s, s] per sample (not needed by causal SDPA attention)."""
    tokenizer: str = ""
    """Tokenizer path (SentencePiece .model or HF dir); must match the datasets' manifests."""
    num_workers: int = 0
    """DataLoader worker processes used by :class:`ResumableBatchIterator` (0 = in process)."""
    synthetic: bool = False
    """Random tokens through megatron's mock-dataset path: no files, no tokenizer needed."""
    synthetic_vocab_size: int = 1024
    """Vocabulary of the synthetic data when no tokenizer is given (EOD = last id)."""
    check_manifest: bool = True
    """Refuse datasets without a manifest or tokenized with another tokenizer."""
    mmap: bool = True
    """Memory-map the ``.bin`` files (else read with file handles)."""
    verify_data: bool = False
    """Check every token id against the tokenizer's vocabulary and the files' sha256 against the
    manifest before training (default: a fast sampled check of token ids)."""

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError(f"data.seq_length={self.seq_length} must be >= 1")
        parts = [p for p in str(self.split).replace("/", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
            raise ValueError(f"data.split={self.split!r} must be up to 3 non-negative numbers like '98,1,1'")
        if self.weights is not None and len(self.weights) != len(self.train_prefixes):
            raise ValueError(f"data.weights has {len(self.weights)} entries for "
                             f"{len(self.train_prefixes)} train_prefixes: give one weight per prefix")
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError(f"data.weights={self.weights} must be non-negative with a positive sum")
        if not self.synthetic and not self.train_prefixes:
            raise ValueError("data.train_prefixes is empty: list dataset prefixes (e.g. "
                             "data/demo_text_document) or set data.synthetic=true")
        if self.reset_attention_mask:
            self.create_attention_mask = True


class MegatronTokenizerAdapter:
    """What megatron's GPT datasets read from a tokenizer: ``eod``, ``pad``, ``vocab_size``, and
    ``unique_identifiers`` (hashed into the index-cache key, so caches never mix tokenizers).

    ``pad`` is -1 (megatron's "no pad" value, never a real id) when the vocabulary has no pad
    distinct from EOD; otherwise megatron would mask every EOD as padding.
    """

    def __init__(self, eod: int, pad: int, vocab_size: int, identity: str):
        self.eod = int(eod)
        self.pad = int(pad) if pad != eod else -1
        self.vocab_size = int(vocab_size)
        self.unique_identifiers = {"class": "megatron_kd", "identity": identity,
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "MegatronTokenizerAdapter":
        """Adapter for one of our tokenizers."""
        return cls(tok.eod, tok.pad, tok.vocab_size, tok.identity)


def _mock_classes():
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    class SyntheticTokens:
        """Deterministic random documents: Zipf-distributed ids (learnable unigram statistics),
        EOD at the end of each. Lengths ~ U[1, 4 * seq_length]."""

        def __init__(self, vocab_size: int, eod: int, seed: int, seq_length: int, num_docs: int = 3000):
            self.vocab_size, self.eod, self.seed = vocab_size, eod, seed
            rng = np.random.default_rng(seed)
            self.sequence_lengths = rng.integers(1, 4 * seq_length + 1, size=num_docs, dtype=np.int32)
            ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
            probs = 1.0 / ranks
            probs[eod] = 0.0
            self.probs = probs / probs.sum()

        def __len__(self) -> int:
            return len(self.sequence_lengths)

        def __getitem__(self, idx: int) -> np.ndarray:
            n = int(self.sequence_lengths[idx])
            rng = np.random.default_rng([self.seed, int(idx)])
            doc = rng.choice(self.vocab_size, size=n, p=self.probs).astype(np.int64)
            doc[-1] = self.eod
            return doc

        def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
            doc = self[idx]
            return doc[offset: None if length is None else offset + length]

    class SyntheticGPTDataset(MockGPTDataset):
        """megatron's ``GPTDataset`` over :class:`SyntheticTokens`."""

        @staticmethod
        def build_low_level_dataset(dataset_path, config):  # noqa: ARG004 - megatron signature
            tok = config.tokenizer
            return SyntheticTokens(tok.vocab_size, tok.eod, config.random_seed, config.sequence_length)

    return SyntheticGPTDataset


@contextlib.contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` even when
    no process group exists; let it see rank 0 in a plain single process (only while building)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


@contextlib.contextmanager
def _quiet_mock_cache_warning(active: bool) -> Iterator[None]:
    """Synthetic datasets are never cached, which megatron reports as a WARNING per split."""
    logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    level = logger.level
    if active:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_prefixes(prefixes: list[str], tok: Tokenizer | None, check_manifest: bool,
                    verify: bool = False) -> list[dict]:
    infos = []
    for prefix in prefixes:
        info = validate_indexed_files(prefix)  # clear error before megatron maps the files
        if check_manifest:
            manifest = read_dataset_manifest(prefix)
            if tok is not None:
                check_tokenizer(manifest, tok)
            if verify:
                verify_checksums(prefix)
        if tok is not None:  # token ids beyond the vocabulary would crash the embedding mid-run
            check_token_ids(prefix, tok.vocab_size, full=verify)
        infos.append(info)
    return infos


def _check_split_sizes(cfg: DataConfig, infos: list[dict], sizes: list[int | None]) -> set[int]:
    """Raise one line when a split asked for samples gets no document of a prefix; return the splits
    (0 train, 1 valid, 2 test) that get no document and are asked for 0 samples: megatron's
    GPTDataset would loop forever on them (it wants one extra token from an empty epoch), so
    they are not built."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split))
    empty: set[int] = set()
    for prefix, info in zip(cfg.train_prefixes, infos):
        n = info["sequence_count"]
        for i, (name, bounds, size) in enumerate(zip(("train", "valid", "test"), matrix, sizes)):
            if bounds is None or size is None:
                continue
            docs = int(round(bounds[1] * n)) - int(round(bounds[0] * n))
            if docs < 1 and size == 0:
                empty.add(i)
            elif docs < 1:
                raise ValueError(f"the {name} split of {prefix} gets 0 of its {n} documents with "
                                 f"data.split={cfg.split!r}: raise that split's share, use more data, "
                                 f"or request 0 {name} samples")
    return empty


def build_gpt_datasets(
    cfg: DataConfig,
    tokenizer: Tokenizer | str | None,
    train_samples: int | None,
    valid_samples: int | None,
    test_samples: int | None,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[Any, Any, Any]:
    """Build (train, valid, test) datasets with megatron's ``BlendedMegatronDatasetBuilder``.

    ``*_samples`` = samples of ``seq_length`` tokens each split must provide (the data is
    repeated in shuffled epochs if needed; None = one epoch). A split with weight 0 is None.
    Every rank must call this (rank 0 builds the index cache first, the others then load it).
    ``is_built_on_rank`` defaults to every rank building its own (data-parallel) view.
    Datasets are validated (files, manifest, tokenizer identity) before anything is built.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tok = load_tokenizer(tokenizer) if tokenizer not in (None, "") else None
    if tok is None and cfg.tokenizer and not cfg.synthetic:
        tok = load_tokenizer(cfg.tokenizer)
    sizes = [train_samples, valid_samples, test_samples]
    common = dict(random_seed=cfg.seed, sequence_length=cfg.seq_length,
                  reset_position_ids=cfg.reset_position_ids, reset_attention_mask=cfg.reset_attention_mask,
                  eod_mask_loss=cfg.eod_mask_loss, create_attention_mask=cfg.create_attention_mask,
                  mmap_bin_files=cfg.mmap)
    if cfg.synthetic:
        if tok is not None:
            adapter = MegatronTokenizerAdapter.from_tokenizer(tok)
        else:
            v = cfg.synthetic_vocab_size
            adapter = MegatronTokenizerAdapter(v - 1, -1, v, f"synthetic:{v}")
        config = GPTDatasetConfig(tokenizer=adapter, **common)
        cls = _mock_classes()
    else:
        if tok is None:
            raise ValueError("no tokenizer: pass one or set data.tokenizer to the tokenizer the datasets "
                             "were preprocessed with")
        separate = bool(cfg.valid_prefixes or cfg.test_prefixes)
        infos = _check_prefixes(cfg.train_prefixes + cfg.valid_prefixes + cfg.test_prefixes, tok,
                                cfg.check_manifest, cfg.verify_data)
        unbuilt = _check_split_sizes(cfg, infos[: len(cfg.train_prefixes)], sizes) if not separate else set()
        cache = cfg.cache_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.train_prefixes[0])),
                                              "index_cache")
        prefixes = [os.path.abspath(p) for p in cfg.train_prefixes]
        train_blend = (prefixes, list(cfg.weights) if cfg.weights is not None else None)
        if separate:
            def blend(ps: list[str]):
                return ([os.path.abspath(p) for p in ps], None) if ps else None

            config = GPTDatasetConfig(blend_per_split=[train_blend, blend(cfg.valid_prefixes),
                                                       blend(cfg.test_prefixes)],
                                      path_to_cache=cache, tokenizer=MegatronTokenizerAdapter.from_tokenizer(tok),
                                      **common)
        else:
            config = GPTDatasetConfig(blend=train_blend, split=cfg.split, path_to_cache=cache,
                                      tokenizer=MegatronTokenizerAdapter.from_tokenizer(tok), **common)
            for i in unbuilt:  # no documents, no samples wanted: that split is None
                config.split_matrix[i] = None
        cls = GPTDataset
        if cfg.weights is not None and any(s is None for s in sizes):
            raise ValueError("data.weights needs explicit train/valid/test sample counts (None given)")
    builder = BlendedMegatronDatasetBuilder(cls, sizes, is_built_on_rank or (lambda: True), config)
    with _rank_zero_without_process_group(), _quiet_mock_cache_warning(cfg.synthetic):
        train, valid, test = builder.build()
    return train, valid, test

