"""`quantool fit`: the job's options from `memory.Job`, calibration and quantizer options from `PTQConfig`, the
choice's from `fit.FitConfig`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from quantool.cli.common import console, err, log_line, step_progress
from quantool.cli.options import config_options
from quantool.errors import QuantoolError
from quantool.fit import FitConfig
from quantool.formats.rules import split_at_layer
from quantool.memory.job import Job
from quantool.ptq.config import PTQConfig
from quantool.util.units import fmt_bytes

JOB_SKIP = ("quant", "kv_dtype", "ptq", "nsamples", "refine", "refine_batch", "ptq_device", "calib_bytes", "compute_capability")
PTQ_SKIP = ("method", "bits", "duo_scaling", "clip", "awq_search_tokens")


@click.command()
@click.argument("model")
@click.option("-o", "--out", type=click.Path(), help="Output folder for the mixed-precision GPTQ checkpoint (not with --dry-run).")
@click.option("--dry-run", is_flag=True, help="Measure and choose only: print the widths and the planned peak, write no checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace quantool's own earlier output at OUT (and any unfinished run).")
@click.option("--resume", is_flag=True, help="Continue an interrupted quantization from its last finished layer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (peak_bytes, budget_bytes, bits, avg_bits, ...).")
@config_options(FitConfig)
@config_options(Job, skip=JOB_SKIP)
@config_options(PTQConfig, skip=PTQ_SKIP)
def fit(model: str, out: str | None, dry_run: bool, overwrite: bool, resume: bool, as_json: bool, **settings: Any) -> None:
    """Choose each linear's bits so that the job's planned peak fits a GPU, then quantize with them.

    The job is described as for `quantool memory` (inference by default; lora too), its peak counting the KV
    cache and activations; each linear's loss at each width is measured on calibration text (GPTQ's own error
    through the layer's Hessian); the widths of least summed loss that fit are written as one GPTQ checkpoint
    with per-module bits.

    \b
    Examples:
      quantool fit ./model --gpu 24GiB --seq 8192 -o ./model-fit
      quantool fit ./model --budget 700MiB --bits 3,4,8 --dry-run
      quantool fit ./model --gpu rtx4090 --kv-dtype auto --batch 4 --seq 4096 -o ./model-fit --json
    """
    from quantool.fit import fit as run_fit

    if dry_run == bool(out):
        raise QuantoolError("give -o OUT to write the checkpoint, or --dry-run to only choose the widths")
    names = {f: settings.pop(f) for f in FitConfig.__dataclass_fields__}
    job_fields = set(Job.__dataclass_fields__) - set(JOB_SKIP)
    job = Job(**{k: settings.pop(k) for k in list(settings) if k in job_fields})
    job.validate()
    fcfg = FitConfig(**names)
    ptq = PTQConfig(**settings)
    progress, on_step = step_progress(as_json)
    with progress:
        summary = run_fit(model, None if dry_run else Path(out or ""), fcfg, job, ptq, overwrite=overwrite, resume=resume,
                          on_layer=lambda report, n: on_step(f"{fcfg.quantizer} at the chosen widths", report.index + 1, n),
                          on_step=lambda i, n: on_step("measuring sensitivities", i + 1, n), log=log_line)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    _print(summary, out)


def _print(summary: dict, out: str | None) -> None:
    per_layer: dict[str, list[int]] = defaultdict(list)
    for name, bits in summary["bits"].items():
        per_layer[split_at_layer(name)[0] or name].append(bits)
    table = Table(title="bits per decoder layer (one entry per linear, in module order)", title_justify="left")
    table.add_column("layer")
    table.add_column("bits")
    table.add_column("mean", justify="right")
    for layer, widths in per_layer.items():
        table.add_row(layer, " ".join(map(str, widths)), f"{sum(widths) / len(widths):.2f}")
    console.print(table)
    console.print(f"linears as stored: {fmt_bytes(summary['linear_bytes'])}, {summary['avg_bits']:.2f} bits per quantized weight "
                  f"(widths: {', '.join(f'{b}-bit x{n}' for b, n in sorted(summary['widths'].items()))}); "
                  f"KV cache {summary['kv_dtype']}", highlight=False)
    room = summary["budget_bytes"] - summary["peak_bytes"]
    console.print(f"planned peak [bold]{fmt_bytes(summary['peak_bytes'])}[/] at {summary['peak_phase']}, budget "
                  f"{fmt_bytes(summary['budget_bytes'])}: [green]fits[/], {fmt_bytes(room)} to spare", highlight=False)
    if out:
        console.print(f"wrote {out}: {fmt_bytes(summary['size_after'])} on disk in {summary['seconds']:.1f}s; "
                      f"`quantool memory --model {out}` plans {fmt_bytes(summary['written_peak_bytes'])} for the same job",
                      highlight=False)
    else:
        err.print("[dim]dry run: no checkpoint written[/]")


COMMANDS = [fit]
