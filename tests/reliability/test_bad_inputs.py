"""Bad-input table: every case gives a clean one-line error (no traceback), the documented exit
code, and writes nothing. Config cases run `megatron_kd.cli.main` in-process (they fail before
any model is built); file cases call the validators the commands run before their work."""

import numpy as np
import pytest

from megatron_kd.cli import main
from reliability_helpers import REPO, run

TINY = str(REPO / "examples/cpu/pretrain_tiny.yaml")


def _cli(capsys, tmp_path, *args):
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(list(args))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "warning" not in ln.lower()]
    assert "Traceback" not in err
    assert len(lines) == 1 and "error:" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    return rc, lines[0]


CONFIG_CASES = [
    ("train.train_iters=null", "train.train_iters=null must be a number"),
    ("optim.lr=null", "optim.lr=null must be a number"),
    ("optim.min_lr=null", "optim.min_lr=null must be a number"),
    ("optim.lr=-3e-3", "optim.lr=-0.003 must be > 0"),
    ("train.nonfinite=ignore", "train.nonfinite='ignore' must be one of"),
    ("train.nonfinite_max_consecutive=0", "train.nonfinite_max_consecutive=0 must be >= 1"),
]


@pytest.mark.parametrize("override,message", CONFIG_CASES)
def test_bad_hyper_parameters_are_named(capsys, tmp_path, override, message):
    rc, line = _cli(capsys, tmp_path, "pretrain", "--config", TINY, f"checkpoint.save={tmp_path}/run", override)
    assert rc == 2 and message in line


def test_metrics_path_of_another_run_is_refused_untouched(capsys, tmp_path):
    other = tmp_path / "other_metrics.jsonl"
    other.write_text('{"step": 1, "split": "train", "loss": 5.0}\n' * 3)
    rc, line = _cli(capsys, tmp_path, "pretrain", "--config", TINY, f"checkpoint.save={tmp_path}/run",
                    f"logging.metrics_path={other}")
    assert rc == 2 and "holds another run's metrics" in line
    assert other.read_text().count("\n") == 3


def _write_dataset(prefix, docs, dtype=np.uint16):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("damage,message", [
    ("flip_bin", "outside the vocabulary"),
    ("truncate_idx", "truncated or corrupt"),
    ("empty_idx", "bad header"),
    ("truncate_bin", "the .bin is truncated"),
])
def test_damaged_datasets_are_refused_before_work(tmp_path, damage, message):
    from megatron_kd.data.manifest import check_token_ids

    prefix = tmp_path / "ds"
    _write_dataset(prefix, [[1, 2, 3, 4]] * 50)
    bin_, idx = tmp_path / "ds.bin", tmp_path / "ds.idx"
    if damage == "flip_bin":  # same size, one token id flipped far beyond the vocabulary
        data = bytearray(bin_.read_bytes())
        data[len(data) // 2 + 1] ^= 0xFF
        bin_.write_bytes(bytes(data))
    elif damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:-5])
    elif damage == "empty_idx":
        idx.write_bytes(b"")
    else:
        bin_.write_bytes(bin_.read_bytes()[:-2])
    with pytest.raises(ValueError) as info:
        check_token_ids(prefix, vocab_size=100, full=damage == "flip_bin")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_torn_checkpoint_index_or_shard_is_incomplete(tmp_path):
    from megatron_kd.training.checkpoint import check_checkpoint_complete

    d = tmp_path / "iter_0000001"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(ValueError, match="index .metadata is missing"):
        check_checkpoint_complete(d)
    (d / ".metadata").write_bytes(b"\x80\x04trunc")
    with pytest.raises(ValueError, match="cannot be read"):
        check_checkpoint_complete(d)


def test_truncated_checkpoint_is_refused_by_dry_run(tmp_path):
    save = tmp_path / "run"
    out = run(["pretrain", "--config", TINY, "train.train_iters=2", "train.eval_iters=0", "train.seq_length=32",
               "optim.warmup_iters=0", f"checkpoint.save={save}", "logging.quiet=true"])
    assert out.returncode == 0, out.stderr[-2000:]
    shard = sorted((save / "iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = run(["pretrain", "--config", TINY, "--dry-run", "train.train_iters=4", "optim.warmup_iters=0",
               f"checkpoint.save={save}"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "is incomplete" in out.stderr and shard.name in out.stderr


def test_unwritable_output_directory_is_one_line_exit_74(tmp_path):
    out = run(["pretrain", "--config", TINY, "train.train_iters=2", "train.eval_iters=0", "train.seq_length=32",
               "optim.warmup_iters=0", "checkpoint.save=/sys/megatron_kd_reliability/run", "logging.quiet=true"])
    lines = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == 74 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(lines) == 1 and "/sys/megatron_kd_reliability" in lines[0]


# --------------------------------------------------------------------------------------------
# The whole list, as a user meets it through the commands (issue 19): a tiny "world"
# (SentencePiece tokenizer, a preprocessed dataset, a teacher checkpoint) is built once; each
# case damages a copy and runs the command in-process.

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import json

    from megatron_kd.data.demo_corpus import build_demo_corpus
    from megatron_kd.data.preprocess import preprocess
    from megatron_kd.data.tokenizers import train_sentencepiece
    try:  # post-training moves minillm/ to posttrain/
        from megatron_kd.posttrain.synthetic import WordTokenizer
    except ImportError:
        from megatron_kd.posttrain.synthetic import WordTokenizer

    w = tmp_path_factory.mktemp("world")
    build_demo_corpus(str(w / "demo.jsonl"), max_docs=40)
    docs = [json.loads(line)["text"] for line in open(w / "demo.jsonl", encoding="utf-8")]
    train_sentencepiece(docs, 500, str(w / "spm"))
    preprocess([str(w / "demo.jsonl")], str(w / "train"), str(w / "spm.model"), workers=1, overwrite=True,
               progress=False)
    WordTokenizer([f"w{i}" for i in range(20)] + ["say", "ok"]).save(w / "words.json")
    (w / "inst.jsonl").write_text('{"prompt": "say w1", "response": "ok w2"}\n' * 4)
    out = run(["pretrain", "--config", TINY, "model.vocab_size=500", "data.synthetic=false",
               f"data.prefixes=[{w}/train_text_document]", f"data.tokenizer={w}/spm.model", "data.split=100,0,0",
               "train.train_iters=1", "train.eval_iters=0", "train.seq_length=32", "train.micro_batch_size=2",
               "train.global_batch_size=2", "optim.warmup_iters=0", f"checkpoint.save={w}/teacher",
               "logging.quiet=true"])
    assert out.returncode == 0, out.stderr[-2000:]
    return w


def _copy_dataset(world, tmp_path, damage):
    import shutil

    for ext in ("bin", "idx", "manifest.json", "meta.jsonl"):
        src = world / f"train_text_document.{ext}"
        if src.exists():
            shutil.copy(src, tmp_path / f"ds.{ext}")
    damage(tmp_path / "ds.bin", tmp_path / "ds.idx")
    return str(tmp_path / "ds")


def _flip(bin_path, idx_path):  # noqa: ARG001 - same size, 16 bytes inverted mid-file
    data = bytearray(bin_path.read_bytes())
    for k in range(16):
        data[len(data) // 2 + k] ^= 0xFF
    bin_path.write_bytes(bytes(data))


def _truncate_idx(bin_path, idx_path):  # noqa: ARG001
    idx_path.write_bytes(idx_path.read_bytes()[:-7])


def _empty_idx(bin_path, idx_path):  # noqa: ARG001
    idx_path.write_bytes(b"")


def _truncated_teacher(world, tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(world / "teacher", teacher)
    shard = sorted(teacher.glob("iter_*/*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return teacher, shard.name


def _logits(world, data, out, teacher=None):
    return ["logits", "--teacher", str(teacher or world / "teacher"), "--data", str(data), "--output", str(out),
            "--seq-length", "32"]


def _score(world, data, out, teacher=None):
    return ["miniplm", "score", "--teacher", str(teacher or world / "teacher"), "--reference",
            str(world / "teacher"), "--data", str(data), "--output", str(out), "--chunk-length", "32"]


def _pretrain(world, data, save):
    return ["pretrain", "--config", TINY, "model.vocab_size=500", "data.synthetic=false", f"data.prefixes=[{data}]",
            f"data.tokenizer={world}/spm.model", "data.split=100,0,0", "train.seq_length=32", f"checkpoint.save={save}"]


@pytest.mark.parametrize("damage,message", [(_flip, "is corrupt"), (_truncate_idx, "truncated or corrupt"),
                                            (_empty_idx, "bad header")])
@pytest.mark.parametrize("command", ["pretrain", "logits", "miniplm score"])
def test_damaged_dataset_is_one_line_in_every_reader(world, capsys, tmp_path, command, damage, message):
    data = _copy_dataset(world, tmp_path, damage)
    out = tmp_path / "out"
    args = {"pretrain": _pretrain, "logits": _logits, "miniplm score": _score}[command](world, data, out)
    rc, line = _cli(capsys, tmp_path, *args)
    assert rc == 2 and message in line, line
    if damage is _flip:  # the corrupt file is named, not "another tokenizer"
        assert "ds.bin does not match the sha256" in line and "another tokenizer" not in line


def test_logits_refuses_a_dataset_of_another_tokenizer(world, capsys, tmp_path):
    import json

    data = _copy_dataset(world, tmp_path, lambda b, i: None)
    man = json.loads((tmp_path / "ds.manifest.json").read_text())
    man["tokenizer"]["identity"] = "sentencepiece:sha256:" + "0" * 64
    (tmp_path / "ds.manifest.json").write_text(json.dumps(man))
    rc, line = _cli(capsys, tmp_path, *_logits(world, data, tmp_path / "out"))
    assert rc == 2 and "was tokenized with" in line


def test_logits_refuses_a_word_list_teacher_of_another_dataset(world, capsys, tmp_path):
    """A word-list teacher tokenizer loads (data.tokenizers.WordTokenizer); the SentencePiece dataset is refused."""
    import json
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(world / "teacher", teacher)
    meta_path = next(teacher.glob("iter_*/meta.json"))
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = str(world / "words.json")
    meta_path.write_text(json.dumps(meta))
    rc, line = _cli(capsys, tmp_path, *_logits(world, f"{world}/train_text_document", tmp_path / "out", teacher))
    assert rc == 2 and "was tokenized with spm.model" in line and "words.json" in line and "ModelProto" not in line


@pytest.mark.parametrize("command", ["logits", "miniplm score", "distill", "distill --dry-run", "convert"])
def test_truncated_teacher_checkpoint_is_one_line(world, capsys, tmp_path, command):
    teacher, shard = _truncated_teacher(world, tmp_path)
    data = f"{world}/train_text_document"
    out = tmp_path / "out"
    if command == "logits":
        args = _logits(world, data, out, teacher)
    elif command == "miniplm score":
        args = _score(world, data, out, teacher)
    elif command == "convert":
        args = ["convert", "mcore-to-hf", "--checkpoint", str(teacher), "--output", str(out)]
    else:
        args = ["distill", *(["--dry-run"] if "dry" in command else []), "--config",
                str(REPO / "examples/cpu/distill_tiny.yaml"), f"teacher.load={teacher}", "model.vocab_size=500",
                "data.synthetic=false", f"data.prefixes=[{data}]", f"data.tokenizer={world}/spm.model",
                "data.split=100,0,0", "train.seq_length=32", f"checkpoint.save={out}"]
    rc, line = _cli(capsys, tmp_path, *args)
    assert rc == 2 and "is incomplete" in line and shard in line, line


INSTRUCTION_CASES = [
    ('{"prompt": "say w1"}\n', "has no 'response' field"),
    ('{"prompt": "say w1", \n', "is not valid JSON"),
    (b'{"prompt": "say \xff\xfe", "response": "ok"}\n', "is not valid UTF-8"),
    ('{"prompt": "say zebra", "response": "ok"}\n', "word 'zebra' is not in the tokenizer vocabulary"),
]


@pytest.mark.parametrize("bad,message", INSTRUCTION_CASES)
def test_instruction_data_errors_name_file_and_line(world, capsys, tmp_path, bad, message):
    src = tmp_path / "data.jsonl"
    good = b'{"prompt": "say w1", "response": "ok w2"}\n'
    src.write_bytes(good + (bad if isinstance(bad, bytes) else bad.encode()))
    rc, line = _cli(capsys, tmp_path, "preprocess-instructions", "--input", str(src), "--tokenizer",
                    str(world / "words.json"), "--output-prefix", str(tmp_path / "out" / "inst"), "--template", "raw")
    assert rc == 2 and f"{src}:2" in line and message in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corrupt_batch_met_while_training_is_named_not_an_index_error(world, tmp_path):
    """The per-batch guard behind the sampled pre-check: a flipped .bin met mid-run names the file."""
    import torch

    from megatron_kd.data.iterator import ResumableBatchIterator
    from megatron_kd.data.manifest import check_batch_token_ids

    data = _copy_dataset(world, tmp_path, _flip)
    with pytest.raises(ValueError, match="ds.bin does not match the sha256"):
        check_batch_token_ids(torch.tensor([[1, 2, 70000]]), 500, [data])
    (tmp_path / "c").mkdir()
    clean = _copy_dataset(world, tmp_path / "c", lambda b, i: None)
    with pytest.raises(ValueError, match="another tokenizer"):
        check_batch_token_ids(torch.tensor([[1, 2, 70000]]), 500, [clean])
    samples = [{"tokens": torch.tensor([1, 2, 3]), "labels": torch.tensor([2, 3, 4])},
               {"tokens": torch.tensor([1, 999, 3]), "labels": torch.tensor([999, 3, 4])}]
    it = ResumableBatchIterator(samples, 1, 0, 1, vocab_size=500, prefixes=[data])
    next(it)
    with pytest.raises(ValueError, match="is corrupt"):
        next(it)


def test_miniplm_microbatch_guard_names_the_corrupt_file(world, tmp_path):
    import numpy as np
    import torch

    from megatron_kd.data.manifest import open_indexed_dataset
    from megatron_kd.miniplm.batching import build_microbatch

    data = _copy_dataset(world, tmp_path, lambda b, i: None)
    ds = open_indexed_dataset(data)
    windows = np.array([(0, 0, 8)], dtype=[("doc", "i8"), ("offset", "i8"), ("length", "i8")])
    build_microbatch(ds, windows, np.array([0]), 8, torch.device("cpu"), 500, data)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_microbatch(ds, windows, np.array([0]), 8, torch.device("cpu"), 3, data)


POSTTRAIN_CASES = [
    ("sft", "sft.optim.lr=-3e-3", "sft.optim.lr=-0.003 must be > 0"),
    ("sft", "sft.optim.lr=null", "sft.optim.lr=null must be a number"),
    ("sft", "sft.optim.min_lr=null", "sft.optim.min_lr=null must be a number"),
    ("sft", "train.train_iters=null", "train.train_iters=null must be a number"),
    ("sft", "train.train_iters=2", "sft.optim.warmup_iters=10 must be < train.train_iters=2"),
    ("minillm", "optim.lr=-3e-3", "optim.lr=-0.003 must be > 0"),
    ("minillm", "optim.lr=null", "optim.lr=null must be a number"),
    ("minillm", "train.train_iters=null", "train.train_iters=null must be a number"),
    ("onpolicy", "onpolicy.optim.min_lr=null", "onpolicy.optim.min_lr=null must be a number"),
]


@pytest.mark.parametrize("command,override,message", POSTTRAIN_CASES)
def test_post_training_hyper_parameters_are_named(capsys, tmp_path, command, override, message):
    cfg = {"sft": "sft_cpu.yaml", "minillm": "minillm_cpu.yaml", "onpolicy": "onpolicy_cpu.yaml"}[command]
    rc, line = _cli(capsys, tmp_path, command, "--config", str(REPO / "examples/minillm" / cfg),
                    f"checkpoint.save={tmp_path}/run", override)
    assert rc == 2 and message in line, line
