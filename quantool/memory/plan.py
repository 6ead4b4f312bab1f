"""GPU-memory formulas for inference and training of a decoder-only LM: pure arithmetic, no torch.

The prediction targets `torch.cuda.max_memory_allocated()` for the standard recipes (see README,
"What is predicted"): HF transformers with sdpa attention; training = forward with labels, backward,
optimizer step, `zero_grad(set_to_none=True)`; LoRA = PEFT (adapters upcast to fp32, each LoRA module
casting its input to fp32); QLoRA = bitsandbytes NF4 + double quant, bf16 compute,
`prepare_model_for_kbit_training` (non-quantized params to fp32, gradient checkpointing on);
inference = `generate` with the default DynamicCache.

Activations are an inventory of the tensors autograd saves per decoder layer (the approach of
Korthikanti et al. 2022, "Reducing Activation Recomputation", Sec. 4.1, redone for SwiGLU, RMSNorm,
sdpa flash attention, LoRA and autocast casts), keyed so that tensors shared by several ops count once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from quantool.errors import QuantoolError
from quantool.memory.shapes import ModelShape

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
METHODS = ("inference", "full", "lora", "qlora", "qat", "quantize")
PTQ_METHODS = ("gptq", "awq", "rtn")
RUN_LAYER_CHUNK = 16  # samples per forward in quantool.model.layerwise.run_layer
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw8bit", "sgd")
QUANTS = ("none", "int8", "nf4")
NF4_BLOCK, NF4_DQ_BLOCK, ADAM8_BLOCK = 64, 256, 2048
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + kernels of torch, outside the caching allocator


@dataclass(frozen=True)
class Job:
    """What runs on the GPU. Defaults: bf16 weights, batch 1, 2048-token sequences."""

    method: str = "inference"
    batch: int = 1
    seq: int = 2048
    gen: int = 256
    weights_dtype: str = "bf16"
    autocast: bool = False
    optimizer: str = "adamw"
    grad_checkpointing: bool | None = None  # None: the method's default (on for qlora, as PEFT does)
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = ("all",)
    quant: str = "none"
    kv_dtype: str | None = None
    gpus: int = 1
    zero: int = 0
    ptq: str = "gptq"  # --method quantize: which algorithm's job
    nsamples: int = 128  # --method quantize: calibration windows of --seq tokens

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        """A Job from its asdict() form or a hand-written subset (JSON lists for lora_targets)."""
        return cls(**{**d, "lora_targets": tuple(d.get("lora_targets", ("all",)))})

    @property
    def training(self) -> bool:
        return self.method not in ("inference", "quantize")

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora") or (self.method == "qat" and self.lora_rank > 0)

    @property
    def checkpointing(self) -> bool:
        return self.method == "qlora" if self.grad_checkpointing is None else self.grad_checkpointing

    @property
    def base_quant(self) -> str:
        return "nf4" if self.method == "qlora" else self.quant

    def validate(self) -> "Job":
        for name, value, allowed in (("method", self.method, METHODS), ("optimizer", self.optimizer, OPTIMIZERS),
                                     ("quant", self.quant, QUANTS), ("weights-dtype", self.weights_dtype, ("bf16", "fp16", "fp32"))):
            if value not in allowed:
                raise QuantoolError(f"unknown --{name} {value!r}: choose one of {', '.join(allowed)}")
        if self.ptq not in PTQ_METHODS:
            raise QuantoolError(f"unknown --ptq {self.ptq!r}: choose one of {', '.join(PTQ_METHODS)}")
        for name, value in (("batch", self.batch), ("seq", self.seq), ("gpus", self.gpus), ("nsamples", self.nsamples)):
            if value < 1:
                raise QuantoolError(f"--{name} must be a positive integer, got {value}")
        if self.gen < 0 or self.lora_rank < 0:
            raise QuantoolError("--gen and --lora-rank must not be negative")
        if self.kv_dtype is not None and self.kv_dtype not in DTYPE_BYTES:
            raise QuantoolError(f"unknown --kv-dtype {self.kv_dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
        if self.zero not in (0, 1, 2, 3):
            raise QuantoolError(f"--zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.method == "qlora" and self.quant not in ("none", "nf4"):
            raise QuantoolError(f"--method qlora quantizes the base to nf4; it cannot use --quant {self.quant} (use --method lora --quant {self.quant})")
        if self.method in ("full", "qat") and self.quant != "none":
            raise QuantoolError(f"--method {self.method} trains every weight, so the base cannot be --quant {self.quant}: use --method lora or qlora")
        if self.uses_lora and self.lora_rank == 0:
            raise QuantoolError(f"--method {self.method} needs --lora-rank of at least 1")
        if self.zero and not self.training:
            raise QuantoolError("--zero applies to training; inference shards layers across --gpus instead")
        if self.autocast and self.weights_dtype != "fp32" and self.method == "full":
            raise QuantoolError("--autocast keeps fp32 master weights: use it with --weights-dtype fp32 (or drop it for pure bf16)")
        return self


@dataclass
class Plan:
    """A prediction: the components live at the peak, and the peak itself."""

    shape: ModelShape
    job: Job
    components: dict[str, float]
    phase: str
    params: int
    trainable_params: int
    phases: dict[str, float] = field(default_factory=dict)
    outside_allocator: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return int(sum(self.components.values()))

    @property
    def device_bytes(self) -> int:
        """What nvidia-smi would show: the peak plus what lives outside the caching allocator."""
        return self.peak_bytes + int(sum(self.outside_allocator.values()))


# -- building blocks -------------------------------------------------------------------------------

def _target_names(shape: ModelShape, job: Job) -> set[str]:
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


def lora_params(shape: ModelShape, job: Job) -> int:
    targets = _target_names(shape, job)
    per_layer = 0
    for name, (i, o) in shape.linears().items():
        if name in targets:
            per_layer += job.lora_rank * (i + o) * shape.copies(name)
    return per_layer * shape.layers


def quantized_linear_bytes(n_params: int, rows: int, quant: str, n_linears: int) -> float:
    """Storage of bitsandbytes-quantized linear weights (data + quantization metadata)."""
    if quant == "nf4":  # 4-bit codes, uint8 absmax per 64 (double quant), fp32 absmax per 256 blocks,
        # and per layer the fp32 code tables: 256 entries for the nested absmax, 16 for NF4
        return n_params / 2 + n_params / NF4_BLOCK + 4 * n_params / (NF4_BLOCK * NF4_DQ_BLOCK) + n_linears * 4 * (256 + 16)
    if quant == "int8":  # int8 codes + fp32 scale per output row (SCB)
        return n_params + 4 * rows
    raise ValueError(quant)


def weight_bytes(shape: ModelShape, job: Job) -> dict[str, float]:
    """Weights by kind: quantized or plain linears, and the rest (embeddings, norms, lm_head)."""
    wb = DTYPE_BYTES[job.weights_dtype]
    lin = shape.linear_params_per_layer() * shape.layers
    rows = shape.layers * sum(o * shape.copies(n) for n, (_, o) in shape.linears().items())
    rest = shape.param_count() - lin
    rest_bytes = 4 if job.method == "qlora" else wb  # prepare_model_for_kbit_training upcasts the rest to fp32
    out = {"weights (other: embeddings, norms, lm_head)": rest * rest_bytes}
    if job.base_quant == "none":
        out["weights (linear layers)"] = lin * wb
    else:
        n_linears = shape.layers * sum(shape.copies(n) for n in shape.linears())
        out[f"weights (linear layers, {job.base_quant} + quant metadata)"] = quantized_linear_bytes(lin, rows, job.base_quant, n_linears)
    if job.uses_lora:
        out["LoRA adapters (fp32)"] = 4 * lora_params(shape, job)  # PEFT keeps adapters in fp32
    return out


def _stream_bytes(job: Job) -> int:
    """dtype of the residual stream: the embedding's dtype."""
    if job.method == "qlora" or job.weights_dtype == "fp32":
        return 4
    return DTYPE_BYTES[job.weights_dtype]


class _Saved:
    """Tensors kept for backward, keyed by identity so shared tensors count once."""

    def __init__(self):
        self.items: dict[str, float] = {}

    def add(self, key: str, nbytes: float):
        self.items.setdefault(key, nbytes)

    def total(self) -> float:
        return sum(self.items.values())


def _linear_saves(saved: _Saved, name: str, x_key: str, x_bytes: int, width: int, mode: str, job: Job) -> int:
    """Record what one linear saves; return its output's dtype bytes.

    mode: "full" (weight trains), "frozen", "lora" (frozen base + fp32 adapter).
    """
    compute = 2 if job.autocast else x_bytes
    if mode == "full":
        if job.autocast and x_bytes != 2:
            saved.add(f"{name}.in_bf16", 2 * width)  # autocast casts the input per op, mm saves the copy
        else:
            saved.add(x_key, x_bytes * width)
        return compute
    if mode == "lora":
        adapter = 2 if job.autocast else 4
        if adapter == x_bytes:
            saved.add(x_key, x_bytes * width)
        else:
            saved.add(f"{name}.lora_in", adapter * width)  # PEFT's per-module cast of the input
        saved.add(f"{name}.lora_mid", adapter * job.lora_rank)
    if job.base_quant == "int8":
        saved.add(x_key, x_bytes * width)  # bnb MatMul8bitLt keeps its input A whenever it needs a gradient
    return x_bytes if job.base_quant != "none" else compute  # bnb casts its output back to the input dtype


def _norm_saves(saved: _Saved, key: str, x_bytes: int, hidden: int, trainable: bool, layer_norm: bool) -> int:
    """RMSNorm (transformers): fp32 upcast saved by pow/mul, rsqrt, and the normalized input if the weight trains."""
    if layer_norm:
        saved.add(f"{key}.x", x_bytes * hidden)
        saved.add(f"{key}.stats", 8)
        return x_bytes
    saved.add(f"{key}.x_fp32", 4 * hidden)
    saved.add(f"{key}.rsqrt", 4)
    if trainable:
        saved.add(f"{key}.normed", x_bytes * hidden)
    return x_bytes


def layer_saved_bytes_per_token(shape: ModelShape, job: Job) -> float:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing)."""
    return sum(_layer_saved_halves(shape, job))


def _layer_saved_halves(shape: ModelShape, job: Job) -> tuple[float, float]:
    """What one layer saves per token: (attention block with its norm, MLP block with its norm)."""
    saved = _Saved()
    targets = _target_names(shape, job)
    full = _trains_every_weight(job)
    mode = lambda n: "full" if full else ("lora" if n in targets else "frozen")  # noqa: E731
    sb = _stream_bytes(job)
    layer_norm = shape.norm == "layer"

    y = _norm_saves(saved, "attn_norm", sb, shape.hidden, full, layer_norm)
    q_b = _linear_saves(saved, "q", "attn_norm.out", y, shape.hidden, mode("q_proj"), job)
    k_b = _linear_saves(saved, "k", "attn_norm.out", y, shape.hidden, mode("k_proj"), job)
    v_b = _linear_saves(saved, "v", "attn_norm.out", y, shape.hidden, mode("v_proj"), job)
    # q * cos promotes to the stream dtype (cos is cast to the hidden states' dtype); autocast casts to bf16
    attn_b = 2 if job.autocast else max(q_b, k_b, v_b, sb)
    saved.add("attn.q", attn_b * shape.q_dim)  # flash/efficient sdpa saves q, k, v, out and logsumexp
    saved.add("attn.k", attn_b * shape.kv_dim)
    saved.add("attn.v", attn_b * shape.kv_dim)
    saved.add("attn.out", attn_b * shape.q_dim)
    saved.add("attn.lse", 4 * shape.heads)
    _linear_saves(saved, "o", "attn.out", attn_b, shape.q_dim, mode("o_proj"), job)  # a view of sdpa's output
    attention = saved.total()

    y = _norm_saves(saved, "mlp_norm", sb, shape.hidden, full, layer_norm)
    if shape.mlp == "gated":
        g_b = _linear_saves(saved, "gate", "mlp_norm.out", y, shape.hidden, mode("gate_proj"), job)
        u_b = _linear_saves(saved, "up", "mlp_norm.out", y, shape.hidden, mode("up_proj"), job)
        act_b = max(g_b, u_b)
        saved.add("mlp.gate", g_b * shape.intermediate)  # silu saves its input
        saved.add("mlp.act", g_b * shape.intermediate)  # mul saves both factors
        saved.add("mlp.up", u_b * shape.intermediate)
        _linear_saves(saved, "down", "mlp.prod", act_b, shape.intermediate, mode("down_proj"), job)
    else:
        f_b = _linear_saves(saved, "fc1", "mlp_norm.out", y, shape.hidden, mode("fc1"), job)
        saved.add("mlp.act_in", f_b * shape.intermediate)
        _linear_saves(saved, "fc2", "mlp.act_out", f_b, shape.intermediate, mode("fc2"), job)
    return attention, saved.total() - attention


def head_saved_bytes_per_token(shape: ModelShape, job: Job) -> float:
    """Final norm and lm_head inputs, plus the int64 labels transformers keeps (labels and shifted labels)."""
    saved = _Saved()
    full = _trains_every_weight(job)
    y = _norm_saves(saved, "final_norm", _stream_bytes(job), shape.hidden, full, shape.norm == "layer")
    _linear_saves(saved, "lm_head", "final_norm.out", y, shape.hidden, "full" if full else "frozen", replace(job, quant="none"))
    return saved.total() + 8 * (2 if full else 1)  # int64 shifted labels (nll_loss); input ids if the embedding trains


def rope_bytes(shape: ModelShape, job: Job) -> float:
    """cos and sin, shared by the batch and all layers."""
    return 2 * job.seq * shape.head_dim * _stream_bytes(job)


def activation_bytes(shape: ModelShape, job: Job) -> float:
    """Everything autograd keeps from forward to backward, logits and loss buffers excepted."""
    tokens = job.batch * job.seq
    if job.checkpointing:
        per_layer, first_norm = shape.hidden * _stream_bytes(job), 0
    else:
        per_layer = layer_saved_bytes_per_token(shape, job)
        # a frozen embedding's output needs no gradient, so layer 0's first norm keeps nothing of its input
        first_norm = (4 * shape.hidden + 4 if shape.norm == "rms" else _stream_bytes(job) * shape.hidden + 8) if job.uses_lora else 0
        if job.base_quant == "int8":  # nor do layer 0's int8 q/k/v keep their input
            first_norm += _stream_bytes(job) * shape.hidden
    return tokens * (shape.layers * per_layer - first_norm + head_saved_bytes_per_token(shape, job)) + rope_bytes(shape, job)


def _logits_bytes(shape: ModelShape, job: Job, tokens: int) -> tuple[float, float, float]:
    """(forward, backward-start, after log_softmax backward) bytes of the logits and cross-entropy buffers.

    transformers' ForCausalLMLoss upcasts logits to fp32 and calls cross_entropy (log_softmax + nll);
    at the start of backward the saved log-probs, nll's dense gradient and log_softmax's output gradient
    coexist: three fp32 [tokens, vocab] tensors.
    """
    lb = 4 if (job.method == "qlora" or (job.weights_dtype == "fp32" and not job.autocast)) else 2
    per = tokens * shape.vocab
    fwd = per * (lb + (4 if lb != 4 else 0) + 4)
    bwd = per * 12
    after = per * (4 + lb)  # log_softmax's input gradient and its cast back to the logits' dtype
    return fwd, bwd, after


def _kv_bytes(shape: ModelShape, job: Job, tokens: int) -> float:
    kv = DTYPE_BYTES[job.kv_dtype] if job.kv_dtype else (4 if job.weights_dtype == "fp32" else 2)
    return 2 * shape.layers * tokens * shape.kv_dim * kv


def _largest_linear(shape: ModelShape) -> int:
    return max(i * o for i, o in shape.linears().values())


def _top_layer_backward(shape: ModelShape, job: Job, tokens: int, grad_bytes: int) -> dict[str, float]:
    """Bytes above the saved activations (and lm_head's gradient) at three moments of the top layer's backward.

    Followed op by op from the autograd formulas of transformers' Llama block (and checked with
    `trace.LiveTensorBytes`): the final RMSNorm's backward holds five fp32 [T, h] temporaries; in the
    MLP, mul's backward holds grad(prod), grad(silu), grad(up) once prod is released; sdpa's backward
    holds the gradients of q, k, v and of its output. Blocks already passed have released their saved
    tensors and left their weight gradients. With checkpointing the layer's saved tensors are rebuilt first.
    """
    h, inter, T = shape.hidden, shape.intermediate, tokens
    gb = 2 if job.autocast else _stream_bytes(job)
    attn_saved, mlp_saved = (T * b for b in _layer_saved_halves(shape, job))
    rebuilt = attn_saved + mlp_saved if job.checkpointing else 0
    # what the final norm's backward releases: its normed output and lm_head's input (not its fp32 input or labels)
    head_released = T * (head_saved_bytes_per_token(shape, job) - 4 * h - 4 - 8 * (2 if _trains_every_weight(job) else 1))
    lin = shape.linears()
    mlp_names = shape.mlp_names()
    w_grads = lambda names: sum(lin[n][0] * lin[n][1] * shape.copies(n) for n in names) * grad_bytes if _trains_every_weight(job) else 0  # noqa: E731
    stream_grad = T * h * gb
    # bnb's MatMul4Bit.backward dequantizes the weight in its bf16 compute dtype (Linear4bit casts inputs to it)
    deq = 2 * max(lin[n][0] * lin[n][1] for n in mlp_names) if job.base_quant == "nf4" else 0
    down = T * inter * gb + deq  # grad(prod) from down_proj's backward
    if mlp_names[-1] in _target_names(shape, job):  # a LoRA down_proj's adapter gradient comes first, cast if needed
        adapter = 2 if job.autocast else 4
        down = T * inter * (adapter + (gb if gb != adapter else 0)) + deq
    mlp = max(down, 2 * T * inter * gb) if shape.mlp == "gated" else down
    attn = T * gb * (2 * shape.q_dim + 2 * shape.kv_dim)
    return {
        "backward (final norm)": T * h * 20 - head_released,
        "backward (top layer, MLP)": rebuilt - head_released + stream_grad + mlp + w_grads(mlp_names[-1:]),
        "backward (top layer, attention)": rebuilt - head_released - mlp_saved + stream_grad + attn + w_grads([*mlp_names, "o_proj"]),
    }


def _trains_every_weight(job: Job) -> bool:
    """Full fine-tuning or full QAT (no adapters)."""
    return job.method in ("full", "qat") and not job.uses_lora


# -- phases ------------------------------------------------------------------------------------------

def _inference(shape: ModelShape, job: Job, weights: dict[str, float]) -> Plan:
    b, s, g = job.batch, job.seq, job.gen
    wb = DTYPE_BYTES[job.weights_dtype]
    shard = job.gpus
    w = {k: v / shard for k, v in weights.items()}
    kv_prefill = _kv_bytes(shape, job, b * s) / shard
    kv_full = _kv_bytes(shape, job, b * (s + g)) / shard
    # Prefill: live tensors inside the busiest sub-block of one layer (MLP: silu(gate), up, product).
    mlp_live = (3 if shape.mlp == "gated" else 2) * shape.intermediate * wb
    attn_live = (2 * shape.q_dim + 2 * shape.kv_dim + shape.q_dim) * wb
    # Alive beside them: the embedding output (referenced until the model's forward returns), the layer's
    # input, the attention residual sum and the normed input; and the rotary cos/sin.
    stream = (4 if shape.layers > 1 else 3) * shape.hidden * wb
    prefill_act = b * s * (max(mlp_live, attn_live, 8 * shape.hidden) + stream) + 2 * s * shape.head_dim * wb
    if job.base_quant == "nf4":
        prefill_act += _largest_linear(shape) * wb  # bnb dequantizes the weight for multi-row matmuls
    elif job.base_quant == "int8":
        prefill_act += b * s * max(o for _, o in shape.linears().values()) * 4  # int32 accumulator
    # generate computes only the last position's logits and copies them to fp32; the previous step's fp32
    # copy is still referenced while the next step runs, and while its own copy is made
    logits = b * shape.vocab * (wb + 4)
    held = b * shape.vocab * 4
    cat_growth = _kv_bytes(shape, job, b * (s + g)) / shape.layers / 2 / shard  # torch.cat copy of one layer's K
    phases = {
        "prefill": sum(w.values()) + kv_prefill + max(prefill_act, logits),
        "decode (end)": sum(w.values()) + kv_full + held + max(cat_growth, logits),
    }
    phase = max(phases, key=phases.get)
    comps = dict(w)
    if phase == "prefill":
        comps["KV cache"] = kv_prefill
        comps["activations (prefill, transient)" if prefill_act >= logits else "logits (last token, + fp32 copy)"] = max(prefill_act, logits)
    else:
        comps["KV cache"] = kv_full
        comps["logits (previous step's fp32 copy)"] = held
        comps["KV cache growth (torch.cat copy)" if cat_growth >= logits else "logits (last token, + fp32 copy)"] = max(cat_growth, logits)
    notes = [f"prefill {s} tokens, then {g} new tokens, batch {b}"]
    if job.gpus > 1:
        notes.append(f"layers split evenly over {job.gpus} GPUs (device_map='auto'); per-GPU figures")
    return Plan(shape, job, comps, phase, shape.param_count(), 0, phases, notes=notes)


def _training(shape: ModelShape, job: Job, weights: dict[str, float]) -> Plan:
    b, s, n = job.batch, job.seq, job.gpus
    tokens = b * s
    params = shape.param_count()
    trainable = lora_params(shape, job) if job.uses_lora else params
    tb = 4 if (job.uses_lora or job.weights_dtype == "fp32") else DTYPE_BYTES[job.weights_dtype]
    grads = trainable * tb
    if job.optimizer == "adamw":
        states, step_tmp = 2 * trainable * tb, trainable * tb  # foreach AdamW: sqrt(v) temporary of all params
    elif job.optimizer in ("adamw8bit", "paged-adamw8bit"):
        states, step_tmp = 2 * trainable + 2 * 4 * trainable / ADAM8_BLOCK, 0
    else:
        states, step_tmp = 0, 0
    outside = {}
    if job.optimizer == "paged-adamw8bit":
        outside["optimizer states (paged, unified memory)"] = states
        states = 0

    comps_w = dict(weights)
    if job.zero >= 1:
        states, step_tmp = states / n, step_tmp / n
    if job.zero >= 2:
        grads = grads / n
    if job.zero >= 3:
        comps_w = {k: v / n for k, v in comps_w.items()}
        comps_w["ZeRO-3 gathered layers (2 in flight)"] = 2 * sum(weights.values()) / shape.layers
    if n > 1 and job.zero == 0:
        comps_w["DDP gradient buckets"] = grads

    acts = activation_bytes(shape, job)
    extra = {}
    if job.autocast:
        extra["bf16 weight copies (autocast)"] = (shape.linear_params_per_layer() * shape.layers + (shape.lm_head_params() or shape.vocab * shape.hidden)) * 2
    if job.method == "qat":
        extra["fake-quantized weight copies"] = shape.linear_params_per_layer() * shape.layers * DTYPE_BYTES[job.weights_dtype]
    logits_fwd, logits_bwd, logits_after = _logits_bytes(shape, job, tokens)
    lm_grad = shape.vocab * shape.hidden * tb if not job.uses_lora else 0
    top = _top_layer_backward(shape, job, tokens, tb)
    tied_grad = 2 * shape.vocab * shape.hidden * tb if shape.tied and _trains_every_weight(job) else 0
    # forward(labels=...) fills a DynamicCache (use_cache stays on unless checkpointing turns it off) that lives
    # until forward returns, so through the loss; its k/v are the tensors sdpa saves, except under autocast,
    # where sdpa gets bf16 casts of the fp32 rotated k/v the cache holds
    cache = 2 * shape.layers * tokens * shape.kv_dim * 4 if job.autocast and not job.checkpointing else 0
    W, X = sum(comps_w.values()), sum(extra.values())
    phases = {
        "forward (loss)": W + states + X + acts + logits_fwd + cache,
        "backward (start)": W + states + X + acts + max(logits_bwd, logits_after + lm_grad),
        **{phase: W + states + X + acts + lm_grad + v for phase, v in top.items()},
        # last, the embedding's gradient: a tied embedding's arrives as a second dense [vocab, hidden] tensor
        # that AccumulateGrad adds to lm_head's out of place, so three such tensors coexist
        "backward (end)": W + states + grads + tied_grad,
        "optimizer step": W + states + grads + step_tmp,
    }
    phase = max(phases, key=phases.get)
    comps = dict(comps_w)
    comps["optimizer states"] = states
    if phase in ("backward (end)", "optimizer step"):
        comps["gradients"] = grads
        comps["tied embedding's gradient + sum (transient)"] = tied_grad if phase == "backward (end)" else 0
        comps["optimizer step temporaries"] = step_tmp if phase == "optimizer step" else 0
    else:
        comps.update(extra)
        comps["activations (saved for backward)"] = acts
        if phase == "forward (loss)":
            comps["logits + loss buffers"] = logits_fwd
            comps["KV cache of the training forward (autocast)"] = cache
        elif phase == "backward (start)":
            comps["logits + loss buffers"] = phases[phase] - (W + states + X + acts)
        else:
            comps["gradients (lm_head)"] = lm_grad
            comps["backward temporaries (top layer" + (", recomputed" if job.checkpointing else "") + ")"] = top[phase]
    comps = {k: v for k, v in comps.items() if v}
    notes = []
    if job.checkpointing:
        notes.append("gradient checkpointing: each layer keeps only its input; one layer is recomputed at a time")
    if n > 1:
        notes.append(f"{n} GPUs, ZeRO stage {job.zero}: per-GPU figures")
    return Plan(shape, job, comps, phase, params, trainable, phases, outside, notes)


def _quantization(shape: ModelShape, job: Job) -> Plan:
    """quantool's own layer-by-layer GPTQ/AWQ/RTN job (fp16 on the GPU): one layer's weights and work at a time."""
    wb, h, inter = 2, shape.hidden, shape.intermediate
    lin = shape.linears()
    layer_w = (shape.linear_params_per_layer() + shape.small_params_per_layer()) * wb
    tokens = min(RUN_LAYER_CHUNK, job.nsamples) * job.seq
    forward = tokens * wb * (2 * h + max(3 * inter, 3 * shape.q_dim + 2 * shape.kv_dim))
    capture = shape.embedding_params() * wb + job.seq * h * 4
    comps = {"one decoder layer's weights (fp16)": layer_w, "layer forward on one chunk of samples": forward}
    if job.ptq == "gptq":
        mlp = shape.mlp_names()
        groups = [["q_proj", "k_proj", "v_proj"], ["o_proj"], list(mlp[:-1]), [mlp[-1]]]
        hess = max(sum(4 * lin[n][0] ** 2 for n in g) for g in groups)
        work = max(4 * 4 * i * o + 3 * 4 * i * i for i, o in lin.values())
        comps["Hessians of one sub-layer group (fp32)"] = hess
        comps["GPTQ working copies (W, Q, H^-1; fp32)"] = work
    elif job.ptq == "awq":
        t_all = job.nsamples * job.seq
        inputs = {"q_proj": h, "o_proj": shape.q_dim, shape.mlp_names()[0]: h, shape.mlp_names()[-1]: inter}
        comps["recorded linear inputs, all samples (fp16)"] = t_all * wb * sum(inputs.values())
        comps["per-linear fp32 copies of those inputs"] = t_all * 4 * sum(i for i, _ in lin.values())
        comps["scale-search block outputs (fp32)"] = 2 * t_all * 4 * h
    else:
        comps["RTN working copies (fp32)"] = max(3 * 4 * i * o for i, o in lin.values())
    layer_phase = sum(comps.values())
    phases = {"capture layer-0 inputs": capture, "quantize one layer": layer_phase}
    phase = max(phases, key=phases.get)
    if phase != "quantize one layer":
        comps = {"embeddings (fp16) + one sample": capture}
    notes = [f"{job.ptq.upper()} job: {job.nsamples} calibration samples x {job.seq} tokens, layers quantized one at a time",
             "calibration hidden states stay in host memory: "
             f"{2 * job.nsamples * job.seq * h * wb / 2**30:.2f} GiB (inputs and outputs of the current layer)"]
    return Plan(shape, job, comps, phase, shape.param_count(), 0, phases, notes=notes)


def estimate(shape: ModelShape, job: Job) -> Plan:
    """Predict the peak of torch.cuda.max_memory_allocated() for this job on this model."""
    job.validate()
    if job.method == "quantize":
        plan = _quantization(shape, job)
    elif job.method == "inference":
        plan = _inference(shape, job, weight_bytes(shape, job))
    else:
        plan = _training(shape, job, weight_bytes(shape, job))
    plan.outside_allocator["CUDA context (approx.)"] = CUDA_CONTEXT_BYTES
    plan.outside_allocator["allocator slack (approx. 5%)"] = 0.05 * plan.peak_bytes
    if shape.note:
        plan.notes.insert(0, shape.note)
    return plan


def solve(shape: ModelShape, job: Job, budget: int, what: str) -> tuple[int, Plan | None]:
    """Largest batch or seq whose device footprint fits in budget bytes (0 if even 1 does not)."""
    if what not in ("batch", "seq"):
        raise QuantoolError(f"--solve takes batch or seq, not {what!r}")
    fits = lambda v: estimate(shape, replace(job, **{what: v})).device_bytes <= budget  # noqa: E731
    if not fits(1):
        return 0, None
    hi = 1
    limit = 1 << 24
    while hi < limit and fits(hi * 2):
        hi *= 2
    lo, hi = hi, min(hi * 2, limit)
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, estimate(shape, replace(job, **{what: lo}))

