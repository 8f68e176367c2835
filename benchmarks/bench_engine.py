#!/usr/bin/env python
"""Decode throughput of mpiinfer's engine vs Hugging Face transformers ``generate``.

Same checkpoint, same random prompts (token ids, seeded), greedy, exactly N new
tokens per request (``ignore_eos=True`` for mpiinfer; ``eos_token_id=None,
min_new_tokens=N`` for transformers), one process, ``torch.set_num_threads`` for
both.  Everything runs in ONE process and ONE invocation so that the ratios are
measured under the same machine conditions (the absolute numbers on a shared
machine are noisy; the ratios are what count).

Scenarios (``--scenarios``, comma separated; default all):

  fp32_b1   float32 weights, batch 1
  fp32_b16  float32 weights, batch 16 (16 prompts of --prompt-len tokens)
  bf16_b1   bfloat16 weights, batch 1
  bf16_b16  bfloat16 weights, batch 16
  mixed64   float32; 64 prompts of 16..512 tokens with 16..128 new tokens each
            (seeded).  mpiinfer: all 64 submitted to one Engine, max_batch 16
            (continuous batching).  transformers: batches of 16 in input order,
            left-padded, max_new_tokens = the batch's largest; only each
            request's own tokens count as useful.  Both timed end to end.

Per batch scenario and implementation: prefill time (time to the first token of
every sequence in the batch), decode tok/s = (N - 1) * B / decode time,
end-to-end tok/s = N * B / total time, and the median decode step time
(mpiinfer: timed around ``Engine.step``; transformers: from timestamps taken by a
pass-through logits processor, i.e. forward + generate overhead per token).
For transformers the prefill is a separate ``generate(max_new_tokens=1)`` and the
decode time is ``t_full - t_prefill``, as specified.

Greedy tokens of the two implementations are compared per scenario
(``tokens_match``; ``match_frac`` = fraction of equal tokens position by
position; ``prefix_frac`` = mean fraction of each sequence before its first
difference).  Float32 batch scenarios are expected to match exactly; bfloat16
rounding legitimately differs between implementations.

Matmul floor (mpiinfer only): the same kernels on the same (packed or plain)
weights with nothing else, timed in the same run right after the scenario: one
pass over every linear layer at the scenario's batch rows (mixed64: prompt
tokens at 512-row passes, generated tokens at 16-row passes).  ``ceiling`` =
transformers' step time (mixed64: wall time) / that floor is the best ratio
these kernels allow; ``time/floor`` shows how much the rest of the step costs.

Batch-1 bandwidth bound: bytes of the weights / memory bandwidth, the latter
measured in the same run as the best of 5 ``torch.sum`` over a 2 GiB float32
tensor with the same thread count.  This machine's bandwidth drifts within a
run (35 to 64 GB/s seen minutes apart), so mpiinfer's float32 batch-1 run is
followed by a paired measurement: ``--paired-rounds`` alternations of one decode
step and one ``torch.sum`` over every weight tensor of the model (exactly the
bytes a step must read); "paired" = median read time / median step time.

Models are loaded one at a time (mpiinfer fp32, transformers fp32, mpiinfer
bf16, transformers bf16), each freed before the next is loaded.

Usage::

    python benchmarks/bench_engine.py                       # full run (takes a long time)
    python benchmarks/bench_engine.py --quick               # smoke test on a tiny model
    python benchmarks/bench_engine.py --scenarios fp32_b1,fp32_b16 --model /work/models/llama-1b

Results: a table on stdout and JSON in benchmarks/results/engine.json (--json).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("fp32_b1", "fp32_b16", "bf16_b1", "bf16_b16", "mixed64")
DEFAULT_MODEL = REPO / "benchmarks" / "models" / "llama-1b"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "engine.json"
QUICK_JSON = REPO / "benchmarks" / "results" / "engine_quick.json"
BATCH = 16
MIXED_N = 64
MIXED_MAX_BATCH = 16


def scenario_batch(s: str) -> int:
    return MIXED_MAX_BATCH if s == "mixed64" else (BATCH if s.endswith("b16") else 1)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- setup
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help=f"checkpoint directory (default: {DEFAULT_MODEL.relative_to(REPO)}, created with "
                         "init_model(preset='1b') if missing; with --quick: a tiny temporary model)")
    ap.add_argument("--arch", default="llama", help="family of the default model (default llama: Llama-3.2-1B's "
                    "shapes in benchmarks/models/llama-1b; e.g. gemma3: gemma-3-1b's in benchmarks/models/gemma3-1b, "
                    "results in benchmarks/results/engine_gemma3.json)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both implementations (default 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens in the batch scenarios "
                    "(default 128; 16 with --quick)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per request in the batch scenarios "
                    "(default 64; 8 with --quick)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: tiny random model in a temp dir, few tokens, small mixed workload")
    ap.add_argument("--json", default=None, help="where to write the JSON results (default "
                    f"{DEFAULT_JSON.relative_to(REPO)}; with --quick: {QUICK_JSON.relative_to(REPO)}, so a smoke "
                    "test never overwrites real results)")
    ap.add_argument("--skip-hf", action="store_true", help="only run mpiinfer (no transformers)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default 0)")
    ap.add_argument("--paired-rounds", type=int, default=16,
                    help="alternations of decode step / weight read after the float32 batch-1 run (default 16)")
    a = ap.parse_args(argv)
    scen = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [s for s in scen if s not in SCENARIOS]
    if bad or not scen:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    a.scenarios = [s for s in SCENARIOS if s in scen]      # canonical order (groups by dtype)
    if a.json is None:
        a.json = str(QUICK_JSON if a.quick else DEFAULT_JSON if a.arch == "llama" else
                     DEFAULT_JSON.with_name(f"engine_{a.arch}.json"))
    if a.prompt_len is None:
        a.prompt_len = 16 if a.quick else 128
    if a.new_tokens is None:
        a.new_tokens = 8 if a.quick else 64
    if a.prompt_len < 1 or a.new_tokens < 1 or a.threads < 1:
        ap.error("--prompt-len, --new-tokens and --threads must be positive")
    # mixed workload: (prompt length range, new-token range)
    a.mixed_len = (8, 64) if a.quick else (16, 512)
    a.mixed_new = (2, 8) if a.quick else (16, 128)
    return a


def resolve_model(a, tmpdir: str) -> str:
    from mpiinfer.tools.init_model import init_model
    if a.model is not None:
        if not os.path.isfile(os.path.join(a.model, "config.json")):
            if a.quick:
                sys.exit(f"{a.model} has no config.json")
            log(f"{a.model} has no checkpoint: creating one with init_model(arch={a.arch!r}, preset='1b') "
                "(4-5 GB of float32 weights, takes a few minutes) ...")
            t = time.perf_counter()
            init_model(a.model, arch=a.arch, preset="1b", overwrite=True)
            log(f"  created {a.model} in {time.perf_counter() - t:.0f}s")
        return a.model
    if a.quick:
        d = os.path.join(tmpdir, f"tiny-{a.arch}")
        log(f"--quick: creating a tiny random {a.arch} with init_model(preset='tiny') in {d}")
        return init_model(d, arch=a.arch, preset="tiny", seed=0)
    d = str(DEFAULT_MODEL.with_name(f"{a.arch}-1b"))
    if not os.path.isfile(os.path.join(d, "config.json")):
        log(f"{d} does not exist: creating it with init_model(arch={a.arch!r}, preset='1b') "
            "(4-5 GB of float32 weights, takes a few minutes) ...")
        t = time.perf_counter()
        init_model(d, arch=a.arch, preset="1b", overwrite=True)
        log(f"  created {d} in {time.perf_counter() - t:.0f}s")
    return d


def machine_info(threads: int) -> dict:
    import transformers
    cpu, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_flags": sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                                       "amx_bf16", "amx_tile", "avx_vnni")),
        "logical_cpus": os.cpu_count(),
        "mem_total_bytes": mem,
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }


def measure_bandwidth(nbytes: int, reps: int = 5) -> dict:
    """Read bandwidth (bytes/s): best of ``reps`` torch.sum over an ``nbytes`` float32 tensor."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)      # touch every page before timing
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    del x
    gc.collect()
    return {"bytes": nbytes, "best_s": best, "bytes_per_s": nbytes / best, "reps": reps}


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def make_mixed(n: int, vocab: int, seed: int, len_range: tuple, new_range: tuple) -> tuple:
    rng = random.Random(seed)
    lens = [rng.randint(*len_range) for _ in range(n)]
    news = [rng.randint(*new_range) for _ in range(n)]
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]
    return prompts, news


def compare(ours: list, theirs: list) -> dict:
    """Position-wise comparison of two lists of token-id lists."""
    total = same = 0
    prefix = []
    for a, b in zip(ours, theirs):
        n = max(len(a), len(b))
        eq = sum(1 for x, y in zip(a, b) if x == y)
        total += n
        same += eq
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(k / n if n else 1.0)
    return {"tokens_match": len(ours) == len(theirs) and all(a == b for a, b in zip(ours, theirs)),
            "match_frac": same / total if total else 1.0,
            "prefix_frac": sum(prefix) / len(prefix) if prefix else 1.0,
            "sequences_identical": sum(1 for a, b in zip(ours, theirs) if a == b),
            "sequences": len(ours)}


def _rate(n, t):
    return n / t if t and t > 0 else None


def batch_metrics(B: int, N: int, t_prefill: float, t_total: float, steps: list) -> dict:
    t_decode = t_total - t_prefill
    return {
        "batch": B, "new_tokens": N,
        "prefill_s": t_prefill,
        "decode_s": t_decode,
        "total_s": t_total,
        "decode_tok_s": _rate((N - 1) * B, t_decode) if N > 1 else None,
        "e2e_tok_s": _rate(N * B, t_total),
        "step_median_s": statistics.median(steps) if steps else None,
        "decode_steps_timed": len(steps),
    }


# ----------------------------------------------------------------------------- mpiinfer
class Ours:
    name = "mpiinfer"

    def __init__(self, model_dir: str, dtype: str, kv_tokens: int, max_batch: int):
        from mpiinfer.comm.mesh import Mesh
        from mpiinfer.config import EngineConfig, ModelConfig
        from mpiinfer.device import Device
        from mpiinfer.engine.kv_cache import kv_bytes_per_token
        from mpiinfer.engine.runner import ModelRunner
        from mpiinfer.tokenizer import Tokenizer
        mc = ModelConfig.from_dir(model_dir)
        dbytes = 4 if dtype == "float32" else 2
        budget = kv_tokens * kv_bytes_per_token(mc, dbytes)
        t = time.perf_counter()
        self.runner = ModelRunner(model_dir, EngineConfig(dtype=dtype, kv_budget_bytes=budget, max_batch=max_batch),
                                  Mesh.single(), Device("cpu"))
        self.packed = self.runner.packed
        self.load_s = time.perf_counter() - t
        self.tok = Tokenizer(model_dir)
        self.weight_bytes = self.runner.weight_bytes
        self.vocab = mc.vocab_size

    def _engine(self, max_batch: int, step_tokens=None):
        from mpiinfer.engine.generate import Engine
        return Engine(self.runner, self.tok, max_batch=max_batch, step_tokens=step_tokens)

    def _requests(self, prompts, news):
        from mpiinfer.config import SamplingParams
        from mpiinfer.messages import Request
        return [Request(i, i, SamplingParams(max_tokens=n, ignore_eos=True), prompt_token_ids=p)
                for i, (p, n) in enumerate(zip(prompts, news))]

    def warmup(self):
        eng = self._engine(2)
        list(eng.generate(self._requests([[5] * 8, [7] * 5], [3, 3])))

    def run_batch(self, prompts: list, N: int) -> tuple:
        B = len(prompts)
        # the whole batch's prompts in one step, so "prefill" is one model call as in transformers
        eng = self._engine(B, step_tokens=max(B * len(prompts[0]), self.runner.engine_cfg.prefill_chunk_tokens))
        for r in self._requests(prompts, [N] * B):
            err = eng.add(r)
            if err is not None:
                raise RuntimeError(f"request refused: {err.error}")
        results, steps = [], []
        t0 = time.perf_counter()
        while eng.tokens_generated < B and eng.has_work():    # prefill: until every sequence has a token
            results += eng.step()
        t1 = time.perf_counter()
        while eng.has_work():
            ts = time.perf_counter()
            results += eng.step()
            steps.append(time.perf_counter() - ts)
        t2 = time.perf_counter()
        results.sort(key=lambda r: r.index)
        toks = [r.token_ids for r in results]
        assert len(toks) == B and all(len(t) == N for t in toks), "mpiinfer did not produce N tokens per request"
        return batch_metrics(B, N, t1 - t0, t2 - t0, steps), toks

    def run_mixed(self, prompts: list, news: list, max_batch: int) -> tuple:
        eng = self._engine(max_batch)
        reqs = self._requests(prompts, news)
        t0 = time.perf_counter()
        results = list(eng.generate(reqs))
        wall = time.perf_counter() - t0
        errs = [r for r in results if r.error is not None]
        if errs:
            raise RuntimeError(f"{len(errs)} mixed requests failed, e.g. {errs[0].error}")
        results.sort(key=lambda r: r.index)
        toks = [r.token_ids for r in results]
        useful = sum(len(t) for t in toks)
        assert [len(t) for t in toks] == list(news), "mpiinfer truncated some requests"
        return {"wall_s": wall, "useful_tokens": useful, "useful_tok_s": useful / wall,
                "engine_steps": eng.steps, "max_batch": max_batch}, toks

    def paired_read(self, prompt: list, rounds: int) -> dict:
        """Alternate one batch-1 decode step with one read of every weight tensor (``torch.sum``); medians.
        Plain (unpacked) weights only: a packed weight cannot be summed."""
        eng = self._engine(1)
        eng.add(self._requests([prompt], [rounds + 2])[0])
        eng.step()                                            # prefill
        ws = list(self.runner.model.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in ws)
        steps, reads = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            eng.step()
            steps.append(time.perf_counter() - t)
            t = time.perf_counter()
            for p in ws:
                p.sum()
            reads.append(time.perf_counter() - t)
        while eng.has_work():
            eng.step()
        rm = statistics.median(reads)
        return {"rounds": rounds, "step_median_s": statistics.median(steps), "read_median_s": rm,
                "read_bytes": nbytes, "read_bytes_per_s": nbytes / rm, "steps_s": steps, "reads_s": reads}

    def matmul_pass_s(self, rows: int, head_rows: int, reps: int = 5) -> float:
        """Seconds for one pass over every linear weight of the model (in forward order, as the engine uses
        them: packed or plain) with ``rows`` activation rows, the LM head with ``head_rows``; nothing else.
        The floor under a model step of that shape with these kernels: attention, norms, RoPE, sampling and
        the engine are all left out.  Median of ``reps`` passes after one warm-up pass."""
        from mpiinfer import kernels
        from mpiinfer.parallel.linear import ColumnParallelLinear, RowParallelLinear
        m = self.runner.model
        ws = [mod.weight for layer in m.layers for mod in layer.modules()
              if isinstance(mod, (ColumnParallelLinear, RowParallelLinear))]
        head = m.head_weights()
        hidden = self.runner.cfg.hidden_size
        dt = self.runner.dtype
        xs = {}

        def x_for(r, k):
            if (r, k) not in xs:
                xs[(r, k)] = torch.randn(r, k).to(dt)
            return xs[(r, k)]

        def one():
            for w in ws:
                kernels.linear(x_for(rows, w.shape[1]), w)
            for w in head[:len(head) if head_rows else 0]:
                kernels.linear(x_for(head_rows, hidden), w)

        one()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            one()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    def close(self):
        del self.runner


def matmul_floor(impl: Ours, s: str, m: dict, mixed_prompts: list, mixed_max_len: int) -> dict:
    """The time mpiinfer could not go below with its kernels: its linear layers alone at the scenario's shapes
    (``Ours.matmul_pass_s``).  Batch scenarios: one decode step at batch B (compare with the median step).
    mixed64: prompt tokens at the rate of a pass over ``mixed_max_len`` rows (no head) plus generated tokens at
    the rate of a batch-16 decode pass (the continuous batch is at most 16 wide, narrower in its tail, where
    the real rate is lower still): compare with the wall time."""
    if s == "mixed64":
        rows = mixed_max_len
        t_prompt = impl.matmul_pass_s(rows, 0, reps=3) / rows
        t_gen = impl.matmul_pass_s(MIXED_MAX_BATCH, MIXED_MAX_BATCH) / MIXED_MAX_BATCH
        p_tok = sum(len(p) for p in mixed_prompts)
        return {"floor_s": p_tok * t_prompt + m["useful_tokens"] * t_gen, "prompt_tokens": p_tok,
                "prompt_token_s": t_prompt, "generated_token_s": t_gen, "compare_with": "wall_s"}
    B = m["batch"]
    return {"floor_s": impl.matmul_pass_s(B, B), "rows": B, "compare_with": "step_median_s"}


# ----------------------------------------------------------------------------- transformers
class _StepTimer:
    """Pass-through logits processor: records a timestamp per generated token."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


class HF:
    name = "transformers"

    def __init__(self, model_dir: str, dtype: torch.dtype):
        import transformers
        from transformers import AutoModelForCausalLM
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        t = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.model.eval()
        self.load_s = time.perf_counter() - t
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def _generate(self, ids, mask, n, timer=None):
        from transformers import LogitsProcessorList
        kw = {}
        if timer is not None:
            kw["logits_processor"] = LogitsProcessorList([timer])
        with torch.inference_mode():
            return self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, eos_token_id=None, pad_token_id=0, **kw)

    def warmup(self):
        ids = torch.tensor([[5] * 8, [7] * 8])
        self._generate(ids, torch.ones_like(ids), 3)

    def run_batch(self, prompts: list, N: int) -> tuple:
        B, L = len(prompts), len(prompts[0])
        ids = torch.tensor(prompts, dtype=torch.int64)
        mask = torch.ones_like(ids)
        t = time.perf_counter()
        self._generate(ids, mask, 1)
        t_prefill = time.perf_counter() - t
        timer = _StepTimer()
        t0 = time.perf_counter()
        out = self._generate(ids, mask, N, timer)
        t_full = time.perf_counter() - t0
        toks = out[:, L:].tolist()
        assert all(len(x) == N for x in toks), "transformers did not produce N tokens per request"
        steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
        m = batch_metrics(B, N, t_prefill, t_full, steps)
        # as specified: prefill from the separate max_new_tokens=1 call, decode = t_full - t_prefill
        m["prefill_inrun_s"] = (timer.stamps[0] - t0) if timer.stamps else None
        return m, toks

    def run_mixed(self, prompts: list, news: list, max_batch: int) -> tuple:
        toks, useful, gen_total, padded = [], 0, 0, 0
        t0 = time.perf_counter()
        for b in range(0, len(prompts), max_batch):
            ps, ns = prompts[b:b + max_batch], news[b:b + max_batch]
            L = max(len(p) for p in ps)
            ids = torch.zeros(len(ps), L, dtype=torch.int64)          # pad id 0, left padding
            mask = torch.zeros(len(ps), L, dtype=torch.int64)
            for i, p in enumerate(ps):
                ids[i, L - len(p):] = torch.tensor(p)
                mask[i, L - len(p):] = 1
            mx = max(ns)
            out = self._generate(ids, mask, mx)
            gen = out[:, L:]
            gen_total += gen.numel()
            padded += ids.numel() - int(mask.sum())
            for i, n in enumerate(ns):
                k = min(n, gen.shape[1])
                useful += k
                toks.append(gen[i, :k].tolist())
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "useful_tokens": useful, "useful_tok_s": useful / wall,
                "generated_tokens": gen_total, "pad_prompt_tokens": padded, "max_batch": max_batch}, toks

    def close(self):
        del self.model


# ----------------------------------------------------------------------------- driver
def run(a) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    info = machine_info(a.threads)
    log(f"machine: {info['cpu_model']} ({info['logical_cpus']} logical CPUs, flags {','.join(info['cpu_flags'])}), "
        f"torch {info['torch']}, transformers {info['transformers']}, threads {a.threads}")

    with tempfile.TemporaryDirectory(prefix="bench_engine-") as tmp:
        model_dir = resolve_model(a, tmp)
        from mpiinfer.config import ModelConfig
        mc = ModelConfig.from_dir(model_dir)
        log(f"model: {model_dir} ({mc.arch}, {mc.num_params / 1e9:.3f}B params, vocab {mc.vocab_size})")

        bw_bytes = (256 << 20) if a.quick else (2 << 30)
        bw = measure_bandwidth(bw_bytes)
        log(f"memory bandwidth: {bw['bytes_per_s'] / 1e9:.1f} GB/s (torch.sum over {bw_bytes >> 20} MiB float32, "
            f"best of {bw['reps']}, {a.threads} threads)")

        P, N = a.prompt_len, a.new_tokens
        if P + N > mc.max_position_embeddings:
            sys.exit(f"--prompt-len + --new-tokens exceeds the model context ({mc.max_position_embeddings})")
        batch_prompts = make_prompts(BATCH, P, mc.vocab_size, a.seed)
        mixed_prompts, mixed_news = make_mixed(MIXED_N, mc.vocab_size, a.seed, a.mixed_len, a.mixed_new)

        groups = [("float32", torch.float32, [s for s in a.scenarios if s.startswith("fp32") or s == "mixed64"]),
                  ("bfloat16", torch.bfloat16, [s for s in a.scenarios if s.startswith("bf16")])]
        data = {s: {} for s in a.scenarios}     # scenario -> impl -> (metrics, tokens)
        loads = {}
        for dname, tdtype, scen in groups:
            if not scen:
                continue
            kv_tokens = 64
            for s in scen:
                if s == "mixed64":
                    kv_tokens = max(kv_tokens, MIXED_MAX_BATCH * (a.mixed_len[1] + a.mixed_new[1]))
                else:
                    kv_tokens = max(kv_tokens, scenario_batch(s) * (P + N))
            kv_tokens = int(kv_tokens * 1.25) + 64    # slack for region fragmentation
            # mpiinfer: one engine per scenario, configured as a user would (``--max-batch`` = the scenario's
            # batch, which picks the weight layout); transformers: one model for all
            impls = [("mpiinfer", [s], (lambda s=s: Ours(model_dir, dname, kv_tokens, scenario_batch(s))))
                     for s in scen]
            if not a.skip_hf:
                impls.append(("transformers", scen, lambda: HF(model_dir, tdtype)))
            for iname, iscen, make in impls:
                log(f"\n[{iname} {dname}] loading ...")
                impl = make()
                loads.setdefault(f"{iname}_{dname}", {"load_s": impl.load_s, "weight_bytes": impl.weight_bytes})
                packed = f", packed weights: {impl.packed}" if hasattr(impl, "packed") else ""
                log(f"  loaded in {impl.load_s:.1f}s ({impl.weight_bytes / 1e9:.2f} GB of weights{packed}); warming up")
                impl.warmup()
                for s in iscen:
                    if s == "mixed64":
                        log(f"  {s}: {MIXED_N} prompts of {a.mixed_len[0]}..{a.mixed_len[1]} tokens, "
                            f"{a.mixed_new[0]}..{a.mixed_new[1]} new, max batch {MIXED_MAX_BATCH} ...")
                        m, toks = impl.run_mixed(mixed_prompts, mixed_news, MIXED_MAX_BATCH)
                        log(f"    {m['wall_s']:.2f}s wall, {m['useful_tokens']} useful tokens, "
                            f"{m['useful_tok_s']:.2f} tok/s")
                    else:
                        B = scenario_batch(s)
                        log(f"  {s}: batch {B}, prompt {P}, {N} new tokens ...")
                        m, toks = impl.run_batch(batch_prompts[:B], N)
                        if iname == "mpiinfer" and s.endswith("_b1") and not impl.packed:
                            m["paired_read"] = impl.paired_read(batch_prompts[0], a.paired_rounds)
                            pr = m["paired_read"]
                            log(f"    paired: decode step {pr['step_median_s'] * 1e3:.1f} ms, reading the weights "
                                f"{pr['read_median_s'] * 1e3:.1f} ms ({pr['read_bytes_per_s'] / 1e9:.1f} GB/s), "
                                f"medians of {pr['rounds']} alternations")
                        dec = f"{m['decode_tok_s']:.2f}" if m["decode_tok_s"] is not None else "n/a"
                        med = f"{m['step_median_s'] * 1e3:.1f} ms" if m["step_median_s"] is not None else "n/a"
                        log(f"    prefill {m['prefill_s']:.3f}s, decode {dec} tok/s (median step {med}), "
                            f"e2e {m['e2e_tok_s']:.2f} tok/s")
                    if hasattr(impl, "packed"):
                        m["packed_weights"] = impl.packed
                    if hasattr(impl, "matmul_pass_s"):
                        m["matmul_floor"] = matmul_floor(impl, s, m, mixed_prompts, a.mixed_len[1])
                        log(f"    matmul floor (the model's linear layers alone at these shapes): "
                            f"{m['matmul_floor']['floor_s']:.3f}s")
                    data[s][iname] = (m, toks)
                impl.close()
                del impl
                gc.collect()

    # ------------------------------------------------------------------ rows
    rows = []
    for s in a.scenarios:
        ours_m, ours_t = data[s]["mpiinfer"]
        hf = data[s].get("transformers")
        row = {"scenario": s, "dtype": "bfloat16" if s.startswith("bf16") else "float32",
               "mpiinfer": ours_m, "transformers": hf[0] if hf else None}
        key = "useful_tok_s" if s == "mixed64" else "decode_tok_s"
        row["metric"] = key
        row["mpiinfer_tok_s"] = ours_m[key]
        row["transformers_tok_s"] = hf[0][key] if hf else None
        row["ratio"] = (ours_m[key] / hf[0][key]) if hf and ours_m[key] and hf[0][key] else None
        if s != "mixed64" and hf:
            row["e2e_ratio"] = ours_m["e2e_tok_s"] / hf[0]["e2e_tok_s"]
            row["prefill_ratio"] = hf[0]["prefill_s"] / ours_m["prefill_s"]   # >1: ours is faster
        if s == "mixed64" and hf:
            row["wall_ratio"] = hf[0]["wall_s"] / ours_m["wall_s"]
        fl = ours_m.get("matmul_floor")
        if fl:
            ours_t_s = ours_m[fl["compare_with"]]
            row["mpiinfer_over_floor"] = ours_t_s / fl["floor_s"]
            if hf and hf[0].get(fl["compare_with"]):
                # the ratio to transformers mpiinfer would reach if everything but its matmuls took no time
                row["ceiling_ratio"] = hf[0][fl["compare_with"]] / fl["floor_s"]
        if hf:
            row.update(compare(ours_t, hf[1]))
        notes = []
        if s.endswith("_b1"):
            wb = loads[f"mpiinfer_{row['dtype']}"]["weight_bytes"]
            bound = bw["bytes_per_s"] / wb
            row["bandwidth_bound_tok_s"] = bound
            if ours_m["decode_tok_s"]:
                row["mpiinfer_frac_of_bound"] = ours_m["decode_tok_s"] / bound
                notes.append(f"{row['mpiinfer_frac_of_bound']:.0%} of bw bound ({bound:.2f} tok/s)")
                pr = ours_m.get("paired_read")
                if pr:
                    row["paired_frac_of_bound"] = pr["read_median_s"] / pr["step_median_s"]
                    notes.append(f"paired: {row['paired_frac_of_bound']:.0%} of reading the weights once")
            if hf and hf[0]["decode_tok_s"]:
                row["transformers_frac_of_bound"] = hf[0]["decode_tok_s"] / bound
        if hf:
            if row["tokens_match"]:
                notes.append("tokens match")
            else:
                notes.append(f"tokens {row['match_frac']:.1%} equal ({row['sequences_identical']}/"
                             f"{row['sequences']} seqs identical)")
        if s == "mixed64":
            notes.append(f"useful tok/s e2e; wall {ours_m['wall_s']:.1f}s" +
                         (f" vs {hf[0]['wall_s']:.1f}s" if hf else ""))
        row["notes"] = "; ".join(notes)
        rows.append(row)

    return {"machine": info,
            "config": {"model": os.path.abspath(model_dir) if not a.quick or a.model else "tiny (temporary)",
                       "model_arch": mc.arch, "model_params": mc.num_params, "vocab_size": mc.vocab_size,
                       "threads": a.threads, "prompt_len": P, "new_tokens": N, "batch": BATCH,
                       "mixed": {"n": MIXED_N, "max_batch": MIXED_MAX_BATCH, "prompt_len_range": a.mixed_len,
                                 "new_tokens_range": a.mixed_new},
                       "seed": a.seed, "quick": a.quick, "skip_hf": a.skip_hf, "scenarios": a.scenarios},
            "bandwidth": bw, "loads": loads, "rows": rows}


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def print_tables(res: dict) -> None:
    rows = res["rows"]
    print()
    bw = res["bandwidth"]
    print(f"memory bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s; decode tok/s for batch scenarios, "
          "useful tok/s end to end for mixed64; ratio = mpiinfer / transformers")
    print("ceiling = transformers' time / mpiinfer's matmul floor (its linear layers alone at the scenario's "
          "shapes, measured in this run): the ratio reachable if attention, norms, sampling and the engine took "
          "no time; time/floor = mpiinfer's time over that floor")
    hdr = ["scenario", "mpiinfer tok/s", "transformers tok/s", "ratio", "ceiling", "time/floor", "notes"]
    table = [[r["scenario"], _f(r["mpiinfer_tok_s"]), _f(r["transformers_tok_s"]), _f(r["ratio"], "{:.2f}x"),
              _f(r.get("ceiling_ratio"), "{:.2f}x"), _f(r.get("mpiinfer_over_floor"), "{:.2f}"),
              r["notes"]] for r in rows]
    _print_table(hdr, table)

    detail = []
    for r in rows:
        if r["scenario"] == "mixed64":
            continue
        for impl in ("mpiinfer", "transformers"):
            m = r[impl]
            if m is None:
                continue
            detail.append([r["scenario"], impl, _f(m["prefill_s"], "{:.3f}"), _f(m["decode_tok_s"]),
                           _f(m["e2e_tok_s"]),
                           _f(None if m["step_median_s"] is None else m["step_median_s"] * 1e3, "{:.1f}")])
    if detail:
        print()
        _print_table(["scenario", "impl", "prefill s", "decode tok/s", "e2e tok/s", "median step ms"], detail)


def _print_table(hdr, table):
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *table)]
    line = lambda cells: " | ".join(str(c).ljust(n) for c, n in zip(cells, w))
    print(line(hdr))
    print("-+-".join("-" * n for n in w))
    for row in table:
        print(line(row))


def main(argv=None) -> int:
    a = parse_args(argv)
    res = run(a)
    print_tables(res)
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(f"\nJSON written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
