"""int8 (LLM.int8, outlier threshold 6.0) and NF4 (double quantization, blocksize 64) through bitsandbytes
and transformers' own loading and serialization: the whole model is loaded, as transformers quantizes it.

Linears whose shapes bitsandbytes' kernels cannot run stay in 16 bits (`llm_int8_skip_modules`): its 4-bit CPU
kernel packs output rows in blocks of 32 and reads the per-64 absmax as [out, in / 64]
(bitsandbytes 0.50 functional._convert_weight_packed_for_cpu), so an NF4 linear needs out % 32 == 0 and
in % 64 == 0, else the written model loads and then fails at generate.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantool.errors import QuantoolError
from quantool.model.source import ModelSource

NF4_OUT_BLOCK, NF4_IN_BLOCK = 32, 64


def unrunnable(model: nn.Module, method: str) -> dict[str, str]:
    """Linears of `model` (a skeleton will do) that bitsandbytes could quantize but not run: name -> why."""
    if method != "nf4":
        return {}
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (m.out_features % NF4_OUT_BLOCK or m.in_features % NF4_IN_BLOCK):
            out[name] = f"{m.in_features} -> {m.out_features} (NF4 needs inputs in multiples of 64, outputs of 32)"
    return out


def quantize(source: ModelSource, ckpt: Path, method: str, device: torch.device, log: Callable[[str], None] = print) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.quantizers.base import get_keys_to_not_convert

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantoolError("int8/nf4 need bitsandbytes: pip install 'quantool[bnb]'") from None
    skeleton = source.skeleton()
    skip = unrunnable(skeleton, method)
    kinds: dict[str, str] = {}
    for name, why in skip.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], why)
    for kind, why in kinds.items():
        log(f"{kind}: bitsandbytes' kernels cannot run {why}; kept in 16 bits")
    keep = sorted(set(get_keys_to_not_convert(skeleton)) | set(skip)) if skip else None
    qc = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=keep) if method == "int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=keep))
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float16, quantization_config=qc,
                                                     device_map={"": str(device)})
    except (OSError, ValueError, KeyError) as exc:
        raise QuantoolError(f"cannot load {source.folder} with bitsandbytes: {str(exc).strip().splitlines()[0]}") from None
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # keep the stored NF4 weights exact on AVX512-BF16 CPUs
    shutil.rmtree(ckpt, ignore_errors=True)  # a resumed run writes everything again
    model.save_pretrained(ckpt)
    source.tokenizer().save_pretrained(ckpt)
    n = sum(1 for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)))
    return {"method": method, "layers": [], "quantized_linears": n, "format": f"bitsandbytes-{method}",
            "unpacked_linears": sorted(skip)}
