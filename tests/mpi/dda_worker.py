"""MPI worker for tests/mpi/test_dda.py: run under ``mpiexec -n N python tests/mpi/dda_worker.py MODE ...``.

Modes
  check   random sizes (odd ones included), three dtypes, every algorithm: results bitwise
          identical across ranks (hash allgather) and close to MPI's Allreduce; allgather too.
  burst   ``--iters`` back-to-back allreduces with no barrier or other traffic in between
          (integer-valued inputs, so the expected sum is exact and computed locally),
          then the same interleaved with Bcast / Sendrecv / pickled allreduce on the same comm.
  die     rank ``--die-rank`` calls os._exit in the middle of the sequence; the others must
          raise DDATimeout (printed as ``DDATIMEOUT: <message>``) and exit with code 17.
Prints ``OK <mode>`` on rank 0 when every check passed; any failure raises (nonzero exit).
"""
import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import numpy as np
import torch
from mpi4py import MPI

from mpiinfer.comm.collectives import all_gather, all_reduce, alltoallv, mpi_all_reduce
from mpiinfer.comm.dda import DDAComm, DDATimeout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def digest(t):
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def check(comm, args):
    rank, n = comm.Get_rank(), comm.Get_size()
    g = np.random.default_rng(args.seed)            # same on every rank: same sizes
    sizes = [1, 7, 1000, 16, 4097, 65537] + [int(s) for s in g.integers(1, 20000, args.random)]
    if args.big:
        sizes.append(1000003)
    comms = {a: DDAComm(comm, max_bytes=8 << 20, algo=a, timeout=args.timeout)
             for a in ("1shot", "2shot", "auto")}
    count = 0
    for size in sizes:
        for dname in args.dtypes.split(","):
            dt = DTYPES[dname]
            x = torch.randn(size, generator=torch.Generator().manual_seed(size * 131 + rank)).to(dt)
            ref = mpi_all_reduce(x.clone(), comm).float()
            results = {}
            for a, dc in comms.items():
                y = all_reduce(x.clone(), dc)
                assert y.dtype == dt and y.shape == x.shape
                h = comm.allgather(digest(y))
                assert len(set(h)) == 1, f"{a} {dname} size {size}: ranks differ"
                err = (y.float() - ref).abs().max().item()
                scale = max(1.0, ref.abs().max().item())
                assert err <= TOL[dt] * scale * n, f"{a} {dname} size {size}: max err {err}"
                results[a] = h[0]
                count += 1
            # one-shot and two-shot use the same sum order: same bits
            assert results["1shot"] == results["2shot"], f"{dname} size {size}: 1shot != 2shot"
        # allgather along the last and the first dim of a 2-d tensor
        x = torch.full((3, size % 50 + 1), float(rank))
        for dim in (0, -1):
            got = all_gather(x, comms["auto"], dim)
            want = torch.cat([torch.full_like(x, float(r)) for r in range(n)], dim=dim)
            assert torch.equal(got, want), f"allgather dim {dim} size {size}"
    # the DDA object stands in for the communicator in allreduce / allgather only (Mesh.tp_reduce): it has the
    # communicator's size and rank, and no other MPI call reaches the communicator through it
    dc = comms["auto"]
    assert dc.Get_size() == n and dc.Get_rank() == rank
    assert not hasattr(dc, "bcast") and not hasattr(dc, "Alltoallv")
    # alltoallv (on the MPI communicator): rank r sends (r + d) % 3 rows to rank d, row value = 100 r + d
    counts = [(rank + d) % 3 for d in range(n)]
    rows = torch.cat([torch.full((c, 4), 100.0 * rank + d) for d, c in enumerate(counts)]).to(torch.bfloat16)
    got, rc = alltoallv(rows, counts, comm)
    assert rc == [(s + rank) % 3 for s in range(n)]
    want = torch.cat([torch.full((c, 4), 100.0 * s + rank) for s, c in enumerate(rc)]).to(torch.bfloat16)
    assert torch.equal(got, want)
    for dc in comms.values():
        dc.close()
    return count


def burst(comm, args):
    rank, n = comm.Get_rank(), comm.Get_size()
    dc = DDAComm(comm, max_bytes=1 << 20, algo=args.algo, timeout=args.timeout)
    sizes = [1, 7, 64, 333, 4096, 20001]
    ex = {}
    for interleave in (False, True):
        for i in range(args.iters):
            size = sizes[i % len(sizes)]
            dt = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
            # integers below 2**8 (exact in bf16, sums exact in float32 and in the output dtype)
            base = torch.arange(size, dtype=torch.float32) % 7
            x = (base + (rank + i) % 5).to(dt)
            key = (size, dt, i % 5)
            if key not in ex:
                ex[key] = sum(base + (r + i) % 5 for r in range(n)).to(dt)
            guard = None
            if interleave and dt == torch.float32:
                # a view into a larger buffer (storage offset): the sum lands in the view, nothing around it
                buf = torch.full((size + 5,), -1.0)
                buf[3:3 + size] = x
                x, guard = buf[3:3 + size], buf
            y = dc.all_reduce_tensor(x)
            if not torch.equal(y, ex[key]):
                raise AssertionError(f"burst call {i} (interleave={interleave}) size {size} {dt}: wrong sum")
            if guard is not None:
                assert y.data_ptr() == guard[3:].data_ptr() and torch.equal(guard[:3], torch.full((3,), -1.0)) \
                    and torch.equal(guard[3 + size:], torch.full((2,), -1.0)), "allreduce wrote outside the tensor"
            if interleave:
                k = i % 3
                if k == 0:
                    v = np.full(5, rank, dtype=np.int64)
                    comm.Bcast(v, root=i % n)
                    assert (v == i % n).all()
                elif k == 1:
                    got = comm.sendrecv(rank, dest=(rank + 1) % n, source=(rank - 1) % n)
                    assert got == (rank - 1) % n
                else:
                    assert comm.allreduce(1) == n
    dc.close()
    return 2 * args.iters


def die(comm, args):
    rank = comm.Get_rank()
    dc = DDAComm(comm, max_bytes=1 << 16, algo=args.algo, timeout=args.timeout)
    x = torch.ones(100)
    try:
        for i in range(50):
            if rank == args.die_rank and i == 20:
                os._exit(1)
            dc.all_reduce_tensor(x.clone())
    except DDATimeout as e:
        print(f"DDATIMEOUT: {e}", flush=True)
        os._exit(17)
    raise AssertionError("no timeout")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("check", "burst", "die"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random", type=int, default=4)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--algo", default="auto")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--die-rank", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    count = {"check": check, "burst": burst, "die": die}[args.mode](comm, args)
    comm.Barrier()
    if comm.Get_rank() == 0:
        print(f"OK {args.mode} {count}", flush=True)


if __name__ == "__main__":
    main()
