"""Bad input: every failure is one line naming the input and the fix, raised before heavy work,
and nothing half-written ever appears under a final dataset name.

    PYTHONPATH=$PWD python -m pytest -q tests/data/test_data_bad_input.py
"""
import json
import multiprocessing as mp
import os
import shutil
import time

import pytest

from megatron_kd.cli import main as cli_main
from megatron_kd.data.manifest import check_tokenizer, open_indexed_dataset, read_dataset_manifest
from megatron_kd.data.preprocess import preprocess, read_meta
from megatron_kd.data.tokenizers import SentencePieceTokenizer


def _write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


GOOD = json.dumps({"text": "a good line", "domain": "x"}).encode()
BAD_CASES = {
    "invalid JSON": b'{"text": "unterminated',
    "missing key 'text'": json.dumps({"body": "no text key"}).encode(),
    "is int, not a string": json.dumps({"text": 42}).encode(),
    "not valid UTF-8": b'{"text": "caf\xe9 latin-1"}',
    "expected a JSON object": b'["a", "list"]',
}


@pytest.mark.parametrize("reason", list(BAD_CASES))
def test_bad_record_fails_with_file_and_line(tmp_path, sp_tok, reason):
    path = _write_lines(tmp_path / "in.jsonl", [GOOD, GOOD, BAD_CASES[reason], GOOD])
    with pytest.raises(ValueError) as err:
        preprocess([path], str(tmp_path / "out"), sp_tok, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ") and reason in msg and "--on-error skip" in msg
    assert "\n" not in msg
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no output, no staging directory left behind


def test_bad_records_skipped_on_request(tmp_path, sp_tok):
    lines = [GOOD, BAD_CASES["invalid JSON"], GOOD, b"", BAD_CASES["not valid UTF-8"], GOOD]
    path = _write_lines(tmp_path / "in.jsonl", lines)
    m = preprocess([path], str(tmp_path / "out"), sp_tok, on_error="skip", progress=False)
    assert m["num_documents"] == 3
    assert m["skipped"]["bad_records"] == 2
    assert [e["line"] for e in m["skipped"]["examples"]] == [2, 5]
    # doc id i <-> meta line i, which still points at the right source line
    assert [r["line"] for r in read_meta(str(tmp_path / "out_text_document"))] == [1, 3, 6]


def test_missing_and_empty_inputs(tmp_path, sp_tok):
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "o"), sp_tok, progress=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        preprocess([str(tmp_path / "*.jsonl")], str(tmp_path / "o"), sp_tok, progress=False)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="no documents in .*empty.jsonl"):
        preprocess([str(tmp_path / "empty.jsonl")], str(tmp_path / "o"), sp_tok, progress=False)
    _write_lines(tmp_path / "blank.jsonl", [json.dumps({"text": ""}).encode(), b"  "])
    with pytest.raises(ValueError, match="no documents .* 1 empty"):
        preprocess([str(tmp_path / "blank.jsonl")], str(tmp_path / "o"), sp_tok, progress=False)
    assert not any(p.name.startswith(("o_", ".o_")) for p in tmp_path.iterdir())


def test_existing_output_refused_unless_overwrite(tmp_path, sp_tok):
    path = _write_lines(tmp_path / "in.jsonl", [GOOD])
    preprocess([path], str(tmp_path / "out"), sp_tok, progress=False)
    with pytest.raises(FileExistsError, match="out_text_document.bin already exists: pass --overwrite"):
        preprocess([path], str(tmp_path / "out"), sp_tok, progress=False)
    _write_lines(tmp_path / "in.jsonl", [GOOD, GOOD])
    m = preprocess([path], str(tmp_path / "out"), sp_tok, overwrite=True, progress=False)
    assert m["num_documents"] == 2 and len(open_indexed_dataset(tmp_path / "out_text_document")) == 2


class _ExplodingTokenizer(SentencePieceTokenizer):
    """Fails on the third batch, after the first two reached the output files."""

    calls = 0

    def encode_batch(self, texts):
        type(self).calls += 1
        if type(self).calls == 3:
            raise RuntimeError("simulated crash")
        return super().encode_batch(texts)


def test_crash_mid_write_leaves_no_dataset(tmp_path, sp_tok, demo_jsonl):
    tok = _ExplodingTokenizer(sp_tok.path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        preprocess([str(demo_jsonl)], str(tmp_path / "out"), tok, batch_bytes=1024, progress=False)
    assert os.listdir(tmp_path) == []
    # An existing dataset being overwritten survives a crash intact.
    preprocess([str(demo_jsonl)], str(tmp_path / "out"), sp_tok, progress=False)
    before = open(tmp_path / "out_text_document.bin", "rb").read()
    _ExplodingTokenizer.calls = 0
    with pytest.raises(RuntimeError):
        preprocess([str(demo_jsonl)], str(tmp_path / "out"), tok, batch_bytes=1024, overwrite=True,
                   progress=False)
    assert open(tmp_path / "out_text_document.bin", "rb").read() == before
    open_indexed_dataset(tmp_path / "out_text_document", tokenizer=sp_tok)


class _SlowTokenizer(SentencePieceTokenizer):
    def encode_batch(self, texts):
        time.sleep(0.05)
        return super().encode_batch(texts)


def _run_slow(path, prefix, model):
    preprocess([path], prefix, _SlowTokenizer(model), batch_bytes=512, progress=False)


def test_killed_process_leaves_no_dataset(tmp_path, sp_tok, demo_jsonl):
    ctx = mp.get_context("fork")
    proc = ctx.Process(target=_run_slow, args=(str(demo_jsonl), str(tmp_path / "out"), sp_tok.path))
    proc.start()
    deadline = time.time() + 60
    staged = []
    while time.time() < deadline and not staged:  # wait until it is writing
        staged = [p for p in tmp_path.glob(".out_text_document.tmp-*/*.bin") if p.stat().st_size > 0]
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.join()
    assert staged, "the writer never started"
    assert not list(tmp_path.glob("out_*")), "a killed run left files under the final names"


def test_truncated_bin_and_bad_idx_header(tmp_path, demo_dataset, sp_tok):
    for ext in (".bin", ".idx", ".manifest.json", ".meta.jsonl"):
        shutil.copy(demo_dataset + ext, str(tmp_path / "d") + ext)
    prefix = str(tmp_path / "d")
    open_indexed_dataset(prefix, tokenizer=sp_tok)
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as fh:
        fh.truncate(size - 10)
    with pytest.raises(ValueError, match=r"d\.bin is .* bytes but .*d\.idx indexes .* truncated"):
        open_indexed_dataset(prefix)
    shutil.copy(demo_dataset + ".bin", prefix + ".bin")
    with open(prefix + ".idx", "r+b") as fh:
        fh.write(b"NOTANIDX!")
    with pytest.raises(ValueError, match=r"d\.idx is not a megatron indexed-dataset index \(bad header\)"):
        open_indexed_dataset(prefix)
    shutil.copy(demo_dataset + ".idx", prefix + ".idx")
    with open(prefix + ".idx", "r+b") as fh:
        fh.truncate(os.path.getsize(prefix + ".idx") - 8)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        open_indexed_dataset(prefix)
    os.remove(prefix + ".bin")
    shutil.copy(demo_dataset + ".idx", prefix + ".idx")
    with pytest.raises(FileNotFoundError, match=r"d\.bin does not exist"):
        open_indexed_dataset(prefix)


def test_tokenizer_mismatch_is_refused(demo_dataset, hf_tok_dir):
    from megatron_kd.data.tokenizers import load_tokenizer

    other = load_tokenizer(hf_tok_dir)
    with pytest.raises(ValueError) as err:
        check_tokenizer(read_dataset_manifest(demo_dataset), other)
    assert "was tokenized with" in str(err.value) and "re-run preprocess" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="was tokenized with"):
        open_indexed_dataset(demo_dataset, tokenizer=other)


def test_cli_reports_one_line(tmp_path, sp_tok, capsys):
    rc = cli_main(["preprocess", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", sp_tok.path,
                   "--output-prefix", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("megatron-kd preprocess: error: input file") and "\n" not in err


def test_manifest_from_another_producer(tmp_path, demo_dataset, sp_tok):
    """A manifest without "format" (e.g. written by MiniPLM's selection) is accepted when it has
    the required fields; a foreign format or a missing field is refused."""
    for ext in (".bin", ".idx"):
        shutil.copy(demo_dataset + ext, str(tmp_path / "d") + ext)
    original = read_dataset_manifest(demo_dataset)
    minimal = {k: original[k] for k in ("num_documents", "num_tokens", "dtype")}
    minimal.update(tokenizer=sp_tok.identity, checksums={"bin_sha256": original["checksums"]["bin"]})
    (tmp_path / "d.manifest.json").write_text(json.dumps(minimal))
    assert len(open_indexed_dataset(tmp_path / "d", tokenizer=sp_tok)) == original["num_documents"]
    (tmp_path / "d.manifest.json").write_text(json.dumps({**minimal, "format": "something-else"}))
    with pytest.raises(ValueError, match="not a megatron-kd dataset manifest"):
        open_indexed_dataset(tmp_path / "d")
    del minimal["dtype"]
    (tmp_path / "d.manifest.json").write_text(json.dumps(minimal))
    with pytest.raises(ValueError, match="lacks the field 'dtype'"):
        open_indexed_dataset(tmp_path / "d")


def test_json_keys_with_plain_text_refused(tmp_path, sp_tok):
    (tmp_path / "a.txt").write_text("plain text\n")
    with pytest.raises(ValueError, match="applies to JSONL input only"):
        preprocess([str(tmp_path / "a.txt")], str(tmp_path / "o"), sp_tok, json_keys=("body",), progress=False)
