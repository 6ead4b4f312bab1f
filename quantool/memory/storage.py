"""Bytes that live for the whole job: weights (plain or bitsandbytes-quantized), LoRA adapters, optimizer states,
the KV cache. Pure arithmetic on a shape and a job."""

from __future__ import annotations

from quantool.errors import QuantoolError
from quantool.memory.dtypes import DTYPE_BYTES
from quantool.memory.job import BaseQuant, Job, Method, Optimizer, WeightsDtype
from quantool.memory.shapes import ModelShape

NF4_BLOCK, NF4_DQ_BLOCK = 64, 256
ADAM8_BLOCK, ADAM8_MIN_SIZE, ADAM8_PAGED_MIN = 256, 4096, 100_000  # bitsandbytes 0.50 optim/optimizer.py


def target_names(shape: ModelShape, job: Job) -> set[str]:
    """The linears that carry LoRA adapters."""
    names = set(shape.linears())
    if not job.uses_lora:
        return set()
    if job.lora_targets in (("all",), ("all-linear",)):
        return names
    if job.lora_targets == ("qv",):
        return {"q_proj", "v_proj"}
    unknown = set(job.lora_targets) - names
    if unknown:
        raise QuantoolError(f"unknown --lora-targets {', '.join(sorted(unknown))}: this model's linears are {', '.join(shape.linears())}")
    return set(job.lora_targets)


def trains_every_weight(job: Job) -> bool:
    """Full fine-tuning or full QAT (no adapters)."""
    return job.method in (Method.FULL, Method.QAT) and not job.uses_lora


def lora_params(shape: ModelShape, job: Job) -> int:
    targets = target_names(shape, job)
    per_layer = sum(job.rank * (i + o) * shape.copies(name) for name, (i, o) in shape.linears().items() if name in targets)
    return per_layer * shape.layers


def quantized_linear_bytes(n_params: int, rows: int, quant: str, n_linears: int) -> float:
    """Storage of bitsandbytes-quantized linear weights (data + quantization metadata)."""
    if quant == BaseQuant.NF4:  # 4-bit codes, uint8 absmax per 64 (double quant), fp32 absmax per 256 blocks,
        # and per layer the fp32 code tables: 256 entries for the nested absmax, 16 for NF4
        return n_params / 2 + n_params / NF4_BLOCK + 4 * n_params / (NF4_BLOCK * NF4_DQ_BLOCK) + n_linears * 4 * (256 + 16)
    if quant == BaseQuant.INT8:  # int8 codes + fp32 scale per output row (SCB)
        return n_params + 4 * rows
    raise ValueError(quant)


def weight_bytes(shape: ModelShape, job: Job) -> dict[str, tuple[str, float]]:
    """Weights by kind, id -> (label, bytes): quantized or plain linears, and the rest (embeddings, norms, lm_head)."""
    wb = DTYPE_BYTES[job.weights_dtype]
    lin = shape.linear_params()
    rows = shape.linear_rows()
    rest = shape.param_count() - lin
    rest_bytes = 4 if job.method == Method.QLORA else wb  # prepare_model_for_kbit_training upcasts the rest to fp32
    out = {"weights.other": ("weights (other: embeddings, norms, lm_head)", rest * rest_bytes)}
    if shape.quantized_linear_bytes and job.base_quant == BaseQuant.NONE:
        out["weights.linear"] = (f"weights (linear layers, {shape.quantized_note or 'quantized'})", shape.quantized_linear_bytes)
    elif job.base_quant == BaseQuant.NONE:
        out["weights.linear"] = ("weights (linear layers)", lin * wb)
    else:
        n_linears = shape.linear_count()
        out["weights.linear"] = (f"weights (linear layers, {job.base_quant} + quant metadata)",
                                 quantized_linear_bytes(lin, rows, job.base_quant, n_linears))
    if job.uses_lora:
        out["lora"] = ("LoRA adapters (fp32)", 4 * lora_params(shape, job))  # PEFT keeps adapters in fp32
    return out


def trainable_tensors(shape: ModelShape, job: Job) -> list[int]:
    """Element counts of the trainable parameter tensors (an optimizer keeps state per tensor)."""
    lin = shape.linears()
    if job.uses_lora:
        targets = target_names(shape, job)
        per_layer = [n for name, (i, o) in lin.items() if name in targets
                     for n in (job.rank * i, o * job.rank) for _ in range(shape.copies(name))]
        return per_layer * shape.layers
    norm_tensors = 2 if shape.norm == "layer" else 1
    per_layer = [i * o for name, (i, o) in lin.items() for _ in range(shape.copies(name))]
    per_layer += [shape.hidden] * (shape.norms_per_layer * norm_tensors)
    if shape.bias:
        per_layer += [o for name, (_, o) in lin.items() for _ in range(shape.copies(name))]
    elif shape.qkv_bias:
        per_layer += [shape.q_dim, shape.kv_dim, shape.kv_dim]
    if shape.experts:
        per_layer.append(shape.hidden * shape.experts)
    rest = [shape.vocab * shape.hidden] + [shape.hidden] * norm_tensors
    rest += [shape.learned_positions * shape.hidden] if shape.learned_positions else []
    rest += [shape.lm_head_params()] if shape.lm_head_params() else []
    return per_layer * shape.layers + rest


def optimizer_state_bytes(shape: ModelShape, job: Job, state_bytes: int) -> tuple[float, float, float]:
    """(states on the device, states paged to unified memory, step temporaries) for job.optimizer.

    AdamW keeps two states per parameter; torch's foreach step allocates sqrt(v) for all parameters at
    once. bitsandbytes' 8-bit AdamW (0.50, optim/optimizer.py) keeps uint8 states with one fp32 absmax per
    block of 256 each, but fp32 states for tensors under 4096 elements; the paged variant pages tensors
    of 1e5 elements and more.
    """
    sizes = trainable_tensors(shape, job)
    total = sum(sizes)
    if job.optimizer == Optimizer.ADAMW:
        return 2 * total * state_bytes, 0, total * state_bytes
    if job.optimizer == Optimizer.SGD:
        return 0, 0, 0

    def eight_bit(n: int) -> float:
        return 8 * n if n < ADAM8_MIN_SIZE else 2 * n + 2 * 4 * -(-n // ADAM8_BLOCK)

    if job.optimizer == Optimizer.PAGED_ADAMW8BIT:
        return (sum(eight_bit(n) for n in sizes if n < ADAM8_PAGED_MIN), sum(eight_bit(n) for n in sizes if n >= ADAM8_PAGED_MIN), 0)
    return sum(eight_bit(n) for n in sizes), 0, 0


def kv_bytes(shape: ModelShape, job: Job, tokens: int, batch: int = 1) -> float:
    """The KV cache of `tokens` positions per sequence (`batch` sequences) over all layers, in the KV dtype (default:
    fp32 for fp32 weights, else 16-bit); sliding-window layers keep at most their window."""
    kv = DTYPE_BYTES[job.kv_dtype] if job.kv_dtype else (4 if job.weights_dtype == WeightsDtype.FP32 else 2)
    full = shape.layers - shape.sliding_layers
    kept = full * tokens + shape.sliding_layers * min(tokens, shape.sliding_window or tokens)
    return batch * kept * shape.kv_bytes_per_token(kv)
