"""The README's ``## Walkthrough`` runs verbatim (issue 13 item 1).

Every ```` ```bash ```` block of the section is run, in order, with ``bash -e -o pipefail`` in one
fresh directory that holds a copy of ``examples/`` (what a fresh clone has besides the package),
with ``megatron-kd`` on PATH running this checkout. The outputs each step promises are then checked:
the eval results of the teacher and four students, the HF export and its generated text.
Wall time per block and the CPU time of all commands are printed (``-s``) and written to
``walkthrough_times.json`` in the run dir.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
STUDENTS = ("student_none", "student_online", "student_offline", "student_miniplm")


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section (up to the next ``## `` heading)."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end >= 0 else None]


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```` ```bash ```` fenced blocks of ``text``, in order."""
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)


def walkthrough_blocks() -> list[str]:
    return bash_blocks(section((REPO / "README.md").read_text(encoding="utf-8"), "Walkthrough"))


def cli_shim(bin_dir: Path) -> None:
    """``megatron-kd`` on PATH = this checkout (not whatever an editable install points at)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "megatron-kd"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m megatron_kd "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_walkthrough_section_is_found():
    blocks = walkthrough_blocks()
    assert len(blocks) >= 6
    text = "\n".join(blocks)
    for step in ("demo-corpus", "train-tokenizer", "preprocess", "pretrain", "logits", "distill", "miniplm score",
                 "miniplm select", "eval", "convert mcore-to-hf", "AutoModelForCausalLM"):
        assert step in text, step


def test_walkthrough_runs_verbatim(tmp_path):
    blocks = walkthrough_blocks()
    work = tmp_path / "clone"
    shutil.copytree(REPO / "examples", work / "examples")
    cli_shim(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    times, outputs = [], []
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    for i, block in enumerate(blocks):
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
        times.append(round(time.perf_counter() - t0, 1))
        outputs.append(proc.stdout)
        assert proc.returncode == 0, (f"walkthrough block {i + 1} failed (exit {proc.returncode}):\n{block}\n"
                                      f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    (work / "walkthrough_times.json").write_text(json.dumps({"block_s": times, "total_s": round(sum(times), 1),
                                                             "cpu_s": cpu_s, "load1": load}))
    print(f"\nwalkthrough: {len(blocks)} blocks, {sum(times):.0f} s wall in all {times}, {cpu_s} s CPU "
          f"(load average {load})")

    # logits / miniplm score default to windows that fit the teacher's 128 positions (issue 13)
    assert json.loads((work / "stores/teacher/manifest.json").read_text())["settings"]["seq_length"] == 128
    assert json.loads((work / "scores/main/manifest.json").read_text())["instances"]["chunk_length"] == 129
    losses = {}
    for run in ("teacher",) + STUDENTS:
        result = json.loads((work / "results" / f"{run}.json").read_text())
        losses[run] = result["lm_loss"]["heldout"]["loss"]
    assert all(2.0 < v < 7.0 for v in losses.values()), losses  # ln(1024) = 6.93: every model learned something
    assert losses["teacher"] < min(losses[s] for s in STUDENTS), losses
    mc = json.loads((work / "results" / "student_online.json").read_text())
    assert "toy_mc" in json.dumps(mc), mc
    hf = work / "hf" / "student"
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    generated = outputs[-1].strip().splitlines()[-1]  # "N new tokens: 'The function returns ...'"
    n_new, _, text = generated.partition(" new tokens: ")
    assert int(n_new) >= 1 and text.startswith("'The function returns"), generated
