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


def _inputs(cfg: RunConfig):
    """All input records as one stream with consecutive indices across files."""
    from .io.readers import open_input
    index = 0
    for path in cfg.inputs:
        last = index - 1
        for item in open_input(path, cfg.input_format, defaults=cfg.defaults, start_index=index):
            last = item.index
            yield item
        index = last + 1


def run(cfg: RunConfig) -> int:
    """Entry point of ``mpiinfer run`` on every rank. Returns the process exit code."""
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    setup_logging(rank, cfg.quiet)
    try:
        return _run(cfg, world)
    except ConfigError as e:
        # only the leader raises these after set-up (e.g. an output that belongs to another input)
        print(f"mpiinfer: error: {e}", file=sys.stderr, flush=True)
        if world.Get_size() > 1:
            world.Abort(2)
        return 2
    except BaseException as e:   # noqa: BLE001 - any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            return 0
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        print(f"mpiinfer: rank {rank} failed: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("MPIINFER_DEBUG"):
            traceback.print_exc()
        if world.Get_size() > 1:
            world.Abort(1)
        return 1


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
        if mesh.dp > 1:
            raise ConfigError(f"{mesh.world} ranks with tp x cp = {mesh.tp * mesh.cp} means dp={mesh.dp}: "
                              "data-parallel replicas are not supported yet; launch tp x cp ranks")
        if mesh.cp > 1:
            raise ConfigError("--cp > 1 (context parallelism) is not supported yet")
        if cfg.engine.threads:
            torch.set_num_threads(cfg.engine.threads)
        local_size = mesh.node_comm.Get_size() if mesh.node_comm is not None else 1
        local_rank = mesh.node_comm.Get_rank() if mesh.node_comm is not None else 0
        device = Device.resolve(cfg.engine.device, local_rank, local_size, cfg.engine.share_gpus)
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
        return 0
    try:
        return _lead(cfg, mesh, runner)
    finally:
        runner.release_followers()


def _check_output(cfg: RunConfig) -> None:
    out = cfg.output
    if out == "-":
        return
    d = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(d):
        raise ConfigError(f"output directory {d} does not exist")
    for path in cfg.inputs:
        if path != "-" and not os.path.exists(path):
            raise ConfigError(f"input {path} does not exist")
        if path != "-" and os.path.abspath(path) == os.path.abspath(out):
            raise ConfigError("--output must not be one of the inputs")


def _lead(cfg: RunConfig, mesh, runner) -> int:
    from tqdm import tqdm

    from .engine.generate import Engine
    from .io.writers import JsonlWriter, OrderedWriter, recover_jsonl
    from .tokenizer import Tokenizer

    tok = Tokenizer(cfg.model)
    engine = Engine(runner, tok, default_seed=cfg.seed)
    done = 0
    if cfg.output != "-":
        if cfg.overwrite and os.path.exists(cfg.output):
            os.remove(cfg.output)
        done, _ = recover_jsonl(cfg.output)
    items = _inputs(cfg)
    if done:
        skipped = sum(1 for _ in itertools.islice(items, done))
        if skipped < done:
            raise ConfigError(f"{cfg.output} already has {done} records but the input has only {skipped}: "
                              "it belongs to another input; pass --overwrite to start over")
        log.info("resuming: %d records already in %s", done, cfg.output)
    # peek to tell a finished job from one with work left
    first = next(items, None)
    if first is None:
        log.info("nothing to do: all %d input records are already in %s", done, cfg.output)
        return 0
    items = itertools.chain([first], items)

    show_bar = not cfg.quiet and sys.stderr.isatty()
    bar = tqdm(total=None, initial=done, unit="rec", disable=not show_bar, dynamic_ncols=True)
    t0 = time.perf_counter()
    n = errors = 0
    last_log = t0
    inner = JsonlWriter(cfg.output, flush_every_records=cfg.flush_every, flush_every_seconds=5.0)
    with OrderedWriter(inner, start_index=done) as writer:
        for res in engine.generate(items):
            writer.write(res)
            n += 1
            if res.error is not None:
                errors += 1
                if cfg.max_errors is not None and errors > cfg.max_errors:
                    raise RuntimeError(f"more than --max-errors {cfg.max_errors} records failed "
                                       f"(last: {res.error.type}: {res.error.message})")
            bar.update(1)
            now = time.perf_counter()
            if not show_bar and not cfg.quiet and now - last_log > cfg.log_every:
                last_log = now
                log.info("%d records done (%d errors), %.1f generated tok/s", done + n, errors,
                         engine.tokens_generated / (now - t0))
    bar.close()
    dt = time.perf_counter() - t0
    log.info("done: %d records (%d errors) in %.1fs, %d tokens generated (%.1f tok/s) -> %s",
             n, errors, dt, engine.tokens_generated, engine.tokens_generated / max(dt, 1e-9), cfg.output)
    return 0
