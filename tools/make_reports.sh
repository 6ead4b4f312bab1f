#!/usr/bin/env bash
# Regenerates the SmolLM2-135M reports from ../shared: `ptq` (about 95 minutes on 2 CPU cores: 60 to quantize, half of it the two
# `--refine 50` runs; 35 to evaluate) and `qat` (about 15 minutes on one H100, used when CUDA is there; hours on 2 CPU cores).
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
    q rtn "rtn-refine50-w${b}g64" --bits $b --group-size 64 --refine 50
  done
  [ -d "$RUNS/int8" ] || quantool int8 "$MODEL" -o "$RUNS/int8"
  [ -d "$RUNS/nf4" ] || quantool nf4 "$MODEL" -o "$RUNS/nf4"
  quantool bench "$MODEL" "$RUNS"/{rtn,gptq,awq,rtn-refine50}-w4g64 "$RUNS"/{rtn,gptq,awq,rtn-refine50}-w3g64 "$RUNS/int8" "$RUNS/nf4" \
    "${EVAL[@]}" -o reports/smollm2-ptq.json
  quantool report reports/smollm2-ptq.json -o reports/smollm2-ptq.md > /dev/null
}

qat() {
  # 4 bits, group size 32, against RTN and GPTQ at the same setting, and the fine-tuning control.
  # Learning rates are chosen on a validation slice (tokens 46-50% of the text: after the training text,
  # before the evaluation half); every run of that sweep is kept in reports/smollm2-qat-lr.json.
  q rtn rtn-w4g32 --bits 4 --group-size 32
  q gptq gptq-w4g32 --bits 4 --group-size 32
  local QAT=(--data "$RUNS/train.txt" --bits 4 --group-size 32 --steps 300 --batch 8 --seq 512)
  local VAL=(--eval-text "$TEXT" --eval-range 0.46,0.5 --json)
  mkdir -p "$RUNS/lr"
  sweep() {  # NAME LR [qat options]: one validation run, its summary kept as lr/NAME-LR.json
    local run="$RUNS/lr/$1-$2"
    [ -f "$run.json" ] || { quantool qat "$MODEL" "${QAT[@]}" "${VAL[@]}" --lr "$2" "${@:3}" -o "$run" --overwrite \
      > "$run.part" && mv "$run.part" "$run.json"; }
  }
  for lr in 1e-5 3e-5; do sweep full $lr; done
  for lr in 5e-4 2e-3; do sweep lora16 $lr --lora-rank 16; done
  local FULL LORA
  read -r FULL LORA < <(python3 - "$RUNS/lr" reports/smollm2-qat-lr.json <<'PY'
import json, sys
from pathlib import Path
runs = {p.stem: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))}
rows = [{"run": k, "lr": v["config"]["lr"], "lora_rank": v["config"]["lora_rank"], "device": v["device"],
         "tokens_trained": v["tokens_trained"], "seconds": round(v["seconds"], 1),
         "loss_first": v["loss_first"], "loss_last": v["loss_last"], "val_ppl_fp": v["ppl_before"],
         "val_ppl_fake_quant": v["ppl_fake_quant"], "val_ppl_converted": v["ppl_after"]} for k, v in runs.items()]
Path(sys.argv[2]).write_text(json.dumps({"validation": "wikitext2_raw_test.txt tokens 0.46-0.50, ctx 2048", "runs": rows}, indent=1) + "\n")
best = lambda rank: min((r for r in rows if (r["lora_rank"] > 0) == rank), key=lambda r: r["val_ppl_converted"])["run"]
print(best(False), best(True))
PY
)
  [ -n "$LORA" ] || { echo "no learning rate chosen" >&2; exit 1; }
  [ -d "$RUNS/qat-w4g32" ] || cp -r "$RUNS/lr/$FULL" "$RUNS/qat-w4g32"
  [ -d "$RUNS/qat-lora16-w4g32" ] || cp -r "$RUNS/lr/$LORA" "$RUNS/qat-lora16-w4g32"
  # the control also reports the fine-tuned model's own perplexity before RTN, on the evaluation tokens
  # (its "ppl_fake_quant": fake quantization is off in this run)
  [ -d "$RUNS/finetune-then-rtn-w4g32" ] || { quantool qat "$MODEL" "${QAT[@]}" --lr "${FULL#full-}" --no-fake-quant \
    --eval-text "$TEXT" --eval-range 0.5,1 --eval-tokens 65536 --json -o "$RUNS/finetune-then-rtn-w4g32" \
    > "$RUNS/control.part" && mv "$RUNS/control.part" reports/smollm2-qat-control.json; }
  quantool bench "$MODEL" "$RUNS"/{rtn,gptq,qat,qat-lora16}-w4g32 "$RUNS/finetune-then-rtn-w4g32" "${EVAL[@]}" -o reports/smollm2-qat.json
  quantool report reports/smollm2-qat.json -o reports/smollm2-qat.md > /dev/null
}

case "${1:-all}" in
  ptq) ptq ;;
  qat) qat ;;
  all) ptq; qat ;;
  *) echo "usage: $0 ptq|qat|all" >&2; exit 2 ;;
esac
