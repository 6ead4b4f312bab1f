"""Bit packing of integer codes into int32 words, for the GPTQ v1 and AWQ GEMM checkpoint layouts.

GPTQ v1 (AutoGPTQ / GPT-QModel, read by vLLM): qweight [in * bits / 32, out] packs consecutive input rows
as a little-endian bit stream (a unit of 32 / gcd(32, bits) codes fills whole words: 8 codes in one word at
4 bits, 32 codes in 3 words at 3 bits, whose codes straddle words); qzeros [groups, out * bits / 32] packs
(zero - 1) the same way along the output dimension.
AWQ GEMM (llm-awq / AutoAWQ, read by vLLM): qweight [in, out / 8] packs 8 output columns per word in the
interleaved order 0, 2, 4, 6, 1, 3, 5, 7; qzeros [groups, out / 8] likewise (zero stored as is).
"""

from __future__ import annotations

import math

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
CHUNK = 1 << 22  # codes packed per step


def unit(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run of codes that fills whole int32 words."""
    g = math.gcd(32, bits)
    return 32 // g, bits // g


def pack_rows(codes: torch.Tensor, bits: int, chunk: int = CHUNK) -> torch.Tensor:
    """int codes [n, m] (n a multiple of unit(bits)[0]) -> int32 [n * bits / 32, m], bit stream along dim 0.
    Packed in column chunks of about `chunk` codes, so the int64 working copies stay small (a 7B gate_proj's
    whole int64 copy would be 360 MB)."""
    _check_range(codes, bits)
    cols = max(1, chunk // max(1, codes.shape[0]))
    return torch.cat([_pack_rows(codes[:, i:i + cols], bits) for i in range(0, codes.shape[1], cols)], dim=1)


def _check_range(codes: torch.Tensor, bits: int) -> None:
    """Codes must fit their width: packing would otherwise keep only their low bits, a silently wrong checkpoint."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes in [{int(codes.min())}, {int(codes.max())}] do not fit {bits} bits: the quantizer and the "
                         f"layout disagree on this linear's width")


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_rows on one chunk."""
    n, m = codes.shape
    per, nwords = unit(bits)
    c = (codes.to(torch.int64) & ((1 << bits) - 1)).reshape(n // per, per, m)
    words = torch.zeros(n // per, nwords, m, dtype=torch.int64, device=codes.device)
    for k in range(per):
        w, off = divmod(k * bits, 32)
        words[:, w] |= (c[:, k] << off) & 0xFFFFFFFF
        spill = off + bits - 32
        if spill > 0:
            words[:, w + 1] |= c[:, k] >> (bits - spill)
    return _to_int32(words.reshape(n // per * nwords, m))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: int32 [n * bits / 32, m] -> int32 codes [n, m]."""
    nw, m = words.shape
    per, nwords = unit(bits)
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(nw // nwords, nwords, m)
    mask = (1 << bits) - 1
    codes = torch.zeros(nw // nwords, per, m, dtype=torch.int64, device=words.device)
    for k in range(per):
        idx, off = divmod(k * bits, 32)
        val = w[:, idx] >> off
        spill = off + bits - 32
        if spill > 0:
            val = val | (w[:, idx + 1] << (bits - spill))
        codes[:, k] = val & mask
    return codes.reshape(nw // nwords * per, m).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit stream along dim 1 (GPTQ qzeros)."""
    return pack_rows(codes.t().contiguous(), bits).t().contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(words.t().contiguous(), bits).t().contiguous()


def pack_awq(codes: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """4-bit codes [n, m] (m multiple of 8) -> int32 [n, m / 8] in AWQ's interleaved order, in row chunks of about
    `chunk` codes."""
    _check_range(codes, 4)
    rows = max(1, chunk // max(1, codes.shape[1]))
    return torch.cat([_pack_awq(codes[i:i + rows]) for i in range(0, codes.shape[0], rows)])


def _pack_awq(codes: torch.Tensor) -> torch.Tensor:
    n, m = codes.shape
    c = codes.to(torch.int64).reshape(n, m // 8, 8)
    words = torch.zeros(n, m // 8, dtype=torch.int64, device=codes.device)
    for slot, col in enumerate(AWQ_ORDER):
        words |= c[:, :, col] << (4 * slot)
    return _to_int32(words)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    n, m8 = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(n, m8, 8, dtype=torch.int64, device=words.device)
    for slot, col in enumerate(AWQ_ORDER):
        codes[:, :, col] = (w >> (4 * slot)) & 0xF
    return codes.reshape(n, m8 * 8).to(torch.int32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
