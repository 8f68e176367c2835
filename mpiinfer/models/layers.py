"""The building blocks every decoder layer shares: RMSNorm, rotary position embeddings, the SwiGLU MLP.

Owns: ``RMSNorm`` (float32 statistics, as Hugging Face computes them), ``rope_inv_freq`` / ``Rotary``
(default, linear and llama3 scaling; cos/sin tables grown on demand) and ``MLP`` (column-parallel fused
gate/up, row-parallel down: its allreduce over ``mesh.tp_reduce`` is the one in ``MLP.forward``).  On CPU the
norms (with a residual add before one) and SwiGLU's activation run as the C kernels ``native.rms_norm`` /
``native.silu_mul`` where the model sets ``use_native``; the torch ops stay, for CUDA and as their reference.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import native
from ..comm.mesh import Mesh
from ..config import ModelConfig, RopeConfig
from ..parallel.linear import ColumnParallelLinear, Part, RowParallelLinear
from ..parallel.shard import balanced_range


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Hugging Face does), weight applied in the input dtype; ``f32_weight``
    (gpt-oss): weight applied in float32, then rounded; ``plus_one`` (Gemma): scaled by (1 + weight) in float32,
    then rounded; ``name`` None: no weight (Llama 4's q/k L2 norm)."""

    def __init__(self, name: str | None, size: int, eps: float, dtype: torch.dtype, plus_one: bool = False,
                 f32_weight: bool = False):
        super().__init__()
        self.name, self.size, self.eps, self.plus_one = name, size, eps, plus_one
        self.f32 = plus_one or f32_weight
        self.weight = None if name is None else nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)
        self.scale = None          # f32: (1 +) weight in float32, made by ``load``
        self.use_native = False    # the C kernel (set by the model on CPU; the torch ops stay the reference)
        self.mode = native.NORM_F32_SCALE if self.f32 else native.NORM_NONE if name is None else native.NORM_WEIGHT

    def load(self, src) -> None:
        if self.weight is None:
            return
        self.weight.copy_(src.read(self.name + ".weight", (self.size,)))
        if self.f32:
            self.scale = self.weight.float() + (1.0 if self.plus_one else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_native:
            out = native.rms_norm(x, self.mode, self.weight, self.scale, self.eps)
            if out is not None:
                return out
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.f32:
            return (xf * self.scale).to(dt)
        return xf.to(dt) if self.weight is None else self.weight * xf.to(dt)

    def add_forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple:
        """(x + a, its norm): the residual add and the norm after it.  With the C kernel in one pass, x's rows
        becoming x + a in place (x is the residual stream, read by nothing else)."""
        if self.use_native:
            out = native.rms_norm(x, self.mode, self.weight, self.scale, self.eps, add=a)
            if out is not None:
                return x, out
        x = x + a
        return x, self(x)


def norm(cfg: ModelConfig, name: str, size: int, dtype: torch.dtype) -> RMSNorm:
    """The family's RMSNorm of ``size`` named ``name`` (Gemma's scales by 1 + weight, gpt-oss's in float32)."""
    return RMSNorm(name, size, cfg.rms_norm_eps, dtype, plus_one=cfg.norm_plus_one, f32_weight=cfg.norm_f32_weight)


def rope_inv_freq(r: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies (dim/2,), float32, with llama3 / linear / yarn scaling as in HF; type "none" (NoPE): zeros,
    so cos = 1 and sin = 0 and the rotation is exactly the identity."""
    if r.type == "none":
        return torch.zeros(dim // 2)
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
    elif r.type == "yarn":
        # interpolated (inv / factor) below the ramp, extrapolated (inv) above it, linear in between
        def dim_for(rotations):
            return dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(r.theta))
        low, high = dim_for(r.beta_fast), dim_for(r.beta_slow)
        if r.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        interpolated = 1.0 / (r.factor * (r.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)))
        inv = interpolated * (1 - extrapolation) + inv * extrapolation
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
    """cos/sin tables of one RoPE configuration, grown on demand; ``apply`` rotates (T, heads, head_dim) by true
    positions."""

    def __init__(self, rope: RopeConfig, head_dim: int, device):
        self.inv_freq = rope_inv_freq(rope, head_dim).to(device)
        self.attention_factor = rope.attention_factor      # yarn scales cos and sin
        self.cos = self.sin = None
        self.device = device

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self.cos is None or self.cos.shape[0] < need:
            n = max(need, 2 * (self.cos.shape[0] if self.cos is not None else 2048))
            t = torch.arange(n, device=self.device, dtype=torch.float32)
            freqs = t[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)     # (n, head_dim)
            self.cos, self.sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return RopeTables(self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :],
                          positions, self.cos, self.sin)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin


class MLP(nn.Module):
    """SwiGLU (GeGLU with ``act`` gelu_pytorch_tanh) MLP: fused column-parallel gate/up, row-parallel down (one allreduce unless reduce=False)."""

    def __init__(self, prefix: str, names: tuple, hidden: int, inter: int, mesh: Mesh, dtype, bias=False,
                 reduce=True, act: str = "silu"):
        super().__init__()
        self.act = F.silu if act == "silu" else partial(F.gelu, approximate="tanh")   # gelu_pytorch_tanh
        self.silu = act == "silu"
        self.use_native = False        # the C kernel for SiLU * up (set by the model on CPU, for SiLU only)
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
        if self.use_native:                                         # SiLU * up in one pass
            h = native.silu_mul(gu, self.inter_local)
            if h is not None:
                return self.down(h)
        g, u = gu[:, :self.inter_local], gu[:, self.inter_local:]
        return self.down(self.act(g) * u)
