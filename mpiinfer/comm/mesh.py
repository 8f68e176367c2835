"""The process mesh: world = dp x cp x tp ranks, expert parallelism laid over it, one communicator per axis.

Owns: ``Layout``, the pure rank arithmetic of every axis (EP included), validated when it is built and
testable without MPI; ``Mesh``, the immutable set of sub-communicators built from a ``Layout`` and the
world communicator the job entry passes in (this module never reaches for ``MPI.COMM_WORLD`` itself), with
the TP allreduce algorithm chosen once, when the mesh is built; ``node_local``, a rank's place on its node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError


@dataclass(frozen=True)
class Layout:
    """Rank arithmetic of ``world = dp x cp x tp`` ranks and of the EP groups inside it.

    Rank order is dp-major, tp-minor: world rank ``r = (dp_rank * cp + cp_rank) * tp + tp_rank``, so a
    replica's ``cp x tp`` ranks are consecutive and TP peers share a node whenever possible.

    Expert parallelism comes in two shapes, told apart by ``ep``:

    * EP inside a replica (``ep`` divides ``tp``): the TP group splits into ``ep`` blocks of
      ``etp = tp / ep`` consecutive ranks; block ``tp_rank // etp`` owns ``1/ep`` of the experts and
      shards each of them tensor-parallel over its ``etp`` ranks (``etp_rank = tp_rank % etp``).  An EP
      group is the ``ep`` ranks of one replica with the same ``etp_rank``.
    * Wide EP (``ep == dp x tp`` with dp > 1): attention is data-parallel, every rank of a CP slice owns
      whole experts (``etp = 1``), EP rank ``dp_rank * tp + tp_rank``; replicas step together.

    ``ep == 1``: every TP rank holds a TP shard of every expert (``etp = tp``).

    Worked examples::

        Layout(world=8, tp=2)             dp=4   TP [0 1] [2 3] [4 5] [6 7]   DP [0 2 4 6] [1 3 5 7]
        Layout(world=8, tp=2, cp=2)       dp=2   TP [0 1] [2 3] [4 5] [6 7]   CP [0 2] [1 3] [4 6] [5 7]
                                                 replicas [0 1 2 3] [4 5 6 7]
        Layout(world=4, tp=4, ep=2)       etp=2  EP groups [0 2] [1 3]; ranks 0,1 own experts 0..E/2-1
        Layout(world=4, tp=2, ep=4)       wide EP, dp=2: EP group [0 1 2 3], EP rank = world rank
    """
    world: int
    tp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self):
        if self.world < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world}")
        for name, v in (("tp", self.tp), ("cp", self.cp), ("ep", self.ep)):
            if v < 1:
                raise ConfigError(f"--{name} must be >= 1, got {v}")
        if self.world % (self.tp * self.cp):
            raise ConfigError(
                f"world size {self.world} is not divisible by tp x cp = {self.tp} x {self.cp}: "
                f"launch a multiple of {self.tp * self.cp} ranks")
        if self.ep > 1 and not (self.tp % self.ep == 0 or self.ep == self.dp * self.tp):
            raise ConfigError(
                f"--ep {self.ep} must divide --tp {self.tp} (EP inside a replica) or equal dp x tp = "
                f"{self.dp * self.tp} (wide EP across replicas)")

    # ------------------------------------------------------------------ dp x cp x tp
    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp)

    def coords(self, rank: int) -> tuple:
        """(dp_rank, cp_rank, tp_rank) of a world rank."""
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = rank // (self.tp * self.cp)
        return dp_rank, cp_rank, tp_rank

    def rank_of(self, dp_rank: int, cp_rank: int, tp_rank: int) -> int:
        return (dp_rank * self.cp + cp_rank) * self.tp + tp_rank

    def tp_group(self, rank: int) -> list:
        d, c, _ = self.coords(rank)
        return [self.rank_of(d, c, t) for t in range(self.tp)]

    def cp_group(self, rank: int) -> list:
        d, _, t = self.coords(rank)
        return [self.rank_of(d, c, t) for c in range(self.cp)]

    def dp_group(self, rank: int) -> list:
        _, c, t = self.coords(rank)
        return [self.rank_of(d, c, t) for d in range(self.dp)]

    def replica_group(self, rank: int) -> list:
        d, _, _ = self.coords(rank)
        return [self.rank_of(d, c, t) for c in range(self.cp) for t in range(self.tp)]

    def replica_leader(self, dp_rank: int) -> int:
        return self.rank_of(dp_rank, 0, 0)

    # ------------------------------------------------------------------ expert parallelism
    @property
    def wide_ep(self) -> bool:
        """Experts spread over all dp x tp ranks (data-parallel attention + EP); replicas step together."""
        return self.ep > 1 and self.dp > 1 and self.ep == self.dp * self.tp

    @property
    def etp(self) -> int:
        """TP ranks that share (tensor-parallel) each expert: tp / ep inside a replica, 1 with wide EP."""
        return 1 if self.wide_ep else self.tp // self.ep

    def ep_rank(self, rank: int) -> int:
        """Rank inside the EP group: the index of the expert block this rank holds."""
        d, _, t = self.coords(rank)
        return d * self.tp + t if self.wide_ep else t // self.etp

    def etp_rank(self, rank: int) -> int:
        """Rank among the ``etp`` ranks sharing this rank's experts (which slice of each expert it holds)."""
        return 0 if self.wide_ep else self.coords(rank)[2] % self.etp

    def ep_group(self, rank: int) -> list:
        """The world ranks of this rank's EP group, in EP-rank order (one rank per expert block)."""
        d, c, t = self.coords(rank)
        if self.wide_ep:
            return [self.rank_of(dd, c, tt) for dd in range(self.dp) for tt in range(self.tp)]
        return [self.rank_of(d, c, b * self.etp + t % self.etp) for b in range(self.ep)]


def _cuda_dda(tp_comm, allreduce: str, kw: dict):
    """The CuPy IPC communicator over ``tp_comm``, or (``auto``, agreed by the group) ``tp_comm`` itself
    when CuPy is missing or this node's GPUs cannot map each other's memory; ``dda`` insists."""
    import logging
    err = None
    try:
        from .dda_cuda import CudaDDAComm
    except ImportError as e:
        err = f"CuPy is not importable ({e}; pip install cupy-cuda12x)"
    errs = [e for e in tp_comm.allgather(err) if e]
    if not errs:
        dda = None
        try:
            dda = CudaDDAComm(tp_comm, algo=allreduce, **kw)
        except RuntimeError as e:        # raised by every rank of a node together (IPC mapping refused)
            err = str(e)
        # agreed over the whole group: a TP group spanning nodes where only one node's GPUs refuse falls back
        # everywhere (the nodes that built one release it together, as they built it)
        errs = [e for e in tp_comm.allgather(err) if e]
        if not errs:
            return dda
        if dda is not None:
            dda.close()
    if allreduce == "dda":
        raise ConfigError(f"--allreduce dda on CUDA: {errs[0]}")
    logging.getLogger("mpiinfer").warning("TP allreduce: MPI through host memory (%s)", errs[0])
    return tp_comm


def node_local(world_comm) -> tuple:
    """(node-local rank, ranks on this node) of the calling rank; collective over ``world_comm``."""
    from mpi4py import MPI
    node = world_comm.Split_type(MPI.COMM_TYPE_SHARED, key=world_comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


@dataclass(frozen=True)
class Mesh:
    """This rank's coordinates and one communicator per axis, fixed when built.

    ``tp_comm`` is always the MPI communicator of the TP group (``Bcast``, ``Gather``, ``Allgatherv``);
    ``tp_reduce`` is what TP allreduces and allgathers go through (``comm.collectives.all_reduce``): a
    direct-data-access communicator when ``Mesh.build`` chose one, else ``tp_comm`` itself.
    ``Mesh.single()`` is the one-process mesh with no MPI at all (communicators are None and every
    collective is the identity); ``Mesh(layout, rank)`` alone is a mesh without communicators, for rank
    arithmetic (``mpiinfer plan`` builds every rank's model from one on the meta device)."""
    layout: Layout
    rank: int
    world_comm: Any = None
    tp_comm: Any = None
    cp_comm: Any = None
    dp_comm: Any = None
    replica_comm: Any = None
    ep_comm: Any = None
    tp_reduce: Any = None

    def __post_init__(self):
        if self.tp_reduce is None:
            object.__setattr__(self, "tp_reduce", self.tp_comm)

    tp = property(lambda self: self.layout.tp)
    cp = property(lambda self: self.layout.cp)
    ep = property(lambda self: self.layout.ep)
    dp = property(lambda self: self.layout.dp)
    world = property(lambda self: self.layout.world)
    wide_ep = property(lambda self: self.layout.wide_ep)
    dp_rank = property(lambda self: self.layout.coords(self.rank)[0])
    cp_rank = property(lambda self: self.layout.coords(self.rank)[1])
    tp_rank = property(lambda self: self.layout.coords(self.rank)[2])
    ep_rank = property(lambda self: self.layout.ep_rank(self.rank))
    etp_rank = property(lambda self: self.layout.etp_rank(self.rank))

    @property
    def is_replica_leader(self) -> bool:
        return self.tp_rank == 0 and self.cp_rank == 0

    @staticmethod
    def single() -> Mesh:
        return Mesh(Layout(world=1), 0)

    @staticmethod
    def build(world_comm, layout: Layout, allreduce: str = "auto", device_kind: str = "cpu",
              timeout: float | None = None) -> Mesh:
        """Split ``world_comm`` by ``layout`` (collective over it).  ``allreduce``: ``mpi`` keeps MPI's
        allreduce for TP; ``auto`` / ``dda`` build a direct-data-access communicator over each TP group of
        more than one rank (shared memory on CPU, CuPy IPC on CUDA; ``comm.dda.choose_algo``)."""
        if world_comm.Get_size() != layout.world:
            raise ConfigError(f"the layout is for {layout.world} ranks but the communicator has "
                              f"{world_comm.Get_size()}")
        L, rank = layout, world_comm.Get_rank()
        d, c, t = L.coords(rank)
        tp_comm = world_comm.Split(color=d * L.cp + c, key=t)
        cp_comm = world_comm.Split(color=d * L.tp + t, key=c)
        dp_comm = world_comm.Split(color=c * L.tp + t, key=d)
        replica_comm = world_comm.Split(color=d, key=c * L.tp + t)
        ep_comm = None
        if L.ep > 1:
            # one color per EP group: wide EP, all ranks of a CP slice; inside a replica, same etp_rank
            color = c if L.wide_ep else (d * L.cp + c) * L.etp + L.etp_rank(rank)
            ep_comm = world_comm.Split(color=color, key=L.ep_group(rank).index(rank))
        tp_reduce = tp_comm
        if L.tp > 1 and allreduce != "mpi":
            kw = {} if timeout is None else {"timeout": timeout}
            if device_kind == "cuda":
                tp_reduce = _cuda_dda(tp_comm, allreduce, kw)
            else:
                from .dda import DDAComm
                tp_reduce = DDAComm(tp_comm, algo=allreduce, **kw)
        return Mesh(layout, rank, world_comm, tp_comm, cp_comm, dp_comm, replica_comm, ep_comm, tp_reduce)

    def close(self) -> None:
        """Release direct-access buffers (collective over each TP group)."""
        if self.tp_reduce is not self.tp_comm:
            self.tp_reduce.close()

    def describe(self) -> str:
        L = self.layout
        return f"world={L.world} dp={L.dp} cp={L.cp} tp={L.tp} ep={L.ep}"
