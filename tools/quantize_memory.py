"""Peak host memory of quantool's quantization jobs on a real model, for the planner's check
(tests/test_memory.py reads the JSON and compares `quantool memory --method quantize` with each run).

    python tools/quantize_memory.py --model /tmp/smollm2-135m --name smollm2-135m     # about 30 min on 2 CPU cores

Each run is `quantool rtn|gptq|awq MODEL --device cpu` as a child process (peak RSS from the kernel, through
tools/child_rusage.py's launcher), with WikiText-2 test as the calibration text. Writes reports/quantize-memory.json
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

from child_rusage import measure

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("rtn", 0, 0), ("gptq", 8, 256), ("gptq", 32, 512), ("awq", 8, 256), ("awq", 32, 512)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--name", required=True, help="catalog name of the model's shape (quantool memory --model NAME)")
    ap.add_argument("--calib", type=Path, default=ROOT / "../shared/data/wikitext2_raw_test.txt")
    ap.add_argument("--runs", default=",".join(f"{m}:{n}:{s}" for m, n, s in RUNS), help="method:nsamples:seqlen,...")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantool-quantize-memory"))
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "reports/quantize-memory.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    data["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__}
    for spec in args.runs.split(","):
        method, nsamples, seqlen = spec.split(":")
        out = args.work / f"{method}-{nsamples}-{seqlen}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = ["quantool", method, str(args.model), "-o", str(out), "--device", "cpu", "--group-size", "128"]
        if method != "rtn":
            cmd += ["--calib", str(args.calib), "--nsamples", nsamples, "--seqlen", seqlen]
        res = measure(cmd, args.work / f"{out.name}.log")
        if res["exit"]:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {res['exit']}): see {args.work / out.name}.log")
        run = {"model": args.name, "method": method, "nsamples": int(nsamples), "seqlen": int(seqlen),
               "calib_bytes": args.calib.stat().st_size if method != "rtn" else 0, "peak_rss_bytes": res["peak_rss_bytes"],
               "seconds": res["seconds"], "date": time.strftime("%Y-%m-%d"),
               "command": f"quantool {method} MODEL -o OUT --device cpu --group-size 128"
                          + (f" --calib wikitext2_raw_test.txt --nsamples {nsamples} --seqlen {seqlen}" if method != "rtn" else "")}
        data["runs"] = [r for r in data["runs"] if (r["model"], r["method"], r["nsamples"], r["seqlen"]) !=
                        (args.name, method, int(nsamples), int(seqlen))] + [run]
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(f"{method} {nsamples}x{seqlen}: peak RSS {res['peak_rss_bytes'] / 2**20:.1f} MiB, {res['seconds']:.0f} s", flush=True)
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
