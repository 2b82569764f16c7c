"""A stand-in for megatron_kd.quickstart.worker in the scheduler tests: the same protocol, no training.

Stage behaviour comes from ``<out>/plan.json``: ``{"sleep": {stage: seconds}, "fail": stage}``; every
stage appends ``{"stage", "index", "pid", "start", "end"}`` to ``<out>/events.jsonl``.
"""
import argparse
import json
import os
import sys
import time


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
        time.sleep(plan.get("sleep", {}).get(name, 0.05))
        if name == plan.get("fail"):
            print(json.dumps({"event": "failed", "stage": name, "error": f"{name} broke on purpose"}), flush=True)
            return 1
        with open(os.path.join(args.out, "events.jsonl"), "a") as fh:
            fh.write(json.dumps({"stage": name, "index": args.index, "pid": os.getpid(), "start": start,
                                 "end": time.time()}) + "\n")
        print(json.dumps({"event": "done", "stage": name, "seconds": round(time.time() - start, 3)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
