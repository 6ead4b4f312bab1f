"""Post-training quantization of a causal LM, one decoder layer at a time, streamed from its safetensors
shards and written shard by shard, so memory holds about one layer plus the calibration state.

The run works in OUT.partial/ (`workdir`): checkpoint/ receives the shards as layers finish, and
progress.json records, after each layer, what is safely written and which inputs file feeds the next
layer; `resume` carries on from there without reading back finished layers. OUT appears when complete.
"""

from __future__ import annotations

import errno
import json
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from quantool import __version__, allocator, workdir
from quantool.atomic import torch_save, write_json
from quantool.device import compute_dtype, resolve_device
from quantool.errors import QuantoolError
from quantool.formats import LAYOUTS
from quantool.formats.checkpoint import checkpoint_tensors, write_configs
from quantool.formats.shards import ShardedWriter
from quantool.model import calibration
from quantool.model.layerwise import capture_inputs, to_device
from quantool.model.source import ModelSource, open_weights
from quantool.model.structure import LayerMap, decoder_layers, map_layer
from quantool.ptq import awq, bnb, gptq, rtn
from quantool.ptq.config import BITSANDBYTES, CALIBRATED, PTQConfig
from quantool.ptq.report import LayerReport

DRIVERS = {"rtn": rtn, "gptq": gptq, "awq": awq}
SHARD_BYTES = 4 * 2**30  # largest output shard (transformers' own default for save_pretrained is 5 GB)


def quantize_model(model_path: str, out: str | Path, cfg: PTQConfig, overwrite: bool = False, resume: bool = False,
                   on_layer: Callable[[LayerReport, int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Quantize model_path into OUT; returns the summary also stored as OUT/quantool.json."""
    cfg.validate()
    out = Path(out)
    device = resolve_device(cfg.device)
    source = ModelSource(model_path)
    work = workdir.prepare(out, overwrite, resume)
    start = time.perf_counter()
    with workdir.discard_unless_started(work, "progress.json"), _disk_errors(work):
        ckpt = work / "checkpoint"
        if cfg.method in BITSANDBYTES:
            summary = bnb.quantize(source, ckpt, cfg.method, device)
        else:
            summary = quantize_layers(source, work, cfg, device, resume, on_layer or (lambda r, n: None), log)
        summary.update(seconds=time.perf_counter() - start, device=str(device))
        write_json({"version": __version__, "config": asdict(cfg), "source": str(model_path), **summary}, ckpt / "quantool.json")
    workdir.publish(work, out)
    summary["size_after"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return summary


@contextmanager
def _disk_errors(work: Path):
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QuantoolError(f"the disk filled up while writing {work}: free space there, then rerun with --resume "
                                f"(finished layers are kept)") from None
        raise


def quantize_layers(source: ModelSource, work: Path, cfg: PTQConfig, device: torch.device, resume: bool = False,
                    on_layer: Callable[[LayerReport, int], None] = lambda r, n: None, log: Callable[[str], None] = print) -> dict:
    """Quantize every decoder layer in turn into work/checkpoint (shards, configs, tokenizer); returns the summary."""
    allocator.keep_large_buffers_mapped()
    model, weights = open_weights(source, compute_dtype(device), device, log)
    model.eval()
    prefix, layers = decoder_layers(model)
    spec, driver = cfg.spec(), DRIVERS[cfg.method]
    progress = _load_progress(work) if resume else {}
    if progress and progress["config"] != asdict(cfg):
        raise QuantoolError(f"{work} was started with other settings; rerun with the same options, or --overwrite to start over")
    ckpt = work / "checkpoint"
    writer = ShardedWriter(ckpt, SHARD_BYTES, state=progress.get("writer"))
    first = progress.get("done", -1) + 1
    x = kwargs = None
    calib = progress.get("calibration", {})
    if cfg.method in CALIBRATED:
        if first == 0:
            x, kwargs, calib = _capture(source, model, prefix, layers, weights, cfg, device, log)
            torch_save((x, kwargs), work / "inputs-0000.pt")
        else:
            x, kwargs = torch.load(work / progress["inputs"])
    reports = [LayerReport(**r) for r in progress.get("reports", [])]
    unpacked: dict[str, str] = progress.get("unpacked", {})
    lmap = None
    for i in range(first, len(layers)):
        t0 = time.perf_counter()
        layer = layers[i]
        weights.load(layer, f"{prefix}.{i}.")
        if lmap is None:
            lmap = _map(layer, x, kwargs, cfg, device)
            for note in _partial_group_notes(layer, lmap, spec, cfg):
                log(note)
        quantized, report, y = driver.quantize_layer(layer, lmap, x, kwargs, spec, cfg, device)
        tensors, fallback = checkpoint_tensors({f"{prefix}.{i}.{k}": v for k, v in layer.state_dict().items()},
                                               {f"{prefix}.{i}.{n}": w for n, w in quantized.items()}, cfg.format, cfg.bits)
        writer.add(tensors)
        weights.drop(layer)
        del quantized, tensors
        allocator.release_free_memory()
        unpacked.update(fallback)
        report.index, report.seconds = i, time.perf_counter() - t0
        reports.append(report)
        inputs = progress.get("inputs")
        if y is not None:
            x, inputs = y, f"inputs-{i + 1:04d}.pt"
            torch_save((x, kwargs), work / inputs)
        progress = {"config": asdict(cfg), "done": i, "writer": writer.state(), "inputs": inputs, "calibration": calib,
                    "unpacked": unpacked, "reports": [asdict(r) for r in reports]}
        write_json(progress, work / "progress.json")
        if y is not None:
            (work / f"inputs-{i:04d}.pt").unlink(missing_ok=True)
        on_layer(report, len(layers))
    for name, t in weights.stored_outside(prefix):
        writer.add(checkpoint_tensors({name: t}, {}, cfg.format, cfg.bits)[0])
    writer.finish()
    qcfg = LAYOUTS[cfg.format].quantization_config(cfg.bits, cfg.group_size, spec.sym, cfg.order == "act", cfg.damp,
                                                   cfg.static_groups, sorted(unpacked))
    write_configs(ckpt, source.config.to_dict(), qcfg)
    source.tokenizer().save_pretrained(ckpt)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(ckpt)
    for note in _fallback_notes(unpacked, cfg):
        log(note)
    errors = [e for r in reports for e in r.errors.values()]
    return {"method": cfg.method, "format": cfg.format, "layers": [asdict(r) for r in reports],
            "quantized_linears": sum(len(r.errors) for r in reports), "unpacked_linears": sorted(unpacked),
            "mean_error": sum(errors) / len(errors) if errors else None, **calib}


def _capture(source, model, prefix, layers, weights, cfg: PTQConfig, device, log):
    """Calibration windows through the modules before the first layer: the hidden states entering it."""
    tok = source.tokenizer()
    seqlen = calibration.fit_context(cfg.seqlen, source.config)
    ids = calibration.tokenize(tok, calibration.read_text(cfg.calib))
    nsamples = cfg.nsamples
    if cfg.method == "awq" and nsamples * seqlen > cfg.awq_search_tokens:
        nsamples = max(1, cfg.awq_search_tokens // seqlen)
        log(f"AWQ uses {nsamples} of the {cfg.nsamples} calibration windows ({nsamples * seqlen} tokens, "
            f"--awq-search-tokens {cfg.awq_search_tokens})")
    samples = calibration.windows(ids, nsamples, seqlen, cfg.seed, log)
    outside = weights.outside_keys(prefix)
    weights.load(model, "", outside)
    x, kwargs = capture_inputs(model, layers, samples, device)
    weights.drop(model, outside)
    calib = {"calibration": calibration.DEFAULT if cfg.calib is None else cfg.calib, "seqlen": seqlen,
             "calibration_windows": len(samples)}
    return x, kwargs, calib


def _map(layer, x, kwargs, cfg: PTQConfig, device) -> LayerMap:
    """The layer's linears (RTN needs nothing more), or its full structure probed with one real input."""
    if x is None:
        linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        lmap = LayerMap(linears, [[n] for n in linears])
    else:
        lmap = map_layer(layer, (x[:1].to(device),), to_device(kwargs, device))
    if not lmap.linears:
        raise QuantoolError(f"no nn.Linear found in {type(layer).__name__}: cannot quantize this architecture")
    if cfg.method == "awq" and not lmap.pairs:
        raise QuantoolError(f"AWQ found no norm->linear or linear->linear pairs in {type(layer).__name__} "
                            f"(linears: {', '.join(lmap.linears)}): use gptq or rtn for this architecture")
    return lmap


def _fallback_notes(unpacked: dict[str, str], cfg: PTQConfig) -> list[str]:
    """One line per kind of linear (q_proj, ...) the layout stored unpacked, with the reason."""
    kinds: dict[str, set] = {}
    for prefix, reason in unpacked.items():
        kinds.setdefault(reason, set()).add(prefix.rsplit(".", 1)[-1])
    return [f"{', '.join(sorted(names))}: the {cfg.format.upper()} layout cannot hold {reason}; stored as fp16 weights "
            f"equal to their quantized values" for reason, names in kinds.items()]


def _partial_group_notes(layer, lmap: LayerMap, spec, cfg: PTQConfig) -> list[str]:
    """One line per input width that ends in a partial group, and which layouts and kernels can take it."""
    widths: dict[int, list[str]] = {}
    for name in lmap.linears:
        in_f = layer.get_submodule(name).in_features
        if in_f % spec.group_size_for(in_f):
            widths.setdefault(in_f, []).append(name.rsplit(".", 1)[-1])
    g = cfg.group_size
    where = ("the GPTQ layout stores it (g_idx); transformers + GPT-QModel load it, but vLLM's GPTQ kernels and "
             "quantool's int4 kernel need whole groups (quantool runs these layers as dequantize + matmul)"
             if cfg.format == "gptq" else "the AWQ layout has no g_idx, so these layers are stored unpacked (below)")
    return [f"{', '.join(names)}: {w} columns = {w // g} groups of {g} + a partial group of {w % g}; {where}. "
            f"(--group-size {_dividing_group(w, g)} divides {w}.)" for w, names in widths.items()]


def _dividing_group(width: int, group: int) -> int:
    """The largest power-of-two group size below `group` that divides `width`."""
    while group > 1 and width % group:
        group //= 2
    return group


def _load_progress(work: Path) -> dict:
    p = work / "progress.json"
    return json.loads(p.read_text()) if p.exists() else {}
