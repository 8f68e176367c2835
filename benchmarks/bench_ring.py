#!/usr/bin/env python
"""Prefill attention time of ring attention (``mpiinfer.parallel.ring``) at cp=1 vs cp=N.

For one sequence of ``--seq-len`` tokens with Llama-3.2-1B attention shapes by default
(32 query heads, 8 KV heads, head_dim 64), each CP rank holds its zigzag shard of random
Q/K/V and runs ``ring_attention`` over the CP group (one layer's attention, no projections),
with one thread per rank.  Reported per cp:

  time        median over ``--repeat`` runs of the slowest rank's ring_attention time
  efficiency  t(cp=1) / (cp * t(cp))
  GFLOP/s     4 * head_dim * n_q * (score elements computed) / time, per rank
  wait        share of the time the slowest-waiting rank spent blocked in ``Waitall``
              (includes skew between ranks, not only transfers)
  poll        share of the time spent in the ``Testall`` progress polls between matmul chunks
              (with MPICH's shared-memory transport this is where the block is copied: CPU
              work that no overlap can remove on a CPU-only rank)
  comm        time of the same ring transfers alone (no compute), per rank
  hidden      share of that communication not waited for: 1 - w / comm, with w the Waitall
              time of the LEAST-waiting rank (the last to arrive waits only for what is left of
              the transfer, not for a slower peer)

Usage::

    python benchmarks/bench_ring.py --seq-len 4096                 # cp=1 and cp=2
    python benchmarks/bench_ring.py --seq-len 16384,32768 --repeat 3 --dtype bfloat16

The driver launches ``mpiexec -n CP python benchmarks/bench_ring.py --worker ...`` per cp
(with a timeout) and writes JSON to benchmarks/results/ring.json (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", default="4096", help="comma list of sequence lengths")
    ap.add_argument("--cp", default="1,2", help="comma list of CP sizes (ranks)")
    ap.add_argument("--n-q", type=int, default=32)
    ap.add_argument("--n-kv", type=int, default=8)
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per mpiexec launch")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "ring.json"))
    ap.add_argument("--no-progress", action="store_true",
                    help="do not poll MPI (Testall) between matmul chunks: transfers then move only in Waitall")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- worker (under mpiexec)

def worker(a):
    import torch
    from mpi4py import MPI

    from mpiinfer.comm.collectives import as_buffer
    from mpiinfer.parallel.ring import RingPlan, ring_attention
    from mpiinfer.parallel.shard import shard_positions

    torch.set_num_threads(a.threads)
    comm = MPI.COMM_WORLD
    cp, rank = comm.Get_size(), comm.Get_rank()
    L = int(a.seq_len)
    dtype = getattr(torch, a.dtype)
    pos = torch.from_numpy(shard_positions(L, cp, rank))
    T = len(pos)
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(T, a.n_q, a.hd, generator=g).to(dtype)
    k = torch.randn(T, a.n_kv, a.hd, generator=g).to(dtype)
    v = torch.randn(T, a.n_kv, a.hd, generator=g).to(dtype)
    scale = a.hd ** -0.5
    plan = RingPlan.build(pos, pos, comm, a.window)        # once per step in the engine, shared by layers

    ring_attention(q, k, v, pos, pos, comm, scale, a.window, plan=plan)   # warm-up
    runs = []
    for _ in range(a.repeat):
        comm.Barrier()
        st = {}
        ring_attention(q, k, v, pos, pos, comm, scale, a.window, plan=plan, stats=st,
                       progress=not a.no_progress)
        runs.append(st)

    # the same ring transfers with no compute in between
    n = 2 * a.n_kv * a.hd
    bufs = [torch.zeros(n * max(plan.sizes), dtype=dtype) for _ in range(2)]
    comm_times = []
    for _ in range(a.repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        cur = 0
        for t in range(cp - 1):
            src, nxt_src = (rank - t) % cp, (rank - t - 1) % cp
            reqs = [comm.Irecv(as_buffer(bufs[1 - cur][:n * plan.sizes[nxt_src]]), source=(rank - 1) % cp, tag=1),
                    comm.Isend(as_buffer(bufs[cur][:n * plan.sizes[src]]), dest=(rank + 1) % cp, tag=1)]
            MPI.Request.Waitall(reqs)
            cur = 1 - cur
        comm_times.append(time.perf_counter() - t0)

    mine = dict(rank=rank, tokens=T, elems=plan.elems, pairs=plan.pairs,
                total_s=statistics.median(r["total_s"] for r in runs),
                wait_s=statistics.median(r["wait_s"] for r in runs),
                poll_s=statistics.median(r["poll_s"] for r in runs),
                comm_s=statistics.median(comm_times), bytes_sent=runs[0]["bytes_sent"],
                totals=[r["total_s"] for r in runs])
    every = comm.gather(mine, root=0)
    if rank == 0:
        print("RESULT " + json.dumps(every), flush=True)


# --------------------------------------------------------------------------- driver

def drive(a):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("mpiexec not found on PATH")
    rows = []
    for L in [int(x) for x in a.seq_len.split(",")]:
        t1 = None
        for cp in [int(x) for x in a.cp.split(",")]:
            cmd = [mpiexec, "-n", str(cp), sys.executable, __file__, "--worker", "--seq-len", str(L),
                   "--n-q", str(a.n_q), "--n-kv", str(a.n_kv), "--hd", str(a.hd), "--dtype", a.dtype,
                   "--repeat", str(a.repeat), "--threads", str(a.threads)]
            if a.window is not None:
                cmd += ["--window", str(a.window)]
            if a.no_progress:
                cmd += ["--no-progress"]
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads),
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"cp={cp} L={L} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            ranks = json.loads(line[0][len("RESULT "):])
            # per repeat, the slowest rank; then the median over repeats
            t = statistics.median(max(r["totals"][i] for r in ranks) for i in range(a.repeat))
            if cp == 1:
                t1 = t
            wait = max(r["wait_s"] for r in ranks)
            wait_min = min(r["wait_s"] for r in ranks)
            poll = max(r["poll_s"] for r in ranks)
            comm_s = max(r["comm_s"] for r in ranks)
            flops = max(4 * a.hd * a.n_q * r["elems"] / r["total_s"] for r in ranks) / 1e9
            row = dict(seq_len=L, cp=cp, progress=not a.no_progress, time_s=t,
                       efficiency=(t1 / (cp * t)) if t1 else None,
                       gflops_per_rank=flops, wait_share=wait / t if cp > 1 else 0.0,
                       poll_share=poll / t, comm_s=comm_s,
                       wait_s=[r["wait_s"] for r in ranks],
                       hidden_share=(max(0.0, 1 - wait_min / comm_s) if cp > 1 and comm_s > 0 else None),
                       bytes_sent_per_rank=max(r["bytes_sent"] for r in ranks),
                       elems=[r["elems"] for r in ranks], tokens=[r["tokens"] for r in ranks])
            rows.append(row)
            eff = f"{row['efficiency']:.2f}" if row["efficiency"] is not None else "  - "
            hid = f"{row['hidden_share']:.2f}" if row["hidden_share"] is not None else "  - "
            print(f"L={L:6d} cp={cp} time {t:8.3f} s  eff {eff}  {flops:6.1f} GFLOP/s/rank  "
                  f"wait {row['wait_share']:.4f}  poll {row['poll_share']:.4f}  "
                  f"comm alone {comm_s * 1e3:7.1f} ms  hidden {hid}", flush=True)
    out = dict(when=time.strftime("%Y-%m-%dT%H:%M:%S"), args={k: v for k, v in vars(a).items() if k != "worker"},
               cpu_count=os.cpu_count(), rows=rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    args = parse_args()
    worker(args) if args.worker else drive(args)
