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


def balanced_range(size: int, rank: int, world: int, allow_empty: bool = False) -> tuple:
    """[start, stop) of rank's part of ``size`` when it may not divide: the first ``size % world`` ranks
    get one more (e.g. 3 KV heads over 2 ranks: 2 and 1).  Parts may be empty only with ``allow_empty``
    (rows of a batch; heads and weight columns must give every rank some)."""
    if size < world and not allow_empty:
        raise ValueError(f"size {size} is smaller than {world} parts")
    part, extra = divmod(size, world)
    start = rank * part + min(rank, extra)
    return start, start + part + (1 if rank < extra else 0)


def kv_heads_for_rank(num_kv_heads: int, tp: int, tp_rank: int) -> tuple:
    """KV heads [start, stop) held by a TP rank.

    When tp <= num_kv_heads the heads are split as evenly as they go (``balanced_range``:
    SmolLM2's 3 KV heads at tp=2 are 2 + 1).  When tp > num_kv_heads each KV head is
    replicated on tp / num_kv_heads consecutive ranks (the ranks whose query heads use
    it), so a rank holds exactly one KV head.
    """
    if tp <= num_kv_heads:
        return balanced_range(num_kv_heads, tp_rank, tp)
    if tp % num_kv_heads:
        raise ValueError(f"tp={tp} must be a multiple of num_key_value_heads={num_kv_heads} when larger")
    h = tp_rank // (tp // num_kv_heads)
    return h, h + 1


def q_heads_for_rank(num_heads: int, num_kv_heads: int, tp: int, tp_rank: int) -> tuple:
    """Query heads [start, stop) of a TP rank: the query heads of its KV heads (whole GQA groups), or an
    even share of one group's when KV heads are replicated (tp > num_kv_heads)."""
    if tp <= num_kv_heads:
        k0, k1 = kv_heads_for_rank(num_kv_heads, tp, tp_rank)
        group = num_heads // num_kv_heads
        return k0 * group, k1 * group
    return even_range(num_heads, tp_rank, tp)


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
