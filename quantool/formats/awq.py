"""The AWQ GEMM checkpoint layout (llm-awq / AutoAWQ `version: gemm`, read by transformers through
GPT-QModel and by vLLM), 4-bit with zero points.

Per quantized linear `prefix`: prefix.qweight int32 [in, out / 8] and prefix.qzeros int32 [groups, out / 8],
8 output columns per word in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7; prefix.scales fp16 [groups, out].
There is no g_idx: groups are contiguous runs of `in / groups` columns, so it holds neither act-order nor
a partial last group.
"""

from __future__ import annotations

import torch

from quantool.formats.bits import pack_awq, unpack_awq
from quantool.quant.quantizer import QuantizedWeight, QuantSpec, group_index

NAME = "awq"
TENSORS = ("qweight", "qzeros", "scales", "bias")


def spec(bits: int, group_size: int, sym: bool) -> QuantSpec:
    """AWQ is asymmetric (zero point), as in llm-awq."""
    return QuantSpec(bits, group_size, False)


def cannot_hold(bits: int, w: QuantizedWeight) -> str | None:
    out_f, in_f = w.q.shape
    if bits != 4:
        return f"{bits}-bit codes (AWQ GEMM packs 4-bit only)"
    if out_f % 8:
        return f"output width {out_f} is not a multiple of 8"
    groups = w.scale.shape[0]
    if in_f % groups or not torch.equal(w.g_idx.cpu(), group_index(in_f, in_f // groups)):
        return f"input width {in_f} does not split into {groups} equal contiguous groups (a partial last group or act-order)"
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


def quantization_config(bits: int, group_size: int, sym: bool, act_order: bool, damp: float, static_groups: bool,
                        unpacked: list[str]) -> dict:
    return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": sorted(unpacked) or None}


def unpacked_modules(qcfg: dict) -> set[str]:
    return set(qcfg.get("modules_to_not_convert") or [])
