#!/usr/bin/env bash
# Issue 15 GPU check: one command, <= 8 minutes on one H200 (or H100), one JSON line at the end.
#
# The GPU machine has Python 3.12 and torch but no megatron-core: the wheel travels with the tree.
#   here, once (needs pip + PyPI):   bash benchmarks/gpu_check.sh --fetch-wheels     # -> .whl/ (git-ignored)
#   there (device run, carry .whl):  bash benchmarks/gpu_check.sh                    # results also in $OUT
#
# Steps (each with its own time limit; a failing step is reported and the next one still runs):
#   1. the GPU-marked tests (pytest -m gpu)
#   2. bf16 pretrain step of a 0.5B model (Qwen2.5-0.5B shape, seq 2048): tokens/s, MFU (target >= 0.40)
#   3. distill step ratios at qwen-200m <- qwen2.5-1.5b (seq 2048): fused, then unfused (--no-fused)
#   4. fused output layer + KD loss vs torch at BT 8192, V 151936, H 4096 (bf16): peak memory and time
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p "$WHEELS"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude 2>/dev/null || true
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "megatron-core==0.16.1"
fi

RESULTS="${OUT:-/tmp/gpu_check}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo '{"benchmark": "gpu_check", "error": "wheel install failed"}'; exit 1; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! python3 -c "import megatron.core" 2>/dev/null; then
    echo '{"benchmark": "gpu_check", "error": "megatron-core missing: run bash benchmarks/gpu_check.sh --fetch-wheels here and carry .whl"}'
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$RESULTS/gpu.txt" 2>&1 || true

# run NAME LIMIT_S CMD...: log to $RESULTS/NAME.log, keep its last JSON line in $RESULTS/NAME.json
run() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    local last
    last=$(grep -E '^\{.*\}$' "$RESULTS/$name.log" | tail -n 1)
    if [ -z "$last" ]; then
        last="{\"rc\": $rc, \"tail\": $(tail -c 400 "$RESULTS/$name.log" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
    fi
    echo "$last" > "$RESULTS/$name.json"
    echo "[gpu_check] $name rc=$rc $((SECONDS - t0))s" >&2
}

run tests 90 python3 -m pytest -q -m gpu tests -p no:cacheprovider \
    -o addopts="" --junitxml="$RESULTS/tests.xml"
python3 - "$RESULTS/tests.xml" > "$RESULTS/tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
try:
    r = ET.parse(sys.argv[1]).getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    print(json.dumps({k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}))
except Exception as exc:  # noqa: BLE001
    print(json.dumps({"error": f"no test report: {exc}"}))
EOF
run pretrain_step 100 python3 benchmarks/bench_train_step.py --preset qwen2.5-0.5b --precision bf16 --seq-length 2048
run distill_fused 110 python3 benchmarks/bench_distill_step.py --student qwen-200m --teacher qwen2.5-1.5b \
    --seq-length 2048 --rounds 4 --warmup 2
run distill_unfused 110 python3 benchmarks/bench_distill_step.py --student qwen-200m --teacher qwen2.5-1.5b \
    --seq-length 2048 --rounds 4 --warmup 2 --no-fused
run fused_loss 60 python3 benchmarks/bench_fused_linear.py --bt 8192 --vocab 151936 --hidden 4096 --dtype bf16

python3 - "$RESULTS" <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
out = {"benchmark": "gpu_check", "gpu": (d / "gpu.txt").read_text().strip() if (d / "gpu.txt").exists() else None}
for name in ("tests", "pretrain_step", "distill_fused", "distill_unfused", "fused_loss"):
    try:
        out[name] = json.loads((d / f"{name}.json").read_text())
    except Exception as exc:  # noqa: BLE001
        out[name] = {"error": str(exc)}
keep = {"pretrain_step": ("tokens_per_s", "mfu", "step_time_s"),
        "distill_fused": ("offline_over_plain", "online_over_plain_plus_teacher", "online_mfu", "peak_memory_GiB"),
        "distill_unfused": ("offline_over_plain", "online_over_plain_plus_teacher", "online_mfu", "peak_memory_GiB")}
summary = {k: {f: out[k].get(f) for f in fs} for k, fs in keep.items() if isinstance(out.get(k), dict)}
out["summary"] = summary
(d / "gpu_check.json").write_text(json.dumps(out, indent=1))
print(json.dumps(out))
EOF
