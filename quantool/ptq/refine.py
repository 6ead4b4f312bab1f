"""--refine N: block-wise reconstruction of each decoder layer after its method, SignRound's training loop
(Cheng et al. 2023, arXiv 2309.05516, algorithm 1; AutoRound's `quant_block`).

Starting from the method's codes and scales (`quant.rounding.LearnedRounding`), N steps of signed gradient descent,
each on a random batch of calibration windows, minimise the error (`layer_loss`: each token's squared error over
its target's RMS by default, SignRound's plain mean squared error with token_power 0) between the layer's output with
the learned rounding, on the pipeline's inputs (the outputs of the already-quantized layers), and the target the
pipeline passes: the full-precision model's own output of this layer (AutoRound's default, so a layer also
corrects the error of those before it) or the full-precision layer's on the same inputs. The learning rate decays
linearly from lr/N (SignRound: lr = 1), so an offset can move at most about lr/2 over the run; the step with the
lowest batch loss is kept (AutoRound's best-iteration choice). The refined codes are kept only if they lower the
error over all calibration windows; the layer report gives the error before and after, and the kept step's number
of updates (best_step; 0: the method's codes).
Experts held in fused parameters keep the method's codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call
from torch.nn import functional as F

from quantool.device import compiles
from quantool.model.layerwise import run_layer, to_device
from quantool.model.structure import LayerMap
from quantool.ptq.layer_report import LayerReport, set_weight
from quantool.quant.quantizer import QuantizedWeight, QuantSpec
from quantool.quant.rounding import LearnedRounding

# Compiling a step's graph takes seconds once per kind of layer; below this many refined weights a layer's eager step
# takes milliseconds, so auto compiles only at least this large a layer
COMPILE_MIN_WEIGHTS = 1 << 20


@dataclass(frozen=True)
class RefineSettings:
    """steps: SignRound's iterations per layer; batch: windows per step; lr: a multiple of SignRound's 1/steps; bf16:
    each step's forward and backward under bfloat16 autocast (the codes kept are still judged in the layer's dtype);
    compile: each step's layer forward and loss through torch.compile (None: where `device.compiles`, for layers of
    at least COMPILE_MIN_WEIGHTS refined weights without experts, whose data-dependent routing splits the graph);
    token_power: the loss weighs each token's squared error by its target's mean square to this power, negated
    (`layer_loss`: 0 is plain MSE, 1 each token's relative error)."""

    steps: int
    batch: int = 8
    lr: float = 1.0
    bf16: bool = False
    compile: bool | None = None
    token_power: float = 0.5


def layer_loss(y: torch.Tensor, target: torch.Tensor, token_power: float) -> torch.Tensor:
    """Refine's loss of a layer's outputs against target: each token's mean squared error divided by its target's
    mean square to the power p, averaged. p = 0 is SignRound's plain MSE, which in a residual stream is carried by
    the few tokens of very large activations (SmolLM2 from layer 11 on: each window's first token, ~24,000 in one
    channel against a median ~2, holds over 90% of the error); p = 1 is each token's relative error, the error the next
    RMSNorm sees, to first order, which lets those tokens get worse than round-to-nearest. In between, p = 0.5 (each
    token's error over its RMS) keeps them near round-to-nearest and takes the others' relative error most of the way
    to p = 1's (docs/quantization.md has the measurements)."""
    if token_power == 0:
        return F.mse_loss(y.float(), target.float())
    t = target.float()
    return ((y.float() - t).pow(2).mean(-1) / t.pow(2).mean(-1).clamp_min(1e-12).pow(token_power)).mean()


def _step_loss(layer: torch.nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, kwargs: dict,
               target: torch.Tensor, bf16: bool, token_power: float) -> torch.Tensor:
    """One step's loss: the layer with these weights on x, against the target (`layer_loss`)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = functional_call(layer, weights, (x,), kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return layer_loss(out, target, token_power)


@functools.cache
def _compiled_step_loss() -> Callable[..., torch.Tensor]:
    """`_step_loss` through torch.compile: built at the first call, reused by every layer of the same structure and
    shapes (the layer is an argument, not a constant). A compile that fails falls back to eager (dynamo's
    suppress_errors); one compiler thread, so compiling forks no worker processes beside the job."""
    import torch._dynamo.config as dynamo
    import torch._inductor.config as inductor

    compiled = torch.compile(_step_loss, dynamic=False)

    def run(*args: Any) -> torch.Tensor:
        with inductor.patch(compile_threads=1), dynamo.patch(suppress_errors=True):
            return compiled(*args)

    return run


def output_loss(y: torch.Tensor, target: torch.Tensor, token_power: float) -> float:
    """The error refine reports and keeps codes by, over all windows: `layer_loss`, one window at a time (no
    whole-stream temporaries)."""
    return sum(float(layer_loss(a, b, token_power)) for a, b in zip(y, target)) / len(y)


def output_error(layer: torch.nn.Module, x: torch.Tensor, kwargs: dict, target: torch.Tensor, device: torch.device,
                 tokens: int, token_power: float) -> tuple[float, torch.Tensor]:
    """`output_loss` of the layer's outputs over all windows, and the outputs."""
    y = run_layer(layer, x, kwargs, device, tokens)
    return output_loss(y, target, token_power), y


def _refinable(layer: torch.nn.Module, lmap: LayerMap, quantized: dict[str, QuantizedWeight]) -> list[str]:
    """Linears with their own [out, in] weight parameter (fused experts are views of a 3-D one)."""
    names = []
    for name in quantized:
        if lmap.expert_of(name) is not None:
            continue
        mod = layer.get_submodule(name)
        weight = getattr(mod, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and weight.numel() == quantized[name].q.numel():
            names.append(name)
    return names


def refine_layer(layer: torch.nn.Module, lmap: LayerMap, x: torch.Tensor, kwargs: dict, target: torch.Tensor,
                 quantized: dict[str, QuantizedWeight], rounded: dict[str, torch.Tensor], specs: dict[str, QuantSpec],
                 settings: RefineSettings, seed: int, device: torch.device, tokens: int, report: LayerReport,
                 before: float | None = None) -> torch.Tensor:
    """Refine the layer's quantized linears in place (`quantized` and the layer's weights); returns the layer's
    outputs on x with the codes kept. `rounded` holds the weights each method rounded (before rounding); `before`,
    the method's output error where the caller measured it (else one more pass over the windows measures it)."""
    names = _refinable(layer, lmap, quantized)
    if before is None:
        before = output_error(layer, x, kwargs, target, device, tokens, settings.token_power)[0]
    learners = {n: LearnedRounding(rounded[n].to(device), quantized[n], specs[n].maxq) for n in names}
    compiled = settings.compile if settings.compile is not None else (
        compiles(device.type) and sum(r.w.numel() for r in learners.values()) >= COMPILE_MIN_WEIGHTS
        and not any(lmap.expert_of(n) is not None for n in quantized))
    step_loss = _compiled_step_loss() if compiled else _step_loss
    transposed = {n: not isinstance(layer.get_submodule(n), torch.nn.Linear) for n in names}  # Conv1D stores [in, out]
    dtypes = {n: layer.get_submodule(n).weight.dtype for n in names}
    kw = to_device(kwargs, device)
    gen = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.requires_grad_(False)
    # the best step's state, in buffers allocated once before the loop and copied into
    best_loss, best, best_step = float("inf"), {n: r.snapshot() for n, r in learners.items()}, None
    steps = settings.steps
    with torch.enable_grad():
        for step in range(steps):
            pick = torch.randperm(x.shape[0], generator=gen)[:settings.batch]
            weights: dict[str, Any] = {}
            for n, r in learners.items():
                w = r()
                weights[f"{n}.weight"] = (w.t() if transposed[n] else w).to(dtypes[n])
            loss = step_loss(layer, weights, x[pick].to(device), kw, target[pick].to(device), settings.bf16, settings.token_power)
            if (value := loss.item()) < best_loss:  # the rounding this loss was computed with, before this step's update
                best_loss, best_step = value, step
                for n, r in learners.items():
                    r.save(best[n])
            loss.backward()
            for r in learners.values():
                r.sign_step(settings.lr * (1 - step / steps) / steps)
    for n, r in learners.items():  # if every loss was NaN, the start: the method's codes, which the check below keeps
        r.restore(best[n])
    refined = {n: r.quantized() for n, r in learners.items()}
    del learners
    for n, qw in refined.items():
        w = qw.dequantize().to(device)
        set_weight(layer.get_submodule(n), w.t() if transposed[n] else w)
    after, y = output_error(layer, x, kwargs, target, device, tokens, settings.token_power)
    report.refine = {"error_before": before, "error_after": after, "kept": after < before, "linears": len(names),
                     "compile": compiled, "best_step": best_step}
    if after < before:
        quantized.update(refined)
        return y
    del y
    for n in names:  # the method's codes were better on all windows: put them back
        w = quantized[n].dequantize().to(device)
        set_weight(layer.get_submodule(n), w.t() if transposed[n] else w)
    return run_layer(layer, x, kwargs, device, tokens)
