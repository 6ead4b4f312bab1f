"""The moments of a job and what is live at each: inference (prefill, the end of decoding), training (forward,
the start of backward, the top layer's backward, the end of backward, the optimizer step) and quantool's own
quantization job. Each returns a `Peak`: its components by stable id (with display labels), the bytes at every
moment, and the moment that peaks."""

from __future__ import annotations

from dataclasses import dataclass, field

from quantool.memory.activations import Inventory, logits_bytes, logits_dtype_bytes
from quantool.memory.cuda import HOPPER, cublas_handles, cublas_workspace_bytes
from quantool.memory.dtypes import DTYPE_BYTES
from quantool.memory.job import BaseQuant, Job, Method, PTQDevice, PTQMethod, WeightsDtype
from quantool.memory.quantize import quantization_memory
from quantool.memory.shapes import ModelShape
from quantool.memory.storage import kv_bytes, lora_params, optimizer_state_bytes, trains_every_weight


@dataclass
class Peak:
    components: dict[str, float]  # id -> bytes live at the peak
    labels: dict[str, str]  # id -> what the component is, for people
    phase: str
    phases: dict[str, float]  # every moment's bytes, CUDA-only terms included
    traced: dict[str, float]  # the same moments as a CPU trace sees them (no CUDA-only terms)
    notes: list[str]
    trainable: int = 0
    outside: dict[str, float] = field(default_factory=dict)  # beside the caching allocator (paged optimizer states)
    host: dict[str, float] = field(default_factory=dict)  # host RAM (quantization job), label -> bytes


class _Components:
    """Components in insertion order, each with its id and label; zero-byte ones are dropped at the end."""

    def __init__(self) -> None:
        self.bytes: dict[str, float] = {}
        self.labels: dict[str, str] = {}

    def add(self, cid: str, label: str, nbytes: float) -> None:
        self.bytes[cid] = nbytes
        self.labels[cid] = label

    def update(self, labeled: dict[str, tuple[str, float]]) -> None:
        for cid, (label, nbytes) in labeled.items():
            self.add(cid, label, nbytes)

    def nonzero(self) -> tuple[dict[str, float], dict[str, str]]:
        kept = {k: v for k, v in self.bytes.items() if v}
        return kept, {k: self.labels[k] for k in kept}


def _largest_linear(shape: ModelShape) -> int:
    return max(i * o for i, o in shape.linears().values())


def inference(shape: ModelShape, job: Job, weights: dict[str, tuple[str, float]], inv: Inventory) -> Peak:
    b, s, g = job.batch, job.seq, job.gen
    wb = DTYPE_BYTES[job.weights_dtype]
    shard = job.gpus
    w = {k: (label, v / shard) for k, (label, v) in weights.items()}
    w_total = sum(v for _, v in w.values())
    kv_prefill = kv_bytes(shape, job, s, b) / shard
    kv_full = kv_bytes(shape, job, s + g, b) / shard
    # Prefill: live tensors inside the busiest sub-block of one layer (MLP: silu(gate), up, product).
    mlp_live = (3 if shape.mlp == "gated" else 2) * shape.intermediate * wb
    attn_live = (2 * shape.q_dim + 2 * shape.kv_dim + shape.q_dim) * wb
    core = inv.attention
    if core.forward:  # math path: q, the expanded k and v, the mask, masked scores and probabilities
        attn_live = (sum(core.saved[k] for k in ("attn.q", "attn.k", "attn.v")) + 2 * core.saved["attn.probs"]) + core.forward / (b * s)
    # Alive beside them: the embedding output (referenced until the model's forward returns), the layer's
    # input, the attention residual sum and the normed input; and the rotary cos/sin.
    stream = (4 if shape.layers > 1 else 3) * shape.hidden * wb
    prefill_act = b * s * (max(mlp_live, attn_live, 8 * shape.hidden) + stream) + 2 * s * shape.head_dim * wb
    if job.base_quant == BaseQuant.NF4:
        prefill_act += _largest_linear(shape) * wb  # bnb dequantizes the weight for multi-row matmuls
    elif job.base_quant == BaseQuant.INT8:
        prefill_act += b * s * max(o for _, o in shape.linears().values()) * 4  # int32 accumulator
    # generate computes only the last position's logits and copies them to fp32; the previous step's fp32
    # copy is still referenced while the next step runs, and while its own copy is made
    logits = b * shape.vocab * (wb + 4)
    held = b * shape.vocab * 4
    cat_growth = kv_full / shape.layers / 2  # torch.cat copy of one layer's K
    traced = {"prefill": w_total + kv_prefill + max(prefill_act, logits),
              "decode (end)": w_total + kv_full + held + max(cat_growth, logits)}
    workspace = cublas_handles(False) * cublas_workspace_bytes(job.compute_capability)
    phases = {k: v + workspace + (core.forward_cuda if k == "prefill" and prefill_act >= logits else 0) for k, v in traced.items()}
    phase = max(phases, key=lambda k: phases[k])
    comps = _Components()
    comps.update(w)
    comps.add("cublas", "cuBLAS workspace (CUDA only)", workspace)
    if phase == "prefill" and prefill_act >= logits and core.forward_cuda:
        comps.add("attention.cuda", "attention kernel temporaries (CUDA only)", core.forward_cuda)
    last = ("logits.last", "logits (last token, + fp32 copy)")
    if phase == "prefill":
        comps.add("kv_cache", "KV cache", kv_prefill)
        comps.add(*(("activations.prefill", "activations (prefill, transient)") if prefill_act >= logits else last),
                  max(prefill_act, logits))
    else:
        comps.add("kv_cache", "KV cache", kv_full)
        comps.add("logits.held", "logits (previous step's fp32 copy)", held)
        comps.add(*(("kv_cache.growth", "KV cache growth (torch.cat copy)") if cat_growth >= logits else last),
                  max(cat_growth, logits))
    notes = [f"prefill {s} tokens, then {g} new tokens, batch {b}; {core.backend} attention on compute capability {job.compute_capability}"]
    if job.gpus > 1:
        notes.append(f"layers split evenly over {job.gpus} GPUs (device_map='auto'); per-GPU figures")
    return Peak(*comps.nonzero(), phase, phases, traced, notes)


def _top_layer_backward(shape: ModelShape, job: Job, inv: Inventory, tokens: int, grad_bytes: int) -> dict[str, tuple[float, float]]:
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
    full = trains_every_weight(job)
    gb = 2 if job.autocast else inv.stream
    attn_saved, mlp_saved = (T * b for b in inv.halves)
    rebuilt = attn_saved + mlp_saved if job.checkpointing else 0
    # what the final norm's backward releases: its normed output and lm_head's input (not its fp32 input or labels)
    head_released = T * (inv.head - 4 * h - 4 - 8 * (2 if full else 1))
    lin = shape.linears()
    mlp_names = shape.mlp_names()

    def w_grads(names: list[str]) -> float:
        return sum(lin[n][0] * lin[n][1] * shape.copies(n) for n in names) * grad_bytes if full else 0

    stream_grad = T * h * gb
    # bnb's MatMul4Bit.backward dequantizes the weight in its bf16 compute dtype (Linear4bit casts inputs to it)
    deq = 2 * max(lin[n][0] * lin[n][1] for n in mlp_names) if job.base_quant == BaseQuant.NF4 else 0
    down = T * inter * gb + deq  # grad(prod) from down_proj's backward
    if mlp_names[-1] in inv.targets:  # a LoRA down_proj's adapter gradient comes first, cast if needed
        adapter = 2 if job.autocast else 4
        down = T * inter * (adapter + (gb if gb != adapter else 0)) + deq
    mlp = max(down, 2 * T * inter * gb) if shape.mlp == "gated" else down
    core = inv.attention
    # the math path's backward peaks after o_proj's backward has released what o_proj saved
    o_released = attn_saved - inv.attention_before_output(T) if core.forward else 0
    moments = {
        "backward (final norm)": (T * h * 20 - head_released, 0),
        "backward (top layer, MLP)": (rebuilt - head_released + stream_grad + mlp + w_grads(list(mlp_names[-1:])), 0),
        "backward (top layer, attention)": (rebuilt - head_released - mlp_saved - o_released + stream_grad + core.backward
                                            + w_grads([*mlp_names, "o_proj"]), core.backward_cuda),
    }
    if job.checkpointing and core.forward:
        moments["backward (top layer, recomputed attention)"] = (inv.attention_before_output(T) - head_released
                                                                 + stream_grad + core.forward, core.forward_cuda)
    return moments


def _forward_attention(shape: ModelShape, job: Job, inv: Inventory, tokens: int) -> tuple[float, float]:
    """(bytes, CUDA-only bytes) above the other activations while the top layer's math-path attention runs in a
    forward without checkpointing: all layers below have saved theirs, the top one its attention half."""
    attn_saved, mlp_saved = (tokens * b for b in inv.halves)
    below = inv.total - inv.rope - tokens * inv.head - attn_saved - mlp_saved
    residual = 2 * tokens * shape.hidden * inv.stream  # the layer's input and the embedding output
    return below + inv.attention_before_output(tokens) + residual + inv.rope + inv.attention.forward, inv.attention.forward_cuda


def training(shape: ModelShape, job: Job, weights: dict[str, tuple[str, float]], inv: Inventory) -> Peak:
    b, s, n = job.batch, job.seq, job.gpus
    tokens = b * s
    full = trains_every_weight(job)
    trainable = lora_params(shape, job) if job.uses_lora else shape.param_count()
    tb = 4 if (job.uses_lora or job.weights_dtype == WeightsDtype.FP32) else int(DTYPE_BYTES[job.weights_dtype])
    grads: float = trainable * tb
    states, paged, step_tmp = optimizer_state_bytes(shape, job, tb)
    outside = {"optimizer states (paged, unified memory)": paged} if paged else {}

    comps_w = dict(weights)
    if job.zero >= 1:
        states, step_tmp = states / n, step_tmp / n
    if job.zero >= 2:
        grads = grads / n
    if job.zero >= 3:
        comps_w = {k: (label, v / n) for k, (label, v) in comps_w.items()}
        comps_w["zero3.gathered"] = ("ZeRO-3 gathered layers (2 in flight)", 2 * sum(v for _, v in weights.values()) / shape.layers)
    if n > 1 and job.zero == 0:
        comps_w["ddp.buckets"] = ("DDP gradient buckets", grads)

    acts = inv.total
    extra: dict[str, tuple[str, float]] = {}
    if job.autocast:
        extra["autocast.copies"] = ("bf16 weight copies (autocast)", (shape.linear_params()
                                                                     + (shape.lm_head_params() or shape.vocab * shape.hidden)) * 2)
    if job.method == Method.QAT:
        extra["qat.copies"] = ("fake-quantized weight copies", shape.linear_params() * DTYPE_BYTES[job.weights_dtype])
    # `out = model(...)` stays referenced through backward, the optimizer step and the next forward
    kept = tokens * shape.vocab * logits_dtype_bytes(job) if job.keep_outputs else 0
    logits_fwd, logits_bwd, logits_after = logits_bytes(shape, job, tokens)
    lm_grad = shape.vocab * shape.hidden * tb if not job.uses_lora else 0
    top = _top_layer_backward(shape, job, inv, tokens, tb)
    tied_grad = 2 * shape.vocab * shape.hidden * tb if shape.tied and full else 0
    W, X = sum(v for _, v in comps_w.values()) + states + kept, sum(v for _, v in extra.values())
    moments = {  # phase: (bytes, CUDA-only bytes)
        "forward (loss)": (W + X + acts + logits_fwd, 0),
        "backward (start)": (W + X + acts + max(logits_bwd, logits_after + lm_grad), 0),
        **{phase: (W + X + acts + lm_grad + v, cuda) for phase, (v, cuda) in top.items()},
        # last, the embedding's gradient: a tied embedding's arrives as a second dense [vocab, hidden] tensor
        # that AccumulateGrad adds to lm_head's out of place, so three such tensors coexist
        "backward (end)": (W + grads + tied_grad, 0),
        "optimizer step": (W + grads + step_tmp, 0),
    }
    core = inv.attention
    if core.forward and not job.checkpointing:
        v, cuda = _forward_attention(shape, job, inv, tokens)
        moments["forward (top layer, attention)"] = (W + X + v, cuda)
    workspace = cublas_handles(True) * cublas_workspace_bytes(job.compute_capability)
    phase = max(moments, key=lambda k: sum(moments[k]))
    comps = _Components()
    comps.update(comps_w)
    comps.add("optimizer.states", "optimizer states", states)
    comps.add("outputs.kept", "model output kept by the loop (logits)", kept)
    if phase in ("backward (end)", "optimizer step"):
        comps.add("gradients", "gradients", grads)
        comps.add("gradients.tied", "tied embedding's gradient + sum (transient)", tied_grad if phase == "backward (end)" else 0)
        comps.add("optimizer.step", "optimizer step temporaries", step_tmp if phase == "optimizer step" else 0)
    elif phase == "forward (top layer, attention)":
        comps.update(extra)
        comps.add("activations", "activations (layers below, and the top layer's attention half)", moments[phase][0] - (W + X) - core.forward)
        comps.add("attention.math", "attention matrix temporaries (math kernel)", core.forward)
    else:
        comps.update(extra)
        comps.add("activations", "activations (saved for backward)", acts)
        if phase == "forward (loss)":
            comps.add("logits", "logits + loss buffers", logits_fwd)
        elif phase == "backward (start)":
            comps.add("logits", "logits + loss buffers", moments[phase][0] - (W + X + acts))
        else:
            comps.add("gradients.lm_head", "gradients (lm_head)", lm_grad)
            comps.add("backward.temporaries", "backward temporaries (top layer" + (", recomputed" if job.checkpointing else "") + ")",
                      top[phase][0])
    comps.add("cublas", f"{cublas_handles(True)} cuBLAS workspaces (CUDA only)", workspace)
    comps.add("attention.cuda", "attention kernel temporaries (CUDA only)", moments[phase][1])
    notes = [f"{core.backend} attention on compute capability {job.compute_capability}"
             + (" (H100/H200; pass --gpu NAME for another card)" if job.compute_capability == HOPPER else ""),
             "loop keeps `out = model(...)` alive through backward and the next forward (--keep-outputs)" if job.keep_outputs
             else "loop drops the model output after reading .loss, as Trainer does (--keep-outputs for `out = model(...)`)"]
    if job.checkpointing:
        notes.append("gradient checkpointing: each layer keeps only its input; one layer is recomputed at a time")
    if n > 1:
        notes.append(f"{n} GPUs, ZeRO stage {job.zero}: per-GPU figures")
    totals = {k: v + cuda + workspace for k, (v, cuda) in moments.items()}
    traced = {k: v for k, (v, _) in moments.items()}
    return Peak(*comps.nonzero(), phase, totals, traced, notes, trainable, outside)


def quantization(shape: ModelShape, job: Job) -> Peak:
    """quantool's own streamed RTN/GPTQ/AWQ job: one layer's weights and work at a time, on the GPU or the CPU."""
    on_cpu = job.ptq_device == PTQDevice.CPU
    device, host, moment = quantization_memory(shape, job)
    comps = _Components()
    comps.update(device)
    if not on_cpu:
        comps.add("cublas", "cuBLAS workspace", cublas_workspace_bytes(job.compute_capability))
    where = "host RAM (--ptq-device cpu)" if on_cpu else "the GPU; calibration states and finished codes on the host"
    calibration = ("no calibration" if job.ptq == PTQMethod.RTN and not job.refine else f"{job.nsamples} calibration samples x "
                   f"{job.seq} tokens" + (f", --refine {job.refine} in batches of {job.refine_batch} windows" if job.refine else ""))
    notes = [f"{str(job.ptq).upper()} job streamed layer by layer from safetensors: {calibration}; the peak does not grow "
             f"with depth; work on {where}",
             f"host peak while: {moment}",
             "a source without safetensors (pytorch_model*.bin) is loaded whole into host RAM first"]
    components, labels = comps.nonzero()
    phases = {"quantize one layer": sum(components.values())}
    return Peak(components, labels, "quantize one layer", phases, dict(phases), notes, host=host)
