"""Fit a job to a GPU: choose each linear's bit width so that the planned peak of the job fits the budget, with the
least predicted loss, then write that mixed-precision GPTQ checkpoint.

The planner (`quantool.memory`) gives the job's peak as a function of the bytes the quantized linears take (every
other term, KV cache and activations included, does not depend on them); `fit.sensitivity` measures each linear's
error at each candidate width; `quant.allocate` picks the widths. With `--kv-dtype auto` the KV cache's dtype is
one more choice, its rounding error measured in the same units.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quantool.errors import QuantoolError
from quantool.formats import LAYOUTS
from quantool.formats import gptq as gptq_layout
from quantool.memory.job import Job, Method
from quantool.memory.plan import ALLOCATOR_CACHE, CUDA_CONTEXT_BYTES, estimate
from quantool.memory.shapes import ModelShape, resolve_model
from quantool.ptq.config import Method as PTQMethod
from quantool.ptq.config import PTQConfig
from quantool.quant.allocate import Option, allocate
from quantool.util.config import opt
from quantool.util.units import fmt_bytes, parse_bytes


@dataclass
class FitConfig:
    candidates: tuple[int, ...] = opt((2, 3, 4, 8), "Candidate bit widths, e.g. 3,4,8 (one value: every linear at that width).",
                                      flag="--bits")
    budget: str | None = opt(None, "Memory the job may allocate at its peak: bytes or a size such as 20GiB.", type=str)
    gpu: str | None = opt(None, "A card (h100-80gb, rtx4090, 24GiB ...): its memory less the CUDA context and the allocator's "
                          "reserve that `quantool memory` shows.", type=str)
    kv_dtype: str | None = opt(None, "KV-cache dtype; auto: the weights' dtype or fp8, whichever leaves the least predicted loss.",
                               choices=("auto", "bf16", "fp16", "fp32", "fp8"))
    sensitivity: str = opt("gptq", "How each linear's loss at a width is measured: gptq (the error left after GPTQ, through its "
                           "Hessian) or rtn (rounding's error through the same Hessian; no GPTQ solve).", choices=("gptq", "rtn"))
    quantizer: str = opt("gptq", "How the chosen widths are applied: gptq or rtn.", choices=("gptq", "rtn"))
    mix: str = opt("neighbours", "Which candidate widths a linear may take: neighbours (the widest width that fits for every "
                   "linear and the next wider one) or all (docs/fit.md: all let the choice trade 2- for 8-bit linears, "
                   "and lost).", choices=("neighbours", "all"))
    sensitivities: str | None = opt(None, "JSON file: reused when it holds sensitivities measured with these settings, else "
                                    "written (a budget sweep measures once).", type=str)

    def budget_bytes(self) -> int:
        if (self.budget is None) == (self.gpu is None):
            raise QuantoolError("give exactly one of --budget SIZE (e.g. 20GiB) or --gpu NAME|SIZE")
        if self.budget is not None:
            return parse_bytes(self.budget)
        from quantool.memory.gpus import lookup

        return int((lookup(self.gpu or "").bytes - CUDA_CONTEXT_BYTES) / (1 + ALLOCATOR_CACHE))


def _options(units: dict[str, dict], candidates: tuple[int, ...], group: int, layout: Any) -> dict[str, list[tuple[int, Option]]]:
    """Each linear's (bits, bytes as stored, measured loss), for the widths its layout can hold; a linear it can hold
    at none stays in 16 bits."""
    out = {}
    for name, unit in units.items():
        o, i = unit["out"], unit["in"]
        options = [(b, Option(gptq_layout.stored_bytes(b, o, i, group), unit["errors"][b])) for b in candidates
                   if layout.cannot_hold(b, o, i) is None]
        out[name] = options or [(16, Option(2 * o * i, 0.0))]
    return out


def neighbours(options: dict[str, list[tuple[int, Option]]], candidates: tuple[int, ...], room: int) -> dict[str, list[tuple[int, Option]]]:
    """Each linear's options narrowed to two widths: the widest candidate that fits `room` bytes on every linear, and the
    next wider one (a linear that holds neither keeps its own)."""
    def uniform(b: int) -> int:
        return sum(next((o.bytes for w, o in opts if w == b), min(o.bytes for _, o in opts)) for opts in options.values())

    widths = sorted(candidates)
    fitting = [b for b in widths if uniform(b) <= room]
    low = fitting[-1] if fitting else widths[0]
    keep = {low, *widths[widths.index(low) + 1:][:1]}
    return {n: [(b, o) for b, o in opts if b in keep] or opts for n, opts in options.items()}


def choose(shape: ModelShape, job: Job, units: dict[str, dict], kv_errors: dict[str, float], fcfg: FitConfig, group: int,
           budget: int) -> dict:
    """The widths (and KV dtype) of least summed loss whose planned peak fits `budget`; raises when none does."""
    every = _options(units, fcfg.candidates, group, LAYOUTS["gptq"])
    names = list(every)
    kv_choices = [None, "fp8"] if fcfg.kv_dtype == "auto" else [fcfg.kv_dtype]
    best: dict | None = None
    smallest = None
    for kv in kv_choices:
        j = replace(job, kv_dtype=kv)
        fixed = estimate(replace(shape, quantized_linear_bytes=1), j).peak_bytes - 1  # the peak is affine in the linears' bytes
        options = every if fcfg.mix == "all" else neighbours(every, fcfg.candidates, budget - fixed)
        picked = allocate([[o for _, o in options[n]] for n in names], budget - fixed)
        least = fixed + sum(min(o.bytes for _, o in options[n]) for n in names)
        smallest = least if smallest is None else min(smallest, least)
        if picked is None:
            continue
        loss = sum(options[n][k][1].loss for n, k in zip(names, picked)) + (kv_errors.get(kv, 0.0) if kv else 0.0)
        if best is None or loss < best["loss"]:
            best = {"loss": loss, "kv_dtype": kv, "bits": {n: options[n][k][0] for n, k in zip(names, picked)},
                    "linear_bytes": sum(options[n][k][1].bytes for n, k in zip(names, picked))}
    if best is None:
        raise QuantoolError(f"even {min(fcfg.candidates)} bits everywhere needs {fmt_bytes(smallest or 0)} ({smallest:,} bytes) at "
                            f"the peak, and {fmt_bytes(budget)} ({budget:,} bytes) is available: shorten --seq, lower --batch, "
                            f"or add a smaller width to --bits")
    quantized = {n: b for n, b in best["bits"].items() if b != 16}
    weights = sum(units[n]["out"] * units[n]["in"] for n in quantized)
    avg = sum(b * units[n]["out"] * units[n]["in"] for n, b in quantized.items()) / max(weights, 1)
    note = f"GPTQ as stored, {8 * best['linear_bytes'] / max(sum(u['out'] * u['in'] for u in units.values()), 1):.2f} bits per weight with scales"
    plan = estimate(replace(shape, quantized_linear_bytes=best["linear_bytes"], quantized_note=note), replace(job, kv_dtype=best["kv_dtype"]))
    if plan.peak_bytes > budget:
        raise QuantoolError(f"the chosen widths plan {fmt_bytes(plan.peak_bytes)}, over the budget {fmt_bytes(budget)}: the job's "
                            f"peak moved to another phase; lower the budget slightly and rerun")
    return {**best, "avg_bits": avg, "plan": plan}


def fit(model_path: str, out: str | Path | None, fcfg: FitConfig, job: Job, ptq: PTQConfig, overwrite: bool = False,
        resume: bool = False, on_layer: Callable[..., None] | None = None, on_step: Callable[[int, int], None] | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Measure, choose and (unless `out` is None: a dry run) write the checkpoint; returns the summary."""
    from quantool.device import resolve_device
    from quantool.fit.sensitivity import Sensitivities, measure, measured_with
    from quantool.model.source import ModelSource

    if job.method not in (Method.INFERENCE, Method.LORA):
        raise QuantoolError(f"quantool fit plans inference or lora on the quantized model, not --method {job.method}")
    if job.quant != "none":
        raise QuantoolError("quantool fit chooses the base's quantization itself: drop --quant")
    budget = fcfg.budget_bytes()
    if fcfg.gpu:
        from quantool.memory.gpus import lookup

        card = lookup(fcfg.gpu)
        if card.compute_capability:  # the card's cuBLAS workspace and attention kernels, as `quantool memory --gpu`
            job = replace(job, compute_capability=card.compute_capability)
    job.validate()
    ptq = replace(ptq, method=PTQMethod(fcfg.quantizer)).validate()
    for bits in fcfg.candidates:
        replace(ptq, bits=bits).validate()
    source = ModelSource(model_path)
    shape = resolve_model(str(source.folder))
    settings = measured_with(ptq, fcfg.candidates, fcfg.sensitivity)
    path = Path(fcfg.sensitivities) if fcfg.sensitivities else None
    sens = Sensitivities.load(path) if path and path.exists() else None
    if sens is not None and {k: sens.settings.get(k) for k in settings} != settings:
        log(f"{path} was measured with other settings: measuring again")
        sens = None
    if sens is None:
        sens = measure(source, replace(ptq, method=PTQMethod.GPTQ), fcfg.candidates, fcfg.sensitivity, resolve_device(ptq.device),
                       on_layer=on_step or (lambda i, n: None), log=log)
        if path:
            sens.save(path)
    choice = choose(shape, job, sens.units, sens.kv, fcfg, sens.settings["group"], budget)
    widths = Counter(choice["bits"].values())
    summary = {"budget_bytes": budget, "peak_bytes": choice["plan"].peak_bytes, "device_bytes": choice["plan"].device_bytes,
               "bits": choice["bits"], "avg_bits": choice["avg_bits"], "kv_dtype": choice["kv_dtype"] or str(job.weights_dtype),
               "linear_bytes": choice["linear_bytes"], "predicted_loss": choice["loss"], "widths": dict(widths),
               "sensitivity": fcfg.sensitivity, "kv_errors": sens.kv, "peak_phase": choice["plan"].phase}
    if out is None:
        return summary
    module_bits = {n: b for n, b in choice["bits"].items() if b != 16}
    cfg = replace(ptq, bits=Counter(module_bits.values()).most_common(1)[0][0], module_bits=module_bits)
    from quantool.ptq.pipeline import quantize_model

    written = quantize_model(model_path, Path(out), cfg, overwrite=overwrite, resume=resume, on_layer=on_layer, log=log)
    after = estimate(resolve_model(str(out)), replace(job, kv_dtype=choice["kv_dtype"]))
    summary.update(written_peak_bytes=after.peak_bytes, size_after=written["size_after"], seconds=written["seconds"])
    return summary
