"""Scaled-dot-product attention on CUDA: which kernel torch picks, and what each keeps and allocates.

The choice follows torch's `select_sdp_backend` (`aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`,
torch 2.11): cuDNN first on sm90/sm100 (torch built with cuDNN >= 9.9, as its CUDA 12.8+/13 wheels are),
then flash, memory-efficient, math. cuDNN and flash take fp16/bf16 only. The memory-efficient kernel takes
fp32 too, but not grouped-query heads, which transformers passes as `enable_gqa=True` when there is no mask.
So fp32 q/k/v with GQA (QLoRA after `prepare_model_for_kbit_training`, pure fp32 training) run the math
path, which materializes the attention matrix [B, H, S, S].

The math path (`_scaled_dot_product_attention_math`, checked op by op with `trace.LiveTensorBytes`) saves
q * scale, the key expanded to H heads and transposed * scale, the value expanded to H heads and the
softmax probabilities, but not its output, unlike the fused kernels. Two kernels allocate inside one call,
where an op-level trace cannot see it: `_safe_softmax` runs softmax, an `== -inf` bool mask and `where`,
so its softmax output and bool mask sit beside its input and result (pytorch/pytorch#139612 measured
this on CUDA); and CUDA's softmax backward materializes `grad * output` before reducing
(`aten/src/ATen/native/cuda/SoftMax.cu`), which the CPU kernel does not. Both are CUDA-only terms here.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantool.memory.cuda import parse_capability
from quantool.memory.dtypes import DTYPE_BYTES
from quantool.memory.shapes import ModelShape

FUSED = ("cudnn", "flash", "efficient")


def backend(shape: ModelShape, dtype: str, cc: str) -> str:
    """The kernel torch's sdpa runs, for q/k/v of `dtype` (fp32, bf16, fp16), in a forward without padding mask."""
    major, minor = parse_capability(cc)
    gqa = shape.kv_heads != shape.heads
    d = shape.head_dim
    half = dtype in ("bf16", "fp16")
    if half and major >= 8 and d % 8 == 0:
        if (major, minor) in ((9, 0), (10, 0)) and d <= (256 if major == 9 else 128):
            return "cudnn"
        if d <= 256:
            return "flash"
    alignment = 8 if half and major >= 7 else (4 if major >= 8 else 1)
    dtype_ok = dtype in ("fp32", "fp16") or major >= 8
    if not gqa and dtype_ok and d % alignment == 0 and major >= 5:
        return "efficient"
    return "math"


@dataclass(frozen=True)
class AttentionMemory:
    """Bytes for one layer's attention core (between the q/k/v projections and o_proj).

    saved: per token, keyed as in the layer inventory. Transients are for the whole batch, above the saved
    tensors (forward) or above the saved tensors and the incoming output gradient (backward); `*_cuda`
    parts are invisible to a CPU trace.
    """

    backend: str
    saved: dict[str, float]
    forward: float
    forward_cuda: float
    backward: float
    backward_cuda: float


def attention_memory(shape: ModelShape, batch: int, seq: int, dtype: str, cc: str) -> AttentionMemory:
    kind = backend(shape, dtype, cc)
    b, tokens = DTYPE_BYTES[dtype], batch * seq
    gqa = shape.kv_heads != shape.heads
    if kind in FUSED:
        saved = {"attn.q": b * shape.q_dim, "attn.k": b * shape.kv_dim, "attn.v": b * shape.kv_dim,
                 "attn.out": b * shape.q_dim, "attn.lse": 4 * shape.heads}
        # flash-attention 2's mha_bwd accumulates dq in fp32 [B, S, H, D] (cuDNN's backward alike); for grouped
        # heads flash computes dk, dv per query head before summing them down
        backward_cuda = 4 * tokens * shape.q_dim + (2 * b * tokens * shape.q_dim if kind == "flash" and gqa else 0)
        return AttentionMemory(kind, saved, 0, 0, 2 * b * tokens * (shape.q_dim + shape.kv_dim), backward_cuda)
    expanded = shape.q_dim if gqa else shape.kv_dim
    matrix = batch * shape.heads * seq * seq  # elements of [B, H, S, S]
    # the output is not among them: only o_proj keeps it, where its own backward needs it
    saved = {"attn.q": b * shape.q_dim, "attn.k": b * expanded, "attn.v": b * expanded, "attn.probs": b * shape.heads * seq}
    # forward: the causal mask [S, S] and (GQA) the expanded key live through the kernel; raw and masked scores
    # coexist, then the masked scores beside the probabilities, and inside _safe_softmax its softmax output
    # and bool mask too
    forward = b * seq * seq + (b * tokens * shape.q_dim if gqa else 0) + b * matrix
    # backward, at softmax's: the gradients of the probabilities and of the scores; by then the output's gradient
    # is spent and the expanded value's gradient has taken the place of the value (o_proj's saves are released too).
    # CUDA's softmax backward first materializes grad * output (SoftMax.cu, softmax_backward_cuda_out).
    return AttentionMemory(kind, saved, forward, b * matrix + matrix, 2 * b * matrix, b * matrix)
