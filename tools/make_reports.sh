#!/usr/bin/env bash
# Regenerates the stories260K reports from ../shared on CPU (about 10 minutes on 2 cores).
# Calibration and QAT training use the first 45% of TinyStories-val's characters; every perplexity is
# measured on the last 50% of its tokens, so the two never overlap.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
MODEL=$SHARED/models/stories260K
TEXT=$SHARED/data/tinystories_val.txt
RUNS=${RUNS:-/tmp/quantool-stories260k}
mkdir -p "$RUNS"
python3 - "$TEXT" "$RUNS/train.txt" <<'PY'
import sys
text = open(sys.argv[1]).read()
cut = text.rfind("\n\n", 0, int(0.45 * len(text)))
open(sys.argv[2], "w").write(text[:cut])
PY
EVAL=(--text "$TEXT" --text-range 0.5,1 --ctx 512)
q() { [ -d "$RUNS/$2" ] || quantool "$1" "$MODEL" -o "$RUNS/$2" --calib "$RUNS/train.txt" "${@:3}"; }

# Post-training quantization: 4 and 3 bits, group size 128 (= per channel on this 64-wide model).
q rtn rtn-w4g128 --bits 4
q gptq gptq-w4g128 --bits 4 --act-order
q awq awq-w4g128 --bits 4
q rtn rtn-w3g128 --bits 3
q gptq gptq-w3g128 --bits 3 --act-order
q awq awq-w3g128 --bits 3
[ -d "$RUNS/int8" ] || quantool int8 "$MODEL" -o "$RUNS/int8"
[ -d "$RUNS/nf4" ] || quantool nf4 "$MODEL" -o "$RUNS/nf4"
quantool bench "$MODEL" "$RUNS"/{rtn,gptq,awq}-w4g128 "$RUNS"/{rtn,gptq,awq}-w3g128 "$RUNS/int8" "$RUNS/nf4" \
  "${EVAL[@]}" --speed --batch-sizes 1,8 -o reports/stories260k-ptq.json
quantool report reports/stories260k-ptq.json -o reports/stories260k-ptq.md > /dev/null

# QAT at 4 bits, group size 32, against RTN and GPTQ at the same setting, and the fine-tuning control.
q rtn rtn-w4g32 --bits 4 --group-size 32
q gptq gptq-w4g32 --bits 4 --group-size 32 --act-order
QAT=(--data "$RUNS/train.txt" --bits 4 --group-size 32 --steps 500 --lr 3e-4 --batch 8 --seq 256)
[ -d "$RUNS/qat-w4g32" ] || quantool qat "$MODEL" "${QAT[@]}" -o "$RUNS/qat-w4g32"
[ -d "$RUNS/qat-lora16-w4g32" ] || quantool qat "$MODEL" "${QAT[@]/3e-4/2e-3}" --lora-rank 16 -o "$RUNS/qat-lora16-w4g32"
[ -d "$RUNS/finetune-then-rtn-w4g32" ] || quantool qat "$MODEL" "${QAT[@]}" --no-fake-quant -o "$RUNS/finetune-then-rtn-w4g32"
quantool bench "$MODEL" "$RUNS"/{rtn,gptq,qat,qat-lora16}-w4g32 "$RUNS/finetune-then-rtn-w4g32" "${EVAL[@]}" -o reports/stories260k-qat.json
quantool report reports/stories260k-qat.json -o reports/stories260k-qat.md > /dev/null
