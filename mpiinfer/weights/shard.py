"""Pure shard arithmetic: which slice of a checkpoint tensor a rank owns.

No torch, no MPI: every function takes sizes and ranks and returns index ranges,
so the same rules serve the loader, ``mpiinfer plan`` and the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def even_range(size: int, rank: int, world: int) -> tuple:
    """[start, stop) of rank's equal part of ``size`` (which must divide evenly)."""
    if size % world:
        raise ValueError(f"size {size} is not divisible by {world}")
    part = size // world
    return rank * part, (rank + 1) * part


def kv_heads_for_rank(num_kv_heads: int, tp: int, tp_rank: int) -> tuple:
    """KV heads [start, stop) held by a TP rank.

    When tp <= num_kv_heads the heads are split evenly.  When tp > num_kv_heads
    each KV head is replicated on tp / num_kv_heads consecutive ranks (the ranks
    whose query heads use it), so a rank holds exactly one KV head.
    """
    if tp <= num_kv_heads:
        return even_range(num_kv_heads, tp_rank, tp)
    if tp % num_kv_heads:
        raise ValueError(f"tp={tp} must be a multiple of num_key_value_heads={num_kv_heads} when larger")
    h = tp_rank // (tp // num_kv_heads)
    return h, h + 1


@dataclass(frozen=True)
class Slice:
    """Rows/cols [start, stop) along ``dim`` of a checkpoint tensor; dim None = the whole tensor."""
    dim: Optional[int] = None
    start: int = 0
    stop: int = 0

    @staticmethod
    def full() -> "Slice":
        return Slice()


def experts_for_rank(num_experts: int, ep: int, ep_rank: int) -> tuple:
    """Experts [start, stop) owned by an EP rank (contiguous blocks)."""
    return even_range(num_experts, ep_rank, ep)
