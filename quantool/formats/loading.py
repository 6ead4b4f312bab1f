"""Load what quantool writes, for evaluation: GPTQ/AWQ through QuantLinear (no GPT-QModel needed),
bitsandbytes int8/NF4 and plain checkpoints through transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantool.errors import QuantoolError
from quantool.formats import checkpoint
from quantool.formats.qlinear import QuantLinear


def checkpoint_kind(path: Path) -> str:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        return "hub"
    qcfg = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    return qcfg.get("quant_method", "fp")


def load_model(path, device="cpu", dtype=None, kernel: str = "dequant"):
    """(model, tokenizer); quantized linears use kernel 'dequant' or 'tinygemm' where the shape allows."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    kind = checkpoint_kind(path)
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if kind in ("gptq", "awq"):
            config = AutoConfig.from_pretrained(path)
            del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _attach_quantized(model, path, dtype, kernel)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if kind == "fp" or kind == "hub" else None,
                                                         device_map={"": str(device)} if kind == "bitsandbytes" else None)
    except (OSError, ValueError) as exc:
        raise QuantoolError(f"cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
    if kind != "bitsandbytes":
        model.to(device)
    if kernel != "dequant":
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.use_kernel(kernel)
    model.eval()
    return model, tokenizer


def _attach_quantized(model, path: Path, dtype, kernel: str):
    qcfg, quantized, plain = checkpoint.read(path)
    missing, unexpected = model.load_state_dict(plain, strict=False)
    for prefix, w in quantized.items():
        model.set_submodule(prefix, QuantLinear(w.q, w.scale, w.zero, w.g_idx, w.bias, qcfg["bits"], dtype))
    quant_keys = {f"{p}.{s}" for p in quantized for s in ("weight", "bias")}
    missing = [k for k in missing if k not in quant_keys and not k.endswith("lm_head.weight")]
    if missing:
        raise QuantoolError(f"{path} lacks tensors {', '.join(missing[:5])}: the checkpoint is incomplete")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(dtype)
