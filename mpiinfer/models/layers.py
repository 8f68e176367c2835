"""The building blocks every decoder layer shares: RMSNorm, rotary position embeddings, the SwiGLU MLP.

Owns: ``RMSNorm`` (float32 statistics, as Hugging Face computes them), ``rope_inv_freq`` / ``Rotary``
(default, linear and llama3 scaling; cos/sin tables grown on demand) and ``MLP`` (column-parallel fused
gate/up, row-parallel down: its allreduce over ``mesh.tp_reduce`` is the one in ``MLP.forward``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.mesh import Mesh
from ..config import ModelConfig
from ..parallel.linear import ColumnParallelLinear, Part, RowParallelLinear
from ..parallel.shard import balanced_range


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Hugging Face does), weight applied in the input dtype."""

    def __init__(self, name: str, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.name, self.size, self.eps = name, size, eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)

    def load(self, src) -> None:
        self.weight.copy_(src.read(self.name + ".weight", (self.size,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), float32, with llama3 / linear scaling as in HF."""
    r = cfg.rope
    dim = cfg.head_dim
    inv = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if r.type == "linear":
        inv = inv / r.factor
    elif r.type == "llama3":
        low_wl = r.original_max_position_embeddings / r.low_freq_factor
        high_wl = r.original_max_position_embeddings / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / r.factor, inv)
        smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * inv_l / r.factor + smooth * inv_l
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        inv = torch.where(medium, smoothed, inv_l)
    return inv


class RopeTables(NamedTuple):
    """One step's rotary tables: ``cos`` / ``sin`` (T, 1, head_dim) of the step's positions in the model dtype
    (for ``Rotary.apply``), and the float32 tables ``table_cos`` / ``table_sin`` (positions, head_dim) with the
    step's ``positions`` (T,) (for ``native.rope_store``, which rounds them as ``apply`` does)."""
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    table_cos: torch.Tensor
    table_sin: torch.Tensor


class Rotary:
    """cos/sin tables grown on demand; ``apply`` rotates (T, heads, head_dim) by true positions."""

    def __init__(self, cfg: ModelConfig, device):
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self.cos = self.sin = None
        self.device = device

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self.cos is None or self.cos.shape[0] < need:
            n = max(need, 2 * (self.cos.shape[0] if self.cos is not None else 2048))
            t = torch.arange(n, device=self.device, dtype=torch.float32)
            freqs = t[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)     # (n, head_dim)
            self.cos, self.sin = emb.cos(), emb.sin()
        return RopeTables(self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :],
                          positions, self.cos, self.sin)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin


class MLP(nn.Module):
    """SwiGLU MLP: fused column-parallel gate/up, row-parallel down (one allreduce unless reduce=False)."""

    def __init__(self, prefix: str, names: tuple, hidden: int, inter: int, mesh: Mesh, dtype, bias=False,
                 reduce=True):
        super().__init__()
        gate, up, down = names
        a, b = balanced_range(inter, mesh.tp_rank, mesh.tp)
        self.inter_local = b - a
        self.gate_up = ColumnParallelLinear(hidden, [Part(prefix + gate, inter, a, b), Part(prefix + up, inter, a, b)],
                                            bias=bias, dtype=dtype)
        self.down = RowParallelLinear(prefix + down, inter, hidden, a, b, bias=bias, dtype=dtype,
                                      comm=mesh.tp_reduce, reduce=reduce)

    def load(self, src):
        self.gate_up.load(src)
        self.down.load(src)

    def pack(self):
        self.gate_up.pack()
        self.down.pack()

    def forward(self, x):
        gu = self.gate_up(x)                                        # (T, 2 * inter_local)
        g, u = gu[:, :self.inter_local], gu[:, self.inter_local:]
        return self.down(F.silu(g) * u)
