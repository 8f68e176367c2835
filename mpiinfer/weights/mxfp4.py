"""MXFP4 (OCP microscaling FP4) weights, dequantized at load time: gpt-oss publishes its experts so.

Owns: ``dequantize`` (the checkpoint's ``*_blocks`` / ``*_scales`` pair -> a float tensor).  Each row of a
``*_blocks`` tensor (..., rows, G, 16) holds G blocks of 32 FP4 (e2m1) values, two per byte, low nibble first;
``*_scales`` (..., rows, G) holds one E8M0 exponent per block (value = fp4 * 2 ** (scale - 127)).  Every value is
exact in bfloat16 and float32.  Pure torch, no MPI; the loader reads only this rank's blocks before calling it.
"""
from __future__ import annotations

import torch

# the 16 e2m1 codes: sign bit 3, then exponent 2 bits and mantissa 1 bit
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32          # values per scale


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(..., rows, G, 16) uint8 blocks and (..., rows, G) uint8 exponents -> (..., rows, G * 32) in ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                         f"{scales.dtype} do not pair up")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    out = torch.empty(*blocks.shape[:-1], BLOCK, dtype=torch.float32)
    out[..., 0::2] = lut[(blocks & 0x0F).long()]
    out[..., 1::2] = lut[(blocks >> 4).long()]
    out = torch.ldexp(out, scales.to(torch.int32)[..., None] - 127)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK).to(dtype)


def quantize(w: torch.Tensor) -> tuple:
    """The nearest MXFP4 encoding of ``w`` (..., rows, G * 32), as (blocks, scales): for test checkpoints."""
    *lead, n = w.shape
    g = w.float().reshape(*lead, n // BLOCK, BLOCK)
    amax = g.abs().amax(-1, keepdim=True).clamp(min=2.0 ** -120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)                 # the largest value maps to <= 6
    scaled = g / torch.exp2(exp)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)       # (..., G, 32)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp[..., 0] + 127).to(torch.uint8)
