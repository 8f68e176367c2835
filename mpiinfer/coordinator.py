"""The job: read inputs -> engine -> write outputs, on every rank of the world.

Owns: building the ``Mesh`` from the world, routing each rank to its role
(the replica leader, which on world rank 0 is also the coordinator that alone
touches input and output files; followers that execute the leader's steps), the
resume rule (output is written in input order, so the number of complete output
records is the number of input records to skip), and ending every rank when one
fails (``Abort`` after printing the failing rank's message: no rank can hang on
a peer that died).
"""
from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import traceback

from .config import ConfigError, RunConfig
from .faults import inject

log = logging.getLogger("mpiinfer")


class RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record):
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[mpiinfer %(rank)s] %(message)s"))
    handler.addFilter(RankFilter(rank))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _input_options(cfg: RunConfig) -> dict:
    return {"prompt_template": cfg.prompt_template, "dataset": cfg.dataset}


def _inputs(cfg: RunConfig, done: int):
    """All input records after the first ``done`` as one stream, with consecutive indices across files."""
    from .io.readers import open_input
    index = 0
    skip = done
    for n, path in enumerate(cfg.inputs):
        fmt = cfg.input_format
        last = index - 1
        # a single input skips cheaply inside its reader; with several, skipped records are counted
        inner_skip = skip if len(cfg.inputs) == 1 else 0
        for item in open_input(path, fmt, defaults=cfg.defaults, start_index=index, skip=inner_skip,
                               **_input_options(cfg)):
            last = item.index
            if skip and not inner_skip:
                skip -= 1
                continue
            yield item
        if inner_skip:
            skip = 0
        index = last + 1


def run(cfg: RunConfig) -> int:
    """Entry point of ``mpiinfer run`` on every rank. Returns the process exit code."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    setup_logging(rank, cfg.quiet)
    # SIGTERM (Slurm's time limit, sent to every rank): only the coordinator acts on it -- it stops
    # dispatching and tells the leaders to stop; other ranks keep going until told.
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        return _run(cfg, world)
    except ConfigError as e:
        # only the leader raises these after set-up (e.g. an output that belongs to another input)
        print(f"mpiinfer: error: {e}", file=sys.stderr, flush=True)
        if world.Get_size() > 1:
            _abort(world, 2)
        return 2
    except BaseException as e:   # noqa: BLE001 - any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            return 0
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        print(f"mpiinfer: rank {rank} failed: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("MPIINFER_DEBUG"):
            traceback.print_exc()
        if world.Get_size() > 1:
            _abort(world, 1)
        return 1


def _abort(world, code: int) -> None:
    """``Abort`` the job, after giving the launcher a moment to forward the message just printed: Hydra's
    proxy kills every process on Abort and could drop the last bytes still in a rank's stderr pipe (seen in
    about half the runs of the rank-0 step-failure test under load)."""
    time.sleep(0.5)
    world.Abort(code)


class SetupFailed(Exception):
    """Some rank could not set up; every rank raises this together (no rank is left waiting)."""

    def __init__(self, message: str, config: bool):
        super().__init__(message)
        self.config = config


def _agree(world, error):
    """Collective: every rank reports its set-up error (or None); all raise the first one together."""
    errors = world.allgather(error) if world.Get_size() > 1 else [error]
    for r, e in enumerate(errors):
        if e is not None:
            kind, msg = e
            where = f"rank {r}: " if world.Get_size() > 1 and kind != "config" else ""
            raise SetupFailed(where + msg, config=kind == "config")


def _setup(cfg: RunConfig, world):
    """Mesh, device, output checks and this rank's model shard. Errors are agreed on by all ranks."""
    import torch
    from .device import Device
    from .dist.mesh import Mesh
    from .engine.runner import ModelRunner

    error, runner, mesh = None, None, None
    try:
        p = cfg.parallel
        mesh = Mesh.from_world(tp=p.tp, cp=p.cp, ep=p.ep, comm=world)
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        local_size = mesh.node_comm.Get_size() if mesh.node_comm is not None else 1
        local_rank = mesh.node_comm.Get_rank() if mesh.node_comm is not None else 0
        device = Device.resolve(cfg.engine.device, local_rank, local_size, cfg.engine.share_gpus)
        mesh.use_direct_allreduce(cfg.allreduce, device.kind)
        if mesh.rank == 0:
            _check_output(cfg)
        inject("load", mesh.rank)
        runner = ModelRunner(cfg.model, cfg.engine, mesh, device)
    except ConfigError as e:
        error = ("config", str(e))
    except Exception as e:  # noqa: BLE001 - reported by every rank together below
        error = ("error", "".join(traceback.format_exception_only(type(e), e)).strip())
        if os.environ.get("MPIINFER_DEBUG"):
            traceback.print_exc()
    _agree(world, error)
    return mesh, runner


def _run(cfg: RunConfig, world) -> int:
    try:
        mesh, runner = _setup(cfg, world)
    except SetupFailed as e:
        if world.Get_rank() == 0:
            print(f"mpiinfer: error: {e}", file=sys.stderr, flush=True)
        return 2 if e.config else 1
    if not mesh.is_replica_leader:
        runner.follow()
        mesh.close()
        return 0
    try:
        if mesh.rank == 0:
            rc = _coordinate(cfg, mesh, runner)
        else:
            from .replica import serve
            rc = serve(cfg, mesh, runner)
    finally:
        runner.release_followers()
    mesh.close()
    return rc


def _check_output(cfg: RunConfig) -> None:
    out = cfg.output
    if out == "-":
        return
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise ConfigError(f"output directory {d} does not exist")
    if cfg.output_format is None:
        from .io.writers import detect_output_format
        try:
            detect_output_format(out)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    for path in cfg.inputs:
        if path != "-" and not os.path.exists(path):
            raise ConfigError(f"input {path} does not exist")
        if path != "-" and os.path.abspath(path) == os.path.abspath(out):
            raise ConfigError("--output must not be one of the inputs")
        if path != "-" and cfg.input_format is None:
            from .io.readers import detect_format
            try:
                detect_format(path)
            except ValueError as e:
                raise ConfigError(str(e)) from None


class _Source:
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


def _coordinate(cfg: RunConfig, mesh, runner) -> int:
    """World rank 0: read inputs, feed its own engine and the other replica leaders, write results in order."""
    import signal

    from mpi4py import MPI
    from tqdm import tqdm

    from .engine.generate import Engine
    from .io.readers import detect_format
    from .io.summary import Summary, summary_path
    from .io.writers import OrderedWriter, default_output_format, open_output, recover_output
    from .messages import TAG, Done, Result, Stop, Want, Work
    from .tokenizer import Tokenizer

    world = mesh.world_comm
    leaders = [mesh.layout.replica_leader(d) for d in range(1, mesh.dp)]
    tok = Tokenizer(cfg.model)
    engine = Engine(runner, tok, default_seed=cfg.seed)
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
        if mesh.wide_ep:    # the leaders are in the lockstep loop: end it with them
            mesh.dp_comm.allreduce(0, op=MPI.MAX)
        else:
            for r in leaders:
                world.send(Stop(), dest=r, tag=TAG)
        return 0
    if first.index != done:
        raise ConfigError(f"{cfg.output} already has {done} records but the input has only {first.index}: "
                          "it belongs to another input; pass --overwrite to start over")
    if done:
        log.info("resuming: %d records already in %s", done, cfg.output)
    items = itertools.chain([first], items)
    created = int(os.path.getmtime(cfg.inputs[0])) if cfg.inputs[0] != "-" else None
    inner = open_output(cfg.output, out_fmt, flush_every_records=cfg.flush_every, flush_every_seconds=5.0,
                        model=os.path.basename(os.path.normpath(cfg.model)), created=created,
                        token_str=lambda t: tok.decode([t], skip_special_tokens=False))
    summary = Summary(mesh=mesh.describe(), resumed=done)

    # window: enough to keep every replica's batch full plus its prefetch, bounded for memory
    window = max(256, 4 * engine.max_batch * mesh.dp)
    src = _Source(items, window)
    stop_signal = []

    def on_term(signum, frame):
        stop_signal.append(signum)
        src.stopped = True
    old_term = signal.signal(signal.SIGTERM, on_term)

    show_bar = not cfg.quiet and sys.stderr.isatty()
    bar = tqdm(total=None, initial=done, unit="rec", disable=not show_bar, dynamic_ncols=True)
    t0 = time.perf_counter()
    stats = {"n": 0, "errors": 0, "tokens": 0}
    last_log = [t0]
    wants = {r: 0 for r in leaders}
    writer = OrderedWriter(inner, start_index=done, max_pending=window + 16)

    def emit(res: Result) -> None:
        writer.write(res)
        summary.add(res)
        src.in_flight -= 1
        stats["n"] += 1
        stats["tokens"] += len(res.token_ids)
        if res.error is not None:
            stats["errors"] += 1
            if cfg.max_errors is not None and stats["errors"] > cfg.max_errors:
                raise RuntimeError(f"more than --max-errors {cfg.max_errors} records failed "
                                   f"(last: {res.error.type}: {res.error.message})")
        bar.update(1)
        now = time.perf_counter()
        if not show_bar and not cfg.quiet and now - last_log[0] > cfg.log_every:
            last_log[0] = now
            log.info("%d records done (%d errors), %.1f generated tok/s", done + stats["n"], stats["errors"],
                     stats["tokens"] / (now - t0))

    def service(block: bool) -> None:
        status = MPI.Status()
        while world.iprobe(source=MPI.ANY_SOURCE, tag=TAG, status=status) or block:
            msg = world.recv(source=MPI.ANY_SOURCE, tag=TAG, status=status)
            block = False
            if isinstance(msg, Want):
                wants[status.Get_source()] += msg.n
            elif isinstance(msg, Done):
                for res in msg.results:
                    emit(res)

    lock = mesh.wide_ep   # replicas step together: one MAX-allreduce of a state code per step among leaders
    try:
        while True:
            service(block=False)
            for r in leaders:
                if wants[r] > 0:
                    batch = src.take(wants[r])
                    if batch:
                        wants[r] -= len(batch)
                        world.send(Work(batch), dest=r, tag=TAG)
            for item in src.take(engine.free_capacity()):
                err = item if isinstance(item, Result) else engine.add(item)
                if err is not None:
                    emit(err)
            if lock:
                code = 2 if src.stopped else int(engine.has_work() or not src.exhausted or src.in_flight > 0)
                if mesh.dp_comm.allreduce(code, op=MPI.MAX) != 1:
                    break
                for res in engine.step():
                    emit(res)
                continue
            if src.stopped:
                break
            if engine.has_work():
                for res in engine.step():
                    emit(res)
            elif src.in_flight > 0:
                service(block=True)   # the rest is on other replicas: wait for a leader's message
            elif src.exhausted:
                break
            # else: everything taken so far failed parsing; go on reading
    finally:
        signal.signal(signal.SIGTERM, old_term)
        failed = sys.exc_info()[0] is not None
        abandon = bool(stop_signal) or failed
        # on a failure the leaders are not released: run() prints the error and aborts every rank, and a
        # leader that finalized meanwhile could race the abort and swallow the message
        if not lock and not failed:
            for r in leaders:
                world.send(Stop(abandon=abandon), dest=r, tag=TAG)
        bar.close()
        if abandon:
            try:
                writer.close()     # flushes what is in order; results after a gap are dropped (redone on resume)
            except RuntimeError:
                pass
        else:
            writer.close()
        summary.finish()
        sp = summary_path(cfg.output)
        if sp:
            summary.write(sp)
    dt = time.perf_counter() - t0
    if stop_signal:
        log.warning("stopped by signal %d: %d records are in %s; re-run the same command to resume",
                    stop_signal[0], writer.next_index, cfg.output)
        return 0
    log.info("done: %d records (%d errors) in %.1fs, %d tokens generated (%.1f tok/s) -> %s",
             stats["n"], stats["errors"], dt, stats["tokens"], stats["tokens"] / max(dt, 1e-9), cfg.output)
    return 0
