"""``megatron-kd miniplm score|select|split``: MiniPLM difference sampling (see docs/miniplm.md)."""
from __future__ import annotations

import argparse
import json

from megatron_kd.commands._flags import flag


def _score(args: argparse.Namespace) -> int:
    from megatron_kd.miniplm.score import ScoreConfig, score_corpus
    from megatron_kd.runtime import destroy_distributed, is_main_process

    cfg = ScoreConfig(
        teacher=args.teacher, reference=args.reference, data=args.data, out=args.out,
        chunk_length=args.chunk_length, mode=args.mode, min_length=args.min_length,
        micro_batch_size=args.micro_batch_size, num_microbatches=args.num_microbatches,
        shard_size=args.shard_size, tensor_parallel=args.tensor_parallel,
        pipeline_parallel=args.pipeline_parallel, dtype=args.dtype, pad_multiple=args.pad_multiple,
        ce_chunk_tokens=args.ce_chunk_tokens, nll_kernel=args.nll_kernel, overwrite=args.overwrite, max_shards=args.max_shards,
        tokenizer=args.tokenizer, teacher_store=args.teacher_store,
    )
    try:
        man = score_corpus(cfg)
        if is_main_process():
            state = "complete" if man["complete"] else "incomplete (rerun to resume)"
            print(f"miniplm score: {man['num_instances']} instances in {man['num_shards']} shards, {state}: {args.out}")
            if man.get("summary"):
                print(json.dumps(man["summary"]))
    finally:
        destroy_distributed()
    return 0


def _select(args: argparse.Namespace) -> int:
    from megatron_kd.miniplm.select import SelectConfig, select_corpus

    report = select_corpus(SelectConfig(
        scores=args.scores, alpha=args.alpha, out=args.out, data=args.data, export_text=args.export_text,
        source_jsonl=args.source_jsonl, json_key=args.json_key, tokenizer=args.tokenizer,
        domain_key=args.domain_key, merge_adjacent=not args.no_merge_adjacent, histogram_bins=args.histogram_bins, overwrite=args.overwrite,
    ))
    print(f"miniplm select: kept {report['kept_instances']}/{report['num_instances']} instances, "
          f"{report['kept_tokens']}/{report['tokens']} tokens -> {args.out} (report {args.out}.report.json)")
    return 0


def _split(args: argparse.Namespace) -> int:
    from megatron_kd.miniplm.split import SplitConfig, split_dataset

    summary = split_dataset(SplitConfig(data=args.data, out_ref=args.out_ref, out_main=args.out_main,
                                        holdout_fraction=args.holdout_fraction, seed=args.seed,
                                        overwrite=args.overwrite))
    print(f"miniplm split: {json.dumps(summary)}")
    return 0


def register(subparsers) -> None:
    """Add ``miniplm`` with its ``score``, ``select`` and ``split`` sub-commands."""
    p = subparsers.add_parser("miniplm", help="MiniPLM difference sampling: score, select, split",
                              description="MiniPLM difference sampling (Gu et al., 2024): score a corpus with a "
                                          "teacher and a reference LM, keep the top-alpha instances.")
    sub = p.add_subparsers(dest="miniplm_command", metavar="<step>")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    s = sub.add_parser("score", help="mean per-token NLL of every instance under teacher and reference")
    s.add_argument("--teacher", required=True, help="teacher checkpoint directory (megatron-kd layout)")
    s.add_argument("--reference", required=True, help="reference-model checkpoint directory (same tokenizer)")
    s.add_argument("--data", required=True, help="indexed dataset prefix (path without .bin/.idx)")
    flag(s, "--output", dest="out", required=True, help="scores directory (created, or resumed if it holds this run)")
    s.add_argument("--chunk-length", type=int, default=None,
                   help="tokens per instance; a chunk of L tokens gives L-1 predictions (1025 = the paper; "
                        "default min(1024, the models' max_position_embeddings + 1))")
    s.add_argument("--mode", choices=("chunk", "document"), default="chunk",
                   help="chunk: fixed-length chunks within documents; document: whole documents")
    s.add_argument("--min-length", type=int, default=2, help="skip instances shorter than this many tokens")
    s.add_argument("--micro-batch-size", type=int, default=8,
                   help="rows per micro-batch at full chunk length (shorter batches get more rows)")
    s.add_argument("--num-microbatches", type=int, default=0,
                   help="micro-batches per pipeline schedule call (0 = 1 without PP, 2*PP with PP)")
    s.add_argument("--shard-size", type=int, default=16384, help="instances per store shard (unit of resume)")
    flag(s, "--tensor-parallel", type=int, default=1, help="tensor-parallel size for both models")
    flag(s, "--pipeline-parallel", type=int, default=1, help="pipeline-parallel size for both models")
    s.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="model dtype (auto: bf16 on GPU, fp32 on CPU); NLL is always fp32/fp64")
    s.add_argument("--pad-multiple", type=int, default=0,
                   help="round batch sequence lengths up to this multiple (0 = auto: 8 on GPU, 1 on CPU)")
    s.add_argument("--ce-chunk-tokens", type=int, default=2048, help="tokens per vocab-parallel NLL chunk")
    s.add_argument("--nll-kernel", default="auto", choices=("auto", "eager", "compiled"),
                   help="shard NLL kernel: auto = compiled (torch.compile) on GPU, eager on CPU")
    s.add_argument("--max-shards", type=int, default=None, help="stop after N shards per DP rank (resume later)")
    s.add_argument("--overwrite", action="store_true", help="replace a scores directory of another run")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer of both models (default: the one each checkpoint carries)")
    s.add_argument("--teacher-store", default=None, metavar="STORE",
                   help="read the teacher's NLL from a logits store of this teacher over --data written with "
                        "`megatron-kd logits --label-logprobs --overlap 0 --seq-length L` (L = --chunk-length, "
                        "default: the store's) instead of running the teacher: one teacher pass serves offline KD "
                        "and MiniPLM")
    s.set_defaults(func=_score)

    c = sub.add_parser("select", help="keep the top-alpha instances by r = nll_ref - nll_teacher")
    c.add_argument("--scores", required=True, help="scores directory written by miniplm score")
    c.add_argument("--alpha", type=float, default=0.5, help="fraction to keep; floor(alpha * N) instances")
    flag(c, "--output", dest="out", required=True, help="output prefix of the refined indexed dataset")
    c.add_argument("--data", default=None, help="source dataset prefix (default: the scored one, checksum-checked)")
    c.add_argument("--export-text", action="store_true", help="also write the kept text to OUT.jsonl")
    c.add_argument("--source-jsonl", default=None,
                   help="original JSONL (line i = document i): whole kept documents are copied verbatim")
    c.add_argument("--json-key", default="text", help="text field of --source-jsonl records")
    c.add_argument("--tokenizer", default=None, help="tokenizer for detokenising chunks (default: the scores')")
    c.add_argument("--domain-key", default="domain",
                   help="meta.jsonl field with the domain for the report (dotted, e.g. meta.pile_set_name)")
    c.add_argument("--no-merge-adjacent", action="store_true",
                   help="write every kept instance as its own document (default: join adjacent pieces)")
    c.add_argument("--histogram-bins", type=int, default=50, help="bins of the report's score histogram")
    c.add_argument("--overwrite", action="store_true", help="replace existing outputs at --output")
    c.set_defaults(func=_select)

    t = sub.add_parser("split", help="hold out a reference-model split (by content hash, no overlap)")
    t.add_argument("--data", required=True, help="source dataset prefix")
    t.add_argument("--holdout-fraction", type=float, default=0.05, help="expected fraction of documents held out")
    t.add_argument("--out-ref", required=True, help="output prefix of the held-out (reference) split")
    t.add_argument("--out-main", required=True, help="output prefix of the main split (to score and select)")
    t.add_argument("--seed", type=int, default=0, help="hash key of the split")
    t.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    t.set_defaults(func=_split)
