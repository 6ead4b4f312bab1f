"""YAML recipes: quantize with these settings -> bench -> report, validated against the config dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quantool.errors import QuantoolError
from quantool.eval.bench import BenchConfig, run_bench
from quantool.eval.report import write_report
from quantool.ptq import PTQConfig, quantize_model
from quantool.util.atomic import write_json


@dataclass
class Recipe:
    name: str
    quantize: list[PTQConfig]
    bench: BenchConfig = field(default_factory=BenchConfig)
    report: str = "reports/{name}.md"
    description: str = ""


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise QuantoolError(f"{where} must be a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise QuantoolError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise QuantoolError(f"{where}: {exc}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise QuantoolError(f"recipe {path} does not exist (see recipes/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise QuantoolError(f"{where}: not valid YAML ({problem}); fix that line of the recipe") from None
    if not isinstance(raw, dict):
        raise QuantoolError(f"{path} must hold a mapping with name, quantize, bench, report")
    allowed = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise QuantoolError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    steps = raw.get("quantize") or []
    if not isinstance(steps, list):
        raise QuantoolError(f"{path}: quantize must be a list of settings (one per quantized model)")
    recipe = Recipe(name=str(raw.get("name") or path.stem),
                    quantize=[_build(PTQConfig, s, f"{path}: quantize[{i}]").validate() for i, s in enumerate(steps)],
                    bench=_build(BenchConfig, raw.get("bench") or {}, f"{path}: bench"),
                    report=str(raw.get("report", "reports/{name}.md")), description=str(raw.get("description", "")))
    return recipe


def label(cfg: PTQConfig) -> str:
    if cfg.method in ("int8", "nf4"):
        return cfg.method
    g = "pc" if cfg.group_size == -1 else f"g{cfg.group_size}"
    return f"{cfg.method}-w{cfg.bits}{g}" + ("" if cfg.order == "natural" else f"-{cfg.order}order")


def run_recipe(recipe: Recipe, model: str, workdir: Path, overwrite: bool = False, log: Callable[[str], None] = print,
               on_layer: Callable[..., None] | None = None, on_step: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Quantize (reusing finished outputs), bench everything against the baseline, write the report."""
    paths = [model]
    for cfg in recipe.quantize:
        out = workdir / f"{Path(model).name}-{label(cfg)}"
        if out.exists() and not overwrite:
            log(f"reusing {out}")
        else:
            log(f"quantizing {label(cfg)} -> {out}")
            quantize_model(model, out, cfg, overwrite=overwrite, on_layer=on_layer, log=log)
        paths.append(str(out))
    results = run_bench(paths, recipe.bench, on_step=on_step)
    results["recipe"] = recipe.name
    json_path = workdir / f"{recipe.name}.json"
    write_json(results, json_path)
    return [json_path, *write_report([results], Path(recipe.report.format(name=recipe.name)))]
