"""Pure quantization math against plain references."""

from dataclasses import replace

import pytest
import torch

from quantool.formats.bits import pack_awq, pack_cols, pack_rows, unpack_awq, unpack_cols, unpack_rows
from quantool.formats.qlinear import QuantLinear
from quantool.quant.awq_clip import apply_clip, group_gram, group_output_error, search_clip
from quantool.quant.awq_scale import activation_scale, search_scale
from quantool.quant.gptq import CholeskyError, Hessian, gptq_quantize
from quantool.quant.quantizer import QuantSpec, dequantize_groups, fake_quantize, group_index, pad_to_groups, qparams, quantize_groups
from quantool.quant.quantizer import round_trip as rtn


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
    err = (dequantize_groups(q, scale, zero, group_index(128, 32)) - w).abs()
    step = scale.float().repeat_interleave(32, dim=0).t()
    # rounding inside the grid costs at most half a step; the grid's ends (sym: the top code, asym: the
    # rounded zero point) can clamp an extreme value by up to one step
    assert torch.all(err <= step * (1 + 1e-3) + 1e-6)
    assert (err / step).mean() < 0.3


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_full_range_grid_matches_a_plain_reference(bits):
    """Symmetric full range, per group in float64: step max|w| / 2^(bits-1), signed so that the largest |w| lands on
    the lowest code exactly; every other weight rounds to nearest on codes 0..maxq around zero 2^(bits-1)."""
    torch.manual_seed(bits)
    w = torch.randn(16, 128)
    w[0, 5], w[1, 70] = 6.0, -6.0  # one group led by a positive, one by a negative extreme
    spec = QuantSpec(bits, 32, True, full_range=True)
    q, scale, zero = quantize_groups(w, spec)
    half = 2 ** (bits - 1)
    assert torch.all(zero == half)
    for g in range(4):
        cols = w[:, 32 * g:32 * (g + 1)].double()
        lead = cols.gather(1, cols.abs().argmax(dim=1, keepdim=True))[:, 0]  # the signed largest |w| of each row
        s = -lead / half
        assert torch.allclose(scale[g].double(), s, rtol=1e-3)  # stored in fp16
        s = scale[g].double()
        ref = torch.clamp(torch.round(cols / s[:, None]) + half, 0, spec.maxq)
        assert torch.equal(q[:, 32 * g:32 * (g + 1)].double(), ref)
        assert torch.all(ref.gather(1, cols.abs().argmax(dim=1, keepdim=True)) == 0)
    assert scale[0, 0] < 0 and scale[2, 1] > 0
    if bits <= 4:  # a finer step than the half-range grid's max|w| / (2^(bits-1) - 1/2): less error on Gaussian weights
        half_range = rtn(w, replace(spec, full_range=False))
        assert (rtn(w, spec) - w).square().mean() < (half_range - w).square().mean()


@pytest.mark.parametrize("sym", [True, False])
def test_mse_range_is_the_least_error_shrink(sym):
    """qparams with mse: per row, the shrink p in 1, 0.99, ..., 0.21 with the least sum |Q(w) - w|^2.4, found here
    by a plain float64 loop over rows and steps; never worse than min-max (p = 1)."""
    torch.manual_seed(7)
    w = torch.randn(12, 64)
    w[0, 3], w[5, 9] = 9.0, -7.0  # outliers worth clipping at 3 bits
    spec = QuantSpec(3, 64, sym)
    scale, _zero = qparams(w, replace(spec, mse=True))
    for r in range(12):
        row = w[r].double()
        lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        if sym:
            hi = max(-lo, hi)
            lo = -hi
        errs = []
        for i in range(80):
            s = (hi - lo) * (1 - i / 100) / spec.maxq
            z = 4.0 if sym else round(-lo * (1 - i / 100) / s)
            q = torch.clamp(torch.round(row / s) + z, 0, spec.maxq)
            errs.append(((s * (q - z) - row).abs() ** 2.4).sum().item())
        best = min(range(80), key=errs.__getitem__)
        assert scale[r].item() == pytest.approx((hi - lo) * (1 - best / 100) / spec.maxq, rel=1e-5)
        assert errs[best] <= errs[0]
    assert not torch.equal(scale, qparams(w, spec)[0])  # the outlier rows do shrink


def test_mse_range_is_the_same_across_row_chunks():
    """qparams scores rows in chunks of ~4M elements: 2000 rows (3 chunks at 64 columns) give what 400-row calls give."""
    torch.manual_seed(0)
    w = torch.randn(2000, 64)
    spec = QuantSpec(3, 64, False, mse=True)
    whole = qparams(w, spec)
    parts = [qparams(w[r:r + 400], spec) for r in range(0, 2000, 400)]
    for got, want in zip(whole, zip(*parts)):
        assert torch.equal(got, torch.cat(want))


def reference_gptq(W, H, spec, percdamp=0.01, order=None):
    """Straightforward float64 OBQ-style GPTQ: explicit inverse-Hessian downdates, one column at a time, in the
    given column order; each group's parameters come from its columns when its first one comes up."""
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    order = list(range(cols)) if order is None else order
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=torch.float64)
    W, H = W[:, order], H[order][:, order]
    Hinv = torch.linalg.inv(H)
    g = spec.group_size_for(cols)
    group = [c // g for c in order]
    Q = torch.zeros_like(W)
    for j in range(cols):
        if j == 0 or group[j] != group[j - 1]:
            members = [k for k in range(cols) if group[k] == group[j]]
            scale, zero = qparams(W[:, members].float(), spec)
            scale, zero = scale.half().double(), zero.double()
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, spec.maxq)
        Q[:, j] = q
        err = (W[:, j] - scale * (q - zero)) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    out = torch.zeros_like(Q)
    out[:, order] = Q
    return out


def group_aware_order(diag, g):
    """GAR in plain Python: groups by their largest diagonal, columns by diagonal within each group."""
    groups = [list(range(i, min(i + g, len(diag)))) for i in range(0, len(diag), g)]
    groups.sort(key=lambda cols: -max(diag[c] for c in cols))
    return [c for cols in groups for c in sorted(cols, key=lambda c: -diag[c])]


@pytest.mark.parametrize("group,cols", [(-1, 64), (16, 64), (16, 56)], ids=["per-channel", "g16", "g16-partial"])
@pytest.mark.parametrize("order", ["natural", "group"])
@pytest.mark.parametrize("full", [False, True], ids=["half-range", "full-range"])
def test_gptq_matches_float64_reference(group, cols, order, full):
    torch.manual_seed(0)
    x = correlated_inputs(512, cols)
    W = torch.randn(24, cols)
    H = Hessian(cols)
    H.add(x)
    spec = QuantSpec(4, group, True, full_range=full)
    ours = gptq_quantize(W, H.H, spec, blocksize=32, order=order)
    ref_order = group_aware_order(torch.diag(H.H).tolist(), spec.group_size_for(cols)) if order == "group" else None
    ref = reference_gptq(W, H.H, spec, order=ref_order)
    agree = (ours.q == ref.to(torch.int32)).float().mean()
    assert agree > 0.98, agree
    assert torch.equal(ours.g_idx, group_index(cols, spec.group_size_for(cols)))  # both keep groups contiguous
    assert ours.scale.shape[0] == -(-cols // spec.group_size_for(cols))


def test_hessian_in_blocks_matches_float64():
    """The upper blocks accumulated over several batches (600 columns: blocks of 256, 256 and 88), mirrored,
    equal 2/n X^T X."""
    torch.manual_seed(0)
    x = correlated_inputs(512, 600)
    H = Hessian(600)
    for part in x.split([100, 300, 112]):
        H.add(part)
    ref = 2 * x.double().t() @ x.double() / 512
    assert torch.allclose(H.H.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(H.H[256:, :256], H.H[:256, 256:].t())


@pytest.mark.parametrize("mse", [False, True])
def test_gptq_rows_are_independent(mse):
    """Linears sharing an input are quantized as one stacked matrix: each row's codes and group parameters are
    what it gets alone (block updates are products whose rounding may flip a rare code)."""
    torch.manual_seed(3)
    x = correlated_inputs(512, 128)
    H = Hessian(128)
    H.add(x)
    W1, W2 = torch.randn(40, 128), torch.randn(24, 128)
    spec = QuantSpec(4, 32, True, mse=mse)
    both = gptq_quantize(torch.cat([W1, W2]), H.H, spec)
    alone = [gptq_quantize(w, H.H, spec) for w in (W1, W2)]
    assert (both.q == torch.cat([r.q for r in alone])).float().mean() > 0.999
    assert (both.scale == torch.cat([r.scale for r in alone], dim=1)).float().mean() > 0.99


def test_quantize_groups_partial_last_group():
    """56 columns in groups of 16: three full groups and one of 8, each quantized over its own columns."""
    torch.manual_seed(1)
    w = torch.randn(8, 56)
    spec = QuantSpec(4, 16, False)
    q, scale, zero = quantize_groups(w, spec)
    assert scale.shape == (4, 8)
    last_q, last_s, last_z = quantize_groups(w[:, 48:], QuantSpec(4, -1, False))
    assert torch.equal(q[:, 48:], last_q) and torch.equal(scale[3], last_s[0]) and torch.equal(zero[3], last_z[0])
    assert torch.equal(rtn(w, spec), dequantize_groups(q, scale, zero, group_index(56, 16)))


@pytest.mark.parametrize("bits,group,sym,mse,full", [(4, 32, True, False, False), (4, 16, False, False, False),
                                                     (3, 32, False, True, False), (4, -1, True, True, False),
                                                     (8, 64, False, False, False), (3, 32, True, True, True)])
def test_round_trip_equals_dequantized_codes(bits, group, sym, mse, full):
    """round_trip (QAT's and AWQ's fast path) gives bit for bit what the stored codes dequantize to, partial groups too."""
    torch.manual_seed(2)
    w = torch.randn(24, 100) * torch.rand(24, 1)
    w[3] = 0
    spec = QuantSpec(bits, group, sym, mse=mse, full_range=full)
    q, scale, zero = quantize_groups(w, spec)
    assert torch.equal(rtn(w, spec), dequantize_groups(q, scale, zero, group_index(100, spec.group_size_for(100))))


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(1)
    x = correlated_inputs()
    W = torch.randn(64, 64)
    H = Hessian(64)
    H.add(x)
    spec = QuantSpec(4, 32, True)
    res = gptq_quantize(W, H.H, spec)
    q, s, z = quantize_groups(W, spec)
    err = lambda Wq: ((x @ (W - Wq).t()) ** 2).mean()
    assert err(res.weight) < 0.7 * err(dequantize_groups(q, s, z, group_index(64, 32)))


def test_gptq_act_order_keeps_groups_consistent():
    torch.manual_seed(2)
    x = correlated_inputs(512, 64)
    W = torch.randn(16, 64)
    H = Hessian(64)
    H.add(x)
    for static in (False, True):
        res = gptq_quantize(W, H.H, QuantSpec(4, 16, True), order="act", static_groups=static)
        assert torch.equal(dequantize_groups(res.q, res.scale, res.zero, res.g_idx), res.weight)
        assert torch.all(torch.bincount(res.g_idx.long()) == 16)


def test_gptq_raises_damping_when_cholesky_fails():
    W = torch.randn(8, 16)
    H = torch.ones(16, 16) * 1e3 - 1e-3 * torch.eye(16)  # indefinite: Cholesky fails without more damping
    res = gptq_quantize(W, H, QuantSpec(4, -1, True), percdamp=1e-8)
    assert res.damp > 1e-8
    with pytest.raises(CholeskyError, match="not positive definite"):  # never positive definite: ends, with a reason
        gptq_quantize(W, -torch.eye(16), QuantSpec(4, -1, True), percdamp=0.01)


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
    clipped = apply_clip(W, search_clip(W, x, spec), spec)
    err = lambda w: ((x @ (rtn(w, spec) - W).t()) ** 2).mean()
    assert err(clipped) <= err(W)


def test_awq_clip_gram_error_matches_per_token_products():
    """The Gram form d^T G d equals llm-awq's mean over tokens of (x_g . d_g)^2, computed directly in float64."""
    torch.manual_seed(5)
    x, d = correlated_inputs(300, 80), torch.randn(16, 80)  # 80 = one group of 64 and a partial one of 16
    direct = torch.stack([(x[:, j:j + 64].double() @ d[:, j:j + 64].double().t()).pow(2).mean(dim=0)
                          for j in (0, 64)], dim=1)
    fast = group_output_error(pad_to_groups(d, 64), group_gram(x, 64))
    assert torch.allclose(fast.double(), direct, rtol=1e-5)


def test_awq_clip_picks_the_reference_minimum():
    """search_clip's choice scores the best of the 10 shrink steps under the plain per-token objective."""
    torch.manual_seed(6)
    x, W = correlated_inputs(256, 96), torch.randn(24, 96)
    spec = QuantSpec(3, 32, False)
    xg = x.double().reshape(256, 3, 32)

    def per_token_error(w):
        return (torch.einsum("tjg,rjg->trj", xg, (rtn(w, spec) - W).double().reshape(24, 3, 32)) ** 2).mean(dim=0)

    org = W.abs().reshape(24, 3, 32).amax(dim=-1)
    steps = torch.stack([per_token_error(apply_clip(W, org * (1 - k / 20), spec)) for k in range(10)])
    chosen = per_token_error(apply_clip(W, search_clip(W, x, spec), spec))
    assert torch.allclose(chosen, steps.min(dim=0).values, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("bits,n", [(2, 48), (3, 64), (4, 40), (4, 48), (8, 44)])
def test_gptq_packing_roundtrip(bits, n):
    """Widths that fill whole words: multiples of 32 codes at 3 bits, of 32 / bits codes otherwise."""
    codes = torch.randint(0, 2**bits, (n, 40), dtype=torch.int32)
    words = pack_rows(codes, bits)
    assert words.shape == (n * bits // 32, 40)
    assert torch.equal(unpack_rows(words, bits), codes)
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


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, False), QuantSpec(4, 32, True, full_range=True)], ids=["asym", "full-range"])
def test_tinygemm_kernel_matches_dequantized_matmul(spec):
    """Zero points, and the full range's negative scales, through the packed kernel as through the plain matmul."""
    torch.manual_seed(5)
    w = torch.randn(64, 128)
    q, s, z = quantize_groups(w, spec)
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
    assert torch.allclose(y, dequantize_groups(q, s, z, group_index(32, 32)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_chunked_packing_equals_packing_whole(bits):
    """Packing in chunks (which bounds its int64 working copies) writes the same words as packing all at once."""
    from quantool.formats.bits import _pack_awq, _pack_rows, pack_awq, pack_rows

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (256, 300), generator=gen, dtype=torch.int32)
    assert torch.equal(pack_rows(codes, bits, chunk=3000), _pack_rows(codes, bits))
    if bits == 4:
        codes = torch.randint(0, 16, (300, 256), generator=gen, dtype=torch.int32)
        assert torch.equal(pack_awq(codes, chunk=3000), _pack_awq(codes))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_refuses_codes_wider_than_the_layout(bits):
    """A code that does not fit its width must stop the write, not lose its high bits."""
    codes = torch.zeros(32, 8, dtype=torch.int32)
    pack_rows(codes + (1 << bits) - 1, bits)
    codes[5, 3] = 1 << bits
    with pytest.raises(ValueError, match=f"do not fit {bits} bits"):
        pack_rows(codes, bits)
    with pytest.raises(ValueError, match="do not fit"):
        pack_rows(codes - 2 * (1 << bits), bits)
    if bits == 4:
        with pytest.raises(ValueError, match="do not fit 4 bits"):
            pack_awq(codes)
