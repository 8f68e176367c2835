"""The small messages that flow between readers, the engine, the replicas and writers.

``Request``: one parsed input record (exactly one of prompt / messages /
prompt_token_ids is set).  ``Result``: what the engine produced for it, or an
error.  Both are plain dataclasses so they pickle cheaply over MPI.  Then the
coordinator <-> replica leader protocol (``Want`` / ``Work`` / ``Done`` / ``Stop``)
with its stop (``Drain`` / ``Drained``), and the wide-EP lockstep codes (``Lockstep``).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .config import SamplingParams


@dataclass(frozen=True)
class Request:
    index: int                       # 0-based position in the input stream (output order)
    id: Any                          # user's id (or the 1-based line number when absent)
    sampling: SamplingParams
    prompt: str | None = None
    messages: list | None = None
    prompt_token_ids: list | None = None
    extra: dict = field(default_factory=dict)   # format-specific passthrough (e.g. OpenAI custom_id)
    inputs: list | None = None       # an embedding request: its texts (str) or token-id lists, one vector each


@dataclass(frozen=True)
class ErrorInfo:
    type: str        # e.g. "invalid_json", "invalid_request", "prompt_too_long"
    message: str


@dataclass
class Choice:
    """One of the ``n`` samples of a request (``Result.choices`` when n > 1)."""
    text: str
    token_ids: list
    finish_reason: str | None
    logprobs: list | None = None
    top_logprobs: list | None = None       # per position: [[token id, logprob], ...], most likely first

    def to_record(self) -> dict:
        rec = {"text": self.text, "token_ids": list(self.token_ids), "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            rec["logprobs"] = list(self.logprobs)
        if self.top_logprobs is not None:
            rec["top_logprobs"] = top_logprobs_record(self.top_logprobs)
        return rec


def top_logprobs_record(top: list) -> list:
    """JSONL ``top_logprobs``: per position, the alternatives as ``{"token_id", "logprob"}``, most likely first."""
    return [[{"token_id": t, "logprob": v} for t, v in pos] for pos in top]


@dataclass
class Result:
    index: int
    id: Any
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str | None = None       # "stop" | "length"
    prompt_tokens: int = 0
    logprobs: list | None = None
    top_logprobs: list | None = None       # per position: [[token id, logprob], ...] (top_logprobs > 0)
    prompt_logprobs: list | None = None    # per prompt token: its logprob given the ones before (None first)
    # echo (OpenAI completions): the prompt's ids and text, and its top alternatives per position (None first)
    prompt_token_ids: list | None = None
    prompt_text: str | None = None
    prompt_top_logprobs: list | None = None
    prompt_ranks: list | None = None       # vLLM's prompt_logprobs: each prompt token's rank (None first)
    error: ErrorInfo | None = None
    extra: dict = field(default_factory=dict)
    # timings (seconds) for the summary: time to first token and total
    ttft: float | None = None
    latency: float | None = None
    max_tokens_clipped_to: int | None = None   # the record's max_tokens did not fit the context: it got this many
    # for the summary only (never in a record: they depend on what else ran, and resume must be byte-identical)
    preemptions: int = 0                       # times its sequence lost its KV blocks and started over
    cached_tokens: int = 0                     # prompt tokens found in the prefix cache, not computed
    # n > 1: every sample, in order (seeds seed + i); text / token_ids / finish_reason / logprobs are choice 0's
    choices: list | None = None
    embeddings: list | None = None         # an embedding request: one vector (list of floats) per input

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices) if self.choices else len(self.token_ids)

    def to_record(self) -> dict:
        """The output JSONL record (the contract in README.md)."""
        if self.error is not None:
            return {"id": self.id, "error": {"type": self.error.type, "message": self.error.message}}
        if self.embeddings is not None:
            rec = {"id": self.id, "embedding": self.embeddings[0]} if len(self.embeddings) == 1 else \
                {"id": self.id, "embeddings": self.embeddings}
            rec["usage"] = {"prompt_tokens": self.prompt_tokens}
            return rec
        if self.choices:
            rec = {"id": self.id, "choices": [c.to_record() for c in self.choices],
                   "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}}
            if self.max_tokens_clipped_to is not None:
                rec["max_tokens_clipped_to"] = self.max_tokens_clipped_to
            return rec
        rec = {
            "id": self.id,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)},
        }
        if self.logprobs is not None:
            rec["logprobs"] = list(self.logprobs)
        if self.top_logprobs is not None:
            rec["top_logprobs"] = top_logprobs_record(self.top_logprobs)
        if self.prompt_logprobs is not None:
            rec.update(prompt_scores(self.prompt_logprobs))
        if self.max_tokens_clipped_to is not None:
            rec["max_tokens_clipped_to"] = self.max_tokens_clipped_to
        return rec


def prompt_scores(lps: list) -> dict:
    """``prompt_logprobs`` (None for the first token), their sum and the prompt's perplexity exp(-mean) over the
    tokens scored (None for a one-token prompt)."""
    scored = [v for v in lps if v is not None]
    total = float(sum(scored))
    return {"prompt_logprobs": list(lps), "prompt_logprob_sum": total,
            "prompt_perplexity": math.exp(-total / len(scored)) if scored else None}


# ----------------------------------------------------------------- coordinator <-> replica leaders
# Sent with mpi4py's lowercase (pickle) API on the world communicator, tag TAG, through an ``Outbox``.
TAG = 77


class Outbox:
    """Non-blocking sends of the coordinator <-> leader messages on ``comm``.

    Both sides send while the other may be sending too: the coordinator hands a leader ``Work`` while that
    leader, after a step, sends its ``Done``.  A blocking MPI_Send of a message above the eager limit (Open MPI's
    shared-memory default: 4 KiB) waits until the receiver posts its receive, so two such sends crossing each
    other wait forever (seen: a 1,000-prompt job under ``mpiexec -n 2`` stopped writing after 20 s; every DP job
    under Open MPI with chat-sized records).  Here each message is an ``isend``; its request is kept until
    it completes (``poll`` drops the finished ones, the loop calls it while receiving) and ``flush`` waits for
    the rest before MPI finalizes.  MPI keeps the order of messages between two ranks, so the protocol's order
    (``Work`` before ``Stop``, ``Done`` before ``Bye``) holds.  ``MPIINFER_SYNC_SENDS=1`` (tests): synchronous
    sends (``issend``: complete only once received), the worst an MPI may do with any message."""

    def __init__(self, comm):
        self.comm = comm
        self.pending: list = []
        self._isend = comm.issend if os.environ.get("MPIINFER_SYNC_SENDS") == "1" else comm.isend

    def send(self, msg, dest: int, tag: int = TAG) -> None:
        self.pending.append(self._isend(msg, dest=dest, tag=tag))
        self.poll()

    def poll(self) -> None:
        """Forget the sends that have completed (and let MPI progress the others)."""
        if self.pending:
            self.pending = [r for r in self.pending if not r.Test()]

    def flush(self, timeout: float | None = None, keep: bool = True) -> bool:
        """Wait for every send to complete (the receiver keeps receiving meanwhile); False if ``timeout``
        seconds pass first.  ``keep``: sends still pending then stay referenced until the process exits (MPI
        may still read their buffers; a dropped request would free them)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                if keep:
                    _UNFINISHED.extend(self.pending)
                return False
            if self.pending:
                time.sleep(1e-4)
        return True


_UNFINISHED: list = []    # sends an Outbox gave up waiting for (see Outbox.flush)


@dataclass(frozen=True)
class Want:
    """A replica leader has room for ``n`` more requests."""
    n: int


@dataclass(frozen=True)
class Work:
    """Requests for a replica leader (records that failed to parse never travel: the coordinator writes
    their error results itself)."""
    items: list


@dataclass(frozen=True)
class Done:
    """Finished results from a replica leader (any order; the coordinator reorders)."""
    results: list


@dataclass(frozen=True)
class Drain:
    """The job is stopping (a signal): take no new work, finish what is running, then say ``Drained``."""


@dataclass(frozen=True)
class Drained:
    """A replica leader has nothing running any more (after ``Drain``)."""


@dataclass(frozen=True)
class Bye:
    """A replica leader's last message: everything it sent before has arrived (MPI keeps the order)."""


@dataclass(frozen=True)
class Stop:
    """No more work. ``abandon``: drop what is in flight (SIGTERM); it is redone on resume."""
    abandon: bool = False


class Lockstep(IntEnum):
    """With wide EP all replica leaders step together: before each step every leader contributes one code to a
    MAX-allreduce over ``mesh.dp_comm`` and all act on the maximum.  A stop with a drain: the coordinator's first
    DRAIN_* code switches every leader to draining (take no new work, drop what has not started) and that round
    still steps; from then on all contribute DRAIN_*, so DRAIN_IDLE means nothing runs anywhere: all end."""
    IDLE = 0        # nothing to compute here (the coordinator: and nothing left to read or collect): end when all are
    STEP = 1        # someone has work: every replica runs a step (an idle one with zero tokens)
    DRAIN_IDLE = 2  # draining, nothing running here
    DRAIN_STEP = 3  # draining, sequences still running here
    STOP = 4        # the coordinator stops now (Ctrl-C, or the drain's time is up): every leader ends

    @staticmethod
    def mine(busy: bool, draining: bool) -> Lockstep:
        if draining:
            return Lockstep.DRAIN_STEP if busy else Lockstep.DRAIN_IDLE
        return Lockstep.STEP if busy else Lockstep.IDLE

    @staticmethod
    def go_on(result: int, draining: bool) -> tuple:
        """What the reduced code means for a participant: (step now?, draining from now on?)."""
        if result == Lockstep.STOP:
            return False, draining
        if result >= Lockstep.DRAIN_IDLE:
            if not draining:                     # the first drain round: everyone still steps once
                return True, True
            return result == Lockstep.DRAIN_STEP, True
        return result == Lockstep.STEP, draining
