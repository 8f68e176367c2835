"""Preallocated KV cache, its blocks, and the prefix cache over them.

Owns: one ``(n_kv_local, pool_tokens, head_dim)`` key and value tensor per layer, allocated once from the
memory budget (``kv_budget``), ``kv_bytes_per_token`` (the one formula for what a cached token costs a rank,
used by ``run``, ``plan`` and the benchmarks), and ``BlockPool``: the pool's rows in blocks of ``block_size``
(``KV_BLOCK``), handed out as a sequence's tokens are written (its prompt at admission, then one block at a
time while it decodes: nothing is reserved for ``max_tokens``), reference-counted, and the prefix cache: full
prompt blocks keyed by a hash chain of their tokens, shared by every sequence whose prompt starts the same way,
kept after their last user until the space is needed (least recently used first).

Attention reads a sequence's rows as *extents* (runs of consecutive rows): the pool places a new sequence in
the middle of the largest free run and grows it into the block after its last one when that is free, so a
sequence is usually one extent (a plain strided view, no copy); a shared prefix adds one.  A CP sequence holds
blocks on every CP rank the same way: its prompt shard's at admission, then one at a time where its new tokens
are stored; its prompt's groups (``parallel.shard.cp_groups``) are cached as blocks keyed by ``cp_group_keys`` /
``cp_block_keys``.
"""
from __future__ import annotations

import bisect
import collections
import hashlib

import numpy as np
import torch

from ..config import ModelConfig
from ..parallel.shard import CP_UNIT, kv_heads_for_rank

DEFAULT_KV_FRACTION = 0.3       # of the memory free after loading the weights
DEFAULT_KV_CAP = 8 << 30
MIN_KV_TOKENS = 16              # a smaller cache is refused
# rows per block (see BlockPool).  Measured (benchmarks/bench_block.py: 128 chat prompts, 64 new tokens, 256 MiB,
# SmolLM2-135M float32, 2 threads, best of 2): 8 rows 43.1 s, 16 rows 41.9 s, 32 rows 41.3 s, 64 rows 48.3 s, with
# 38.5 / 38.1 / 28.5 / 25.8 sequences holding KV on average: 16 is as fast as 32 and holds a third more sequences
# in the same budget (less rounding up per sequence); 8 only adds block bookkeeping.
KV_BLOCK = 16
# A prefix-cache hit shorter than this many blocks is not taken: the sequence computes those tokens into its own
# blocks instead.  Sharing splits a sequence's cache into two runs.  With the CPU kernels (mpiinfer.native) a
# split costs nothing (the decode kernel reads runs where they lie), so every hit is taken: a 256-prompt chat job
# (SmolLM2-135M float32, 2 threads) took 42.5 s sharing the chat template's 1-block system prompt against 45.2 s
# without.  On the torch paths (CUDA, or no C compiler) every later decode step pays for the split: on the 2-core
# CI CPU (float32, 62 sequences) attention over two runs cost 4.4 ms per layer against 2.8 ms for one, so a
# 1-block hit made a 96-prompt chat job 30% slower (41.7 s against 32.6 s), while recomputing up to 3 blocks once
# costs less than ~100 split decode steps.
MIN_SHARED_BLOCKS = 4               # the torch paths
MIN_SHARED_BLOCKS_NATIVE = 1        # the CPU kernels


def usable_blocks(pool_tokens: int, cp: int, block_size: int = KV_BLOCK) -> int:
    """Blocks the scheduler hands out from a pool of ``pool_tokens`` rows (with cp > 1 the last row is a
    scratch row); ``run`` and ``plan`` both count them here."""
    return max(0, pool_tokens - (1 if cp > 1 else 0)) // block_size


def kv_budget(max_batch: int, max_seq_len: int, per_token: int, free_bytes: int, asked: int | None = None) -> int:
    """KV-cache bytes of a rank: ``asked`` (--kv-budget), else enough for ``max_batch`` sequences of
    ``max_seq_len`` tokens, within DEFAULT_KV_FRACTION of ``free_bytes`` and DEFAULT_KV_CAP (``run`` and
    ``plan`` both size it here)."""
    if asked is not None:
        return asked
    return max(0, min(DEFAULT_KV_CAP, int(free_bytes * DEFAULT_KV_FRACTION), max_batch * max_seq_len * per_token))


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int, tp: int = 1, tp_rank: int = 0) -> int:
    """Bytes of K and V that one cached token takes on TP rank ``tp_rank`` (every layer).  MLA (DeepSeek-V3): one
    latent row per token and layer, kv_lora_rank + qk_rope_head_dim wide, on every TP rank; no separate V."""
    k0, k1 = kv_heads_for_rank(cfg.num_kv_heads, tp, tp_rank)
    return (1 if cfg.mla else 2) * cfg.num_layers * (k1 - k0) * cfg.head_dim * dtype_bytes


class KVCache:
    """Per layer a K and a V pool (n_kv_local, pool_tokens, head_dim).  ``v_is_k`` (MLA): V is the K tensor itself
    (the latent row is both; attention reads its first kv_lora_rank values as the value)."""

    def __init__(self, num_layers: int, n_kv_local: int, head_dim: int, pool_tokens: int,
                 dtype: torch.dtype, device: torch.device, v_is_k: bool = False):
        self.pool_tokens = pool_tokens
        shape = (n_kv_local, pool_tokens, head_dim)
        # never read before written (attention reads only rows the sequence wrote): no zero-fill
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = self.k if v_is_k else [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + (self.v if self.v is not self.k else []))


class FreeRuns:
    """The free blocks of ``[0, size)`` as coalesced runs (sorted starts, start -> length)."""

    def __init__(self, size: int):
        self.size = size
        self._starts = [0] if size else []
        self._len = {0: size} if size else {}
        self.count = size

    def runs(self) -> list:
        return [(s, self._len[s]) for s in self._starts]

    def take(self, b: int) -> bool:
        """Take block ``b`` if it is free."""
        i = bisect.bisect_right(self._starts, b) - 1
        if i < 0:
            return False
        s = self._starts[i]
        n = self._len[s]
        if b >= s + n:
            return False
        del self._starts[i], self._len[s]
        if b > s:
            self._starts.insert(i, s)
            self._len[s] = b - s
            i += 1
        if b + 1 < s + n:
            self._starts.insert(i, b + 1)
            self._len[b + 1] = s + n - b - 1
        self.count -= 1
        return True

    def take_spaced(self, n: int) -> list:
        """``n`` free blocks placed with room to grow: in the middle of the largest run when one holds them all
        (at its start when it starts the pool), else whole runs, largest first.  Assumes ``count >= n``."""
        if not n:
            return []
        s, ln = max(self.runs(), key=lambda r: (r[1], -r[0]))
        if ln >= n:
            at = s if s == 0 else s + (ln - n) // 2
            for b in range(at, at + n):
                self.take(b)
            return list(range(at, at + n))
        out = []
        for s, ln in sorted(self.runs(), key=lambda r: (-r[1], r[0])):
            k = min(ln, n - len(out))
            for b in range(s, s + k):
                self.take(b)
            out.extend(range(s, s + k))
            if len(out) == n:
                break
        return out

    def give(self, b: int) -> None:
        """Free block ``b`` (coalescing with its neighbours)."""
        n = 1
        i = bisect.bisect_left(self._starts, b)
        assert i == len(self._starts) or self._starts[i] > b, f"block {b} freed twice"
        if i < len(self._starts) and self._starts[i] == b + 1:
            n += self._len.pop(self._starts.pop(i))
        if i > 0:
            prv = self._starts[i - 1]
            assert prv + self._len[prv] <= b, f"block {b} freed twice"
            if prv + self._len[prv] == b:
                self._len[prv] += n
                self.count += 1
                return
        self._starts.insert(i, b)
        self._len[b] = n
        self.count += 1


def block_hashes(tokens, block_size: int) -> list:
    """The hash chain of the full blocks of ``tokens``: block j's key covers every token up to its end, so equal
    keys mean equal prefixes (blake2b, 128 bits: a collision would silently reuse another prompt's cache)."""
    out, prev = [], b""
    arr = np.asarray(tokens, dtype=np.int64)
    for j in range(len(tokens) // block_size):
        prev = hashlib.blake2b(prev + arr[j * block_size:(j + 1) * block_size].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


def cp_chunk_hashes(tokens, cp: int) -> list:
    """Hashes of a CP prompt's consecutive full chunks of ``2 * cp * CP_UNIT`` tokens: every group
    (``parallel.shard.cp_groups``) is a run of them, so any candidate group's key is cheap to compute
    (``cp_group_key``)."""
    n = 2 * cp * CP_UNIT
    arr = np.asarray(tokens, dtype=np.int64)
    return [hashlib.blake2b(arr[j * n:(j + 1) * n].tobytes(), digest_size=16).digest() for j in range(len(arr) // n)]


def cp_root(cp: int) -> bytes:
    """The start of every CP group key chain at ``cp`` ranks (salted apart from ``block_hashes``' keys)."""
    return hashlib.blake2b(f"cp {cp}".encode(), digest_size=16).digest()


def cp_group_key(prev: bytes, unit: int, chunks: list, at: int) -> bytes:
    """The key of a group of ``unit`` following the group keyed ``prev`` (``cp_root`` for the first) and starting
    at chunk ``at`` of ``cp_chunk_hashes``: it covers every token up to the group's end and every group's unit so
    far, so equal keys mean equal prefixes stored alike on every CP rank."""
    return hashlib.blake2b(prev + unit.to_bytes(8, "little") + b"".join(chunks[at:at + unit // CP_UNIT]),
                           digest_size=16).digest()


def cp_group_keys(chunks: list, cp: int, units: list, prev: bytes | None = None, at: int = 0) -> list:
    """The key chain of groups of ``units`` in a prompt whose ``cp_chunk_hashes`` are ``chunks``: from its start,
    or after the group keyed ``prev`` ending at chunk ``at``."""
    out, prev = [], cp_root(cp) if prev is None else prev
    for u in units:
        prev = cp_group_key(prev, u, chunks, at)
        out.append(prev)
        at += u // CP_UNIT
    return out


def cp_block_keys(group_key: bytes, n: int) -> list:
    """Keys of the ``n`` blocks a CP rank stores of one group (its two units; each CP rank has its own pool)."""
    return [hashlib.blake2b(group_key + j.to_bytes(4, "little"), digest_size=16).digest() for j in range(n)]


class BlockPool:
    """The blocks of one rank's KV pool: free runs, reference counts, and the prefix cache (hash -> block of
    registered full prompt blocks; those nobody uses wait in ``lru``, evicted oldest first when blocks run
    short).  Every block is exactly one of: free, in use (``ref > 0``), cached and unused (in ``lru``)."""

    def __init__(self, num_blocks: int, block_size: int = KV_BLOCK, prefix_cache: bool = True,
                 grow_evicts: bool = True):
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        # a sequence growing into a cached, unused block evicts it to stay in one run (the torch paths pay for
        # every run, see MIN_SHARED_BLOCKS); False (the CPU kernels, which read runs where they lie): it takes
        # free blocks elsewhere and the cache keeps its LRU order
        self.grow_evicts = grow_evicts
        self.free = FreeRuns(num_blocks)
        self.ref = [0] * num_blocks
        self.hash_of: dict = {}                    # block -> its key (registered blocks)
        self.block_of: dict = {}                   # key -> block
        self.lru: collections.OrderedDict = collections.OrderedDict()   # unused cached blocks, oldest first
        self.hits = self.lookups = 0                # prompt blocks found in the cache / looked for

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free ones and unused cached ones)."""
        return self.free.count + len(self.lru)

    def _evict(self, n: int) -> None:
        while self.free.count < n and self.lru:
            b, _ = self.lru.popitem(last=False)
            del self.block_of[self.hash_of.pop(b)]
            self.free.give(b)

    def allocate(self, n: int, after: int | None = None) -> list | None:
        """``n`` blocks (reference 1), continuing after block ``after`` where those are free, or cached and unused
        when ``grow_evicts`` (such a block is evicted: on the torch paths a sequence in one run is worth more than
        a cached block, see MIN_SHARED_BLOCKS); None if the pool cannot give them."""
        if self.available < n:
            return None
        out = []
        nxt = None if after is None else after + 1
        while nxt is not None and len(out) < n and nxt < self.num_blocks:
            if nxt in self.lru:
                if not self.grow_evicts:
                    break
                del self.lru[nxt]
                del self.block_of[self.hash_of.pop(nxt)]
                self.free.give(nxt)
            if not self.free.take(nxt):
                break
            out.append(nxt)
            nxt += 1
        self._evict(n - len(out))
        out += self.free.take_spaced(n - len(out))
        for b in out:
            self.ref[b] = 1
        return out

    def lookup(self, keys: list) -> list:
        """The cached blocks of the longest prefix of ``keys`` (a reference taken on each)."""
        out = []
        for h in keys:
            b = self.block_of.get(h)
            if b is None:
                break
            out.append(b)
        for b in out:
            if self.ref[b] == 0:
                del self.lru[b]
            self.ref[b] += 1
        self.lookups += len(keys)
        self.hits += len(out)
        return out

    def register(self, b: int, key: bytes) -> None:
        """Block ``b`` (in use, fully written) holds the prompt prefix ``key``; a key cached already keeps
        its block (``b`` stays private to its sequence)."""
        if key not in self.block_of and b not in self.hash_of:
            self.block_of[key] = b
            self.hash_of[b] = key

    def release(self, blocks) -> None:
        """Drop a reference on each of ``blocks`` (one sequence's, in token order): a block nobody uses any more is
        freed, or, when it is in the prefix cache, kept there (most recently used).  The last block enters the
        LRU first, so a cached prompt is evicted from its tail: a lookup follows the hash chain from the first
        block, and evicting that first would leave the rest cached but unreachable (as vLLM frees a request's
        blocks in reverse)."""
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released more often than taken"
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None
                else:
                    self.free.give(b)

    def check(self) -> None:
        """Every block in exactly one state (tests)."""
        free = {b for s, n in self.free.runs() for b in range(s, s + n)}
        assert len(free) == self.free.count
        for b in range(self.num_blocks):
            states = (b in free) + (self.ref[b] > 0) + (b in self.lru)
            assert states == 1, (b, b in free, self.ref[b], b in self.lru)
        assert all(self.ref[b] == 0 for b in self.lru) and all(b in self.hash_of for b in self.lru)


def extents(blocks: list, block_size: int, rows: int) -> list:
    """The runs of consecutive pool rows of the first ``rows`` rows held by ``blocks``: [(start, length)]."""
    out = []
    left = rows
    for b in blocks:
        if left <= 0:
            break
        n = min(block_size, left)
        start = b * block_size
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((start, n))
        left -= n
    return out
