"""Pure shard arithmetic: which part of a tensor, of the vocabulary or of a sequence a rank owns.

Owns every rule that maps sizes and ranks to index ranges, so that the loader, the layers,
``mpiinfer plan``, the scheduler and the ring all import the same answer:

* TP: attention heads (``q_heads_for_rank``, ``kv_heads_for_rank``), MLP columns
  (``balanced_range``), vocabulary rows of the embedding / LM head (``vocab_range``);
* EP: experts of an EP rank (``experts_for_rank``; which EP rank a world rank is lives in
  ``comm.mesh.Layout``);
* CP: the load-balanced causal split of a prompt (``cp_groups``, ``chunk_bounds``, ``shard_positions``,
  ``shard_count``, ``shard_order``, ``gather_order``) and the positions of a CP sequence's cache rows on a rank
  (``cp_local_positions``, ``cp_local_count``);
* ``Slice``: the part of one checkpoint tensor to read.

No torch, no MPI: every function takes sizes and ranks and returns index ranges or NumPy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- ranges

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


@dataclass(frozen=True)
class Slice:
    """Rows/cols [start, stop) along ``dim`` of a checkpoint tensor; dim None = the whole tensor."""
    dim: int | None = None
    start: int = 0
    stop: int = 0


# --------------------------------------------------------------------------- tensor parallelism

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


def vocab_range(vocab: int, tp: int, tp_rank: int) -> tuple:
    """Vocab rows [start, stop) of a TP rank: ceil(vocab / tp) per rank, the last ones shorter (equal
    parts, padded, are what the LM head's logits gather sends)."""
    per = vocab_part(vocab, tp)
    return min(vocab, tp_rank * per), min(vocab, (tp_rank + 1) * per)


def vocab_part(vocab: int, tp: int) -> int:
    """Rows of the largest vocabulary part: ceil(vocab / tp)."""
    return -(-vocab // tp)


# --------------------------------------------------------------------------- expert parallelism

def experts_for_rank(num_experts: int, ep: int, ep_rank: int) -> tuple:
    """Experts [start, stop) owned by an EP rank: contiguous blocks as even as they go, the first
    ``num_experts % ep`` ranks one more (60 experts at ep=8: 8, 8, 8, 8, 7, 7, 7, 7)."""
    return balanced_range(num_experts, ep_rank, ep)


def expert_owners(num_experts: int, ep: int) -> list:
    """The EP rank owning each expert (``experts_for_rank`` inverted)."""
    return [r for r in range(ep) for _ in range(*experts_for_rank(num_experts, ep, r))]


# --------------------------------------------------------------------------- context parallelism

def chunk_bounds(seq_len: int, n_chunks: int) -> np.ndarray:
    """Start offsets (n_chunks + 1,) of ``n_chunks`` consecutive chunks whose lengths differ by
    at most 1; the longer chunks are the LAST ones, so the final chunk is never empty."""
    if n_chunks < 1 or seq_len < 0:
        raise ValueError(f"bad chunking: seq_len={seq_len}, n_chunks={n_chunks}")
    base, rem = divmod(seq_len, n_chunks)
    lens = np.full(n_chunks, base, dtype=np.int64)
    if rem:
        lens[n_chunks - rem:] += 1
    return np.concatenate(([0], np.cumsum(lens))).astype(np.int64)


# A long CP prompt is laid out in *groups* of 2 * cp *units* of CP_UNIT * 2**k tokens (a whole number of KV
# blocks): rank r takes units r and 2cp-1-r of every group (each group is balanced on its own), then the same
# zigzag over the 2cp chunks of the tail after the last group.  The groups: as many as fit of the top unit (the
# smallest with at most CP_MAX_GROUPS of them), then at most one of each smaller unit down to CP_UNIT, so the tail
# is shorter than 2 * cp * CP_UNIT tokens.  Which rank holds a position in a group, and at which cache row,
# therefore depends only on cp and the groups before it, not on the prompt's length: prompts that share a prefix
# store its groups identically, which is what lets CP documents share them through the prefix cache
# (``engine.scheduler``).  A prompt that shares another's groups takes them as they are, and lays out only the rest
# this way (``cp_groups(..., start)``): a sequence's layout is then its list of units (``units`` below; None = this
# default).  A rank holds at most 2 * groups + 2 runs of consecutive positions (``ring.MAX_RUNS``).
CP_UNIT = 64
CP_MAX_GROUPS = 7


def cp_unit(seq_len: int, cp: int) -> int:
    """The top unit of a ``seq_len``-token CP prompt's layout (see CP_UNIT)."""
    u = CP_UNIT
    while seq_len // (2 * cp * u) > CP_MAX_GROUPS:
        u *= 2
    return u


def cp_groups(seq_len: int, cp: int, start: int = 0) -> list:
    """The unit of each group of a ``seq_len``-token CP prompt, in order (see CP_UNIT); the tail starts at
    ``2 * cp * sum(units)``.  With ``start``: the groups of its tokens from ``start`` on (a prefix laid out
    already)."""
    u, at, out = cp_unit(seq_len - start, cp), start, []
    while u >= CP_UNIT:
        k = (seq_len - at) // (2 * cp * u)
        out += [u] * k
        at += k * 2 * cp * u
        u //= 2
    return out


def _units(seq_len: int, cp: int, units) -> list:
    if units is None:
        return cp_groups(seq_len, cp)
    if 2 * cp * sum(units) > seq_len:
        raise ValueError(f"CP groups of {2 * cp * sum(units)} tokens in a {seq_len}-token prompt")
    return units


def shard_positions(seq_len: int, cp: int, cp_rank: int, units: list | None = None) -> np.ndarray:
    """Global positions (int64, ascending) owned by ``cp_rank``: units ``cp_rank`` and ``2*cp - 1 - cp_rank`` of
    every group of 2*cp units, then chunks ``cp_rank`` and ``2*cp - 1 - cp_rank`` of the tail's 2*cp near-equal
    chunks (see CP_UNIT), so every rank does the same causal work.  The last position ``seq_len - 1`` is always
    owned by cp rank 0 (the replica leader), which therefore holds the logits row of a prefill.  ``units``: the
    sequence's groups when they are not the default ``cp_groups(seq_len, cp)``."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp={cp}")
    lo, hi = cp_rank, 2 * cp - 1 - cp_rank
    parts, at = [], 0
    for u in _units(seq_len, cp, units):
        parts += [np.arange(at + lo * u, at + (lo + 1) * u), np.arange(at + hi * u, at + (hi + 1) * u)]
        at += 2 * cp * u
    b = chunk_bounds(seq_len - at, 2 * cp) + at
    parts += [np.arange(b[lo], b[lo + 1]), np.arange(b[hi], b[hi + 1])]
    return np.concatenate(parts).astype(np.int64)


def shard_count(seq_len: int, cp: int, cp_rank: int, units: list | None = None) -> int:
    """``len(shard_positions(...))`` without building the array."""
    units = _units(seq_len, cp, units)
    b = chunk_bounds(seq_len - 2 * cp * sum(units), 2 * cp)
    lo, hi = cp_rank, 2 * cp - 1 - cp_rank
    return 2 * sum(units) + int(b[lo + 1] - b[lo] + b[hi + 1] - b[hi])


def shard_order(seq_len: int, cp: int) -> np.ndarray:
    """Global positions of the concatenation of all ranks' shards (rank 0's first)."""
    return np.concatenate([shard_positions(seq_len, cp, r) for r in range(cp)])


def gather_order(seq_len: int, cp: int) -> np.ndarray:
    """Permutation ``p`` such that ``concat(shards)[p]`` is in original order (the inverse of
    ``shard_order``): ``full = torch.cat(per_rank_rows)[gather_order(L, cp)]``."""
    return np.argsort(shard_order(seq_len, cp), kind="stable")


def _first_generated(prompt_len: int, cp: int, cp_rank: int) -> int:
    """The first generated position a CP rank stores: generated token p lives on rank ``p % cp``."""
    return prompt_len + ((cp_rank - prompt_len) % cp)


def cp_local_positions(prompt_len: int, glen: int, cp: int, cp_rank: int, units: list | None = None) -> np.ndarray:
    """Global positions of a CP sequence's cache rows on ``cp_rank`` when it has ``glen`` tokens cached:
    the rank's prompt shard (laid out in ``units``, see ``shard_positions``), then the generated positions p with
    ``p % cp == cp_rank``."""
    pre = shard_positions(prompt_len, cp, cp_rank, units)
    gen = np.arange(_first_generated(prompt_len, cp, cp_rank), glen, cp, dtype=np.int64)
    return np.concatenate([pre, gen]) if gen.size else pre


def cp_local_count(prompt_len: int, glen: int, cp: int, cp_rank: int, units: list | None = None) -> int:
    """``len(cp_local_positions(...))`` without building the array."""
    first = _first_generated(prompt_len, cp, cp_rank)
    n = shard_count(prompt_len, cp, cp_rank, units)
    return n + (len(range(first, glen, cp)) if glen > first else 0)
