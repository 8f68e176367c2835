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

import dataclasses
import logging
import os
import signal
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


# Exit codes of ``mpiinfer run`` (README.md, "Exit codes")
EXIT_OK = 0             # finished (records that failed are error records, counted in the summary), or stopped
                        # by SIGTERM / SIGUSR1 with every finished record kept: re-running resumes
EXIT_CRASH = 1          # a rank failed
EXIT_CONFIG = 2         # refused before any compute: options, layout, checkpoint, input, output
EXIT_MAX_ERRORS = 3     # more than --max-errors records failed
EXIT_INTERRUPTED = 130  # Ctrl-C: every finished record kept, re-running resumes


def default_threads(ranks_on_node: int) -> int:
    """torch threads of a rank when neither --threads nor OMP_NUM_THREADS says: the cores this process may use
    when the launcher bound it to some (srun --cpus-per-task, mpirun --bind-to), else the node's cores shared
    among its ranks (torch's own default, every core, oversubscribes them as soon as two ranks share a node)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if usable < (os.cpu_count() or usable):
        return max(1, usable)
    return max(1, usable // max(1, ranks_on_node))


def launcher_tasks() -> int:
    """How many tasks the launcher says it started (srun, Open MPI's mpirun, a PMI launcher); 1 if none says."""
    for var in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 1


class Signals:
    """Stop requests this rank received, from the moment the job starts (loading included): SIGTERM and SIGUSR1
    (Slurm's warnings before a time limit) ask for a stop after draining, SIGINT (Ctrl-C) for a stop now; a
    second SIGINT interrupts at once.  Only the coordinator acts on them: it tells every other rank."""
    STOPS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: list = []
        for sig in self.STOPS:
            signal.signal(sig, self._on)

    def _on(self, signum, frame) -> None:
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.append(signum)

    @property
    def interrupted(self) -> bool:
        return signal.SIGINT in self.received


def run(cfg: RunConfig) -> int:
    """Entry point of ``mpiinfer run`` on every rank. Returns the process exit code."""
    signals = Signals()
    from mpi4py import MPI

    from .coordinator import MaxErrorsExceeded
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    setup_logging(rank, cfg.quiet)
    tasks = launcher_tasks()
    if world.Get_size() == 1 and tasks > 1:
        # every task is a job of its own: refuse before any of them writes the output
        print(f"mpiinfer: error: the launcher started {tasks} tasks but MPI sees a world of 1 (each task would be a "
              "separate job writing the same output). Under Slurm pass srun the PMI plugin of your MPI: "
              "--mpi=pmi2 for MPICH, --mpi=pmix for Open MPI (`srun --mpi=list` shows what Slurm offers)",
              file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        return _run(cfg, world, signals)
    except MaxErrorsExceeded as e:
        print(f"mpiinfer: stopped: {e}", file=sys.stderr, flush=True)
        if world.Get_size() > 1:
            _abort(world, EXIT_MAX_ERRORS)
        return EXIT_MAX_ERRORS
    except ConfigError as e:
        # only the leader raises these after set-up (e.g. an input on stdin with no records)
        print(f"mpiinfer: error: {e}", file=sys.stderr, flush=True)
        if world.Get_size() > 1:
            _abort(world, EXIT_CONFIG)
        return EXIT_CONFIG
    except BaseException as e:   # any failure must end every rank
        if isinstance(e, SystemExit) and not e.code:
            return EXIT_OK
        if isinstance(e, KeyboardInterrupt):
            print(f"mpiinfer: rank {rank} interrupted (Ctrl-C twice): finished records are in {cfg.output} or its "
                  "journal; re-run the same command to resume", file=sys.stderr, flush=True)
            if world.Get_size() > 1:
                _abort(world, EXIT_INTERRUPTED)
            return EXIT_INTERRUPTED
        msg = "".join(traceback.format_exception_only(type(e), e)).strip()
        print(f"mpiinfer: rank {rank} failed: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("MPIINFER_DEBUG"):
            traceback.print_exc()
        if world.Get_size() > 1:
            _abort(world, EXIT_CRASH)
        return EXIT_CRASH


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
    """Three stages, each one's errors agreed on by all ranks before the next one's collectives start:
    the checks (the layout; on world rank 0 the checkpoint's config, tokenizer and tensor headers, the layout
    against the model, the input and output, the resume plan: no torch imported, nothing loaded), the device,
    then the mesh and this rank's model shard."""
    from .comm.mesh import Layout, Mesh, node_local

    def check():
        p = cfg.parallel
        layout = Layout(world=world.Get_size(), tp=p.tp, cp=p.cp, ep=p.ep)
        plan = None
        if cfg.engine.kind == "null" and layout.dp != layout.world:
            raise ConfigError("--engine null runs data-parallel replicas only (no --tp, --cp or --ep)")
        if world.Get_rank() == 0:
            if cfg.engine.kind == "model":
                _check_model(cfg, layout)
            _check_output(cfg)
            plan = _plan_resume(cfg)
        return layout, plan

    checked, error = _captured(check)
    _agree(world, error)
    layout, plan = checked

    def place():
        local_rank, local_size = node_local(world)
        if cfg.engine.kind == "null":           # no model: no device, no torch
            return None, local_size
        from .device import Device
        d = Device.resolve(cfg.engine.device, local_rank, local_size, cfg.engine.share_gpus)
        d.activate()                  # before anything touches CUDA (the mesh's IPC buffers, NCCL)
        return d, local_size

    placed, error = _captured(place)
    _agree(world, error)
    device, local_size = placed
    _agree(world, _captured(lambda: _one_rank_per_gpu(world, device, cfg.engine.share_gpus))[1])
    engine_cfg = cfg.engine
    if engine_cfg.threads is None and not os.environ.get("OMP_NUM_THREADS"):
        engine_cfg = dataclasses.replace(engine_cfg, threads=default_threads(local_size))

    def build():
        mesh = Mesh.build(world, layout, cfg.allreduce, device.kind if device else "cpu")
        inject("load", mesh.rank)
        if cfg.engine.kind == "null":
            return mesh, None
        from .engine.runner import ModelRunner
        return mesh, ModelRunner(cfg.model, engine_cfg, mesh, device)

    built, error = _captured(build)
    _agree(world, error)
    runner = built[1]
    if runner is not None:       # every rank has loaded: now collectives inside a replica are safe
        _agree(world, _captured(runner.agree_kv)[1])
    return (*built, plan)


def _one_rank_per_gpu(world, device, share_gpus: bool) -> None:
    """Refuse two ranks of one node on one GPU (by UUID) unless ``--share-gpus``; collective over ``world``."""
    from mpi4py import MPI
    seen = world.allgather((MPI.Get_processor_name(), device.uuid() if device is not None else None))
    if share_gpus:
        return
    owner: dict = {}
    for rank, key in enumerate(seen):
        if key[1] is None:
            continue
        if key in owner:
            raise ConfigError(f"ranks {owner[key]} and {rank} on {key[0]} got the same GPU: launch one rank per "
                              "GPU (e.g. srun --gpus-per-task=1, or fewer ranks per node), or pass --share-gpus "
                              "to place several ranks on one GPU")
        owner[key] = rank


def _plan_resume(cfg: RunConfig):
    """World rank 0, before any weights are read: what this run continues (refusing another job's output)."""
    from .coordinator import output_format, read_inputs
    from .io.resume import plan_resume
    return plan_resume(cfg, output_format(cfg), lambda skip: read_inputs(cfg, skip))


def _run(cfg: RunConfig, world, signals: Signals) -> int:
    try:
        mesh, runner, plan = _setup(cfg, world)
    except SetupFailed as e:
        if world.Get_rank() == 0:
            print(f"mpiinfer: error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG if e.config else EXIT_CRASH
    from .coordinator import Coordinator
    from .replica import follow, lead
    if not mesh.is_replica_leader:
        follow(runner)
        mesh.close()
        return 0
    try:
        if mesh.rank == 0:
            rc = Coordinator(cfg, mesh, runner, plan, signals).run()
        else:
            rc = lead(cfg, mesh, runner)
    finally:
        if runner is not None:
            runner.release_followers()
    mesh.close()
    return rc


def _check_model(cfg: RunConfig, layout) -> None:
    """The checkpoint directory can be run with this layout: config, tokenizer, every tensor's header."""
    from .config import ModelConfig
    from .models.registry import check_checkpoint, validate_layout
    from .tokenizer import Tokenizer
    from .weights.index import CheckpointIndex
    m = cfg.model
    if not os.path.exists(m) and not os.path.isabs(m) and m.count("/") == 1 and not m.startswith("."):
        raise ConfigError(f"--model {m}: no such directory. mpiinfer reads only local checkpoint directories and "
                          f"never downloads; if {m} is a Hugging Face hub id, fetch it first, e.g. "
                          f"`huggingface-cli download {m} --local-dir DIR` (safetensors weights), then pass -m DIR")
    mc = ModelConfig.from_dir(m)
    Tokenizer(m)
    validate_layout(mc, layout)
    check_checkpoint(mc, CheckpointIndex(m))


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
