"""An engine without a model (``mpiinfer run --engine null``): measures what the job layer around it can carry.

Owns: the ``Engine`` interface (``add`` / ``step`` / ``has_work`` / ``drop_waiting``,
``max_batch``, ``running``, ``waiting``) answered at once: each step finishes up to ``max_batch`` queued
requests, each with the record's ``max_tokens`` tokens (so ``--max-tokens`` fixes the size of every result).
The token ids cycle through ``NULL_VOCAB`` letters; ``decode`` spells them.  Nothing is tokenized: the
prompt's token count is its length in characters (or its ``prompt_token_ids``).  With it the coordinator's
read -> dispatch -> collect -> write path runs at full speed for ``benchmarks/bench_coordinator.py``, on any
number of replicas, with no checkpoint.
"""
from __future__ import annotations

import collections

from ..messages import Choice, Request, Result

NULL_VOCAB = "abcdefghijklmnopqrstuvwxyz"


def decode(ids) -> str:
    return "".join(NULL_VOCAB[t % len(NULL_VOCAB)] for t in ids)


class NullEngine:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.waiting: collections.deque = collections.deque()
        self.running: list = []             # a step finishes everything it takes: nothing stays running
        self.steps = 0
        self.tokens_generated = 0

    def add(self, req: Request) -> Result | None:
        self.waiting.append(req)
        return None

    def has_work(self) -> bool:
        return bool(self.waiting)

    def drop_waiting(self) -> None:
        self.waiting.clear()

    def step(self) -> list:
        out = []
        for _ in range(min(self.max_batch, len(self.waiting))):
            req = self.waiting.popleft()
            n = req.sampling.max_tokens
            ids = [i % len(NULL_VOCAB) for i in range(n)]
            if req.prompt_token_ids is not None:
                plen = len(req.prompt_token_ids)
            elif req.messages is not None:
                plen = sum(len(str(m.get("content", ""))) for m in req.messages)
            else:
                plen = len(req.prompt or "")
            k = req.sampling.n
            choices = [Choice(decode(ids), ids, "length") for _ in range(k)] if k > 1 else None
            out.append(Result(index=req.index, id=req.id, text=decode(ids), token_ids=ids, finish_reason="length",
                              prompt_tokens=plen, extra=req.extra, ttft=0.0, latency=0.0, choices=choices))
            self.tokens_generated += n * k
        self.steps += 1
        return out
