"""Memory of quantool's own post-training quantization job (`quantool rtn|gptq|awq`), host and device.

The job streams the source one decoder layer at a time (quantool.ptq.pipeline), so its peak is one layer's
work, whatever the depth. Each term below follows the code that allocates it:
- the layer's weights in the compute dtype (fp16 on CUDA, fp32 on a CPU; quantool.device.compute_dtype);
- the calibration hidden states entering the layer, [samples x seq, hidden] in the compute dtype, on the host;
- the layer forward on one chunk of about 4096 tokens (quantool.model.layerwise);
- GPTQ: the Hessians of one true-sequential stage (fp32, one per shared input) and, for the stage's widest
  linear, the damped copy factorized in place and H^-1's factor ([in, in] fp32 each; quant.gptq
  `_inverse_cholesky`) with four fp32 [out, in] working copies (W, Q, the dequantized result, the codes);
- RTN: four fp32 [out, in] copies while one linear is rounded and dequantized (quant.quantizer);
- AWQ: the recorded inputs of every linear (fp32) for at most `awq_search_tokens` tokens, and the clip
  search's working copies of the widest linear (quant.awq_clip; its per-group Gram matrices are small);
- the layer's finished codes (uint8, host) until the layer is written;
- GPTQ: the MLP's inputs, recorded during the gate/up stage so the down_proj stage skips attention.
On the host add the Python, torch and transformers runtime (measured below).
"""

from __future__ import annotations

from quantool.memory.shapes import ModelShape

RUNTIME_BYTES = 389 * 2**20  # VmHWM after importing quantool, torch 2.13 and transformers 5 (CPU, this project's CI image)
CHUNK_TOKENS = 4096  # quantool.model.layerwise: tokens per forward call
AWQ_SEARCH_TOKENS = 8192  # quantool.ptq.config.PTQConfig.awq_search_tokens' default
AWQ_CLIP_COPIES = 7.2  # peak of search_clip + apply_clip in [out, in] fp32 copies, measured (VmHWM) on 4096 x 11008


def calibration_tokens(ptq: str, nsamples: int, seq: int) -> int:
    """Tokens the job keeps per layer: AWQ caps its windows at AWQ_SEARCH_TOKENS (whole windows)."""
    if ptq == "awq" and nsamples * seq > AWQ_SEARCH_TOKENS:
        nsamples = max(1, AWQ_SEARCH_TOKENS // seq)
    return nsamples * seq


def layer_work(shape: ModelShape, ptq: str, tokens: int, seq: int, dtype_bytes: int) -> dict[str, float]:
    """What lives on the compute device while one layer is quantized, at the larger of its two moments: a
    forward over one chunk of samples (collecting inputs), or the algorithm on the widest linear."""
    h, inter, lin = shape.hidden, shape.intermediate, shape.linears()
    weights = {"one decoder layer's weights": (shape.linear_params_per_layer() + shape.small_params_per_layer()) * dtype_bytes}
    forward = {}
    if tokens:
        chunk = min(tokens, max(1, CHUNK_TOKENS // seq) * seq)
        forward[f"layer forward on {chunk} tokens"] = chunk * dtype_bytes * (2 * h + max(3 * inter, 3 * shape.q_dim + 2 * shape.kv_dim))
    if ptq == "gptq":
        mlp = shape.mlp_names()
        stages = [["q_proj", "k_proj", "v_proj"], ["o_proj"], list(mlp[:-1]), [mlp[-1]]]
        hessian = max(4 * lin[s[0]][0] ** 2 for s in stages)  # down_proj's, the widest input
        solve = max(((3 * 4 * lin[s[0]][0] ** 2, 4 * 4 * max(lin[n][0] * lin[n][1] for n in s)) for s in stages), key=sum)
        moments = [{**forward, "GPTQ: the stage's Hessian (fp32)": hessian},
                   {"GPTQ: Hessian, its factor and H^-1 (fp32)": solve[0], "GPTQ: working copies of one linear (fp32)": solve[1]}]
    elif ptq == "awq":
        inputs = {"AWQ: recorded inputs of every linear (fp32)": tokens * 4 * sum(i for i, _ in lin.values())}
        moments = [{**forward, **inputs, "AWQ: scale-search block outputs (fp32)": 2 * tokens * 4 * h},
                   {**inputs, "AWQ: clip search on the widest linear (fp32)": AWQ_CLIP_COPIES * 4 * max(i * o for i, o in lin.values())}]
    else:
        moments = [{"RTN: working copies of one linear (fp32)": 4 * 4 * max(i * o for i, o in lin.values())}]
    return {**weights, **max(moments, key=lambda m: sum(m.values()))}


def quantization_memory(shape: ModelShape, ptq: str, nsamples: int, seq: int, on_cpu: bool) -> tuple[dict, dict]:
    """(device components, host components) at the peak: a CPU run keeps everything on the host."""
    tokens = calibration_tokens(ptq, nsamples, seq) if ptq != "rtn" else 0
    dtype_bytes = 4 if on_cpu else 2
    work = layer_work(shape, ptq, tokens, seq, dtype_bytes)
    host = {"Python, torch and transformers runtime (measured)": RUNTIME_BYTES,
            "finished codes of the layer (uint8)": shape.linear_params_per_layer()}
    if tokens:
        host["calibration hidden states entering the layer"] = tokens * shape.hidden * dtype_bytes
    if ptq == "gptq":  # the MLP's inputs, recorded for the down_proj stage (quantool.ptq.gptq._next_entry)
        host["GPTQ: recorded inputs of the MLP"] = tokens * shape.hidden * dtype_bytes
    if on_cpu:
        return {}, {**work, **host}
    return work, host
