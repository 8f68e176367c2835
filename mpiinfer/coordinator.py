"""World rank 0's loop: read inputs -> dispatch work -> collect results -> write outputs.

Owns: the resume rule (output is written in input order, so the number of complete output records is the
number of input records to skip), the bounded window of records in flight (``Source``), pull-based
dispatch to the other replica leaders (``Want`` / ``Work`` on the world communicator) and to its own engine,
collecting their ``Done`` results, and writing every result in input order (``OrderedWriter``) with the
summary and the progress report.  A record that fails to parse becomes an error result written here, never
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
from .messages import TAG, Done, Lockstep, Result, Stop, Want, Work

log = logging.getLogger("mpiinfer")


def _inputs(cfg: RunConfig, done: int):
    """All input records after the first ``done`` as one stream, with consecutive indices across files."""
    from .io.readers import open_input
    index = 0
    skip = done
    for path in cfg.inputs:
        last = index - 1
        # a single input skips cheaply inside its reader; with several, skipped records are counted
        inner_skip = skip if len(cfg.inputs) == 1 else 0
        for item in open_input(path, cfg.input_format, defaults=cfg.defaults, start_index=index, skip=inner_skip,
                               prompt_template=cfg.prompt_template, dataset=cfg.dataset):
            last = item.index
            if skip and not inner_skip:
                skip -= 1
                continue
            yield item
        if inner_skip:
            skip = 0
        index = last + 1


class Source:
    """The input stream with a bounded window: items taken but not yet written never exceed ``window``."""

    def __init__(self, items, window: int):
        self.items = items
        self.window = window
        self.in_flight = 0
        self.exhausted = False
        self.stopped = False

    def take(self, n: int) -> list:
        out = []
        while not self.exhausted and not self.stopped and len(out) < n and self.in_flight < self.window:
            item = next(self.items, None)
            if item is None:
                self.exhausted = True
                break
            out.append(item)
            self.in_flight += 1
        return out


class Progress:
    """Counts of this run and how they are shown: a tqdm bar on a terminal, a log line every ``every`` s
    otherwise (Slurm logs), nothing with ``quiet``."""

    def __init__(self, done_before: int, quiet: bool, every: float):
        from tqdm import tqdm
        self.done_before, self.quiet, self.every = done_before, quiet, every
        self.n = self.errors = self.tokens = 0
        self.show_bar = not quiet and sys.stderr.isatty()
        self.bar = tqdm(total=None, initial=done_before, unit="rec", disable=not self.show_bar, dynamic_ncols=True)
        self.t0 = self.last_log = time.perf_counter()

    def add(self, res: Result) -> None:
        self.n += 1
        self.tokens += len(res.token_ids)
        if res.error is not None:
            self.errors += 1
        self.bar.update(1)
        now = time.perf_counter()
        if not self.show_bar and not self.quiet and now - self.last_log > self.every:
            self.last_log = now
            log.info("%d records done (%d errors), %.1f generated tok/s", self.done_before + self.n, self.errors,
                     self.tokens / (now - self.t0))

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.bar.close()


class Coordinator:
    """World rank 0: feeds its own engine and the other replica leaders, writes every result in order."""

    def __init__(self, cfg: RunConfig, mesh, runner):
        from .engine.generate import Engine
        from .tokenizer import Tokenizer
        self.cfg, self.mesh, self.world = cfg, mesh, mesh.world_comm
        self.leaders = [mesh.layout.replica_leader(d) for d in range(1, mesh.dp)]
        self.tok = Tokenizer(cfg.model)
        self.engine = Engine(runner, self.tok, default_seed=cfg.seed)
        self.lock = mesh.wide_ep          # replicas step together
        self.wants = {r: 0 for r in self.leaders}
        self.stop_signal = []
        self.src = self.writer = self.summary = self.progress = None

    # ------------------------------------------------------------------ the job
    def run(self) -> int:
        cfg = self.cfg
        out_fmt, done, items = self._resume()
        if items is None:
            return 0
        self._open(out_fmt, done, items)
        old_term = signal.signal(signal.SIGTERM, self._on_term)
        try:
            self._loop()
        finally:
            signal.signal(signal.SIGTERM, old_term)
            self._close(failed=sys.exc_info()[0] is not None)
        p = self.progress
        if self.stop_signal:
            log.warning("stopped by signal %d: %d records are in %s; re-run the same command to resume",
                        self.stop_signal[0], self.writer.next_index, cfg.output)
            return 0
        dt = p.seconds
        log.info("done: %d records (%d errors) in %.1fs, %d tokens generated (%.1f tok/s) -> %s",
                 p.n, p.errors, dt, p.tokens, p.tokens / max(dt, 1e-9), cfg.output)
        return 0

    def _on_term(self, signum, frame) -> None:
        self.stop_signal.append(signum)
        self.src.stopped = True

    # ------------------------------------------------------------------ read
    def _resume(self):
        """(output format, records already written, the input records still to do); the records are None when
        there is nothing to do (the leaders have then been told to stop)."""
        from .io.readers import detect_format
        from .io.writers import default_output_format, recover_output
        cfg = self.cfg
        in_fmt = cfg.input_format or (detect_format(cfg.inputs[0]) if cfg.inputs[0] != "-" else "jsonl")
        out_fmt = cfg.output_format or default_output_format(in_fmt, cfg.output if cfg.output != "-" else None)
        if cfg.overwrite and cfg.output != "-" and os.path.exists(cfg.output):
            os.remove(cfg.output)
        done = recover_output(cfg.output, out_fmt)
        items = _inputs(cfg, done)
        first = next(items, None)
        if first is None:
            if done:
                log.info("nothing to do: all %d input records are already in %s", done, cfg.output)
            else:
                log.info("the input has no records")
            self._release_leaders(abandon=False)
            return out_fmt, done, None
        if first.index != done:
            raise ConfigError(f"{cfg.output} already has {done} records but the input has only {first.index}: "
                              "it belongs to another input; pass --overwrite to start over")
        if done:
            log.info("resuming: %d records already in %s", done, cfg.output)
        return out_fmt, done, itertools.chain([first], items)

    def _open(self, out_fmt: str, done: int, items) -> None:
        from .io.summary import Summary
        from .io.writers import OrderedWriter, open_output
        cfg = self.cfg
        created = int(os.path.getmtime(cfg.inputs[0])) if cfg.inputs[0] != "-" else None
        inner = open_output(cfg.output, out_fmt, flush_every_records=cfg.flush_every, flush_every_seconds=5.0,
                            model=os.path.basename(os.path.normpath(cfg.model)), created=created,
                            token_str=lambda t: self.tok.decode([t], skip_special_tokens=False))
        self.summary = Summary(mesh=self.mesh.describe(), resumed=done)
        # window: enough to keep every replica's batch full plus its prefetch, bounded for memory
        window = max(256, 4 * self.engine.max_batch * self.mesh.dp)
        self.src = Source(items, window)
        self.progress = Progress(done, cfg.quiet, cfg.log_every)
        self.writer = OrderedWriter(inner, start_index=done, max_pending=window + 16)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        engine, src = self.engine, self.src
        while True:
            self._collect(block=False)
            self._dispatch()
            if self.lock:
                code = Lockstep.STOP if src.stopped else (
                    Lockstep.STEP if engine.has_work() or not src.exhausted or src.in_flight > 0 else Lockstep.IDLE)
                if self.mesh.dp_comm.allreduce(int(code), op=self._mpi().MAX) != Lockstep.STEP:
                    return
                self._write_all(engine.step())
                continue
            if src.stopped:
                return
            if engine.has_work():
                self._write_all(engine.step())
            elif src.in_flight > 0:
                self._collect(block=True)   # the rest is on other replicas: wait for a leader's message
            elif src.exhausted:
                return
            # else: everything taken so far failed parsing; go on reading

    @staticmethod
    def _mpi():
        from mpi4py import MPI
        return MPI

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self) -> None:
        """Hand records to the leaders that asked for work, then to the local engine's free slots.  Records
        that failed to parse are written at once."""
        for r in self.leaders:
            if self.wants[r] > 0:
                items = self.src.take(self.wants[r])
                if items:
                    self.wants[r] -= len(items)
                    requests = self._requests(items)
                    if requests:
                        self.world.send(Work(requests), dest=r, tag=TAG)
                    # a parse error consumed a slot this leader asked for: it still has that room
                    self.wants[r] += len(items) - len(requests)
        for item in self._requests(self.src.take(self.engine.free_capacity())):
            err = self.engine.add(item)
            if err is not None:
                self._write(err)

    def _requests(self, items: list) -> list:
        """The requests among ``items``; the error results among them are written here."""
        requests = []
        for item in items:
            if isinstance(item, Result):
                self._write(item)
            else:
                requests.append(item)
        return requests

    # ------------------------------------------------------------------ collect
    def _collect(self, block: bool) -> None:
        """Take the leaders' messages: work requests (``Want``) and finished results (``Done``)."""
        MPI = self._mpi()
        status = MPI.Status()
        while self.world.iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status) or block:
            msg = self.world.recv(source=MPI.ANY_SOURCE, tag=TAG, status=status)
            block = False
            if isinstance(msg, Want):
                self.wants[status.Get_source()] += msg.n
            elif isinstance(msg, Done):
                self._write_all(msg.results)

    # ------------------------------------------------------------------ write
    def _write_all(self, results: list) -> None:
        for res in results:
            self._write(res)

    def _write(self, res: Result) -> None:
        self.writer.write(res)
        self.summary.add(res)
        self.src.in_flight -= 1
        self.progress.add(res)
        cfg = self.cfg
        if res.error is not None and cfg.max_errors is not None and self.progress.errors > cfg.max_errors:
            raise RuntimeError(f"more than --max-errors {cfg.max_errors} records failed "
                               f"(last: {res.error.type}: {res.error.message})")

    def _release_leaders(self, abandon: bool) -> None:
        if self.lock:    # the leaders are in the lockstep loop: end it with them
            self.mesh.dp_comm.allreduce(int(Lockstep.IDLE), op=self._mpi().MAX)
        else:
            for r in self.leaders:
                self.world.send(Stop(abandon=abandon), dest=r, tag=TAG)

    def _close(self, failed: bool) -> None:
        from .io.summary import summary_path
        abandon = bool(self.stop_signal) or failed
        # on a failure the leaders are not released: job.run prints the error and aborts every rank, and a
        # leader that finalized meanwhile could race the abort and swallow the message.  In lockstep the
        # leaders left the loop with the coordinator's last code.
        if not self.lock and not failed:
            self._release_leaders(abandon)
        self.progress.close()
        if abandon:
            try:
                self.writer.close()     # flushes what is in order; results after a gap are dropped (redone on resume)
            except RuntimeError:
                pass
        else:
            self.writer.close()
        self.summary.finish()
        sp = summary_path(self.cfg.output)
        if sp:
            self.summary.write(sp)
