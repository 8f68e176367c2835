"""The process mesh: world = dp x cp x tp ranks, and one communicator per axis.

Owns: the only use of ``MPI.COMM_WORLD`` in the package, layout validation, the
rank arithmetic (pure, testable without MPI: ``Layout``) and the sub-communicators
built from it (``Mesh``).  Rank order is dp-major, tp-minor: world rank
``r = (dp_rank * cp + cp_rank) * tp + tp_rank``, so a replica's ranks are
consecutive and TP peers share a node whenever possible.

Example, world=8, tp=2, cp=1 (dp=4):
    TP groups  [0 1] [2 3] [4 5] [6 7]      DP groups  [0 2 4 6] [1 3 5 7]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ConfigError


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp)

    def validate(self) -> None:
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


class Mesh:
    """Sub-communicators per axis plus this rank's coordinates.

    ``Mesh.single()`` is the one-process mesh with no MPI at all (communicators
    are None and every collective is the identity)."""

    def __init__(self, layout: Layout, rank: int, world_comm=None, tp_comm=None, cp_comm=None,
                 dp_comm=None, replica_comm=None, ep_comm=None, node_comm=None):
        self.layout = layout
        self.rank = rank
        self.dp_rank, self.cp_rank, self.tp_rank = layout.coords(rank)
        self.world_comm = world_comm
        self.tp_comm = tp_comm
        self.cp_comm = cp_comm
        self.dp_comm = dp_comm
        self.replica_comm = replica_comm
        self.ep_comm = ep_comm
        self.node_comm = node_comm

    tp = property(lambda self: self.layout.tp)
    cp = property(lambda self: self.layout.cp)
    ep = property(lambda self: self.layout.ep)
    dp = property(lambda self: self.layout.dp)
    world = property(lambda self: self.layout.world)

    @property
    def is_replica_leader(self) -> bool:
        return self.tp_rank == 0 and self.cp_rank == 0

    @property
    def wide_ep(self) -> bool:
        """Experts spread over all dp x tp ranks (data-parallel attention + EP); replicas step together."""
        return self.ep > 1 and self.dp > 1 and self.ep == self.dp * self.tp

    @property
    def ep_rank(self) -> int:
        """Rank inside the EP group (EP inside a replica: a block of tp ranks; wide EP: dp x tp)."""
        if self.ep == 1:
            return 0
        if self.wide_ep:
            return self.dp_rank * self.tp + self.tp_rank
        return self.tp_rank // (self.tp // self.ep)

    @staticmethod
    def single() -> "Mesh":
        return Mesh(Layout(world=1), 0)

    @staticmethod
    def from_world(tp: int = 1, cp: int = 1, ep: int = 1, comm=None) -> "Mesh":
        from mpi4py import MPI
        world = comm if comm is not None else MPI.COMM_WORLD
        layout = Layout(world=world.Get_size(), tp=tp, cp=cp, ep=ep)
        layout.validate()
        rank = world.Get_rank()
        d, c, t = layout.coords(rank)
        tp_comm = world.Split(color=d * layout.cp + c, key=t)
        cp_comm = world.Split(color=d * layout.tp + t, key=c)
        dp_comm = world.Split(color=c * layout.tp + t, key=d)
        replica_comm = world.Split(color=d, key=c * layout.tp + t)
        if ep == 1:
            ep_comm = None
        elif ep == layout.dp * layout.tp and layout.dp > 1:
            # wide EP: all ranks with the same cp coordinate
            ep_comm = world.Split(color=c, key=d * layout.tp + t)
        else:
            block = tp // ep   # ranks tp_rank // block form one EP group member index; group = same t % block
            ep_comm = world.Split(color=(d * layout.cp + c) * block + t % block, key=t)
        node_comm = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        return Mesh(layout, rank, world, tp_comm, cp_comm, dp_comm, replica_comm, ep_comm, node_comm)

    def use_direct_allreduce(self, algo: str = "auto", device_kind: str = "cpu", timeout: float = 30.0) -> None:
        """Replace the TP communicator by a direct-data-access one (shared memory on CPU, CuPy IPC on GPU).

        Collective over each TP group; call before any layer is built (layers keep the communicator they
        are given). ``close()`` releases it."""
        if self.tp_comm is None or self.tp_comm.Get_size() == 1 or algo == "mpi":
            return
        if device_kind == "cuda":
            from .dda_cuda import CudaDDAComm
            self.tp_comm = CudaDDAComm(self.tp_comm, algo=algo, timeout=timeout)
        else:
            from .dda import DDAComm
            self.tp_comm = DDAComm(self.tp_comm, algo=algo, timeout=timeout)

    def close(self) -> None:
        """Release direct-access buffers (collective over each TP group)."""
        close = getattr(self.tp_comm, "close", None)
        if close is not None:
            close()

    def describe(self) -> str:
        L = self.layout
        return f"world={L.world} dp={L.dp} cp={L.cp} tp={L.tp} ep={L.ep}"
