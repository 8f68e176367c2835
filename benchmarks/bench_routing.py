"""Prefix-affine routing vs round-robin: data-parallel replicas on documents that many questions share.

    python benchmarks/bench_routing.py [--model DIR] [--docs 8] [--questions 16] [--doc-tokens 2000] [--dp 2]

Input: ``--docs`` documents of ``--doc-tokens`` random token ids, each followed by ``--questions`` different
``--question-tokens`` (20) token questions, the records interleaved (record i asks about document i mod docs, as
a bulk job over a corpus reads them), ``--new`` (16) new tokens, greedy.  The same job runs under ``mpiexec -n
--dp`` with ``--routing prefix`` and ``--routing round-robin``, alternating, ``--rounds`` times each; the outputs
must be identical.  Round-robin gives every replica nearly every document to compute; prefix routing computes
each about once.  JSON: ``benchmarks/results/routing.json``.
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


def make_input(path, docs, questions, doc_tokens, question_tokens, new, vocab, seed=0):
    rng = random.Random(seed)
    texts = [[rng.randrange(vocab) for _ in range(doc_tokens)] for _ in range(docs)]
    with open(path, "w") as f:
        for i in range(docs * questions):
            q = [rng.randrange(vocab) for _ in range(question_tokens)]
            f.write(json.dumps({"id": i, "prompt_token_ids": texts[i % docs] + q, "max_tokens": new,
                                "ignore_eos": True}) + "\n")


def run(inp, out, model, dp, routing, extra, timeout=3600):
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("no mpiexec on PATH (pip install mpich)")
    cmd = [mpiexec, "-n", str(dp), sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp, "-o", out,
           "--overwrite", "-q", "--threads", "1", "--routing", routing, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    s = json.load(open(out + ".summary.json"))
    with open(out) as f:
        tokens = [json.loads(x).get("token_ids") for x in f]
    return {"wall_s": s["wall_time_s"], "records_per_s": s["records_per_s"], "records": s["records"],
            "errors": s["errors"], "prompt_tokens": s["prompt_tokens"],
            "prompt_tokens_cached": s["prompt_tokens_cached"]}, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=2000)
    ap.add_argument("--question-tokens", type=int, default=20)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 short documents")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/routing.json (routing_quick.json "
                                                 "with --quick)")
    a = ap.parse_args(argv)
    if a.quick:
        a.docs, a.questions, a.doc_tokens, a.new = 4, 6, 200, 4
    if a.json is None:
        a.json = os.path.join(ROOT, "benchmarks", "results", "routing_quick.json" if a.quick else "routing.json")
    from mpiinfer.config import ModelConfig
    vocab = ModelConfig.from_dir(a.model).vocab_size
    work = tempfile.mkdtemp(prefix="bench_routing_")
    inp = os.path.join(work, "in.jsonl")
    make_input(inp, a.docs, a.questions, a.doc_tokens, a.question_tokens, a.new, vocab)
    extra = ["--max-batch", str(a.max_batch)]
    runs = {"prefix": [], "round-robin": []}
    outputs = {}
    for _ in range(a.rounds):
        for routing in ("prefix", "round-robin"):
            r, toks = run(inp, os.path.join(work, routing + ".jsonl"), a.model, a.dp, routing, extra)
            runs[routing].append(r)
            outputs.setdefault(routing, toks)
            print(f"  {routing}: {r['wall_s']:.1f} s, {r['records_per_s']:.2f} rec/s, "
                  f"{r['prompt_tokens_cached']} of {r['prompt_tokens']} prompt tokens cached", flush=True)
    same = outputs["prefix"] == outputs["round-robin"]
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    speedup = best["round-robin"]["wall_s"] / best["prefix"]["wall_s"]
    print(f"\n{a.docs} documents x {a.questions} questions ({a.doc_tokens} + {a.question_tokens} tokens, {a.new} new), "
          f"dp={a.dp}, best of {a.rounds}:")
    print("| routing | wall s | records/s | prompt tokens computed | cached |")
    print("|---|---:|---:|---:|---:|")
    for k, r in best.items():
        print(f"| {k} | {r['wall_s']:.1f} | {r['records_per_s']:.2f} | "
              f"{r['prompt_tokens'] - r['prompt_tokens_cached']} | {r['prompt_tokens_cached']} |")
    print(f"prefix / round-robin: {speedup:.2f}x; outputs identical: {same}")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"config": vars(a), "runs": runs, "speedup": speedup, "outputs_identical": same}, f, indent=1)
    print(f"-> {a.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
