"""The replica leader's scheduler: which sequences hold KV cache, and what each model step computes.

Owns: ``Sequence`` (one request's state across steps); admission into the KV cache, FIFO: an ordinary
sequence takes the blocks of its prompt (``kv_cache.BlockPool``), after the longest prefix of them found in
the prefix cache, which it shares instead of computing, then one block at a time as it decodes; a CP sequence
takes the blocks of its prompt shard on every CP rank, after the longest chain of groups (``parallel.shard``) its
prompt starts with found in the prefix cache on every CP rank (kept in the layout they were stored in; the rest of
the prompt laid out after them), then one block at a time on the rank that stores its next token.  When a
decoding sequence finds no free block on a rank, the newest ordinary sequence holding blocks there is preempted
(its blocks freed; it starts over later, first in line); a CP sequence only when no ordinary one holds blocks
there (starting a long document over costs its whole ring prefill, a short request little).  Also the CP
routing of ordinary sequences (each to the CP rank with the fewest tokens still to process, or all on rank 0),
the registration of finished prompt blocks in the prefix cache, and the per-step plan: every decoding sequence
contributes one token, then prompt chunks fill the step's token budget; a CP prompt goes whole, one load-balanced
shard per CP rank.  No model, no tokenizer, no MPI: the ``Engine`` executes the plan and samples.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from ..messages import Request
from ..models.step import MODE_CP_DECODE, MODE_CP_PREFILL, MODE_LOCAL, StepBatch
from ..parallel.shard import CP_UNIT, cp_groups, cp_local_count, shard_count, shard_positions
from .kv_cache import (
    KV_BLOCK,
    MIN_SHARED_BLOCKS,
    BlockPool,
    block_hashes,
    cp_block_keys,
    cp_chunk_hashes,
    cp_group_key,
    cp_group_keys,
    cp_root,
    extents,
    usable_blocks,
)


@dataclass(eq=False)      # identity: ``seq in running`` / ``running.remove(seq)`` must not compare every field
class Sequence:
    req: Request
    prompt: list
    max_new: int
    eos: frozenset
    generator: torch.Generator | None
    cp: bool = False                   # context-parallel: prompt and KV spread over the CP ranks
    home: int = 0                      # not CP: the CP rank that runs it (its KV cache lives there)
    rank_blocks: list = field(default_factory=list)   # CP: its KV blocks on each CP rank, in local token order
    blocks: list = field(default_factory=list)    # not CP: its KV blocks on ``home``, in token order
    keys: list | None = None           # prefix-cache keys of its full prompt blocks (CP: of its groups)
    units: list | None = None          # CP: the unit of each group of its layout (``parallel.shard.cp_groups``)
    chunks: list | None = None         # CP: ``kv_cache.cp_chunk_hashes`` of its prompt
    registered: int = 0                # leading prompt blocks (CP: groups) that are in the prefix cache
    n_cached: int = 0                  # tokens whose K/V are in the cache
    out: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None  # prompt_logprobs: logprob of prompt token j at j (None at 0), filled as
                                         # prefill chunks run; such a sequence takes no prefix-cache hits
    t_added: float = 0.0
    t_first: float | None = None
    finish_reason: str | None = None
    text: str | None = None
    new_generator: object = None       # () -> a fresh generator (sampled sequences start over with it)
    preemptions: int = 0               # times it lost its blocks and started over
    cached_tokens: int = 0             # prompt tokens found in the prefix cache at its first admission
    sample: int = 0                    # which of the request's n samples
    matcher: object = None             # structured output: its llguidance matcher (engine/structured.py)
    prompt_top: list | None = None     # echo with prompt_logprobs and top_logprobs: alternatives per prompt position
    prompt_ranks: list | None = None   # vLLM's prompt_logprobs: each prompt token's rank (1 = most likely)
    pooling: str = ""                  # an embedding: "last" or "mean" of its final hidden states ("" = generation)
    normalize: bool = False
    dimensions: int = 0                # embedding: keep the first this many values (0: all)
    hidden_last: object = None         # embedding: the last prompt token's hidden state, once computed
    hidden_sum: object = None          # embedding, mean: the sum of its tokens' hidden states so far
    hidden_n: int = 0
    error: object = None               # an ErrorInfo when it cannot go on (its result is that error)

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < len(self.prompt)

    @property
    def takes_cache_hits(self) -> bool:
        """Whether its prompt may start from cached blocks: not when every prompt row's output is wanted (scoring,
        mean pooling)."""
        return self.prompt_logprobs is None and self.pooling != "mean"

    def note_cached(self) -> None:
        """At an admission: its prompt tokens found in the prefix cache count (``cached_tokens``) at the first one
        only; after a preemption it finds its own earlier blocks, which this request computed."""
        if not self.preemptions:
            self.cached_tokens = self.n_cached

    def restart(self) -> None:
        """Forget everything computed (after a preemption): it runs again from its prompt, identically."""
        self.blocks, self.rank_blocks, self.registered, self.n_cached = [], [], 0, 0
        if self.cp:                    # its layout and keys follow what the cache holds at its next admission
            self.units = self.keys = None
        self.out, self.logprobs, self.t_first, self.finish_reason, self.text = [], [], None, None, None
        self.top_logprobs = []
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        if self.prompt_top is not None:
            self.prompt_top = [None]
        if self.prompt_ranks is not None:
            self.prompt_ranks = [None]
        self.hidden_last, self.hidden_sum, self.hidden_n = None, None, 0
        if self.new_generator is not None:
            self.generator = self.new_generator()
        if self.matcher is not None:
            self.matcher.reset()

    def ranks(self, cp: int) -> list:
        """The CP ranks holding this sequence's KV cache."""
        return list(range(cp)) if self.cp else [self.home]

    def holds(self, r: int) -> bool:
        """Whether it holds KV blocks on CP rank ``r``."""
        return bool(self.rank_blocks and self.rank_blocks[r]) if self.cp else self.home == r


def rows_needed(prompt_len: int, max_new: int, cp: int, use_cp: bool) -> list:
    """KV rows a sequence can ever use on each CP rank it spans: prompt + all new tokens but the last one
    (one entry when it is not split over the CP ranks)."""
    total = prompt_len + max_new - 1
    if not use_cp:
        return [total]
    return [cp_local_count(prompt_len, total, cp, r) for r in range(cp)]


class Scheduler:
    """Admission and step planning over ``cp`` CP ranks' KV pools of ``pool_tokens`` rows each.

    With cp > 1 every rank keeps its last pool row as scratch for K/V a non-owner must not store."""

    def __init__(self, cp: int, pool_tokens: int, max_batch: int, step_tokens: int, cp_short: str = "spread",
                 block_size: int = KV_BLOCK, prefix_cache: bool = True, min_shared_blocks: int = MIN_SHARED_BLOCKS):
        if cp_short not in ("spread", "first"):
            raise ValueError(f"cp_short must be 'spread' or 'first', not {cp_short!r}")
        self.cp, self.max_batch, self.step_tokens, self.cp_short = cp, max_batch, step_tokens, cp_short
        self.bs = block_size
        self.min_shared = min_shared_blocks
        self.scratch_row = pool_tokens - 1 if cp > 1 else -1
        num_blocks = usable_blocks(pool_tokens, cp, block_size)
        self.usable_rows = num_blocks * block_size
        self.pools = [BlockPool(num_blocks, block_size, prefix_cache, grow_evicts=min_shared_blocks > 1)
                      for _ in range(cp)]
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.preemptions = 0
        # (CP rank, prefix key) -> the running sequence computing that prompt block: a sequence whose prompt
        # continues with it waits to share it instead of computing it too (a bulk job admits many at once)
        self.pending: dict = {}

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, prompt_len: int, max_new: int, use_cp: bool) -> list:
        """Blocks a sequence can ever hold on each CP rank it spans (one entry when not CP)."""
        return [-(-n // self.bs) for n in rows_needed(prompt_len, max_new, self.cp, use_cp)]

    # -------------------------------------------------------------- admission
    def admit(self) -> None:
        """Move waiting sequences into the running set while batch slots and KV blocks allow (FIFO)."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not (self._admit_cp(seq) if seq.cp else self._admit_local(seq)):
                break   # FIFO: wait for blocks to free (no starvation of long prompts)
            self.waiting.popleft()
            self.running.append(seq)

    def _admit_cp(self, seq: Sequence) -> bool:
        """The blocks of its prompt shard on every CP rank, leaving each rank room for its running decodes to grow
        by a block each (as an ordinary admission); nothing for the new tokens (``grow`` adds them).

        Prefix cache: the longest chain of groups cached on every CP rank that its prompt starts with (``_walk``)
        is shared, not computed, in the layout it was stored in; the rest of the prompt is laid out after it
        (``shard.cp_groups(..., start)``) and computed (at least its last token).  When a running sequence is
        computing the group that would extend the chain, it waits for it."""
        L, cp, bs = len(seq.prompt), self.cp, self.bs
        cacheable = self.pools[0].prefix_cache and 2 * CP_UNIT % bs == 0 and L >= 2 * cp * CP_UNIT
        if cacheable and seq.chunks is None:
            seq.chunks = cp_chunk_hashes(seq.prompt, cp)
        prefix, keys, bkeys = [], [], []
        if cacheable and seq.takes_cache_hits:
            found = self._walk(seq)
            if found is None:
                return False
            prefix, keys, bkeys = found
        units = prefix + cp_groups(L, cp, 2 * cp * sum(prefix))
        # a rank's row count does not depend on the layout (each group gives every rank 2 * unit rows, the tail's
        # chunks depend on L % 2cp only), so the length check made when the request was queued holds
        need = [-(-shard_count(L, cp, r, units) // bs) for r in range(cp)]
        nblocks = 2 * sum(prefix) // bs                      # every rank holds 2 * unit rows of each group
        hits = [self.pools[r].lookup(bkeys) if bkeys else [] for r in range(cp)]
        assert all(len(x) == nblocks for x in hits)          # _walk found every block on every rank
        if any(self.pools[r].available - (need[r] - nblocks) < self._decoding_on(r) for r in range(cp)):
            self._release_all(hits)
            return False
        seq.rank_blocks = [hits[r] + self.pools[r].allocate(need[r] - nblocks, after=hits[r][-1] if hits[r] else None)
                           for r in range(cp)]
        seq.units = units
        seq.keys = None
        if cacheable:                                        # its groups' keys: registered once computed
            seq.keys = keys + cp_group_keys(seq.chunks, cp, units[len(prefix):], keys[-1] if keys else None,
                                            sum(prefix) // CP_UNIT)
        seq.n_cached = 2 * cp * sum(prefix)
        seq.note_cached()
        seq.registered = len(prefix)
        for k in (seq.keys or [])[len(prefix):]:
            self.pending.setdefault((-1, k), seq)
        return True

    def _walk(self, seq: Sequence):
        """(units, keys, block keys) of the longest chain of groups cached on every CP rank that ``seq``'s prompt
        starts with, ending before its last token; at each step the largest unit whose group is cached.  None when
        no cached group extends the chain but a running sequence is computing one that would."""
        L, cp, bs = len(seq.prompt), self.cp, self.bs
        prev, at, units, keys, bkeys = cp_root(cp), 0, [], [], []
        while True:
            u, found, pending = CP_UNIT, None, False
            while at + 2 * cp * 2 * u <= L - 1:
                u *= 2
            while u >= CP_UNIT and found is None:
                if at + 2 * cp * u <= L - 1:
                    key = cp_group_key(prev, u, seq.chunks, at // (2 * cp * CP_UNIT))
                    blocks = self._cached_group(key, 2 * u // bs)
                    if blocks is not None:
                        found = (u, key, blocks)
                    else:
                        pending = pending or (-1, key) in self.pending
                u //= 2
            if found is None:
                return None if pending else (units, keys, bkeys)
            units.append(found[0])
            keys.append(found[1])
            bkeys += found[2]
            prev = found[1]
            at += 2 * cp * found[0]

    def _cached_group(self, key: bytes, n: int) -> list | None:
        """The keys of the ``n`` blocks of the group keyed ``key`` when every CP rank has them all cached, else None
        (its first block's key settles most candidates: the rest are hashed only for a likely hit)."""
        first = cp_block_keys(key, 1)[0]
        if not all(first in pool.block_of for pool in self.pools):
            return None
        keys = cp_block_keys(key, n)
        return keys if all(k in pool.block_of for pool in self.pools for k in keys) else None

    def _release_all(self, per_rank: list) -> None:
        for r, blocks in enumerate(per_rank):
            self.pools[r].release(blocks)

    def _decoding_on(self, r: int) -> int:
        """Running sequences that hold blocks on CP rank ``r`` (each may need one more block before the next
        step)."""
        return sum(1 for s in self.running if s.holds(r))

    def _admit_local(self, seq: Sequence) -> bool:
        L, bs = len(seq.prompt), self.bs
        for r in self._homes():
            pool = self.pools[r]
            hits = []
            if pool.prefix_cache:
                if seq.keys is None:
                    seq.keys = block_hashes(seq.prompt, bs)
                # at least one token is computed; all of them when the prompt's own logprobs are wanted
                hits = pool.lookup(seq.keys[:(L - 1) // bs]) if seq.takes_cache_hits else []
            nxt = end = len(hits)
            while pool.prefix_cache and seq.takes_cache_hits and end < (L - 1) // bs and \
                    (r, seq.keys[end]) in self.pending:
                end += 1
            if end > nxt and end >= self.min_shared:
                # running sequences are computing this prompt's next blocks right now, enough of them to be worth
                # sharing: wait for them instead of computing them too
                pool.release(hits)
                continue
            if len(hits) < self.min_shared:                         # not worth a split cache (MIN_SHARED_BLOCKS)
                pool.release(hits)
                hits = []
            need = -(-L // bs) - len(hits)
            # room for the running decodes on this rank to grow by a block each
            if pool.available - need < self._decoding_on(r):
                pool.release(hits)
                continue
            seq.home = r
            seq.blocks = hits + pool.allocate(need, after=hits[-1] if hits else None)
            seq.n_cached = len(hits) * bs
            seq.note_cached()
            seq.registered = len(hits)
            if pool.prefix_cache:
                for k in seq.keys[len(hits):]:
                    self.pending.setdefault((r, k), seq)
            return True
        return False

    def grow(self) -> None:
        """Before a step: every decoding sequence has a row for the token it feeds in (a CP sequence: on the CP
        rank that stores it); where that rank has no free block, a sequence holding blocks there is preempted
        (``_victim``; possibly the one that needed the block)."""
        for seq in list(self.running):
            while not seq.in_prefill and seq in self.running:
                r, blocks = self._short(seq)
                if blocks is None:
                    break
                got = self.pools[r].allocate(1, after=blocks[-1] if blocks else None)
                if got is not None:
                    blocks += got
                    break
                self.preempt(self._victim(r))

    def _victim(self, r: int) -> Sequence:
        """Whom to preempt for a block on CP rank ``r``: the newest ordinary sequence holding blocks there, else the
        newest CP sequence (there is one: a decode found no block, so running sequences hold them all)."""
        holders = [s for s in reversed(self.running) if s.holds(r)]
        return next((s for s in holders if not s.cp), holders[0])

    def _short(self, seq: Sequence) -> tuple:
        """(CP rank, its block list) of a decoding sequence whose next token has no row there; (None, None) when
        it has one."""
        p = seq.n_cached                                   # position of the token it feeds in
        if not seq.cp:
            return (seq.home, seq.blocks) if p + 1 > len(seq.blocks) * self.bs else (None, None)
        r = p % self.cp                                    # the CP rank that stores position p (StepBatch.write)
        blocks = seq.rank_blocks[r]
        short = cp_local_count(len(seq.prompt), p + 1, self.cp, r, seq.units) > len(blocks) * self.bs
        return (r, blocks) if short else (None, None)

    def _release(self, seq: Sequence) -> None:
        if seq.cp:
            self._release_all(seq.rank_blocks)
        else:
            self.pools[seq.home].release(seq.blocks)
        self._drop_pending(seq)

    def preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and put it first in line to start over."""
        self.running.remove(seq)
        self._release(seq)
        seq.restart()
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, planned: list) -> None:
        """After a step: the sequences' cache counters, and their prompt blocks completed in it registered in
        the prefix cache."""
        for seq, n in planned:
            seq.n_cached += n
            if seq.cp:
                if seq.keys is not None and seq.n_cached == len(seq.prompt) and seq.registered < len(seq.keys):
                    self._register_cp(seq)
                continue
            if seq.keys is not None:
                full = min(seq.n_cached // self.bs, len(seq.keys))
                pool = self.pools[seq.home]
                for j in range(seq.registered, full):
                    pool.register(seq.blocks[j], seq.keys[j])
                    if self.pending.get((seq.home, seq.keys[j])) is seq:
                        del self.pending[(seq.home, seq.keys[j])]
                seq.registered = max(seq.registered, full)

    def _register_cp(self, seq: Sequence) -> None:
        """A CP prompt just computed: its full groups go into the prefix cache on every CP rank."""
        units = seq.units
        at = sum(2 * u // self.bs for u in units[:seq.registered])      # its first block on every rank
        for g in range(seq.registered, len(seq.keys)):
            bkeys = cp_block_keys(seq.keys[g], 2 * units[g] // self.bs)
            for r in range(self.cp):
                for j, k in enumerate(bkeys):
                    self.pools[r].register(seq.rank_blocks[r][at + j], k)
            at += len(bkeys)
            if self.pending.get((-1, seq.keys[g])) is seq:
                del self.pending[(-1, seq.keys[g])]
        seq.registered = len(seq.keys)

    def _cp_extents(self, seq: Sequence, r: int, rows: int) -> list:
        """The runs of a CP sequence's first ``rows`` cache rows on CP rank ``r`` (the scratch row when none)."""
        ext = extents(seq.rank_blocks[r], self.bs, rows)
        assert sum(n for _, n in ext) == rows, (rows, len(seq.rank_blocks[r]))   # its blocks hold every row
        return ext or [(self.scratch_row, 0)]

    def _homes(self) -> list:
        """CP ranks to try for a new ordinary sequence, least loaded first: by the tokens its ordinary sequences
        still have to process (prompt not yet cached + new tokens not yet generated), then by their count.
        Counting sequences alone would put every long prompt on one rank when long and short ones alternate."""
        if self.cp == 1 or self.cp_short == "first":
            return [0]
        load = [[0, 0] for _ in range(self.cp)]
        for seq in self.running:
            if not seq.cp:
                load[seq.home][0] += (len(seq.prompt) - seq.n_cached) + (seq.max_new - len(seq.out))
                load[seq.home][1] += 1
        return sorted(range(self.cp), key=lambda r: (load[r][0], load[r][1], r))

    def finish(self, seq: Sequence) -> None:
        """Take a finished sequence out of the running set and release its KV blocks."""
        self.running.remove(seq)
        self._release(seq)

    def _drop_pending(self, seq: Sequence) -> None:
        at = -1 if seq.cp else seq.home
        for k in seq.keys[seq.registered:] if seq.keys else ():
            if self.pending.get((at, k)) is seq:
                del self.pending[(at, k)]

    # -------------------------------------------------------------- planning
    def plan(self) -> tuple:
        """This step's batch (a list of one batch per CP rank when cp > 1), the sequences in it and how many
        cached tokens each gains, the sequences that sample a token, and the prompt tokens scored (prompt_logprobs)
        as (sequence, prompt index); logits rows are the sampled ones in order, then the scored ones; and the
        embeddings' hidden rows as (sequence, rows), in ``batch.hidden_rows`` order."""
        cp = self.cp
        P = [_RankPlan() for _ in range(cp)]
        planned = []
        scored = []                                       # (sequence, prompt index) of the score rows, in order
        embedded = [[] for _ in range(cp)]                # per CP rank: (sequence, rows) of its hidden rows
        sampled = [[] for _ in range(cp)]                 # per CP rank, in its logits-row order
        budget = [self.step_tokens] * cp                  # tokens of compute per CP rank
        for seq in self.running:                          # decodes first: one token each
            if seq.in_prefill:
                continue
            p = seq.n_cached                              # position of the token fed in
            if not seq.cp:
                P[seq.home].add([seq.out[-1]], [p], extents(seq.blocks, self.bs, p + 1), p + 1, sample=True)
                sampled[seq.home].append(seq)
                budget[seq.home] -= 1
            else:
                for r in range(cp):
                    kl = cp_local_count(len(seq.prompt), p + 1, cp, r, seq.units)
                    P[r].add([seq.out[-1]], [p], self._cp_extents(seq, r, kl), kl, sample=(r == 0),
                             mode=MODE_CP_DECODE,
                             plen=len(seq.prompt), glen=p + 1, write=int(p % cp == r), units=seq.units)
                    budget[r] -= 1
                sampled[0].append(seq)
            planned.append((seq, 1))
        for seq in self.running:                          # then prompts: chunks, or whole CP shards
            if not seq.in_prefill:
                continue
            L = len(seq.prompt)
            if seq.cp:
                if min(budget) <= 0:
                    continue
                for r in range(cp):
                    # its rows on this rank: the shard; its queries: the shard after the cached groups (every CP
                    # rank holds n_cached / cp of them, see _admit_cp), the last prompt position among rank 0's
                    shard = shard_positions(L, cp, r, seq.units)
                    pos = shard[seq.n_cached // cp:].tolist()
                    P[r].add([seq.prompt[j] for j in pos], pos, self._cp_extents(seq, r, len(shard)), len(shard),
                             sample=(r == 0 and seq.max_new > 0), mode=MODE_CP_PREFILL, plen=L, glen=L, write=1,
                             units=seq.units)
                    budget[r] -= len(pos)
                    if seq.pooling and (k := P[r].add_hidden(seq.pooling, pos, L - 1)):
                        embedded[r].append((seq, k))
                planned.append((seq, L - seq.n_cached))
                if seq.max_new > 0:
                    sampled[0].append(seq)
                continue
            h = seq.home
            if budget[h] <= 0:
                continue
            n = min(budget[h], L - seq.n_cached)
            done = seq.n_cached + n == L
            P[h].add(seq.prompt[seq.n_cached:seq.n_cached + n], range(seq.n_cached, seq.n_cached + n),
                     extents(seq.blocks, self.bs, seq.n_cached + n), seq.n_cached + n,
                     sample=done and seq.max_new > 0)
            if seq.prompt_logprobs is not None:            # row of position j predicts prompt token j + 1
                t0 = len(P[h].ids) - n
                for j in range(seq.n_cached, seq.n_cached + n - (1 if done else 0)):
                    P[h].score_rows.append(t0 + j - seq.n_cached)
                    scored.append((seq, j + 1))
            if seq.pooling and (k := P[h].add_hidden(seq.pooling, range(seq.n_cached, seq.n_cached + n), L - 1)):
                embedded[h].append((seq, k))
            budget[h] -= n
            planned.append((seq, n))
            if done and seq.max_new > 0:
                sampled[h].append(seq)
        batches = [pl.batch(cp, r, self.scratch_row) for r, pl in enumerate(P)]
        if cp > 1 and any(sampled[1:]):                   # logits of ranks > 0 come back to the leader
            for b in batches:
                b.gather_logits = 1
        if cp > 1 and any(embedded[1:]):                  # and hidden rows (embeddings), in CP rank order
            for b in batches:
                b.gather_hidden = 1
        return (batches[0] if cp == 1 else batches), planned, [s for per in sampled for s in per], scored, \
            [e for per in embedded for e in per]


class _RankPlan:
    """Accumulates one CP rank's part of a step."""

    def __init__(self):
        self.ids, self.pos, self.qs, self.ql, self.ext, self.kl, self.rows = [], [], [], [], [], [], []
        self.mode, self.plen, self.glen, self.write, self.units = [], [], [], [], []
        self.score_rows = []          # rows whose logits score the next prompt token (after the sampled rows)
        self.hidden_rows = []         # rows whose final hidden states an embedding needs

    def add(self, ids, pos, ext, kv_len, sample, mode=MODE_LOCAL, plen=0, glen=0, write=1, units=None):
        t = len(self.ids)
        self.ids.extend(ids)
        self.pos.extend(pos)
        n = len(self.ids) - t
        self.qs.append(t)
        self.ql.append(n)
        self.ext.append(ext)
        self.kl.append(kv_len)
        self.mode.append(mode)
        self.plen.append(plen)
        self.glen.append(glen)
        self.write.append(write)
        self.units.append(units)
        if sample:
            self.rows.append(t + n - 1)

    def add_hidden(self, pooling: str, positions, last: int) -> int:
        """An embedding's hidden rows among the tokens just added at prompt ``positions``: all of them (mean
        pooling), else the one at the prompt's ``last`` position when it is among them.  Returns how many."""
        t0 = len(self.ids) - len(positions)
        rows = range(t0, len(self.ids)) if pooling == "mean" else \
            [t0 + positions.index(last)] if last in positions else []
        self.hidden_rows.extend(rows)
        return len(rows)

    def batch(self, cp: int, cp_rank: int, scratch: int) -> StepBatch:
        b = StepBatch(torch.tensor(self.ids, dtype=torch.int64), torch.tensor(self.pos, dtype=torch.int64),
                      self.qs, self.ql, [e[0][0] for e in self.ext], self.kl,
                      torch.tensor(self.rows + self.score_rows, dtype=torch.int64),
                      kv_ext=self.ext if any(len(e) > 1 for e in self.ext) else None)
        if self.hidden_rows:
            b.hidden_rows = torch.tensor(self.hidden_rows, dtype=torch.int64)
        if cp > 1:
            b.mode, b.prompt_len, b.glen, b.write = self.mode, self.plen, self.glen, self.write
            b.units = [list(u) if u is not None else None for u in self.units] if any(self.units) else None
            b.cp, b.cp_rank, b.scratch_row = cp, cp_rank, scratch
        return b
