"""Read-only and full filesystems, for real: every command writes its output onto a tmpfs mounted
read-only, or so small that it fills up mid-run (in a private user + mount namespace, `unshare -rm`,
so no privileges are needed). Each must end with one line naming the path (and, when full, the
space), exit 74, no traceback, and leave nothing half-written: no temp file, and a `latest` that
names a complete checkpoint. Skipped where user namespaces are unavailable."""
import json
import shutil
import subprocess
import sys

import pytest

from reliability_helpers import REPO, env, is_stale_name, run

TINY = str(REPO / "examples/cpu/pretrain_tiny.yaml")
EXIT_IO_ERROR = 74


def _namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        out = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt && true"],
                             capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


pytestmark = pytest.mark.skipif(not _namespaces_work(), reason="needs unprivileged user+mount namespaces (unshare -rm)")


def run_on_tmpfs(args, mnt, opts, listing):
    """``megatron-kd <args>`` with a tmpfs (``opts``: ``ro`` or ``size=...``) mounted at ``mnt``; the
    files left on it are listed into ``listing`` (outside the mount) before the namespace ends."""
    script = (f'mount -t tmpfs -o {opts} tmpfs "{mnt}" || exit 99; "$@"; rc=$?; '
              f'(cd "{mnt}" && find . -mindepth 1 -printf "%P %s\\n") > "{listing}"; '
              f'for f in $(find "{mnt}" -name latest); do echo "LATEST $f $(cat $f)" >> "{listing}"; '
              f'test -f "$(dirname $f)/$(cat $f)/meta.json" || echo "LATEST-BROKEN $f" >> "{listing}"; done; exit $rc')
    cmd = ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "megatron_kd", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs of every command: a tokenizer, a dataset, a teacher checkpoint, scores, instruction data."""
    from megatron_kd.data.demo_corpus import build_demo_corpus
    from megatron_kd.data.preprocess import preprocess
    from megatron_kd.data.tokenizers import train_sentencepiece

    w = tmp_path_factory.mktemp("fsworld")
    build_demo_corpus(str(w / "demo.jsonl"), max_docs=60)
    docs = [json.loads(line)["text"] for line in open(w / "demo.jsonl", encoding="utf-8")]
    train_sentencepiece(docs, 500, str(w / "spm"))
    preprocess([str(w / "demo.jsonl")], str(w / "train"), str(w / "spm.model"), workers=1, overwrite=True,
               progress=False)
    (w / "inst.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"ok {i}"}) + "\n"
                                          for i in range(16)))
    out = run(["pretrain", "--config", TINY, *_model(w), f"checkpoint.save={w}/teacher", "logging.quiet=true"])
    assert out.returncode == 0, out.stderr[-2000:]
    out = run(["miniplm", "score", "--teacher", f"{w}/teacher", "--reference", f"{w}/teacher",
               "--data", f"{w}/train_text_document", "--output", f"{w}/scores", "--chunk-length", "32"])
    assert out.returncode == 0, out.stderr[-2000:]
    out = run(["preprocess-instructions", "--input", f"{w}/inst.jsonl", "--tokenizer", f"{w}/spm.model",
               "--output-prefix", f"{w}/inst", "--template", "raw"])
    assert out.returncode == 0, out.stderr[-2000:]
    return w


def _model(w):
    return ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=64", "model.vocab_size=500", "model.max_position_embeddings=128",
            "data.synthetic=false", f"data.prefixes=[{w}/train_text_document]", f"data.tokenizer={w}/spm.model",
            "data.split=100,0,0", "train.micro_batch_size=2", "train.global_batch_size=2", "train.seq_length=32",
            "train.train_iters=2", "train.eval_iters=0", "optim.warmup_iters=0", "logging.quiet=true"]


def command_args(name, w, mnt):
    """The 8 commands (+ preprocess-instructions), each writing under ``mnt``."""
    data = f"{w}/train_text_document"
    return {
        "pretrain": ["pretrain", "--config", TINY, *_model(w), f"checkpoint.save={mnt}/run"],
        "distill": ["distill", "--config", str(REPO / "examples/cpu/distill_tiny.yaml"), f"teacher.load={w}/teacher",
                    *_model(w), f"checkpoint.save={mnt}/run"],
        "logits": ["logits", "--teacher", f"{w}/teacher", "--data", data, "--output", f"{mnt}/store",
                   "--seq-length", "32"],
        "miniplm score": ["miniplm", "score", "--teacher", f"{w}/teacher", "--reference", f"{w}/teacher",
                          "--data", data, "--output", f"{mnt}/scores", "--chunk-length", "32"],
        "miniplm select": ["miniplm", "select", "--scores", f"{w}/scores", "--alpha", "0.5", "--output",
                           f"{mnt}/sel"],
        "preprocess": ["preprocess", "--input", f"{w}/demo.jsonl", "--tokenizer", f"{w}/spm.model", "--output",
                       f"{mnt}/ds", "--workers", "1", "--no-progress"],
        "convert": ["convert", "mcore-to-hf", "--checkpoint", f"{w}/teacher", "--output", f"{mnt}/hf",
                    "--no-progress"],
        "sft": ["sft", "--config", str(REPO / "examples/minillm/sft_cpu.yaml"), f"student={w}/teacher",
                f"train_data={w}/inst", f"tokenizer={w}/spm.model", f"checkpoint.save={mnt}/sft", "train.train_iters=2",
                "sft.batch_size=2", "sft.micro_batch_size=2", "sft.optim.warmup_iters=0"],
        "preprocess-instructions": ["preprocess-instructions", "--input", f"{w}/inst.jsonl", "--tokenizer",
                                    f"{w}/spm.model", "--output-prefix", f"{mnt}/inst", "--template", "raw"],
    }[name]


COMMANDS = ["pretrain", "distill", "logits", "miniplm score", "miniplm select", "preprocess", "convert", "sft",
            "preprocess-instructions"]
FAST = {("pretrain", "full"), ("preprocess", "read-only")}  # the CI subset; the rest are slow
CASES = [pytest.param(c, k, marks=() if (c, k) in FAST else pytest.mark.slow)
         for c in COMMANDS for k in ("read-only", "full")]


@pytest.mark.parametrize("command,kind", CASES)
def test_filesystem_error_is_one_line_exit_74_nothing_half_written(world, tmp_path, command, kind):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    listing = tmp_path / "listing"
    opts = "ro,size=1m" if kind == "read-only" else "size=16k"
    out = run_on_tmpfs(command_args(command, world, mnt), mnt, opts, listing)
    lines = [ln for ln in out.stderr.splitlines() if "error:" in ln]
    assert out.returncode == EXIT_IO_ERROR, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
    assert str(mnt) in lines[0], lines[0]
    if kind == "full":
        assert "no space left" in lines[0] and "bytes free" in lines[0], lines[0]
    else:
        assert "Read-only file system" in lines[0], lines[0]
    left = listing.read_text().splitlines()
    assert not [ln for ln in left if ln.startswith("LATEST-BROKEN")], left
    files = [ln.split()[0] for ln in left if not ln.startswith("LATEST")]
    assert [f for f in files if any(is_stale_name(part) for part in f.split("/"))] == [], left

