"""The AWQ GEMM checkpoint layout (llm-awq / AutoAWQ `version: gemm`, read by transformers through
GPT-QModel and by vLLM), 4-bit with zero points.

Per quantized linear `prefix`: prefix.qweight int32 [in, out / 8] and prefix.qzeros int32 [groups, out / 8],
8 output columns per word in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7; prefix.scales fp16 [groups, out].
There is no g_idx and no per-module setting: every module has `in / group_size` contiguous groups (the group
size is chosen to divide every width, `formats.uniform_group`); modules it cannot hold are kept as plain
linears (`modules_to_not_convert`).
"""

from __future__ import annotations

import torch

from quantool.formats import LayoutConfig, ModuleQuant
from quantool.formats.bits import pack_awq, unpack_awq
from quantool.quant.quantizer import QuantizedWeight, QuantSpec, group_index

NAME = "awq"
TENSORS = ("qweight", "qzeros", "scales", "bias")


def spec(bits: int, group_size: int, sym: bool) -> QuantSpec:
    """AWQ is asymmetric (zero point), as in llm-awq."""
    return QuantSpec(bits, group_size, False)


def cannot_hold(bits: int, out_f: int, in_f: int) -> str | None:
    """Why this layout cannot pack a linear of this shape, or None."""
    if bits != 4:
        return f"{bits}-bit codes (AWQ GEMM packs 4-bit only)"
    if out_f % 8:
        return f"an output width of {out_f}, not a multiple of 8"
    if in_f % 32:
        return f"an input width of {in_f}, not a multiple of 32 (the kernels' smallest group)"
    return None


def pack(bits: int, prefix: str, w: QuantizedWeight) -> dict[str, torch.Tensor]:
    t = {f"{prefix}.qweight": pack_awq(w.q.t().contiguous()), f"{prefix}.qzeros": pack_awq(w.zero),
         f"{prefix}.scales": w.scale.to(torch.float16)}
    if w.bias is not None:
        t[f"{prefix}.bias"] = w.bias.to(torch.float16)
    return t


def unpack(bits: int, prefix: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    scale = tensors[f"{prefix}.scales"]
    q = unpack_awq(tensors[f"{prefix}.qweight"]).t().contiguous()
    zero = unpack_awq(tensors[f"{prefix}.qzeros"])[:, : scale.shape[1]]
    return QuantizedWeight(q.to(torch.int32), scale, zero.to(torch.int32), group_index(q.shape[1], q.shape[1] // scale.shape[0]),
                           tensors.get(f"{prefix}.bias"))


def quantization_config(cfg: LayoutConfig) -> dict:
    qcfg = {"quant_method": "awq", "bits": cfg.bits, "group_size": cfg.group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": sorted(cfg.unpacked) or None}
    if cfg.experts:
        qcfg["quantool_experts"] = cfg.experts
    return qcfg


def module_settings(qcfg: dict, name: str) -> ModuleQuant | None:
    if name in (qcfg.get("modules_to_not_convert") or []):
        return None
    return ModuleQuant(qcfg["bits"], qcfg["group_size"])
