"""The entry of ``mpiinfer run`` on every rank of the world.

Owns: rank-aware logging, the set-up every rank does before any compute (the ``Layout``, the device, the
output checks, the ``Mesh``, this rank's model shard) with its errors agreed on by all ranks (one message,
no rank left waiting), the routing of each rank to its role (world rank 0: the coordinator, which alone
touches input and output files, and the leader of replica 0; the leaders of the other replicas; the
followers that run their leader's steps), and the abort policy: an error on any rank after set-up prints
that rank's message and ``Abort``s the whole job, so no rank can hang on a peer that died.  This is the one
module that takes ``MPI.COMM_WORLD``; everything below receives it.
"""
from __future__ import annotations

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
    except BaseException as e:
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


def _captured(step):
    """Run ``step()``; return (its value, None) or (None, an error to agree on)."""
    try:
        return step(), None
    except ConfigError as e:
        return None, ("config", str(e))
    except Exception as e:
        if os.environ.get("MPIINFER_DEBUG"):
            traceback.print_exc()
        return None, ("error", "".join(traceback.format_exception_only(type(e), e)).strip())


def _setup(cfg: RunConfig, world):
    """Layout, device, output checks, then the mesh and this rank's model shard.  Each stage's errors are
    agreed on by all ranks before the next stage's collectives start."""
    from .comm.mesh import Layout, Mesh, node_local
    from .device import Device
    from .engine.runner import ModelRunner

    def place():
        p = cfg.parallel
        layout = Layout(world=world.Get_size(), tp=p.tp, cp=p.cp, ep=p.ep)
        local_rank, local_size = node_local(world)
        device = Device.resolve(cfg.engine.device, local_rank, local_size, cfg.engine.share_gpus)
        if world.Get_rank() == 0:
            _check_output(cfg)
        return layout, device

    placed, error = _captured(place)
    _agree(world, error)
    layout, device = placed

    def build():
        mesh = Mesh.build(world, layout, cfg.allreduce, device.kind)
        inject("load", mesh.rank)
        return mesh, ModelRunner(cfg.model, cfg.engine, mesh, device)

    built, error = _captured(build)
    _agree(world, error)
    return built


def _run(cfg: RunConfig, world) -> int:
    from .coordinator import Coordinator
    from .replica import follow, lead
    try:
        mesh, runner = _setup(cfg, world)
    except SetupFailed as e:
        if world.Get_rank() == 0:
            print(f"mpiinfer: error: {e}", file=sys.stderr, flush=True)
        return 2 if e.config else 1
    if not mesh.is_replica_leader:
        follow(runner)
        mesh.close()
        return 0
    try:
        rc = Coordinator(cfg, mesh, runner).run() if mesh.rank == 0 else lead(cfg, mesh, runner)
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
