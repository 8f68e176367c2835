#!/usr/bin/env python3
"""Every GPU check of the project in one prepared run (``jobs/gpu_check.sh`` starts this with its venv's python).

    python jobs/gpu_check.py [--dry-run] [--out DIR] [--only NAME,...] [--budget-s 480]

One line per check as it ends (``ok`` / ``FAIL`` with the reason / ``skipped`` with the reason), then a summary
table, and ``DIR/gpu_check.json`` (every check's status, detail and figures, the machine).  Exit status 0 when no
check failed, 1 otherwise.

The checks run as a user runs the project: ``mpiinfer init-model`` writes the tiny checkpoints, ``mpiinfer run``
(under ``mpiexec -n 2`` for the layouts) computes, and Hugging Face ``transformers`` on the same device is the
reference.  This orchestrator imports neither torch nor mpiinfer: every check is subprocesses with time limits
(``worker`` below for the in-process measurements), so a CUDA fault or a hang in one check cannot take the
others down, and the whole run stays inside ``--budget-s`` (checks that would start after it are skipped).

``--dry-run`` runs the same logic on CPU, every check that can (the TP/EP/CP layouts with the shared-memory DDA
allreduce, MPI's, the benchmarks at smaller sizes); what needs a GPU (NCCL, the CuPy IPC allreduce on device
buffers, the HBM bound) is reported ``skipped``.  A test (tests/cli/test_gpu_check.py) runs it, so it cannot rot.

Tolerances (README, "GPU"): float32 greedy tokens identical to transformers' and per-token log-probabilities
within 1e-4; bfloat16 is compared teacher-forced (transformers scores the tokens mpiinfer chose), every
log-probability within ``BF16_TOL``, since two bfloat16 implementations legitimately diverge in greedy choices;
so is float32 over a bfloat16 KV cache (``--kv-dtype bfloat16``), against transformers in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32_TOL = 1e-4
BF16_TOL = 0.15          # max |logprob difference| teacher-forced, bfloat16 (measured: see the README)
PROMPT_LENGTHS = (3, 17, 9, 41, 1, 25)
NEW_TOKENS = 32
DEMO_DIR = os.path.join(ROOT, "models", "smollm2-135m-instruct")
# SmolLM2-135M's shapes: the stand-in for the demo model where its weights cannot travel (random weights)
SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                     rope_theta=100000.0, max_position_embeddings=8192)


class Failed(Exception):
    """A check's reason to FAIL."""


class Skipped(Exception):
    """A check's reason to be skipped."""


# ---------------------------------------------------------------------------------------------- plumbing

class Ctx:
    def __init__(self, args):
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        # checkpoints, inputs and outputs live apart from --out, which holds only the report (a device call
        # brings back at most 8 files from $OUT: the 2.5 GB 1B checkpoint must not be among them)
        self.work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="mpiinfer-gpu-check-")
        os.makedirs(self.work, exist_ok=True)
        self.budget = args.budget_s
        self.t0 = time.monotonic()
        self.py = sys.executable
        self.mpiexec = shutil.which("mpiexec") or shutil.which("mpirun")
        # the checkout first on the path: the checks run this tree even where it could not be pip-installed
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.env.setdefault("OMP_NUM_THREADS", "1" if self.dry else "4")
        if "Open MPI" in self._mpi_kind():
            self.env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        self.facts: dict = {}        # the env check's findings (device name, bandwidth, ...)
        self.models: dict = {}
        self.refs: dict = {}         # float32 references of transformers, per (model, input): layouts share them

    def _mpi_kind(self) -> str:
        if not self.mpiexec:
            return ""
        try:
            return subprocess.run([self.mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def sh(self, cmd, timeout, what):
        """Run ``cmd``; Failed with the tail of its output when it fails or outlasts ``timeout`` seconds."""
        timeout = max(5.0, min(timeout, self.left()))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise Failed(f"{what}: no answer within {timeout:.0f} s") from None
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
            raise Failed(f"{what}: exit {p.returncode}: " + " | ".join(tail))
        return p

    def mpiinfer(self, args, ranks=1, timeout=180, what="mpiinfer run"):
        cmd = [self.py, "-m", "mpiinfer"] + list(args)
        if ranks > 1:
            if not self.mpiexec:
                raise Skipped("no mpiexec on PATH (pip install mpich, or load the cluster's MPI)")
            cmd = [self.mpiexec, "-n", str(ranks)] + cmd
        return self.sh(cmd, timeout, what)

    def worker(self, name, *args, timeout=240):
        p = self.sh([self.py, os.path.abspath(__file__), "--worker", name, *map(str, args)], timeout, f"worker {name}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def model(self, key, arch, preset="tiny", dtype=None, sets=()):
        """A checkpoint written by ``mpiinfer init-model`` once per key."""
        if key not in self.models:
            d = os.path.join(self.work, "models", key)
            cmd = ["init-model", d, "--arch", arch, "--preset", preset, "--overwrite"]
            if dtype:
                cmd += ["--dtype", dtype]
            for k, v in sets:
                cmd += ["--set", f"{k}={json.dumps(v)}"]
            self.mpiinfer(cmd, timeout=300, what="init-model")
            self.models[key] = d
        return self.models[key]

    def run_args(self, model, inp, out, dtype="float32", extra=()):
        return ["run", "-m", model, "-i", inp, "-o", out, "--overwrite", "-q", "--device", self.device,
                "--dtype", dtype, *extra]


def write_jsonl(path, recs):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def token_prompts(vocab, lengths=PROMPT_LENGTHS, seed=0, new=NEW_TOKENS):
    rng = random.Random(seed)
    return [{"id": i, "prompt_token_ids": [rng.randrange(4, vocab) for _ in range(n)], "max_tokens": new,
             "logprobs": True, "ignore_eos": True} for i, n in enumerate(lengths)]


def vocab_of(model):
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)["vocab_size"]


def compare(ctx, model, inp, out, dtype, what, forced=None):
    """mpiinfer's output ``out`` against transformers on the same device: (detail, figures); Failed when off.
    ``forced`` (default: any dtype but float32): teacher-forced on mpiinfer's tokens, within BF16_TOL, rather
    than tokens identical (float32 weights over a bfloat16 KV cache, too)."""
    exact = dtype == "float32" if forced is None else not forced
    if exact:                         # greedy tokens depend on the input alone: one reference for every layout
        key = (model, inp)
        if key not in ctx.refs:
            ctx.refs[key] = ctx.worker("hf", model, ctx.device, dtype, inp, "-", timeout=300)
        ref = ctx.refs[key]
    else:                             # teacher-forced on mpiinfer's own tokens
        ref = ctx.worker("hf", model, ctx.device, dtype, inp, out, timeout=300)
    ours = {r["id"]: r for r in read_jsonl(out)}
    errors = [r for r in ours.values() if r.get("error")]
    if errors:
        raise Failed(f"{what}: {len(errors)} error records, first: {errors[0]['error']}")
    same = diff = 0
    worst = 0.0
    for r in ref["records"]:
        o = ours[r["id"]]
        if exact:
            if o["token_ids"] != r["tokens"]:
                k = next(i for i, (a, b) in enumerate(zip(o["token_ids"] + [None], r["tokens"])) if a != b)
                raise Failed(f"{what}: record {r['id']} differs from transformers at new token {k}")
            worst = max([worst] + [abs(a - b) for a, b in zip(o["logprobs"], r["logprobs"])])
        else:
            worst = max([worst] + [abs(a - b) for a, b in zip(o["logprobs"], r["forced"])])
            pairs = list(zip(o["token_ids"], r["tokens"]))
            same += sum(a == b for a, b in pairs)
            diff += sum(a != b for a, b in pairs)
    tol = FP32_TOL if exact else BF16_TOL
    figures = {"max_logprob_diff": worst, "records": len(ref["records"])}
    if not exact:
        figures["greedy_match_frac"] = same / max(1, same + diff)
    if worst > tol:
        raise Failed(f"{what}: a log-probability {worst:.2e} off transformers' (tolerance {tol:g})")
    detail = (f"tokens identical, logprobs within {worst:.1e}" if exact else
              f"teacher-forced logprobs within {worst:.3f}, greedy tokens {figures['greedy_match_frac']:.0%} equal")
    return detail, figures


# ---------------------------------------------------------------------------------------------- checks

def check_env(ctx):
    f = ctx.worker("env", ctx.device, timeout=120)
    ctx.facts.update(f)
    if not ctx.dry and not f.get("cuda"):
        raise Failed("torch sees no CUDA GPU (torch " + f.get("torch", "?") + ")")
    dev = f.get("gpu") or f.get("cpu", "cpu")
    return (f"{dev}; torch {f['torch']}; cupy {f.get('cupy') or 'absent'}; {f.get('mpi', 'no MPI')}; "
            f"copy bandwidth {f['bandwidth_gbs']:.0f} GB/s"), f


def parity(arch, dtype, kv_dtype=None):
    """One process against transformers; ``kv_dtype``: a KV cache of that dtype (``--kv-dtype``), compared
    teacher-forced (the rounded cache may change tokens)."""
    def check(ctx):
        model = ctx.model(arch, arch)
        inp = write_jsonl(os.path.join(ctx.work, f"{arch}.in.jsonl"), token_prompts(vocab_of(model)))
        out = os.path.join(ctx.work, f"{arch}.{dtype}.{kv_dtype or 'kv'}.out.jsonl")
        kv = ["--kv-dtype", kv_dtype] if kv_dtype else []
        ctx.mpiinfer(ctx.run_args(model, inp, out, dtype, ["--max-batch", "4", "--step-tokens", "24"] + kv))
        return compare(ctx, model, inp, out, dtype, f"{arch} {dtype}" + (f" KV {kv_dtype}" if kv_dtype else ""),
                       forced=True if kv_dtype else None)
    return check


def layout(arch, ranks, flags, needs_cuda_part=None):
    """``mpiexec -n ranks mpiinfer run`` with ``flags`` against transformers (float32)."""
    def check(ctx):
        model = ctx.model(arch, arch)
        inp = os.path.join(ctx.work, f"{arch}.in.jsonl")
        if not os.path.exists(inp):
            write_jsonl(inp, token_prompts(vocab_of(model)))
        tag = "_".join(f.strip("-") for f in flags)
        out = os.path.join(ctx.work, f"{arch}.{tag}.out.jsonl")
        extra = list(flags) + ["--max-batch", "4", "--step-tokens", "24"]
        if ctx.device == "cuda":
            extra.append("--share-gpus")
        ctx.mpiinfer(ctx.run_args(model, inp, out, "float32", extra), ranks=ranks, timeout=240,
                     what=f"mpiexec -n {ranks} mpiinfer run {' '.join(flags)}")
        detail, fig = compare(ctx, model, inp, out, "float32", f"{arch} {' '.join(flags)}")
        if ctx.dry and needs_cuda_part:
            detail += f" (on CPU: {needs_cuda_part} skipped)"
            fig["skipped_parts"] = [needs_cuda_part]
        return detail, fig
    return check


def check_cp_long(ctx):
    """cp=2 on one 4K-token prompt (ring attention prefill, CP decode) against transformers."""
    model = ctx.model("llama-8k", "llama", sets=(("max_position_embeddings", 8192),))
    rng = random.Random(1)
    n = 4096
    recs = [{"id": "long", "prompt_token_ids": [rng.randrange(4, vocab_of(model)) for _ in range(n)],
             "max_tokens": 16, "logprobs": True, "ignore_eos": True}]
    inp = write_jsonl(os.path.join(ctx.work, "long.in.jsonl"), recs)
    out = os.path.join(ctx.work, "long.cp2.out.jsonl")
    extra = ["--cp", "2", "--cp-min-tokens", "1024"] + (["--share-gpus"] if ctx.device == "cuda" else [])
    t0 = time.monotonic()
    ctx.mpiinfer(ctx.run_args(model, inp, out, "float32", extra), ranks=2, timeout=300, what="mpiexec -n 2 --cp 2")
    wall = time.monotonic() - t0
    detail, fig = compare(ctx, model, inp, out, "float32", "cp=2, 4096-token prompt")
    fig["wall_s"] = wall
    return detail, fig


def demo_model(ctx):
    """The demo model when it is here (SmolLM2-135M-Instruct), else a random checkpoint of its shapes."""
    if os.path.exists(os.path.join(DEMO_DIR, "config.json")):
        return DEMO_DIR, True
    try:
        ctx.mpiinfer(["convert-gguf", DEMO_DIR], timeout=300, what="convert-gguf")
        return DEMO_DIR, True
    except (Failed, Skipped):
        return ctx.model("smollm2-shape", "llama", sets=tuple(SMOLLM2_SHAPE.items())), False


def check_sampling(ctx):
    """Sampled decoding on the device (its generators, multinomial): ``n`` samples per prompt with a seed give
    the same tokens whatever the batch, and differ from each other."""
    model = ctx.model("llama", "llama")
    recs = [dict(r, max_tokens=16, temperature=0.9, top_p=0.95, seed=7 + r["id"], n=3, logprobs=False)
            for r in token_prompts(vocab_of(model), (5, 30, 12))]
    inp = write_jsonl(os.path.join(ctx.work, "sampled.in.jsonl"), recs)
    outs = []
    for mb in ("1", "8"):
        out = os.path.join(ctx.work, f"sampled.b{mb}.out.jsonl")
        ctx.mpiinfer(ctx.run_args(model, inp, out, "float32", ["--max-batch", mb]))
        outs.append([[c["token_ids"] for c in r["choices"]] for r in read_jsonl(out)])
    if outs[0] != outs[1]:
        raise Failed("sampled tokens changed with --max-batch (1 vs 8): seeds are not per sample")
    distinct = sum(len({tuple(c) for c in r}) for r in outs[0])
    if distinct < 2 * len(recs):
        raise Failed(f"only {distinct} distinct samples among {3 * len(recs)}: sampling looks degenerate")
    return f"{len(recs)} prompts x 3 samples identical at --max-batch 1 and 8, {distinct} distinct", \
        {"distinct": distinct}


def check_demo(ctx):
    model, real = demo_model(ctx)
    parts = []
    fig = {"real_weights": real}
    if real:
        inp = write_jsonl(os.path.join(ctx.work, "france.in.jsonl"),
                          [{"id": "q", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                            "max_tokens": 24}])
        out = os.path.join(ctx.work, "france.out.jsonl")
        ctx.mpiinfer(ctx.run_args(model, inp, out, "float32"))
        text = read_jsonl(out)[0].get("text", "")
        fig["answer"] = text
        if "Paris" not in text:
            raise Failed(f"the demo model answered {text!r} (expected Paris)")
        parts.append(f"answers {text.strip()[:40]!r}")
    inp = write_jsonl(os.path.join(ctx.work, "demo.in.jsonl"), token_prompts(vocab_of(model), (5, 40, 120), new=24))
    out = os.path.join(ctx.work, "demo.out.jsonl")
    ctx.mpiinfer(ctx.run_args(model, inp, out, "float32"))
    detail, f2 = compare(ctx, model, inp, out, "float32", "demo model float32")
    fig.update(f2)
    parts.append(detail if real else detail + " (random weights of SmolLM2's shapes: its weights were not here)")
    return "; ".join(parts), fig


def check_comm(ctx):
    sizes = "8:64K:8" if ctx.dry else "8:64M:4"
    algos = "dda-1shot,dda-2shot,dda,mpi" if ctx.dry else "dda-1shot,dda-2shot,dda,nccl,mpi"
    js = os.path.join(ctx.work, "comm.json")
    ctx.mpiinfer(["bench", "comm", "--device", ctx.device, "--sizes", sizes, "--algos", algos, "--iters", "60",
                  "--rounds", "3", "--json", js], ranks=2, timeout=240, what="mpiinfer bench comm")
    with open(js) as f:
        rows = json.load(f)
    by = {(r["bytes"], r["algo"]): r for r in rows}
    sizes_seen = sorted({r["bytes"] for r in rows})
    if not rows:
        raise Failed("bench comm wrote no rows")
    cells = []
    for s in (sizes_seen[0], sizes_seen[-1]):
        cells.append(f"{s} B: " + ", ".join(f"{a} {by[(s, a)]['latency_us']:.1f} us" for a in algos.split(",")
                                            if (s, a) in by))
    skipped = sorted({r["algo"] for r in rows if r.get("skipped")})
    detail = "; ".join(cells) + (f"; not measured: {', '.join(skipped)}" if skipped else "")
    fig = {"rows": rows}
    if ctx.dry:
        detail += " (CPU buffers: the CuPy IPC allreduce and NCCL skipped)"
        fig["skipped_parts"] = ["the CuPy IPC allreduce on device buffers", "NCCL"]
    return detail, fig


def check_decode(ctx):
    """Decode time per output token (TTIT) and time to first token of a ~1B Llama at batch 1 and 32, against
    the memory-bandwidth bound (the weight bytes read per step / the measured copy bandwidth)."""
    if ctx.dry:
        model, dtype, batches = ctx.model("llama", "llama"), "float32", (1, 4)
    else:
        model, dtype, batches = ctx.model("llama-1b", "llama", preset="1b", dtype="bfloat16"), "bfloat16", (1, 32)
    bw = ctx.facts.get("bandwidth_gbs") or 0.0
    r = ctx.worker("decode", model, ctx.device, dtype, ",".join(map(str, batches)), bw, timeout=300)
    cells = [f"b{b['batch']}: TTFT {b['ttft_ms']:.1f} ms, TTIT {b['ttit_ms']:.2f} ms ({b['tok_s']:.0f} tok/s)"
             + (f", {b['bound_frac']:.0%} of the bandwidth bound" if b.get("bound_frac") else "")
             for b in r["batches"]]
    if ctx.dry:
        r["skipped_parts"] = ["the ~1B model and the HBM bound (a tiny model against the CPU's bandwidth)"]
    return "; ".join(cells) + f" [{r['weight_gb']:.2f} GB of {dtype} weights]", r


def check_bulk(ctx):
    model, real = demo_model(ctx)
    n = 8 if ctx.dry else 1000
    inp = os.path.join(ctx.work, "bulk.in.jsonl")
    ctx.sh([ctx.py, os.path.join(ROOT, "jobs", "make_prompts.py"), str(n), inp], 60, "make_prompts")
    out = os.path.join(ctx.work, "bulk.out.jsonl")
    extra = ["--max-batch", "8" if ctx.dry else "256", "--max-tokens", "16" if ctx.dry else "128"]
    t0 = time.monotonic()
    ctx.mpiinfer(ctx.run_args(model, inp, out, "float32" if ctx.dry else "bfloat16", extra), timeout=420,
                 what="bulk job")
    wall = time.monotonic() - t0
    with open(out + ".summary.json") as f:
        s = json.load(f)
    if s.get("errors"):
        raise Failed(f"{s['errors']} error records in the bulk job")
    fig = {k: s.get(k) for k in ("records", "completion_tokens", "generated_tokens_per_s", "records_per_s",
                                 "prompt_tokens_cached", "peak_running_sequences", "ttft_s")}
    fig.update(wall_s=wall, real_weights=real)
    return (f"{s['records']} chat prompts, {s.get('generated_tokens_per_s', 0):.0f} generated tok/s, "
            f"{wall:.1f} s with start-up" + ("" if real else " (random weights of SmolLM2's shapes)")), fig


CHECKS = [
    ("env", check_env),
    ("parity_llama_fp32", parity("llama", "float32")),
    ("parity_llama_bf16", parity("llama", "bfloat16")),
    ("parity_llama_fp32_kvbf16", parity("llama", "float32", "bfloat16")),
    ("parity_mixtral_fp32", parity("mixtral", "float32")),
    ("sampling", check_sampling),
    ("tp2_dda", layout("llama", 2, ["--tp", "2", "--allreduce", "dda"], "the CuPy IPC allreduce")),
    ("tp2_mpi", layout("llama", 2, ["--tp", "2", "--allreduce", "mpi"], "host staging of CUDA tensors")),
    ("ep2", layout("mixtral", 2, ["--tp", "2", "--ep", "2"], "expert all-to-alls of CUDA tensors")),
    ("cp2_4k", check_cp_long),
    ("demo_model", check_demo),
    ("comm_bench", check_comm),
    ("decode_1b", check_decode),
    ("bulk_job", check_bulk),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run on CPU; report the CUDA-only parts as skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a new one under the temp dir)")
    ap.add_argument("--only", default="", help="comma list of check names (default: all)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="checks that would start after this are skipped")
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    unknown = only - {n for n, _ in CHECKS}
    if unknown:
        ap.error(f"unknown checks {sorted(unknown)}; choose from {[n for n, _ in CHECKS]}")
    ctx = Ctx(a)
    mode = "dry run on CPU" if ctx.dry else "GPU"
    print(f"gpu_check ({mode}): {len(only) or len(CHECKS)} checks, budget {ctx.budget:.0f} s, report in {ctx.out}, "
          f"scratch {ctx.work}", flush=True)
    results = []
    for name, fn in CHECKS:
        if only and name not in only and name != "env":
            continue
        t0 = time.monotonic()
        if ctx.left() < 10:
            status, detail, fig = "skipped", f"the {ctx.budget:.0f} s budget was spent", {}
        else:
            try:
                detail, fig = fn(ctx)
                status = "ok"
            except Skipped as e:
                status, detail, fig = "skipped", str(e), {}
            except Failed as e:
                status, detail, fig = "FAIL", str(e), {}
            except Exception as e:      # a defect of this script: still one line, and the others go on
                status, detail, fig = "FAIL", f"{type(e).__name__}: {e}", {}
        dt = time.monotonic() - t0
        results.append({"check": name, "status": status, "detail": detail, "seconds": round(dt, 1), "figures": fig})
        print(f"{status:>7}  {name:<20} {dt:6.1f} s  {detail}", flush=True)
    print()
    print(table(results, ctx))
    parts = [f"{r['check']}: {p}" for r in results for p in r["figures"].get("skipped_parts", [])]
    if parts:
        print("CUDA parts skipped on CPU: " + "; ".join(parts))
    doc = {"mode": mode, "skipped_parts": parts, "machine": {k: v for k, v in ctx.facts.items()}, "checks": results,
           "tolerances": {"float32": FP32_TOL, "bfloat16_teacher_forced": BF16_TOL},
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.monotonic() - ctx.t0, 1)}
    path = os.path.join(ctx.out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nJSON: {path}")
    failed = any(r["status"] == "FAIL" for r in results)
    if not failed and not a.work:
        shutil.rmtree(ctx.work, ignore_errors=True)        # kept when a check failed, to look at
    return 1 if failed else 0


def table(results, ctx):
    dev = ctx.facts.get("gpu") or ctx.facts.get("cpu") or ctx.device
    lines = [f"| check | status | s | detail |   ({dev})", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']:.0f} | {r['detail']} |")
    n = {s: sum(r["status"] == s for r in results) for s in ("ok", "FAIL", "skipped")}
    lines.append(f"{n['ok']} ok, {n['FAIL']} failed, {n['skipped']} skipped")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- workers
# Run in their own process (``--worker NAME ARGS``); the last line they print is their JSON answer.

def worker(argv):
    name, args = argv[0], argv[1:]
    res = {"env": w_env, "hf": w_hf, "decode": w_decode}[name](*args)
    print(json.dumps(res))
    return 0


def _bandwidth(device):
    """Copy bandwidth in GB/s (bytes read + written per second), best of 5, 1 GiB (256 MiB on CPU)."""
    import torch
    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best / 1e9


def w_env(device):
    import platform

    import torch
    f = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": torch.cuda.is_available(),
         "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
         "cores": os.cpu_count()}
    if f["cuda"]:
        p = torch.cuda.get_device_properties(0)
        f.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    try:
        import cupy
        f["cupy"] = cupy.__version__
    except Exception:
        f["cupy"] = None
    try:
        from mpi4py import MPI
        f["mpi"] = MPI.Get_library_version().strip().splitlines()[0][:60]
        from mpiinfer.comm.dda_cuda import cuda_aware_mpi
        f["cuda_aware_mpi"] = cuda_aware_mpi(MPI.Get_library_version())
    except Exception as e:
        f["mpi"] = f"mpi4py unusable: {e}"
    f["bandwidth_gbs"] = _bandwidth("cuda" if device == "cuda" and f["cuda"] else "cpu")
    return f


def w_hf(model, device, dtype, inp, ours):
    """transformers on ``device``: greedy tokens and their logprobs per record, and (``ours`` an output file, not
    "-") the logprobs it gives the tokens mpiinfer chose (teacher-forced)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.backends.cuda.matmul.allow_tf32 = False
    dt = getattr(torch, dtype)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=dt).to(device).eval()
    mine = {r["id"]: r for r in read_jsonl(ours)} if ours != "-" else {}
    out = []
    with torch.no_grad():
        for rec in read_jsonl(inp):
            ids = torch.tensor([rec["prompt_token_ids"]], device=device)
            new = rec["max_tokens"]
            g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                           pad_token_id=0)
            toks = g.sequences[0, ids.shape[1]:].tolist()
            lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(g.logits, toks)]
            forced = []
            got = mine.get(rec["id"], {}).get("token_ids")
            if got:
                seq = torch.tensor([rec["prompt_token_ids"] + got], device=device)
                logits = m(seq).logits[0, ids.shape[1] - 1:-1].float()
                forced = torch.log_softmax(logits, -1).gather(1, torch.tensor(got, device=device)[:, None])[:, 0]
                forced = forced.tolist()
            out.append({"id": rec["id"], "tokens": toks, "logprobs": lps, "forced": forced})
    return {"records": out}


def w_decode(model, device, dtype, batches, bandwidth_gbs):
    """TTFT and TTIT through the engine API (one rank), batches of 128-token prompts, 32 new tokens."""
    import torch

    from mpiinfer.comm.mesh import Mesh
    from mpiinfer.config import EngineConfig, SamplingParams
    from mpiinfer.device import Device
    from mpiinfer.engine.generate import Engine
    from mpiinfer.engine.runner import ModelRunner
    from mpiinfer.messages import Request
    from mpiinfer.tokenizer import Tokenizer
    bw = float(bandwidth_gbs)
    dev = Device.resolve(device)
    res = {"batches": []}
    batches = [int(b) for b in batches.split(",")]
    runner = ModelRunner(model, EngineConfig(device=device, dtype=dtype, max_batch=max(batches),
                                             max_seq_len=256, kv_budget_bytes=None), Mesh.single(), dev)
    res["weight_gb"] = runner.weight_bytes / 1e9
    tok = Tokenizer(model)
    g = torch.Generator().manual_seed(0)
    new = 32
    for b in batches:
        eng = Engine(runner, tok, max_batch=b, step_tokens=128 * b)
        sp = SamplingParams(max_tokens=new, ignore_eos=True)
        for rnd in range(2):                  # the first round warms up (kernels, allocator)
            for i in range(b):
                ids = torch.randint(4, runner.cfg.vocab_size, (128,), generator=g).tolist()
                assert eng.add(Request(i, i, sp, prompt_token_ids=ids)) is None
            times = []
            while eng.has_work():
                t0 = time.perf_counter()
                eng.step()
                dev.synchronize()
                times.append(time.perf_counter() - t0)
        ttft, ttit = times[0], statistics.median(times[1:])
        row = {"batch": b, "ttft_ms": ttft * 1e3, "ttit_ms": ttit * 1e3, "tok_s": b / ttit, "steps": len(times)}
        if bw > 0:
            bound = runner.weight_bytes / (bw * 1e9)   # every weight byte read once per step
            row.update(bound_ms=bound * 1e3, bound_frac=bound / ttit)
        res["batches"].append(row)
    return res


if __name__ == "__main__":
    raise SystemExit(main())
