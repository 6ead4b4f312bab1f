#!/usr/bin/env bash
# Regenerates the SmolLM2-135M reports from ../shared on CPU: `ptq` (about 65 minutes on 2 cores: 30 to quantize,
# 35 to evaluate) and `qat` (several hours on 2 cores: run it on a bigger machine or a GPU with --device cuda).
#   bash tools/make_reports.sh ptq|qat|all
# Calibration and QAT training use the first 45% of WikiText-2 test's characters (cut at a newline);
# every perplexity is measured on the last 50% of its tokens, so the two never overlap.
# Group size 64: SmolLM2's widths (576, 1536) divide it, where 128 leaves a partial group in 576, which
# the AWQ layout cannot hold.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
RUNS=${RUNS:-/tmp/quantool-smollm2}
MODEL=$RUNS/smollm2-135m
TEXT=$SHARED/data/wikitext2_raw_test.txt
mkdir -p "$RUNS"
[ -d "$MODEL" ] || python3 "$SHARED/models/smollm2-135m/to_hf.py" "$MODEL"
python3 - "$TEXT" "$RUNS/train.txt" <<'PY'
import sys
text = open(sys.argv[1]).read()
cut = text.rfind("\n", 0, int(0.45 * len(text))) + 1
open(sys.argv[2], "w").write(text[:cut])
PY
EVAL=(--text "$TEXT" --text-range 0.5,1 --ctx 2048 --max-tokens 65536)
q() { [ -d "$RUNS/$2" ] || quantool "$1" "$MODEL" -o "$RUNS/$2" --calib "$RUNS/train.txt" "${@:3}"; }

ptq() {
  for b in 4 3; do
    q rtn "rtn-w${b}g64" --bits $b --group-size 64
    q gptq "gptq-w${b}g64" --bits $b --group-size 64
    q awq "awq-w${b}g64" --bits $b --group-size 64
  done
  [ -d "$RUNS/int8" ] || quantool int8 "$MODEL" -o "$RUNS/int8"
  [ -d "$RUNS/nf4" ] || quantool nf4 "$MODEL" -o "$RUNS/nf4"
  quantool bench "$MODEL" "$RUNS"/{rtn,gptq,awq}-w4g64 "$RUNS"/{rtn,gptq,awq}-w3g64 "$RUNS/int8" "$RUNS/nf4" \
    "${EVAL[@]}" -o reports/smollm2-ptq.json
  quantool report reports/smollm2-ptq.json -o reports/smollm2-ptq.md > /dev/null
}

qat() {
  # 4 bits, group size 32, against RTN and GPTQ at the same setting, and the fine-tuning control
  q rtn rtn-w4g32 --bits 4 --group-size 32
  q gptq gptq-w4g32 --bits 4 --group-size 32
  local QAT=(--data "$RUNS/train.txt" --bits 4 --group-size 32 --steps 300 --batch 8 --seq 512)
  [ -d "$RUNS/qat-w4g32" ] || quantool qat "$MODEL" "${QAT[@]}" --lr 2e-5 -o "$RUNS/qat-w4g32"
  [ -d "$RUNS/qat-lora16-w4g32" ] || quantool qat "$MODEL" "${QAT[@]}" --lr 5e-4 --lora-rank 16 -o "$RUNS/qat-lora16-w4g32"
  [ -d "$RUNS/finetune-then-rtn-w4g32" ] || quantool qat "$MODEL" "${QAT[@]}" --lr 2e-5 --no-fake-quant -o "$RUNS/finetune-then-rtn-w4g32"
  quantool bench "$MODEL" "$RUNS"/{rtn,gptq,qat,qat-lora16}-w4g32 "$RUNS/finetune-then-rtn-w4g32" "${EVAL[@]}" -o reports/smollm2-qat.json
  quantool report reports/smollm2-qat.json -o reports/smollm2-qat.md > /dev/null
}

case "${1:-all}" in
  ptq) ptq ;;
  qat) qat ;;
  all) ptq; qat ;;
  *) echo "usage: $0 ptq|qat|all" >&2; exit 2 ;;
esac
