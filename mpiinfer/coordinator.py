"""World rank 0's loop: read inputs -> dispatch work -> collect results -> write outputs.

Owns: the bounded window of records in flight (``Source``), pull-based dispatch to the other replica
leaders (``Want`` / ``Work`` on the world communicator) and to its own engine, collecting their ``Done``
results, and writing every result: first to the completion journal (``io.resume.Journal``: on the OS at
once), then in input order to the output (``OrderedWriter``; results waiting for a gap stay in memory up to
``MEM_PENDING``, beyond that only in the journal), with the summary and the progress report.  What to
continue was decided before the model loaded (``io.resume.plan_resume``): the records already in the
output are skipped, journaled results are written without being computed again.  A record that fails to parse becomes an error result written here, never
sent anywhere.  With wide EP the replicas step together: one MAX-allreduce of a ``Lockstep`` code over
``mesh.dp_comm`` per step.  SIGTERM stops reading; what is in order is flushed and the leaders told to stop.
"""
from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import time

from .config import ConfigError, RunConfig
from .io.resume import Journal, ResumePlan, Spilled, journal_path
from .messages import TAG, Bye, Done, Drain, Drained, ErrorInfo, Lockstep, Outbox, Result, Stop, Want, Work
from .replica import finished, wanted

log = logging.getLogger("mpiinfer")

class MaxErrorsExceeded(Exception):
    """More records failed than --max-errors allows (exit code 3)."""


BYE_TIMEOUT_S = 60.0    # how long the coordinator waits for every leader's last message
MEM_PENDING = 4096      # results waiting for a gap in the output kept in memory; more wait in the journal only


def output_format(cfg: RunConfig) -> str:
    from .io.readers import detect_format
    from .io.writers import default_output_format
    in_fmt = cfg.input_format or (detect_format(cfg.inputs[0]) if cfg.inputs[0] != "-" else "jsonl")
    return cfg.output_format or default_output_format(in_fmt, cfg.output if cfg.output != "-" else None)


def read_inputs(cfg: RunConfig, done: int):
    """All input records after the first ``done`` as one stream, with consecutive indices across files."""
    from .io.readers import open_input
    index = 0
    skip = done
    for path in cfg.inputs:
        last = index - 1
        # a single input skips cheaply inside its reader; with several, skipped records are counted
        inner_skip = skip if len(cfg.inputs) == 1 else 0
        for item in open_input(path, cfg.input_format, defaults=cfg.defaults, start_index=index, skip=inner_skip,
                               prompt_template=cfg.prompt_template, dataset=cfg.dataset,
                               served_model_names=cfg.model_names()):
            last = item.index
            if skip and not inner_skip:
                skip -= 1
                continue
            yield item
        if inner_skip:
            skip = 0
        index = last + 1


class IdHashes:
    """A set of 64-bit id hashes in 8 bytes each: sorted numpy arrays of doubling sizes (a log-structured merge:
    adding is amortised O(log n) per hash, a lookup one binary search per level).  A Python set would take ~70
    bytes per record: 700 MB on rank 0 for 10 million records."""

    def __init__(self, hashes=()):
        import numpy as np
        self.np = np
        self.levels: list = []
        if len(hashes):
            self.add(np.unique(np.asarray(hashes, dtype=np.int64)))

    def __len__(self) -> int:
        return sum(len(a) for a in self.levels if a is not None)

    def contains(self, h):
        """Which of the hashes ``h`` (an int64 array) are in the set."""
        np = self.np
        found = np.zeros(len(h), dtype=bool)
        for a in self.levels:
            if a is not None and len(a):
                i = np.minimum(np.searchsorted(a, h), len(a) - 1)
                found |= a[i] == h
        return found

    def add(self, new) -> None:
        """Add ``new``: sorted, distinct, none of them in the set yet."""
        np = self.np
        for k, a in enumerate(self.levels):
            if a is None:
                self.levels[k] = new
                return
            new = np.sort(np.concatenate([a, new]), kind="mergesort")
            self.levels[k] = None
        self.levels.append(new)


class DuplicateIds:
    """Notices input records whose id (OpenAI output: custom_id) an earlier record has.  They are computed and
    written like any other, each at its own position (the output is in input order, resume and the journal go
    by position), so nothing mixes; the first few are named in the log, all are counted in the summary.  The
    records pass through in chunks of ``CHUNK`` (read ahead: one vectorised check per chunk)."""
    NAMED = 3
    CHUNK = 128

    def __init__(self, out_fmt: str, seen=()):
        self.out_fmt, self.seen, self.count = out_fmt, IdHashes(seen), 0

    def check(self, items):
        import itertools

        import numpy as np

        from .io.resume import id_hash, written_key
        items = iter(items)
        while chunk := list(itertools.islice(items, self.CHUNK)):
            # an unparsable line has no id of its own
            named = [(k, item) for k, item in enumerate(chunk) if not isinstance(item, Result)]
            if named:
                keys = [written_key(item, self.out_fmt) for _, item in named]
                h = np.fromiter((id_hash(k) for k in keys), dtype=np.int64, count=len(keys))
                _, first = np.unique(h, return_index=True)
                repeat = self.seen.contains(h)
                within = np.ones(len(h), dtype=bool)
                within[first] = False                      # the first of equal hashes in this chunk is new
                repeat |= within
                self.seen.add(np.sort(h[~repeat]))
                for j in np.flatnonzero(repeat):
                    self._report(named[j][1], keys[j])
            yield from chunk

    def _report(self, item, key) -> None:
        self.count += 1
        if self.count <= self.NAMED:
            log.warning("input record %d has the id %r of an earlier record: both are computed and written, each "
                        "at its own position%s", item.index + 1, key,
                        "; further repeats are counted in the summary (duplicate_ids)"
                        if self.count == self.NAMED else "")


PREFIX_KEY_CHARS = 256      # prefix-affine routing: records whose first 256 characters agree share a replica
PREFIX_KEY_TOKENS = 64      # (token-id records: their first 64 ids)


def prefix_key(item) -> int | None:
    """What decides which replica a record goes to under prefix-affine routing: a hash of the start of its
    prompt (messages: roles and contents in order; token ids: the first ones), or None (an error result)."""
    if isinstance(item, Result):
        return None
    if item.inputs is not None:                   # an embedding request: its first input
        x = item.inputs[0]
        return hash(tuple(x[:PREFIX_KEY_TOKENS])) if isinstance(x, list) else hash(x[:PREFIX_KEY_CHARS])
    if item.prompt_token_ids is not None:
        return hash(tuple(item.prompt_token_ids[:PREFIX_KEY_TOKENS]))
    if item.messages is not None:
        parts, n = [], 0
        for m in item.messages:
            t = f"{m.get('role')}\x00{m.get('content')}\x01"
            parts.append(t)
            n += len(t)
            if n >= PREFIX_KEY_CHARS:
                break
        return hash("".join(parts)[:PREFIX_KEY_CHARS])
    return hash((item.prompt or "")[:PREFIX_KEY_CHARS])


def output_refusal(item, out_fmt: str) -> str | None:
    """Why a request's result has no place in this job's output format (it becomes an error record), or None."""
    sp = item.sampling
    if out_fmt != "openai" and "score_pairs" in item.extra:
        return f"/v1/score: written to OpenAI outputs only (this job writes {out_fmt})"
    if out_fmt != "openai" and sp.echo:
        return f"echo: written to OpenAI outputs only (this job writes {out_fmt})"
    if out_fmt == "openai" and sp.prompt_logprobs and not sp.echo and sp.vllm_prompt_logprobs < 0:
        return ("prompt_logprobs: written to JSONL and HDF5 outputs (prompt_logprobs, prompt_logprob_sum, "
                "prompt_perplexity); OpenAI completions take echo with logprobs")
    if out_fmt == "hdf5" and sp.top_logprobs:
        return ("top_logprobs: HDF5 output holds the chosen tokens' logprobs only; write JSONL or OpenAI output for "
                "the alternatives")
    if out_fmt == "hdf5" and item.inputs is not None and len(item.inputs) > 1:
        return (f"{len(item.inputs)} inputs: HDF5 output holds one embedding per record; write JSONL or OpenAI "
                "output for several")
    if out_fmt == "hdf5" and sp.n > 1:
        return f"n={sp.n}: HDF5 output holds one sample per record; write JSONL or OpenAI output for n > 1"
    return None


class Source:
    """The input stream with a bounded window: items taken but not yet written never exceed ``window``.

    ``affine``: prefix-affine routing.  Up to ``lookahead`` records are read ahead; a replica asking for work
    gets, oldest first, the records whose prefix key (``prefix_key``) is already its own; when that is not
    enough, it takes the oldest key no replica has yet, one at a time (keys spread as the replicas ask), else,
    so that no replica idles, it joins the key with the most records waiting (a busy prefix ends up on several
    replicas, each computing it once).  Records
    that share a long prefix (a system prompt, few-shot examples, one document) thus meet in one replica's
    prefix cache instead of being computed once per replica.  The output order and resume are unchanged:
    results are written by input position whatever order they finish in."""

    def __init__(self, items, window: int, affine: bool = False, lookahead: int = 0):
        self.items = items
        self.window = window
        self.in_flight = 0
        self.stopped = False
        self.affine, self.lookahead = affine, lookahead
        self.ahead: list = []              # read, not yet handed out (affine), in input order
        self.owner: dict = {}              # prefix key -> the replicas its records go to
        self._done = False                 # the stream has ended

    @property
    def exhausted(self) -> bool:
        return self._done and not self.ahead

    def _next(self):
        if self._done:
            return None
        item = next(self.items, None)
        if item is None:
            self._done = True
        return item

    def take(self, n: int, replica: int = 0) -> list:
        if self.stopped:
            return []
        n = min(n, self.window - self.in_flight)
        if n <= 0:
            return []
        if not self.affine:
            out = []
            while len(out) < n and (item := self._next()) is not None:
                out.append(item)
            self.in_flight += len(out)
            return out
        while len(self.ahead) < self.lookahead and (item := self._next()) is not None:
            self.ahead.append((prefix_key(item), item))
        # one pass over the records read ahead (oldest first), not one per key claimed: its own keys' records and
        # error results, and where those are not enough, its positions by key for the keys it may claim
        pick, others = [], {}
        for j, (key, _) in enumerate(self.ahead):
            if key is None or replica in self.owner.get(key, ()):
                pick.append(j)
                if len(pick) >= n:                       # enough of its own: ``others`` is not needed
                    break
            else:
                others.setdefault(key, []).append(j)
        if len(pick) < n:
            # not enough of its own: it takes the oldest keys nobody has, one at a time, else joins the keys with
            # the most records waiting (a busy prefix ends up on several replicas, each computing it once), so
            # that no replica idles while records wait
            for key, js in others.items():               # in the order of their oldest record
                if len(pick) >= n:
                    break
                if key not in self.owner:
                    self.owner[key] = {replica}
                    pick += js[:n - len(pick)]
            if len(pick) < n:                            # every key has an owner now
                busiest = sorted((k for k in others if replica not in self.owner[k]), key=lambda k: -len(others[k]))
                for key in busiest:                      # ties: the older key first (sorted is stable)
                    if len(pick) >= n:
                        break
                    self.owner[key].add(replica)
                    pick += others[key][:n - len(pick)]
        taken = set(pick)
        out = [self.ahead[j][1] for j in sorted(taken)]
        if taken:
            self.ahead = [x for j, x in enumerate(self.ahead) if j not in taken]
        self.in_flight += len(out)
        return out


def count_records(cfg: RunConfig):
    """An upper bound of the input's records for the progress total (lines of JSONL files; None otherwise)."""
    from .io.readers import count_lines, detect_format
    total = 0
    for p in cfg.inputs:
        if p == "-" or (cfg.input_format or detect_format(p)) not in ("jsonl", "openai"):
            return None
        total += count_lines(p)
    return total


class Progress:
    """Counts of this run and how they are shown: a tqdm bar on a terminal (with the input's size as total when
    it can be counted cheaply, hence an ETA), a log line every ``every`` s otherwise (Slurm logs: the rate over
    the last interval, and the time left at that rate), nothing with ``quiet``."""

    def __init__(self, done_before: int, quiet: bool, every: float, total=None):
        from tqdm import tqdm
        self.done_before, self.quiet, self.every, self.total = done_before, quiet, every, total
        self.n = self.errors = self.tokens = 0
        self.show_bar = not quiet and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=done_before, unit="rec", disable=not self.show_bar, dynamic_ncols=True)
        self.t0 = self.last_log = time.perf_counter()
        self._last = (0, 0)               # records, tokens at the last log line

    def add(self, res: Result) -> None:
        self.n += 1
        self.tokens += res.completion_tokens
        if res.error is not None:
            self.errors += 1
        self.bar.update(1)
        now = time.perf_counter()
        if not self.show_bar and not self.quiet and now - self.last_log > self.every:
            dt, (n0, k0) = now - self.last_log, self._last
            self.last_log, self._last = now, (self.n, self.tokens)
            rate = (self.n - n0) / dt
            done = self.done_before + self.n
            left = ""
            if self.total and rate > 0 and self.total > done:
                s = int((self.total - done) / rate)
                left = f", about {s // 3600}h{s % 3600 // 60:02d}m left"
            log.info("%d%s records done (%d errors); last %.0f s: %.1f records/s, %.1f generated tok/s%s", done,
                     f"/{self.total}" if self.total else "", self.errors, dt, rate, (self.tokens - k0) / dt, left)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.bar.close()


class Coordinator:
    """World rank 0: feeds its own engine and the other replica leaders, writes every result in order."""

    def __init__(self, cfg: RunConfig, mesh, runner, plan: ResumePlan, signals=None):
        from .replica import make_engine
        self.cfg, self.mesh, self.world, self.plan = cfg, mesh, mesh.world_comm, plan
        self.outbox = Outbox(self.world)     # to the leaders: never a blocking send (see Outbox)
        self.leaders = [mesh.layout.replica_leader(d) for d in range(1, mesh.dp)]
        self.engine, self.token_str = make_engine(cfg, runner)
        self.lock = mesh.wide_ep          # replicas step together
        self.wants = {r: 0 for r in self.leaders}
        self.last_results = 0             # sequences the local engine's last step finished (replica.wanted)
        self.signals = signals            # job.Signals: stop requests (None: only the input's end stops)
        self.stop_signal = None           # the signal that stopped this run
        self.drain_until = 0.0            # while stopping: finish running sequences until then
        self.drained: set = set()         # leaders with nothing running any more
        self.lock_draining = False        # wide EP: the replicas drain together (Lockstep.DRAIN_*)
        self.byes: set = set()            # leaders that sent their last message
        self.src = self.writer = self.summary = self.progress = self.journal = None
        self.spilled = 0                  # waiting results that are only in the journal
        self.journaled = 0                # results journaled (restored ones included)
        self.duplicates = DuplicateIds(plan.out_fmt, plan.seen_ids)
        self.out_fmt = plan.out_fmt                # what a record may ask for depends on it (output_refusal)
        self._flushes = 0                 # output flushes seen (the journal is compacted after each)
        self._unsynced, self._synced_at = 0, time.monotonic()

    # ------------------------------------------------------------------ the job
    def run(self) -> int:
        cfg = self.cfg
        items = self._resume()
        if items is None:
            return 0
        self._open(items)
        try:
            self._loop()
        finally:
            self._close(failed=sys.exc_info()[0] is not None)
        p = self.progress
        if self.stop_signal is not None:
            s = self.summary
            log.warning("stopped by %s: %d records are in %s%s; re-run the same command to resume",
                        signal.Signals(self.stop_signal).name, s.in_output, cfg.output,
                        f" and {s.journaled} more finished ones in its journal" if s.journaled else "")
            return 130 if self.stop_signal == signal.SIGINT else 0
        dt = p.seconds
        log.info("done: %d records (%d errors) in %.1fs, %d tokens generated (%.1f tok/s) -> %s",
                 p.n, p.errors, dt, p.tokens, p.tokens / max(dt, 1e-9), cfg.output)
        return 0

    # ------------------------------------------------------------------ read
    def _resume(self):
        """The input records still to compute, or None when there is nothing to do (the leaders have then been
        told to stop)."""
        cfg, plan = self.cfg, self.plan
        done, restored = plan.done, plan.restored
        if not plan.todo and not restored:
            if plan.retrying:
                log.info("nothing to retry: none of the %d records in %s is an error", done, cfg.output)
            else:
                log.info("nothing to do: all %d input records are already in %s", done, cfg.output)
            self._release_leaders(abandon=False)
            return None
        if plan.retrying:       # the whole input is read again: the records to compute are among all of them
            items = (it for it in self.duplicates.check(read_inputs(cfg, 0))
                     if plan.computes(it.index) and it.index not in restored)
        else:
            items = (it for it in self.duplicates.check(read_inputs(cfg, done)) if it.index not in restored)
        first = next(items, None)
        if first is None and not restored:
            if not done:                         # stdin (files were checked before the model loaded)
                raise ConfigError("the input has no records")
            log.info("nothing to do: all %d input records are already in %s", done, cfg.output)
            self._release_leaders(abandon=False)
            return None
        if plan.retrying:
            log.info("retrying the %d error records of %s (its %d good records are kept as they are)%s",
                     len(plan.retry), cfg.output, plan.kept,
                     f", {len(restored)} finished ones in its journal" if restored else "")
        elif done or restored:
            log.info("resuming: %d records already in %s%s", done, cfg.output,
                     f", {len(restored)} finished ones in its journal" if restored else "")
        return itertools.chain([first], items) if first is not None else iter(())

    def _open(self, items) -> None:
        from .io.resume import iter_output, retry_path
        from .io.summary import Summary
        from .io.writers import OrderedWriter, open_output
        cfg, plan = self.cfg, self.plan
        if cfg.output != "-":
            self.journal = Journal(journal_path(cfg.output), [plan.restored[i] for i in sorted(plan.restored)])
            self.journaled = len(plan.restored)
        created = plan.manifest["created"] if plan.manifest else None
        # --retry-errors writes a new output beside the old one, which it replaces only once complete
        path = retry_path(cfg.output) if plan.retrying else cfg.output
        inner = open_output(path, plan.out_fmt, flush_every_records=cfg.flush_every, flush_every_seconds=5.0,
                            model=cfg.output_model_name,
                            created=created, token_str=self.token_str)
        kept = None
        if plan.retrying:
            kept = ((i, entry) for i, (_, is_error, entry) in enumerate(iter_output(cfg.output, plan.out_fmt,
                                                                                    plan.done)) if not is_error)
        self.summary = Summary(mesh=self.mesh.describe(), resumed=plan.kept)
        self.summary.retried = len(plan.retry or ())
        # window: records taken and not yet finished, enough to keep every replica's batch full plus its prefetch
        window = max(256, 4 * self.engine.max_batch * self.mesh.dp)
        affine = cfg.routing == "prefix" and self.mesh.dp > 1
        self.src = Source(items, window, affine=affine, lookahead=window)
        self.progress = Progress(plan.kept, cfg.quiet, cfg.log_every, count_records(cfg))
        # finished results wait for their gap without bound (beyond MEM_PENDING in the journal only)
        self.writer = OrderedWriter(inner, start_index=0 if plan.retrying else plan.done, max_pending=1 << 62,
                                    resolve=self._resolve, kept=kept)
        for i in sorted(plan.restored):
            self.writer.write(plan.restored[i])
        self.summary.restored = len(plan.restored)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        engine, src = self.engine, self.src
        while True:
            self._check_signals()
            self._collect(block=False)
            self._dispatch()
            # Work just posted to a leader: a moment for the handshake before this rank computes, where the
            # transport needs the sender to move the data (an idle leader would otherwise wait for our step)
            self.outbox.flush(timeout=0.003, keep=False)
            if self.lock:
                if not src.stopped:
                    code = Lockstep.mine(engine.has_work() or not src.exhausted or src.in_flight > 0, False)
                elif self._draining_lockstep():
                    code = Lockstep.mine(engine.has_work(), True)
                else:
                    code = Lockstep.STOP
                result = self.mesh.dp_comm.allreduce(int(code), op=self._mpi().MAX)
                step, self.lock_draining = Lockstep.go_on(result, self.lock_draining)
                if not step:
                    return
                self._step()
                continue
            if src.stopped:
                if not self._draining():
                    return
                if engine.has_work():
                    self._step()
                else:
                    self._collect(block=True, until=self.drain_until)
                continue
            if engine.has_work():
                self._step()
            elif src.in_flight > 0:
                self._collect(block=True)   # the rest is on other replicas: wait for a leader's message
            elif src.exhausted:
                return
            # else: everything taken so far failed parsing; go on reading

    # ------------------------------------------------------------------ stopping
    def _check_signals(self) -> None:
        """On the first stop request: read no more, tell the leaders, and drain (SIGTERM / SIGUSR1: running
        sequences may finish for --drain-seconds; SIGINT: stop now)."""
        if self.stop_signal is not None or self.signals is None or not self.signals.received:
            return
        self.stop_signal = self.signals.received[0]
        self.src.stopped = True
        drain = 0.0 if self.signals.interrupted else self.cfg.drain_seconds
        self.drain_until = time.monotonic() + drain
        if drain > 0:
            log.warning("%s: taking no new work; sequences running now may finish for up to %.0f s",
                        signal.Signals(self.stop_signal).name, drain)
            self.engine.drop_waiting()             # not started: computed on resume
            for r in [] if self.lock else self.leaders:     # in lockstep the leaders learn it from the code
                self.outbox.send(Drain(), r)
        else:
            self.drained = set(self.leaders)

    def _draining_lockstep(self) -> bool:
        """Wide EP: still draining (before the deadline, no Ctrl-C); whether anything runs is the reduced code's."""
        return not (self.signals is not None and self.signals.interrupted) and time.monotonic() < self.drain_until

    def _draining(self) -> bool:
        """Still stopping: before the drain deadline, with a sequence running here or on a leader."""
        if self.signals is not None and self.signals.interrupted:
            return False                           # Ctrl-C during a drain: stop now
        if time.monotonic() >= self.drain_until:
            return False
        return self.engine.has_work() or len(self.drained) < len(self.leaders)

    @staticmethod
    def _mpi():
        from mpi4py import MPI
        return MPI

    def _step(self) -> None:
        """One step of the local engine; its results written."""
        results = self.engine.step()
        self.last_results = finished(results)
        self._write_all(results)

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        """Hand records to the leaders that asked for work, then to the local engine as ``replica.wanted`` allows
        (its free slots and a short queue).  Records that failed to parse are written at once."""
        for r in self.leaders:
            if self.wants[r] > 0:
                items = self.src.take(self.wants[r], replica=r)
                if items:
                    self.wants[r] -= len(items)
                    requests = self._requests(items)
                    if requests:
                        self.outbox.send(Work(requests), r)
                    # a parse error consumed a slot this leader asked for: it still has that room
                    self.wants[r] += len(items) - len(requests)
        for item in self._requests(self.src.take(wanted(self.engine, last=self.last_results))):
            err = self.engine.add(item)
            if err is not None:
                self._write(err)

    def _requests(self, items: list) -> list:
        """The requests among ``items``; the error results among them are written here."""
        requests = []
        for item in items:
            if isinstance(item, Result):
                self._write(item)
            elif (why := output_refusal(item, self.out_fmt)) is not None:
                self._write(Result(index=item.index, id=item.id, extra=item.extra,
                                   error=ErrorInfo("invalid_request", why)))
            else:
                requests.append(item)
        return requests

    # ------------------------------------------------------------------ collect
    def _collect(self, block: bool, until: float | None = None, wake_on_signal: bool = True) -> None:
        """Take the leaders' messages: work requests (``Want``), finished results (``Done``), ``Drained``,
        ``Bye``.  ``block``: wait for one first (polling, so that a new stop request is seen at once unless
        ``wake_on_signal`` is off; ``until``: a deadline)."""
        MPI = self._mpi()
        status = MPI.Status()
        world = self.world
        self.outbox.poll()
        while block and not world.iprobe(source=MPI.ANY_SOURCE, tag=TAG):
            self.outbox.poll()
            new_signal = self.signals is not None and self.signals.received and self.stop_signal is None
            if (wake_on_signal and new_signal) or (until is not None and time.monotonic() >= until):
                return
            time.sleep(2e-4)
        while world.iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status):
            msg = world.recv(source=status.Get_source(), tag=TAG)
            if isinstance(msg, Want):
                self.wants[status.Get_source()] += msg.n
            elif isinstance(msg, Done):
                self._write_all(msg.results)
            elif isinstance(msg, Drained):
                self.drained.add(status.Get_source())
            elif isinstance(msg, Bye):
                self.byes.add(status.Get_source())

    # ------------------------------------------------------------------ write
    def _write_all(self, results: list) -> None:
        """Journal ``results`` with one write (on the OS before anything else happens to them), hand each to
        the ordered writer, then keep the journal short and durable and check --max-errors (after the whole
        batch: a journal rewrite in its middle would drop the rest of it from the journal)."""
        if not results:
            return
        places = self.journal.append_many(results) if self.journal is not None else [None] * len(results)
        self.journaled += len(results)
        for res, where in zip(results, places):
            entry = res
            if where is not None and self.writer.pending >= MEM_PENDING and res.index != self.writer.next_index:
                entry = where
                self.spilled += 1
            self.writer.write(entry)
            self.summary.add(res)
            self.progress.add(res)
        self.src.in_flight -= len(results)
        self._after_write(len(results))
        cfg = self.cfg
        if cfg.max_errors is not None and self.progress.errors > cfg.max_errors:
            last = next(r.error for r in reversed(results) if r.error is not None)
            raise MaxErrorsExceeded(f"more than --max-errors {cfg.max_errors} records failed (last: "
                                    f"{last.type}: {last.message}); the records before the stop are in "
                                    f"{cfg.output}")

    def _write(self, res: Result) -> None:
        self._write_all([res])

    def _resolve(self, entry) -> Result:
        if isinstance(entry, Spilled):
            self.spilled -= 1
            return self.journal.read(entry)
        return entry

    def _after_write(self, n: int) -> None:
        """Keep the journal durable and short: after an output flush it is rewritten to just the results still
        waiting (when none waits in the journal only, and it has at least doubled since it was last rewritten:
        the rewrites cost O(1) per byte journaled even behind a slow record); else it is fsynced every
        --flush-every results / 5 s."""
        if self.journal is None:
            return
        if self.writer.inner.flushes != self._flushes and not self.plan.retrying:
            # (while retrying, the new output is not the output until it is complete: the journal keeps all)
            self.writer.flush()            # records written after that flush are durable too
            self._flushes = self.writer.inner.flushes
            j = self.journal
            if not self.spilled and (not self.writer.pending or j.size > 2 * j.rewritten_size + (1 << 20)):
                j.rewrite(self.writer.waiting())
                self._unsynced, self._synced_at = 0, time.monotonic()
                return
        self._unsynced += n
        if self._unsynced >= self.cfg.flush_every or time.monotonic() - self._synced_at >= 5.0:
            self.journal.sync()
            self._unsynced, self._synced_at = 0, time.monotonic()

    def _release_leaders(self, abandon: bool, lockstep_done: bool = False) -> None:
        """Tell the leaders to stop (``lockstep_done``: they left the lockstep loop with the last code), then
        take every message they still send until each one's ``Bye`` (bounded): nothing is left unreceived
        when MPI finalizes (MPICH under ``srun --mpi=pmi2`` can hang in MPI_Finalize otherwise), and results
        that finished meanwhile are written, or journaled."""
        if self.lock and not lockstep_done:   # the leaders are in the lockstep loop: end it with them
            self.mesh.dp_comm.allreduce(int(Lockstep.STOP), op=self._mpi().MAX)
        elif not self.lock:
            for r in self.leaders:
                self.outbox.send(Stop(abandon=abandon), r)
        deadline = time.monotonic() + BYE_TIMEOUT_S
        while not self.byes >= set(self.leaders) and time.monotonic() < deadline:
            self._collect(block=True, until=deadline, wake_on_signal=False)
        left = set(self.leaders) - self.byes
        if left:
            log.warning("replica leaders %s did not say goodbye within %.0f s", sorted(left), BYE_TIMEOUT_S)
        # every leader received all it was sent before its Bye (in lockstep a leader that stopped may not have
        # taken the last Work: short); bounded all the same
        if not self.outbox.flush(timeout=2.0 if self.lock else max(1.0, deadline - time.monotonic())):
            log.warning("%d messages to replica leaders were not received", len(self.outbox.pending))

    def _close(self, failed: bool) -> None:
        abandon = self.stop_signal is not None or failed
        # on a failure the leaders are not released: job.run prints the error and aborts every rank, and a
        # leader that finalized meanwhile could race the abort and swallow the message.  In lockstep the
        # leaders left the loop with the coordinator's last code.
        if not failed:
            self._release_leaders(abandon, lockstep_done=True)
        self.progress.close()
        if self.plan.retrying:
            self._close_retry(abandon)
            return self._write_summary()
        if abandon:
            try:
                self.writer.close()     # flushes what is in order; results after a gap stay in the journal
            except RuntimeError:
                pass
        else:
            self.writer.close()
        waiting = self.writer.pending
        if self.journal is not None:
            if not waiting:
                self.journal.close(remove=True)
            else:
                if not self.spilled:
                    self.journal.rewrite(self.writer.waiting())
                self.journal.close()
        self.summary.in_output = self.writer.next_index
        self.summary.journaled = waiting
        self._write_summary()

    def _close_retry(self, abandon: bool) -> None:
        """--retry-errors: a complete new output replaces the output (then the journal goes); a stopped one is
        removed and every result this retry finished stays in the journal for the next one."""
        from .io.files import fsync_dir
        from .io.resume import retry_path
        cfg, tmp = self.cfg, retry_path(self.cfg.output)
        try:
            self.writer.close()
        except RuntimeError:
            abandon = True
        if not abandon:
            os.replace(tmp, cfg.output)
            fsync_dir(cfg.output)
            self.journal.close(remove=True)
            self.summary.in_output, self.summary.journaled = self.writer.next_index, 0
            return
        os.remove(tmp)
        self.journal.close()
        self.summary.in_output, self.summary.journaled = self.plan.done, self.journaled

    def _write_summary(self) -> None:
        from .io.summary import summary_path
        self.summary.duplicate_ids = self.duplicates.count
        self.summary.peak_running = getattr(self.engine, "peak_running", 0)
        self.summary.finish()
        sp = summary_path(self.cfg.output)
        if sp:
            self.summary.write(sp)
