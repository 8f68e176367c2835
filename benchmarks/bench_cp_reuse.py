"""How much of a shared document CP questions take from the prefix cache: the real scheduler, no model.

    python benchmarks/bench_cp_reuse.py [--docs 1000] [--questions 10] [--cp 2]

For each of ``--docs`` documents of random length (``--min``-``--max`` tokens), ``--questions`` prompts (the document
then a question of 30 tokens, or of 10-200 tokens) go one after another through ``engine.scheduler.Scheduler``
(admission with the prefix-cache walk, the CP prefill planned, its groups registered, finished) in a pool large
enough that nothing is evicted; each prompt's ``cached_tokens`` (prompt tokens taken from the cache) is compared
with the document's length.  CP groups are 2 x cp x 64 tokens at the finest and the first question lays out the
document without knowing where it ends, so the reuse is below 100%; this measures by how much.  Prints a table;
JSON: ``benchmarks/results/cp_reuse.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one_document(sched_cls, seq_cls, request, cp, doc_len, qlens, rng):
    from mpiinfer.config import SamplingParams
    doc = [rng.randrange(1, 50000) for _ in range(doc_len)]
    pool = 2 * (doc_len + 300) // cp + 4096
    sched = sched_cls(cp, pool, max_batch=4, step_tokens=1 << 30)
    got = []
    for i, q in enumerate(qlens):
        prompt = doc + [50000 + i] + [rng.randrange(1, 50000) for _ in range(q - 1)]   # questions differ at once
        seq = seq_cls(request(i, i, SamplingParams(max_tokens=1), prompt_token_ids=prompt), prompt, 1, frozenset(),
                      None, cp=True)
        sched.waiting.append(seq)
        sched.admit()
        assert sched.running == [seq], "not admitted"
        got.append(seq.cached_tokens)
        _, planned, *_ = sched.plan()
        sched.advance(planned)
        sched.finish(seq)
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--min", type=int, default=1000)
    ap.add_argument("--max", type=int, default=40000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "cp_reuse.json"))
    a = ap.parse_args(argv)
    from mpiinfer.engine.scheduler import Scheduler, Sequence
    from mpiinfer.messages import Request
    rng = random.Random(a.seed)
    res = {"config": vars(a).copy(), "rows": []}
    print(f"{a.docs} documents of {a.min}-{a.max} tokens, {a.questions} questions each, cp={a.cp}:")
    print("| questions | 2nd question: mean reuse | loses >= 256 tokens | loses everything | "
          "questions 2+: mean reuse | mean tokens lost |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, qlen in (("30 tokens", lambda: 30), ("10-200 tokens", lambda: rng.randrange(10, 201))):
        second, rest, lost = [], [], []
        for _ in range(a.docs):
            d = rng.randrange(a.min, a.max + 1)
            got = one_document(Scheduler, Sequence, Request, a.cp, d, [qlen() for _ in range(a.questions)], rng)
            assert got[0] == 0 and all(g <= d for g in got)
            second.append(got[1])
            rest.append(statistics.mean(g / d for g in got[1:]))
            lost.append(statistics.mean(d - g for g in got[1:]))
            res["rows"].append({"questions": name, "doc": d, "cached": got})
        docs = [r["doc"] for r in res["rows"] if r["questions"] == name]
        row = {"questions": name,
               "second_mean_reuse": statistics.mean(g / d for g, d in zip(second, docs)),
               "second_lose_256": sum(d - g >= 256 for g, d in zip(second, docs)) / len(docs),
               "second_lose_all": sum(g == 0 for g in second) / len(docs),
               "later_mean_reuse": statistics.mean(rest), "later_mean_lost": statistics.mean(lost)}
        res.setdefault("summary", []).append(row)
        print(f"| {name} | {row['second_mean_reuse']:.1%} | {row['second_lose_256']:.1%} | "
              f"{row['second_lose_all']:.1%} | {row['later_mean_reuse']:.1%} | {row['later_mean_lost']:.0f} |")
    if a.docs > 50:                  # the summary only: per-document rows of a full run are ~250 KB
        del res["rows"]
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
