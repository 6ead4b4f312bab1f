"""The quantool command line: parse, call the library, print. No algorithms live here."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import replace

import click
from rich.console import Console
from rich.table import Table

from quantool import __version__
from quantool.errors import QuantoolError
from quantool.units import fmt_bytes, fmt_count, parse_count

console = Console()
err = Console(stderr=True)


class Group(click.Group):
    """Turns QuantoolError into one red line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QuantoolError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/] (work so far is kept where the command supports --resume)")
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="quantool")
def main():
    """Will it fit, how do I shrink it, and what did shrinking cost?

    \b
    quantool memory --params 7B --method qlora        plan GPU memory (no download)
    quantool gptq ./model --bits 4 -o ./model-gptq    quantize (also awq, rtn, int8, nf4)
    quantool bench ./model ./model-gptq -o r.json     perplexity and speed vs fp16
    quantool report r.json -o reports/r.md            Markdown comparison with plots
    quantool run recipes/compare-all.yaml ./model     a whole pipeline from a recipe
    quantool qat ./model --data train.txt -o ./qat    quantization-aware fine-tuning
    """


# -- memory ------------------------------------------------------------------------------------------

def _targets(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ("all",)
    return tuple(v.strip() for v in value.split(",") if v.strip()) or ("all",)


@main.command()
@click.option("--params", help="Model size, e.g. 500M, 1.5B, 7B, 70B (Llama-shaped).")
@click.option("--model", "model_spec", help="Catalog name (llama-3-8b, qwen2.5-7b, ...), config.json or model dir.")
@click.option("--method", default="inference", show_default=True, type=click.Choice(["inference", "full", "lora", "qlora", "qat", "quantize"]),
              help="quantize: quantool's own layer-by-layer PTQ job (see --ptq, --nsamples).")
@click.option("--batch", default=1, show_default=True, type=int)
@click.option("--seq", default=2048, show_default=True, type=int, help="Training sequence length, or prompt length for inference.")
@click.option("--gen", default=256, show_default=True, type=int, help="New tokens generated (inference).")
@click.option("--weights-dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp16", "fp32"]))
@click.option("--autocast", is_flag=True, help="fp32 master weights with bf16 autocast (mixed precision).")
@click.option("--optimizer", default="adamw", show_default=True,
              type=click.Choice(["adamw", "adamw8bit", "paged-adamw8bit", "paged_adamw8bit", "sgd"]))
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None, help="Default: on for qlora (as PEFT sets it), off otherwise.")
@click.option("--keep-outputs", is_flag=True,
              help="Training loop keeps `out = model(...)` until the next forward (its logits live through backward); "
                   "default: Trainer style, `loss = model(...).loss`.")
@click.option("--lora-rank", type=int, help="LoRA rank (default 16) for lora/qlora/qat.")
@click.option("--lora-targets", help="all, qv, or a comma list such as q_proj,v_proj (default all).")
@click.option("--quant", default="none", show_default=True, type=click.Choice(["none", "int8", "nf4"]), help="Frozen base quantization.")
@click.option("--kv-dtype", type=click.Choice(["bf16", "fp16", "fp32", "fp8", "int8", "int4"]), help="KV-cache dtype (default: weights dtype).")
@click.option("--ptq", default="gptq", show_default=True, type=click.Choice(["gptq", "awq", "rtn"]), help="With --method quantize.")
@click.option("--nsamples", default=128, show_default=True, type=int, help="Calibration samples, with --method quantize (--seq is their length).")
@click.option("--ptq-device", default="cuda", show_default=True, type=click.Choice(["cuda", "cpu"]),
              help="With --method quantize: quantize on the GPU, or entirely on the CPU (everything in host RAM).")
@click.option("--gpus", default=1, show_default=True, type=int)
@click.option("--zero", default=0, show_default=True, type=click.IntRange(0, 3), help="DeepSpeed ZeRO stage for data parallel training.")
@click.option("--gpu", "gpu_spec", help="GPU name or size to check against: h100-80gb, rtx4090, 24GiB ... "
              "A name also sets the card's cuBLAS workspace and attention kernels (default: an H100's).")
@click.option("--solve", "solve_for", type=click.Choice(["batch", "seq"]), help="Find the largest batch or seq that fits --gpu.")
@click.option("--measure", type=click.Choice(["cuda", "cpu"]), is_flag=False, flag_value="cuda", default=None,
              help="Also run the workload (random weights) and compare: on the CUDA GPU, or 'cpu' to trace its tensors on the CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def memory(params, model_spec, method, batch, seq, gen, weights_dtype, autocast, optimizer, grad_checkpointing, keep_outputs,
           lora_rank, lora_targets, quant, kv_dtype, ptq, nsamples, ptq_device, gpus, zero, gpu_spec, solve_for, measure, as_json):
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
    from quantool.memory import Job, estimate, from_param_count, resolve_model, solve
    from quantool.memory.cuda import HOPPER
    from quantool.memory.gpus import lookup

    if bool(params) == bool(model_spec):
        raise QuantoolError("give exactly one of --params (e.g. 7B) or --model (catalog name, config.json or model dir)")
    shape = from_param_count(parse_count(params)) if params else resolve_model(model_spec)
    lora_given = lora_rank is not None or lora_targets is not None
    if lora_given and method not in ("lora", "qlora", "qat"):
        raise QuantoolError(f"--lora-rank/--lora-targets need --method lora, qlora or qat (got --method {method})")
    if solve_for and not gpu_spec:
        raise QuantoolError("--solve needs --gpu NAME|SIZE to know the budget")
    rank = lora_rank if lora_rank is not None else (16 if method in ("lora", "qlora") else 0)
    gpu = lookup(gpu_spec) if gpu_spec else None
    job = Job(method=method, batch=batch, seq=seq, gen=gen, weights_dtype=weights_dtype, autocast=autocast,
              optimizer=optimizer.replace("_", "-"), grad_checkpointing=grad_checkpointing, lora_rank=rank,
              lora_targets=_targets(lora_targets), quant=quant, kv_dtype=kv_dtype, gpus=gpus, zero=zero,
              ptq=ptq, nsamples=nsamples, ptq_device=ptq_device, keep_outputs=keep_outputs,
              compute_capability=gpu.compute_capability if gpu and gpu.compute_capability else HOPPER).validate()
    solved = None
    if solve_for:
        value, _ = solve(shape, job, gpu.bytes, solve_for)
        if value == 0:
            raise QuantoolError(f"even {solve_for} 1 does not fit {gpu.name}: reduce the model, use --quant nf4/qlora, or add --gpus")
        job = replace(job, **{solve_for: value})
        solved = {solve_for: value}
    plan = estimate(shape, job)
    measured = None
    if measure:
        from quantool.memory.measure import measure as run_measure

        measured = run_measure(shape, job, measure)
    if as_json:
        click.echo(json.dumps(_plan_json(plan, gpu, solved, measured), indent=2))
        return
    _print_plan(plan, gpu, solved, measured)


def _plan_json(plan, gpu, solved, measured) -> dict:
    from dataclasses import asdict

    data = {
        "peak_bytes": plan.peak_bytes,
        "traced_peak_bytes": plan.traced_peak_bytes,
        "components": {k: int(v) for k, v in plan.components.items()},
        "params": plan.params,
        "trainable_params": plan.trainable_params,
        "peak_phase": plan.phase,
        "phases": {k: int(v) for k, v in plan.phases.items()},
        "outside_allocator": {k: int(v) for k, v in plan.outside_allocator.items()},
        "device_bytes": plan.device_bytes,
        "host_bytes": plan.host_bytes,
        "host": {k: int(v) for k, v in plan.host.items()},
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


def _print_host(plan):
    table = Table(title="host RAM at the peak (peak RSS)", title_justify="left")
    table.add_column("component")
    table.add_column("bytes", justify="right")
    for name, value in sorted(plan.host.items(), key=lambda kv: -kv[1]):
        table.add_row(name, fmt_bytes(value))
    table.add_row("[bold]host peak[/]", f"[bold]{fmt_bytes(plan.host_bytes)}[/]")
    console.print(table)


def _print_plan(plan, gpu, solved, measured):
    from quantool.memory.plan import estimate

    job = plan.job
    console.print(f"[bold]{plan.shape.describe()}[/]", highlight=False)
    console.print(f"{fmt_count(plan.params)} parameters, {fmt_count(plan.trainable_params)} trainable; "
              f"method [bold]{job.method}[/], batch {job.batch}, seq {job.seq}" + (f", gen {job.gen}" if job.method == "inference" else ""), highlight=False)
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
    for name, value in sorted(plan.components.items(), key=lambda kv: -kv[1]):
        table.add_row(name, fmt_bytes(value), f"{100 * value / plan.peak_bytes:.1f}%")
    table.add_row("[bold]peak (allocated)[/]", f"[bold]{fmt_bytes(plan.peak_bytes)}[/]", "100%")
    for name, value in plan.outside_allocator.items():
        table.add_row(f"[dim]+ {name}[/]", f"[dim]{fmt_bytes(value)}[/]", "")
    table.add_row("[bold]as nvidia-smi would show[/]", f"[bold]{fmt_bytes(plan.device_bytes)}[/]", "")
    console.print(table)
    if job.method in ("lora", "qlora"):
        full = estimate(plan.shape, replace(job, method="full", quant="none", lora_rank=0, grad_checkpointing=job.checkpointing,
                                            weights_dtype="bf16", autocast=False))
        saved = full.peak_bytes - plan.peak_bytes
        console.print(f"vs full fine-tuning (bf16, AdamW, same batch/seq): {fmt_bytes(full.peak_bytes)} -> "
                  f"{fmt_bytes(plan.peak_bytes)}, saves {fmt_bytes(saved)} ({100 * saved / full.peak_bytes:.0f}%)")
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


# -- quantize ----------------------------------------------------------------------------------------

def config_options(cls, skip: tuple[str, ...] = ()):
    """click options generated from a config dataclass: each field's flag, type, default and help (its metadata)."""
    def deco(f):
        for fld in reversed(dataclasses.fields(cls)):
            if fld.name in skip:
                continue
            meta, default = fld.metadata, fld.default
            flag = meta.get("flag") or "--" + fld.name.replace("_", "-")
            kw = dict(default=default, show_default=default is not None, help=meta.get("help"))
            if "choices" in meta:
                kw["type"] = click.Choice(list(meta["choices"]))
            elif isinstance(default, bool) and "/" not in flag:
                kw["is_flag"] = True
            elif default is not None:
                kw["type"] = type(default)
            f = click.option(flag, fld.name, **kw)(f)
        return f
    return deco


def _quant_options(method: str | None):
    """What every quantize command takes: MODEL, -o, the run flags, and PTQConfig's fields (--method only for
    `quantool quantize`)."""
    from quantool.ptq.config import PTQConfig

    def deco(f):
        f = config_options(PTQConfig, skip=() if method is None else ("method",))(f)
        for opt in reversed([
            click.argument("model"),
            click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (written only when complete)."),
            click.option("--overwrite", is_flag=True, help="Replace an existing OUT (and any unfinished run)."),
            click.option("--resume", is_flag=True, help="Continue an interrupted run from its last finished layer."),
            click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        ]):
            f = opt(f)
        return f
    return deco


def _quantize(model, out, overwrite, resume, as_json, **settings):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from quantool.ptq import PTQConfig, quantize_model

    cfg = PTQConfig(**settings)
    method, bits = cfg.method, cfg.bits
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                        TimeElapsedColumn(), console=err, disable=as_json)
    task = None

    def on_layer(report, total):
        nonlocal task
        if task is None:
            task = progress.add_task(f"{method} {bits}-bit", total=total, completed=report.index)
        worst = max(report.errors.items(), key=lambda kv: kv[1]) if report.errors else ("", 0)
        progress.update(task, completed=report.index + 1)
        progress.console.print(f"layer {report.index:3d}  {report.seconds:6.2f}s  mean err {sum(report.errors.values()) / max(len(report.errors), 1):.4f}"
                               f"  worst {worst[0]} {worst[1]:.4f}" + "".join(f"\n    {n}" for n in report.notes if "Cholesky" in n), highlight=False)

    with progress:
        summary = quantize_model(model, out, cfg, overwrite=overwrite, resume=resume, on_layer=on_layer,
                                 log=lambda m: err.print(f"[dim]{m}[/]", highlight=False, soft_wrap=True))
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=f"{method} -> {out}", title_justify="left")
    for col in ("format", "quantized linears", "stored unpacked", "mean rel. error", "size on disk", "time"):
        table.add_column(col, justify="right")
    mean = summary.get("mean_error")
    table.add_row(summary["format"], str(summary["quantized_linears"]), str(len(summary.get("unpacked_linears", []))),
                  "-" if mean is None else f"{mean:.4f}", fmt_bytes(summary["size_after"]), f"{summary['seconds']:.1f}s")
    console.print(table)


@main.command()
@_quant_options(None)
def quantize(**kw):
    """Quantize MODEL with any method; the per-method commands are shortcuts.

    \b
    Examples:
      quantool quantize ./model --method gptq --bits 4 -o ./model-gptq
      quantool quantize ./model --method nf4 -o ./model-nf4
    """
    _quantize(**kw)


def _method_command(method: str, summary: str, example: str):
    @main.command(name=method, help=f"{summary}\n\n\b\nExample:\n  {example}", short_help=summary.split(":")[0])
    @_quant_options(method)
    def command(**kw):
        _quantize(method=method, **kw)
    return command


_method_command("gptq", "GPTQ (Frantar et al. 2022): Hessian-aware rounding, layer by layer, streamed from the safetensors "
                "shards (one layer in memory); GPTQ v1 checkpoint.",
                "quantool gptq ./model --bits 4 --group-size 128 -o ./model-gptq")
_method_command("awq", "AWQ (Lin et al. 2023): activation-aware scales and clipping, layer by layer, streamed; AWQ GEMM checkpoint.",
                "quantool awq ./model --bits 4 -o ./model-awq")
_method_command("rtn", "Round-to-nearest baseline, group-wise, streamed layer by layer (no calibration); GPTQ v1 checkpoint.",
                "quantool rtn ./model --bits 4 --group-size 128 -o ./model-rtn")
_method_command("int8", "LLM.int8 (bitsandbytes, outlier threshold 6.0): loads the whole model, as transformers does; "
                "transformers' bnb serialization.",
                "quantool int8 ./model -o ./model-int8")
_method_command("nf4", "QLoRA NF4 with double quantization, blocksize 64 (bitsandbytes): loads the whole model, as "
                "transformers does.",
                "quantool nf4 ./model -o ./model-nf4")


# -- bench, report, run ------------------------------------------------------------------------------

def _ints(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise QuantoolError(f"expected a comma list of integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise QuantoolError(f"batch sizes must be positive, got {value!r}")
    return out


def _step_progress(disable: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, disable=disable)
    tasks = {}

    def on_step(name, done, total):
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done)

    return progress, on_step


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(), help="Results JSON file.")
@click.option("--ppl/--no-ppl", default=True, show_default=True, help="Measure perplexity.")
@click.option("--speed", is_flag=True, help="Measure prefill/decode throughput, time to first token, peak memory.")
@click.option("--text", help="Evaluation text file (default: quantool's shipped text).")
@click.option("--text-range", default="0,1", show_default=True, help="Fractions of the text's tokens to use, e.g. 0.5,1 (keep it disjoint from calibration).")
@click.option("--ctx", default=2048, show_default=True, type=int, help="Window length (capped at the model's maximum).")
@click.option("--stride", type=int, help="Sliding-window evaluation with this stride.")
@click.option("--max-tokens", type=int, help="Evaluate at most this many tokens.")
@click.option("--batch", default=8, show_default=True, type=int, help="Windows per forward pass.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Batch sizes for --speed.")
@click.option("--prompt", default=128, show_default=True, type=int, help="Prompt tokens for --speed.")
@click.option("--new-tokens", default=32, show_default=True, type=int, help="Generated tokens for --speed.")
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--kernel", default="auto", show_default=True, type=click.Choice(["auto", "tinygemm", "dequant"]),
              help="Low-bit kernel for GPTQ/AWQ/RTN checkpoints in --speed.")
@click.option("--device", default="auto", show_default=True)
def bench(models, out, ppl, speed, text, text_range, ctx, stride, max_tokens, batch, batch_sizes, prompt, new_tokens, repeats, kernel, device):
    """Perplexity and speed of MODEL (the fp16 baseline) and quantized variants, on the same tokens.

    \b
    Examples:
      quantool bench ./model ./model-gptq ./model-awq -o results.json
      quantool bench ./model ./model-gptq --speed --no-ppl --batch-sizes 1,8 -o speed.json
    """
    from pathlib import Path

    from quantool.atomic import write_json
    from quantool.bench import BenchConfig, run_bench
    from quantool.report import fmt_or_dash, rows

    lo, hi = _fractions(text_range, "--text-range")
    if not ppl and not speed:
        raise QuantoolError("nothing to measure: drop --no-ppl or add --speed")
    cfg = BenchConfig(ppl=ppl, speed=speed, text=text, ctx=ctx, stride=stride, batch=batch, max_tokens=max_tokens,
                      batch_sizes=_ints(batch_sizes), prompt=prompt, new_tokens=new_tokens, repeats=repeats, device=device,
                      kernel=kernel, text_range=(lo, hi))
    progress, on_step = _step_progress(False)
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


@main.command()
@click.argument("results", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(), help="Markdown file; plots are written beside it.")
def report(results, out):
    """Turn bench results into a Markdown comparison with plots (and show it here).

    \b
    Example:
      quantool report results.json -o reports/stories260k.md
    """
    from pathlib import Path

    from rich.markdown import Markdown

    from quantool.bench import read_results
    from quantool.report import write_report

    datas = [read_results(Path(r)) for r in results]
    written = write_report(datas, Path(out))
    console.print(Markdown(Path(out).read_text()))
    console.print(f"wrote {', '.join(str(p) for p in written)}")


@main.command(name="run")
@click.argument("recipe")
@click.argument("model")
@click.option("--workdir", default="quantool-runs", show_default=True, type=click.Path(), help="Where quantized models and results go.")
@click.option("--overwrite", is_flag=True, help="Re-quantize even if an output exists.")
def run_cmd(recipe, model, workdir, overwrite):
    """Run a recipe (quantize -> bench -> report) on MODEL.

    \b
    Examples:
      quantool run recipes/w4g128-gptq.yaml ./model
      quantool run recipes/compare-all.yaml ./model --workdir runs/
    """
    from pathlib import Path

    from quantool.recipes import load_recipe, run_recipe

    r = load_recipe(recipe)
    progress, on_step = _step_progress(False)
    with progress:
        written = run_recipe(r, model, Path(workdir), overwrite=overwrite, log=lambda m: err.print(f"[dim]{m}[/]", highlight=False),
                             on_step=on_step)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


# -- qat ---------------------------------------------------------------------------------------------

@main.command()
@click.argument("model")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output directory (GPTQ v1 layout).")
@click.option("--data", required=True, type=click.Path(), help="Training text (.txt or .jsonl).")
@click.option("--data-range", default="0,1", show_default=True, help="Fractions of --data's tokens to train on, e.g. 0,0.5.")
@click.option("--bits", default=4, show_default=True, type=int)
@click.option("--group-size", default=32, show_default=True, type=int)
@click.option("--sym/--asym", default=True, show_default=True)
@click.option("--steps", default=200, show_default=True, type=int)
@click.option("--lr", type=float, help="Learning rate (default 1e-4 full, 1e-3 LoRA).")
@click.option("--batch", default=8, show_default=True, type=int)
@click.option("--seq", default=256, show_default=True, type=int)
@click.option("--lora-rank", default=0, show_default=True, type=int, help="0: full QAT; R: LoRA-QAT with rank R (base frozen).")
@click.option("--lora-alpha", type=float, help="LoRA alpha (default 2 x rank).")
@click.option("--act-bits", type=int, help="Also fake-quantize linear inputs per token (8).")
@click.option("--eval-text", type=click.Path(), help="Text for perplexity before/after (disjoint from the training range!).")
@click.option("--eval-range", default="0,1", show_default=True, help="Fractions of --eval-text's tokens to evaluate.")
@click.option("--eval-tokens", default=50000, show_default=True, type=int, help="At most this many evaluation tokens.")
@click.option("--save-every", default=50, show_default=True, type=int)
@click.option("--no-fake-quant", is_flag=True, help="Control run: fine-tune without fake quantization, then quantize the same way.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--resume", is_flag=True, help="Continue from the last saved training state in OUT.partial/.")
@click.option("--json", "as_json", is_flag=True)
def qat(model, out, data, data_range, bits, group_size, sym, steps, lr, batch, seq, lora_rank, lora_alpha, act_bits,
        eval_text, eval_range, eval_tokens, save_every, no_fake_quant, seed, device, overwrite, resume, as_json):
    """Quantization-aware fine-tuning that ends in a real quantized checkpoint.

    \b
    Examples:
      quantool qat ./model --data train.txt --bits 4 --group-size 32 --steps 500 -o ./model-qat
      quantool qat ./model --data train.txt --lora-rank 16 --eval-text val.txt -o ./model-qat-lora
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from quantool.qat import QATConfig, train

    cfg = QATConfig(data=data, bits=bits, group_size=group_size, sym=sym, steps=steps, lr=lr, batch=batch, seq=seq,
                    lora_rank=lora_rank, lora_alpha=lora_alpha, act_bits=act_bits, save_every=save_every, seed=seed,
                    data_range=_fractions(data_range, "--data-range"), device=device, fake_quant=not no_fake_quant)
    from quantool.eval.perplexity import evaluator

    eval_fn = evaluator(eval_text, _fractions(eval_range, "--eval-range"), max_tokens=eval_tokens) if eval_text else None

    progress = Progress(TextColumn("[bold]QAT[/]"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
                        console=err, disable=as_json)
    task = progress.add_task("qat", total=steps, loss=float("nan"), tps=0.0)
    with progress:
        summary = train(model, out, cfg, eval_fn=eval_fn, overwrite=overwrite, resume=resume,
                        on_step=lambda s, n, loss, tps: progress.update(task, completed=s, loss=loss, tps=tps),
                        log=lambda m: err.print(f"[dim]{m}[/]", highlight=False))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    console.print(f"training loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} over {summary['steps']} steps")
    if summary["ppl_before"] is not None:
        console.print(f"perplexity: fp {summary['ppl_before']:.4f}, fake-quantized {summary['ppl_fake_quant']:.4f}, "
                      f"converted {bits}-bit checkpoint {summary['ppl_after']:.4f}")
    console.print(f"wrote {out}")


def _fractions(value: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise QuantoolError(f"{flag} takes two fractions like 0,0.5, got {value!r}") from None
    if not (0 <= lo < hi <= 1):
        raise QuantoolError(f"{flag} needs 0 <= start < end <= 1, got {value!r}")
    return lo, hi
