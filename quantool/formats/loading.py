"""Load what quantool writes, for evaluation: GPTQ/AWQ through QuantLinear (no GPT-QModel needed),
bitsandbytes int8/NF4 and plain checkpoints through transformers. A tensor the model needs and the
checkpoint lacks is an error, never a randomly initialized weight.

A quantized checkpoint keeps the source's tensor names, so it is mapped onto the model by transformers' own key
conversion (`model.conversion.KeyMap`), as from_pretrained would map the source: a quantized linear module
becomes a QuantLinear; experts that the model fuses into one parameter are dequantized into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantool.device import default_dtype
from quantool.errors import QuantoolError
from quantool.formats import checkpoint
from quantool.formats.qlinear import QuantLinear
from quantool.model.conversion import KeyMap
from quantool.model.experts import ExpertLinear, ExpertParam
from quantool.model.structure import is_linear


def checkpoint_kind(path: Path) -> str:
    """'gptq', 'awq', 'bitsandbytes' or 'fp' for a folder; 'hub' for anything else (a hub id)."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        return "hub"
    qcfg = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    return qcfg.get("quant_method", "fp")


def _check_folder(path: Path) -> None:
    if not path.exists():
        return
    if not path.is_dir() or not (path / "config.json").exists():
        raise QuantoolError(f"{path} is not a model folder (no config.json): pass a folder written by save_pretrained or quantool")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise QuantoolError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin): copy the model's weight files there")


def _head_keys(model: Any) -> set[str]:
    """State-dict keys of the output head (whatever the family calls it: lm_head, embed_out, ...)."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    return {f"{name}.{k}" for k in head.state_dict()} if name else set()


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               kernel: str = "dequant") -> tuple[Any, Any]:
    """(model, tokenizer) of a checkpoint folder or hub id, in eval mode on `device`. Quantized linears use
    kernel 'dequant' or 'tinygemm' where the shape allows. dtype: default fp16 on CUDA, fp32 on a CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_folder(path)
    kind = checkpoint_kind(path)
    dtype = dtype or default_dtype(torch.device(device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if kind in ("gptq", "awq"):
            config = AutoConfig.from_pretrained(path)
            del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _attach_quantized(model, path, dtype)
        else:
            loaded: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                               device_map={"": str(device)} if kind == "bitsandbytes" else None)
            model, info = loaded
            missing = [k for k in info["missing_keys"] if not (_tied(model) and k in _head_keys(model))]
            if missing:
                raise QuantoolError(f"{path} lacks tensors {', '.join(sorted(missing)[:5])} that the model needs: the "
                                    f"checkpoint is incomplete or of another architecture (nothing is initialized at random)")
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


def _attach_quantized(model: Any, path: Path, dtype: torch.dtype) -> None:
    """Quantized linear modules as QuantLinear; every other tensor, fused experts dequantized, through the key map."""
    qcfg, quantized, plain = checkpoint.read(path)
    fused: dict[str, dict] = qcfg.get("quantool_experts") or {}
    tensors = dict(plain)
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    for prefix, (w, _) in quantized.items():
        param, _, e = prefix.rpartition(".")
        if param in fused:
            per_expert.setdefault(param, {})[int(e)] = w.dequantize()
        else:
            tensors[f"{prefix}.weight"] = w.dequantize()
            if w.bias is not None:
                tensors[f"{prefix}.bias"] = w.bias
    keymap = KeyMap(model, tensors)
    one_to_one = {keys[0]: t for t, sources in keymap.sources.items() if len(keys := sources.get(None, [])) == 1 and len(sources) == 1}
    modules = dict(model.named_modules())
    swapped: set[str] = set()
    for prefix, (w, bits) in quantized.items():
        target = one_to_one.get(f"{prefix}.weight")
        module = target[: -len(".weight")] if target else None
        if module is not None and is_linear(modules.get(module, nn.Identity())):
            model.set_submodule(module, QuantLinear(w.q, w.scale, w.zero, w.g_idx, w.bias, bits, dtype))
            swapped.add(module)
    inside = lambda key: key.rpartition(".")[0] in swapped
    state = keymap.materialize([t for t in keymap.sources if not inside(t)], lambda keys: {k: tensors[k] for k in keys})
    for param, experts in per_expert.items():
        spec = ExpertParam(**{**fused[param], "param": "p", "size": tuple(fused[param]["size"]), "stride": tuple(fused[param]["stride"])})
        holder = nn.Module()
        holder.register_parameter("p", nn.Parameter(torch.zeros(model.get_parameter(param).shape, dtype=dtype), requires_grad=False))
        for expert, weight in experts.items():
            ExpertLinear(holder, spec, int(expert)).weight.copy_(weight)
        state[param] = holder.get_parameter("p").data
    missing, _ = model.load_state_dict(state, strict=False)
    head = _head_keys(model) if _tied(model) else set()
    missing = [k for k in missing if not inside(k) and k not in head]
    if missing:
        raise QuantoolError(f"{path} lacks tensors {', '.join(sorted(missing)[:5])}: the checkpoint is incomplete")
    if _tied(model):
        model.tie_weights()
    model.to(dtype)
