"""`quantool memory`: plan GPU memory; options generated from `memory.Job`."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from typing import Any

import click
from rich.table import Table

from quantool.cli.common import console
from quantool.cli.options import config_options
from quantool.errors import QuantoolError
from quantool.memory.job import Job
from quantool.util.units import fmt_bytes, fmt_count, parse_count


@click.command()
@click.option("--params", help="Model size, e.g. 500M, 1.5B, 7B, 70B (Llama-shaped).")
@click.option("--model", "model_spec", help="Catalog name (llama-3-8b, qwen2.5-7b, ...), config.json or model dir.")
@config_options(Job)
@click.option("--calib", "calib_file", type=click.Path(exists=True, dir_okay=False),
              help="With --method quantize: the calibration text (its size decides the tokenizer's transient memory).")
@click.option("--gpu", "gpu_spec", help="GPU name or size to check against: h100-80gb, rtx4090, 24GiB ... "
              "A name also sets the card's cuBLAS workspace and attention kernels (default: an H100's).")
@click.option("--solve", "solve_for", type=click.Choice(["batch", "seq"]), help="Find the largest batch or seq that fits --gpu.")
@click.option("--measure", type=click.Choice(["cuda", "cpu"]), is_flag=False, flag_value="cuda", default=None,
              help="Also run the workload (random weights) and compare: on the CUDA GPU, or 'cpu' to trace its tensors on the CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def memory(params: str | None, model_spec: str | None, calib_file: str | None, gpu_spec: str | None, solve_for: str | None,
           measure: str | None, as_json: bool, **settings: Any) -> None:
    """Plan GPU memory for inference or training, before renting a GPU.

    \b
    Examples:
      quantool memory --params 7B --method qlora
      quantool memory --model llama-3-8b --method lora --batch 4 --seq 4096 --gpu h100-80gb
      quantool memory --model ./my-model --gpu 24GiB --solve batch
      quantool memory --params 70B --method full --gpus 8 --zero 3 --optimizer adamw8bit --json
      quantool memory --params 70B --method quantize --ptq gptq --seq 512 --gpu 24GiB
      quantool memory --model llama-2-7b --method quantize --ptq gptq --nsamples 16 --seq 512 --ptq-device cpu
      quantool memory --model smollm2-135m --method full --batch 2 --seq 512 --measure cpu
      quantool memory --model llama-3-8b --method qlora --seq 4096 --keep-outputs --gpu a100-80gb
    """
    from quantool.memory import estimate, from_param_count, resolve_model, solve
    from quantool.memory.gpus import lookup

    if bool(params) == bool(model_spec):
        raise QuantoolError("give exactly one of --params (e.g. 7B) or --model (catalog name, config.json or model dir)")
    shape = from_param_count(parse_count(params)) if params else resolve_model(model_spec or "")
    if (settings["lora_rank"] is not None or settings["lora_targets"] != ("all",)) and settings["method"] not in ("lora", "qlora", "qat"):
        raise QuantoolError(f"--lora-rank/--lora-targets need --method lora, qlora or qat (got --method {settings['method']})")
    if solve_for and not gpu_spec:
        raise QuantoolError("--solve needs --gpu NAME|SIZE to know the budget")
    gpu = lookup(gpu_spec) if gpu_spec else None
    job = Job(**settings, calib_bytes=os.path.getsize(calib_file) if calib_file else None)
    if gpu and gpu.compute_capability:
        job = replace(job, compute_capability=gpu.compute_capability)
    job.validate()
    solved = None
    if solve_for and gpu:
        value, _ = solve(shape, job, gpu.bytes, solve_for)
        if value == 0:
            raise QuantoolError(f"even {solve_for} 1 does not fit {gpu.name}: reduce the model, use --quant nf4/qlora, or add --gpus")
        job = job.with_value(solve_for, value)
        solved = {solve_for: value}
    plan = estimate(shape, job)
    measured = None
    if measure:
        from quantool.memory.measure import measure as run_measure

        measured = run_measure(shape, job, measure)
    if as_json:
        click.echo(json.dumps(_plan_json(plan, gpu, solved, measured), indent=2, default=str))
        return
    _print_plan(plan, gpu, solved, measured)


def _plan_json(plan: Any, gpu: Any, solved: dict | None, measured: dict | None) -> dict:
    data: dict[str, Any] = {
        "peak_bytes": plan.peak_bytes,
        "traced_peak_bytes": plan.traced_peak_bytes,
        "components": {k: int(v) for k, v in plan.components.items()},
        "labels": plan.labels,
        "params": plan.params,
        "trainable_params": plan.trainable_params,
        "peak_phase": plan.phase,
        "phases": {k: int(v) for k, v in plan.phases.items()},
        "outside_allocator": {k: int(v) for k, v in plan.outside_allocator.items()},
        "device_bytes": plan.device_bytes,
        "host_bytes": plan.host_bytes,
        "host": {k: int(v) for k, v in plan.host.items()},
        "full_finetune_bytes": plan.full_finetune_bytes,
        "model": plan.shape.to_dict(),
        "job": asdict(plan.job),
        "notes": plan.notes,
    }
    if gpu:
        data["gpu"] = {"name": gpu.name, "bytes": gpu.bytes, "compute_capability": gpu.compute_capability,
                       "fits": plan.device_bytes <= gpu.bytes, "headroom_bytes": gpu.bytes - plan.device_bytes}
    if solved:
        data["solved"] = solved
    if measured:
        data["measured"] = measured
    return data


def _print_host(plan: Any) -> None:
    table = Table(title="host RAM at the peak (peak RSS)", title_justify="left")
    table.add_column("component")
    table.add_column("bytes", justify="right")
    for name, value in sorted(plan.host.items(), key=lambda kv: -kv[1]):
        table.add_row(name, fmt_bytes(value))
    table.add_row("[bold]host peak[/]", f"[bold]{fmt_bytes(plan.host_bytes)}[/]")
    console.print(table)


def _print_plan(plan: Any, gpu: Any, solved: dict | None, measured: dict | None) -> None:
    job = plan.job
    console.print(f"[bold]{plan.shape.describe()}[/]", highlight=False)
    console.print(f"{fmt_count(plan.params)} parameters, {fmt_count(plan.trainable_params)} trainable; "
                  f"method [bold]{job.method}[/], batch {job.batch}, seq {job.seq}" + (f", gen {job.gen}" if job.method == "inference" else ""),
                  highlight=False)
    for note in plan.notes:
        console.print(f"[dim]- {note}[/]", highlight=False)
    if plan.host:
        _print_host(plan)
    if not plan.components:
        return
    console.print(f"Predicted peak of torch.cuda.max_memory_allocated(), reached at: [bold]{plan.phase}[/]", highlight=False)
    table = Table()
    table.add_column("component")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for cid, value in sorted(plan.components.items(), key=lambda kv: -kv[1]):
        table.add_row(plan.labels[cid], fmt_bytes(value), f"{100 * value / plan.peak_bytes:.1f}%")
    table.add_row("[bold]peak (allocated)[/]", f"[bold]{fmt_bytes(plan.peak_bytes)}[/]", "100%")
    for name, value in plan.outside_allocator.items():
        table.add_row(f"[dim]+ {name}[/]", f"[dim]{fmt_bytes(value)}[/]", "")
    table.add_row("[bold]as nvidia-smi would show[/]", f"[bold]{fmt_bytes(plan.device_bytes)}[/]", "")
    console.print(table)
    if plan.full_finetune_bytes:
        full = plan.full_finetune_bytes
        saved = full - plan.peak_bytes
        console.print(f"vs full fine-tuning (bf16, AdamW, same batch/seq): {fmt_bytes(full)} -> "
                      f"{fmt_bytes(plan.peak_bytes)}, saves {fmt_bytes(saved)} ({100 * saved / full:.0f}%)")
    if measured:
        traced = "traced_by" in measured  # a CPU trace sees no CUDA-only memory: compare like with like
        predicted = plan.traced_peak_bytes if traced else plan.peak_bytes
        err_pct = 100 * (predicted - measured["peak_bytes"]) / measured["peak_bytes"]
        console.print(f"measured on {measured['device']}: peak {fmt_bytes(measured['peak_bytes'])} vs predicted "
                      f"{fmt_bytes(predicted)}{' (without CUDA-only terms)' if traced else ''}: {err_pct:+.1f}%; "
                      f"weights {fmt_bytes(measured['weights_bytes'])}", highlight=False)
        for t in measured.get("largest_at_peak", [])[:5]:
            console.print(f"[dim]  live at the peak: {fmt_bytes(t['bytes'])} from {t['op']} {t['shape']} {t['dtype']}[/]", highlight=False)
        for g in measured.get("live_at_peak_by_origin", [])[:6]:
            console.print(f"[dim]  live at the peak: {fmt_bytes(g['bytes'])} allocated in {g['origin']}[/]", highlight=False)
    if solved:
        (what, value), = solved.items()
        console.print(f"largest {what} that fits {gpu.name}: [bold]{value}[/]")
    if gpu:
        room = gpu.bytes - plan.device_bytes
        verdict = "[green]fits[/]" if room >= 0 else "[red]does not fit[/]"
        console.print(f"{verdict} on {gpu.name} ({fmt_bytes(gpu.bytes)}): headroom {fmt_bytes(room)}")
    else:
        console.print(f"needs about {fmt_bytes(plan.device_bytes)} of GPU memory (pass --gpu to check a card)")


COMMANDS = [memory]
