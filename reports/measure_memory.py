"""Measure the memory planner's accuracy on the suite in tests/data/memory_suite.json.

Each case builds its workload with random weights and runs it (quantool.memory.measure): on a CUDA GPU
the peak of torch.cuda.max_memory_allocated(), on the CPU the same quantity traced op by op. The
results file is rewritten after every case (bench.write_json: temporary file, then rename), so a run cut short keeps
what it measured and `--resume` carries on. `--table` prints the Markdown table of a results file.

    python reports/measure_memory.py                          # GPU -> tests/data/memory_measurements.json
    python reports/measure_memory.py --device cpu --only smollm2-135m,qwen2.5-0.5b -o reports/memory-cpu-trace.json
    python reports/measure_memory.py --table tests/data/memory_measurements.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from quantool.bench import write_json
from quantool.memory import Job, estimate, resolve_model
from quantool.memory.measure import measure
from quantool.units import fmt_bytes

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "data" / "memory_suite.json"


def _label(job: Job) -> str:
    parts = [job.method, f"b{job.batch}", f"s{job.seq}"]
    if job.method == "inference":
        parts.append(f"g{job.gen}")
    if job.weights_dtype != "bf16":
        parts.append(job.weights_dtype + ("+autocast" if job.autocast else ""))
    if job.training and job.optimizer != "adamw":
        parts.append(job.optimizer)
    if job.training and job.checkpointing:
        parts.append("ckpt")
    if job.quant != "none":
        parts.append(job.quant)
    if job.uses_lora and job.lora_targets != ("all",):
        parts.append("lora " + ",".join(job.lora_targets))
    return " ".join(parts)


def table(data: dict) -> str:
    """Markdown: one row per case, then the max and median absolute error."""
    rows = ["| model | job | measured peak | predicted | error |", "|---|---|---:|---:|---:|"]
    errors = []
    for case in data["cases"]:
        error = case["predicted_peak_bytes"] / case["measured"]["peak_bytes"] - 1
        errors.append(abs(error))
        rows.append(f"| {case['model']} | {case['label']} | {fmt_bytes(case['measured']['peak_bytes'])} | "
                    f"{fmt_bytes(case['predicted_peak_bytes'])} | {100 * error:+.2f}% |")
    if errors:
        rows.append(f"\n{len(errors)} cases on {data['device']}: max |error| {100 * max(errors):.2f}%, "
                    f"median {100 * statistics.median(errors):.2f}% ({data['versions']}).")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--suite", type=Path, default=SUITE, help="cases to run (default: %(default)s)")
    ap.add_argument("--only", help="comma list of catalog models to run")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "tests" / "data" / "memory_measurements.json")
    ap.add_argument("--resume", action="store_true", help="keep the cases already in --output")
    ap.add_argument("--table", type=Path, help="print the Markdown table of this results file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0

    cases = json.loads(args.suite.read_text())["cases"]
    if args.only:
        wanted = set(args.only.split(","))
        cases = [c for c in cases if c["model"] in wanted]
    data = json.loads(args.output.read_text()) if args.resume and args.output.exists() else {"cases": []}
    done = {(c["model"], json.dumps(c["spec"], sort_keys=True)) for c in data["cases"]}
    for case in cases:
        if (case["model"], json.dumps(case["job"], sort_keys=True)) in done:
            continue
        shape, job = resolve_model(case["model"]), Job.from_dict(case["job"]).validate()
        measured = measure(shape, job, args.device)
        predicted = estimate(shape, job).peak_bytes
        versions = ", ".join(f"{k} {measured.pop(k)}" for k in ("torch", "transformers", "python"))
        data.update(device=measured.pop("device"), versions=versions)
        data["cases"].append({
            "model": case["model"], "label": _label(job), "spec": case["job"],
            "shape": shape.to_dict(),
            "job": asdict(job), "measured": measured, "predicted_peak_bytes": predicted,
        })
        write_json(data, args.output)
        print(f"{case['model']:16s} {_label(job):44s} measured {fmt_bytes(measured['peak_bytes']):>10s} "
              f"predicted {fmt_bytes(predicted):>10s} ({100 * (predicted / measured['peak_bytes'] - 1):+.1f}%)", flush=True)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
