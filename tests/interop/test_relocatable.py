"""Self-contained artifacts: a checkpoint, a dataset and a logits store copied to a new directory
(the originals, the tokenizer included, deleted) still serve ``eval``, ``distill`` (offline and
online) and ``convert mcore-to-hf`` run from an unrelated working directory, with no tokenizer
flag: every command takes the tokenizer from the checkpoint (``CKPT/tokenizer``) or the dataset.

Run: ``PYTHONPATH=$PWD OMP_NUM_THREADS=1 python -m pytest -q tests/interop/test_relocatable.py``
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MODEL = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=64", "model.max_position_embeddings=64"]
TRAIN = ["train.micro_batch_size=2", "train.global_batch_size=4", "train.seq_length=32", "train.train_iters=2",
         "train.eval_iters=0", "train.log_interval=0", "optim.warmup_iters=0", "logging.quiet=true"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-m", "megatron_kd", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"megatron-kd {args[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Build tokenizer, dataset, teacher (pretrain) and logits store in ``src``, copy the artifacts
    to ``dst``, delete ``src``; return ``dst``."""
    from megatron_kd.data.demo_corpus import build_demo_corpus
    from megatron_kd.data.preprocess import preprocess
    from megatron_kd.data.tokenizers import train_sentencepiece

    src = tmp_path_factory.mktemp("src")
    build_demo_corpus(str(src / "demo.jsonl"), max_docs=24)
    texts = [json.loads(line)["text"] for line in open(src / "demo.jsonl", encoding="utf-8")]
    (src / "tok").mkdir()
    tok = train_sentencepiece(texts, 400, str(src / "tok" / "spm"))
    preprocess([str(src / "demo.jsonl")], str(src / "data" / "demo"), tok, progress=False)
    _cli(["pretrain", *MODEL, *TRAIN, "data.prefixes=[data/demo_text_document]", "data.split=100,0,0", "data.tokenizer=tok/spm.model",
          "checkpoint.save=teacher"], cwd=src)
    _cli(["logits", "--teacher", "teacher", "--data", "data/demo_text_document", "--output", "store",
          "--seq-length", "32", "--top-k", "8"], cwd=src)
    dst = tmp_path_factory.mktemp("dst") / "moved"
    dst.mkdir()
    for name in ("teacher", "data", "store"):
        shutil.copytree(src / name, dst / name)
    shutil.rmtree(src)  # the tokenizer is gone too: only the copies remain
    return dst


pytestmark = pytest.mark.slow  # seven CLI runs (~1-2 min on a quiet 2-core machine)


def test_checkpoint_carries_tokenizer_and_relative_paths(moved):
    meta_dir = moved / "teacher" / (moved / "teacher" / "latest").read_text().strip()
    meta = json.loads((meta_dir / "meta.json").read_text())
    assert meta["tokenizer"] == "tokenizer" and (moved / "teacher" / "tokenizer" / "tokenizer.model").is_file()
    assert meta["seq_length"] == 32
    man = json.loads((moved / "data" / "demo_text_document.manifest.json").read_text())
    assert not Path(man["tokenizer"]["path"]).is_absolute()
    store = json.loads((moved / "store" / "manifest.json").read_text())
    assert store["dataset"]["prefix_relative"] == "../data/demo_text_document"
    assert store["teacher"]["checkpoint_relative"] == "../teacher"


def test_eval_distill_convert_after_move(moved, tmp_path):
    work = tmp_path / "elsewhere"  # an unrelated working directory: nothing is launch-relative
    work.mkdir()
    task = work / "mc.jsonl"
    task.write_text("".join(json.dumps({"context": f"def f{i}(", "choices": ["x)", "self)"], "label": i % 2}) + "\n"
                            for i in range(4)))
    ckpt, data, store = moved / "teacher", moved / "data" / "demo_text_document", moved / "store"
    # eval: LM loss (context defaults to the training seq_length 32) + a task that needs the tokenizer
    res = _cli(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--tasks", str(task),
                "--output", str(work / "eval.json")], cwd=work)
    out = json.loads((work / "eval.json").read_text())
    assert out["context_length"] == 32 and out["lm_loss"]["demo_text_document"]["seq_length"] == 32
    assert "context 32 tokens" in res.stdout + res.stderr
    assert out["multiple_choice"]["mc"]["n"] == 4
    # distill offline from the moved store, online from the moved teacher: no data.tokenizer given
    _cli(["distill", *MODEL, *TRAIN, f"data.prefixes=[{data}]", "data.split=100,0,0", "kd.mode=offline", f"kd.logits_store={store}",
          "checkpoint.save=student_off"], cwd=work)
    _cli(["distill", *MODEL, *TRAIN, f"data.prefixes=[{data}]", "data.split=100,0,0", "kd.mode=online", f"teacher.load={ckpt}",
          "checkpoint.save=student_on"], cwd=work)
    for student in ("student_off", "student_on"):
        assert (work / student / "tokenizer" / "tokenizer.model").is_file()
    # export the moved teacher: the HF directory gets its tokenizer
    _cli(["convert", "mcore-to-hf", "--checkpoint", str(ckpt), "--output", str(work / "hf")], cwd=work)
    assert (work / "hf" / "config.json").is_file() and (work / "hf" / "tokenizer.model").is_file()
