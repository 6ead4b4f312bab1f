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
from quantool.memory.attention import attention_memory
from quantool.memory.cuda import HOPPER, cublas_handles, cublas_workspace_bytes, parse_capability
from quantool.memory.dtypes import DTYPE_BYTES
from quantool.memory.quantize import quantization_memory
from quantool.memory.shapes import ModelShape

METHODS = ("inference", "full", "lora", "qlora", "qat", "quantize")
PTQ_METHODS = ("gptq", "awq", "rtn")
OPTIMIZERS = ("adamw", "adamw8bit", "paged-adamw8bit", "sgd")
OPTIMIZER_ALIASES = {"paged_adamw8bit": "paged-adamw8bit"}  # bitsandbytes' class name, as scripts spell it
QUANTS = ("none", "int8", "nf4")
NF4_BLOCK, NF4_DQ_BLOCK = 64, 256
ADAM8_BLOCK, ADAM8_MIN_SIZE, ADAM8_PAGED_MIN = 256, 4096, 100_000  # bitsandbytes 0.50 optim/optimizer.py
# Outside max_memory_allocated(), measured on the H100 jobs of tests/data/memory_h100.json (torch 2.11+cu130):
# device_used - peak_reserved was 751-767 MiB (CUDA context, kernels, library handles), and the caching allocator
# reserved 4-32% more than its allocated peak (median 16.5%).
CUDA_CONTEXT_BYTES = 767 * 2**20
ALLOCATOR_CACHE = 0.165


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
    ptq_device: str = "cuda"  # --method quantize: where the layers are quantized (cpu: all on the host)
    keep_outputs: bool = False  # the loop keeps the model output (and its logits) until the next forward returns
    compute_capability: str = HOPPER  # the card's, for the cuBLAS workspace and the attention kernel

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        """A Job from its asdict() form or a hand-written subset (JSON lists for lora_targets)."""
        return cls(**{**d, "lora_targets": tuple(d.get("lora_targets", ("all",))),
                      "optimizer": OPTIMIZER_ALIASES.get(d.get("optimizer", "adamw"), d.get("optimizer", "adamw"))})

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
        if self.ptq_device not in ("cuda", "cpu"):
            raise QuantoolError(f"unknown --ptq-device {self.ptq_device!r}: choose cuda or cpu")
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
        if self.keep_outputs and not self.training:
            raise QuantoolError(f"--keep-outputs describes a training loop that keeps the model output; --method {self.method} has none")
        parse_capability(self.compute_capability)
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
    traced_phases: dict[str, float] = field(default_factory=dict)  # the same phases without CUDA-only terms
    host: dict[str, float] = field(default_factory=dict)  # host RAM at the peak (--method quantize)

    @property
    def peak_bytes(self) -> int:
        return int(sum(self.components.values()))

    @property
    def traced_peak_bytes(self) -> int:
        """What a CPU trace of the same job (`trace.LiveTensorBytes`) should see: no CUDA-only terms."""
        return int(max(self.traced_phases.values()))

    @property
    def host_bytes(self) -> int:
        return int(sum(self.host.values()))

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


def attention_backend(shape: ModelShape, job: Job) -> str:
    """The sdpa kernel CUDA runs for this job: cudnn, flash, efficient or math."""
    return _attention(shape, job).backend


def _attention(shape: ModelShape, job: Job):
    """The attention core of one layer: q/k/v are bf16 under autocast, else in the residual stream's dtype."""
    dtype = "bf16" if job.autocast else ("fp32" if _stream_bytes(job) == 4 else job.weights_dtype)
    return attention_memory(shape, job.batch, job.seq, dtype, job.compute_capability)


def _layer_saved_halves(shape: ModelShape, job: Job) -> tuple[float, float]:
    """What one layer saves per token: (attention block with its norm, MLP block with its norm)."""
    saved = _Saved()
    targets = _target_names(shape, job)
    full = _trains_every_weight(job)
    mode = lambda n: "full" if full else ("lora" if n in targets else "frozen")  # noqa: E731
    sb = _stream_bytes(job)
    layer_norm = shape.norm == "layer"

    y = _norm_saves(saved, "attn_norm", sb, shape.hidden, full, layer_norm)
    for name, width in (("q", shape.hidden), ("k", shape.hidden), ("v", shape.hidden)):
        _linear_saves(saved, name, "attn_norm.out", y, width, mode(f"{name}_proj"), job)
    core = _attention(shape, job)
    for key, nbytes in core.saved.items():
        saved.add(key, nbytes)
    attn_b = 2 if job.autocast else sb
    _linear_saves(saved, "o", "attn.out", attn_b, shape.q_dim, mode("o_proj"), job)  # a copy of the kernel's output
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


def _logits_dtype_bytes(job: Job) -> int:
    """lm_head's output: fp32 where lm_head is fp32 (QLoRA's prepared model, fp32 training), else bf16/fp16."""
    return 4 if (job.method == "qlora" or (job.weights_dtype == "fp32" and not job.autocast)) else 2


def _logits_bytes(shape: ModelShape, job: Job, tokens: int) -> tuple[float, float, float]:
    """(forward, backward-start, after log_softmax backward) bytes of the logits and cross-entropy buffers.

    transformers' ForCausalLMLoss upcasts logits to fp32 and calls cross_entropy (log_softmax + nll);
    at the start of backward the saved log-probs, nll's dense gradient and log_softmax's output gradient
    coexist: three fp32 [tokens, vocab] tensors.
    """
    lb = _logits_dtype_bytes(job)
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


def _top_layer_backward(shape: ModelShape, job: Job, tokens: int, grad_bytes: int) -> dict[str, tuple[float, float]]:
    """(bytes, CUDA-only bytes) above the saved activations (and lm_head's gradient) at moments of the top layer's backward.

    Followed op by op from the autograd formulas of transformers' Llama block (and checked with
    `trace.LiveTensorBytes`): the final RMSNorm's backward holds five fp32 [T, h] temporaries; in the
    MLP, mul's backward holds grad(prod), grad(silu), grad(up) once prod is released; the attention
    kernel's backward holds the gradients of q, k, v and of its output (`attention.py` for each kernel's own).
    Blocks already passed have released their saved tensors and left their weight gradients. With
    checkpointing the layer's saved tensors are rebuilt first, and a math-path attention's recomputed
    forward holds its [B, H, S, S] temporaries beside the upper layers' gradients.
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
    core = _attention(shape, job)
    # the math path's backward peaks after o_proj's backward has released what o_proj saved
    o_released = attn_saved - _attention_half_before_output(shape, job, T) if core.forward else 0
    moments = {
        "backward (final norm)": (T * h * 20 - head_released, 0),
        "backward (top layer, MLP)": (rebuilt - head_released + stream_grad + mlp + w_grads(mlp_names[-1:]), 0),
        "backward (top layer, attention)": (rebuilt - head_released - mlp_saved - o_released + stream_grad + core.backward
                                            + w_grads([*mlp_names, "o_proj"]), core.backward_cuda),
    }
    if job.checkpointing and core.forward:
        moments["backward (top layer, recomputed attention)"] = (_attention_half_before_output(shape, job, T) - head_released
                                                                 + stream_grad + core.forward, core.forward_cuda)
    return moments


def _forward_attention(shape: ModelShape, job: Job, tokens: int) -> tuple[float, float]:
    """(bytes, CUDA-only bytes) above the other activations while the top layer's math-path attention runs in a
    forward without checkpointing: all layers below have saved theirs, the top one its attention half."""
    core = _attention(shape, job)
    attn_saved, mlp_saved = (tokens * b for b in _layer_saved_halves(shape, job))
    below = activation_bytes(shape, job) - rope_bytes(shape, job) - tokens * head_saved_bytes_per_token(shape, job) - attn_saved - mlp_saved
    residual = 2 * tokens * shape.hidden * _stream_bytes(job)  # the layer's input and the embedding output
    return below + _attention_half_before_output(shape, job, tokens) + residual + rope_bytes(shape, job) + core.forward, core.forward_cuda


def _attention_half_before_output(shape: ModelShape, job: Job, tokens: int) -> float:
    """What the attention half has saved when its kernel runs: all but o_proj's saves of the kernel's output."""
    attn_saved, _ = _layer_saved_halves(shape, job)
    o_saved = _Saved()
    targets = _target_names(shape, job)
    mode = "full" if _trains_every_weight(job) else ("lora" if "o_proj" in targets else "frozen")
    _linear_saves(o_saved, "o", "attn.out", 2 if job.autocast else _stream_bytes(job), shape.q_dim, mode, job)
    return tokens * (attn_saved - o_saved.total())


def _trainable_tensors(shape: ModelShape, job: Job) -> list[int]:
    """Element counts of the trainable parameter tensors (an optimizer keeps state per tensor)."""
    lin = shape.linears()
    if job.uses_lora:
        targets = _target_names(shape, job)
        per_layer = [n for name, (i, o) in lin.items() if name in targets
                     for n in (job.lora_rank * i, o * job.lora_rank) for _ in range(shape.copies(name))]
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
    sizes = _trainable_tensors(shape, job)
    total = sum(sizes)
    if job.optimizer == "adamw":
        return 2 * total * state_bytes, 0, total * state_bytes
    if job.optimizer == "sgd":
        return 0, 0, 0
    def eight_bit(n: int) -> float:
        return 8 * n if n < ADAM8_MIN_SIZE else 2 * n + 2 * 4 * -(-n // ADAM8_BLOCK)
    if job.optimizer == "paged-adamw8bit":
        return (sum(eight_bit(n) for n in sizes if n < ADAM8_PAGED_MIN), sum(eight_bit(n) for n in sizes if n >= ADAM8_PAGED_MIN), 0)
    return sum(eight_bit(n) for n in sizes), 0, 0


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
    core = _attention(shape, job)
    if core.forward:  # math path: q, the expanded k and v, the mask, masked scores and probabilities
        attn_live = (sum(core.saved[k] for k in ("attn.q", "attn.k", "attn.v")) + 2 * core.saved["attn.probs"]) + core.forward / (b * s)
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
    traced = {
        "prefill": sum(w.values()) + kv_prefill + max(prefill_act, logits),
        "decode (end)": sum(w.values()) + kv_full + held + max(cat_growth, logits),
    }
    workspace = cublas_handles(False) * cublas_workspace_bytes(job.compute_capability)
    phases = {k: v + workspace + (core.forward_cuda if k == "prefill" and prefill_act >= logits else 0) for k, v in traced.items()}
    phase = max(phases, key=phases.get)
    comps = dict(w)
    comps["cuBLAS workspace (CUDA only)"] = workspace
    if phase == "prefill" and prefill_act >= logits and core.forward_cuda:
        comps["attention kernel temporaries (CUDA only)"] = core.forward_cuda
    if phase == "prefill":
        comps["KV cache"] = kv_prefill
        comps["activations (prefill, transient)" if prefill_act >= logits else "logits (last token, + fp32 copy)"] = max(prefill_act, logits)
    else:
        comps["KV cache"] = kv_full
        comps["logits (previous step's fp32 copy)"] = held
        comps["KV cache growth (torch.cat copy)" if cat_growth >= logits else "logits (last token, + fp32 copy)"] = max(cat_growth, logits)
    notes = [f"prefill {s} tokens, then {g} new tokens, batch {b}; {core.backend} attention on compute capability {job.compute_capability}"]
    if job.gpus > 1:
        notes.append(f"layers split evenly over {job.gpus} GPUs (device_map='auto'); per-GPU figures")
    return Plan(shape, job, comps, phase, shape.param_count(), 0, phases, notes=notes, traced_phases=traced)


def _training(shape: ModelShape, job: Job, weights: dict[str, float]) -> Plan:
    b, s, n = job.batch, job.seq, job.gpus
    tokens = b * s
    params = shape.param_count()
    trainable = lora_params(shape, job) if job.uses_lora else params
    tb = 4 if (job.uses_lora or job.weights_dtype == "fp32") else DTYPE_BYTES[job.weights_dtype]
    grads = trainable * tb
    states, paged, step_tmp = optimizer_state_bytes(shape, job, tb)
    outside = {"optimizer states (paged, unified memory)": paged} if paged else {}

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
    # `out = model(...)` stays referenced through backward, the optimizer step and the next forward
    kept = tokens * shape.vocab * _logits_dtype_bytes(job) if job.keep_outputs else 0
    logits_fwd, logits_bwd, logits_after = _logits_bytes(shape, job, tokens)
    lm_grad = shape.vocab * shape.hidden * tb if not job.uses_lora else 0
    top = _top_layer_backward(shape, job, tokens, tb)
    tied_grad = 2 * shape.vocab * shape.hidden * tb if shape.tied and _trains_every_weight(job) else 0
    W, X = sum(comps_w.values()) + states + kept, sum(extra.values())
    phases = {  # phase: (bytes, CUDA-only bytes)
        "forward (loss)": (W + X + acts + logits_fwd, 0),
        "backward (start)": (W + X + acts + max(logits_bwd, logits_after + lm_grad), 0),
        **{phase: (W + X + acts + lm_grad + v, cuda) for phase, (v, cuda) in top.items()},
        # last, the embedding's gradient: a tied embedding's arrives as a second dense [vocab, hidden] tensor
        # that AccumulateGrad adds to lm_head's out of place, so three such tensors coexist
        "backward (end)": (W + grads + tied_grad, 0),
        "optimizer step": (W + grads + step_tmp, 0),
    }
    if _attention(shape, job).forward and not job.checkpointing:
        v, cuda = _forward_attention(shape, job, tokens)
        phases["forward (top layer, attention)"] = (W + X + v, cuda)
    workspace = cublas_handles(True) * cublas_workspace_bytes(job.compute_capability)
    phase = max(phases, key=lambda k: sum(phases[k]))
    comps = dict(comps_w)
    comps["optimizer states"] = states
    comps["model output kept by the loop (logits)"] = kept
    if phase in ("backward (end)", "optimizer step"):
        comps["gradients"] = grads
        comps["tied embedding's gradient + sum (transient)"] = tied_grad if phase == "backward (end)" else 0
        comps["optimizer step temporaries"] = step_tmp if phase == "optimizer step" else 0
    elif phase == "forward (top layer, attention)":
        comps.update(extra)
        comps["activations (layers below, and the top layer's attention half)"] = phases[phase][0] - (W + X) - _attention(shape, job).forward
        comps["attention matrix temporaries (math kernel)"] = _attention(shape, job).forward
    else:
        comps.update(extra)
        comps["activations (saved for backward)"] = acts
        if phase == "forward (loss)":
            comps["logits + loss buffers"] = logits_fwd
        elif phase == "backward (start)":
            comps["logits + loss buffers"] = phases[phase][0] - (W + X + acts)
        else:
            comps["gradients (lm_head)"] = lm_grad
            comps["backward temporaries (top layer" + (", recomputed" if job.checkpointing else "") + ")"] = top[phase][0]
    comps[f"{cublas_handles(True)} cuBLAS workspaces (CUDA only)"] = workspace
    comps["attention kernel temporaries (CUDA only)"] = phases[phase][1]
    comps = {k: v for k, v in comps.items() if v}
    notes = [f"{_attention(shape, job).backend} attention on compute capability {job.compute_capability}"
             + (" (H100/H200; pass --gpu NAME for another card)" if job.compute_capability == HOPPER else ""),
             "loop keeps `out = model(...)` alive through backward and the next forward (--keep-outputs)" if job.keep_outputs
             else "loop drops the model output after reading .loss, as Trainer does (--keep-outputs for `out = model(...)`)"]
    if job.checkpointing:
        notes.append("gradient checkpointing: each layer keeps only its input; one layer is recomputed at a time")
    if n > 1:
        notes.append(f"{n} GPUs, ZeRO stage {job.zero}: per-GPU figures")
    totals = {k: v + cuda + workspace for k, (v, cuda) in phases.items()}
    traced = {k: v for k, (v, _) in phases.items()}
    return Plan(shape, job, comps, phase, params, trainable, totals, outside, notes, traced)


def _quantization(shape: ModelShape, job: Job) -> Plan:
    """quantool's own streamed RTN/GPTQ/AWQ job: one layer's weights and work at a time, on the GPU or the CPU."""
    on_cpu = job.ptq_device == "cpu"
    device, host = quantization_memory(shape, job.ptq, job.nsamples, job.seq, on_cpu)
    if not on_cpu:
        device["cuBLAS workspace"] = cublas_workspace_bytes(job.compute_capability)
    where = "host RAM (--ptq-device cpu)" if on_cpu else "the GPU; calibration states and finished codes on the host"
    notes = [f"{job.ptq.upper()} job streamed layer by layer from safetensors: {job.nsamples} calibration samples x "
             f"{job.seq} tokens; the peak does not grow with depth; work on {where}",
             "a source without safetensors (pytorch_model*.bin) is loaded whole into host RAM first"]
    phases = {"quantize one layer": sum(device.values())}
    return Plan(shape, job, device, "quantize one layer", shape.param_count(), 0, phases, notes=notes,
                traced_phases=dict(phases), host=host)


def estimate(shape: ModelShape, job: Job) -> Plan:
    """Predict the peak of torch.cuda.max_memory_allocated() for this job on this model."""
    job.validate()
    if job.method == "quantize":
        plan = _quantization(shape, job)
    elif job.method == "inference":
        plan = _inference(shape, job, weight_bytes(shape, job))
    else:
        plan = _training(shape, job, weight_bytes(shape, job))
    if not plan.components:  # nothing on a GPU
        return plan
    plan.outside_allocator["CUDA context and libraries (H100, measured)"] = CUDA_CONTEXT_BYTES
    plan.outside_allocator["allocator cache beyond the peak (median 16.5%, measured 4-32%)"] = ALLOCATOR_CACHE * plan.peak_bytes
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

