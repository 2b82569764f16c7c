"""Training side: stored teacher targets aligned with the samples of a megatron ``GPTDataset``.

A GPT sample concatenates documents (each ending in EOD) and cuts the stream into
``sequence_length (+1)`` tokens; ``tokens[j]`` predicts ``labels[j]``, the next token of the
stream. Through the dataset's ``shuffle_index``/``sample_index``/``document_index`` every
sample position ``j`` maps back to ``(document, offset)``. Its teacher target is the stored one
of that position whenever ``labels[j]`` is the next token *of the same document*; where the label
is the first token of the next document (after a document's last token), or padding, there is no
teacher target and the row is padding (ids -1), so a KD loss skips it. The mapping does not depend
on the seed, sequence length, micro-batch or parallel layout.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from megatron_kd.logits.store import LogitsStore


def sample_positions(gpt_dataset: Any, idx: int) -> tuple[np.ndarray, np.ndarray]:
    """``(documents, offsets)`` int64 [seq_length + extra] of the text of sample ``idx``.

    ``extra`` is 1 when the dataset draws one extra token per sample (megatron's
    ``add_extra_token_to_sequence``, the default): position ``j < seq_length`` is ``tokens[j]``
    and ``j + 1`` is ``labels[j]``. Padding positions get document -1.
    """
    for attr in ("shuffle_index", "sample_index", "document_index"):
        if not hasattr(gpt_dataset, attr):
            raise ValueError(f"{type(gpt_dataset).__name__} is not a megatron GPTDataset (no {attr}): wrap each "
                             "GPTDataset of a blend separately, with the store of its own data prefix")
    if gpt_dataset.shuffle_index is None:  # lazily memory-mapped indices (defer_npy_index_mmap)
        gpt_dataset._query_document_sample_shuffle_indices(0)
    cfg = gpt_dataset.config
    extra = int(cfg.add_extra_token_to_sequence)
    n = cfg.sequence_length + extra
    i = int(gpt_dataset.shuffle_index[idx])
    (beg, beg_off), (end, end_off) = gpt_dataset.sample_index[i], gpt_dataset.sample_index[i + 1]
    docs, offs = [], []
    for k in range(int(beg), int(end) + 1):
        d = int(gpt_dataset.document_index[k])
        lo = int(beg_off) if k == beg else 0
        hi = int(end_off) + extra if k == end else int(gpt_dataset.dataset.sequence_lengths[d])
        docs.append(np.full(hi - lo, d, dtype=np.int64))
        offs.append(np.arange(lo, hi, dtype=np.int64))
    docs_a, offs_a = np.concatenate(docs), np.concatenate(offs)
    if len(docs_a) < n:  # megatron pads a short final sample
        docs_a = np.concatenate([docs_a, np.full(n - len(docs_a), -1, np.int64)])
        offs_a = np.concatenate([offs_a, np.full(n - len(offs_a), -1, np.int64)])
    return docs_a[:n], offs_a[:n]


def sample_targets(gpt_dataset: Any, idx: int, store: LogitsStore, k_max: int | None = None,
                   pad_logprob: float = float("-inf")) -> tuple[np.ndarray, np.ndarray]:
    """Teacher targets ``(ids int64 [S, k], logprobs float32 [S, k])`` aligned with sample ``idx``'s
    ``labels`` (``S`` = sequence length; -1 / ``pad_logprob`` where there is no target)."""
    k = store.max_entries if k_max is None else k_max
    S = gpt_dataset.config.sequence_length
    docs, offs = sample_positions(gpt_dataset, idx)
    if len(docs) == S:  # no extra token: the last label is padding
        docs, offs = np.append(docs, -1), np.append(offs, -1)
    # Position j has a target iff its label is the next token of the same document.
    ok = (docs[:S] >= 0) & (docs[1:] == docs[:S]) & (offs[1:] == offs[:S] + 1)
    ids = np.full((S, k), -1, dtype=np.int64)
    lps = np.full((S, k), pad_logprob, dtype=np.float32)
    if not ok.any():
        return ids, lps
    # Runs of consecutive positions of one document -> one store read each.
    j = np.nonzero(ok)[0]
    breaks = np.nonzero((np.diff(j) != 1) | (docs[j[1:]] != docs[j[:-1]]))[0] + 1
    for run in np.split(j, breaks):
        a = int(run[0])
        i_run, l_run = store.get(int(docs[a]), int(offs[a]), len(run), k_max=k, pad_logprob=pad_logprob)
        ids[run], lps[run] = i_run, l_run
    return ids, lps


class TeacherTargetsDataset(torch.utils.data.Dataset):
    """A ``GPTDataset`` whose samples also carry ``target_ids`` [S, k] (int64, -1 padding) and
    ``target_logprobs`` [S, k] (float32) from a logits store, aligned with ``labels``.

    Args:
        gpt_dataset: a megatron ``GPTDataset`` over the store's indexed dataset.
        store: a :class:`LogitsStore` or its path.
        k_max: entries per token returned (default: the store's ``max_entries``); tokens with more
            keep their most probable ones.
        check: refuse (one-line ``ValueError``) a store computed on another dataset, or with
            another tokenizer when ``tokenizer`` is given.
        tokenizer: identity string / ``Tokenizer`` of the training run (optional check).
        pad_logprob: value at padding entries (``-inf`` = probability 0).
    """

    def __init__(self, gpt_dataset: Any, store: LogitsStore | str, k_max: int | None = None, check: bool = True,
                 tokenizer: Any = None, pad_logprob: float = float("-inf")):
        self.gpt_dataset = gpt_dataset
        self.store = store if isinstance(store, LogitsStore) else LogitsStore(store)
        self.k_max = self.store.max_entries if k_max is None else k_max
        self.pad_logprob = pad_logprob
        if gpt_dataset.config.sequence_length > self.store.seq_length:
            raise ValueError(f"sequence length {gpt_dataset.config.sequence_length} exceeds the logits store's "
                             f"teacher window {self.store.seq_length}: train with a shorter sequence or recompute "
                             "the store with a longer --seq-length")
        if check:
            self.store.check_compatible(gpt_dataset.dataset.path_prefix, tokenizer)

    def __len__(self) -> int:
        return len(self.gpt_dataset)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = dict(self.gpt_dataset[idx])
        ids, lps = sample_targets(self.gpt_dataset, idx, self.store, self.k_max, self.pad_logprob)
        sample["target_ids"] = torch.from_numpy(ids)
        sample["target_logprobs"] = torch.from_numpy(lps)
        return sample
