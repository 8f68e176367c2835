"""Collectives on torch tensors over an mpi4py communicator.

Owns: all_reduce / all_gather / broadcast of tensors with the buffer (uppercase)
API.  A ``None`` communicator or one of size 1 makes every call the identity, so
single-process code paths pay nothing.  CPU tensors are passed as NumPy views
(zero copy); CUDA tensors go through the device backend's staging rules.
"""
from __future__ import annotations

import torch

_MPI = None


def mpi_module():
    global _MPI
    if _MPI is None:
        from mpi4py import MPI
        _MPI = MPI
    return _MPI


def as_buffer(t: torch.Tensor):
    """A buffer spec for mpi4py from a contiguous CPU tensor (bfloat16 sent as raw 16-bit words)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _is_trivial(comm) -> bool:
    return comm is None or comm.Get_size() == 1


def all_reduce(t: torch.Tensor, comm) -> torch.Tensor:
    """Sum ``t`` over ``comm`` in place and return it.

    A communicator object with an ``all_reduce_tensor`` method (``dist.dda.DDAComm``)
    does the work itself; an mpi4py communicator gets MPI's Allreduce."""
    if _is_trivial(comm):
        return t
    if hasattr(comm, "all_reduce_tensor"):
        return comm.all_reduce_tensor(t)
    return mpi_all_reduce(t, comm)


def mpi_all_reduce(t: torch.Tensor, comm) -> torch.Tensor:
    """MPI Allreduce in place (16-bit floats summed in float32)."""
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        # MPI has no portable 16-bit float sum: reduce in float32 and cast back.
        f = t.float().contiguous()
        comm.Allreduce(mpi_module().IN_PLACE, f.numpy(), op=mpi_module().SUM)
        t.copy_(f)
        return t
    assert t.is_contiguous()
    comm.Allreduce(mpi_module().IN_PLACE, as_buffer(t), op=mpi_module().SUM)
    return t


def all_gather(t: torch.Tensor, comm, dim: int = -1) -> torch.Tensor:
    """Concatenate equal-shaped ``t`` from every rank of ``comm`` along ``dim``.

    Delegates to ``comm.all_gather_tensor`` when the communicator object has one."""
    if _is_trivial(comm):
        return t
    if hasattr(comm, "all_gather_tensor"):
        return comm.all_gather_tensor(t, dim)
    return mpi_all_gather(t, comm, dim)


def mpi_all_gather(t: torch.Tensor, comm, dim: int = -1) -> torch.Tensor:
    n = comm.Get_size()
    t = t.contiguous()
    out = torch.empty((n,) + tuple(t.shape), dtype=t.dtype)
    comm.Allgather(as_buffer(t), as_buffer(out))
    dim = dim % t.dim()
    return torch.cat(out.unbind(0), dim=dim)


def gather_to_root(t: torch.Tensor, comm, dim: int = -1, root: int = 0):
    """Concatenate ``t`` along ``dim`` on ``root`` only (others get None)."""
    if _is_trivial(comm):
        return t
    n = comm.Get_size()
    t = t.contiguous()
    out = torch.empty((n,) + tuple(t.shape), dtype=t.dtype) if comm.Get_rank() == root else None
    comm.Gather(as_buffer(t), as_buffer(out) if out is not None else None, root=root)
    if out is None:
        return None
    return torch.cat(out.unbind(0), dim=dim % t.dim())


def broadcast(t: torch.Tensor, comm, root: int = 0) -> torch.Tensor:
    if _is_trivial(comm):
        return t
    comm.Bcast(as_buffer(t), root=root)
    return t
