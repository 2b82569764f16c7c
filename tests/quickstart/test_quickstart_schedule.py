"""The quickstart's stage scheduler (no training: a stand-in worker with the same protocol)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_kd.quickstart.schedule import (Progress, StageFailed, StageSpec, critical_path, priority_order,
                                             remaining_path, run_parallel, topological)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

GRAPH = [StageSpec("data", (), 10), StageSpec("teacher", ("data",), 100), StageSpec("ref", ("data",), 20),
         StageSpec("score", ("teacher", "ref"), 40), StageSpec("student", ("data",), 30),
         StageSpec("kd", ("teacher",), 30), StageSpec("eval_kd", ("kd",), 10)]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}


def _run(tmp_path, plan, specs=GRAPH, workers=2, done=()):
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    lines = []
    timeline = run_parallel(list(specs), set(done), workers, ["--out", str(tmp_path)], tmp_path / "logs",
                            lines.append, _env(), module="fake_stage_worker")
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()] \
        if (tmp_path / "events.jsonl").is_file() else []
    return timeline, events, lines


def test_graph_order_critical_path_and_refusals():
    assert [s.name for s in topological(reversed(GRAPH))][0] == "data"
    rank = remaining_path(GRAPH)
    assert rank["teacher"] == 100 + 40 and rank["data"] == 10 + 140
    order = priority_order(GRAPH)
    assert order[:2] == ["data", "teacher"]  # the longest remaining path starts first
    assert order.index("score") > order.index("ref")
    path, seconds = critical_path(GRAPH, {"data": 1, "teacher": 10, "ref": 30, "score": 4, "kd": 1, "eval_kd": 1})
    assert path == ["data", "ref", "score"] and seconds == 35
    progress = Progress(GRAPH, {"data"}, 2)
    assert "ETA" not in progress.line()  # no speed measured yet
    progress.finished("teacher", 50.0)  # this machine runs at half the estimate
    line = progress.line()
    # left: ref 20, score 40, student 30, kd 30, eval_kd 10 = 130 over 2 workers; longest path 40 (score)
    assert "2/7 stages done" in line and "ETA ~32 s" in line
    with pytest.raises(ValueError, match="unknown stage"):
        topological([StageSpec("a", ("b",))])
    with pytest.raises(ValueError, match="cycle"):
        topological([StageSpec("a", ("b",)), StageSpec("b", ("a",))])


def test_parallel_run_respects_dependencies_and_overlaps(tmp_path, wait_gone):
    timeline, events, lines = _run(tmp_path, {"sleep": {"teacher": 1.0, "ref": 0.3, "student": 0.3}}, done=["data"])
    assert set(timeline) == {s.name for s in GRAPH} - {"data"}
    ev = {e["stage"]: e for e in events}
    for s in GRAPH:
        for d in s.deps:
            if d in ev and s.name in ev:
                assert ev[d]["end"] <= ev[s.name]["start"] + 1e-3, (d, s.name)
    assert ev["teacher"]["start"] < ev["ref"]["end"] and ev["ref"]["start"] < ev["teacher"]["end"]  # two at once
    assert len({e["index"] for e in events}) == 2
    assert any("progress: " in line and "ETA" in line for line in lines)
    assert any(line.startswith("[quickstart] teacher: started on worker") for line in lines)
    assert not wait_gone({e["pid"] for e in events})


def test_idle_workers_lend_their_threads_to_a_lendable_stage_only(tmp_path, wait_gone):
    specs = [StageSpec("teacher", (), 100, lendable=True), StageSpec("student", (), 30),
             StageSpec("kd", ("teacher",), 30)]
    _, events, lines = _run(tmp_path, {"sleep": {"teacher": 1.5, "student": 0.2, "kd": 0.2}}, specs=specs)
    ev = {e["stage"]: e for e in events}
    assert ev["student"]["lease"] == [1, 1]  # not lendable; and while it ran, nobody was idle
    assert ev["teacher"]["lease"] == [1, 2]  # the student's worker idles from 0.2 s: the teacher gets its thread
    assert ev["kd"]["lease"] == [1, 1]  # the lease is back to 1 before the next stage starts
    assert any("teacher: lent an idle worker's core (2 threads)" in line for line in lines)
    assert not wait_gone({e["pid"] for e in events})


def test_failing_stage_stops_the_run_and_kills_the_other_worker(tmp_path, wait_gone):
    t0 = time.time()
    with pytest.raises(StageFailed, match=r"stage ref failed: ref broke on purpose") as err:
        _run(tmp_path, {"sleep": {"teacher": 60, "ref": 0.2}, "fail": "ref"}, done=["data"])
    assert err.value.stage == "ref" and time.time() - t0 < 30
    pids = json.loads((tmp_path / "logs" / "workers.json").read_text())["workers"]
    assert not wait_gone(pids)


def test_workers_die_with_a_killed_parent(tmp_path, wait_gone):
    (tmp_path / "plan.json").write_text(json.dumps({"sleep": {"teacher": 120, "ref": 120}}))
    code = ("import sys; from megatron_kd.quickstart.schedule import run_parallel, StageSpec;"
            "from pathlib import Path; out = Path(sys.argv[1]);"
            "run_parallel([StageSpec('teacher'), StageSpec('ref')], set(), 2, ['--out', str(out)], out / 'logs',"
            " module='fake_stage_worker')")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env())
    pids_file = tmp_path / "logs" / "workers.json"
    end = time.time() + 60
    while not pids_file.is_file() and time.time() < end:
        time.sleep(0.05)
    pids = json.loads(pids_file.read_text())["workers"]
    assert len(pids) == 2 and len(wait_gone(pids, 0.3)) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert not wait_gone(pids), "workers outlived their killed parent"
