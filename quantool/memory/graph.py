"""Model shapes from transformers' own model definition, for any family it knows: the config read through its
config class, the model built on the meta device (no memory is allocated), and its parameters counted on the
module graph (embeddings, decoder linears, fused experts, norms, heads), so counts are exact without a table of
families. The dimensions the activation and KV-cache formulas need are read from the config by their usual
names; what had to be assumed is said in the shape's note.
"""

from __future__ import annotations

from typing import Any

from quantool.errors import QuantoolError
from quantool.memory.shapes import ModelShape

_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "kv_n_heads")


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def _counts(layers: Any) -> dict[str, int]:
    """Linear and expert matrices of the decoder layers: weights, output rows, matrices, experts per MoE layer,
    MoE layers, and expert parameters per MoE layer."""
    from quantool.model.experts import _expert_count, fused_params
    from quantool.model.structure import is_linear, unit_shape

    out = dict(linear=0, rows=0, count=0, experts=0, moe_layers=0, expert_params=0)
    for layer in layers:
        for m in layer.modules():
            if is_linear(m):
                o, i = unit_shape(m)
                out["linear"] += o * i
                out["rows"] += o
                out["count"] += 1
        names = {id(p): n for n, p in layer.named_parameters()}
        experts_here = 0
        for p in fused_params(layer):
            experts = _expert_count(layer, names[id(p)], p)
            if not experts or (p.shape[0] == experts and p.dim() == 2):  # a router's raw matrix: one row per expert
                continue
            out["linear"] += p.numel()
            out["rows"] += p.numel() // p.shape[-1]
            out["count"] += experts
            out["expert_params"] += p.numel()
            experts_here = experts
        if experts_here:
            out["experts"] = experts_here
            out["moe_layers"] += 1
    if out["moe_layers"]:
        out["expert_params"] //= out["moe_layers"]
    return out


def shape_from_transformers(cfg: dict, name: str) -> ModelShape:
    """The shape of the model a config.json describes, counted on transformers' module graph."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantool.model.structure import decoder_layers

    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}  # the shape is the model's, quantized or not
    try:
        config = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise QuantoolError(f"{name}: transformers cannot build this config as a causal LM ({str(exc).splitlines()[0]})") from None
    text = config.get_text_config()
    counts = _counts(decoder_layers(model)[1])
    assumed = []
    hidden = _get(text, "hidden_size", "n_embd", "d_model")
    heads = _get(text, "num_attention_heads", "n_head", "n_heads")
    layers = _get(text, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    attn = getattr(text, "attn_config", None)
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon's multi-query attention: one KV head, whatever num_kv_heads says
    else:
        kv_heads = _get(text, *_KV_KEYS, default=_get(attn, "kv_n_heads") if attn is not None else None) or heads
    head_dim = _get(text, "head_dim", default=hidden // heads)
    ffn = getattr(text, "ffn_config", None)
    intermediate = _get(text, "intermediate_size_mlp", "intermediate_size", "ffn_dim", "n_inner")
    if intermediate is None:
        intermediate = 4 * hidden
        assumed.append(f"MLP width 4 x hidden = {intermediate}")
    experts = counts["experts"]
    per_token = _get(text, "num_experts_per_tok", "moe_top_k", "num_experts_per_token",
                     default=_get(ffn, "moe_top_k") if ffn is not None else None) or 0
    from quantool.model.structure import is_linear, unit_shape

    first = decoder_layers(model)[1][0]
    widening = [unit_shape(m) for m in first.modules() if is_linear(m) and unit_shape(m)[1] == hidden]
    gated = "gated" if sum(o == intermediate for o, _ in widening) >= 2 or any(o == 2 * intermediate for o, _ in widening) else "plain"
    expert_width = 0
    if experts:
        expert_width = _get(text, "moe_intermediate_size", default=_get(ffn, "ffn_hidden_size") if ffn is not None else None)
        if expert_width is None:
            expert_width = counts["expert_params"] // (experts * 3 * hidden)
            assumed.append(f"expert width {expert_width} from the expert parameters (gated)")
        if not per_token:
            per_token = 1
            assumed.append("one expert per token")
        gated = "gated" if counts["expert_params"] >= 3 * experts * hidden * expert_width else "plain"
    shared = _get(text, "shared_expert_intermediate_size", default=0)
    if not shared and experts and _get(text, "n_shared_experts"):
        shared = text.n_shared_experts * expert_width
    k_dim = v_dim = head_dim
    if _get(text, "kv_lora_rank"):  # multi-head latent attention: transformers caches the per-head keys and values
        k_dim = text.qk_nope_head_dim + text.qk_rope_head_dim
        v_dim = text.v_head_dim
        head_dim, kv_heads = k_dim, heads
    layer_types = list(getattr(text, "layer_types", None) or [])
    window = _get(text, "sliding_window", default=0) or 0
    if layer_types:
        sliding = sum(1 for t in layer_types if "sliding" in str(t))
    else:
        sliding = layers if window and getattr(text, "use_sliding_window", True) is not False else 0
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    layer_norm = any(isinstance(m, torch.nn.LayerNorm) for m in norms)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    note = f"parameters counted on transformers' {type(model).__name__}"
    if assumed:
        note += "; assumed " + ", ".join(assumed)
    return ModelShape(
        name=cfg.get("_name_or_path") or cfg.get("model_type") or name, vocab=int(text.vocab_size), hidden=int(hidden),
        intermediate=int(intermediate), layers=int(layers), heads=int(heads), kv_heads=int(kv_heads), head_dim=int(head_dim),
        tied=bool(tied), mlp=gated, norm="layer" if layer_norm else "rms", experts=experts, experts_per_token=int(per_token),
        moe_layers=counts["moe_layers"], expert_intermediate=int(expert_width), shared_intermediate=int(shared),
        max_position=int(_get(text, "max_position_embeddings", "n_positions", "max_seq_len", default=0)),
        k_head_dim=int(k_dim), v_head_dim=int(v_dim), sliding_layers=int(sliding), sliding_window=int(window) if sliding else 0,
        dtype_bytes=4 if str(cfg.get("dtype") or cfg.get("torch_dtype")) == "float32" else 2,
        counted_params=sum(p.numel() for p in model.parameters()), counted_linear_params=counts["linear"],
        counted_linear_rows=counts["rows"], counted_linears=counts["count"], note=note)
