"""`quantool quantize` and its per-method shortcuts (rtn, gptq, awq, int8, nf4); options generated from `PTQConfig`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from quantool.cli.common import console, err, log_line
from quantool.cli.options import config_options
from quantool.ptq.config import PTQConfig
from quantool.util.units import fmt_bytes


def run_options(f: Callable) -> Callable:
    """MODEL, -o and the flags of every command that writes a model folder."""
    for opt in reversed([
        click.argument("model"),
        click.option("-o", "--out", required=True, type=click.Path(), help="Output folder (appears only when complete)."),
        click.option("--overwrite", is_flag=True, help="Replace quantool's own earlier output at OUT (and any unfinished run)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]):
        f = opt(f)
    return f


def layer_progress(title: str, disable: bool) -> tuple[Progress, Callable[[Any, int], None]]:
    """A progress bar over decoder layers and its on_layer(report, total) callback, printing one line per layer."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                        TimeElapsedColumn(), console=err, disable=disable)
    task = None

    def on_layer(report: Any, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(title, total=total, completed=report.index)
        worst = max(report.errors.items(), key=lambda kv: kv[1]) if report.errors else ("", 0)
        progress.update(task, completed=report.index + 1)
        mean = sum(report.errors.values()) / max(len(report.errors), 1)
        refine = report.refine and (f"  refine {report.refine['error_before']:.3g} -> {report.refine['error_after']:.3g}"
                                    + ("" if report.refine["kept"] else " (not kept)"))
        progress.console.print(f"layer {report.index:3d}  {report.seconds:6.2f}s  mean err {mean:.4f}  worst {worst[0]} {worst[1]:.4f}"
                               + (refine or "") + "".join(f"\n    {n}" for n in report.notes if "Cholesky" in n), highlight=False)

    return progress, on_layer


def _quantize(model: str, out: str, overwrite: bool, resume: bool, as_json: bool, **settings: Any) -> None:
    from quantool.ptq.pipeline import quantize_model

    cfg = PTQConfig(**settings)
    progress, on_layer = layer_progress(f"{cfg.method} {cfg.bits}-bit", as_json)
    with progress:
        summary = quantize_model(model, Path(out), cfg, overwrite=overwrite, resume=resume, on_layer=on_layer, log=log_line)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=f"{cfg.method} -> {out}", title_justify="left")
    for col in ("format", "quantized linears", "kept in 16 bits", "mean rel. error", "size on disk", "time"):
        table.add_column(col, justify="right")
    mean = summary.get("mean_error")
    table.add_row(summary["format"], str(summary["quantized_linears"]), str(len(summary.get("unpacked_linears", []))),
                  "-" if mean is None else f"{mean:.4f}", fmt_bytes(summary["size_after"]), f"{summary['seconds']:.1f}s")
    console.print(table)


@click.command()
@run_options
@config_options(PTQConfig)
def quantize(**kw: Any) -> None:
    """Quantize MODEL with any method; the per-method commands are shortcuts.

    \b
    Examples:
      quantool quantize ./model --method gptq --bits 4 -o ./model-gptq
      quantool quantize ./model --method nf4 -o ./model-nf4
    """
    _quantize(**kw)


def _method_command(method: str, summary: str, example: str) -> click.Command:
    @click.command(name=method, help=f"{summary}\n\n\b\nExample:\n  {example}", short_help=summary.split(":")[0])
    @run_options
    @config_options(PTQConfig, skip=("method",))
    def command(**kw: Any) -> None:
        _quantize(method=method, **kw)
    return command


COMMANDS = [
    quantize,
    _method_command("gptq", "GPTQ (Frantar et al. 2022): Hessian-aware rounding, layer by layer, streamed from the safetensors "
                    "shards (one layer in memory); GPTQ v1 checkpoint.",
                    "quantool gptq ./model --bits 4 --group-size 128 -o ./model-gptq"),
    _method_command("awq", "AWQ (Lin et al. 2023): activation-aware scales and clipping, layer by layer, streamed; AWQ GEMM checkpoint.",
                    "quantool awq ./model --bits 4 -o ./model-awq"),
    _method_command("rtn", "Round-to-nearest baseline, group-wise, streamed layer by layer (no calibration unless --refine); GPTQ v1 checkpoint.",
                    "quantool rtn ./model --bits 4 --group-size 128 -o ./model-rtn"),
    _method_command("int8", "LLM.int8 (bitsandbytes, outlier threshold 6.0): loads the whole model, as transformers does; "
                    "transformers' bnb serialization.", "quantool int8 ./model -o ./model-int8"),
    _method_command("nf4", "QLoRA NF4 with double quantization, blocksize 64 (bitsandbytes): loads the whole model, as "
                    "transformers does.", "quantool nf4 ./model -o ./model-nf4"),
]
