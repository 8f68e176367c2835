"""Replica leaders other than world rank 0: pull work from the coordinator, run it, send results back.

Owns: the leader side of the coordinator protocol (``messages.Want`` / ``Work`` / ``Done`` / ``Stop`` on the
world communicator, tag ``messages.TAG``).  A leader asks for as many requests as it has free batch slots plus
a prefetch of one batch, so long and short prompts balance across replicas by pull, and sends each step's
finished results at once.  Its followers execute its steps through ``ModelRunner.follow``.
"""
from __future__ import annotations

import time

from .config import RunConfig
from .engine.generate import Engine
from .messages import TAG, Done, Result, Stop, Want, Work
from .tokenizer import Tokenizer


def serve(cfg: RunConfig, mesh, runner) -> int:
    from mpi4py import MPI
    world = mesh.world_comm
    engine = Engine(runner, Tokenizer(cfg.model), default_seed=cfg.seed)
    asked = 0                     # requests asked for and not yet received
    finishing = False
    lock = mesh.wide_ep           # replicas step together (see coordinator._coordinate)
    while True:
        room = 2 * engine.max_batch - len(engine.running) - len(engine.waiting) - asked
        if not finishing and room > 0:
            world.send(Want(room), dest=0, tag=TAG)
            asked += room
        # block for a message only when there is nothing to compute (never in lockstep)
        while world.iprobe(source=0, tag=TAG) or not (engine.has_work() or finishing or lock):
            msg = world.recv(source=0, tag=TAG)
            if isinstance(msg, Stop):
                if msg.abandon:
                    return 0
                finishing = True
            elif isinstance(msg, Work):
                asked -= len(msg.items)
                errors = []
                for item in msg.items:
                    err = item if isinstance(item, Result) else engine.add(item)
                    if err is not None:
                        errors.append(err)
                if errors:
                    world.send(Done(errors), dest=0, tag=TAG)
        if lock:
            if mesh.dp_comm.allreduce(int(engine.has_work()), op=MPI.MAX) != 1:
                return 0
            results = engine.step()
            if results:
                world.send(Done(results), dest=0, tag=TAG)
            continue
        if engine.has_work():
            results = engine.step()
            if results:
                world.send(Done(results), dest=0, tag=TAG)
        elif finishing:
            return 0
