"""Held-out evaluation for the quickstart report: per-document losses, calibration, paired bootstrap.

:func:`evaluate_per_document` scores a checkpoint on an indexed held-out dataset exactly like
``megatron-kd eval`` (``megatron_kd.evaluation.lm_loss``: document-aligned windows of
``seq_length`` tokens, every token but a document's first predicted once) but keeps the sums per
*document* -- NLL (nats), scored tokens, UTF-8 bytes -- and the next-token expected calibration
error over every scored position (``megatron_kd.evaluation.calibration``).

:func:`paired_bootstrap` turns two models' per-document sums on the same documents into the
difference of their token-weighted held-out losses (or bits per byte) with a percentile 95%
interval from resampling documents with replacement (the same resample for both models, so
document difficulty cancels). Documents, not tokens, are resampled because tokens of one
document are not independent.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def evaluate_per_document(ckpt: str | Path, prefix: str | Path, seq_length: int, tokenizer: Any = None,
                          max_documents: int | None = None, micro_batch_size: int = 8,
                          bins: int = 15) -> dict[str, Any]:
    """Held-out loss of checkpoint ``ckpt`` on dataset ``prefix`` with per-document sums and ECE
    (single process, TP = PP = 1: what the quickstart runs); see :func:`score_documents`."""
    from megatron_kd.evaluation.loading import load_eval_target
    from megatron_kd.evaluation.lm_loss import open_eval_dataset

    target = load_eval_target(ckpt, tokenizer=tokenizer, tokenizer_required=False)
    seq_length = target.resolve_seq_length(seq_length)
    dataset = open_eval_dataset(prefix)
    target.check_dataset_tokenizer(prefix)
    return score_documents(target.model, dataset, target.vocab_size, seq_length, target.tokenizer,
                           max_documents, micro_batch_size, bins)


def score_documents(model: torch.nn.Module, dataset: Any, vocab: int, seq_length: int, tokenizer: Any = None,
                    max_documents: int | None = None, micro_batch_size: int = 8, bins: int = 15) -> dict[str, Any]:
    """Score the documents of an indexed ``dataset`` with ``model`` (TP = PP = 1, eval mode).

    Returns ``{"loss", "ppl", "tokens", "ece", "top1_accuracy", "mean_confidence", "positions",
    "calibration_bins", "seq_length", "documents", "doc_nll", "doc_tokens"}`` plus, with a
    ``tokenizer``, ``"bits_per_byte", "bytes", "doc_bytes"`` (the ``doc_*`` lists: one value per
    document, in order).
    """
    from megatron_kd.evaluation.calibration import CalibrationAccumulator, logprobs_and_top1
    from megatron_kd.evaluation.forward import forward_reduce
    from megatron_kd.evaluation.lm_loss import _Documents, _pad_batch, document_windows

    docs = _Documents(dataset)
    n_docs = len(docs) if max_documents is None else min(len(docs), max_documents)
    windows = document_windows(docs.lengths[:n_docs], seq_length)
    nll = np.zeros(n_docs)
    count = np.zeros(n_docs)
    calib = CalibrationAccumulator(bins)
    cache: dict[int, np.ndarray] = {}
    for lo in range(0, len(windows), micro_batch_size):
        group = windows[lo:lo + micro_batch_size]
        seqs = []
        for w in group:
            if w.doc not in cache:
                cache = {w.doc: docs.tokens(w.doc)}
            seqs.append(cache[w.doc][w.start:w.end])
        top = max(int(s.max()) for s in seqs)
        if top >= vocab:
            raise ValueError(f"token id {top} outside the model vocabulary [0, {vocab}): the held-out data was "
                             "tokenized with another tokenizer")
        tokens, labels, mask = _pad_batch(seqs, max(len(s) - 1 for s in seqs))

        def reduce_fn(logits, _i, labels=labels, mask=mask):
            lab = labels.to(logits.device)
            m = mask.to(logits.device)
            lp, conf, correct = logprobs_and_top1(logits, lab, vocab)  # one pass over the vocabulary
            calib.add(conf, correct, m)
            lp = lp.double()
            return torch.stack([-(lp * m).sum(-1), m.sum(-1)], dim=-1)

        (sums,) = forward_reduce(model, [tokens], reduce_fn, width=2)
        for row, w in enumerate(group):
            nll[w.doc] += float(sums[row, 0])
            count[w.doc] += float(sums[row, 1])
    nbytes = np.zeros(n_docs)
    if tokenizer is not None:
        eod = getattr(tokenizer, "eod", None)
        for d in range(n_docs):
            ids = [t for t in docs.tokens(d).tolist() if t != eod]
            nbytes[d] = len(tokenizer.decode(ids).encode("utf-8")) if ids else 0
    total, n = float(nll.sum()), float(count.sum())
    loss = total / n if n else float("nan")
    out = {"loss": loss, "ppl": math.exp(loss) if n else float("nan"), "tokens": int(n),
           "ece": calib.ece(), "top1_accuracy": calib.accuracy(), "positions": calib.count,
           "mean_confidence": float(calib.sums[1].sum() / max(calib.count, 1)),
           "calibration_bins": bins, "seq_length": seq_length, "documents": n_docs,
           "doc_nll": nll.tolist(), "doc_tokens": count.astype(np.int64).tolist()}
    if nbytes.sum() > 0:
        out.update(bits_per_byte=total / math.log(2) / float(nbytes.sum()), bytes=int(nbytes.sum()),
                   doc_bytes=nbytes.astype(np.int64).tolist())
    return out


def paired_bootstrap(nll_a, nll_b, denom, samples: int = 2000, seed: int = 0, scale: float = 1.0,
                     level: float = 0.95) -> dict[str, float]:
    """Difference ``(sum nll_a - sum nll_b) / sum denom * scale`` over documents, with a paired
    percentile bootstrap interval (``samples`` resamples of the documents with replacement).

    ``denom``: scored tokens per document (loss in nats/token; both models share the tokenizer)
    or bytes per document with ``scale = 1/ln 2`` (bits per byte; any two tokenizers).
    Returns ``{"delta", "low", "high", "level", "samples", "documents"}``.
    """
    a, b, t = (np.asarray(x, dtype=np.float64) for x in (nll_a, nll_b, denom))
    if not (a.shape == b.shape == t.shape) or a.ndim != 1:
        raise ValueError(f"paired_bootstrap needs per-document vectors of one length (got {a.shape}, {b.shape}, "
                         f"{t.shape})")
    diff = a - b
    delta = float(diff.sum() / t.sum() * scale) if t.sum() > 0 else float("nan")
    n = len(diff)
    if n < 2 or samples < 1:
        return {"delta": delta, "low": float("nan"), "high": float("nan"), "level": level, "samples": 0,
                "documents": n}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    num, den = diff[idx].sum(1), t[idx].sum(1)
    stats = num[den > 0] / den[den > 0] * scale
    lo, hi = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"delta": delta, "low": float(lo), "high": float(hi), "level": level, "samples": int(samples),
            "documents": n}


def verdict(ci: dict[str, float]) -> str:
    """``helps`` / ``hurts`` when the interval excludes 0, else ``no measurable effect at this scale``."""
    if math.isfinite(ci["high"]) and ci["high"] < 0:
        return "helps"
    if math.isfinite(ci["low"]) and ci["low"] > 0:
        return "hurts"
    return "no measurable effect at this scale"
