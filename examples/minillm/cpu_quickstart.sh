#!/usr/bin/env bash
# MiniLLM end to end on a synthetic instruction task, on a laptop CPU (a few minutes):
# data -> teacher SFT -> student SFT (stage 1) -> SeqKD data -> MiniLLM (stage 2) and GKD.
set -euo pipefail
OUT=${OUT:-runs/minillm_cpu}
KD="python -m megatron_kd"
mkdir -p "$OUT"
python - "$OUT" <<'PY'
import sys
from megatron_kd.posttrain.synthetic import make_records, task_tokenizer, write_jsonl
out = sys.argv[1]
task_tokenizer().save(f"{out}/tok.json")
for split, n, seed in (("train", 4000, 0), ("valid", 200, 1), ("test", 200, 2)):
    write_jsonl(make_records(n, seed), f"{out}/{split}.jsonl")
PY
for s in train valid test; do
  $KD preprocess-instructions --input "$OUT/$s.jsonl" --tokenizer "$OUT/tok.json" --template raw \
      --output-prefix "$OUT/$s" --overwrite
done
COMMON="tokenizer=$OUT/tok.json train_data=$OUT/train valid_data=$OUT/valid"
# Teacher: the tiny preset, trained well.
$KD sft --config examples/minillm/sft_cpu.yaml $COMMON model=tiny checkpoint.save="$OUT/teacher" train.train_iters=400
# Student stage 1: a 1-layer model, briefly fine-tuned (MiniLLM starts from an SFT model).
$KD sft --config examples/minillm/sft_cpu.yaml $COMMON model.preset=tiny model.num_layers=1 \
    checkpoint.save="$OUT/student_sft" train.train_iters=60
# SeqKD data (teacher samples), for the SeqKD baseline: megatron-kd sft on it after preprocessing.
$KD generate --checkpoint "$OUT/teacher" --input "$OUT/train.jsonl" --output "$OUT/seqkd_train.jsonl" \
    --template raw --max-new-tokens 12 --limit 500
# Stage 2: MiniLLM.
$KD minillm --config examples/minillm/minillm_cpu.yaml student="$OUT/student_sft" teacher="$OUT/teacher" \
    train_data="$OUT/train" eval_data="$OUT/test" checkpoint.save="$OUT/minillm"
# Neighbour: GKD from the same SFT student.
$KD onpolicy --config examples/minillm/onpolicy_cpu.yaml student="$OUT/student_sft" teacher="$OUT/teacher" \
    train_data="$OUT/train" valid_data="$OUT/valid" eval_data="$OUT/test" checkpoint.save="$OUT/gkd"
grep "\"split\": \"valid\"" "$OUT/minillm/metrics.jsonl" | tail -n 1
