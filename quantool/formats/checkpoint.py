"""Quantized checkpoints in the GPTQ v1 and AWQ GEMM layouts: the tensors of quantized modules, the config
files transformers (through GPT-QModel) and vLLM read, and reading it all back.

Linears a layout cannot hold (see each layout's `cannot_hold`) are written as plain fp16 weights equal to
their dequantized values and listed in the config (`modules_to_not_convert` for AWQ, negative `dynamic`
rules for GPT-QModel), so every loader keeps them as nn.Linear.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from quantool.atomic import write_json
from quantool.formats import LAYOUTS
from quantool.formats.shards import INDEX
from quantool.quant.quantizer import QuantizedWeight


def checkpoint_tensors(state: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight], fmt: str, bits: int,
                       dtype=torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A module's tensors as the checkpoint stores them: each quantized linear (by name prefix) packed where the
    layout can hold it, else its dequantized weight; other floating tensors cast to dtype.
    Returns (tensors, {prefix: why it is stored unpacked})."""
    layout = LAYOUTS[fmt]
    replaced = {f"{prefix}.{t}" for prefix in quantized for t in ("weight", "bias")}
    out = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in state.items() if k not in replaced}
    unpacked = {}
    for prefix, w in quantized.items():
        reason = layout.cannot_hold(bits, w)
        if reason is None:
            out.update(layout.pack(bits, prefix, w))
        else:
            unpacked[prefix] = reason
            out[f"{prefix}.weight"] = w.dequantize().to(dtype)
            if w.bias is not None:
                out[f"{prefix}.bias"] = w.bias.to(dtype)
    return out, unpacked


def write_configs(folder: Path, config: dict, qcfg: dict):
    """config.json with the quantization_config (and quantize_config.json, which GPTQ loaders also read)."""
    config = {**config, "quantization_config": qcfg, "dtype": "float16", "torch_dtype": "float16", "use_cache": True}
    write_json(config, folder / "config.json")
    if qcfg["quant_method"] == "gptq":
        write_json({**qcfg, "model_file_base_name": "model"}, folder / "quantize_config.json")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, through its index when sharded."""
    index = path / INDEX
    if index.exists():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path.glob("*.safetensors"))


def read(path: Path) -> tuple[dict, dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(quantization_config, {prefix: QuantizedWeight}, remaining plain tensors)."""
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    layout = LAYOUTS[qcfg["quant_method"]]
    tensors = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    quantized = {p: layout.unpack(qcfg["bits"], p, tensors) for p in prefixes}
    used = {f"{p}.{s}" for p in prefixes for s in layout.TENSORS}
    return qcfg, quantized, {k: v for k, v in tensors.items() if k not in used}


def unpacked_modules(qcfg: dict) -> set[str]:
    return LAYOUTS[qcfg["quant_method"]].unpacked_modules(qcfg)
