"""Quantized checkpoints in the GPTQ v1 and AWQ GEMM layouts: the tensors of quantized modules, the files
around them (configs, tokenizer, quantool.json), and reading it all back.

Linears a layout cannot hold (see each layout's `cannot_hold`) are written as plain fp16 weights equal to
their dequantized values and listed in the config (`modules_to_not_convert` for AWQ, negative `dynamic`
rules for GPT-QModel), so every loader keeps them as nn.Linear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quantool.formats import LAYOUTS, LayoutConfig
from quantool.formats.shards import INDEX
from quantool.quant.quantizer import QuantizedWeight
from quantool.util import faults
from quantool.util.atomic import write_json
from quantool.util.outdir import MARKER


def checkpoint_tensors(state: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight], fmt: str,
                       bits: dict[str, int] | int, dtype: torch.dtype = torch.float16, forced: dict[str, str] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A module's tensors as the checkpoint stores them: each quantized linear (by name prefix) packed where the
    layout can hold it and `forced` does not name it (with the reason), else its dequantized weight; other
    floating tensors cast to dtype. `bits` is one width for all, or each prefix's. Returns (tensors, {prefix:
    why it is stored unpacked})."""
    layout = LAYOUTS[fmt]
    replaced = {f"{prefix}.{t}" for prefix in quantized for t in ("weight", "bias")}
    out = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in state.items() if k not in replaced}
    unpacked = {}
    for prefix, w in quantized.items():
        b = bits if isinstance(bits, int) else bits[prefix]
        reason = (forced or {}).get(prefix) or layout.cannot_hold(b, *w.q.shape)
        if reason is None:
            out.update(layout.pack(b, prefix, w))
        else:
            unpacked[prefix] = reason
            out[f"{prefix}.weight"] = w.dequantize().to(dtype)
            if w.bias is not None:
                out[f"{prefix}.bias"] = w.bias.to(dtype)
    return out, unpacked


def write_configs(folder: Path, config: dict, qcfg: dict) -> None:
    """config.json with the quantization_config (and quantize_config.json, which GPTQ loaders also read)."""
    config = {**config, "quantization_config": qcfg, "dtype": "float16", "torch_dtype": "float16", "use_cache": True}
    write_json(config, folder / "config.json")
    if qcfg["quant_method"] == "gptq":
        write_json({**qcfg, "model_file_base_name": "model"}, folder / "quantize_config.json")


def finalize(folder: Path, summary: dict, config: dict | None = None, layout: str | None = None,
             lcfg: LayoutConfig | None = None, tokenizer: Any = None, generation_config: Any = None) -> None:
    """Write the files around the tensors, each whole (a resumed run may write any of them again), then
    quantool.json: written last, it marks the checkpoint complete and lists the files quantool wrote, by which
    a later --overwrite recognizes the folder as quantool's own."""
    if config is not None and layout is not None and lcfg is not None:
        write_configs(folder, config, LAYOUTS[layout].quantization_config(lcfg))
        faults.point("finalize.configs")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        faults.point("finalize.tokenizer")
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    files = sorted({p.name for p in folder.iterdir()} | {MARKER})
    write_json({**summary, "files": files}, folder / MARKER)
    faults.point("finalize.marker")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, through its index when sharded."""
    index = path / INDEX
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


def read(path: Path) -> tuple[dict, dict[str, tuple[QuantizedWeight, int]], dict[str, torch.Tensor]]:
    """(quantization_config, {prefix: (QuantizedWeight, bits)}, remaining plain tensors)."""
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    layout = LAYOUTS[qcfg["quant_method"]]
    tensors = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118 (safe_open is not iterable)
    quantized = {}
    for prefix in (k[: -len(".qweight")] for k in list(tensors) if k.endswith(".qweight")):
        settings = layout.module_settings(qcfg, prefix)
        bits = settings.bits if settings is not None else qcfg["bits"]
        quantized[prefix] = (layout.unpack(bits, prefix, tensors), bits)
    used = {f"{p}.{s}" for p in quantized for s in layout.TENSORS}
    return qcfg, quantized, {k: v for k, v in tensors.items() if k not in used}
