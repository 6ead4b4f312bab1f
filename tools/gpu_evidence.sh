#!/usr/bin/env bash
# Issue 11's GPU evidence in one command per stage, for the lent H100 (the device tool) or any CUDA machine.
#
# Once, on the developer machine (the device machine reaches no registry, and ../shared does not travel):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl bitsandbytes==0.50.2
#   mkdir -p .gpu && cp -r ../shared/models/stories260K .gpu/tokenizer && head -c 2000000 ../shared/data/wikitext2_raw_test.txt > .gpu/calib.txt
# Then each stage is one device call (carry: .whl, .gpu), each well inside the 10-minute limit:
#   bash tools/gpu_evidence.sh memory    # the 25-job suite + generate with a real KV cache -> $OUT/memory_h100_suite.json
#   bash tools/gpu_evidence.sh gptq      # GPTQ time on the 7B shape: act-order, g128, 128 x 2048 tokens
#   bash tools/gpu_evidence.sh decode    # decode speed, batch 1 and 8: bf16 vs 4-bit GPTQ/AWQ (tinygemm) vs int8/NF4
#   bash tools/gpu_evidence.sh refine    # --refine 50 on 4 layers of the 7B shape: seconds per layer, GPU and host peaks
#   bash tools/gpu_evidence.sh tests     # the whole suite, CUDA-only tests included (-rs lists what skipped)
# Outputs land in $OUT (the device tool brings them back), or ./gpu-evidence elsewhere. Commit them under
# reports/ and tests/data/ with the GPU, driver and versions that env.txt records.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-evidence}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PATH=$PATH:$HOME/.local/bin
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=${PYTHONPATH:-}:$PWD
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" || true; } > "$OUT/env.txt"
Q="python3 -m quantool"
MODEL=/tmp/llama7b
model() { [ -d $MODEL ] || python3 tools/make_random_model.py $MODEL --layers 32 --tokenizer .gpu/tokenizer; }

case "${1:?stage: memory, gptq, decode, refine or tests}" in
  memory)
    python3 tools/measure_memory.py --device cuda -o "$OUT/memory_h100_suite.json"
    python3 tools/measure_memory.py --table "$OUT/memory_h100_suite.json" > "$OUT/memory_h100_suite.md" ;;
  gptq)
    model
    /usr/bin/time -v $Q gptq $MODEL -o /tmp/gptq7b --order act --group-size 128 --nsamples 128 --seqlen 2048 \
      --calib .gpu/calib.txt --overwrite --json > "$OUT/gptq7b.json" 2> "$OUT/gptq7b.time" ;;
  decode)
    model
    for m in gptq awq; do [ -d /tmp/$m-w4g128 ] || $Q $m $MODEL -o /tmp/$m-w4g128 --bits 4 --group-size 128 \
      --nsamples 16 --calib .gpu/calib.txt; done
    for m in int8 nf4; do [ -d /tmp/$m ] || $Q $m $MODEL -o /tmp/$m; done
    $Q bench $MODEL /tmp/gptq-w4g128 /tmp/awq-w4g128 /tmp/int8 /tmp/nf4 --no-ppl --speed --batch-sizes 1,8 \
      --kernel auto -o "$OUT/decode-7b.json"
    $Q report "$OUT/decode-7b.json" -o "$OUT/decode-7b.md" ;;
  refine)
    [ -d /tmp/llama7b-4 ] || python3 tools/make_random_model.py /tmp/llama7b-4 --layers 4 --tokenizer .gpu/tokenizer
    peak="import atexit, runpy, sys, torch; atexit.register(lambda: print('GPU peak bytes', torch.cuda.max_memory_allocated(),
      file=sys.stderr)); sys.argv[0] = 'quantool'; runpy.run_module('quantool', run_name='__main__')"
    for dtype in --no-refine-bf16 --refine-bf16; do
      /usr/bin/time -v python3 -c "$peak" rtn /tmp/llama7b-4 -o /tmp/rtn-refine --refine 50 $dtype --group-size 128 \
        --nsamples 128 --seqlen 512 --calib .gpu/calib.txt --overwrite --json > "$OUT/refine7b$dtype.json" 2> "$OUT/refine7b$dtype.time"
    done ;;
  tests)
    set -o pipefail
    python3 -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.txt" ;;
  *) echo "unknown stage $1: memory, gptq, decode, refine or tests" >&2; exit 2 ;;
esac
