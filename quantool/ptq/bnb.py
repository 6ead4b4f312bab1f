"""int8 (LLM.int8, outlier threshold 6.0) and NF4 (double quantization, blocksize 64) through bitsandbytes
and transformers' own loading and serialization: the whole model is loaded, as transformers quantizes it."""

from __future__ import annotations

from pathlib import Path

import torch

from quantool.errors import QuantoolError
from quantool.model.source import ModelSource


def quantize(source: ModelSource, ckpt: Path, method: str, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise QuantoolError("int8/nf4 need bitsandbytes: pip install 'quantool[bnb]'") from None
    qc = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0) if method == "int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16))
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float16, quantization_config=qc,
                                                     device_map={"": str(device)})
    except (OSError, ValueError, KeyError) as exc:
        raise QuantoolError(f"cannot load {source.folder} with bitsandbytes: {str(exc).strip().splitlines()[0]}") from None
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # keep the stored NF4 weights exact on AVX512-BF16 CPUs
    model.save_pretrained(ckpt)
    source.tokenizer().save_pretrained(ckpt)
    n = sum(1 for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)))
    return {"method": method, "layers": [], "quantized_linears": n, "format": f"bitsandbytes-{method}"}
