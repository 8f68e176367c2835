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


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T + b for 2-D x (T, in) and w (out, in)."""
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and w.dtype == x.dtype
            and x.shape[0] > 0 and _onednn_ok(x.dtype)):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)
