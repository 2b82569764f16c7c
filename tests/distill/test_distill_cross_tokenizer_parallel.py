"""Cross-tokenizer KD (kd.cross_tokenizer=hybrid) on megatron-core schedules: TP=2 and PP=2 give
the same per-step lm / kd / total / xtok_aligned as TP=1/PP=1 (same student weights, same data),
online (teacher in the job) and offline (byte-keyed logits store; the teacher's vocabulary is
sharded over TP like the student's). The teacher (SentencePiece, 420 ids, deeper and wider) and the student (its own 360-id
SentencePiece) read their own tokenisations of the same demo documents.

    PYTHONPATH=$PWD python -m pytest -q -m slow tests/distill/test_distill_cross_tokenizer_parallel.py
"""
import json
from pathlib import Path

import pytest

from dist_helpers import run_workers
from distkit import build, distill_config, fit, packed, unpacked

TEACHER = dict(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
               vocab_size=420, max_position_embeddings=64, init_method_std=0.08)


def _prepare(tmp: Path) -> None:
    from megatron_kd.data.demo_corpus import build_demo_corpus
    from megatron_kd.data.preprocess import preprocess
    from megatron_kd.data.tokenizers import train_sentencepiece
    from megatron_kd.models import ModelConfig, build_gpt_model
    from megatron_kd.runtime import ParallelConfig, init_distributed, set_seed
    from megatron_kd.training.checkpoint import save_checkpoint

    build_demo_corpus(str(tmp / "corpus.jsonl"), max_docs=40)
    texts = [json.loads(ln)["text"] for ln in (tmp / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    for name, size in (("tt", 420), ("st", 360)):
        train_sentencepiece(texts, size, str(tmp / name))
        preprocess([str(tmp / "corpus.jsonl")], str(tmp / name), str(tmp / f"{name}.model"), append_eod=True,
                   workers=1, progress=False)
    init_distributed(ParallelConfig())
    set_seed(11)
    cfg = ModelConfig(**TEACHER)
    save_checkpoint(tmp / "teacher", [build_gpt_model(cfg)], cfg, iteration=1, tokenizer=str(tmp / "tt.model"))


def _config(tmp: Path, tp: int, pp: int, offline: bool = False):
    return distill_config(str(tmp / "teacher"), tp, pp, overrides=[
        "data.synthetic=false", f"data.prefixes=[{tmp}/st_text_document]", f"data.tokenizer={tmp}/st.model",
        "data.split=100,0,0", "model.vocab_size=360", f"teacher.tokenizer={tmp}/tt.model",
        "kd.cross_tokenizer=hybrid", "kd.hybrid_unmatched_weight=0.5", "train.eval_iters=0",
        *(["kd.mode=offline", f"kd.logits_store={tmp}/store"] if offline else [])])


def _curve(steps):
    return [{k: s[k] for k in ("lm", "kd", "total", "xtok_aligned")} for s in steps]


def _reference_worker(rank, world_size, tmp):
    tmp = Path(tmp)
    _prepare(tmp)
    trainer, make_train, make_valid, state = build(_config(tmp, 1, 1))
    steps, _ = fit(trainer, make_train, make_valid)
    from megatron_kd.logits.precompute import PrecomputeConfig, precompute_logits

    precompute_logits(PrecomputeConfig(teacher=str(tmp / "teacher"), data=f"{tmp}/tt_text_document",
                                       out=str(tmp / "store"), top_k=64, seq_length=64))
    trainer, make_train, make_valid, _ = build(_config(tmp, 1, 1, offline=True), state)
    offline, _ = fit(trainer, make_train, make_valid)
    return packed(({"online": _curve(steps), "offline": _curve(offline)}, state))


def _parallel_worker(rank, world_size, tmp, state_bytes):
    tmp = Path(tmp)
    state = unpacked(state_bytes)
    out = {}
    for mode in ("online", "offline"):
        for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
            trainer, make_train, make_valid, _ = build(_config(tmp, tp, pp, offline=mode == "offline"), state)
            steps, _ = fit(trainer, make_train, make_valid)
            out[(mode, name)] = _curve(steps)
    return out


@pytest.mark.slow
def test_cross_tokenizer_tp2_and_pp2_equal_tp1(tmp_path):
    (ref,) = run_workers(_reference_worker, 1, str(tmp_path), timeout=900)
    refs, state = unpacked(ref)
    results = run_workers(_parallel_worker, 2, str(tmp_path), packed(state), timeout=900)
    for mode, ref_curve in refs.items():
        assert len(ref_curve) == 3 and 0.3 < ref_curve[0]["xtok_aligned"] < 1.0 and ref_curve[0]["kd"] > 0, mode
        for name in ("tp2", "pp2"):
            got = results[0][(mode, name)]
            assert len(got) == len(ref_curve), (mode, name)
            for step, (a, b) in enumerate(zip(got, ref_curve)):
                for key in b:
                    assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-5), (mode, name, step, key, a[key], b[key])
