"""``megatron-kd logits``: run a teacher over an indexed dataset and write the logits store.

Parallelism: the teacher runs at any TP/PP through megatron-core's forward-only schedule; the
data-parallel replicas take disjoint shards. Inside a model-parallel group every rank walks the
same shards and micro-batches; the last pipeline stage's TP rank 0 encodes and writes them (in a
background thread, overlapping the next forward).

Resumable and idempotent: a shard is complete when its record ``shards/shard_i.json`` exists (it
is written after the shard file was renamed into place); a new run recomputes only the missing
shards, and the same inputs always give the same plan and the same bytes.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch

from megatron_kd.logits import manifest as mf
from megatron_kd.logits.precompute_config import PrecomputeConfig, check_inputs, check_pass
from megatron_kd.logits.selection import Selection, TargetSelector, label_logprobs, store_layout
from megatron_kd.logits.shard import ShardWriter
from megatron_kd.logits.store_writer import (StoreRun, finalize_manifest, finish_shard, put_labels, write_audit,
                                             write_byte_key, write_chunk)
from megatron_kd.logits.windows import MicroBatch, document_windows, plan_micro_batches, plan_shards
from megatron_kd.models.head import cache_chunks
from megatron_kd.utils.io import write_json_atomic

__all__ = ["PrecomputeConfig", "finalize_manifest", "precompute_logits", "precompute_stores", "write_audit"]


class _BatchSource:
    """Builds the input tensors and the target-position index of micro-batches."""

    def __init__(self, dataset, vocab_size: int, device: torch.device, doc_start: np.ndarray,
                 prefix: str | None = None, labels: bool = False):
        self.ds, self.vocab, self.device, self.doc_start = dataset, vocab_size, device, doc_start
        self.prefix, self.labels = prefix, labels

    def __call__(self, mb: MicroBatch) -> dict[str, Any]:
        tokens = np.zeros((mb.rows, mb.length), dtype=np.int64)
        sel, positions, labels = [], [], []
        for r, w in enumerate(mb.windows):
            if self.labels:  # a window ends before its document's last token: token `end` exists
                row = self.ds.get(w.doc, offset=w.start, length=w.length + 1)
                tokens[r, :w.length] = row[:-1]
                labels.append(row[w.emit - w.start + 1:])
            else:
                tokens[r, :w.length] = self.ds.get(w.doc, offset=w.start, length=w.length)
            sel.append(r * mb.length + np.arange(w.emit - w.start, w.length))
            positions.append(self.doc_start[w.doc] + np.arange(w.emit, w.end))
        if tokens.max(initial=0) >= self.vocab or tokens.min(initial=0) < 0:
            from megatron_kd.data.manifest import check_batch_token_ids

            # Names the .bin whose sha256 no longer matches its manifest (flipped bytes) before
            # blaming another tokenizer.
            check_batch_token_ids(tokens, self.vocab, self.prefix, what="dataset --data")
        pos = torch.arange(mb.length, device=self.device).unsqueeze(0).expand(mb.rows, -1)
        out = {"tokens": torch.from_numpy(tokens).to(self.device), "position_ids": pos,
               "sel": torch.from_numpy(np.concatenate(sel)).to(self.device),
               "positions": torch.from_numpy(np.concatenate(positions).astype(np.int64)).to(self.device)}
        if self.labels:  # the actual next token of every emitted position, in ``sel`` order
            out["labels"] = torch.from_numpy(np.concatenate(labels).astype(np.int64)).to(self.device)
        return out


def _collect(batch: dict, output: torch.Tensor, non_loss_data: bool = True, *, vocab: int,
             selectors: list[TargetSelector], keep: bool, forward_only: bool, labels: bool = False, head: Any = None):
    """Select the targets of the emitted positions of one micro-batch, for every store of the pass.

    ``output``: the teacher's logits [b, s, V/tp], or with ``head = (weight, sequence_parallel)``
    its final hidden states [b, s, H] (``[b, s/tp, H]`` sequence-parallel, see
    :mod:`megatron_kd.models.head`): then the LM head runs here, on the emitted positions only and
    chunk by chunk, and the [tokens, V] logits are never held whole. Each chunk of logits serves
    every selector (one store each) and, with ``labels``, the label log-probs.

    Returns ``(selections, label_logprobs)`` on writing ranks (``label_logprobs``: float32 numpy
    [emitted positions] or None), None elsewhere.
    """
    if forward_only and head is None:
        return None  # the "model" baseline: the model's forward made the full logits
    if head is not None:
        weight, sequence_parallel = head
        if sequence_parallel:
            from megatron_kd.losses.fused_linear import gather_dim0
            from megatron_kd.losses.vocab_parallel import resolve_tp

            output = gather_dim0(output.transpose(0, 1), resolve_tp()).transpose(0, 1)
    flat = output.reshape(-1, output.shape[-1])
    if forward_only:  # the "logits" baseline: the emitted positions' logits in one matmul, nothing else
        torch.matmul(flat.index_select(0, batch["sel"]).to(weight.dtype), weight.t())
        return None
    width = weight.shape[0] if head is not None else flat.shape[-1]
    chunk = max(1, (1 << 26) // width)  # bounds the chunk's logits (~256 MiB fp32)
    n = len(batch["sel"])
    # With the head here, on CPU: cache-sized chunks (the selection reads the logits while cached).
    bounds = (cache_chunks(n, chunk, width, flat.device) if head is not None
              else [(c0, min(c0 + chunk, n)) for c0 in range(0, n, chunk)])
    parts: list[list[Selection]] = [[] for _ in selectors]
    label_parts = []
    for c0, c1 in bounds:
        rows = flat.index_select(0, batch["sel"][c0:c1])
        if head is not None:
            rows = torch.matmul(rows.to(weight.dtype), weight.t())
        for selector, out in zip(selectors, parts):
            part = selector(rows, vocab, batch["positions"][c0:c1], keep=keep)
            if keep:
                out.append(part)
        if labels:
            label_parts.append(label_logprobs(rows, vocab, batch["labels"][c0:c1]))
    if not keep:
        return None
    lps = torch.cat(label_parts).cpu().numpy() if labels else None
    return [Selection.concat(p) for p in parts], lps


def _forward_calls(model, calls, source: _BatchSource, collect, pp: int, fused_head: bool = True):
    """Yield ``(micro_batch, result)`` for every micro-batch (results only on the last stage).

    ``fused_head``: the last stage's output layer is captured (:mod:`megatron_kd.models.head`) and
    :func:`_collect` runs it on the emitted positions only (off for the ``forward_only="model"``
    baseline: the model's own forward with full logits).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_kd.models.head import capture_for

    fb = get_forward_backward_func()
    cap = capture_for(model) if fused_head else None
    for mbs in calls:
        batches = [source(mb) for mb in mbs]
        it = iter(batches)

        def step(data_iterator, model_):
            b = next(data_iterator)
            if cap is None:
                return model_(b["tokens"], b["position_ids"], None), partial(collect, b)
            with cap.capturing():
                out = model_(b["tokens"], b["position_ids"], None)
            return out, partial(collect, b, head=(cap.pop_weight(), cap.sequence_parallel))

        with torch.no_grad():
            res = fb(forward_step_func=step, data_iterator=it, model=[model], num_microbatches=len(mbs),
                     seq_length=mbs[0].length, micro_batch_size=mbs[0].rows, forward_only=True,
                     collect_non_loss_data=True)
        res = res if res else [None] * len(mbs)
        yield from zip(mbs, res)


def precompute_logits(cfg: PrecomputeConfig, forward_only: bool | str = False) -> dict[str, Any]:
    """Compute (or resume) the store ``cfg.out``. Collective over all ranks (torchrun or single).

    ``forward_only`` runs the same teacher forwards on the same micro-batches and writes nothing
    (throughput baselines): ``True`` / ``"logits"`` = a plain teacher forward that ends with the
    logits of the emitted positions (the same captured output layer, one matmul, no selection);
    ``"model"`` = the model's own forward (logits of every position, padding included, in
    ``[b, s, V]`` layout). Returns a summary: shards written by this rank's group, positions,
    seconds and CPU seconds of the shard loop (``process_time``: every thread of the process,
    the encoder's included), ``complete``.
    """
    return precompute_stores([cfg], forward_only)[0]


def precompute_stores(cfgs: list[PrecomputeConfig], forward_only: bool | str = False) -> list[dict[str, Any]]:
    """Compute (or resume) several stores of the same teacher over the same data in ONE teacher pass.

    The stores may differ in what they keep (``method``, ``top_p``, ``top_k``, ``num_samples``,
    ``seed``, ``audit_fraction``, ``value_step``, ``label_logprobs``, ...) but share
    :data:`SHARED_FIELDS`; each chunk of teacher logits is computed once and serves every store.
    Each store stays a complete store on its own (manifest, shard records, resume): a shard is
    computed when any store lacks it, and written only to the stores that lack it. Every store is
    byte-identical to the one :func:`precompute_logits` writes alone. Returns one summary per store
    (the pass's seconds and positions; ``complete`` per store).
    """
    if forward_only not in (False, True, "logits", "model"):
        raise ValueError(f"forward_only={forward_only!r}: use False, True / 'logits' or 'model'")
    cfgs = list(cfgs)
    check_pass(cfgs)
    from megatron.core import parallel_state as ps
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_kd.runtime import ParallelConfig, barrier, device, init_distributed, is_main_process
    from megatron_kd.training.checkpoint import load_model_for_inference
    from megatron_kd.utils.progress import JsonlWriter, progress

    runs = []
    for cfg in cfgs:
        if cfg.seq_length is None:  # the first store's default window serves the pass
            cfg.seq_length = cfgs[0].seq_length
        header, meta, mcfg = check_inputs(cfg)
        runs.append(StoreRun(cfg, header, store_layout(header["settings"])))
    lead = cfgs[0]
    init_distributed(ParallelConfig(lead.tensor_parallel, lead.pipeline_parallel))
    barrier()  # every rank has checked the existing stores before rank 0 writes to them
    ds = IndexedDataset(mf.strip_dataset_prefix(lead.data), mmap=True)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    doc_start = np.concatenate([[0], np.cumsum(lengths)])
    shards = plan_shards(lengths, lead.shard_tokens)
    if is_main_process() and not forward_only:
        for run in runs:
            if not (run.path / mf.MANIFEST).is_file():
                (run.path / mf.SHARDS).mkdir(parents=True, exist_ok=True)
                np.save(run.path / mf.DOCUMENTS, doc_start)  # before the manifest: it marks a started store
                write_json_atomic(run.path / mf.MANIFEST, {**run.header, "num_documents": len(lengths),
                                                           "num_tokens": int(doc_start[-1]),
                                                           "num_shards": len(shards)})
    barrier()
    lacking = {i: (list(runs) if forward_only
                   else [run for run in runs if not mf.shard_record_file(run.path, i).is_file()])
               for i in range(len(shards))}
    todo = [i for i in range(len(shards)) if lacking[i]]
    barrier()  # all ranks read the same set of finished shards before any new one appears
    dtype = lead.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    model, _, _ = load_model_for_inference(lead.teacher, dtype, lead.iteration)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = todo[dp_rank::dp_size][: lead.max_shards]
    writer_rank = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and not forward_only
    vocab = mcfg.vocab_size
    want_labels = any(run.cfg.label_logprobs for run in runs) and not forward_only
    source = _BatchSource(ds, vocab, device(), doc_start, mf.strip_dataset_prefix(lead.data), labels=want_labels)
    plans = {i: [w for d in range(*shards[i]) for w in document_windows(d, int(lengths[d]), lead.seq_length,
                                                                          lead.overlap)] for i in mine}
    total = sum(w.end - w.emit for i in mine for w in plans[i])
    bar = progress(total, "teacher logits", unit="tok")
    metrics = [JsonlWriter(None if forward_only else run.path / "metrics.jsonl") for run in runs]
    pool = ThreadPoolExecutor(max_workers=1)  # encoding + writing overlap the next forward
    pending: list[Future] = []
    done_positions, t_start, c_start = 0, time.perf_counter(), time.process_time()
    active: list[StoreRun] = []
    try:
        for i in mine:
            t0 = time.perf_counter()
            lo, hi = shards[i]
            active = lacking[i]
            labels = want_labels and any(run.cfg.label_logprobs for run in active)
            for run in active:
                run.audit = []
                run.writer = (ShardWriter(mf.shard_file(run.path, i), int(doc_start[hi] - doc_start[lo]))
                              if writer_rank else None)
            shard_labels = (np.full(int(doc_start[hi] - doc_start[lo]), np.nan, dtype=np.float32)
                            if labels and writer_rank else None)
            collect = partial(_collect, vocab=vocab, selectors=[run.cfg.selector() for run in active],
                              keep=writer_rank, forward_only=forward_only, labels=labels)
            calls = plan_micro_batches(plans[i], lead.seq_length, lead.micro_batch_size,
                                       fixed_rows=lead.pipeline_parallel > 1)
            token_lo = doc_start - doc_start[lo]
            for mb, result in _forward_calls(model, calls, source, collect, lead.pipeline_parallel,
                                             fused_head=forward_only != "model"):
                if writer_rank:
                    selections, lps = result
                    for run, sel in zip(active, selections):
                        pending.append(pool.submit(write_chunk, run.writer, sel, mb, token_lo, run.layout, run.audit))
                    if shard_labels is not None:
                        put_labels(shard_labels, lps, mb, token_lo)
                    while len(pending) > 4 * len(active):
                        pending.pop(0).result()
                n = sum(w.end - w.emit for w in mb.windows)
                bar.update(n)
                done_positions += n
            if writer_rank:
                for f in pending:
                    f.result()
                pending.clear()
                for run in active:
                    finish_shard(run, i, lo, hi, doc_start, shard_labels if run.cfg.label_logprobs else None)
            dt = time.perf_counter() - t0
            for run, m in zip(runs, metrics):
                if run in active:
                    m.write({"shard": i, "positions": int(doc_start[hi] - doc_start[lo]), "seconds": round(dt, 3),
                             "stores_in_pass": len(active)})
    except BaseException:
        for f in pending:
            f.cancel()
        for run in active:
            if run.writer is not None:
                run.writer.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        for m in metrics:
            m.close()
    seconds = time.perf_counter() - t_start
    cpu_seconds = time.process_time() - c_start
    barrier()
    summaries = []
    for run in runs:
        complete = False
        if not forward_only:
            complete = all(mf.shard_record_file(run.path, i).is_file() for i in range(len(shards)))
            if complete and is_main_process():
                finalize_manifest(run.path)
                write_byte_key(run.cfg, meta)
        summaries.append({"shards": sum(1 for i in mine if run in lacking[i]), "positions": done_positions,
                          "seconds": seconds, "positions_per_s": done_positions / max(seconds, 1e-9),
                          "complete": complete, "cpu_seconds": cpu_seconds,
                          "cpu_positions_per_s": done_positions / max(cpu_seconds, 1e-9), "stores_in_pass": len(runs)})
    barrier()
    return summaries


