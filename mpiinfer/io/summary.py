"""Run statistics -> ``OUTPUT.summary.json``.

Owns ``Summary``: fed one ``Result`` at a time by the coordinator (``add``), it
keeps counts (ok, errors, errors by type), token totals, wall time and latency
samples, and writes a JSON summary atomically (temp file in the same
directory, fsync, rename), so a reader never sees half a summary.

Memory stays bounded whatever the number of records: latencies go into
fixed-size reservoir samples (Vitter's algorithm R, ``reservoir_size`` entries
each, 100,000 by default, about 3 MB for two reservoirs of floats), seeded so a
run is reproducible.  Percentiles are exact while fewer than ``reservoir_size``
values were seen, and a uniform-sample estimate after (for p99 with 100k
samples the rank error is about +-0.03 percentage points).  Percentiles use
linear interpolation between order statistics (numpy's default method).

Latencies: time to first token is ``Result.ttft``; the per-token latency of a
result is ``(latency - ttft) / (completion_tokens - 1)`` (the mean time between
generated tokens; results with fewer than 2 tokens or missing timings are left
out).  Errors count in ``errors`` but never in token or latency figures.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time

from ..messages import Result
from .files import apply_user_mode

PERCENTILES = (50, 90, 99)


class Reservoir:
    """A uniform random sample of at most ``size`` values from a stream (algorithm R)."""

    def __init__(self, size: int = 100_000, seed: int = 0):
        if size < 1:
            raise ValueError(f"reservoir size must be >= 1, got {size}")
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(x)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.values[j] = x

    def percentiles(self, ps=PERCENTILES) -> dict[str, float] | None:
        """``{"p50": ..., ...}`` or None when empty."""
        if not self.values:
            return None
        v = sorted(self.values)
        return {f"p{p:g}": _percentile(v, p) for p in ps}


def _percentile(sorted_values: list, p: float) -> float:
    """Linear interpolation between closest ranks (numpy.percentile's default)."""
    n = len(sorted_values)
    if n == 1:
        return sorted_values[0]
    pos = (n - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


def summary_path(output: str) -> str | None:
    """``OUTPUT.summary.json`` for an output path; None for ``-`` (stdout)."""
    output = os.fspath(output)
    return None if output == "-" else output + ".summary.json"


class Summary:
    """Accumulate per-result statistics of one run; ``write(path)`` the JSON.

    ``mesh``: a description of the layout (e.g. ``"dp=2 x tp=2 (4 ranks)"``);
    ``resumed``: records already in the output when this run started (reported,
    not counted in this run's throughput).  The clock starts at construction
    (or ``start()``) and stops at ``finish()`` (``to_dict`` uses "now" before).
    """

    def __init__(self, mesh: str = "", resumed: int = 0, reservoir_size: int = 100_000,
                 seed: int = 0):
        self.mesh = mesh
        self.resumed = resumed
        self.ok = 0
        self.errors = 0
        self.errors_by_type: dict[str, int] = {}
        self.max_tokens_clipped = 0   # records whose max_tokens the context clipped
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prompt_tokens_cached = 0     # found in the prefix cache, not computed
        self.preemptions = 0              # sequences that lost their KV blocks and started over
        self.peak_running = 0             # most sequences in world rank 0's replica at once (its KV cache)
        self.ttft = Reservoir(reservoir_size, seed)
        self.per_token = Reservoir(reservoir_size, seed + 1)
        self.t_start = time.monotonic()
        self.t_end: float | None = None
        self.cpu_start, self.cpu_end = time.process_time(), None   # of world rank 0 (coordinator + its replica)
        # where this run's records are when it ends (set by the coordinator)
        self.restored = 0       # finished by an earlier run, journaled, written by this one
        self.in_output = 0      # records in the output file
        self.journaled = 0      # finished records still waiting in the journal for a gap in the output
        self.retried = 0        # --retry-errors: error records of the output computed again
        self.duplicate_ids = 0  # records read this run whose id an earlier record has

    def start(self) -> None:
        self.t_start, self.cpu_start = time.monotonic(), time.process_time()
        self.t_end = self.cpu_end = None

    def finish(self) -> None:
        self.t_end, self.cpu_end = time.monotonic(), time.process_time()

    @property
    def records(self) -> int:
        return self.ok + self.errors

    def add(self, r: Result) -> None:
        if r.error is not None:
            self.errors += 1
            t = r.error.type
            self.errors_by_type[t] = self.errors_by_type.get(t, 0) + 1
            return
        self.ok += 1
        if r.max_tokens_clipped_to is not None:
            self.max_tokens_clipped += 1
        n = r.completion_tokens
        self.prompt_tokens += r.prompt_tokens
        self.prompt_tokens_cached += r.cached_tokens
        self.preemptions += r.preemptions
        self.completion_tokens += n
        if r.ttft is not None:
            self.ttft.add(float(r.ttft))
            if r.latency is not None and n >= 2:
                self.per_token.add((float(r.latency) - float(r.ttft)) / (n - 1))

    def to_dict(self) -> dict:
        end = self.t_end if self.t_end is not None else time.monotonic()
        wall = max(end - self.t_start, 0.0)
        rate = (lambda x: x / wall) if wall > 0 else (lambda x: None)
        return {
            "records": self.records,
            "ok": self.ok,
            "errors": self.errors,
            "errors_by_type": dict(sorted(self.errors_by_type.items())),
            "max_tokens_clipped": self.max_tokens_clipped,
            "resumed_records": self.resumed,
            "retried_errors": self.retried,
            "duplicate_ids": self.duplicate_ids,
            "restored_from_journal": self.restored,
            "in_output": self.in_output,
            "journaled": self.journaled,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens_cached": self.prompt_tokens_cached,
            "preemptions": self.preemptions,
            "peak_running_sequences": self.peak_running,
            "wall_time_s": wall,
            "rank0_cpu_s": (self.cpu_end if self.cpu_end is not None else time.process_time()) - self.cpu_start,
            "records_per_s": rate(self.records),
            "generated_tokens_per_s": rate(self.completion_tokens),
            "ttft_s": self.ttft.percentiles(),
            "per_token_latency_s": self.per_token.percentiles(),
            "latency_samples": {"ttft": {"seen": self.ttft.seen, "kept": len(self.ttft.values)},
                                "per_token": {"seen": self.per_token.seen,
                                              "kept": len(self.per_token.values)}},
            "mesh": self.mesh,
        }

    def write(self, path) -> None:
        """Write ``to_dict()`` as JSON to ``path`` atomically (temp file + fsync + rename)."""
        path = os.fspath(path)
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            apply_user_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
