"""How much each linear loses at each bit width, measured on the calibration tokens, one decoder layer at a time.

The measure is the error GPTQ itself minimizes: tr(dW H dW^T) with H = 2/n sum x x^T over the linear's real inputs,
that is twice the mean squared error the quantized linear adds to its output per token (Frantar et al. 2022,
eq. 1). With `gptq` it is the error left after GPTQ quantizes the linear at that width; with `rtn`, the error of
rounding to nearest, weighed by the same Hessian (no GPTQ solve: cheaper, see docs/fit.md for which fit chose
better). The KV cache's rounding (fp8) is measured in the same units, on the keys and values the layer really
caches. Inputs of each layer come from the full-precision model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from quantool.device import default_dtype
from quantool.formats import LAYOUTS
from quantool.model.experts import eager_experts
from quantool.model.layerwise import cache_kwarg, run_layer
from quantool.model.source import ModelSource, open_weights
from quantool.model.structure import LayerMap, decoder_layers
from quantool.ptq.config import PTQConfig
from quantool.ptq.gptq import collect_hessians
from quantool.ptq.pipeline import capture_calibration, layer_map, quantization_group
from quantool.quant.gptq import CholeskyError, gptq_quantize
from quantool.quant.quantizer import QuantizedWeight, QuantSpec
from quantool.util.atomic import write_json

KV_DTYPES = {"fp8": torch.float8_e4m3fn}


@dataclass
class Sensitivities:
    """Per decoder linear (full name): its shape, and its error at each candidate width; the KV cache's rounding
    error per candidate dtype. `settings` say what they were measured with."""

    settings: dict
    units: dict[str, dict] = field(default_factory=dict)  # name -> {"out": o, "in": i, "errors": {bits: error}}
    kv: dict[str, float] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        write_json(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> Sensitivities:
        data = json.loads(Path(path).read_text())
        for unit in data["units"].values():
            unit["errors"] = {int(b): e for b, e in unit["errors"].items()}
        return cls(**data)


class _RecordingCache(DynamicCache):
    """A cache that keeps nothing and shows what the layer would cache: its keys and values."""

    def __init__(self, on_kv: Callable[[torch.Tensor, torch.Tensor], None]):
        super().__init__()
        self.on_kv = on_kv

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.on_kv(key_states, value_states)
        return key_states, value_states


def _rounding_error(t: torch.Tensor, dtype: torch.dtype) -> float:
    """2 x the mean over tokens of the squared error of storing t in dtype (the linears' error units)."""
    t = t.float()
    flat = t.transpose(1, 2).reshape(-1, t.shape[1] * t.shape[-1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])
    return 2 * float((flat - flat.to(dtype).float()).square().sum(-1).mean())


def _unit_errors(w: torch.Tensor, hessian: torch.Tensor, specs: dict[int, QuantSpec], cfg: PTQConfig, method: str) -> dict[int, float]:
    errors = {}
    for bits, spec in specs.items():
        if method == "gptq":
            try:
                wq = gptq_quantize(w, hessian, spec, percdamp=cfg.damp, order=cfg.order).weight
            except CholeskyError:
                wq = QuantizedWeight.from_rtn(w.float(), spec).dequantize().to(w.device)
        else:
            wq = QuantizedWeight.from_rtn(w.float(), spec).dequantize().to(w.device)
        d = w.float() - wq
        errors[bits] = max(float(((d @ hessian) * d).sum()), 0.0)
    return errors


def measured_with(cfg: PTQConfig, candidates: tuple[int, ...], method: str) -> dict:
    """The settings a measurement depends on: a saved one is reused only where they are the same."""
    return {"candidates": list(candidates), "method": method, "group_size": cfg.group_size, "sym": cfg.sym,
            "full_range": cfg.full_range, "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen, "calib": cfg.calib, "seed": cfg.seed}


def measure(source: ModelSource, cfg: PTQConfig, candidates: tuple[int, ...], method: str, device: torch.device,
            on_layer: Callable[[int, int], None] = lambda i, n: None, log: Callable[[str], None] = print) -> Sensitivities:
    """Errors of every decoder linear (and expert matrix) at every candidate width, and the KV cache's at fp8."""
    model, weights = open_weights(source, default_dtype(device), device, log)
    model.eval()
    eager_experts(model)
    prefix, layers = decoder_layers(model)
    x, kwargs, calib = capture_calibration(source, model, prefix, layers, weights, cfg, device, log)
    result = Sensitivities(measured_with(cfg, candidates, method), calibration=calib)
    kv = {name: 0.0 for name in KV_DTYPES}
    group = quantization_group(layers, cfg, LAYOUTS[cfg.format])
    specs = {b: replace(cfg.spec(), bits=b).with_group(group) for b in candidates}
    result.settings["group"] = group
    maps: dict[str, LayerMap] = {}
    samples = x.shape[0]

    def on_kv(k: torch.Tensor, v: torch.Tensor) -> None:  # called per chunk of samples: weighted to a mean over all
        for name, dtype in KV_DTYPES.items():
            kv[name] += (_rounding_error(k, dtype) + _rounding_error(v, dtype)) * k.shape[0] / samples

    for i, layer in enumerate(layers):
        weights.load(layer, f"{prefix}.{i}.")
        lmap = layer_map(layer, x, kwargs, cfg, device, maps)  # cfg is GPTQ's: no pairs probed
        units = {n: lmap.unit(layer, n) for n in lmap.linears}
        hessians = collect_hessians(layer, lmap, lmap.groups, x, kwargs, device, cfg.chunk_tokens)
        for members in lmap.groups:
            h = hessians[members[0]].H
            for name in members:
                w = units[name].weight.data
                out_f, in_f = w.shape
                result.units[f"{prefix}.{i}.{name}"] = {"out": out_f, "in": in_f, "errors": _unit_errors(w, h, specs, cfg, method)}
        del hessians

        y = run_layer(layer, x, {**kwargs, cache_kwarg(layer): _RecordingCache(on_kv), "use_cache": True}, device, cfg.chunk_tokens)
        weights.drop(layer)
        x = y
        on_layer(i, len(layers))
    result.kv = kv
    return result
