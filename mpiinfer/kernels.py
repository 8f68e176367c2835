"""Dense compute kernels, chosen by measurement per device and dtype.

Owns: ``linear(x, w, b)`` with ``w`` in Hugging Face layout ``(out, in)``.  On CPU
it calls oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``) on the
plain weight, which measured 2-3x faster than MKL's sgemm behind ``F.linear`` /
``x @ w.t()`` for the skinny matmuls of decode on the 2-core AMD EPYC (Zen 4,
AVX-512 with BF16) of our CI machines (2048x8192 weight, 2 threads: M=1 29 vs 9
GFLOP/s, M=16 116 vs 50, M=512 215 vs 165; benchmarks/bench_kernels.py).
bfloat16 goes through oneDNN too (on that CPU it uses AVX-512 BF16): full 1.24B
model decode steps measured 150 vs 162 ms at batch 1 and 250 vs 275 ms at batch 16
against ``F.linear``.  Everywhere else (CUDA, or a torch built without oneDNN)
it is ``F.linear``.

``pack(w)`` reorders a weight once, after loading, into oneDNN's blocked layout
(an opaque ``torch._mkldnn`` tensor that replaces the plain one: no extra memory).
Measured on that CPU (2 threads, ``benchmarks/bench_kernels.py``): bfloat16 packed
is faster at every batch size (2048x16384, M=1: 1.18 vs 3.83 ms, M=16: 3.0 vs
5.1 ms), float32 packed is faster from M=4 up (M=16: 6.9 vs 9.1 ms) but slower at
M=1 (5.9 vs 4.8 ms).  ``should_pack`` encodes that: bfloat16 always, float32 when
the engine batches at least ``PACK_MIN_BATCH`` sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN: dict = {}


def _onednn_ok(dtype: torch.dtype) -> bool:
    """oneDNN's inner product is available for this dtype and agrees with F.linear (checked once)."""
    ok = _ONEDNN.get(dtype)
    if ok is None:
        ok = False
        try:
            if torch.backends.mkldnn.is_available():
                x, w = torch.randn(3, 64).to(dtype), torch.randn(5, 64).to(dtype)
                y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                tol = 1e-5 if dtype == torch.float32 else 5e-2
                ok = y.dtype == dtype and bool(torch.allclose(y.float(), F.linear(x, w).float(), atol=tol, rtol=tol))
        except (RuntimeError, AttributeError):
            ok = False
        _ONEDNN[dtype] = ok
    return ok


PACK_MIN_BATCH = 4


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """``pack`` exists for weights of ``dtype`` on ``device``."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn_ok(dtype)
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def should_pack(device: torch.device, dtype: torch.dtype, max_batch: int) -> bool:
    """Whether ``pack`` pays off for weights of ``dtype`` used at batch sizes up to ``max_batch``."""
    return can_pack(device, dtype) and (dtype == torch.bfloat16 or max_batch >= PACK_MIN_BATCH)


def pack(w: torch.Tensor) -> torch.Tensor:
    """``w`` (out, in) reordered for oneDNN's inner product; only ``linear`` can use the result."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T + b for 2-D x (T, in) and w (out, in), plain or ``pack``ed."""
    if w.is_mkldnn or (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                       and w.dtype == x.dtype and _onednn_ok(x.dtype)):
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)
