"""`quantool qat`: quantization-aware fine-tuning into a real checkpoint; options generated from `QATConfig`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from quantool.cli.common import console, err, log_line
from quantool.cli.options import config_options
from quantool.cli.quantize import run_options
from quantool.qat import QATConfig


@click.command()
@run_options
@click.option("--data", required=True, type=click.Path(), help="Training text (.txt or .jsonl).")
@config_options(QATConfig)
@click.option("--eval-text", type=click.Path(), help="Text for perplexity before/after (disjoint from the training range!).")
@click.option("--eval-range", "eval_range", default="0,1", show_default=True, help="Fractions of --eval-text's tokens to evaluate.")
@click.option("--eval-tokens", default=50000, show_default=True, type=int, help="At most this many evaluation tokens.")
def qat(model: str, out: str, overwrite: bool, resume: bool, as_json: bool, data: str, eval_text: str | None, eval_range: str,
        eval_tokens: int, **settings: Any) -> None:
    """Quantization-aware fine-tuning that ends in a real quantized checkpoint.

    \b
    Examples:
      quantool qat ./model --data train.txt --bits 4 --group-size 32 --steps 500 -o ./model-qat
      quantool qat ./model --data train.txt --lora-rank 16 --eval-text val.txt -o ./model-qat-lora
    """
    from quantool.eval.perplexity import evaluator
    from quantool.qat import train

    cfg = QATConfig(data=data, **settings)
    lo, hi = (float(v) for v in eval_range.split(","))
    eval_fn = evaluator(eval_text, (lo, hi), max_tokens=eval_tokens) if eval_text else None
    progress = Progress(TextColumn("[bold]QAT[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                        console=err, disable=as_json)
    task = progress.add_task("qat", total=cfg.steps, loss=float("nan"), tps=0.0)
    with progress:
        summary = train(model, Path(out), cfg, eval_fn=eval_fn, overwrite=overwrite, resume=resume,
                        on_step=lambda s, n, loss, tps: progress.update(task, completed=s, loss=loss, tps=tps), log=log_line)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    console.print(f"training loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} over {summary['steps']} steps")
    if summary["ppl_before"] is not None:
        console.print(f"perplexity: fp {summary['ppl_before']:.4f}, fake-quantized {summary['ppl_fake_quant']:.4f}, "
                      f"converted {cfg.bits}-bit checkpoint {summary['ppl_after']:.4f}")
    console.print(f"wrote {out}")


COMMANDS = [qat]
