"""The GPTQ v1 checkpoint layout (AutoGPTQ / GPT-QModel `checkpoint_format: gptq`, read by transformers
through GPT-QModel, and by vLLM).

Per quantized linear `prefix`: prefix.qweight int32 [in * bits / 32, out], prefix.qzeros int32
[groups, out * bits / 32] holding zero - 1, prefix.scales fp16 [groups, out], prefix.g_idx int32 [in],
prefix.bias fp16. g_idx lets it hold act-order. Modules whose bits differ from the checkpoint's defaults carry
GPT-QModel's per-module `dynamic` overrides, which vLLM reads too.
"""

from __future__ import annotations

import torch

from quantool.formats import LayoutConfig, ModuleQuant, rules
from quantool.formats.bits import pack_cols, pack_rows, unit, unpack_cols, unpack_rows
from quantool.quant.quantizer import QuantizedWeight, QuantSpec

NAME = "gptq"
TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def spec(bits: int, group_size: int, sym: bool) -> QuantSpec:
    """GPTQ v1 stores zero - 1, so asymmetric zeros start at 1."""
    return QuantSpec(bits, group_size, sym, min_zero=0 if sym else 1)


def cannot_hold(bits: int, out_f: int, in_f: int) -> str | None:
    """Why this layout cannot pack a linear of this shape, or None."""
    if in_f % 32:
        return f"an input width of {in_f}, not a multiple of 32"
    if out_f % unit(bits)[0]:
        return f"an output width of {out_f}, not a multiple of {unit(bits)[0]} ({bits}-bit zero points fill whole words)"
    return None


def stored_bytes(bits: int, out_f: int, in_f: int, group: int) -> int:
    """Bytes of one quantized linear as this layout stores it (qweight, qzeros, fp16 scales, int32 g_idx; a bias is
    stored like any other 16-bit tensor and not counted here)."""
    groups = 1 if group == -1 else -(-in_f // group)
    return in_f * out_f * bits // 8 + groups * out_f * bits // 8 + 2 * groups * out_f + 4 * in_f


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


def quantization_config(cfg: LayoutConfig) -> dict:
    """The checkpoint's defaults, GPT-QModel's per-module rules (read by GPTQModel.load and vLLM) for modules
    whose bits or group differ and for modules kept unquantized, and, where the kept modules are the same kinds
    in every layer, `modules_in_block_to_quantize`: transformers' loader (through optimum) reads no `dynamic`
    rules, only that list of module kinds to quantize in each block."""
    qcfg: dict = {"quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.act_order,
                  "sym": cfg.sym, "damp_percent": cfg.damp, "static_groups": cfg.static_groups, "true_sequential": True,
                  "checkpoint_format": "gptq"}
    overrides = {name: {k: v for k, v in (("bits", m.bits), ("group_size", m.group_size)) if v != qcfg[k]}
                 for name, m in cfg.modules.items()}
    overrides = {name: o for name, o in overrides.items() if o}
    plain = [name for name in cfg.modules if name not in overrides]
    dynamic = rules.build(overrides, sorted(cfg.unpacked), plain)
    if dynamic:
        qcfg["dynamic"] = dynamic
    kinds = rules.block_kinds(list(cfg.modules), list(cfg.unpacked))
    if cfg.unpacked and kinds:
        qcfg["modules_in_block_to_quantize"] = [kinds]
    if cfg.experts:
        qcfg["quantool_experts"] = cfg.experts
    return qcfg


def module_settings(qcfg: dict, name: str) -> ModuleQuant | None:
    """A module's bits and group size after the per-module rules; None where a rule leaves it unquantized."""
    values = rules.resolve(qcfg.get("dynamic"), name)
    if values is None:
        return None
    return ModuleQuant(values.get("bits", qcfg["bits"]), values.get("group_size", qcfg["group_size"]))
