"""The paged KV cache on two bulk workloads, mpiinfer with ``--prefix-cache on`` vs ``off`` in the same run
(and, with ``--baseline PATH``, the engine of another checkout: e.g. the one before paging, for concurrency).

    python benchmarks/bench_prefix.py [--model DIR] [--n 1000] [--n-off 200] [--baseline /tmp/base]

1. **shared prefix**: ``--n`` requests sharing a ``--prefix-tokens`` (1,500) token prefix (few-shot examples, a
   document) and differing in a ``--question-tokens`` (30) token question, ``--new`` (32) new tokens, greedy, as
   ``prompt_token_ids`` (random ids: throughput does not depend on them).  With the cache off only ``--n-off``
   requests run (each recomputes the whole prefix): rates are compared, not times.
2. **chat** (with ``--chat N``): N prompts of ``jobs/make_prompts.py`` (max_tokens 16-128) under one fixed
   ``--kv-budget`` and ``--max-batch 256``: how many sequences the cache holds at once (``peak_running_sequences``
   of the summary), which reserving prompt + max_tokens per sequence limits.

3. **prefixes in turn** (with ``--cycle K``): K prefixes of ``--cycle-prefix-tokens`` (512), each followed by
   ``--cycle-rounds`` (4) questions of 24 tokens, asked round-robin (prefix 0, 1, ..., K-1, 0, 1, ...), 8 new tokens,
   under ``--cycle-kv-budget`` (256 MiB), on this tree and on ``--baseline``: how much of the prefixes survives
   between their turns when the cache holds a little less than all of them (the LRU's order of eviction within a
   prompt).  Run after the chat workload.

With ``--cp N`` the shared-prefix workload runs under ``mpiexec -n N`` with ``--cp N`` (one thread per rank) and
every prompt split over the CP ranks (``--cp-min-tokens`` = the prefix length): CP documents share their full groups
of 2 x N units (``parallel.shard.cp_groups``) through the prefix cache; the tail after the last full group is
computed for each question.  For example ``--cp 2 --prefix-tokens 6000 --n 60 --n-off 12``
(``benchmarks/results/prefix_cp.json``).

Reported per run: records/s, generated tok/s, prompt tokens taken from the cache, peak running sequences,
preemptions; the table gives the ratios.  JSON: ``benchmarks/results/prefix.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_job(inp, out, model, flags, threads, pythonpath=None, timeout=7200, ranks=1):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    launch = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks)] if ranks > 1 else []
    cmd = [*launch, sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp, "-o", out, "--overwrite", "-q",
           "--threads", str(threads), *flags]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=pythonpath or ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    s = json.load(open(out + ".summary.json"))
    return {"records": s["records"], "errors": s["errors"], "wall_s": s["wall_time_s"],
            "records_per_s": s["records_per_s"], "generated_tokens_per_s": s["generated_tokens_per_s"],
            "prompt_tokens": s["prompt_tokens"], "prompt_tokens_cached": s.get("prompt_tokens_cached"),
            "peak_running": s.get("peak_running_sequences"), "preemptions": s.get("preemptions")}


def shared_prefix_input(path, n, prefix, question, new, vocab, seed=0):
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(prefix)]
    with open(path, "w") as f:
        for i in range(n):
            q = [rng.randrange(vocab) for _ in range(question)]
            f.write(json.dumps({"id": i, "prompt_token_ids": shared + q, "max_tokens": new, "ignore_eos": True})
                    + "\n")


def cycle_input(path, k, rounds, prefix, question, vocab, seed=1):
    """``rounds`` questions to each of ``k`` prefixes, round-robin: every prefix comes back after the other k - 1."""
    rng = random.Random(seed)
    heads = [[rng.randrange(vocab) for _ in range(prefix)] for _ in range(k)]
    with open(path, "w") as f:
        for i in range(rounds * k):
            ids = heads[i % k] + [rng.randrange(vocab) for _ in range(question)]
            f.write(json.dumps({"id": i, "prompt_token_ids": ids, "max_tokens": 8, "ignore_eos": True}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-off", type=int, default=200)
    ap.add_argument("--prefix-tokens", type=int, default=1500)
    ap.add_argument("--question-tokens", type=int, default=30)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cp", type=int, default=1, help="run the shared-prefix workload over this many CP ranks, "
                    "one thread each (--threads is then 1 for every workload)")
    ap.add_argument("--chat", type=int, default=0, help="also the chat workload with this many prompts")
    ap.add_argument("--chat-kv-budget", default="256MiB")
    ap.add_argument("--baseline", default=None, help="a checkout whose engine runs the chat workload too")
    ap.add_argument("--cycle", type=int, default=0, help="also the prefixes-in-turn workload with this many "
                    "prefixes (e.g. 11: SmolLM2-135M float32's 256 MiB holds 10.7 of 536 tokens)")
    ap.add_argument("--cycle-prefix-tokens", type=int, default=512)
    ap.add_argument("--cycle-rounds", type=int, default=4)
    ap.add_argument("--cycle-kv-budget", default="256MiB")
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny model, few requests")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "prefix.json"))
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_prefix_")
    if a.quick:
        from mpiinfer.tools.init_model import init_model
        a.model = init_model(os.path.join(work, "tiny"), arch="llama", preset="tiny")
        a.n, a.n_off, a.prefix_tokens, a.question_tokens, a.new = 24, 8, 100, 5, 4
        a.chat = a.chat and 20
        if a.cp > 1:
            a.prefix_tokens = 700
        if a.json.endswith("prefix.json"):
            a.json = a.json.replace("prefix.json", "prefix_quick.json")
    if a.cp > 1:
        a.threads = 1
        if a.json.endswith(".json"):
            a.json = a.json[:-5] + "_cp.json"
    from mpiinfer.config import ModelConfig
    vocab = ModelConfig.from_dir(a.model).vocab_size
    res = {"config": vars(a).copy(), "runs": {}}
    on_in, off_in = os.path.join(work, "shared.jsonl"), os.path.join(work, "shared_off.jsonl")
    shared_prefix_input(on_in, a.n, a.prefix_tokens, a.question_tokens, a.new, vocab)
    shared_prefix_input(off_in, a.n_off, a.prefix_tokens, a.question_tokens, a.new, vocab)
    flags = ["--max-batch", str(a.max_batch)]
    if a.cp > 1:
        flags += ["--cp", str(a.cp), "--cp-min-tokens", str(a.prefix_tokens)]
    for name, inp, pc in (("shared_on", on_in, "on"), ("shared_off", off_in, "off")):
        r = run_job(inp, os.path.join(work, name + ".out.jsonl"), a.model, [*flags, "--prefix-cache", pc], a.threads,
                    ranks=a.cp)
        res["runs"][name] = r
        print(f"  {name}: {r['records']} records, {r['records_per_s']:.2f} rec/s, "
              f"{r['generated_tokens_per_s']:.1f} tok/s, {r['prompt_tokens_cached']} prompt tokens cached", flush=True)
    on, off = res["runs"]["shared_on"], res["runs"]["shared_off"]
    res["shared_prefix_speedup"] = on["records_per_s"] / off["records_per_s"]

    def both_trees(name, inp, flags):
        """Run ``inp`` on this tree, then on ``--baseline`` when given: (run name, result) as each ends."""
        for run, pp in ((name, None), (name + "_baseline", a.baseline)):
            if run == name or pp:
                res["runs"][run] = run_job(inp, os.path.join(work, run + ".out.jsonl"), a.model, flags, a.threads,
                                           pythonpath=pp)
                yield run, res["runs"][run]

    if a.chat:
        chat_in = os.path.join(work, "chat.jsonl")
        subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "make_prompts.py"), str(a.chat), chat_in],
                       check=True)
        for name, r in both_trees("chat", chat_in, ["--max-batch", "256", "--kv-budget", a.chat_kv_budget]):
            print(f"  {name}: {r['records_per_s']:.2f} rec/s, {r['generated_tokens_per_s']:.1f} tok/s, "
                  f"peak running {r['peak_running']}, preemptions {r['preemptions']}", flush=True)
    if a.cycle:
        cyc_in = os.path.join(work, "cycle.jsonl")
        cycle_input(cyc_in, a.cycle, a.cycle_rounds, a.cycle_prefix_tokens, 24, vocab)
        for name, r in both_trees("cycle", cyc_in, ["--max-batch", str(a.max_batch), "--kv-budget",
                                                    a.cycle_kv_budget]):
            print(f"  {name}: {r['records_per_s']:.2f} rec/s, {r['prompt_tokens_cached']} of {r['prompt_tokens']} "
                  "prompt tokens cached", flush=True)
    print(f"\nshared prefix ({a.prefix_tokens} + {a.question_tokens} tokens, {a.new} new, --max-batch {a.max_batch}"
          f"{f', --cp {a.cp}' if a.cp > 1 else ''}):")
    print("| run | records | records/s | generated tok/s | prompt tokens cached |")
    print("|---|---:|---:|---:|---:|")
    for name in ("shared_on", "shared_off"):
        r = res["runs"][name]
        print(f"| {name} | {r['records']} | {r['records_per_s']:.2f} | {r['generated_tokens_per_s']:.1f} | "
              f"{r['prompt_tokens_cached']} |")
    print(f"prefix cache on / off: {res['shared_prefix_speedup']:.2f}x records/s")
    if "chat" in res["runs"]:
        print(f"\nchat ({a.chat} prompts, --kv-budget {a.chat_kv_budget}, --max-batch 256):")
        print("| engine | records/s | generated tok/s | peak running sequences | preemptions |")
        print("|---|---:|---:|---:|---:|")
        for name in ("chat", "chat_baseline"):
            if name in res["runs"]:
                r = res["runs"][name]
                print(f"| {name} | {r['records_per_s']:.2f} | {r['generated_tokens_per_s']:.1f} | "
                      f"{r['peak_running']} | {r['preemptions']} |")
    if "cycle" in res["runs"]:
        print(f"\nprefixes in turn ({a.cycle} x {a.cycle_prefix_tokens} + 24 tokens, {a.cycle_rounds} rounds, 8 new, "
              f"--kv-budget {a.cycle_kv_budget}):")
        print("| engine | records/s | prompt tokens cached | of prompt tokens |")
        print("|---|---:|---:|---:|")
        for name in ("cycle", "cycle_baseline"):
            if name in res["runs"]:
                r = res["runs"][name]
                print(f"| {name} | {r['records_per_s']:.2f} | {r['prompt_tokens_cached']} | {r['prompt_tokens']} |")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
