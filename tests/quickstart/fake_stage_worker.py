"""A stand-in for megatron_kd.quickstart.worker in the scheduler tests: the same protocol, no training.

Stage behaviour comes from ``<out>/plan.json``: ``{"sleep": {stage: seconds}, "fail": stage}``; every
stage appends ``{"stage", "index", "pid", "start", "end", "lease"}`` to ``<out>/events.jsonl`` (``lease``: the
thread counts its worker's lease file said at the stage's start and end).
"""
import argparse
import json
import os
import sys
import time


def _lease():
    path = os.environ.get("MEGATRON_KD_THREAD_LEASE")
    return int(open(path).read()) if path and os.path.exists(path) else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--index", type=int, required=True)
    args = ap.parse_args()
    plan = json.load(open(os.path.join(args.out, "plan.json")))
    while True:
        name = sys.stdin.readline().strip()
        if not name:
            return 0
        start = time.time()
        lease = [_lease()]
        time.sleep(plan.get("sleep", {}).get(name, 0.05))
        lease.append(_lease())
        if name == plan.get("fail"):
            print(json.dumps({"event": "failed", "stage": name, "error": f"{name} broke on purpose"}), flush=True)
            return 1
        with open(os.path.join(args.out, "events.jsonl"), "a") as fh:
            fh.write(json.dumps({"stage": name, "index": args.index, "pid": os.getpid(), "start": start,
                                 "end": time.time(), "lease": lease}) + "\n")
        print(json.dumps({"event": "done", "stage": name, "seconds": round(time.time() - start, 3)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
