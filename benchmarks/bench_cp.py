"""Context parallelism end to end: prefill time of one long prompt through the whole model at cp=1 and cp=2
(one thread per rank), parallel efficiency t(cp=1) / (cp x t(cp)), per-rank KV memory at cp=1/2/4, and a fitted
model projecting the prefill of a 1M-token document over 16-128 ranks.

    python benchmarks/bench_cp.py --lengths 16384,32768           # ~10 min on 2 cores
    python benchmarks/bench_cp.py --lengths 1024,2048             # smoke test

The model is a random Llama-shaped checkpoint small enough to prefill 32K tokens on one core in minutes
(hidden 512, 8 layers, 8 query / 2 KV heads of 64, MLP 1536, vocab 4096; ``--model`` to use another). Time is
the time to first token of a single `mpiinfer run` request (max_tokens 1), from the run's summary; the whole
prompt is one step at both cp=1 (``--step-tokens`` = length) and cp (one zigzag shard per rank).

Projection: per-rank prefill time t(L, cp) = (a L + b L^2 / 2) / cp + c, where a (linear layers) and b (causal
attention) are fitted on the cp=1 runs; ring communication per step sends one KV block of 2 L/cp tokens x layers
x kv-bytes, at the transfer bandwidth measured with the ring (benchmarks/bench_ring.py's `comm` column, or
``--link-gbps``); it is hidden when the attention of a block pair takes longer than sending a block. The same
model with H100 rates is compared with the published 1M tokens in 77 s on 128 H100s (93% efficiency).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
         "head_dim": 64, "intermediate_size": 1536, "vocab_size": 4096, "max_position_embeddings": 131072,
         "tie_word_embeddings": True}


def run_one(model, length, cp, workdir, timeout):
    inp = os.path.join(workdir, f"doc_{length}.jsonl")
    if not os.path.exists(inp):
        rng = random.Random(length)
        with open(inp, "w") as f:
            f.write(json.dumps({"id": "doc", "prompt_token_ids": [rng.randrange(4, 500) for _ in range(length)],
                                "max_tokens": 1}) + "\n")
    out = os.path.join(workdir, f"out_{length}_{cp}.jsonl")
    cmd = [shutil.which("mpiexec"), "-n", str(cp), sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp,
           "-o", out, "--overwrite", "-q", "--threads", "1", "--max-seq-len", str(length + 8),
           "--step-tokens", str(length), "--kv-budget", str(2 * length * 4096 + (64 << 20)),
           "--cp", str(cp), "--cp-min-tokens", "1"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    s = json.load(open(out + ".summary.json"))
    return {"length": length, "cp": cp, "ttft_s": s["ttft_s"]["p50"], "wall_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--cps", default="1,2")
    ap.add_argument("--link-gbps", type=float, default=None,
                    help="ring transfer bandwidth for the projection in Gbit/s (default 24: 8 MiB blocks in "
                         "1.3-4 ms between 2 ranks here, benchmarks/bench_ring.py)")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "results", "cp"))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "cp.json"))
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    model = args.model
    if model is None:
        from mpiinfer.tools.init_model import init_model
        model = os.path.join(args.workdir, "small-llama")
        if not os.path.exists(os.path.join(model, "config.json")):
            init_model(model, arch="llama", preset="tiny", overrides=dict(SMALL, init_std=0.05), overwrite=True)
    from mpiinfer.config import ModelConfig
    from mpiinfer.engine.kv_cache import kv_bytes_per_token
    from mpiinfer.parallel.shard import cp_local_count
    cfg = ModelConfig.from_dir(model)
    rows = []
    print(f"{'tokens':>7} {'cp':>3} {'prefill s':>10} {'efficiency':>10}")
    for L in [int(x) for x in args.lengths.split(",")]:
        base = None
        for cp in [int(x) for x in args.cps.split(",")]:
            r = run_one(model, L, cp, args.workdir, args.timeout)
            if cp == 1:
                base = r["ttft_s"]
            r["efficiency"] = base / (cp * r["ttft_s"]) if base else None
            rows.append(r)
            eff = f"{r['efficiency']:.2f}" if r["efficiency"] else "-"
            print(f"{L:>7} {cp:>3} {r['ttft_s']:>10.2f} {eff:>10}", flush=True)
    # per-rank KV memory for the longest prompt
    L = max(int(x) for x in args.lengths.split(","))
    per_tok = kv_bytes_per_token(cfg, 4)
    kv = [{"cp": cp, "max_rank_kv_mb": max(cp_local_count(L, L, cp, r) for r in range(cp)) * per_tok / 2**20}
          for cp in (1, 2, 4)]
    print("per-rank KV for", L, "tokens:", ", ".join(f"cp={k['cp']}: {k['max_rank_kv_mb']:.1f} MB" for k in kv))
    # fit a, b on the cp=1 points: t = a L + b L^2 / 2
    ones = [r for r in rows if r["cp"] == 1]
    proj = []
    if len(ones) >= 2:
        (L1, t1), (L2, t2) = (ones[0]["length"], ones[0]["ttft_s"]), (ones[-1]["length"], ones[-1]["ttft_s"])
        b = 2 * (t2 / L2 - t1 / L1) / (L2 - L1)
        a = t1 / L1 - b * L1 / 2
        link = (args.link_gbps or 24.0) * 1e9 / 8    # bytes/s (8 MiB ring blocks took 1.3-4 ms here)
        kv_tok = kv_bytes_per_token(cfg, 4)
        N = 1_000_000
        for cp in (16, 32, 64, 128):
            compute = (a * N + b * N * N / 2) / cp
            # per ring step: the attention of one block pair vs sending one block (both chunks of a rank)
            step_attn = b * N * N / (2 * cp * cp)               # a rank's causal work in one ring step
            step_comm = (N / cp) * kv_tok / link
            exposed = max(0.0, step_comm - step_attn) * (cp - 1)
            t = compute + exposed
            proj.append({"ranks": cp, "tokens": N, "time_s": t, "efficiency": (a * N + b * N * N / 2) / (cp * t),
                         "comm_hidden": step_comm <= step_attn})
        print(f"fitted on cp=1: linear {a * 1e6:.2f} us/token, attention {b * 1e9:.3f} ns/token^2")
        print("projection, 1M-token prefill of this model at these per-rank rates:")
        for p in proj:
            print(f"  {p['ranks']:>4} ranks: {p['time_s']:>10.0f} s, efficiency {p['efficiency']:.2f}, "
                  f"ring transfers {'hidden' if p['comm_hidden'] else 'exposed'}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "model": model, "runs": rows, "kv": kv,
                   "projection": proj}, f, indent=1)


if __name__ == "__main__":
    main()
