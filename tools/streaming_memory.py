"""Peak host memory of streamed quantization against model depth (issue 9's evidence).

    python tools/streaming_memory.py --layers 4,8,32 --work /tmp/streaming     # about 2 h on 2 CPU cores

For each depth it writes a Llama-2-7B-shaped random fp16 model (tools/make_random_llama.py), runs
`quantool rtn` and `quantool gptq --nsamples 16` on it as child processes, and takes each child's peak
RSS from the kernel (wait4's ru_maxrss, through tools/child_rusage.py's launcher). Writes
reports/streaming-memory.json and .md. Models it wrote are deleted at the end unless --keep-models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from child_rusage import measure

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"rtn": ["rtn"], "gptq": ["gptq", "--nsamples", "16"], "awq": ["awq", "--nsamples", "16"]}


def machine() -> dict:
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "ram_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = ["# Streamed quantization: peak host memory against depth", "",
             f"Measured {data['date']} on {m['cpus']} CPU cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, no GPU; "
             f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.",
             "Models: Llama-2-7B shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000) with random fp16 weights and "
             "4, 8 or 32 decoder layers (`tools/make_random_llama.py`); 32 layers is the full 7B model (12.6 GiB of "
             "fp16 safetensors). Calibration: WikiText-2 test text. Peak RSS is the kernel's ru_maxrss of the "
             "`quantool` process. Wall times are as measured, beside other work on the same cores: read them as an "
             "upper bound, not a speed benchmark. "
             f"Regenerate with `{data['command']}`.", "",
             "| method | layers | source size | peak RSS | wall time | output size |", "|---|---:|---:|---:|---:|---:|"]
    for r in data["runs"]:
        lines.append(f"| {r['method']} | {r['layers']} | {r['source_bytes'] / 2**30:.2f} GiB | {r['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"| {r['seconds'] / 60:.1f} min | {r['output_bytes'] / 2**30:.2f} GiB |")
    lines += ["", "Peak growth with depth, against the 8-layer model (same method, same script run):", ""]
    for method in RUNS:
        by_depth = {r["layers"]: r["peak_rss_bytes"] for r in data["runs"] if r["method"] == method}
        if 8 in by_depth:
            lines += [f"- {method}, 8 -> {n} layers: {by_depth[n] / by_depth[8]:.3f}x ({(by_depth[n] - by_depth[8]) / 2**20:+.0f} MiB)"
                      for n in sorted(by_depth) if n != 8]
    lines += [f"- {note}" for note in data.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="4,8,32")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--calib", type=Path, default=ROOT / "../shared/data/wikitext2_raw_test.txt",
                    help="calibration text (the random models' tokenizer needs more than the shipped default)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantool-streaming"))
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "../shared/models/stories260K", help="tokenizer for the random models")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "reports/streaming-memory.json")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    depths = [int(n) for n in args.layers.split(",")]
    data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    done = {(r["method"], r["layers"]) for r in data["runs"]}
    data.update(date=time.strftime("%Y-%m-%d"), machine=machine(),
                command=f"python tools/streaming_memory.py --layers {args.layers} --methods {args.methods}")
    made = []
    for layers in depths:
        model = args.work / f"llama7b-{layers}"
        if not model.exists():
            subprocess.run([sys.executable, str(ROOT / "tools/make_random_llama.py"), str(model), "--layers", str(layers),
                            "--tokenizer", str(args.tokenizer)], check=True)
            made.append(model)
    for method in args.methods.split(","):
        for layers in depths:
            if (method, layers) in done:
                continue
            model, out = args.work / f"llama7b-{layers}", args.work / f"{method}-{layers}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
            cmd = ["quantool", RUNS[method][0], str(model), "-o", str(out), "--device", "cpu", "--calib", str(args.calib),
                   *RUNS[method][1:]]
            res = measure(cmd, args.work / f"{method}-{layers}.log")
            code, seconds, peak = res["exit"], res["seconds"], res["peak_rss_bytes"]
            if code:
                sys.exit(f"quantool {method} on {model} failed (exit {code}): see {args.work}/{method}-{layers}.log")
            data["runs"].append({"method": method, "layers": layers, "peak_rss_bytes": peak, "seconds": seconds,
                                 "calib_bytes": args.calib.stat().st_size, "date": time.strftime("%Y-%m-%d"),
                                 "source_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
                                 "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                                 "command": " ".join(["quantool", method, "MODEL -o OUT --device cpu --calib CALIB", *RUNS[method][1:]])})
            data["runs"].sort(key=lambda r: (r["method"], r["layers"]))
            args.out.write_text(json.dumps(data, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(markdown(data))
            print(f"{method} {layers} layers: peak RSS {peak / 2**30:.2f} GiB, {seconds / 60:.1f} min", file=sys.stderr)
            shutil.rmtree(out)
    for model in made if not args.keep_models else []:
        subprocess.run([sys.executable, str(ROOT / "tools/make_random_llama.py"), str(model), "--delete"], check=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
