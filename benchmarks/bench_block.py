"""KV block size by measurement: the same chat job with blocks of 8, 16, 32 and 64 rows.

    python benchmarks/bench_block.py [--n 128] [--sizes 8,16,32,64] [--rounds 2] [--max-tokens 64]

In process, one engine per run (``EngineConfig.kv_block``), the demo model in float32, 2 threads, ``--max-batch``
256 under a 256 MiB budget; prompts from ``jobs/make_prompts.py`` with every ``max_tokens`` set; block sizes
alternate for ``--rounds`` rounds.  Reported per size: the best wall time, sequences holding KV on average,
preemptions, and whether the tokens equal the first size's (they must).  JSON: ``benchmarks/results/block.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(model, prompts, block, max_tokens, budget, threads):
    import torch

    from mpiinfer.comm.mesh import Mesh
    from mpiinfer.config import EngineConfig, SamplingParams
    from mpiinfer.device import Device
    from mpiinfer.engine.generate import Engine
    from mpiinfer.engine.runner import ModelRunner
    from mpiinfer.messages import Request
    from mpiinfer.tokenizer import Tokenizer
    torch.set_num_threads(threads)
    runner = ModelRunner(model, EngineConfig(kv_budget_bytes=budget, max_batch=256, kv_block=block), Mesh.single(),
                         Device("cpu"))
    eng = Engine(runner, Tokenizer(model), max_batch=256)
    sp = SamplingParams(max_tokens=max_tokens)
    t0 = time.perf_counter()
    for i, r in enumerate(prompts):
        assert eng.add(Request(i, r["id"], sp, messages=r["messages"])) is None
    running, out = [], {}
    while eng.has_work():
        for res in eng.step():
            out[res.index] = res.token_ids
        running.append(len(eng.running))
    wall = time.perf_counter() - t0
    return {"block": block, "wall_s": wall, "mean_running": statistics.mean(running), "steps": len(running),
            "preemptions": getattr(eng.sched, "preemptions", None), "tokens": [out[i] for i in sorted(out)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--sizes", default="8,16,32,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--budget", type=int, default=256 << 20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "block.json"))
    a = ap.parse_args(argv)
    if a.one is not None:                       # one measurement, in a fresh process
        prompts = [json.loads(x) for x in open(a.prompts)]
        print(json.dumps(run_one(a.model, prompts, a.one, a.max_tokens, a.budget, a.threads)))
        return 0
    work = os.path.join(ROOT, "benchmarks", "results", "block")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "prompts.jsonl")
    subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "make_prompts.py"), str(a.n), path], check=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    runs = {s: [] for s in sizes}
    for _ in range(a.rounds):
        for s in sizes:
            p = subprocess.run([sys.executable, __file__, "--one", str(s), "--prompts", path, "--model", a.model,
                                "--max-tokens", str(a.max_tokens), "--budget", str(a.budget), "--threads",
                                str(a.threads)], capture_output=True, text=True, check=True,
                               env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
            r = json.loads(p.stdout.strip().splitlines()[-1])
            runs[s].append(r)
            print(f"  block {s}: {r['wall_s']:.1f} s, {r['mean_running']:.1f} running, {r['steps']} steps", flush=True)
    ref = runs[sizes[0]][0]["tokens"]
    print(f"\n{a.n} chat prompts, max_tokens {a.max_tokens}, {a.budget >> 20} MiB, best of {a.rounds}:")
    print("| block rows | wall s | sequences holding KV (mean) | steps | tokens equal |")
    print("|---:|---:|---:|---:|---|")
    table = []
    for s in sizes:
        best = min(runs[s], key=lambda r: r["wall_s"])
        same = all(r["tokens"] == ref for r in runs[s])
        table.append({"block": s, "wall_s": best["wall_s"], "mean_running": best["mean_running"],
                      "steps": best["steps"], "tokens_equal": same, "all_wall_s": [r["wall_s"] for r in runs[s]]})
        print(f"| {s} | {best['wall_s']:.1f} | {best['mean_running']:.1f} | {best['steps']} | {same} |")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"config": {k: v for k, v in vars(a).items() if k not in ("one", "prompts")}, "rows": table}, f,
                  indent=1)
    print(f"-> {a.json}")
    return 0 if all(t["tokens_equal"] for t in table) else 1


if __name__ == "__main__":
    sys.exit(main())
