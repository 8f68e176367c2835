"""Coordinator capacity: how many records per second world rank 0 reads, dispatches, collects, journals and
writes, with the model-free engine (``mpiinfer run --engine null``) on dp = 1, 2, 4 replicas, and how many
replicas one coordinator could feed.

    python benchmarks/bench_coordinator.py [--n 200000] [--dp 1,2,4] [--rounds 2] [--json PATH]

Each record is tiny (``{"id": "r17", "prompt": "..."}``, ``--max-tokens 4`` made-up tokens per result), so the
job is bound by rank 0 alone.  Runs alternate over the dp sizes for ``--rounds`` rounds; the table shows the
best round of each (the machine is shared: the best is the least disturbed).  Columns:

- **records/s**: the job's records / its wall time (from the summary; start-up excluded).
- **rank 0 CPU us/rec**: world rank 0's CPU time per record (the summary's ``rank0_cpu_s``): what the
  coordinator costs when it has a core to itself, which it has not once the ranks outnumber the cores.
- **capacity rec/s**: 1e6 / (CPU us/rec): the rate rank 0 sustains on a core of its own.
- **replicas at R rec/s**: capacity / R (``--replica-rate``, default 10 records/s: a fast GPU replica on
  short chat answers): how many replicas one coordinator can feed before it becomes the bottleneck.

Ranks beyond the cores oversubscribe them (the replica leaders poll MPI): the wall-clock rate of those rows
then measures the machine, not the coordinator; the CPU column stays meaningful.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_input(path: str, n: int) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"r{i}", "prompt": f"tiny prompt number {i}"}) + "\n" for i in range(n))


def run_once(dp: int, inp: str, out: str, fmt: str, timeout: float) -> dict:
    mpiexec = shutil.which("mpiexec")
    launch = [mpiexec, "-n", str(dp)] if dp > 1 else []
    cmd = [*launch, sys.executable, "-m", "mpiinfer", "run", "--engine", "null", "-i", inp, "-o", out,
           "--max-tokens", "4", "--overwrite", "-q", *(["--output-format", fmt] if fmt != "jsonl" else [])]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    s = json.load(open(out + ".summary.json"))
    with open(out, "rb") as f:
        lines = sum(1 for _ in f)
    return {"dp": dp, "format": fmt, "records": s["records"], "lines": lines, "job_wall_s": s["wall_time_s"],
            "process_wall_s": wall, "records_per_s": s["records_per_s"], "rank0_cpu_s": s["rank0_cpu_s"],
            "cpu_us_per_record": 1e6 * s["rank0_cpu_s"] / max(1, s["records"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="records in the input")
    ap.add_argument("--dp", default="1,2,4", help="comma list of replica counts")
    ap.add_argument("--formats", default="jsonl,openai", help="output formats (openai: OpenAI batch output)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--replica-rate", type=float, default=10.0, help="records/s one replica finishes")
    ap.add_argument("--json", default=None, help="where to save results (default: benchmarks/results/"
                    "coordinator.json, coordinator_quick.json with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 5,000 records, one round")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.rounds = 5000, 1
    if a.json is None:
        a.json = os.path.join(ROOT, "benchmarks", "results", "coordinator_quick.json" if a.quick else "coordinator.json")
    dps = [int(x) for x in a.dp.split(",")]
    fmts = a.formats.split(",")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = tempfile.mkdtemp(prefix="bench_coord_")
    try:
        inp = os.path.join(work, "tiny.jsonl")
        make_input(inp, a.n)
        runs = []
        for rnd in range(a.rounds):
            for dp in dps:
                for fmt in fmts:
                    out = os.path.join(work, f"out_{dp}_{fmt}.jsonl")
                    r = run_once(dp, inp, out, fmt, timeout=max(600, a.n / 200))
                    if r["records"] != a.n or r["lines"] != a.n:
                        raise RuntimeError(f"dp={dp} {fmt}: {r['records']} records, {r['lines']} lines, not {a.n}")
                    r["round"] = rnd
                    runs.append(r)
                    print(f"  round {rnd} dp={dp} {fmt}: {r['records_per_s']:8.0f} rec/s, "
                          f"{r['cpu_us_per_record']:6.1f} CPU us/rec", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for dp in dps:
        for fmt in fmts:
            mine = [r for r in runs if r["dp"] == dp and r["format"] == fmt]
            best = max(mine, key=lambda r: r["records_per_s"])
            cpu = min(r["cpu_us_per_record"] for r in mine)
            cap = 1e6 / cpu
            rows.append({"dp": dp, "format": fmt, "records_per_s": best["records_per_s"], "cpu_us_per_record": cpu,
                         "capacity_records_per_s": cap, "replicas_fed": cap / a.replica_rate,
                         "oversubscribed": dp > cores, "runs": mine})
    print(f"\ncoordinator capacity, {a.n} tiny records, --engine null, {cores} cores "
          f"(best of {a.rounds} round(s)):")
    print(f"| dp | output | records/s | rank 0 CPU us/rec | capacity rec/s | replicas at {a.replica_rate:g} rec/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        note = " (oversubscribed)" if r["oversubscribed"] else ""
        print(f"| {r['dp']} | {r['format']} | {r['records_per_s']:.0f}{note} | {r['cpu_us_per_record']:.1f} | "
              f"{r['capacity_records_per_s']:.0f} | {r['replicas_fed']:.0f} |")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"config": {"n": a.n, "rounds": a.rounds, "cores": cores, "replica_rate": a.replica_rate,
                              "dp": dps, "formats": fmts}, "rows": rows}, f, indent=1)
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
