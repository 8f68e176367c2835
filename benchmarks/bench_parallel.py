"""Tensor parallelism on one machine: per-rank peak RSS and load time at tp=1/2/4, and decode step time at
tp=2 vs tp=1 with the same total number of threads, with the share of time spent in communication.

    python benchmarks/bench_parallel.py --model /work/models/llama-1b            # launches mpiexec itself
    python benchmarks/bench_parallel.py --model DIR --tps 1,2 --threads-total 2 --json benchmarks/results/parallel.json

Peak RSS is VmHWM of each rank after loading (weights + KV cache + runtime), measured with a KV budget of
64 MiB so the weights dominate; the runtime's fixed overhead is measured as the VmHWM of a rank that imported
torch/mpi4py and built the mesh but loaded nothing. tp=4 on a 2-core machine oversubscribes: its step times are
not meaningful (memory and load time are).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    import torch
    from mpi4py import MPI

    import mpiinfer.models.llama as llama_mod
    import mpiinfer.models.moe as moe_mod
    import mpiinfer.parallel.linear as linear_mod
    from mpiinfer.comm.mesh import Layout, Mesh
    from mpiinfer.config import EngineConfig, SamplingParams
    from mpiinfer.device import Device
    from mpiinfer.engine.generate import Engine
    from mpiinfer.engine.runner import ModelRunner
    from mpiinfer.messages import Request
    from mpiinfer.replica import follow

    world = MPI.COMM_WORLD
    torch.set_num_threads(args.threads)
    mesh = Mesh.build(world, Layout(world=world.Get_size(), tp=world.Get_size()), args.allreduce)
    base_rss = vm_hwm()
    # count time inside the allreduces of the layers (the only communication of a TP decode step)
    comm_time = [0.0]
    orig = linear_mod.all_reduce

    def timed(t, comm):
        t0 = time.perf_counter()
        r = orig(t, comm)
        comm_time[0] += time.perf_counter() - t0
        return r
    linear_mod.all_reduce = timed
    moe_mod.all_reduce = timed
    gather_orig = llama_mod.gather_to_root

    def timed_gather(*a, **k):
        t0 = time.perf_counter()
        r = gather_orig(*a, **k)
        comm_time[0] += time.perf_counter() - t0
        return r
    llama_mod.gather_to_root = timed_gather

    world.Barrier()
    t0 = time.perf_counter()
    runner = ModelRunner(args.model, EngineConfig(kv_budget_bytes=64 << 20, max_batch=16), mesh, Device("cpu"))
    world.Barrier()
    load_s = time.perf_counter() - t0
    rss_after_load = vm_hwm()
    rows = {"tp": mesh.tp, "allreduce": args.allreduce, "threads_per_rank": args.threads, "load_s": load_s,
            "weight_bytes": runner.weight_bytes, "bytes_read": runner.weight_bytes_read,
            "peak_rss_after_load": rss_after_load, "runtime_rss_before_load": base_rss}
    steps = {}
    for batch in (1, 16):
        if not args.steps:
            break
        if mesh.is_replica_leader:
            class _Tok:
                def decode(self, ids):
                    return ""
            eng = Engine(runner, _Tok(), max_batch=batch, step_tokens=4096)
            g = torch.Generator().manual_seed(0)
            for i in range(batch):
                eng.add(Request(i, i, SamplingParams(max_tokens=args.steps + 1, ignore_eos=True),
                                prompt_token_ids=torch.randint(0, 1000, (32,), generator=g).tolist()))
            eng.step()   # prefill
            times, comms = [], []
            while eng.has_work():
                c0, t1 = comm_time[0], time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t1)
                comms.append(comm_time[0] - c0)
            runner.release_followers()
            times.sort()
            med = times[len(times) // 2]
            steps[batch] = {"median_step_ms": med * 1e3, "tok_s": batch / med,
                            "comm_share": sum(comms) / sum(times)}
        else:
            follow(runner)
    rows["decode"] = steps
    all_rows = world.gather(rows, root=0)
    mesh.close()
    if world.Get_rank() == 0:
        print(json.dumps(all_rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/models/llama-1b")
    ap.add_argument("--tps", default="1,2,4")
    ap.add_argument("--threads-total", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size (0: memory only)")
    ap.add_argument("--json", default="benchmarks/results/parallel.json")
    ap.add_argument("--allreduce", default="mpi", help="comma list of TP allreduce algorithms to compare "
                                                     "(mpi, dda, auto); tp=1 runs once")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    mpiexec = shutil.which("mpiexec")
    results = []
    for tp in [int(x) for x in args.tps.split(",")]:
        threads = max(1, args.threads_total // tp)
        steps = args.steps if tp <= args.threads_total else 0
        for algo in (args.allreduce.split(",") if tp > 1 else ["mpi"]):
            cmd = [mpiexec, "-n", str(tp), sys.executable, __file__, "--worker", "--model", args.model,
                   "--threads", str(threads), "--steps", str(steps), "--allreduce", algo]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
            if p.returncode != 0:
                print(p.stderr, file=sys.stderr)
                return 1
            rows = json.loads(p.stdout.strip().splitlines()[-1])
            results.append(rows)
    full = results[0][0]["weight_bytes"] * results[0][0]["tp"] if results else 0
    print(f"{'tp':>3} {'rank':>4} {'weights GB':>10} {'read GB':>8} {'peak RSS GB':>11} {'runtime GB':>10} "
          f"{'RSS-runtime / (W/tp)':>20} {'load s':>7}")
    for rows in results:
        for r, row in enumerate(rows):
            share = full / row["tp"]
            print(f"{row['tp']:>3} {r:>4} {row['weight_bytes'] / 1e9:>10.3f} {row['bytes_read'] / 1e9:>8.3f} "
                  f"{row['peak_rss_after_load'] / 1e9:>11.3f} {row['runtime_rss_before_load'] / 1e9:>10.3f} "
                  f"{(row['peak_rss_after_load'] - row['runtime_rss_before_load']) / share:>20.3f} "
                  f"{row['load_s']:>7.1f}")
    print(f"\n{'tp':>3} {'allreduce':>9} {'threads/rank':>12} {'batch':>5} {'step ms':>8} {'tok/s':>7} "
          f"{'comm share':>10}")
    for rows in results:
        for b, d in sorted(rows[0]["decode"].items(), key=lambda kv: int(kv[0])):
            print(f"{rows[0]['tp']:>3} {rows[0]['allreduce']:>9} {rows[0]['threads_per_rank']:>12} {b:>5} "
                  f"{d['median_step_ms']:>8.1f} {d['tok_s']:>7.2f} {d['comm_share']:>10.1%}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
