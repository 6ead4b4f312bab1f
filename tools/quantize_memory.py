"""Peak host memory of quantool's quantization jobs on a real model, for the planner's check
(tests/test_memory.py reads the JSON and compares `quantool memory --method quantize` with each run).

    python tools/quantize_memory.py --model /tmp/smollm2-135m --name smollm2-135m     # about 50 min on 2 CPU cores

Each run, METHOD:NSAMPLES:SEQLEN[:REFINE_BATCH] (the last adds `--refine 2 --refine-batch REFINE_BATCH`: the refine
step's peak does not depend on the number of steps), is `quantool rtn|gptq|awq MODEL --device cpu` as a child
process (peak RSS from the kernel, through tools/child_rusage.py's launcher), with WikiText-2 test as the
calibration text. Writes reports/quantize-memory.json
(runs are added to what is there; the same model, method and sizes are measured again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import transformers
from shared_data import WIKITEXT

from child_rusage import measure

ROOT = Path(__file__).resolve().parents[1]
RUNS = "rtn:0:0,gptq:8:256,gptq:32:512,awq:8:256,awq:32:512,rtn:32:512:8,rtn:32:512:4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--name", required=True, help="catalog name of the model's shape (quantool memory --model NAME)")
    ap.add_argument("--calib", type=Path, default=WIKITEXT)
    ap.add_argument("--runs", default=RUNS, help="method:nsamples:seqlen[:refine_batch],...")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantool-quantize-memory"))
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "reports/quantize-memory.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    data["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__}
    for spec in args.runs.split(","):
        method, nsamples, seqlen, refine_batch = (spec.split(":") + ["0"])[:4]
        refine = ["--refine", "2", "--refine-batch", refine_batch] if int(refine_batch) else []
        calibrated = method != "rtn" or bool(refine)
        out = args.work / f"{method}-{nsamples}-{seqlen}-{refine_batch}"
        shutil.rmtree(out, ignore_errors=True)
        options = ["--group-size", "128", *refine]
        if calibrated:
            options += ["--calib", str(args.calib), "--nsamples", nsamples, "--seqlen", seqlen]
        cmd = ["quantool", method, str(args.model), "-o", str(out), "--device", "cpu", *options]
        res = measure(cmd, args.work / f"{out.name}.log")
        if res["exit"]:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {res['exit']}): see {args.work / out.name}.log")
        run = {"model": args.name, "method": method, "nsamples": int(nsamples), "seqlen": int(seqlen),
               "calib_bytes": args.calib.stat().st_size if calibrated else 0, "peak_rss_bytes": res["peak_rss_bytes"],
               "seconds": res["seconds"], "date": time.strftime("%Y-%m-%d"),
               "command": " ".join(["quantool", method, "MODEL -o OUT --device cpu", *options]).replace(str(args.calib), args.calib.name)}
        if refine:
            run["refine_batch"] = int(refine_batch)
        key = lambda r: (r["model"], r["method"], r["nsamples"], r["seqlen"], r.get("refine_batch", 0))
        data["runs"] = [r for r in data["runs"] if key(r) != key(run)] + [run]
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{method} {nsamples}x{seqlen}: peak RSS {res['peak_rss_bytes'] / 2**20:.1f} MiB, {res['seconds']:.0f} s", flush=True)
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
