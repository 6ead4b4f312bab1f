"""Memory of quantool's own post-training quantization job (`quantool rtn|gptq|awq`), host and device.

The job streams the source one decoder layer at a time (quantool.ptq.pipeline), so its peak is the largest of a
few moments, whatever the depth. Each term follows the code that allocates it, and each measured constant says
where it was measured.

Host moments (peak RSS):
- tokenizing the calibration text: the tokenizer's encoding of the whole text is transient but large
  (TOKENIZE_BYTES per byte of text);
- capturing the calibration states (gptq, awq): the embedding read from its shard (the file's pages, mapped while
  it is read, and the tensor as stored) and cast to the compute dtype, and the hidden states;
- reading one layer: its weights as stored (the shard's pages) and in the compute dtype;
- quantizing one layer: its weights, the method's working memory (`layer_work`), the hidden states, the finished
  codes;
- writing the tensors outside the layers (embedding, head, final norm): their pages and the tensors as stored;
- refining one layer (--refine): a batch of windows through the layer with autograd (the tensors a full fine-tune
  keeps for backward, `activations.Inventory`), the learned rounding of its linears, and the layer's target and
  outputs on every window, with the full-precision model's hidden states beside the quantized ones (model target);
always beside the Python/torch/transformers runtime with the model's skeleton, and the tokenizer.
Device (GPU runs): the layer's weights and the method's (or the refine step's) work; the hidden states stay on the host.
"""

from __future__ import annotations

from quantool.memory.activations import Inventory
from quantool.memory.job import Job, Method, PTQDevice, WeightsDtype
from quantool.memory.shapes import ModelShape
from quantool.ptq.config import PTQConfig, RefineTarget

# Measured with VmRSS/VmHWM on 2 CPU cores, torch 2.13.0+cpu, transformers 5.24 (SmolLM2-135M and stories260K):
RUNTIME_BYTES = 391 * 2**20  # imports, config and a model skeleton (all parameters on the meta device)
TOKENIZER_BYTES_PER_TOKEN = 1100  # a loaded fast tokenizer: SmolLM2's 49152-token vocabulary +53 MiB, stories260K's 512 +4 MiB
TOKENIZE_BYTES = 150  # transient per byte of calibration text: WikiText-2 test (1.29 MB) +169 / +202 MiB for those two
_PTQ = PTQConfig()
CHUNK_TOKENS = _PTQ.chunk_tokens  # tokens per layer forward call
AWQ_SEARCH_TOKENS = _PTQ.awq_search_tokens
EXPERT_BATCH_BYTES = _PTQ.expert_batch_bytes  # GPTQ: experts' Hessians held at once (more experts: more passes)
AWQ_CLIP_COPIES = 7.2  # peak of search_clip + apply_clip in [out, in] fp32 copies, measured (VmHWM) on 4096 x 11008
# beyond the weights themselves, measured (VmHWM) on Llama-2-7B shapes: RTN's codes and dequantized copy of one
# 11008 x 4096 linear; GPTQ (quant.gptq) on the stacked q/k/v, gate/up and on down_proj: while factorizing, two
# Hessian-sized copies and one of the weights, in the column loop one Hessian and 2.4 copies of the weights
RTN_COPIES = 1.8
GPTQ_COPIES = (1.0, 2.4)
# --refine, per weight of the refined linears, counted from quant/rounding.py: the weight as rounded, its expanded zero,
# v0, v, v's gradient and the best step's v (fp32 each), and what one forward's graph keeps for backward (codes - zero
# and the dequantized weight, fp32, and the clamp's mask; scales stay per group where a row's groups are whole, else
# one more fp32 per weight, not counted)
REFINE_BYTES_PER_WEIGHT = 6 * 4 + 2 * 4 + 1
MODEL_TARGETS = _PTQ.refine_target == RefineTarget.MODEL


def calibration_tokens(ptq: str, nsamples: int, seq: int, refine: bool = False) -> int:
    """Tokens the job keeps per layer: none for RTN unrefined; AWQ caps its windows at AWQ_SEARCH_TOKENS (whole windows)."""
    if ptq == "rtn" and not refine:
        return 0
    if ptq == "awq" and nsamples * seq > AWQ_SEARCH_TOKENS:
        nsamples = max(1, AWQ_SEARCH_TOKENS // seq)
    return nsamples * seq


def layer_work(shape: ModelShape, ptq: str, tokens: int, seq: int, dtype_bytes: int) -> dict[str, tuple[str, float]]:
    """What lives on the compute device while one layer is quantized, id -> (label, bytes), at the largest of its
    moments: a forward over one chunk of samples (collecting inputs), or the algorithm on one stage's linears."""
    h, inter, lin = shape.hidden, shape.intermediate, shape.linears()
    weights = {"layer.weights": ("one decoder layer's weights", (shape.linear_params_per_layer() + shape.small_params_per_layer()) * dtype_bytes)}
    forward = {}
    if tokens:
        chunk = min(tokens, max(1, CHUNK_TOKENS // seq) * seq)
        forward["layer.forward"] = (f"layer forward on {chunk} tokens",
                                    chunk * dtype_bytes * (2 * h + max(3 * inter, 3 * shape.q_dim + 2 * shape.kv_dim)))
    moments: list[dict[str, tuple[str, float]]]
    if ptq == "gptq":
        mlp = shape.mlp_names()
        stages = [["q_proj", "k_proj", "v_proj"], ["o_proj"], list(mlp[:-1]), [mlp[-1]]]
        moments = [{**forward, "gptq.hessian": ("GPTQ: the stage's Hessian (fp32)", max(4 * lin[s[0]][0] ** 2 for s in stages))}]
        for stage in stages:
            w = 4 * lin[stage[0]][0] * sum(lin[n][1] for n in stage)  # the stage's linears stacked, fp32
            hess = 4 * lin[stage[0]][0] ** 2
            moments.append({"gptq.hessian": ("GPTQ: the stage's Hessian (fp32)", hess),
                            "gptq.stacked": ("GPTQ: the stage's linears stacked (fp32)", w),
                            "gptq.work": ("GPTQ: working copies (Cholesky, column loop; measured)",
                                          max(2 * hess + GPTQ_COPIES[0] * w, hess + GPTQ_COPIES[1] * w))})
        if shape.experts:  # a fused parameter's experts, each with its own Hessian (ptq.gptq._batches)
            for width in sorted({i for i, _ in shape.mlp_linears(shape.expert_intermediate).values()}):
                hess = 4 * width**2
                batch = min(max(1, EXPERT_BATCH_BYTES // hess), shape.experts) * hess
                moments.append({**forward, "gptq.expert_hessians": ("GPTQ: one batch of experts' Hessians (fp32, "
                                                                    "--expert-batch-bytes)", batch)})
    elif ptq == "awq":
        # one input per group of linears sharing it (q/k/v, o, gate/up, down), recorded in fp32; and the inputs of each
        # searched block (attention, o_proj, the MLP, down_proj), recorded as called, to replay at every grid point
        widths = h + shape.q_dim + h + inter
        inputs = {"awq.inputs": ("AWQ: recorded inputs of each group of linears (fp32)", tokens * 4 * widths),
                  "awq.calls": ("AWQ: recorded inputs of each searched block", tokens * dtype_bytes * widths)}
        chunk_samples = max(1, min(tokens // seq, CHUNK_TOKENS // seq))
        replay = {"awq.outputs": ("AWQ: scale-search block outputs (fp32)", 2 * tokens * 4 * h),
                  "awq.attention": ("AWQ: attention scores and probabilities of one replayed chunk",
                                    2 * dtype_bytes * chunk_samples * shape.heads * seq * seq)}
        moments = [{**forward, **inputs}, {**inputs, **replay},
                   {**inputs, "awq.clip": ("AWQ: clip search on the widest linear (fp32)",
                                           AWQ_CLIP_COPIES * 4 * max(i * o for i, o in lin.values()))}]
    else:
        moments = [{"rtn.work": ("RTN: working copies of one linear (fp32; measured)", RTN_COPIES * 4 * max(i * o for i, o in lin.values()))}]
    peak: dict[str, tuple[str, float]] = max(moments, key=_moment_bytes)
    return {**weights, **peak}


def _moment_bytes(moment: dict[str, tuple[str, float]]) -> float:
    return sum(v for _, v in moment.values())


def refine_work(shape: ModelShape, batch: int, seq: int, dtype_bytes: int) -> dict[str, tuple[str, float]]:
    """What one refine step adds beside the layer's weights: its learned rounding and the batch's saved activations.
    Fused experts are not refined (`ptq.refine`), so a MoE layer refines its attention and shared experts."""
    refined = shape.moe_layer_unrouted_params() if shape.experts else shape.linear_params_per_layer()
    dtype = WeightsDtype.FP32 if dtype_bytes == 4 else WeightsDtype.BF16
    per_token = Inventory(shape, Job(method=Method.FULL, batch=batch, seq=seq, weights_dtype=dtype)).layer
    return {"refine.rounding": ("--refine: learned rounding of the layer's linears (counted)", REFINE_BYTES_PER_WEIGHT * refined),
            "refine.activations": (f"--refine: what autograd keeps for {batch} windows through the layer", batch * seq * per_token)}


def host_moments(shape: ModelShape, job: Job) -> dict[str, dict]:
    """Host RAM at each moment of the job: name -> components."""
    ptq, nsamples, seq, on_cpu = str(job.ptq), job.nsamples, job.seq, job.ptq_device == PTQDevice.CPU
    tokens = calibration_tokens(ptq, nsamples, seq, job.refine > 0)
    compute = 4 if on_cpu else 2
    base = {"Python, torch, transformers and the model skeleton (measured)": RUNTIME_BYTES}
    if tokens:
        base["the tokenizer (measured per vocabulary entry)"] = TOKENIZER_BYTES_PER_TOKEN * shape.vocab
    states = {"calibration hidden states entering the layer": tokens * shape.hidden * compute} if tokens else {}
    layer_params = shape.linear_params_per_layer() + shape.small_params_per_layer()
    labeled = layer_work(shape, ptq, tokens, seq, compute) if on_cpu else {"layer.weights": ("one decoder layer's weights",
                                                                                               layer_params * compute)}
    work = {label: nbytes for label, nbytes in labeled.values()}
    weights = {"one decoder layer's weights": work.pop("one decoder layer's weights")}
    done = {"finished codes of the layer (uint8)": shape.linear_params_per_layer()}
    if ptq == "gptq":  # the MLP's inputs, recorded for the down_proj stage (quantool.ptq.gptq._next_entry)
        done["GPTQ: recorded inputs of the MLP"] = tokens * shape.hidden * compute
    moments = {"read one layer": {**base, **states, "the layer's shard pages, mapped while read": layer_params * shape.dtype_bytes,
                                  **weights},
               "quantize one layer": {**base, **states, **weights, **work, **done}}
    outside = shape.embedding_params() + shape.lm_head_params() + shape.final_norm_params()
    moments["write the tensors outside the layers"] = {**base, "their shard pages and the tensors as stored": 2 * outside * shape.dtype_bytes}
    if job.refine:
        streams = 3 if MODEL_TARGETS and ptq != "awq" else 2  # the target and the outputs (and the model's own states)
        work = {label: nbytes for label, nbytes in refine_work(shape, job.refine_batch, seq, compute).values()} if on_cpu else {}
        moments["refine one layer"] = {**base, **states, **weights, **work, "finished codes of the layer (uint8)": done[
            "finished codes of the layer (uint8)"], "--refine: the layer's target and outputs on every window"
            + (", the full-precision model's hidden states" if streams == 3 else ""): streams * tokens * shape.hidden * compute}
    if tokens:
        embedding = shape.embedding_params()
        moments["tokenize the calibration text"] = {**base, "tokenizing the calibration text (transient, measured per byte)":
                                                    TOKENIZE_BYTES * job.calibration_bytes}
        moments["capture the calibration states"] = {
            **base, "the embedding's shard pages and the tensor as stored": 2 * embedding * shape.dtype_bytes,
            "the embedding in the compute dtype": embedding * compute, **states}
    return moments


def quantization_memory(shape: ModelShape, job: Job) -> tuple[dict[str, tuple[str, float]], dict[str, float], str]:
    """(device components id -> (label, bytes), host components label -> bytes, the host's peak moment): a CPU run
    keeps everything on the host."""
    moments = host_moments(shape, job)
    moment = max(moments, key=lambda m: sum(moments[m].values()))
    device: dict[str, tuple[str, float]] = {}
    if job.ptq_device != PTQDevice.CPU:
        ptq = str(job.ptq)
        device = layer_work(shape, ptq, calibration_tokens(ptq, job.nsamples, job.seq, job.refine > 0), job.seq, 2)
        if job.refine:
            device = max(device, {"layer.weights": device["layer.weights"], **refine_work(shape, job.refine_batch, job.seq, 2)},
                         key=_moment_bytes)
    return device, moments[moment], moment
