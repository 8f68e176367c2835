"""The two loops of a replica other than the coordinator's: its leader's and its followers'.

Owns: ``lead``, the leader of a replica other than world rank 0's: the leader side of the coordinator
protocol (``messages.Want`` / ``Work`` / ``Done`` / ``Stop`` on the world communicator, tag
``messages.TAG``, sent without blocking through a ``messages.Outbox``).  It asks for as many requests as it has
free batch slots plus a short queue (``wanted``), so long and short prompts balance across replicas by pull, and
sends each step's finished results at once.
With wide EP every leader steps in lockstep with the others (one MAX-allreduce of a ``Lockstep`` code over
``mesh.dp_comm`` per step).  And ``follow``, the loop of every rank that is not a replica leader: run the
steps its leader sends over ``mesh.replica_comm`` until the leader says there are no more.
"""
from __future__ import annotations

import logging

from .config import RunConfig
from .messages import TAG, Bye, Done, Drain, Drained, Lockstep, Outbox, Stop, Want, Work


def make_engine(cfg: RunConfig, runner):
    """The replica leader's engine and the function that spells one token id (for the writers): the model's,
    or with ``--engine null`` (``runner`` None) the model-free one."""
    if cfg.engine.kind == "null":
        from .engine import null
        return null.NullEngine(cfg.engine.max_batch), lambda t: null.decode([t])
    from .engine.generate import Engine
    from .tokenizer import Tokenizer
    tok = Tokenizer(cfg.model)
    return Engine(runner, tok, default_seed=cfg.seed), lambda t: tok.decode([t], skip_special_tokens=False)


log = logging.getLogger("mpiinfer")
POLL_S = 2e-4    # an idle leader's wait between probes for the coordinator's next message
FLUSH_S = 60.0   # how long a leader waits, at its end, for the coordinator to receive what it sent

# A replica's queue (sequences it holds that have not started: n per request of n samples): QUEUE_MIN (at most its
# batch), or twice the sequences its last step finished where that is more (the null engine finishes its whole batch
# each step), enough for the batch slots that open while it asks for more.  No longer: requests queued on one replica wait while others idle.  With a whole batch
# queued (the rule before), one replica took all of a job shorter than its batch, and at a job's end one replica
# still held a batch of queued requests while the others had finished (measured: SmolLM2-135M chat job, mpiexec -n
# 2 vs one process of 2 threads, 300 prompts 53 s vs 41 s, 1,000 prompts 591 vs 666 tok/s).
QUEUE_MIN = 32


def wanted(engine, asked: int = 0, last: int = 0) -> int:
    """How many more requests to give ``engine`` now: its free batch slots and its queue, less ``asked`` (asked for,
    not yet received); ``last``: the sequences its last step finished (``finished``)."""
    queue = max(min(QUEUE_MIN, engine.max_batch), 2 * last)
    waiting = len(engine.waiting) + asked
    return max(0, min(engine.max_batch + queue - len(engine.running) - waiting, queue - waiting))


def finished(results: list) -> int:
    """The sequences behind a step's results: a request's n samples, an embedding request's inputs, else one."""
    return sum(len(r.choices) if r.choices else len(r.embeddings) if r.embeddings else 1 for r in results)


def _recv(world, outbox: Outbox):
    """The coordinator's next message, waited for by probing with short sleeps: a blocking receive spins a core
    (MPICH, Open MPI) that an oversubscribed node's ranks need, e.g. a rank that computes.  Costs POLL_S of
    latency per message (more where the transport needs the coordinator to move a large message's data and it
    is computing).  The leader's own sends progress meanwhile."""
    import time
    while not world.iprobe(source=0, tag=TAG):
        outbox.poll()
        time.sleep(POLL_S)
    return world.recv(source=0, tag=TAG)


def follow(runner) -> None:
    """Follower: run the leader's steps until it sends None."""
    while True:
        batch = runner.receive()
        if batch is None:
            return
        runner.run(batch)


def lead(cfg: RunConfig, mesh, runner) -> int:
    """Leader of a replica other than world rank 0's: pull work from the coordinator, run it, send results;
    its last message is ``Bye`` (the coordinator receives everything before finalizing)."""
    outbox = Outbox(mesh.world_comm)       # never a blocking send: the coordinator may be sending us Work
    rc = _lead(cfg, mesh, runner, outbox)
    outbox.send(Bye(), 0)
    # the coordinator receives until every Bye (bounded by its own BYE_TIMEOUT_S)
    if not outbox.flush(timeout=FLUSH_S):
        log.warning("%d messages to the coordinator were not received", len(outbox.pending))
    return rc


def _lead(cfg: RunConfig, mesh, runner, outbox: Outbox) -> int:
    from mpi4py import MPI
    world = mesh.world_comm
    engine, _ = make_engine(cfg, runner)
    asked = 0                     # requests asked for and not yet received
    last = 0                      # sequences the last step finished
    finishing = False             # no more work will come
    draining = False              # the job stops: finish what runs, start nothing new
    lock = mesh.wide_ep           # replicas step together (see coordinator.Coordinator)
    while True:
        room = wanted(engine, asked, last)
        if not finishing and room > 0:
            outbox.send(Want(room), 0)
            asked += room
        # wait for a message only when there is nothing to compute (never in lockstep)
        while world.iprobe(source=0, tag=TAG) or not (engine.has_work() or finishing or lock):
            msg = _recv(world, outbox)
            if isinstance(msg, Stop):
                if msg.abandon:
                    return 0
                finishing = True
            elif isinstance(msg, Drain):
                finishing = draining = True
                engine.drop_waiting()                 # not started: computed on resume
            elif isinstance(msg, Work) and not draining:
                asked -= len(msg.items)
                errors = [err for err in map(engine.add, msg.items) if err is not None]
                if errors:
                    outbox.send(Done(errors), 0)
        # results just posted: a moment for the handshake before this rank computes (see Coordinator._loop)
        outbox.flush(timeout=0.003, keep=False)
        if draining and not lock and not engine.has_work():
            outbox.send(Drained(), 0)
            while not isinstance(msg := _recv(world, outbox), Stop):
                pass                                   # work sent before the drain: dropped
            return 0
        if lock:
            result = mesh.dp_comm.allreduce(int(Lockstep.mine(engine.has_work(), draining)), op=MPI.MAX)
            step, now_draining = Lockstep.go_on(result, draining)
            if now_draining and not draining:       # the job stops: finish what runs, start nothing new
                finishing = draining = True
                engine.drop_waiting()
            if not step:
                return 0
            results = engine.step()
            last = finished(results)
            if results:
                outbox.send(Done(results), 0)
            continue
        if engine.has_work():
            results = engine.step()
            last = finished(results)
            if results:
                outbox.send(Done(results), 0)
        elif finishing:
            return 0
