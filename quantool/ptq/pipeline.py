"""Post-training quantization of a causal LM, one decoder layer at a time, streamed from its safetensors
shards and written shard by shard, so memory holds about one layer plus the calibration state.

The run works in OUT.partial/ (`util.outdir`): checkpoint/ receives the shards as layers finish, and
progress.json records, after each step, what is safely written and which inputs file feeds the next layer.
Every step after the last layer (the tensors outside the layers, closing and naming the shards, the configs,
quantool.json, publishing) is either recorded in progress.json or repeatable, so `resume` continues a run
killed at any moment, without reading back finished layers. OUT appears when complete.
"""

from __future__ import annotations

import errno
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from quantool import __version__, text
from quantool.device import computes_bf16, default_dtype, resolve_device
from quantool.errors import QuantoolError
from quantool.formats import LAYOUTS, Layout, LayoutConfig, ModuleQuant, model_group
from quantool.formats.checkpoint import checkpoint_tensors, finalize
from quantool.formats.rules import split_at_layer
from quantool.formats.shards import ShardedWriter
from quantool.model.experts import eager_experts, fused_params
from quantool.model.layerwise import capture_inputs, run_layer, to_device
from quantool.model.source import ModelSource, open_weights
from quantool.model.structure import LayerMap, decoder_layers, has_fused_params, is_linear, layer_kind, map_layer, unit_shape
from quantool.ptq import awq, bnb, gptq, rtn
from quantool.ptq.config import BITSANDBYTES, PTQConfig
from quantool.ptq.layer_report import LayerReport
from quantool.ptq.names import layer_outputs
from quantool.ptq.refine import output_loss, refine_layer
from quantool.util import allocator, faults, outdir
from quantool.util.atomic import torch_save, write_json

DRIVERS = {"rtn": rtn, "gptq": gptq, "awq": awq}
PROGRESS = "progress.json"


def quantize_model(model_path: str, out: str | Path, cfg: PTQConfig, overwrite: bool = False, resume: bool = False,
                   on_layer: Callable[[LayerReport, int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Quantize model_path into OUT; returns the summary also stored as OUT/quantool.json."""
    cfg.validate()
    out = Path(out)
    device = resolve_device(cfg.device)
    if cfg.refine_bf16 is None:  # resolved, so quantool.json records what ran
        cfg.refine_bf16 = cfg.refine > 0 and computes_bf16(device)
    source = ModelSource(model_path)
    with _disk_errors(outdir.work_folder(out)):
        work, done = outdir.prepare(out, overwrite, resume)
        if done is not None:  # killed after publishing, while removing the working folder
            outdir.publish_done(work)
            log(f"{out} was already complete; removed the working folder")
            return done
        with outdir.discard_unless_started(work, PROGRESS):
            ckpt = work / "checkpoint"
            meta = {"version": __version__, "run_id": outdir.run_id(work), "config": asdict(cfg), "source": str(model_path)}
            if cfg.method in BITSANDBYTES:
                start = time.perf_counter()
                summary = bnb.quantize(source, ckpt, cfg.method, device, log)
                summary.update(seconds=time.perf_counter() - start, device=str(device))
                finalize(ckpt, {**meta, **summary})
            else:
                summary = quantize_layers(source, work, cfg, device, resume, on_layer or (lambda r, n: None), log, meta)
        outdir.publish(work, out, overwrite)
    summary["size_after"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return summary


@contextmanager
def _disk_errors(work: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QuantoolError(f"the disk filled up while writing {work}: free space there, then rerun with --resume "
                                f"(finished layers are kept)") from None
        raise


def _commit(work: Path, progress: dict, writer: ShardedWriter, point: str) -> None:
    """Record progress (with what the writer has safely on disk), then let the writer drop what that frees."""
    progress["writer"] = writer.state()
    write_json(progress, work / PROGRESS)
    faults.point(point)
    writer.committed()


def quantize_layers(source: ModelSource, work: Path, cfg: PTQConfig, device: torch.device, resume: bool = False,
                    on_layer: Callable[[LayerReport, int], None] = lambda r, n: None, log: Callable[[str], None] = print,
                    meta: dict | None = None) -> dict:
    """Quantize every decoder layer in turn into work/checkpoint (shards, configs, tokenizer); returns the summary."""
    allocator.keep_large_buffers_mapped()
    started = time.perf_counter()
    model, weights = open_weights(source, default_dtype(device), device, log)
    model.eval()
    eager_experts(model)
    prefix, layers = decoder_layers(model)
    layout = LAYOUTS[cfg.format]
    progress = _load_progress(work) if resume else {}
    if progress and progress["config"] != asdict(cfg):
        raise QuantoolError(f"{work} was started with other settings; rerun with the same options, or --overwrite to start over")
    progress = progress or {"config": asdict(cfg), "done": -1, "elapsed": 0.0, "calibration": {}, "reports": [], "modules": {},
                            "unpacked": {}, "experts": {}}
    ckpt = work / "checkpoint"
    group = quantization_group(layers, cfg, layout)
    spec = cfg.spec().with_group(group)
    writer = ShardedWriter(ckpt, state=progress.get("writer"))
    before = progress["elapsed"]  # seconds spent by earlier, interrupted runs
    elapsed = lambda: before + time.perf_counter() - started
    first = progress["done"] + 1
    x = kwargs = x_fp = None  # x_fp: the full-precision model's hidden states (--refine's model target)
    probe = None  # RTN has no calibration states; MoE layers still need one real input to find their experts
    if cfg.calibrated and first < len(layers):
        if first == 0:
            x, kwargs, progress["calibration"] = capture_calibration(source, model, prefix, layers, weights, cfg, device, log)
            x_fp = x if cfg.model_targets else None
            torch_save((x, kwargs, x_fp), work / "inputs-0000.pt")
        else:
            x, kwargs, x_fp = torch.load(work / progress["inputs"])
    elif any(has_fused_params(layer) for layer in layers[first:]):
        probe = capture_calibration(source, model, prefix, layers, weights, replace(cfg, nsamples=1, seqlen=16, calib=None), device, log)[:2]
    maps: dict[str, LayerMap] = {}
    for i in range(first, len(layers)):
        t0 = time.perf_counter()
        layer = layers[i]
        weights.load(layer, f"{prefix}.{i}.")
        lmap = layer_map(layer, *(probe or (x, kwargs)), cfg, device, maps)
        specs = {n: cfg.spec_for(f"{prefix}.{i}.{n}").with_group(group) for n in lmap.linears}
        if cfg.refine:
            assert x is not None and kwargs is not None  # a refined run is calibrated
            quantized, report, y, x_fp = quantize_and_refine(layer, lmap, x, kwargs, specs, cfg, device, cfg.seed + i, x_fp)
        else:
            quantized, report, y = DRIVERS[cfg.method].quantize_layer(layer, lmap, x, kwargs, specs, cfg, device)
        plain, named, origin, experts = layer_outputs(layer, lmap, f"{prefix}.{i}.", quantized, weights)
        bits = {name: specs[unit].bits for name, unit in origin.items()}
        tensors, unpacked = checkpoint_tensors(plain, named, cfg.format, bits)
        writer.add(tensors)
        faults.point("layer.written")
        progress["unpacked"].update(unpacked)
        progress["modules"].update({n: bits[n] for n in named if n not in unpacked})
        progress["experts"].update(experts)
        weights.drop(layer)
        del quantized, tensors, plain, named  # nothing of this layer outlives it
        allocator.release_free_memory()
        report.index, report.seconds = i, time.perf_counter() - t0
        progress["reports"].append(asdict(report))
        if y is not None:
            x, progress["inputs"] = y, f"inputs-{i + 1:04d}.pt"
            torch_save((x, kwargs, x_fp), work / progress["inputs"])
        progress.update(done=i, elapsed=elapsed())
        _commit(work, progress, writer, "layer.committed")
        if y is not None:
            (work / f"inputs-{i:04d}.pt").unlink(missing_ok=True)
        on_layer(report, len(layers))
    if not progress.get("outside"):
        for name, t in weights.stored_outside(prefix):
            writer.add(checkpoint_tensors({name: t}, {}, cfg.format, cfg.bits)[0])
        faults.point("outside.written")
        progress.update(outside=True, elapsed=elapsed())
        _commit(work, progress, writer, "outside.committed")
    if not writer.finished:
        writer.finish()
        _commit(work, progress, writer, "shards.finished")
    writer.publish_names()
    for note in _notes(progress, cfg, group):
        log(note)
    reports = [LayerReport(**r) for r in progress["reports"]]
    errors = [e for r in reports for e in r.errors.values()]
    summary = {"method": cfg.method, "format": cfg.format, "layers": progress["reports"],
               "quantized_linears": sum(len(r.errors) for r in reports), "unpacked_linears": sorted(progress["unpacked"]),
               "mean_error": sum(errors) / len(errors) if errors else None, **progress["calibration"],
               "seconds": elapsed(), "device": str(device)}
    widths = Counter(progress["modules"].values())
    lcfg = LayoutConfig(widths.most_common(1)[0][0] if widths else cfg.bits, group, spec.sym, cfg.order == "act", cfg.damp,
                        cfg.static_groups, {n: ModuleQuant(b, group) for n, b in progress["modules"].items()}, progress["unpacked"],
                        progress["experts"])
    finalize(ckpt, {**(meta or {}), **summary}, source.config.to_dict(), cfg.format, lcfg, source.tokenizer(),
             model.generation_config)
    return summary


def quantize_and_refine(layer: torch.nn.Module, lmap: LayerMap, x: torch.Tensor, kwargs: dict, specs: dict, cfg: PTQConfig,
                        device: torch.device, seed: int, x_fp: torch.Tensor | None = None
                        ) -> tuple[dict, LayerReport, torch.Tensor, torch.Tensor | None]:
    """The method, then --refine's reconstruction against the full-precision layer's outputs on x_fp (the
    full-precision model's hidden states) where given, else on x. Returns the quantized weights, the report, the next
    layer's inputs (the refined layer's outputs, except for AWQ, which passes full-precision ones on) and x_fp's next."""
    target = None if cfg.method == "awq" else run_layer(layer, x if x_fp is None else x_fp, kwargs, device, cfg.chunk_tokens)
    rounded: dict[str, torch.Tensor] = {}
    quantized, report, y = DRIVERS[cfg.method].quantize_layer(layer, lmap, x, kwargs, specs, cfg, device, rounded=rounded)
    # GPTQ's outputs are the quantized layer's on x: their error is refine's starting point (AWQ's are its target)
    settings = cfg.refine_settings()
    before = None if y is None or target is None else output_loss(y, target, settings.token_power)
    target = y if target is None else target
    del y  # GPTQ's outputs are replaced by the refined layer's
    refined_y = refine_layer(layer, lmap, x, kwargs, target, quantized, rounded, specs, settings, seed, device,
                             cfg.chunk_tokens, report, before)
    return quantized, report, (target if cfg.method == "awq" else refined_y), (None if x_fp is None else target)


def capture_calibration(source: ModelSource, model: torch.nn.Module, prefix: str, layers: torch.nn.ModuleList, weights: Any,
                        cfg: PTQConfig, device: torch.device, log: Callable[[str], None]) -> tuple[torch.Tensor, dict, dict]:
    """Calibration windows through the modules before the first layer: the hidden states entering it."""
    tok = source.tokenizer()
    seqlen = text.fit_context(cfg.seqlen, source.config)
    ids = text.tokenize(tok, text.read_text(cfg.calib))
    nsamples = cfg.nsamples
    if cfg.method == "awq" and nsamples * seqlen > cfg.awq_search_tokens:
        nsamples = max(1, cfg.awq_search_tokens // seqlen)
        log(f"AWQ uses {nsamples} of the {cfg.nsamples} calibration windows ({nsamples * seqlen} tokens, "
            f"--awq-search-tokens {cfg.awq_search_tokens})")
    samples = text.windows(ids, nsamples, seqlen, cfg.seed, log)
    outside = weights.outside_keys(prefix)
    weights.load(model, "", outside)
    x, kwargs = capture_inputs(model, layers, samples, device)
    weights.drop(model, outside)
    calib = {"calibration": text.DEFAULT if cfg.calib is None else cfg.calib, "seqlen": seqlen,
             "calibration_windows": len(samples)}
    return x, kwargs, calib


def layer_map(layer: torch.nn.Module, x: torch.Tensor | None, kwargs: dict | None, cfg: PTQConfig, device: torch.device,
              maps: dict[str, LayerMap]) -> LayerMap:
    """The layer's structure, probed with one real input, once per kind of layer (its class, linears and fused
    parameters), so models whose layers differ (dense then MoE, interleaved) are mapped per kind. RTN of a dense
    layer needs only its linears."""
    key = layer_kind(layer)
    if key in maps:
        return maps[key]
    if x is None:
        linears = [n for n, m in layer.named_modules() if is_linear(m)]
        lmap = LayerMap(linears, [[n] for n in linears])
    else:
        lmap = map_layer(layer, (x[:1].to(device),), to_device(kwargs, device), probe_pairs=cfg.method == "awq")
    if not lmap.linears:
        raise QuantoolError(f"no linear layer found in {type(layer).__name__}: cannot quantize this architecture")
    if cfg.method == "awq" and not lmap.pairs:
        raise QuantoolError(f"AWQ found no norm->linear or linear->linear pairs in {type(layer).__name__} "
                            f"(linears: {', '.join(lmap.linears[:8])}): use gptq or rtn for this architecture")
    maps[key] = lmap
    return lmap


def quantization_group(layers: torch.nn.ModuleList, cfg: PTQConfig, layout: Layout) -> int:
    """From the shapes alone, before any work: the one group size every quantized linear gets
    (`formats.model_group`); a fused experts' parameter counts with both of its matrix widths, since which is its
    input is found later, by probing."""
    shapes = [unit_shape(m) for layer in layers for m in layer.modules() if is_linear(m)]
    fused = [(a, b) for layer in layers[:1] for p in fused_params(layer) for a, b in (p.shape[-2:], p.shape[-2:][::-1])]
    group = model_group(layout, cfg.bits, shapes + fused, cfg.group_size)
    if group is None:
        reason = layout.cannot_hold(cfg.bits, *shapes[0])
        raise QuantoolError(f"the {cfg.format.upper()} layout at {cfg.bits} bits can hold none of this model's linears "
                            f"({reason}, ...): use " + ("gptq or rtn" if cfg.format == "awq" else "other --bits"))
    return group


def _kind(name: str) -> str:
    """A module's name within its layer, numbers (expert indices) left open: mlp.experts.*.down_proj."""
    return ".".join("*" if p.isdigit() else p for p in split_at_layer(name)[1].split("."))


def _notes(progress: dict, cfg: PTQConfig, group: int) -> list[str]:
    """What differs from what was asked: the group size, and one line per kind of linear kept unpacked."""
    notes = []
    if group != cfg.group_size:
        notes.append(f"--group-size {cfg.group_size} does not divide every quantized width: every linear uses groups of "
                     f"{group}, which does (loaders need groups that divide the width, and transformers' GPTQ loader takes "
                     f"one group size for all modules)")
    kinds: dict[str, set[str]] = {}
    for name, reason in progress["unpacked"].items():
        kinds.setdefault(reason, set()).add(_kind(name))
    notes += [f"{', '.join(sorted(names))}: the {cfg.format.upper()} layout cannot hold {reason}: stored as fp16 weights equal "
              f"to their quantized values" for reason, names in kinds.items()]
    return notes


def _load_progress(work: Path) -> dict:
    p = work / PROGRESS
    return json.loads(p.read_text()) if p.exists() else {}
