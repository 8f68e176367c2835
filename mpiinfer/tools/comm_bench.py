"""Allreduce latency and bus bandwidth under mpiexec: DDA one-shot / two-shot / auto, MPI, gloo; NCCL on CUDA.

Owns: ``bench_allreduce`` (the measurement), ``tune`` (writes the user's thresholds file,
``comm.dda.user_thresholds_path()``, read by ``DDAComm(algo="auto"|"dda")``; never a file inside the
installed package) and ``main(argv)`` behind ``mpiexec -n 2 mpiinfer bench comm [--json F] [--tune]
[--device cuda]``.  With ``--device cuda`` the buffers are CUDA tensors (``--share-gpus`` semantics: ranks
beyond the GPUs share them): DDA is ``comm.dda_cuda.CudaDDAComm`` (CuPy IPC), ``mpi`` passes device
buffers to a CUDA-aware MPI or stages them through the host (``collectives.mpi_all_reduce``), ``nccl`` is
CuPy's NCCL (refused for two ranks on one GPU: its rows then say ``skipped``), gloo is not offered; every
call is timed to the end of its work on the device (a stream synchronisation).
Communicator: ``MPI.COMM_WORLD`` (or the one passed in); gloo is initialised on a TCPStore
at 127.0.0.1 with the MPI rank and size.

Method: float32 zeros (no overflow, no denormals).  For each size the algorithms take
turns in ``rounds`` chunks (so a shift in a shared machine's load hits every column
alike); a chunk is 5 untimed calls, a barrier, then back-to-back calls (no barrier in
between, as in decode), each timed on its own.  A rank's figure is the median over all
its chunks, the reported figure the maximum over ranks.
busbw = 2 (n-1)/n * bytes / latency (GB/s, 1e9), as nccl-tests define it.
Rows: {"op": "allreduce", "algo": ..., "bytes": N, "ranks": R, "latency_us": .., "busbw_gbps": ..}
with algo "dda-1shot", "dda-2shot", "dda" (the shared-memory variant auto would pick),
"auto" (what ``--allreduce auto`` does, MPI included), "mpi", "gloo".
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from collections.abc import Sequence

import torch

from ..comm.collectives import mpi_all_reduce
from ..comm.dda import DDAComm, load_thresholds, thresholds_for, user_thresholds_path

DEFAULT_ALGOS = ("dda-1shot", "dda-2shot", "dda", "auto", "mpi", "gloo")
CUDA_ALGOS = ("dda-1shot", "dda-2shot", "dda", "auto", "nccl", "mpi")
DDA_MODE = {"dda-1shot": "1shot", "dda-2shot": "2shot", "dda": "dda", "auto": "auto"}


def default_sizes(lo: int = 8, hi: int = 64 << 20, factor: int = 2) -> list:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= factor
    return out


def iters_for(nbytes: int, iters: int) -> int:
    """Fewer iterations for large messages (at least 30: medians of fewer swing by tens of percent here)."""
    return max(30, min(iters, iters * (256 << 10) // max(nbytes, 1)))


def _init_gloo(comm):
    import torch.distributed as dist
    if dist.is_initialized():
        return dist
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    store = dist.TCPStore("127.0.0.1", port, comm.Get_size(), comm.Get_rank() == 0, timeout=__import__("datetime").timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=comm.Get_rank(), world_size=comm.Get_size())
    return dist


def _time(op, x, iters: int, warmup: int, comm, ts: list) -> None:
    """Append the seconds of ``iters`` back-to-back calls (after ``warmup`` untimed ones) to ``ts``; a CUDA
    buffer's call is timed until the device finished it."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        op(x)
    sync()
    comm.Barrier()
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        op(x)
        sync()
        ts.append(clock() - t0)


def _nccl_op(nc):
    from cupy.cuda import nccl

    from ..comm.dda_cuda import nccl_dtype

    def op(t):
        nc.allReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.dtype), nccl.NCCL_SUM,
                     torch.cuda.current_stream().cuda_stream)
    return op


def _op(algo: str, dda, comm, dist, nc=None):
    """The allreduce call of ``algo`` (a DDA mode is set on ``dda`` first)."""
    if algo in DDA_MODE:
        dda.set_algo(DDA_MODE[algo])
        return dda.all_reduce_tensor
    if algo == "mpi":
        return lambda t: mpi_all_reduce(t, comm)
    if algo == "nccl":
        return _nccl_op(nc)
    return lambda t: dist.all_reduce(t)


def bench_allreduce(sizes: Sequence[int] | None = None, algos: Sequence[str] = DEFAULT_ALGOS,
                    iters: int = 200, json_path: str | None = None, comm=None,
                    thresholds: dict | None = None, quiet: bool = False, rounds: int = 5,
                    device: str = "cpu") -> list:
    """Measure every (size, algo); print a table on rank 0; write JSON rows there; return the rows.
    ``device``: "cpu", or "cuda" for CUDA buffers (this rank's GPU: node-local rank modulo the GPUs)."""
    from mpi4py import MPI
    comm = comm if comm is not None else MPI.COMM_WORLD
    sizes = list(sizes or default_sizes())
    algos = list(dict.fromkeys(algos))
    n = comm.Get_size()
    offered = CUDA_ALGOS if device == "cuda" else DEFAULT_ALGOS
    bad = [a for a in algos if a not in offered]
    if bad:
        raise ValueError(f"unknown algorithms {bad} for {device} buffers; choose from {offered}")
    dev = torch.device("cpu")
    if device == "cuda":
        from ..comm.mesh import node_local
        from ..device import Device
        lr, ls = node_local(comm)
        d = Device.resolve("cuda", lr, ls, allow_shared_gpu=True)
        d.activate()
        dev = d.torch
    dda = None
    if any(a in DDA_MODE for a in algos):
        if device == "cuda":
            from ..comm.dda_cuda import CudaDDAComm
            dda = CudaDDAComm(comm, max_bytes=max(sizes), thresholds=thresholds)
        else:
            dda = DDAComm(comm, max_bytes=max(sizes), thresholds=thresholds)
    dist = _init_gloo(comm) if "gloo" in algos else None
    nc, nccl_err = None, None
    if "nccl" in algos:
        from ..comm.dda_cuda import nccl_communicator
        nc, nccl_err = nccl_communicator(comm)
    skipped = {"nccl": nccl_err} if nccl_err else {}
    timed = [a for a in algos if a not in skipped]
    rows = []
    # warm-up before the first size: without it the first sizes measured (8-32 B) came out 1.5-2x slower than
    # the next ones (cold caches, page faults of the shared slots, clock ramp-up)
    x = torch.zeros(max(1, sizes[0] // 4), dtype=torch.float32, device=dev)
    for a in timed:
        if a != "gloo":
            _time(_op(a, dda, comm, dist, nc), x, 0, 2000, comm, [])
    for nbytes in sizes:
        numel = max(1, nbytes // 4)
        x = torch.zeros(numel, dtype=torch.float32, device=dev)
        it = iters_for(nbytes, iters)
        chunk = max(2, -(-it // rounds))
        samples = {a: [] for a in timed}
        # algorithms take turns in ``rounds`` chunks, so a change in the machine's load
        # (shared machines) hits all of them alike instead of one column
        for _ in range(rounds):
            for a in timed:
                _time(_op(a, dda, comm, dist, nc), x, chunk, min(5, chunk), comm, samples[a])
        for a, why in skipped.items():
            rows.append({"op": "allreduce", "algo": a, "bytes": numel * 4, "ranks": n, "skipped": why})
        for a in timed:
            lat = comm.allreduce(statistics.median(samples[a]), op=MPI.MAX)
            rows.append({"op": "allreduce", "algo": a, "bytes": numel * 4, "ranks": n,
                         "latency_us": round(lat * 1e6, 3),
                         "busbw_gbps": round(2 * (n - 1) / n * numel * 4 / lat / 1e9, 4)})
    if dda is not None:
        dda.close()
    if comm.Get_rank() == 0:
        if not quiet:
            print(format_table(rows, algos, device), flush=True)
            for a, why in skipped.items():
                print(f"{a}: not measured ({why})", flush=True)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(rows, f, indent=1)
    return rows


def _fmt_size(b: int) -> str:
    for unit, k in (("MiB", 20), ("KiB", 10)):
        if b >= 1 << k and b % (1 << k) == 0:
            return f"{b >> k} {unit}"
    return f"{b} B"


def format_table(rows: list, algos: Sequence[str], device: str = "cpu") -> str:
    by = {(r["bytes"], r["algo"]): r for r in rows if "latency_us" in r}
    sizes = sorted({r["bytes"] for r in rows})
    ranks = rows[0]["ranks"] if rows else 0
    head = f"allreduce, {ranks} ranks, {device} buffers: median latency us (busbw GB/s)"
    cols = ["size"] + list(algos) + (["mpi/auto"] if "auto" in algos and "mpi" in algos else [])
    lines = [head, " | ".join(f"{c:>18}" for c in cols)]
    for s in sizes:
        cells = [f"{_fmt_size(s):>18}"]
        for a in algos:
            r = by.get((s, a))
            cells.append(f"{r['latency_us']:>9.1f} ({r['busbw_gbps']:>6.3f})" if r else f"{'-':>18}")
        if len(cols) > len(algos) + 1 and (s, "mpi") in by and (s, "auto") in by:
            cells.append(f"{by[(s, 'mpi')]['latency_us'] / by[(s, 'auto')]['latency_us']:>18.2f}")
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def pick_thresholds(rows: list) -> dict:
    """{"oneshot_max_bytes", "twoshot_max_bytes"} from rows of dda-1shot / dda-2shot / mpi.

    one-shot up to the largest size where it is the fastest of the three; two-shot up to
    the largest size where the faster DDA variant beats MPI; MPI beyond."""
    by = {(r["bytes"], r["algo"]): r["latency_us"] for r in rows}
    sizes = sorted({r["bytes"] for r in rows})
    one = two = 0
    for s in sizes:
        l1, l2, lm = by[(s, "dda-1shot")], by[(s, "dda-2shot")], by[(s, "mpi")]
        if l1 <= min(l2, lm):
            one = s
        if min(l1, l2) < lm:
            two = s
    return {"oneshot_max_bytes": one, "twoshot_max_bytes": max(one, two)}


def tune(sizes: Sequence[int] | None = None, iters: int = 200, path=None, comm=None) -> dict:
    """Measure and merge this world size's thresholds into ``path`` (default: the user's thresholds file;
    rank 0 writes)."""
    from mpi4py import MPI
    comm = comm if comm is not None else MPI.COMM_WORLD
    path = user_thresholds_path() if path is None else path
    rows = bench_allreduce(sizes or default_sizes(hi=16 << 20), ("dda-1shot", "dda-2shot", "mpi"),
                           iters, None, comm, quiet=True)
    th = pick_thresholds(rows)
    if comm.Get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            doc = {}
        doc.setdefault("about", "max message bytes for DDA one-shot and two-shot per world size; "
                                 "written by `mpiinfer bench comm --tune`")
        doc.setdefault("world", {})[str(comm.Get_size())] = dict(
            th, measured=time.strftime("%Y-%m-%d"), host=socket.gethostname(), cpus=os.cpu_count())
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"thresholds for {comm.Get_size()} ranks: {th} -> {path}", flush=True)
    return th


def parse_sizes(spec: str) -> list:
    """"8:64M" (powers of 2), "8:64M:4" (powers of 4) or "8,1K,64K"."""
    def num(s):
        s = s.strip().upper().rstrip("B")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        return int(s[:-1] if mult > 1 else s) * mult
    if ":" in spec:
        parts = spec.split(":")
        return default_sizes(num(parts[0]), num(parts[1]), int(parts[2]) if len(parts) > 2 else 2)
    return [num(s) for s in spec.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mpiinfer bench comm", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8:64M", help='"8:64M" powers of 2, "8:64M:4" powers of 4, or a list "8,1K,64K"')
    ap.add_argument("--algos", default=None,
                    help=f"comma list (default: {','.join(DEFAULT_ALGOS)}; with --device cuda: {','.join(CUDA_ALGOS)})")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the buffers live")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="algorithms take turns this many times per size")
    ap.add_argument("--json", dest="json_path", default=None)
    ap.add_argument("--tune", action="store_true",
                    help="measure and write the thresholds of this world size into --thresholds-file")
    ap.add_argument("--thresholds-file", default=None,
                    help=f"thresholds file to write (--tune) or read (default: {user_thresholds_path()}, "
                         "or $MPIINFER_DDA_THRESHOLDS)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.tune:
        tune(parse_sizes(a.sizes) if a.sizes != "8:64M" else None, a.iters, a.thresholds_file)
        return 0
    from mpi4py import MPI
    th = None
    if a.thresholds_file is not None:
        th = thresholds_for(MPI.COMM_WORLD.Get_size(), load_thresholds(a.thresholds_file))
    algos = a.algos or ",".join(CUDA_ALGOS if a.device == "cuda" else DEFAULT_ALGOS)
    bench_allreduce(parse_sizes(a.sizes), [s.strip() for s in algos.split(",") if s.strip()],
                    a.iters, a.json_path, thresholds=th, rounds=a.rounds, device=a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
