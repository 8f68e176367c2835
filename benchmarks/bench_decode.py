#!/usr/bin/env python
"""The one-token decode attention kernel (``mpiinfer.native.decode_attention``) alone, one layer.

A step of ``--seqs`` decoding sequences with ``--rows`` cached rows each on average (uniform in [rows/2,
3 rows/2], seeded), each sequence's rows in ``--runs`` runs placed at random in a pool (paged blocks), SmolLM2-135M's
attention shapes by default (3 KV heads of 64, 3 query heads per KV head).  Timed per dtype, median of
``--repeat`` calls after a warm-up:

  kernel     this tree's C kernel (built as the engine builds it)
  --old-lib  another build of the kernels (e.g. the previous commit's .so from ~/.cache/mpiinfer/native), the
             same call: the before/after of a kernel change within one run, alternating
  --old-src  another tree's kernel sources (its mpiinfer/native directory, e.g. a git worktree of the previous
             commit), built here with the same flags as this tree's
  torch      the torch path's arithmetic as one batched call: gather every sequence's rows padded to the longest,
             two matmuls and a masked softmax (what the grouped decode does on CUDA)

GB/s counts the K and V bytes the step must read (every attended row once); results are checked against each
other (max abs difference).

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --old-lib ~/.cache/mpiinfer/native/kernels-OLD.so --threads 2
    python benchmarks/bench_decode.py --isa avx2 --old-src /tmp/old/mpiinfer/native   # as on an AVX2-only CPU

``--isa avx512`` / ``--isa avx2`` / ``--isa rows`` build the kernels as a CPU without AVX512-BF16 (without AVX-512,
without AVX2) runs them
(``native.ISA_FLAGS``), on this CPU.

Writes a table to stdout and JSON to benchmarks/results/decode.json (``--json``).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=220)
    ap.add_argument("--rows", type=int, default=150, help="mean cached rows per sequence")
    ap.add_argument("--runs", type=int, default=2, help="runs (separate places in the pool) per sequence")
    ap.add_argument("--n-kv", type=int, default=3)
    ap.add_argument("--grp", type=int, default=3, help="query heads per KV head")
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the implementations")
    old = ap.add_mutually_exclusive_group()
    old.add_argument("--old-lib", default=None, help="another build of the kernels to time beside this one")
    old.add_argument("--old-src", default=None, help="another tree's mpiinfer/native, built and timed beside this one")
    ap.add_argument("--isa", default="native", choices=["native", "avx512", "avx2", "rows"],
                    help="build the kernels as a CPU with these extensions runs them")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "decode.json"))
    return ap.parse_args(argv)


def layout(a, g):
    """Each sequence's runs [(start, rows)] in a pool, non-overlapping, and the pool size."""
    import torch
    lengths = torch.randint(a.rows // 2, a.rows * 3 // 2 + 1, (a.seqs,), generator=g).tolist()
    pieces = []
    for s, n in enumerate(lengths):
        cuts = sorted(torch.randint(1, max(2, n), (a.runs - 1,), generator=g).tolist()) if a.runs > 1 else []
        bounds = [0] + cuts + [n]
        pieces += [(s, j, bounds[j + 1] - bounds[j]) for j in range(len(bounds) - 1)]
    order = torch.randperm(len(pieces), generator=g).tolist()
    runs = [[None] * a.runs for _ in range(a.seqs)]
    at = 0
    for k in order:
        s, j, n = pieces[k]
        runs[s][j] = (at, n)
        at += n + 16                                     # a gap: runs are not adjacent
    return [[r for r in rs if r is not None and r[1] > 0] for rs in runs], at, lengths


def torch_decode(q, kc, vc, idx, invalid, scale, n_q):
    """Batched gather + matmul + masked softmax (B, n_q * hd)."""
    import torch
    n_kv, _, hd = kc.shape
    B = idx.shape[0]
    K = kc[:, idx]                                        # (n_kv, B, L, hd)
    V = vc[:, idx]
    qg = q.view(B, n_kv, n_q // n_kv, hd).transpose(0, 1)  # (n_kv, B, grp, hd)
    s = torch.matmul(qg, K.transpose(2, 3)).float() * scale
    s.masked_fill_(invalid, float("-inf"))
    p = torch.softmax(s, dim=-1).to(V.dtype)
    return torch.matmul(p, V).transpose(0, 1).reshape(B, n_q * hd)


def main(a):
    import torch

    from mpiinfer import native
    if not native.available():
        sys.exit("the native kernels are not available (no C compiler?)")
    torch.set_num_threads(a.threads)
    new_lib = native._lib()
    build = Path(tempfile.mkdtemp(prefix="bench_decode_"))      # the builds below; removed at exit
    atexit.register(shutil.rmtree, build, ignore_errors=True)
    if a.isa != "native":
        native.build_library(build / "new.so", native.ISA_FLAGS[a.isa])
        new_lib = native.load_library(build / "new.so")
    old_lib = None
    if a.old_lib:
        old_lib = native.load_library(Path(os.path.expanduser(a.old_lib)))
    elif a.old_src:
        native.build_library(build / "old.so", native.ISA_FLAGS[a.isa], source_dir=Path(a.old_src))
        old_lib = native.load_library(build / "old.so")
    g = torch.Generator().manual_seed(0)
    runs, pool, lengths = layout(a, g)
    n_q = a.n_kv * a.grp
    d = native.DecodeRuns(list(range(a.seqs)), runs, None)
    L = max(lengths)
    idx = torch.empty(a.seqs, L, dtype=torch.int64)
    for s, rs in enumerate(runs):
        r = torch.cat([torch.arange(st, st + n) for st, n in rs])
        idx[s, :len(r)] = r
        idx[s, len(r):] = r[-1]
    invalid = (torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None])[None, :, None, :]
    scale = a.hd ** -0.5
    rows = []
    for dt in a.dtypes.split(","):
        dtype = getattr(torch, dt)
        kc = torch.randn(a.n_kv, pool, a.hd, generator=g).to(dtype)
        vc = torch.randn(a.n_kv, pool, a.hd, generator=g).to(dtype)
        q = torch.randn(a.seqs, n_q * a.hd, generator=g).to(dtype)
        nbytes = 2 * sum(lengths) * a.n_kv * a.hd * kc.element_size()

        def with_lib(lib):
            def call():
                out = torch.empty(a.seqs, n_q * a.hd, dtype=dtype)
                saved = native._LIB[0]
                native._LIB[0] = lib
                try:
                    native.decode_attention(q, kc, vc, d, scale, out, n_q)
                finally:
                    native._LIB[0] = saved
                return out
            return call

        impls = {"kernel": with_lib(new_lib)}
        if old_lib is not None:
            impls["old kernel"] = with_lib(old_lib)
        impls["torch"] = lambda: torch_decode(q, kc, vc, idx, invalid, scale, n_q)
        outs = {k: f() for k, f in impls.items()}                  # warm-up, and the results compared
        times = {k: [] for k in impls}
        # torch first in each round (its gathers leave the caches in another state), then the kernels in turn, in
        # reverse order every other round: with a fixed order the first one ran 1-13% slower than the same code
        # second (measured with identical sources)
        kernels = [k for k in impls if k != "torch"]
        for r in range(a.rounds):
            for k in ["torch"] + (kernels if r % 2 == 0 else kernels[::-1]):
                f = impls[k]
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
        ref = outs["torch"].double()
        for k in impls:
            t = statistics.median(times[k])
            rows.append(dict(dtype=dt, impl=k, ms=t * 1e3, gb_s=nbytes / t / 1e9,
                             vs_torch=statistics.median(times["torch"]) / t,
                             max_abs_diff=float((outs[k].double() - ref).abs().max())))
    print(f"{a.seqs} sequences x ~{a.rows} rows in {a.runs} runs, {a.n_kv} KV heads x {a.grp} query heads, "
          f"hd {a.hd}, {a.threads} threads, kernels built for: {a.isa}")
    print(f"{'dtype':9} {'implementation':15} {'ms':>8} {'GB/s':>7} {'vs torch':>9} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['dtype']:9} {r['impl']:15} {r['ms']:8.3f} {r['gb_s']:7.1f} {r['vs_torch']:8.2f}x "
              f"{r['max_abs_diff']:11.2e}")
    out = dict(when=time.strftime("%Y-%m-%dT%H:%M:%S"), args=vars(a), cpu_count=os.cpu_count(), rows=rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main(parse_args())
