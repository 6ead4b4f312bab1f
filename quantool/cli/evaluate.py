"""`quantool bench`, `report` and `run`: measure against the baseline, write the comparison, run a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from quantool.cli.common import console, log_line, step_progress
from quantool.cli.options import config_options
from quantool.eval.bench import BenchConfig
from quantool.util.units import fmt_bytes


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(), help="Results JSON file.")
@config_options(BenchConfig)
def bench(models: tuple[str, ...], out: str, **settings: Any) -> None:
    """Perplexity and speed of MODEL (the baseline) and quantized variants, on the same tokens.

    \b
    Examples:
      quantool bench ./model ./model-gptq ./model-awq -o results.json
      quantool bench ./model ./model-gptq --speed --no-ppl --batch-sizes 1,8 -o speed.json
    """
    from quantool.eval.bench import run_bench
    from quantool.eval.report import fmt_or_dash, rows
    from quantool.util.atomic import write_json

    cfg = BenchConfig(**settings).validate()
    progress, on_step = step_progress(False)
    with progress:
        results = run_bench(list(models), cfg, on_step=on_step)
    write_json(results, Path(out))
    table = Table(title=f"results -> {out}", title_justify="left")
    for col in ("model", "method", "bits", "perplexity", "change", "size"):
        table.add_column(col)
    for r in rows(results):
        table.add_row(r["name"], r["method"], str(r["bits"]), fmt_or_dash(r.get("ppl"), "{:.4f}"), r.get("dppl_pct", "-"),
                      fmt_bytes(r["size"]) if r["size"] else "-")
    console.print(table)


@click.command()
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(), help="Markdown file; plots are written beside it.")
def report(results: tuple[str, ...], out: str) -> None:
    """Turn bench results into a Markdown comparison with plots (and show it here).

    \b
    Example:
      quantool report results.json -o reports/stories260k.md
    """
    from rich.markdown import Markdown

    from quantool.eval.bench import read_results
    from quantool.eval.report import write_report

    written = write_report([read_results(Path(r)) for r in results], Path(out))
    console.print(Markdown(Path(out).read_text()))
    console.print(f"wrote {', '.join(str(p) for p in written)}")


@click.command(name="run")
@click.argument("recipe")
@click.argument("model")
@click.option("--workdir", default="quantool-runs", show_default=True, type=click.Path(), help="Where quantized models and results go.")
@click.option("--overwrite", is_flag=True, help="Re-quantize even if an output exists.")
def run_recipe_command(recipe: str, model: str, workdir: str, overwrite: bool) -> None:
    """Run a recipe (quantize -> bench -> report) on MODEL.

    \b
    Examples:
      quantool run recipes/w4g128-gptq.yaml ./model
      quantool run recipes/compare-all.yaml ./model --workdir runs/
    """
    from quantool.recipes import load_recipe, run_recipe

    r = load_recipe(recipe)
    progress, on_step = step_progress(False)
    with progress:
        written = run_recipe(r, model, Path(workdir), overwrite=overwrite, log=log_line, on_step=on_step)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


COMMANDS = [bench, report, run_recipe_command]
