"""--refine: learned rounding starts at the method's codes, lowers a layer's reconstruction error (checked against a
plain float64 computation), and the refined checkpoint loads and generates."""

import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from quantool.cli import main
from quantool.device import compiles
from quantool.model.structure import LayerMap
from quantool.ptq.layer_report import LayerReport
from quantool.ptq.refine import RefineSettings, refine_layer
from quantool.quant.gptq import Hessian, gptq_quantize
from quantool.quant.quantizer import QuantizedWeight, QuantSpec
from quantool.quant.rounding import LearnedRounding


def _gptq_weight(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    h = Hessian(w.shape[1], w.device)
    h.add(x)
    res = gptq_quantize(w, h.H, spec, percdamp=0.01, order="act")
    return QuantizedWeight(res.q, res.scale, res.zero, res.g_idx)


@pytest.mark.parametrize("method", ["rtn", "gptq-act-order"])
@pytest.mark.parametrize("sym", [True, False])
def test_learned_rounding_starts_at_the_methods_codes(method, sym):
    torch.manual_seed(0)
    w = torch.randn(24, 96).clamp(-0.8, 0.8) * (torch.arange(24)[:, None] % 2 * 2 - 1)
    w[:, ::32] = 0.875  # each group's largest weight at +-3.5 scales of 0.25 exactly: a tie, as fp16 checkpoints give
    spec = QuantSpec(bits=3, group_size=32, sym=sym, min_zero=1)
    qw = QuantizedWeight.from_rtn(w, spec) if method == "rtn" else _gptq_weight(w, torch.randn(200, 96), spec)
    r = LearnedRounding(w, qw, spec.maxq)
    same = r.quantized()
    assert torch.equal(same.q, qw.q) and torch.equal(same.scale, qw.scale.half()) and torch.equal(same.zero, qw.zero)
    assert torch.allclose(r(), qw.dequantize(), rtol=0, atol=1e-6)
    if method == "rtn":
        raw = torch.round(w / r._per_weight(r.scale0.half().float())) + r.zero
        inside = (raw >= 0) & (raw <= spec.maxq)
        assert inside.float().mean() > 0.9 and torch.count_nonzero(r.v0[inside]) == 0  # SignRound's start, v0 = 0, but where clamped
    r.v.data.fill_(0.49)  # offsets just short of a whole step move every code up by at most one
    moved = r.quantized().q.int() - qw.q.int()
    assert moved.min() >= 0 and moved.max() <= 1 and moved.sum() > 0
    assert torch.allclose(r(), r.quantized().dequantize(), rtol=0, atol=1e-6)  # what it trains is what it stores


def _plain_rounding(r: LearnedRounding) -> torch.Tensor:
    """The learned rounding's weight written out op by op through autograd, each weight's scale gathered by g_idx."""
    s = r.scale0 * r.m
    s = (s + (s.half().float() - s).detach()).index_select(0, r.g_idx).t()
    u = r.w / s + r.v
    codes = torch.clamp(u + (torch.round(u) - u).detach() + r.v0 + r.zero, 0, r.maxq)
    return s * (codes - r.zero)


@pytest.mark.parametrize("layout", ["whole groups", "last group partial", "act-order"])
def test_fused_rounding_equals_autograd_through_the_plain_formula(layout):
    """The fused forward and backward (`_FakeQuant`, scales per group) give the plain formula's weight and offset
    gradients exactly, the scale multipliers' up to float summation order, on every group layout."""
    torch.manual_seed(4)
    w = torch.randn(48, 96 if layout == "whole groups" else 100)
    spec = QuantSpec(bits=4, group_size=32, sym=True, full_range=True)
    qw = QuantizedWeight.from_rtn(w, spec) if layout != "act-order" else _gptq_weight(w, torch.randn(300, 100), spec)
    r = LearnedRounding(w, qw, spec.maxq)
    assert (r.grouped, r.contiguous) == {"whole groups": (True, True), "last group partial": (False, True),
                                         "act-order": (False, False)}[layout]
    r.v.data.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    r.m.data.uniform_(0.8, 1.2, generator=torch.Generator().manual_seed(2))
    r.v.data[:, :4] = 0.5  # some codes pushed past the grid's ends, where the clamp stops the gradient
    r.m.data[:2] = 0.5
    grads = []
    for forward in (r.forward, lambda: _plain_rounding(r)):
        out = forward()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), r.v.grad, r.m.grad))
        r.v.grad = r.m.grad = None
    (out, v, m), (out_ref, v_ref, m_ref) = grads
    assert torch.equal(out, out_ref) and torch.equal(v, v_ref)
    assert torch.allclose(m, m_ref, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(v == 0) > 0  # the clamp was reached
    assert torch.equal(r.codes(), torch.round(out_ref / r._per_weight((r.scale0 * r.m).half().float()) + r.zero))


class _Block(nn.Module):
    """A gated MLP block with a residual, like a decoder layer's second half."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=True)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def _plain_error(block: _Block, weights: dict[str, torch.Tensor], x: torch.Tensor, target: torch.Tensor,
                 power: float = 0.0) -> float:
    """The block's output error with the given weights, written out in float64: each token's mean squared error
    over its target's mean square to the power `power`, averaged."""
    x64, t64 = x.double(), target.double()
    w = {n: t.double() for n, t in weights.items()}
    h = torch.nn.functional.silu(x64 @ w["gate"].t()) * (x64 @ w["up"].t())
    y = x64 + h @ w["down"].t() + block.down.bias.detach().double()
    err = (y - t64).square().mean(-1)
    return float((err / t64.square().mean(-1) ** power).mean())


def _rounded_block(seed: int, samples: int, bits: int, loud_tokens: bool = False):
    """A random block, its full-precision outputs on random inputs (loud_tokens: each window's first token 30x the
    others), and the block rounded to nearest in place."""
    torch.manual_seed(seed)
    block = _Block(64, 128)
    x = torch.randn(samples, 8, 64)
    if loud_tokens:
        x[:, 0] *= 30
    with torch.no_grad():
        target = block(x)
    lmap = LayerMap(linears=["gate", "up", "down"], groups=[["gate", "up"], ["down"]])
    spec = QuantSpec(bits=bits, group_size=32, sym=True, min_zero=1)
    rounded = {n: block.get_submodule(n).weight.data.clone() for n in lmap.linears}
    quantized = {n: QuantizedWeight.from_rtn(rounded[n], spec) for n in lmap.linears}
    with torch.no_grad():
        for n, qw in quantized.items():
            block.get_submodule(n).weight.copy_(qw.dequantize())
    return block, x, target, lmap, spec, rounded, quantized


@pytest.mark.parametrize("bf16,compiled,power", [(False, False, 0.0), (False, False, 0.5), (True, False, 0.5),
                                                 (False, True, 0.5), (False, False, 1.0)],
                         ids=["mse", "rms", "bf16", "compiled", "relative"])
def test_refine_lowers_the_blocks_error_against_a_plain_reference(bf16, compiled, power):
    """Eager and through torch.compile (where a compiler is found; auto leaves a block this small eager), on each
    token's error weighted by its target's mean square to the power -0, -0.5 (the default) and -1, with some
    tokens' inputs 30x the rest (as in an LLM's residual stream, which plain MSE lets dominate)."""
    if compiled and not compiles("cpu"):
        pytest.skip("torch.compile finds no C++ compiler here")
    block, x, target, lmap, spec, rounded, quantized = _rounded_block(seed=0, samples=16, bits=2, loud_tokens=True)
    before = _plain_error(block, {n: q.dequantize() for n, q in quantized.items()}, x, target, power)
    report = LayerReport()
    settings = RefineSettings(60, 4, bf16=bf16, compile=compiled or None, token_power=power)
    y = refine_layer(block, lmap, x, {}, target, quantized, rounded, dict.fromkeys(lmap.linears, spec), settings, seed=0,
                     device=torch.device("cpu"), tokens=4096, report=report)
    after = _plain_error(block, {n: q.dequantize() for n, q in quantized.items()}, x, target, power)
    assert report.refine["compile"] == compiled
    assert report.refine["kept"] and after < 0.9 * before, (before, after)
    assert report.refine["error_before"] == pytest.approx(before, rel=1e-4)
    assert report.refine["error_after"] == pytest.approx(after, rel=1e-4)
    for n, qw in quantized.items():  # the layer runs exactly the stored codes
        assert torch.equal(block.get_submodule(n).weight.data, qw.dequantize())
    assert torch.allclose(y, block(x).detach(), atol=1e-6)


def test_refined_checkpoint_loads_and_generates(tiny_llama, tmp_path, story_text):
    import quantool

    calib = tmp_path / "calib.txt"
    calib.write_text(story_text[:40000])
    plain, refined = tmp_path / "rtn", tmp_path / "refined"
    common = ["--group-size", "32", "--bits", "3", "--calib", str(calib), "--nsamples", "8", "--seqlen", "64", "--device", "cpu", "--json"]
    for out, extra in ((plain, []), (refined, ["--refine", "20", "--refine-batch", "4"])):
        result = CliRunner().invoke(main, ["rtn", str(tiny_llama), "-o", str(out), *common, *extra])
        assert result.exit_code == 0, result.output
    summary = json.loads((refined / "quantool.json").read_text())
    layers = summary["layers"]
    assert all(r["refine"]["linears"] == 7 and r["refine"]["error_after"] <= r["refine"]["error_before"] for r in layers)
    assert any(r["refine"]["kept"] for r in layers)
    model, tok = quantool.load(str(refined))
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


def _harmful(self, lr):
    """Every code a step up: the error can only grow."""
    self.v.data.fill_(0.5)
    self.v.grad = self.m.grad = None


def test_refine_keeps_the_best_step(monkeypatch):
    """Steps that only raise the batch loss are dropped: the rounding of the best step (here the start) is kept."""
    block, x, target, lmap, spec, rounded, quantized = _rounded_block(seed=1, samples=8, bits=4)
    original = {n: q.q.clone() for n, q in quantized.items()}
    monkeypatch.setattr(LearnedRounding, "sign_step", _harmful)
    report = LayerReport()
    refine_layer(block, lmap, x, {}, target, quantized, rounded, dict.fromkeys(lmap.linears, spec), RefineSettings(3, 4), seed=0,
                 device=torch.device("cpu"), tokens=4096, report=report)
    assert report.refine["error_after"] == pytest.approx(report.refine["error_before"], rel=1e-5)
    assert report.refine["best_step"] == 0
    assert all(torch.equal(quantized[n].q, original[n]) for n in lmap.linears)


def test_refine_keeps_the_methods_codes_when_it_does_not_help(monkeypatch):
    """Refined codes that raise the error over all windows are dropped: the method's codes, weights and outputs stay."""
    block, x, target, lmap, spec, rounded, quantized = _rounded_block(seed=1, samples=8, bits=4)
    original = {n: q.q.clone() for n, q in quantized.items()}
    with torch.no_grad():
        expected = block(x)
    monkeypatch.setattr(LearnedRounding, "sign_step", _harmful)
    monkeypatch.setattr(LearnedRounding, "restore", lambda self, state: None)  # the harmful last step stays
    report = LayerReport()
    y = refine_layer(block, lmap, x, {}, target, quantized, rounded, dict.fromkeys(lmap.linears, spec), RefineSettings(2, 4), seed=0,
                     device=torch.device("cpu"), tokens=4096, report=report)
    assert not report.refine["kept"] and report.refine["error_after"] > report.refine["error_before"]
    assert all(torch.equal(quantized[n].q, original[n]) for n in lmap.linears)
    assert all(torch.equal(block.get_submodule(n).weight.data, quantized[n].dequantize()) for n in lmap.linears)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("target", ["model", "layer"])
def test_refine_target(target):
    """The model target is the full-precision layer's output on the full-precision model's hidden states (passed on as
    the next layer's), the layer target its output on the quantized stream; the refined layer runs the quantized one."""
    from quantool.ptq.config import PTQConfig
    from quantool.ptq.pipeline import quantize_and_refine

    torch.manual_seed(0)
    block = _Block(64, 128)
    x_fp = torch.randn(8, 8, 64)
    x = x_fp + 0.3 * torch.randn_like(x_fp)  # the quantized stream, off the full-precision one
    with torch.no_grad():
        on_fp, on_x = block(x_fp), block(x)
    lmap = LayerMap(linears=["gate", "up", "down"], groups=[["gate", "up"], ["down"]])
    cfg = PTQConfig(method="rtn", bits=3, group_size=32, refine=4, refine_batch=4, refine_target=target).validate()
    specs = dict.fromkeys(lmap.linears, cfg.spec().with_group(32))
    quantized, report, y, y_fp = quantize_and_refine(block, lmap, x, {}, specs, cfg, torch.device("cpu"), 0,
                                                     x_fp if cfg.model_targets else None)
    assert cfg.model_targets == (target == "model")
    wanted = on_fp if target == "model" else on_x
    with torch.no_grad():
        rounded_out = _Block(64, 128)
        rounded_out.load_state_dict(block.state_dict())
        for n, qw in quantized.items():
            rounded_out.get_submodule(n).weight.copy_(qw.dequantize())
        assert torch.allclose(y, rounded_out(x), atol=1e-5)
    rms_weighted = (y - wanted).square().mean(-1) / wanted.square().mean(-1).sqrt()  # the default --refine-token-power 0.5
    assert report.refine["error_after"] == pytest.approx(float(rms_weighted.mean()), rel=1e-4)
    assert (y_fp is None) if target == "layer" else torch.equal(y_fp, on_fp)
