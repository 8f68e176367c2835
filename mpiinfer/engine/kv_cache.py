"""Preallocated KV cache and the allocator of its rows.

Owns: one ``(n_kv_local, pool_tokens, head_dim)`` key and value tensor per layer,
allocated once from the memory budget (``kv_budget``), ``kv_bytes_per_token`` (the one formula for
what a cached token costs a rank, used by ``run``, ``plan`` and the benchmarks), and
``RegionAllocator``, which gives each
sequence one contiguous run of pool rows sized for its prompt plus its maximum
new tokens (reserved at admission, so a running sequence can never run out of
cache and nothing is ever preempted).  Contiguous per-sequence rows let attention
read a plain strided view: no gather, no block table.
"""
from __future__ import annotations

import bisect

import torch

from ..config import ModelConfig
from ..parallel.shard import kv_heads_for_rank

DEFAULT_KV_FRACTION = 0.3       # of the memory free after loading the weights
DEFAULT_KV_CAP = 8 << 30
MIN_KV_TOKENS = 16              # a smaller cache is refused


def kv_budget(max_batch: int, max_seq_len: int, per_token: int, free_bytes: int, asked: int | None = None) -> int:
    """KV-cache bytes of a rank: ``asked`` (--kv-budget), else enough for ``max_batch`` sequences of
    ``max_seq_len`` tokens, within DEFAULT_KV_FRACTION of ``free_bytes`` and DEFAULT_KV_CAP (``run`` and
    ``plan`` both size it here)."""
    if asked is not None:
        return asked
    return max(0, min(DEFAULT_KV_CAP, int(free_bytes * DEFAULT_KV_FRACTION), max_batch * max_seq_len * per_token))


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int, tp: int = 1, tp_rank: int = 0) -> int:
    """Bytes of K and V that one cached token takes on TP rank ``tp_rank`` (every layer)."""
    k0, k1 = kv_heads_for_rank(cfg.num_kv_heads, tp, tp_rank)
    return 2 * cfg.num_layers * (k1 - k0) * cfg.head_dim * dtype_bytes


class KVCache:
    def __init__(self, num_layers: int, n_kv_local: int, head_dim: int, pool_tokens: int,
                 dtype: torch.dtype, device: torch.device):
        self.pool_tokens = pool_tokens
        shape = (n_kv_local, pool_tokens, head_dim)
        # never read before written (attention reads only rows the sequence wrote): no zero-fill
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class RegionAllocator:
    """First-fit allocator of contiguous row ranges in ``[0, size)``; free ranges are coalesced."""

    def __init__(self, size: int):
        self.size = size
        self._starts = [0]          # sorted starts of free ranges
        self._len = {0: size}       # start -> length

    @property
    def free_rows(self) -> int:
        return sum(self._len.values())

    def alloc(self, n: int):
        """Start row of a free run of ``n`` rows, or None when none is large enough."""
        for s in self._starts:
            ln = self._len[s]
            if ln >= n:
                i = bisect.bisect_left(self._starts, s)
                del self._starts[i]
                del self._len[s]
                if ln > n:
                    bisect.insort(self._starts, s + n)
                    self._len[s + n] = ln - n
                return s
        return None

    def free(self, start: int, n: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        # merge with the next free range
        if i < len(self._starts) and self._starts[i] == start + n:
            nxt = self._starts.pop(i)
            n += self._len.pop(nxt)
        # merge with the previous free range
        if i > 0:
            prv = self._starts[i - 1]
            if prv + self._len[prv] == start:
                self._len[prv] += n
                return
            assert prv + self._len[prv] < start, "double free in RegionAllocator"
        self._starts.insert(i, start)
        self._len[start] = n
