"""Dense compute kernels, chosen by measurement per device and dtype.

Owns: ``linear(x, w, b)`` with ``w`` in Hugging Face layout ``(out, in)``.  On CPU
it calls oneDNN's inner product (``torch.ops.mkldnn._linear_pointwise``) on the
plain weight, which measured 2-3x faster than MKL's sgemm behind ``F.linear`` /
``x @ w.t()`` for the skinny matmuls of decode on the 2-core AMD EPYC (Zen 4,
AVX-512 with BF16) of our CI machines (2048x8192 weight, 2 threads: M=1 29 vs 9
GFLOP/s, M=16 116 vs 50, M=512 215 vs 165; benchmarks/bench_kernels.py).
bfloat16 goes through ``F.linear``, which on that CPU already uses AVX-512 BF16
(M=16: ~230 GFLOP/s).  Everywhere else (CUDA, or a torch built without oneDNN)
it is ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN = None


def _onednn_ok() -> bool:
    global _ONEDNN
    if _ONEDNN is None:
        ok = False
        try:
            if torch.backends.mkldnn.is_available():
                x, w = torch.randn(2, 8), torch.randn(4, 8)
                y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                ok = bool(torch.allclose(y, x @ w.t(), atol=1e-5))
        except (RuntimeError, AttributeError):
            ok = False
        _ONEDNN = ok
    return _ONEDNN


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ w.T + b for 2-D x (T, in) and w (out, in)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] > 0 and _onednn_ok():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, b, "none", [], "")
    return F.linear(x, w, b)
