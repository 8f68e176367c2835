#!/usr/bin/env python
"""Matmul microbenchmark behind ``mpiinfer/kernels.py``'s choice of CPU kernel.

For each weight ``w`` of shape (out, in) (Hugging Face layout) and each number of
rows ``M`` of the activation ``x`` (M, in), times ``y = x @ w.T`` these ways:

  mkl       ``x @ w.t()``                 float32 (MKL sgemm)
  linear    ``F.linear(x, w)``            float32
  onednn    ``torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")``
                                          float32, plain (not pre-packed) weight;
                                          what ``mpiinfer.kernels.linear`` calls on CPU
  packed    the same on ``kernels.pack(w)`` float32 (oneDNN's blocked layout, reordered once)
  bf16      ``F.linear(x, w)``            bfloat16 x and w
  bf16dnn   oneDNN inner product          bfloat16, plain weight
  bf16pack  oneDNN inner product          bfloat16, packed weight (what bf16 runs use)

and reports GFLOP/s = 2 * M * out * in / median time of N runs (after warm-up).
Each cell stops early once it has used ``--max-seconds`` (with at least 3 runs),
so slow kernels (e.g. bf16 on a CPU without native bf16 matmuls) do not stall the
run; the JSON records how many runs each median is over.  The float32 results of
the three float32 kernels are checked against each other once per cell.

Defaults: weights 2048x8192, 8192x2048, 128256x2048 (the 1B model's MLP down /
up-gate and LM head), M in 1, 4, 16, 64, 512; 2 threads.  ``--quick`` uses small
shapes for a smoke test.

Usage::

    python benchmarks/bench_kernels.py                  # full run (a few minutes)
    python benchmarks/bench_kernels.py --quick          # smoke test
    python benchmarks/bench_kernels.py --threads 1 --m 1,16

Results: a table on stdout and JSON in benchmarks/results/kernels.json (--json).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "kernels.json"
QUICK_JSON = REPO / "benchmarks" / "results" / "kernels_quick.json"
SHAPES = ((2048, 8192), (8192, 2048), (128256, 2048))
QUICK_SHAPES = ((256, 1024), (1024, 256), (4096, 256))
MS = (1, 4, 16, 64, 512)
QUICK_MS = (1, 4, 16)
KERNELS = ("mkl", "linear", "onednn", "packed", "bf16", "bf16dnn", "bf16pack")
LABELS = {"mkl": "x@w.t() fp32", "linear": "F.linear fp32", "onednn": "oneDNN fp32", "packed": "packed fp32",
          "bf16": "F.linear bf16", "bf16dnn": "oneDNN bf16", "bf16pack": "packed bf16"}
ONEDNN = ("onednn", "packed", "bf16dnn", "bf16pack")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--runs", type=int, default=None, help="timed runs per cell, median reported (default 20; 5 "
                    "with --quick)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop a cell's timed runs after this long, once it has 3 (default 5; 0.5 with --quick)")
    ap.add_argument("--shapes", default=None, help="weights as OUTxIN,... (default 2048x8192,8192x2048,128256x2048)")
    ap.add_argument("--m", default=None, help="rows of x, comma separated (default 1,4,16,64,512)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"subset of {','.join(KERNELS)}")
    ap.add_argument("--quick", action="store_true", help="small shapes and few runs (smoke test)")
    ap.add_argument("--json", default=None, help=f"JSON output (default {DEFAULT_JSON.relative_to(REPO)}; with "
                    f"--quick {QUICK_JSON.relative_to(REPO)})")
    a = ap.parse_args(argv)
    if a.shapes:
        try:
            a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",") if s]
            assert all(len(s) == 2 and min(s) > 0 for s in a.shapes)
        except (ValueError, AssertionError):
            ap.error("--shapes wants OUTxIN,OUTxIN,...")
    else:
        a.shapes = list(QUICK_SHAPES if a.quick else SHAPES)
    a.m = [int(v) for v in a.m.split(",") if v] if a.m else list(QUICK_MS if a.quick else MS)
    a.kernels = [k for k in KERNELS if k in a.kernels.split(",")]
    if not a.kernels:
        ap.error(f"--kernels: choose from {','.join(KERNELS)}")
    if a.runs is None:
        a.runs = 5 if a.quick else 20
    if a.max_seconds is None:
        a.max_seconds = 0.5 if a.quick else 5.0
    if a.json is None:
        a.json = str(QUICK_JSON if a.quick else DEFAULT_JSON)
    return a


def machine_info(threads: int) -> dict:
    cpu, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_flags": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                                       "amx_bf16", "amx_tile", "avx_vnni")),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }


def onednn_available() -> bool:
    try:
        x, w = torch.randn(2, 8), torch.randn(4, 8)
        y = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return bool(torch.allclose(y, x @ w.t(), atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


def time_cell(fn, runs: int, max_seconds: float) -> dict:
    fn()                                   # warm-up (first call builds primitives / packs)
    fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < runs:
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        if len(ts) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts)}


def run(a) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    info = machine_info(a.threads)
    has_dnn = onednn_available()
    print(f"machine: {info['cpu_model']} ({info['logical_cpus']} logical CPUs, flags {','.join(info['cpu_flags'])}), "
          f"torch {info['torch']}, threads {a.threads}, oneDNN linear {'available' if has_dnn else 'NOT available'}",
          flush=True)
    fns = {
        "mkl": lambda x, w: x @ w.t(),
        "linear": lambda x, w: F.linear(x, w),
        "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        "bf16": lambda x, w: F.linear(x, w),
    }
    fns["packed"] = fns["bf16dnn"] = fns["bf16pack"] = fns["onednn"]
    from mpiinfer.kernels import pack
    rows = []
    for out_f, in_f in a.shapes:
        w = torch.randn(out_f, in_f) * in_f ** -0.5
        wb = w.to(torch.bfloat16) if any(k.startswith("bf16") for k in a.kernels) else None
        packed = {"packed": pack(w) if "packed" in a.kernels and has_dnn else None,
                  "bf16pack": pack(wb) if "bf16pack" in a.kernels and has_dnn else None}
        for M in a.m:
            x = torch.randn(M, in_f)
            xb = x.to(torch.bfloat16)
            flop = 2.0 * M * out_f * in_f
            row = {"out": out_f, "in": in_f, "M": M, "flop": flop}
            ref = x @ w.t()
            for k in a.kernels:
                if k in ONEDNN and not has_dnn:
                    row[k] = None
                    continue
                xx, ww = (xb, wb) if k.startswith("bf16") else (x, w)
                if k in packed:
                    ww = packed[k]
                fn = fns[k]
                with torch.inference_mode():
                    y = fn(xx, ww)
                    err = (y.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                    r = time_cell(lambda: fn(xx, ww), a.runs, a.max_seconds)
                r["gflops"] = flop / r["median_s"] / 1e9
                r["max_rel_err_vs_mkl"] = err
                row[k] = r
            if row.get("onednn") and row.get("mkl"):
                row["onednn_vs_mkl"] = row["onednn"]["gflops"] / row["mkl"]["gflops"]
            rows.append(row)
            cells = "  ".join(f"{k} {row[k]['gflops']:.1f}" if row.get(k) else f"{k} n/a" for k in a.kernels)
            print(f"  {out_f}x{in_f} M={M}: {cells} GFLOP/s", flush=True)
        del w, wb, packed
        gc.collect()
    return {"machine": info, "config": {"shapes": a.shapes, "m": a.m, "kernels": a.kernels, "runs": a.runs,
                                        "max_seconds": a.max_seconds, "quick": a.quick},
            "onednn_available": has_dnn, "rows": rows}


def print_table(res: dict, kernels: list) -> None:
    hdr = ["weight (out x in)", "M"] + [LABELS[k] for k in kernels]
    if "onednn" in kernels and "mkl" in kernels:
        hdr.append("oneDNN/MKL")
    table = []
    for r in res["rows"]:
        line = [f"{r['out']}x{r['in']}", str(r["M"])]
        line += [f"{r[k]['gflops']:.1f}" if r.get(k) else "n/a" for k in kernels]
        if "onednn" in kernels and "mkl" in kernels:
            line.append(f"{r['onednn_vs_mkl']:.2f}x" if r.get("onednn_vs_mkl") else "n/a")
        table.append(line)
    w = [max(len(str(c)) for c in col) for col in zip(hdr, *table)]
    fmt = lambda cells: " | ".join(str(c).rjust(n) for c, n in zip(cells, w))
    print("\nGFLOP/s (2*M*out*in / median time)")
    print(fmt(hdr))
    print("-+-".join("-" * n for n in w))
    for line in table:
        print(fmt(line))
    bad = [(r["out"], r["in"], r["M"], k) for r in res["rows"] for k in kernels
           if r.get(k) and not k.startswith("bf16") and r[k]["max_rel_err_vs_mkl"] > 1e-4]
    if bad:
        print(f"WARNING: float32 kernels disagree with x @ w.t() by > 1e-4 (relative) in {bad}")


def main(argv=None) -> int:
    a = parse_args(argv)
    res = run(a)
    print_table(res, a.kernels)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(f"\nJSON written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
