"""Benchmark of the teacher-logits store (issue 6); prints one JSON object.

Measures on a corpus and a small teacher:
  * storage: bytes per target position, per kept entry (all files, and payload only), mean kept ids
    per position at top-p 0.95 / top-k 100, and the same store re-encoded with its ids spread over
    a 151,936-id (Qwen) vocabulary (18-bit ids; uniform spreading is a pessimistic bound);
  * distortion: KL(stored || exact truncated distribution) from quantisation, over the kept ids
    renormalised (what a truncate-then-renormalise loss sees) and with the residual bucket;
  * speed: precompute positions/s vs a plain teacher forward over the same micro-batches
    (``precompute_over_forward``, issue 15's target >= 0.9; the forward ends with the captured output
    layer's matmul over the emitted positions, see :func:`run_speed`), interleaved rounds, medians,
    CPU-time clock at one thread by default; random reads (positions/s) through ``LogitsStore.get``.

    python benchmarks/bench_logits_store.py                       # builds its own corpus + teacher
    python benchmarks/bench_logits_store.py --data PREFIX --teacher CKPT   # e.g. the demo corpus

Without ``--data`` the corpus is ``pydoc_data.topics`` (CPython's help pages) tokenized with a
4,096-id byte-level BPE trained on it, and the teacher (``cpu-teacher``: 4 layers x 256) is trained here for
``--train-steps`` steps, so that its distributions are peaked like a real LM's (a random teacher's
are flat).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: spinning OpenMP threads would count as CPU time
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
THREADS = int(os.environ["OMP_NUM_THREADS"])
"""torch threads of every pass (``--threads``; spawned workers read it from the environment)."""
CLOCK = os.environ.get("BENCH_LOGITS_CLOCK", "cpu")
"""``cpu``: process CPU time of the shard loop (all threads, the encoder's included); ``wall``."""


def build_corpus(prefix: str, vocab: int, max_tokens: int) -> int:
    """pydoc topics -> BPE -> indexed dataset (documents end with EOD = id 0). Returns vocab size."""
    import pydoc_data.topics as topics
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import ByteLevelBPETokenizer

    texts = [t for _, t in sorted(topics.topics.items()) if len(t) > 200]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, special_tokens=["<eod>"])
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    total = 0
    for text in texts:
        ids = tok.encode(text).ids + [0]
        b.add_document(torch.tensor(ids), [len(ids)])
        total += len(ids)
        if total >= max_tokens:
            break
    b.finalize(prefix + ".idx")
    return tok.get_vocab_size()


def subset_corpus(prefix: str, out_prefix: str, max_tokens: int) -> str:
    """The first documents of ``prefix`` up to ``max_tokens`` tokens, as a new indexed dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    ds = IndexedDataset(prefix)
    if int(ds.sequence_lengths.sum()) <= max_tokens:
        return prefix
    b = IndexedDatasetBuilder(out_prefix + ".bin", dtype=ds.index.dtype)
    total = 0
    for i in range(len(ds)):
        doc = np.array(ds[i])
        b.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        total += len(doc)
        if total >= max_tokens:
            break
    b.finalize(out_prefix + ".idx")
    return out_prefix


def train_teacher(rank, world_size, ckpt: str, prefix: str, vocab: int, steps: int, seq: int) -> dict:
    """A few hundred Adam steps of the cpu-teacher preset (4 layers x 256) on the corpus; saves a
    megatron-kd checkpoint."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_kd.models import build_gpt_model, get_preset
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    init_distributed(ParallelConfig())
    set_seed(0)
    cfg = get_preset("cpu-teacher", vocab_size=vocab, max_position_embeddings=1024)
    model = build_gpt_model(cfg)
    ds = IndexedDataset(prefix)
    stream = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    t0, loss = time.time(), None
    for step in range(steps):
        starts = rng.integers(0, len(stream) - seq - 1, 16)
        x = torch.from_numpy(np.stack([stream[s:s + seq + 1] for s in starts]))
        logits = model(x[:, :-1], torch.arange(seq).unsqueeze(0).expand(16, -1), None)[..., :vocab]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), x[:, 1:].reshape(-1))
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_checkpoint(ckpt, [model], cfg, iteration=steps, tokenizer="bench-bpe")
    return {"train_loss": float(loss), "train_seconds": time.time() - t0}


def _rate(summary: dict) -> float:
    """Positions per second of one precompute_logits run on the benchmark's clock."""
    return summary["cpu_positions_per_s" if CLOCK == "cpu" else "positions_per_s"]


def run_speed(rank, world_size, kwargs: dict, repeats: int) -> dict:
    """Interleaved rounds of: the plain teacher forward (``forward_only="logits"``: the same
    micro-batches and captured output layer, ending with one matmul that makes the emitted
    positions' logits), the model's own forward (``"model"``: full logits of every position in
    [b, s, V], the older baseline) and the precompute; medians of ``repeats`` rounds, after one
    untimed warm-up round."""
    import shutil

    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits

    torch.set_num_threads(THREADS)
    runs: dict[str, list] = {"forward": [], "model_forward": [], "precompute": []}
    for r in range(repeats + 1):
        f = _rate(precompute_logits(PrecomputeConfig(**kwargs), forward_only="logits"))
        m = _rate(precompute_logits(PrecomputeConfig(**kwargs), forward_only="model"))
        shutil.rmtree(kwargs["out"], ignore_errors=True)
        p = _rate(precompute_logits(PrecomputeConfig(**kwargs)))
        if r:  # round 0 warms up (allocator, page cache, first-stage statistics)
            runs["forward"].append(f), runs["model_forward"].append(m), runs["precompute"].append(p)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {"forward_only_positions_per_s": med["forward"], "model_forward_positions_per_s": med["model_forward"],
            "precompute_positions_per_s": med["precompute"],
            "precompute_over_forward": med["precompute"] / med["forward"],
            "precompute_over_model_forward": med["precompute"] / med["model_forward"],
            "precompute_over_forward_per_round": [p / f for p, f in zip(runs["precompute"], runs["forward"])],
            "runs_forward_only": runs["forward"], "runs_model_forward": runs["model_forward"],
            "runs_precompute": runs["precompute"]}


def run_methods(rank, world_size, kwargs: dict, methods: list[dict], repeats: int) -> dict:
    """Per target-selection method: bytes per token and precompute throughput vs a forward-only pass
    (rounds interleave forward-only and every method; medians)."""
    import shutil

    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits
    from megatron_kd.logits.stats import store_stats

    torch.set_num_threads(THREADS)
    fwd, pre = [], {m["name"]: [] for m in methods}
    for _ in range(repeats):
        fwd.append(_rate(precompute_logits(PrecomputeConfig(**kwargs), forward_only="logits")))
        for m in methods:
            out = f"{kwargs['out']}_{m['name']}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = {**kwargs, **{k: v for k, v in m.items() if k != "name"}, "out": out}
            pre[m["name"]].append(_rate(precompute_logits(PrecomputeConfig(**cfg))))
    res = {"forward_only_positions_per_s": float(np.median(fwd))}
    for m in methods:
        st = store_stats(f"{kwargs['out']}_{m['name']}")["store"]
        med = float(np.median(pre[m["name"]]))
        res[m["name"]] = {"bytes_per_token": st["bytes_per_token"], "bytes_per_entry": st["bytes_per_entry"],
                          "mean_entries": st["mean_entries"], "positions_per_s": med,
                          "precompute_over_forward": med / res["forward_only_positions_per_s"],
                          **{k: st[k] for k in ("kept_teacher_mass", "kl_teacher_stored", "tv_teacher_stored",
                                                "audit_positions") if k in st}}
    return res


def exact_vs_stored(rank, world_size, kwargs: dict, num_docs: int) -> dict:
    """Re-run the teacher on some documents' windows; compare the exact (unquantised) truncated
    distributions with the stored ones."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_kd.logits import LogitsStore
    from megatron_kd.logits.truncation import select_top_p_top_k
    from megatron_kd.logits.windows import document_windows
    from megatron_kd.runtime import ParallelConfig, init_distributed
    from megatron_kd.training.checkpoint import load_model_for_inference

    init_distributed(ParallelConfig())
    model, cfg, _ = load_model_for_inference(kwargs["teacher"])
    ds = IndexedDataset(kwargs["data"])
    store = LogitsStore(kwargs["out"])
    kl_renorm, kl_resid, ids_equal, n = [], [], 0, 0
    for d in np.random.default_rng(0).choice(len(ds), min(num_docs, len(ds)), replace=False):
        doc = ds[int(d)].astype(np.int64)
        s_ids, s_lp = store.get(int(d), sort=True)
        for w in document_windows(int(d), len(doc), kwargs["seq_length"], kwargs["overlap"]):
            x = torch.from_numpy(doc[w.start:w.end]).unsqueeze(0)
            with torch.no_grad():
                logits = model(x, torch.arange(w.length).unsqueeze(0), None)[0, w.emit - w.start:]
            e_ids, e_lp, e_n = select_top_p_top_k(logits, cfg.vocab_size, kwargs["top_p"], kwargs["top_k"])
            for j in range(len(e_n)):
                o, k = w.emit + j, int(e_n[j])
                exact = dict(zip(e_ids[j, :k].tolist(), e_lp[j, :k].double().tolist()))
                got = {int(i): float(v) for i, v in zip(s_ids[o], s_lp[o]) if i >= 0}
                n += 1
                if set(got) != set(exact):
                    continue
                ids_equal += 1
                keys = sorted(exact)
                e = np.array([exact[i] for i in keys])
                s = np.array([got[i] for i in keys])
                es, ss = e - np.logaddexp.reduce(e), s - np.logaddexp.reduce(s)
                kl_renorm.append(float(np.sum(np.exp(ss) * (ss - es))))
                # With the residual bucket: (kept entries, 1 - kept mass), unrenormalised.
                pe, ps = np.exp(e), np.exp(s)
                re, rs = max(1 - pe.sum(), 1e-12), max(1 - ps.sum(), 1e-12)
                kl_resid.append(float(np.sum(ps * (s - e)) + rs * (np.log(rs) - np.log(re))))
    return {"positions_checked": n, "ids_identical_fraction": ids_equal / max(n, 1),
            "kl_renormalised_mean": float(np.mean(kl_renorm)), "kl_renormalised_max": float(np.max(kl_renorm)),
            "kl_with_residual_mean": float(np.mean(kl_resid)),
            "kl_with_residual_p99": float(np.quantile(kl_resid, 0.99))}


def storage_stats(store_path: str) -> dict:
    """Bytes per position / entry, and a 151,936-vocabulary re-encoding of the same entries."""
    from megatron_kd.logits import LogitsStore, codec
    from megatron_kd.logits.shard import ShardReader

    store = LogitsStore(store_path)
    st = store.manifest["stats"]
    files = sum(f.stat().st_size for f in Path(store_path).rglob("*") if f.is_file())
    payload = sum(len(ShardReader(Path(store_path) / "shards" / r["file"]).payload) - 8
                  for r in store.manifest["shards"])
    # Qwen-size re-encoding: a random injective map of the ids into [0, 151936).
    rng = np.random.default_rng(0)
    remap = rng.choice(151_936, store.vocab_size, replace=False)
    big_payload, entries = 0, 0
    for d in range(store.num_documents):
        ids, lp = store.get(d, sort=False)
        counts = (ids >= 0).sum(1)
        fi, fl = codec.flatten_rows(np.where(ids >= 0, remap[np.maximum(ids, 0)], -1), lp, counts)
        big_payload += len(codec.encode(counts, fi, fl, [len(counts)], 18, store.value_step).payload)
        entries += int(counts.sum())
    targets, E = st["targets"], st["entries"]
    hist = np.array(st["count_histogram"])
    return {
        "positions": st["positions"], "targets": targets, "kept_entries": E,
        "mean_kept_ids_per_target": E / targets, "median_kept_ids": int(np.searchsorted(np.cumsum(hist[1:]),
                                                                                         targets / 2) + 1),
        "fraction_capped_at_top_k": float(hist[store.top_k] / targets) if len(hist) > store.top_k else 0.0,
        "id_bits": store.id_bits, "vocab_size": store.vocab_size,
        "bytes_per_target_all_files": files / targets, "bytes_per_entry_all_files": files / E,
        "bytes_per_entry_payload": payload / E, "header_bytes_per_position": 4,
        "qwen_vocab_18bit_bytes_per_entry_payload": big_payload / entries,
        "qwen_vocab_18bit_bytes_per_entry_incl_headers": (big_payload + 4 * st["positions"]) / entries,
        "qwen_vocab_18bit_bytes_per_target": (big_payload + 4 * st["positions"]) / targets,
    }


def read_speed(store_path: str, seq: int, reads: int) -> dict:
    """Random reads of ``seq`` consecutive positions (a training sample's worth)."""
    from megatron_kd.logits import LogitsStore

    store = LogitsStore(store_path)
    lengths = np.diff(store.documents)
    rng = np.random.default_rng(1)
    docs = rng.choice(np.nonzero(lengths > 1)[0], reads)
    t0, pos = time.perf_counter(), 0
    for d in docs:
        n = int(lengths[d])
        o = int(rng.integers(0, max(n - seq, 0) + 1))
        ids, _ = store.get(int(d), o, min(seq, n - o))
        pos += len(ids)
    dt = time.perf_counter() - t0
    return {"random_read_positions_per_s": pos / dt, "random_read_mean_ms_per_read": 1e3 * dt / reads,
            "read_length": seq}


def main() -> None:
    global THREADS, CLOCK
    from dist_helpers import run_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help="indexed dataset prefix (default: build from pydoc topics)")
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (default: train a small one here)")
    ap.add_argument("--workdir", default=None, help="where to put corpus/teacher/store (default: a temp dir)")
    ap.add_argument("--max-tokens", type=int, default=200_000, help="corpus tokens when building one")
    ap.add_argument("--train-steps", type=int, default=60, help="teacher training steps when training one")
    ap.add_argument("--seq-length", type=int, default=256, help="teacher window")
    ap.add_argument("--top-p", type=float, default=0.95, help="top-p")
    ap.add_argument("--top-k", type=int, default=100, help="top-k")
    ap.add_argument("--bench-tokens", type=int, default=16384,
                    help="measure on the first documents of the corpus up to this many tokens (0 = all)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed interleaved rounds (forward / model forward / precompute) after a warm-up; medians")
    ap.add_argument("--kl-docs", type=int, default=10, help="documents re-run for the distortion measurement")
    ap.add_argument("--methods", default="",
                    help="target-selection methods to compare (topk | sample:N | topk+sample:K:N, comma-separated; "
                         "default '' = none; issue 16's set: topk,sample:12,sample:24,sample:48,topk+sample:20:12)")
    ap.add_argument("--audit-fraction", type=float, default=0.02, help="audit sample of the method stores")
    ap.add_argument("--skip-topk-details", action="store_true",
                    help="skip the top-k speed/distortion/read sections (methods comparison only)")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="torch threads of every pass (default: OMP_NUM_THREADS, else 1)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=CLOCK,
                    help="cpu: process CPU time (a shared machine's waiting does not count); wall: wall clock")
    args = ap.parse_args()
    THREADS, CLOCK = max(1, args.threads), args.clock
    os.environ["OMP_NUM_THREADS"], os.environ["BENCH_LOGITS_CLOCK"] = str(THREADS), CLOCK  # the workers' settings
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_logits_"))
    work.mkdir(parents=True, exist_ok=True)
    from megatron_kd.logits import native

    result: dict = {"benchmark": "logits_store", "torch_threads": THREADS, "clock": CLOCK,
                    # which CPU top-p/top-k selection ran: the C kernel, or the torch path (no compiler at
                    # install, another CPU, or MEGATRON_KD_NATIVE=0)
                    "selection_kernel": "c" if native.available() else "torch",
                    "load_average_at_start": os.getloadavg()[0]}
    data, teacher = args.data, args.teacher
    if data is None:
        data = str(work / "pydoc")
        vocab = build_corpus(data, 4096, args.max_tokens)
        result["corpus"] = f"pydoc_data.topics, byte-level BPE {vocab} ids, <= {args.max_tokens} tokens"
    else:
        result["corpus"] = data
    if teacher is None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        teacher = str(work / "teacher")
        ds = IndexedDataset(data)  # keep it alive while its memory-mapped documents are read
        vocab = int(max(ds[i].max() for i in range(len(ds)))) + 1
        result["teacher_training"] = run_workers(train_teacher, 1, teacher, data, max(vocab, 4096),
                                                 args.train_steps, 128, timeout=3600)[0]
        result["teacher"] = "cpu-teacher preset, 4 layers x 256 (trained here)"
    else:
        result["teacher"] = teacher
    if args.bench_tokens:
        data = subset_corpus(data, str(work / "bench_subset"), args.bench_tokens)
        result["bench_tokens"] = args.bench_tokens
    kwargs = dict(teacher=teacher, data=data, out=str(work / "store"), top_p=args.top_p, top_k=args.top_k,
                  seq_length=args.seq_length, overlap=0, micro_batch_size=8, shard_tokens=1 << 16, dtype="fp32")
    import shutil

    shutil.rmtree(kwargs["out"], ignore_errors=True)
    if not args.skip_topk_details:
        result.update(run_workers(run_speed, 1, kwargs, args.repeats, timeout=7200)[0])
        result["storage"] = storage_stats(kwargs["out"])
        result["distortion"] = run_workers(exact_vs_stored, 1, kwargs, args.kl_docs, timeout=3600)[0]
        result["reads"] = read_speed(kwargs["out"], args.seq_length, 300)
    methods = []
    for spec in filter(None, args.methods.split(",")):
        parts = spec.split(":")
        m = {"name": spec.replace(":", "_"), "method": parts[0], "audit_fraction": args.audit_fraction}
        if parts[0] == "sample":
            m["num_samples"] = int(parts[1])
        elif parts[0] == "topk+sample":
            m.update(top_k=int(parts[1]), num_samples=int(parts[2]))
        methods.append(m)
    if methods:
        result["methods"] = run_workers(run_methods, 1, kwargs, methods, args.repeats, timeout=7200)[0]
    result["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(result))  # one line, the last line of stdout


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    main()
