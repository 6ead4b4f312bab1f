"""Activations: an inventory of the tensors autograd saves per decoder layer (the approach of Korthikanti et al.
2022, "Reducing Activation Recomputation", Sec. 4.1, redone for SwiGLU, RMSNorm, sdpa attention, LoRA and
autocast casts), keyed so that tensors shared by several ops count once; logits and loss buffers.

`Inventory` builds the per-layer inventory and the attention core once per job; every phase reads it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property

from quantool.memory.attention import AttentionMemory, attention_memory
from quantool.memory.dtypes import DTYPE_BYTES
from quantool.memory.job import BaseQuant, Job, Method, WeightsDtype
from quantool.memory.shapes import ModelShape
from quantool.memory.storage import target_names, trains_every_weight


def stream_bytes(job: Job) -> int:
    """dtype of the residual stream: the embedding's dtype."""
    if job.method == Method.QLORA or job.weights_dtype == WeightsDtype.FP32:
        return 4
    return int(DTYPE_BYTES[job.weights_dtype])


class _Saved:
    """Tensors kept for backward, keyed by identity so shared tensors count once."""

    def __init__(self) -> None:
        self.items: dict[str, float] = {}

    def add(self, key: str, nbytes: float) -> None:
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
        saved.add(f"{name}.lora_mid", adapter * job.rank)
    if job.base_quant == BaseQuant.INT8:
        saved.add(x_key, x_bytes * width)  # bnb MatMul8bitLt keeps its input A whenever it needs a gradient
    return x_bytes if job.base_quant != BaseQuant.NONE else compute  # bnb casts its output back to the input dtype


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


class Inventory:
    """What one job's forward keeps for backward, per token unless named otherwise; computed once."""

    def __init__(self, shape: ModelShape, job: Job):
        self.shape, self.job = shape, job
        self.targets = target_names(shape, job)
        self.full = trains_every_weight(job)
        self.stream = stream_bytes(job)

    def _mode(self, name: str) -> str:
        return "full" if self.full else ("lora" if name in self.targets else "frozen")

    @cached_property
    def attention(self) -> AttentionMemory:
        """The attention core of one layer: q/k/v are bf16 under autocast, else in the residual stream's dtype."""
        job = self.job
        dtype = "bf16" if job.autocast else ("fp32" if self.stream == 4 else str(job.weights_dtype))
        return attention_memory(self.shape, job.batch, job.seq, dtype, job.compute_capability)

    @cached_property
    def halves(self) -> tuple[float, float]:
        """What the top layer saves per token: (attention block with its norm, MLP block with its norm); a MoE
        layer's MLP at the width a token passes through (its experts' and the shared ones')."""
        return self._halves(self.shape.moe_mlp_width() if self.shape.moe_layers else self.shape.intermediate)

    @cached_property
    def dense_halves(self) -> tuple[float, float]:
        return self._halves(self.shape.intermediate)

    def _halves(self, width: int) -> tuple[float, float]:
        shape, job, saved, sb = self.shape, self.job, _Saved(), self.stream
        layer_norm = shape.norm == "layer"
        y = _norm_saves(saved, "attn_norm", sb, shape.hidden, self.full, layer_norm)
        for name in ("q", "k", "v"):
            _linear_saves(saved, name, "attn_norm.out", y, shape.hidden, self._mode(f"{name}_proj"), job)
        for key, nbytes in self.attention.saved.items():
            saved.add(key, nbytes)
        attn_b = 2 if job.autocast else sb
        _linear_saves(saved, "o", "attn.out", attn_b, shape.q_dim, self._mode("o_proj"), job)  # a copy of the kernel's output
        attention = saved.total()
        y = _norm_saves(saved, "mlp_norm", sb, shape.hidden, self.full, layer_norm)
        if shape.mlp == "gated":
            g_b = _linear_saves(saved, "gate", "mlp_norm.out", y, shape.hidden, self._mode("gate_proj"), job)
            u_b = _linear_saves(saved, "up", "mlp_norm.out", y, shape.hidden, self._mode("up_proj"), job)
            act_b = max(g_b, u_b)
            saved.add("mlp.gate", g_b * width)  # silu saves its input
            saved.add("mlp.act", g_b * width)  # mul saves both factors
            saved.add("mlp.up", u_b * width)
            _linear_saves(saved, "down", "mlp.prod", act_b, width, self._mode("down_proj"), job)
        else:
            f_b = _linear_saves(saved, "fc1", "mlp_norm.out", y, shape.hidden, self._mode("fc1"), job)
            saved.add("mlp.act_in", f_b * width)
            _linear_saves(saved, "fc2", "mlp.act_out", f_b, width, self._mode("fc2"), job)
        return attention, saved.total() - attention

    @property
    def layer(self) -> float:
        """Bytes autograd keeps per token for one decoder layer (no checkpointing)."""
        return sum(self.halves)

    @cached_property
    def head(self) -> float:
        """Final norm and lm_head inputs, plus the int64 labels transformers keeps (labels and shifted labels)."""
        saved = _Saved()
        y = _norm_saves(saved, "final_norm", self.stream, self.shape.hidden, self.full, self.shape.norm == "layer")
        _linear_saves(saved, "lm_head", "final_norm.out", y, self.shape.hidden, "full" if self.full else "frozen",
                      replace(self.job, quant=BaseQuant.NONE))
        return saved.total() + 8 * (2 if self.full else 1)  # int64 shifted labels (nll_loss); input ids if the embedding trains

    @property
    def rope(self) -> float:
        """cos and sin (bytes, not per token), shared by the batch and all layers."""
        return 2 * self.job.seq * self.shape.head_dim * self.stream

    @cached_property
    def total(self) -> float:
        """Everything autograd keeps from forward to backward (bytes), logits and loss buffers excepted."""
        shape, job = self.shape, self.job
        tokens = job.batch * job.seq
        if job.checkpointing:
            per_layer: float = shape.hidden * self.stream
            first_norm = 0
        else:
            moe, dense = shape.moe_layers, shape.layers - shape.moe_layers
            per_layer = (moe * self.layer + dense * sum(self.dense_halves)) / shape.layers
            # a frozen embedding's output needs no gradient, so layer 0's first norm keeps nothing of its input
            first_norm = (4 * shape.hidden + 4 if shape.norm == "rms" else self.stream * shape.hidden + 8) if job.uses_lora else 0
            if job.base_quant == BaseQuant.INT8:  # nor do layer 0's int8 q/k/v keep their input
                first_norm += self.stream * shape.hidden
        return tokens * (shape.layers * per_layer - first_norm + self.head) + self.rope

    def attention_before_output(self, tokens: int) -> float:
        """What the attention half has saved when its kernel runs: all but o_proj's saves of the kernel's output."""
        o_saved = _Saved()
        _linear_saves(o_saved, "o", "attn.out", 2 if self.job.autocast else self.stream, self.shape.q_dim, self._mode("o_proj"), self.job)
        return tokens * (self.halves[0] - o_saved.total())


def logits_dtype_bytes(job: Job) -> int:
    """lm_head's output: fp32 where lm_head is fp32 (QLoRA's prepared model, fp32 training), else bf16/fp16."""
    return 4 if (job.method == Method.QLORA or (job.weights_dtype == WeightsDtype.FP32 and not job.autocast)) else 2


def logits_bytes(shape: ModelShape, job: Job, tokens: int) -> tuple[float, float, float]:
    """(forward, backward-start, after log_softmax backward) bytes of the logits and cross-entropy buffers.

    transformers' ForCausalLMLoss upcasts logits to fp32 and calls cross_entropy (log_softmax + nll);
    at the start of backward the saved log-probs, nll's dense gradient and log_softmax's output gradient
    coexist: three fp32 [tokens, vocab] tensors.
    """
    lb = logits_dtype_bytes(job)
    per = tokens * shape.vocab
    fwd = per * (lb + (4 if lb != 4 else 0) + 4)
    bwd = per * 12
    after = per * (4 + lb)  # log_softmax's input gradient and its cast back to the logits' dtype
    return fwd, bwd, after


def layer_saved_bytes_per_token(shape: ModelShape, job: Job) -> float:
    return Inventory(shape, job).layer


def activation_bytes(shape: ModelShape, job: Job) -> float:
    return Inventory(shape, job).total


def rope_bytes(shape: ModelShape, job: Job) -> float:
    return Inventory(shape, job).rope


def attention_backend(shape: ModelShape, job: Job) -> str:
    """The sdpa kernel CUDA runs for this job: cudnn, flash, efficient or math."""
    return Inventory(shape, job).attention.backend
