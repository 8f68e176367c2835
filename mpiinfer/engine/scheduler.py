"""The replica leader's scheduler: which sequences hold KV cache, and what each model step computes.

Owns: ``Sequence`` (one request's state across steps), admission into the KV cache (a contiguous region
per sequence and CP rank, sized prompt + max new tokens and reserved up front, FIFO), the CP routing of
ordinary sequences (each to the CP rank with the fewest tokens still to process, or all on rank 0), and
the per-step plan: every decoding sequence contributes one token, then prompt chunks fill the step's token
budget; a CP prompt goes whole, one load-balanced shard per CP rank.  No model, no tokenizer, no MPI: the
``Engine`` executes the plan and samples.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from ..messages import Request
from ..models.step import MODE_CP_DECODE, MODE_CP_PREFILL, MODE_LOCAL, StepBatch
from ..parallel.shard import cp_local_count, shard_positions
from .kv_cache import RegionAllocator


@dataclass
class Sequence:
    req: Request
    prompt: list
    max_new: int
    eos: frozenset
    generator: torch.Generator | None
    cp: bool = False                   # context-parallel: prompt and KV spread over the CP ranks
    home: int = 0                      # not CP: the CP rank that runs it (its KV cache lives there)
    kv_base: list = field(default_factory=list)   # per CP rank (one entry, on ``home``, when not CP)
    kv_cap: list = field(default_factory=list)
    n_cached: int = 0                  # tokens whose K/V are in the cache
    out: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    t_added: float = 0.0
    t_first: float | None = None
    finish_reason: str | None = None
    text: str | None = None

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < len(self.prompt)

    def ranks(self, cp: int) -> list:
        """The CP ranks holding this sequence's KV cache, in ``kv_base`` order."""
        return list(range(cp)) if self.cp else [self.home]


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

    def __init__(self, cp: int, pool_tokens: int, max_batch: int, step_tokens: int, cp_short: str = "spread"):
        if cp_short not in ("spread", "first"):
            raise ValueError(f"cp_short must be 'spread' or 'first', not {cp_short!r}")
        self.cp, self.max_batch, self.step_tokens, self.cp_short = cp, max_batch, step_tokens, cp_short
        self.scratch_row = pool_tokens - 1 if cp > 1 else -1
        self.usable_rows = pool_tokens - (1 if cp > 1 else 0)
        self.allocs = [RegionAllocator(self.usable_rows) for _ in range(cp)]
        self.waiting: collections.deque = collections.deque()
        self.running: list = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_capacity(self) -> int:
        """Sequences that could still start now (for pull-based work distribution)."""
        return max(0, self.max_batch - len(self.running) - len(self.waiting))

    # -------------------------------------------------------------- admission
    def admit(self) -> None:
        """Move waiting sequences into the running set while batch slots and KV regions allow (FIFO)."""
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = rows_needed(len(seq.prompt), seq.max_new, self.cp, seq.cp)
            if seq.cp:
                bases = []
                for r, n in enumerate(need):
                    b = self.allocs[r].alloc(n)
                    if b is None:
                        break
                    bases.append(b)
                if len(bases) < len(need):
                    for r, b in enumerate(bases):
                        self.allocs[r].free(b, need[r])
                    break   # FIFO: wait for regions to free (no starvation of long prompts)
            else:
                bases = None
                for r in self._homes():
                    b = self.allocs[r].alloc(need[0])
                    if b is not None:
                        seq.home, bases = r, [b]
                        break
                if bases is None:
                    break
            self.waiting.popleft()
            seq.kv_base, seq.kv_cap = bases, need
            self.running.append(seq)

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
        """Take a finished sequence out of the running set and free its KV regions."""
        self.running.remove(seq)
        for r, b, n in zip(seq.ranks(self.cp), seq.kv_base, seq.kv_cap):
            self.allocs[r].free(b, n)

    # -------------------------------------------------------------- planning
    def plan(self) -> tuple:
        """This step's batch (a list of one batch per CP rank when cp > 1), the sequences in it and how many
        cached tokens each gains, and the sequences that sample a token (in logits-row order)."""
        cp = self.cp
        P = [_RankPlan() for _ in range(cp)]
        planned = []
        sampled = [[] for _ in range(cp)]                 # per CP rank, in its logits-row order
        budget = [self.step_tokens] * cp                  # tokens of compute per CP rank
        for seq in self.running:                          # decodes first: one token each
            if seq.in_prefill:
                continue
            p = seq.n_cached                              # position of the token fed in
            if not seq.cp:
                P[seq.home].add([seq.out[-1]], [p], seq.kv_base[0], p + 1, sample=True)
                sampled[seq.home].append(seq)
                budget[seq.home] -= 1
            else:
                for r in range(cp):
                    kl = cp_local_count(len(seq.prompt), p + 1, cp, r)
                    P[r].add([seq.out[-1]], [p], seq.kv_base[r], kl, sample=(r == 0), mode=MODE_CP_DECODE,
                             plen=len(seq.prompt), glen=p + 1, write=int(p % cp == r))
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
                    pos = shard_positions(L, cp, r).tolist()
                    P[r].add([seq.prompt[j] for j in pos], pos, seq.kv_base[r], len(pos), sample=(r == 0),
                             mode=MODE_CP_PREFILL, plen=L, glen=L, write=1)
                    budget[r] -= len(pos)
                planned.append((seq, L))
                sampled[0].append(seq)
                continue
            h = seq.home
            if budget[h] <= 0:
                continue
            n = min(budget[h], L - seq.n_cached)
            P[h].add(seq.prompt[seq.n_cached:seq.n_cached + n], range(seq.n_cached, seq.n_cached + n),
                     seq.kv_base[0], seq.n_cached + n, sample=(seq.n_cached + n == L))
            budget[h] -= n
            planned.append((seq, n))
            if seq.n_cached + n == L:
                sampled[h].append(seq)
        batches = [pl.batch(cp, r, self.scratch_row) for r, pl in enumerate(P)]
        if cp > 1 and any(sampled[1:]):                   # logits of ranks > 0 come back to the leader
            for b in batches:
                b.gather_logits = 1
        return (batches[0] if cp == 1 else batches), planned, [s for per in sampled for s in per]


class _RankPlan:
    """Accumulates one CP rank's part of a step."""

    def __init__(self):
        self.ids, self.pos, self.qs, self.ql, self.kb, self.kl, self.rows = [], [], [], [], [], [], []
        self.mode, self.plen, self.glen, self.write = [], [], [], []

    def add(self, ids, pos, kv_base, kv_len, sample, mode=MODE_LOCAL, plen=0, glen=0, write=1):
        t = len(self.ids)
        self.ids.extend(ids)
        self.pos.extend(pos)
        n = len(self.ids) - t
        self.qs.append(t)
        self.ql.append(n)
        self.kb.append(kv_base)
        self.kl.append(kv_len)
        self.mode.append(mode)
        self.plen.append(plen)
        self.glen.append(glen)
        self.write.append(write)
        if sample:
            self.rows.append(t + n - 1)

    def batch(self, cp: int, cp_rank: int, scratch: int) -> StepBatch:
        b = StepBatch(torch.tensor(self.ids, dtype=torch.int64), torch.tensor(self.pos, dtype=torch.int64),
                      self.qs, self.ql, self.kb, self.kl, torch.tensor(self.rows, dtype=torch.int64))
        if cp > 1:
            b.mode, b.prompt_len, b.glen, b.write = self.mode, self.plen, self.glen, self.write
            b.cp, b.cp_rank, b.scratch_row = cp, cp_rank, scratch
        return b
