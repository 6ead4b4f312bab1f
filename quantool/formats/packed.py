"""GPTQ v1 and AWQ GEMM checkpoints: what transformers (through GPT-QModel) and vLLM load.

Layout (per quantized linear `prefix`):
- gptq: prefix.qweight int32 [in*bits/32, out], prefix.qzeros int32 [groups, out*bits/32] holding zero-1,
  prefix.scales fp16 [groups, out], prefix.g_idx int32 [in], prefix.bias fp16; config "quant_method": "gptq".
- awq (4-bit): prefix.qweight int32 [in, out/8], prefix.qzeros int32 [groups, out/8], prefix.scales fp16
  [groups, out], interleaved order 0,2,4,6,1,3,5,7; config "quant_method": "awq", "version": "gemm".
Linears whose widths the packed layouts cannot hold (in not a multiple of 32, out of 32/8) are written as
plain fp16 weights that equal their dequantized values, and listed in `modules_to_not_convert` (AWQ) or as
negative `dynamic` rules (GPT-QModel), so every loader keeps them as nn.Linear.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantool.quant.packing import pack_awq, pack_cols, pack_rows, unpack_awq, unpack_cols, unpack_rows
from quantool.quant.quantizer import QuantSpec, dequantize_groups


@dataclass
class QuantizedWeight:
    """One quantized linear: codes [out, in], per-group scale/zero [groups, out], g_idx [in]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bias: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.q, self.scale, self.zero, self.g_idx)


def spec_for(fmt: str, bits: int, group_size: int, sym: bool) -> QuantSpec:
    """The quantizer a format can store: GPTQ v1 keeps zero - 1, so asymmetric zeros start at 1."""
    return QuantSpec(bits, group_size, sym, min_zero=1 if fmt == "gptq" and not sym else 0)


def packable(fmt: str, bits: int, in_f: int, out_f: int, g_idx: torch.Tensor) -> bool:
    if fmt == "awq":
        groups_contiguous = bool(torch.all(g_idx[1:] >= g_idx[:-1]))
        return bits == 4 and out_f % 8 == 0 and groups_contiguous
    return in_f % 32 == 0 and (out_f * bits) % 32 == 0


def quantization_config(fmt: str, bits: int, group_size: int, sym: bool, act_order: bool, damp: float,
                        static_groups: bool, unpacked: list[str]) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": sorted(unpacked) or None}
    cfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
           "damp_percent": damp, "static_groups": static_groups, "true_sequential": True, "checkpoint_format": "gptq"}
    if unpacked:
        cfg["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in sorted(unpacked)}
    return cfg


def pack_tensors(fmt: str, bits: int, prefix: str, w: QuantizedWeight) -> dict[str, torch.Tensor]:
    t = {}
    if fmt == "awq":
        t[f"{prefix}.qweight"] = pack_awq(w.q.t().contiguous())
        t[f"{prefix}.qzeros"] = pack_awq(w.zero)
    else:
        t[f"{prefix}.qweight"] = pack_rows(w.q.t().contiguous(), bits)
        t[f"{prefix}.qzeros"] = pack_cols(w.zero - 1, bits)
        t[f"{prefix}.g_idx"] = w.g_idx.to(torch.int32)
    t[f"{prefix}.scales"] = w.scale.to(torch.float16)
    if w.bias is not None:
        t[f"{prefix}.bias"] = w.bias.to(torch.float16)
    return t


def unpack_tensors(fmt: str, bits: int, prefix: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    scale = tensors[f"{prefix}.scales"]
    if fmt == "awq":
        q = unpack_awq(tensors[f"{prefix}.qweight"]).t().contiguous()
        zero = unpack_awq(tensors[f"{prefix}.qzeros"])
        g_idx = torch.arange(q.shape[1]) // (q.shape[1] // scale.shape[0])
    else:
        q = unpack_rows(tensors[f"{prefix}.qweight"], bits).t().contiguous()
        zero = unpack_cols(tensors[f"{prefix}.qzeros"], bits) + 1
        g_idx = tensors[f"{prefix}.g_idx"]
    zero = zero[:, : scale.shape[1]]
    return QuantizedWeight(q.to(torch.int32), scale, zero.to(torch.int32), g_idx.to(torch.int32), tensors.get(f"{prefix}.bias"))


def write(out_dir: Path, model, quantized: dict[str, QuantizedWeight], fmt: str, qcfg: dict, bits: int, dtype=torch.float16):
    """Write model.safetensors + config.json (+ quantize_config.json for GPTQ) into out_dir."""
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    for prefix, w in quantized.items():
        state.pop(f"{prefix}.weight", None)
        state.pop(f"{prefix}.bias", None)
        if packable(fmt, bits, w.q.shape[1], w.q.shape[0], w.g_idx):
            state.update(pack_tensors(fmt, bits, prefix, w))
        else:
            state[f"{prefix}.weight"] = w.dequantize().to(dtype)
            if w.bias is not None:
                state[f"{prefix}.bias"] = w.bias.to(dtype)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = qcfg
    config["torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if fmt == "gptq":
        (out_dir / "quantize_config.json").write_text(json.dumps({**qcfg, "model_file_base_name": "model"}, indent=2))


def unpacked_modules(qcfg: dict) -> set[str]:
    if qcfg["quant_method"] == "awq":
        return set(qcfg.get("modules_to_not_convert") or [])
    return {re.sub(r"\\(.)", r"\1", k[3:-1]) for k in (qcfg.get("dynamic") or {}) if k.startswith("-:^")}


def read(path: Path) -> tuple[dict, dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(quantization_config, {prefix: QuantizedWeight}, remaining plain tensors)."""
    config = json.loads((path / "config.json").read_text())
    qcfg = config["quantization_config"]
    fmt, bits = qcfg["quant_method"], qcfg["bits"]
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    quantized = {p: unpack_tensors(fmt, bits, p, tensors) for p in prefixes}
    used = {f"{p}.{s}" for p in prefixes for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    return qcfg, quantized, {k: v for k, v in tensors.items() if k not in used}
