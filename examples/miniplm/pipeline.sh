#!/bin/bash
# MiniPLM difference sampling at real scale, on one 8-GPU node (see README.md for the cost).
# Every step is resumable: rerun this script after an interruption and finished steps are
# refused (outputs exist) or resumed (score). Paths are examples: set them for your cluster.
set -euo pipefail
HF_TEACHER=${HF_TEACHER:-/models/Qwen1.5-1.8B}        # local HF directory (nothing is downloaded)
PILE_JSONL=${PILE_JSONL:-/data/pile/train/*.jsonl}     # The Pile (monology/pile-uncopyrighted)
WORK=${WORK:-/runs/miniplm}
DATA=${DATA:-/data}
NPROC=${NPROC:-8}
mkdir -p "$WORK" "$DATA"

# 1. Teacher: HF -> megatron-kd checkpoint (loads at any TP/PP afterwards).
[[ -f $WORK/teacher/latest ]] || \
  megatron-kd convert hf-to-mcore --hf "$HF_TEACHER" --out "$WORK/teacher" --dtype bf16

# 2. Tokenize with the teacher's tokenizer (docs/data.md); .meta.jsonl keeps each record's
#    `meta` (the Pile domain is meta.pile_set_name) and its source line for --export-text.
[[ -f $DATA/pile_text_document.idx ]] || \
  megatron-kd preprocess --input $PILE_JSONL --tokenizer "$HF_TEACHER" --output-prefix "$DATA/pile" \
      --json-keys text --workers 32

# 3. Hold out ~5B of ~105B tokens for the reference model (content hash: no overlap).
[[ -f $DATA/pile_ref.idx ]] || \
  megatron-kd miniplm split --data "$DATA/pile_text_document" --holdout-fraction 0.048 \
      --out-ref "$DATA/pile_ref" --out-main "$DATA/pile_main"

# 4. Reference LM (104M) on the held-out split.
torchrun --nproc-per-node "$NPROC" -m megatron_kd pretrain --config examples/miniplm/reference_104m.yaml \
    data.prefixes="[$DATA/pile_ref]" data.tokenizer="$HF_TEACHER" checkpoint.tokenizer="$HF_TEACHER" \
    checkpoint.save="$WORK/reference_104m"

# 5. Score the ~100B-token main split: 1025-token chunks = 1024 predictions each (the paper's),
#    TP=1 and data-parallel over the 8 GPUs; resumable shard by shard.
torchrun --nproc-per-node "$NPROC" -m megatron_kd miniplm score \
    --teacher "$WORK/teacher" --reference "$WORK/reference_104m" --data "$DATA/pile_main" \
    --out "$WORK/scores" --chunk-length 1025 --micro-batch-size 16 --dtype bf16

# 6. Keep the top 50% (about 50B tokens), plus the text for students with other tokenizers.
megatron-kd miniplm select --scores "$WORK/scores" --alpha 0.5 --out "$DATA/pile_miniplm_r0.5" --export-text \
    --domain-key meta.pile_set_name
