"""The replica leader's engine: requests in, results out, continuous batching.

Owns: turning a ``Request`` into prompt ids (or an error ``Result``), admission
into the KV cache (a contiguous region sized prompt + max new tokens, reserved up
front), the per-step plan (every decoding sequence contributes one token, then
prompt chunks fill the step's token budget), sampling, stop conditions and
detokenisation.  A finished sequence frees its region at once, so the next
waiting request starts in the very next step.

Typical use::

    engine = Engine(runner, tokenizer, default_seed=0)
    for r in engine.generate(requests):   # or add() / step() for streaming
        ...
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from ..messages import ErrorInfo, Request, Result
from .batch import StepBatch, cp_local_count
from .kv_cache import RegionAllocator
from ..parallel.ring import shard_positions
from .runner import ModelRunner
from .sampling import make_generator, sample


@dataclass
class Sequence:
    req: Request
    prompt: list
    max_new: int
    eos: frozenset
    generator: Optional[torch.Generator]
    cp: bool = False                   # context-parallel: prompt and KV spread over the CP ranks
    home: int = 0                      # not CP: the CP rank that runs it (its KV cache lives there)
    kv_base: list = field(default_factory=list)   # per CP rank (one entry, on ``home``, when not CP)
    kv_cap: list = field(default_factory=list)
    n_cached: int = 0                  # tokens whose K/V are in the cache
    out: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    t_added: float = 0.0
    t_first: Optional[float] = None
    finish_reason: Optional[str] = None
    text: Optional[str] = None

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < len(self.prompt)

    def need(self, cp: int = 1) -> list:
        """KV rows the sequence can ever use on each CP rank: prompt + all new tokens but the last one."""
        total = len(self.prompt) + self.max_new - 1
        if not self.cp:
            return [total]
        return [cp_local_count(len(self.prompt), total, cp, r) for r in range(cp)]

    def ranks(self, cp: int) -> list:
        """The CP ranks holding this sequence's KV cache, in ``kv_base`` order."""
        return list(range(cp)) if self.cp else [self.home]


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, default_seed: int = 0, max_batch: Optional[int] = None,
                 step_tokens: Optional[int] = None, max_seq_len: Optional[int] = None,
                 cp_min_tokens: Optional[int] = None, cp_short: Optional[str] = None):
        self.runner = runner
        self.tok = tokenizer
        self.cfg = runner.cfg
        self.default_seed = default_seed
        ec = runner.engine_cfg
        self.max_batch = max_batch or ec.max_batch
        self.step_tokens = step_tokens or ec.prefill_chunk_tokens
        ctx = self.cfg.max_position_embeddings
        self.max_seq_len = min(max_seq_len or ec.max_seq_len or ctx, ctx)
        self.cp = runner.mesh.cp
        self.cp_min_tokens = cp_min_tokens if cp_min_tokens is not None else ec.cp_min_tokens
        # with cp > 1, requests below cp_min_tokens are independent work: "spread" gives each to the least
        # loaded CP rank (data parallelism inside the CP group), "first" keeps them all on CP rank 0
        self.cp_short = cp_short or ec.cp_short
        if self.cp_short not in ("spread", "first"):
            raise ValueError(f"cp_short must be 'spread' or 'first', not {self.cp_short!r}")
        # with CP every rank keeps its last pool row as scratch for K/V a non-owner must not store
        self.scratch_row = runner.pool_tokens - 1 if self.cp > 1 else -1
        usable = runner.pool_tokens - (1 if self.cp > 1 else 0)
        self.allocs = [RegionAllocator(usable) for _ in range(self.cp)]
        self.usable_rows = usable
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.eos = frozenset(self.cfg.eos_token_ids)
        self.steps = 0
        self.tokens_generated = 0
        # wide EP: every replica runs every step (an idle one with zero tokens) for the expert all-to-alls
        self.lockstep = runner.mesh.wide_ep

    # -------------------------------------------------------------- admission
    def prepare(self, req: Request):
        """A ``Sequence`` ready to queue, or an error ``Result`` (never raises for bad input)."""
        try:
            if req.prompt_token_ids is not None:
                ids = list(req.prompt_token_ids)
                bad = [t for t in ids if t >= self.cfg.vocab_size]
                if bad:
                    return self._error(req, "invalid_request",
                                       f"prompt_token_ids contains id {bad[0]} >= vocab_size {self.cfg.vocab_size}")
            elif req.messages is not None:
                ids = self.tok.encode_messages(req.messages)
            else:
                ids = self.tok.encode(req.prompt)
        except ValueError as e:   # chat template errors
            return self._error(req, "invalid_request", str(e))
        if not ids:
            return self._error(req, "invalid_request", "the prompt encodes to zero tokens")
        if len(ids) >= self.max_seq_len:
            return self._error(req, "prompt_too_long",
                               f"prompt has {len(ids)} tokens; this run allows at most {self.max_seq_len - 1} "
                               f"(model context {self.cfg.max_position_embeddings}, --max-seq-len)")
        sp = req.sampling
        # generation stops at the context length (finish_reason "length"), as in transformers
        max_new = min(sp.max_tokens, self.max_seq_len - len(ids))
        use_cp = self.cp > 1 and len(ids) >= self.cp_min_tokens
        total = len(ids) + max_new - 1
        need = max(cp_local_count(len(ids), total, self.cp, r) for r in range(self.cp)) if use_cp else total
        if need > self.usable_rows:
            where = (f"{need} KV-cache rows on each of the {self.cp} CP ranks" if use_cp else
                     f"{need} KV-cache rows")
            hint = "" if self.cp > 1 else " or split the document over ranks with --cp"
            return self._error(req, "prompt_too_long",
                               f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) needs {where} but the cache "
                               f"of a rank holds {self.usable_rows}: raise --kv-budget, lower max_tokens{hint}")
        eos = frozenset() if sp.ignore_eos else self.eos
        eos = eos | frozenset(sp.stop_token_ids)
        gen = None
        if sp.temperature > 0:
            seed = sp.seed if sp.seed is not None else (self.default_seed * 1_000_003 + req.index)
            gen = make_generator(seed, self.runner.device.torch)
        return Sequence(req, ids, max_new, eos, gen, cp=use_cp, t_added=time.perf_counter())

    def add(self, req: Request) -> Optional[Result]:
        """Queue a request; returns an error Result right away when it cannot run."""
        seq = self.prepare(req)
        if isinstance(seq, Result):
            return seq
        self.waiting.append(seq)
        return None

    @staticmethod
    def _error(req: Request, typ: str, msg: str) -> Result:
        return Result(index=req.index, id=req.id, error=ErrorInfo(typ, msg), extra=req.extra)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_capacity(self) -> int:
        """Sequences that could still start now (for pull-based work distribution)."""
        return max(0, self.max_batch - len(self.running) - len(self.waiting))

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = seq.need(self.cp)
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

    # -------------------------------------------------------------- stepping
    def _plan(self) -> tuple:
        """This step's batch (a list of one batch per CP rank when cp > 1), the sequences in it and how many
        cached tokens each gains, and the sequences that sample a token."""
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
                    P[r].add([seq.out[-1]], [p], seq.kv_base[r], kl, sample=(r == 0), mode=2,
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
                    P[r].add([seq.prompt[j] for j in pos], pos, seq.kv_base[r], len(pos), sample=(r == 0), mode=1,
                             plen=L, glen=L, write=1)
                    budget[r] -= len(pos)
                planned.append((seq, L)); sampled[0].append(seq)
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

    def step(self) -> list:
        """Run one model step; return the Results of the sequences that finished."""
        self._admit()
        if not self.running and not self.lockstep:
            return []
        batch, planned, sampled = self._plan()
        logits = self.runner.execute(batch)
        # advance the cache counters of every sequence in the step
        for seq, n in planned:
            seq.n_cached += n
        self.steps += 1
        finished = []
        if sampled:
            toks, lps = sample(logits, [s.req.sampling for s in sampled], [s.generator for s in sampled],
                               [s.req.sampling.logprobs for s in sampled])
            now = time.perf_counter()
            for seq, tok, lp in zip(sampled, toks, lps):
                if seq.t_first is None:
                    seq.t_first = now
                seq.out.append(tok)
                if lp is not None:
                    seq.logprobs.append(lp)
                self.tokens_generated += 1
                if self._check_stop(seq, tok):
                    finished.append(seq)
        for seq in finished:
            self.running.remove(seq)
            for r, b, n in zip(seq.ranks(self.cp), seq.kv_base, seq.kv_cap):
                self.allocs[r].free(b, n)
        return [self._result(s) for s in finished]

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
        if tok in seq.eos:
            seq.finish_reason = "stop"
            return True
        stops = seq.req.sampling.stop
        if stops:
            text = self.tok.decode(seq.out)
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                seq.finish_reason = "stop"
                return True
        if len(seq.out) >= seq.max_new:
            seq.finish_reason = "length"
            return True
        return False

    def _result(self, seq: Sequence) -> Result:
        text = seq.text if seq.text is not None else self.tok.decode(seq.out)
        now = time.perf_counter()
        return Result(index=seq.req.index, id=seq.req.id, text=text, token_ids=list(seq.out),
                      finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt),
                      logprobs=list(seq.logprobs) if seq.req.sampling.logprobs else None,
                      extra=seq.req.extra, ttft=(seq.t_first - seq.t_added) if seq.t_first else None,
                      latency=now - seq.t_added)

    # -------------------------------------------------------------- convenience
    def generate(self, requests: Iterable) -> Iterator[Result]:
        """Run requests (or error Results passed through) to completion; yields Results as they finish."""
        it = iter(requests)
        exhausted = False
        while True:
            while not exhausted and len(self.waiting) < self.max_batch:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                if isinstance(item, Result):
                    yield item
                    continue
                err = self.add(item)
                if err is not None:
                    yield err
            if not self.has_work():
                if exhausted:
                    return
                continue
            yield from self.step()


class _RankPlan:
    """Accumulates one CP rank's part of a step."""

    def __init__(self):
        self.ids, self.pos, self.qs, self.ql, self.kb, self.kl, self.rows = [], [], [], [], [], [], []
        self.mode, self.plen, self.glen, self.write = [], [], [], []

    def add(self, ids, pos, kv_base, kv_len, sample, mode=0, plen=0, glen=0, write=1):
        t = len(self.ids)
        self.ids.extend(ids)
        self.pos.extend(pos)
        n = len(self.ids) - t
        self.qs.append(t); self.ql.append(n); self.kb.append(kv_base); self.kl.append(kv_len)
        self.mode.append(mode); self.plen.append(plen); self.glen.append(glen); self.write.append(write)
        if sample:
            self.rows.append(t + n - 1)

    def batch(self, cp: int, cp_rank: int, scratch: int) -> StepBatch:
        b = StepBatch(torch.tensor(self.ids, dtype=torch.int64), torch.tensor(self.pos, dtype=torch.int64),
                      self.qs, self.ql, self.kb, self.kl, torch.tensor(self.rows, dtype=torch.int64))
        if cp > 1:
            b.mode, b.prompt_len, b.glen, b.write = self.mode, self.plen, self.glen, self.write
            b.cp, b.cp_rank, b.scratch_row = cp, cp_rank, scratch
        return b
