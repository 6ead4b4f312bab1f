"""Pure quantization math against plain references."""

import pytest
import torch

from quantool.qlinear import QuantLinear
from quantool.quant.awq_clip import apply_clip, search_clip
from quantool.quant.awq_scale import activation_scale, rtn, search_scale
from quantool.quant.gptq import Hessian, gptq_quantize
from quantool.quant.packing import pack_awq, pack_cols, pack_rows, unpack_awq, unpack_cols, unpack_rows
from quantool.quant.quantizer import QuantSpec, dequantize_groups, fake_quantize, quantize_groups


def correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 8  # a few outlier channels, as in LLM activations
    return x


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_bounded_by_the_step(bits, sym):
    w = torch.randn(32, 128)
    spec = QuantSpec(bits, 32, sym)
    q, scale, zero = quantize_groups(w, spec)
    assert q.min() >= 0 and q.max() <= spec.maxq
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))
    err = (dequantize_groups(q, scale, zero) - w).abs()
    step = scale.float().repeat_interleave(32, dim=0).t()
    # rounding inside the grid costs at most half a step; the grid's ends (sym: the top code, asym: the
    # rounded zero point) can clamp an extreme value by up to one step
    assert torch.all(err <= step * (1 + 1e-3) + 1e-6)
    assert (err / step).mean() < 0.3


def reference_gptq(W, H, spec, percdamp=0.01):
    """Straightforward float64 OBQ-style GPTQ: explicit inverse-Hessian downdates, one column at a time."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    g = spec.groups_for(cols)
    Q = torch.zeros_like(W)
    for j in range(cols):
        if j % g == 0:
            from quantool.quant.quantizer import qparams

            scale, zero = qparams(W[:, j:j + g].float(), spec)
            scale, zero = scale.half().double(), zero.double()
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, spec.maxq)
        Q[:, j] = q
        err = (W[:, j] - scale * (q - zero)) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


@pytest.mark.parametrize("group", [-1, 16])
def test_gptq_matches_float64_reference(group):
    torch.manual_seed(0)
    x = correlated_inputs(512, 64)
    W = torch.randn(24, 64)
    H = Hessian(64)
    H.add(x)
    spec = QuantSpec(4, group, True)
    ours = gptq_quantize(W, H.H, spec, blocksize=32)
    ref = reference_gptq(W, H.H, spec)
    agree = (ours.q == ref.to(torch.int32)).float().mean()
    assert agree > 0.98, agree


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(1)
    x = correlated_inputs()
    W = torch.randn(64, 64)
    H = Hessian(64)
    H.add(x)
    spec = QuantSpec(4, 32, True)
    res = gptq_quantize(W, H.H, spec)
    q, s, z = quantize_groups(W, spec)
    err = lambda Wq: ((x @ (W - Wq).t()) ** 2).mean()  # noqa: E731
    assert err(res.weight) < 0.7 * err(dequantize_groups(q, s, z))


def test_gptq_act_order_keeps_groups_consistent():
    torch.manual_seed(2)
    x = correlated_inputs(512, 64)
    W = torch.randn(16, 64)
    H = Hessian(64)
    H.add(x)
    for static in (False, True):
        res = gptq_quantize(W, H.H, QuantSpec(4, 16, True), act_order=True, static_groups=static)
        assert torch.equal(dequantize_groups(res.q, res.scale, res.zero, res.g_idx), res.weight)
        assert torch.all(torch.bincount(res.g_idx.long()) == 16)


def test_gptq_raises_damping_when_cholesky_fails():
    W = torch.randn(8, 16)
    H = torch.ones(16, 16) * 1e3 - 1e-3 * torch.eye(16)  # indefinite: Cholesky fails without more damping
    res = gptq_quantize(W, H, QuantSpec(4, -1, True), percdamp=1e-8)
    assert res.damp > 1e-8


def test_awq_scale_beats_identity():
    torch.manual_seed(3)
    x = correlated_inputs(1024, 64)
    W = torch.randn(32, 64)
    spec = QuantSpec(4, 32, False)
    ref = x @ W.t()
    s, info = search_scale(activation_scale(x), [W], lambda ws: x @ ws[0].t(), ref, spec)
    assert info["loss"] < info["loss_at_1"] and info["alpha"] > 0
    assert ((x @ (rtn(W * s, spec) / s).t() - ref) ** 2).mean() < ((x @ rtn(W, spec).t() - ref) ** 2).mean()


def test_awq_clip_never_hurts():
    torch.manual_seed(4)
    x = correlated_inputs(512, 64)
    W = torch.randn(32, 64)
    W[0, 0] = 12  # an outlier weight that widens its group's range
    spec = QuantSpec(3, 32, False)
    clipped = apply_clip(W, search_clip(W, x, spec))
    err = lambda w: ((x @ (rtn(w, spec) - W).t()) ** 2).mean()  # noqa: E731
    assert err(clipped) <= err(W)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_roundtrip(bits):
    codes = torch.randint(0, 2**bits, (64, 40), dtype=torch.int32)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits), codes)
    assert torch.equal(unpack_cols(pack_cols(codes.t().contiguous(), bits), bits), codes.t())


def test_gptq_4bit_layout_is_nibbles_in_row_order():
    codes = torch.arange(8, dtype=torch.int32).repeat(4)[:, None] % 16  # rows 0..31 -> 0..7,0..7,...
    words = pack_rows(codes, 4)
    assert words.shape == (4, 1)
    assert int(words[0, 0]) == 0x76543210


def test_awq_layout_interleaves():
    codes = torch.arange(8, dtype=torch.int32)[None, :]
    assert int(pack_awq(codes)[0, 0]) == 0x75316420
    c = torch.randint(0, 16, (5, 24), dtype=torch.int32)
    assert torch.equal(unpack_awq(pack_awq(c)), c)


def test_tinygemm_kernel_matches_dequantized_matmul():
    torch.manual_seed(5)
    w = torch.randn(64, 128)
    q, s, z = quantize_groups(w, QuantSpec(4, 32, False))
    layer = QuantLinear(q, s, z, None, torch.randn(64), 4, dtype=torch.bfloat16)
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    ref = layer(x).float()
    assert layer.use_kernel("tinygemm") == "tinygemm"
    fast = layer(x).float()
    assert torch.allclose(fast, ref, rtol=2e-2, atol=2e-2 * ref.abs().max())


def test_fake_quantize_straight_through():
    w = torch.randn(8, 32, requires_grad=True)
    y = fake_quantize(w, QuantSpec(4, 32, True))
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    q, s, z = quantize_groups(w.detach(), QuantSpec(4, 32, True))
    assert torch.allclose(y, dequantize_groups(q, s, z))
