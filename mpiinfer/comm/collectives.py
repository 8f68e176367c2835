"""Collectives on torch tensors over an mpi4py communicator.

Owns: all_reduce / all_gather / gather_to_root of tensors, and the uneven ones of
expert parallelism (``alltoallv``, ``all_gather_rows``), with the buffer (uppercase)
API.  A ``None`` communicator or one of size 1 makes every call but ``alltoallv`` the
identity, so single-process code paths pay nothing.  ``all_reduce`` and ``all_gather``
take either an mpi4py communicator or a direct-data-access one (``Mesh.tp_reduce``:
``comm.dda.DDAComm``, ``comm.dda_cuda.CudaDDAComm``), which does the work itself; the
other calls take mpi4py communicators.  The MPI paths pass CPU tensors as NumPy views
(zero copy) and stage CUDA tensors through host memory (a copy each way; the result is on
the input's device): correct with any MPI, and the fast GPU paths are the DDA
communicators' (CuPy IPC, NCCL, CUDA-aware MPI in ``comm.dda_cuda``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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

    A direct-data-access communicator (``all_reduce_tensor``) does the work itself; an
    mpi4py communicator gets MPI's Allreduce."""
    if _is_trivial(comm):
        return t
    if hasattr(comm, "all_reduce_tensor"):
        return comm.all_reduce_tensor(t)
    return mpi_all_reduce(t, comm)


def mpi_all_reduce(t: torch.Tensor, comm) -> torch.Tensor:
    """MPI Allreduce in place (16-bit floats summed in float32; a CUDA tensor through host memory)."""
    if t.is_cuda:
        h = t.to("cpu", torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype)
        mpi_all_reduce(h, comm)
        return t.copy_(h)
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
    if t.is_cuda:
        return mpi_all_gather(t.cpu(), comm, dim).to(t.device)
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
    if t.is_cuda:
        out = gather_to_root(t.cpu(), comm, dim, root)
        return None if out is None else out.to(t.device)
    n = comm.Get_size()
    t = t.contiguous()
    out = torch.empty((n,) + tuple(t.shape), dtype=t.dtype) if comm.Get_rank() == root else None
    comm.Gather(as_buffer(t), as_buffer(out) if out is not None else None, root=root)
    if out is None:
        return None
    return torch.cat(out.unbind(0), dim=dim % t.dim())


# ---------------------------------------------------------------- uneven (expert parallelism)

def all_gather_rows(t: torch.Tensor, shares: list, comm) -> torch.Tensor:
    """Concatenate each rank's rows (rank r holds rows shares[r]) over ``comm``."""
    if _is_trivial(comm):
        return t
    if t.is_cuda:
        return all_gather_rows(t.cpu(), shares, comm).to(t.device)
    MPI = mpi_module()
    h = t.shape[1]
    counts = [(b - a) * h for a, b in shares]
    displs = [a * h for a, _ in shares]
    out = torch.empty(shares[-1][1], h, dtype=t.dtype)
    word = t.element_size()
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[word]
    mtype = {2: MPI.INT16_T, 4: MPI.INT32_T, 8: MPI.INT64_T}[word]
    comm.Allgatherv(t.contiguous().view(view).numpy(), [out.view(view).numpy(), (counts, displs), mtype])
    return out


def alltoallv(rows, send_counts: Sequence[int], comm, recv_counts: Sequence[int] | None = None):
    """Send ``send_counts[r]`` consecutive rows of ``rows`` to rank r; return (received rows, recv counts).

    ``rows``: a contiguous CPU torch tensor or NumPy array of shape (N, ...), rows grouped by
    destination rank in rank order.  Counts are exchanged first (``Alltoall``) unless the caller
    already knows ``recv_counts`` (a second payload with the same routing, or the reply to an
    earlier exchange), then the payload with one ``Alltoallv``; bfloat16 travels as 16-bit words."""
    if isinstance(rows, torch.Tensor) and rows.is_cuda:
        res, counts = alltoallv(rows.cpu(), send_counts, comm, recv_counts)
        return res.to(rows.device), counts
    MPI = mpi_module()
    is_torch = isinstance(rows, torch.Tensor)
    arr = rows
    if is_torch:
        arr = (rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows).contiguous().numpy()
    n = comm.Get_size()
    send_counts = np.asarray(send_counts, dtype=np.int64)
    if send_counts.shape != (n,) or send_counts.sum() != arr.shape[0]:
        raise ValueError(f"send_counts must have {n} entries summing to {arr.shape[0]} rows, got {send_counts.tolist()}")
    if recv_counts is None:
        recv_counts = np.empty(n, dtype=np.int64)
        comm.Alltoall(send_counts, recv_counts)
    else:
        recv_counts = np.asarray(recv_counts, dtype=np.int64)
    row = int(np.prod(arr.shape[1:], dtype=np.int64))
    out = np.empty((int(recv_counts.sum()),) + arr.shape[1:], dtype=arr.dtype)
    sc, rc = send_counts * row, recv_counts * row
    sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
    rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
    mt = MPI._typedict[arr.dtype.char]
    comm.Alltoallv([arr, (sc, sd), mt], [out, (rc, rd), mt])
    if is_torch:
        res = torch.from_numpy(out)
        if rows.dtype == torch.bfloat16:
            res = res.view(torch.bfloat16)
        return res, recv_counts.tolist()
    return out, recv_counts.tolist()
