"""Peak host memory of streamed quantization against model depth (issue 9's evidence).

    python tools/streaming_memory.py --layers 4,8,32 --work /tmp/streaming     # about 2 h on 2 CPU cores
    python tools/streaming_memory.py --shape qwen3-30b-a3b --layers 2,4 --methods gptq --extra="--expert-token-ratio 0"

For each depth it writes a random fp16 model of --shape (tools/make_random_model.py: Llama-2-7B by default),
runs `quantool rtn` and `quantool gptq --nsamples 16` on it as child processes, and takes each child's peak
RSS from the kernel (wait4's ru_maxrss, through tools/child_rusage.py's launcher), beside the host peak that
`quantool memory` plans for the same job. Writes reports/streaming-memory.json and .md (-SHAPE for the other
shapes). Models it wrote are deleted at the end unless --keep-models.
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
from make_random_model import SHAPES
from shared_data import STORIES260K, WIKITEXT

from child_rusage import measure

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"rtn": ["rtn"], "gptq": ["gptq", "--nsamples", "16"], "awq": ["awq", "--nsamples", "16"]}


def machine() -> dict:
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "ram_bytes": mem,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def planned_peak(model: Path, method: str, options: list[str], calib: Path) -> dict:
    """The host peak `quantool memory` plans for quantizing model with method on the CPU (the job's --nsamples), its
    tokenizer term taken at the size of the tokenizer the random model carries rather than the vocabulary its config
    names (the real model's tokenizer, which the plan assumes): planned_bytes and tokenizer_vocab."""
    from transformers import AutoTokenizer

    from quantool.memory.quantize import TOKENIZER_BYTES_PER_TOKEN

    nsamples = options[options.index("--nsamples") + 1] if "--nsamples" in options else "128"
    cmd = ["quantool", "memory", "--method", "quantize", "--ptq", method, "--model", str(model), "--nsamples", nsamples,
           "--seq", "512", "--ptq-device", "cpu", "--calib", str(calib), "--json"]
    plan = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["host"]
    vocab = len(AutoTokenizer.from_pretrained(model))
    tokenizer = "the tokenizer (measured per vocabulary entry)"
    if tokenizer in plan:
        plan[tokenizer] = TOKENIZER_BYTES_PER_TOKEN * vocab
    return {"planned_bytes": int(sum(plan.values())), "tokenizer_vocab": vocab}


def markdown(data: dict) -> str:
    m = data["machine"]
    cfg = SHAPES[data.get("shape", "llama2-7b")]["config"]
    moe = f", {cfg['num_experts']} experts of width {cfg['moe_intermediate_size']}, top-{cfg['num_experts_per_tok']}" if "num_experts" in cfg else ""
    lines = ["# Streamed quantization: peak host memory against depth", "",
             f"Measured {data['date']} on {m['cpus']} CPU cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, no GPU; "
             f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.",
             f"Models: {data.get('shape', 'llama2-7b')} shapes (hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}{moe}, "
             f"{cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}) with random fp16 weights and the depths below "
             "(`tools/make_random_model.py`). Calibration: WikiText-2 test text. Peak RSS is the kernel's ru_maxrss of the "
             "`quantool` process; planned is `quantool memory --method quantize` for the same job (its tokenizer term "
             "at the size of the tokenizer these random models carry). "
             "Wall times are as measured, beside other work on the same cores: read them as an "
             "upper bound, not a speed benchmark. "
             f"Regenerate with `{data['command']}`.", "",
             "| method | layers | options | source size | peak RSS | planned | wall time | output size |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in data["runs"]:
        planned = f"{r['planned_bytes'] / 2**30:.2f} GiB ({r['planned_bytes'] / r['peak_rss_bytes'] - 1:+.0%})" if "planned_bytes" in r else "-"
        lines.append(f"| {r['method']} | {r['layers']} | {r['command'].split('CALIB')[1].strip() or '-'} | {r['source_bytes'] / 2**30:.2f} GiB "
                     f"| {r['peak_rss_bytes'] / 2**30:.2f} GiB | {planned} | {r['seconds'] / 60:.1f} min | {r['output_bytes'] / 2**30:.2f} GiB |")
    lines += ["", "Peak growth with depth, against the shallowest model (same method):", ""]
    for method in RUNS:
        by_depth = {r["layers"]: r["peak_rss_bytes"] for r in data["runs"] if r["method"] == method}
        if len(by_depth) > 1:
            ref = min(by_depth)
            lines += [f"- {method}, {ref} -> {n} layers: {by_depth[n] / by_depth[ref]:.3f}x ({(by_depth[n] - by_depth[ref]) / 2**20:+.0f} MiB)"
                      for n in sorted(by_depth) if n != ref]
    lines += [f"- {note}" for note in data.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--layers", default="4,8,32")
    ap.add_argument("--extra", default="", help="more quantool options for every run, e.g. --extra='--expert-token-ratio 0'")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--calib", type=Path, default=WIKITEXT,
                    help="calibration text (the random models' tokenizer needs more than the shipped default)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantool-streaming"))
    ap.add_argument("--tokenizer", type=Path, default=STORIES260K, help="tokenizer for the random models")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--replan", action="store_true", help="only recompute the planned peaks of the runs in --out")
    ap.add_argument("-o", "--out", type=Path)
    args = ap.parse_args()
    args.out = args.out or ROOT / ("reports/streaming-memory.json" if args.shape == "llama2-7b" else f"reports/streaming-memory-{args.shape}.json")
    args.work.mkdir(parents=True, exist_ok=True)
    depths = [int(n) for n in args.layers.split(",")]
    data = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    done = {(r["method"], r["layers"]) for r in data["runs"]}
    if args.replan:  # the measurements stay; the plans are the current planner's (the models must still be in --work)
        for r in data["runs"]:
            options = r["command"].split("CALIB")[1].split()
            r.update(planned_peak(args.work / f"{data.get('shape', 'llama2-7b')}-{r['layers']}", r["method"], options, args.calib))
        data["config"] = json.loads((args.work / f"{data.get('shape', 'llama2-7b')}-{data['runs'][0]['layers']}/config.json").read_text())
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(data))
        return
    extra = f" --extra='{args.extra}'" if args.extra else ""
    data.update(date=time.strftime("%Y-%m-%d"), machine=machine(), shape=args.shape,
                command=f"python tools/streaming_memory.py --shape {args.shape} --layers {args.layers} --methods {args.methods}{extra}")
    made = []
    for layers in depths:
        model = args.work / f"{args.shape}-{layers}"
        if not model.exists():
            subprocess.run([sys.executable, str(ROOT / "tools/make_random_model.py"), str(model), "--shape", args.shape,
                            "--layers", str(layers), "--tokenizer", str(args.tokenizer)], check=True)
            made.append(model)
        data["config"] = json.loads((model / "config.json").read_text())  # the shape the planner is checked on
    for method in args.methods.split(","):
        for layers in depths:
            if (method, layers) in done:
                continue
            model, out = args.work / f"{args.shape}-{layers}", args.work / f"{method}-{layers}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
            cmd = ["quantool", RUNS[method][0], str(model), "-o", str(out), "--device", "cpu", "--calib", str(args.calib),
                   *RUNS[method][1:], *args.extra.split()]
            res = measure(cmd, args.work / f"{method}-{layers}.log")
            code, seconds, peak = res["exit"], res["seconds"], res["peak_rss_bytes"]
            if code:
                sys.exit(f"quantool {method} on {model} failed (exit {code}): see {args.work}/{method}-{layers}.log")
            data["runs"].append({"method": method, "layers": layers, "peak_rss_bytes": peak, "seconds": seconds,
                                 "calib_bytes": args.calib.stat().st_size, "date": time.strftime("%Y-%m-%d"),
                                 "source_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
                                 "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                                 **planned_peak(model, method, RUNS[method][1:] + args.extra.split(), args.calib),
                                 "command": " ".join(["quantool", method, "MODEL -o OUT --device cpu --calib CALIB", *RUNS[method][1:],
                                                      *args.extra.split()])})
            data["runs"].sort(key=lambda r: (r["method"], r["layers"]))
            args.out.write_text(json.dumps(data, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(markdown(data))
            print(f"{method} {layers} layers: peak RSS {peak / 2**30:.2f} GiB, {seconds / 60:.1f} min", file=sys.stderr)
            shutil.rmtree(out)
    for model in made if not args.keep_models else []:
        subprocess.run([sys.executable, str(ROOT / "tools/make_random_model.py"), str(model), "--delete"], check=True)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
