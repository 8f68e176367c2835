"""Tensor-parallel layers, built at shard size, communicator passed in.

Owns: ``ColumnParallelLinear`` (output features split over the TP group; several
checkpoint tensors may be fused into one, e.g. q/k/v or gate/up),
``RowParallelLinear`` (input features split; one allreduce over ``comm`` in
``forward``) and ``VocabParallelEmbedding`` (its table is also the tied LM head).  Weights keep the checkpoint's ``(out_local, in_local)`` layout and
go through ``kernels.linear``.  Each layer's ``load`` reads only its slice of the
checkpoint through a ``WeightSource``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..comm.collectives import all_reduce
from ..kernels import linear
from .shard import Slice


def pack_weight(module: nn.Module, name: str = "weight") -> None:
    """Replace the loaded parameter ``name`` by its ``kernels.pack``ed form (a plain attribute)."""
    w = module._parameters.pop(name)
    setattr(module, name, kernels.pack(w))


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor fused into a column-parallel layer: rows [start, stop) of ``name``."""
    name: str            # checkpoint name without the ".weight" suffix
    full_out: int        # rows of the full checkpoint tensor
    start: int
    stop: int
    rope_pairs: int = 0  # the last rope_pairs rows of each head pair adjacent dims for RoPE (Llama 4, DeepSeek):
    head: int = 0        # reordered to halves at load; head = rows per head (0: rope_pairs)

    def arrange(self, t: torch.Tensor) -> torch.Tensor:
        """The rows as the model uses them: with ``rope_pairs``, each head's rotated dims (0, 1, 2, 3, ...) become
        (0, 2, 4, ..., 1, 3, 5, ...), so rotating halves (``layers.Rotary``) rotates the checkpoint's pairs.  The
        same order on q and k leaves every q.k product, hence attention, unchanged."""
        if not self.rope_pairs:
            return t
        hd, r = self.head or self.rope_pairs, self.rope_pairs
        perm = torch.cat((torch.arange(hd - r), hd - r + torch.arange(0, r, 2), hd - r + torch.arange(1, r, 2)))
        return t.view(-1, hd, *t.shape[1:])[:, perm].reshape(t.shape)

    @property
    def size(self) -> int:
        return self.stop - self.start


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, parts: list, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features = in_features
        self.parts = list(parts)
        out_local = sum(p.size for p in self.parts)
        self.weight = nn.Parameter(torch.empty(out_local, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False) if bias else None

    def load(self, src) -> None:
        off = 0
        for p in self.parts:
            w = src.read(p.name + ".weight", (p.full_out, self.in_features), Slice(0, p.start, p.stop))
            self.weight[off:off + p.size].copy_(p.arrange(w))
            if self.bias is not None:
                b = src.read(p.name + ".bias", (p.full_out,), Slice(0, p.start, p.stop))
                self.bias[off:off + p.size].copy_(p.arrange(b))
            off += p.size

    def pack(self) -> None:
        pack_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)          # (T, out_local)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local) + b. ``reduce=False`` leaves the partial sum to the caller."""

    def __init__(self, name: str, in_features: int, out_features: int, start: int, stop: int,
                 bias: bool, dtype: torch.dtype, comm, reduce: bool = True):
        super().__init__()
        self.name, self.in_features, self.out_features = name, in_features, out_features
        self.start, self.stop = start, stop
        self.comm, self.reduce = comm, reduce
        self.weight = nn.Parameter(torch.empty(out_features, stop - start, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def load(self, src) -> None:
        w = src.read(self.name + ".weight", (self.out_features, self.in_features), Slice(1, self.start, self.stop))
        self.weight.copy_(w)
        if self.bias is not None:
            self.bias.copy_(src.read(self.name + ".bias", (self.out_features,)))

    def pack(self) -> None:
        pack_weight(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)             # (T, out) partial sum over this rank's inputs
        if self.reduce:
            y = all_reduce(y, self.comm)
        if self.bias is not None:
            y += self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [start, stop) of the vocabulary on this rank; lookups summed over ``comm``.
    A tied LM head uses the same ``(vocab_local, hidden)`` table."""

    def __init__(self, name: str, vocab: int, hidden: int, start: int, stop: int, dtype: torch.dtype, comm):
        super().__init__()
        self.name, self.vocab, self.hidden, self.start, self.stop, self.comm = name, vocab, hidden, start, stop, comm
        self.weight = nn.Parameter(torch.empty(stop - start, hidden, dtype=dtype), requires_grad=False)

    def load(self, src) -> None:
        self.weight.copy_(src.read(self.name + ".weight", (self.vocab, self.hidden), Slice(0, self.start, self.stop)))

    def read_from_file(self, rows) -> None:
        """Drop the in-memory table and look rows up in ``rows`` (a ``weights.loader.FileRows``) instead."""
        self._parameters.pop("weight")
        self.weight = None
        self.rows = rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weight if self.weight is not None else self.rows
        if self.comm is None or self.comm.Get_size() == 1:
            return table[ids]                                     # (T, hidden)
        local = ids - self.start
        mask = (local < 0) | (local >= self.stop - self.start)
        out = table[local.clamp(0, self.stop - self.start - 1)]
        out.masked_fill_(mask[:, None], 0)                       # (no host sync, unlike out[mask] = 0)
        return all_reduce(out, self.comm)
