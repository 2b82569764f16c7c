"""Held-out language-modelling loss and perplexity, token-weighted, for any TP/PP/DP layout.

Which tokens are scored (so numbers are comparable across models that share a tokenizer):

* Each *document* of an indexed dataset (sentence-split datasets: the concatenation of the
  document's sequences) is cut into non-overlapping windows of ``seq_length + 1`` tokens that
  share one boundary token: window k holds tokens ``[k*L, min((k+1)*L, n-1)]``; its first ``L``
  (or fewer) tokens are the input and every later token is predicted from the tokens of its own
  window only. Every token of a document except its first is predicted exactly once; documents
  of one token contribute nothing; context never crosses a document or window boundary.
  (If preprocessing appended an end-of-document token, predicting it is scored like any token.)
* ``loss`` = sum of -log p(token | window prefix) over all scored tokens / their number (nats per
  token, each token weighs the same: not a mean of per-window means); ``ppl = exp(loss)``.
* With a tokenizer, ``bits_per_byte`` = total NLL / ln 2 / UTF-8 bytes of the decoded documents
  (end-of-document ids left out), comparable across tokenizers. The bytes include each document's
  unscored first token, a bias of about one token per document (small for long documents;
  splitting bytes at a token boundary is not well defined for byte-level tokenizers).

Batches from a training data iterator (dicts with ``tokens``/``labels``/``loss_mask``) are scored
as they are instead: the loss is the masked token-weighted mean over their labels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from megatron_kd.data.manifest import strip_dataset_ext  # noqa: F401  (re-exported: runner imports it here)
from megatron_kd.evaluation.forward import dp_all_reduce_sum, dp_shard, forward_reduce, progress_bar
from megatron_kd.evaluation.vocab import token_logprobs


@dataclass(frozen=True)
class Window:
    """One scored window: tokens ``[start, end)`` of document ``doc`` (input = all but the last)."""

    doc: int
    start: int
    end: int


def document_windows(doc_lengths: Sequence[int], seq_length: int) -> list[Window]:
    """The windows scoring every token but the first of each document once (see module docs)."""
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be >= 1")
    windows = []
    for doc, n in enumerate(doc_lengths):
        for start in range(0, max(int(n) - 1, 0), seq_length):
            windows.append(Window(doc, start, min(start + seq_length + 1, int(n))))
    return windows


class _Documents:
    """Document view of a megatron ``IndexedDataset`` (or any sequence of token arrays)."""

    def __init__(self, data: Any):
        self.data = data
        doc_idx = getattr(data, "document_indices", None)
        if doc_idx is not None and hasattr(data, "sequence_lengths"):
            self.doc_idx = np.asarray(doc_idx, dtype=np.int64)
            seq_lens = np.asarray(data.sequence_lengths, dtype=np.int64)
            cums = np.concatenate([[0], np.cumsum(seq_lens)])
            self.lengths = (cums[self.doc_idx[1:]] - cums[self.doc_idx[:-1]]).tolist()
        else:
            self.doc_idx = None
            self.lengths = [len(data[i]) for i in range(len(data))]

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, doc: int) -> np.ndarray:
        if self.doc_idx is None:
            return np.asarray(self.data[doc], dtype=np.int64)
        lo, hi = int(self.doc_idx[doc]), int(self.doc_idx[doc + 1])
        parts = [np.asarray(self.data[j], dtype=np.int64) for j in range(lo, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _pad_batch(seqs: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad windows (each n+1 tokens) into tokens/labels/mask [b, width] (padding id 0)."""
    b = len(seqs)
    tokens = torch.zeros(b, width, dtype=torch.long)
    labels = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.float64)
    for r, w in enumerate(seqs):
        n = len(w) - 1
        t = torch.from_numpy(np.asarray(w, dtype=np.int64))
        tokens[r, :n], labels[r, :n], mask[r, :n] = t[:-1], t[1:], 1.0
    return tokens, labels, mask


def _masked_sums(model, tok_batches, label_batches, mask_batches, vocab_size) -> torch.Tensor:
    """[sum NLL (nats), scored tokens] over a group of micro-batches (this DP rank)."""

    def reduce_fn(logits, i):
        lp = token_logprobs(logits, label_batches[i].to(logits.device), vocab_size).double()
        m = mask_batches[i].to(lp.device)
        return torch.stack([-(lp * m).sum(-1), m.sum(-1)], dim=-1)  # [b, 2]

    outs = forward_reduce(model, tok_batches, reduce_fn, width=2)
    return sum((o.sum(0) for o in outs), torch.zeros(2, dtype=torch.float64))


def _result(nll: float, tokens: float, num_bytes: float | None = None, **extra) -> dict[str, Any]:
    loss = nll / tokens if tokens else float("nan")
    out = {"loss": loss, "ppl": math.exp(loss) if tokens else float("nan"), "tokens": int(tokens),
           "nll_sum": nll}
    if num_bytes:
        out["bits_per_byte"] = nll / math.log(2) / num_bytes
        out["bytes"] = int(num_bytes)
    out.update(extra)
    return out


def evaluate_lm_loss(model: torch.nn.Module, data: Any, vocab_size: int, seq_length: int | None = None,
                     micro_batch_size: int = 4, max_documents: int | None = None, tokenizer: Any = None,
                     microbatches_per_step: int = 8, show_progress: bool = True) -> dict[str, Any]:
    """Token-weighted LM loss of ``model`` (this rank's stage; any TP/PP/DP) on held-out data.

    ``data``: an indexed dataset (megatron ``IndexedDataset`` or any sequence of token arrays;
    scored in document-aligned windows of ``seq_length`` inputs, see the module docstring;
    windows are split over data-parallel ranks), or an iterable of batch dicts
    ``{"tokens", "labels", "loss_mask"}`` [b, s] (this DP rank's share, e.g. from a training
    ``ResumableBatchIterator``). ``vocab_size``: the real vocabulary (padded ids are masked).
    Collective over the whole world; every rank returns
    ``{"loss" (nats/token), "ppl", "tokens", "nll_sum"[, "bits_per_byte", "bytes"]}``.
    """
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return _evaluate_batches(model, data, vocab_size, microbatches_per_step)
    if seq_length is None:
        raise ValueError("evaluate_lm_loss on documents needs seq_length (tokens of context per window)")
    docs = _Documents(data)
    n_docs = len(docs) if max_documents is None else min(len(docs), max_documents)
    windows = document_windows(docs.lengths[:n_docs], seq_length)
    num_bytes = _document_bytes(docs, n_docs, tokenizer) if tokenizer is not None else None
    mine = [windows[i] for i in dp_shard(len(windows))]
    from megatron.core import parallel_state

    fixed_width = parallel_state.get_pipeline_model_parallel_world_size() > 1  # p2p needs one shape
    totals = torch.zeros(2, dtype=torch.float64)
    cache: dict[int, np.ndarray] = {}
    bar = progress_bar(len(mine), "eval lm-loss", unit="win", enabled=show_progress)
    step = micro_batch_size * microbatches_per_step
    for lo in range(0, len(mine), step):
        group = mine[lo:lo + step]
        toks, labs, masks = [], [], []
        for j in range(0, len(group), micro_batch_size):
            seqs = []
            for w in group[j:j + micro_batch_size]:
                if w.doc not in cache:
                    cache = {w.doc: docs.tokens(w.doc)}  # windows are in document order
                seqs.append(cache[w.doc][w.start:w.end])
            _check_ids(seqs, vocab_size)
            width = seq_length if fixed_width else max(len(s) - 1 for s in seqs)
            if fixed_width:  # equally many rows too
                seqs += [np.zeros(1, dtype=np.int64)] * (micro_batch_size - len(seqs))
            t, lab, m = _pad_batch(seqs, width)
            toks.append(t), labs.append(lab), masks.append(m)
        totals += _masked_sums(model, toks, labs, masks, vocab_size)
        bar.update(len(group))
    bar.close()
    dp_all_reduce_sum(totals)
    return _result(float(totals[0]), float(totals[1]), num_bytes, seq_length=seq_length,
                   documents=n_docs, windows=len(windows))


def _check_ids(seqs: list[np.ndarray], vocab_size: int) -> None:
    top = max((int(s.max()) for s in seqs if len(s)), default=0)
    if top >= vocab_size or min((int(s.min()) for s in seqs if len(s)), default=0) < 0:
        raise ValueError(f"dataset holds token id {top} outside the model vocabulary [0, {vocab_size}): "
                         "the data was tokenized with another tokenizer; re-run preprocess with the model's")


def _document_bytes(docs: _Documents, n_docs: int, tokenizer: Any) -> float:
    """UTF-8 bytes of the decoded documents, end-of-document ids left out."""
    eod = getattr(tokenizer, "eod", None)
    total = 0
    for d in range(n_docs):
        ids = [t for t in docs.tokens(d).tolist() if t != eod]
        total += len(tokenizer.decode(ids).encode("utf-8")) if ids else 0
    return float(total)


def _evaluate_batches(model, batches: Iterable[dict[str, torch.Tensor]], vocab_size: int,
                      microbatches_per_step: int) -> dict[str, Any]:
    totals = torch.zeros(2, dtype=torch.float64)
    it: Iterator = iter(batches)
    while True:
        group = [b for _, b in zip(range(microbatches_per_step), it)]
        if not group:
            break
        totals += _masked_sums(model, [b["tokens"].long() for b in group], [b["labels"].long() for b in group],
                               [b["loss_mask"].double() for b in group], vocab_size)
    dp_all_reduce_sum(totals)
    return _result(float(totals[0]), float(totals[1]))


def open_eval_dataset(prefix: str | Path):
    """Open an indexed dataset for evaluation: ``megatron_kd.data.manifest.open_indexed_dataset``
    (validated) when the data module is present, else megatron-core's ``IndexedDataset``."""
    prefix = strip_dataset_ext(prefix)
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise FileNotFoundError(f"indexed dataset file {prefix + ext} does not exist: pass the prefix "
                                    "written by megatron-kd preprocess (path without .bin/.idx)")
    try:
        from megatron_kd.data.manifest import open_indexed_dataset
    except ImportError:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return IndexedDataset(prefix)
    return open_indexed_dataset(prefix)


def evaluate_checkpoint_lm_loss(ckpt_dir: str | Path, dataset_prefix: str | Path, seq_length: int | None = None,
                                micro_batch_size: int = 4, max_documents: int | None = None,
                                params_dtype: str = "fp32", tokenizer: Any = None, iteration: int | None = None,
                                tensor_parallel: int = 1, pipeline_parallel: int = 1) -> dict[str, Any]:
    """Load a checkpoint (any TP/PP; initialises distributed if needed) and evaluate its LM loss on
    the indexed dataset ``dataset_prefix`` (see :func:`evaluate_lm_loss`). ``seq_length``
    defaults to min(1024, max_position_embeddings). ``tokenizer`` (optional, object or path)
    adds bits-per-byte and is checked against the dataset manifest."""
    from megatron_kd.evaluation.loading import load_eval_target

    target = load_eval_target(ckpt_dir, tokenizer=tokenizer, tokenizer_required=False,
                              tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                              params_dtype=params_dtype, iteration=iteration)
    seq_length = target.resolve_seq_length(seq_length)
    dataset = open_eval_dataset(dataset_prefix)
    target.check_dataset_tokenizer(dataset_prefix)
    result = evaluate_lm_loss(target.model, dataset, target.vocab_size, seq_length, micro_batch_size,
                              max_documents=max_documents, tokenizer=target.tokenizer)
    result["dataset"] = str(dataset_prefix)
    return result
