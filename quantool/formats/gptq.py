"""The GPTQ v1 checkpoint layout (AutoGPTQ / GPT-QModel `checkpoint_format: gptq`, read by transformers
through GPT-QModel, and by vLLM where the width is a multiple of the group size).

Per quantized linear `prefix`: prefix.qweight int32 [in * bits / 32, out], prefix.qzeros int32
[groups, out * bits / 32] holding zero - 1, prefix.scales fp16 [groups, out], prefix.g_idx int32 [in],
prefix.bias fp16. g_idx lets it hold act-order and a partial last group.
"""

from __future__ import annotations

import re

import torch

from quantool.formats.bits import pack_cols, pack_rows, unit, unpack_cols, unpack_rows
from quantool.quant.quantizer import QuantizedWeight, QuantSpec

NAME = "gptq"
TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def spec(bits: int, group_size: int, sym: bool) -> QuantSpec:
    """GPTQ v1 stores zero - 1, so asymmetric zeros start at 1."""
    return QuantSpec(bits, group_size, sym, min_zero=0 if sym else 1)


def cannot_hold(bits: int, w: QuantizedWeight) -> str | None:
    """Why this layout cannot pack the linear, or None."""
    out_f, in_f = w.q.shape
    if in_f % 32:
        return f"input width {in_f} is not a multiple of 32"
    if out_f % unit(bits)[0]:
        return f"output width {out_f} is not a multiple of {unit(bits)[0]} ({bits}-bit zero points fill whole words)"
    return None


def pack(bits: int, prefix: str, w: QuantizedWeight) -> dict[str, torch.Tensor]:
    t = {f"{prefix}.qweight": pack_rows(w.q.t().contiguous(), bits), f"{prefix}.qzeros": pack_cols(w.zero - 1, bits),
         f"{prefix}.scales": w.scale.to(torch.float16), f"{prefix}.g_idx": w.g_idx.to(torch.int32)}
    if w.bias is not None:
        t[f"{prefix}.bias"] = w.bias.to(torch.float16)
    return t


def unpack(bits: int, prefix: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    scale = tensors[f"{prefix}.scales"]
    q = unpack_rows(tensors[f"{prefix}.qweight"], bits).t().contiguous()
    zero = (unpack_cols(tensors[f"{prefix}.qzeros"], bits) + 1)[:, : scale.shape[1]]
    return QuantizedWeight(q.to(torch.int32), scale, zero.to(torch.int32), tensors[f"{prefix}.g_idx"].to(torch.int32),
                           tensors.get(f"{prefix}.bias"))


def quantization_config(bits: int, group_size: int, sym: bool, act_order: bool, damp: float, static_groups: bool,
                        unpacked: list[str]) -> dict:
    cfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": sym,
           "damp_percent": damp, "static_groups": static_groups, "true_sequential": True, "checkpoint_format": "gptq"}
    if unpacked:  # GPT-QModel's negative dynamic rules keep these as plain Linear
        cfg["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in sorted(unpacked)}
    return cfg


def unpacked_modules(qcfg: dict) -> set[str]:
    return {re.sub(r"\\(.)", r"\1", k[3:-1]) for k in (qcfg.get("dynamic") or {}) if k.startswith("-:^")}
