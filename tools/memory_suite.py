"""The planner's accuracy suite: run each case's workload (`measure`), record the measured and predicted peak.

Results are rewritten after every case (temporary file, then rename), so a run cut short keeps what it
measured and `resume` carries on. `tools/measure_memory.py` is the command line.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from quantool.memory.job import Job
from quantool.memory.measure import measure
from quantool.memory.plan import estimate
from quantool.memory.shapes import resolve_model
from quantool.util.atomic import write_json
from quantool.util.units import fmt_bytes


def label(job: Job) -> str:
    parts = [job.method, f"b{job.batch}", f"s{job.seq}"]
    if job.method == "inference":
        parts.append(f"g{job.gen}")
    if job.weights_dtype != "bf16":
        parts.append(job.weights_dtype + ("+autocast" if job.autocast else ""))
    if job.training and job.optimizer != "adamw":
        parts.append(job.optimizer)
    if job.training and job.checkpointing:
        parts.append("ckpt")
    if job.keep_outputs:
        parts.append("keep-outputs")
    if job.quant != "none":
        parts.append(job.quant)
    if job.uses_lora and job.lora_targets != ("all",):
        parts.append("lora " + ",".join(job.lora_targets))
    return " ".join(parts)


def predicted_bytes(case: dict) -> int:
    """The prediction to compare: a CPU trace sees no CUDA-only memory."""
    plan = estimate(resolve_model(case["model"]), Job.from_dict(case["job"]))
    return plan.traced_peak_bytes if "traced_by" in case["measured"] else plan.peak_bytes


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


def run_suite(cases: list[dict], device: str, output: Path, resume: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Measure every case not already in `output` (with resume) and write the results after each."""
    data = json.loads(output.read_text()) if resume and output.exists() else {"cases": []}
    done = {(c["model"], json.dumps(c["spec"], sort_keys=True)) for c in data["cases"]}
    for case in cases:
        if (case["model"], json.dumps(case["job"], sort_keys=True)) in done:
            continue
        shape, job = resolve_model(case["model"]), Job.from_dict(case["job"]).validate()
        measured = measure(shape, job, device)
        versions = ", ".join(f"{k} {measured.pop(k)}" for k in ("torch", "transformers", "python"))
        data.update(device=measured.pop("device"), versions=versions)
        entry = {"model": case["model"], "label": label(job), "spec": case["job"], "shape": shape.to_dict(),
                 "job": asdict(job), "measured": measured}
        entry["predicted_peak_bytes"] = predicted_bytes(entry)
        data["cases"].append(entry)
        write_json(data, output)
        log(f"{case['model']:16s} {label(job):44s} measured {fmt_bytes(measured['peak_bytes']):>10s} "
            f"predicted {fmt_bytes(entry['predicted_peak_bytes']):>10s} ({100 * (entry['predicted_peak_bytes'] / measured['peak_bytes'] - 1):+.1f}%)")
    return data
