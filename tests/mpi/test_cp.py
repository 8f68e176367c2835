"""Context parallelism end to end: a >= 4,000-token document split over CP ranks with ring attention for the
prefill and sharded-KV decode; greedy tokens identical to one rank and to transformers, logprobs within 1e-4."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from ..reference import hf_greedy
from ..tiers import by_ranks

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")
NEW = 16


def mpirun(n, args, timeout=300):
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpiinfer", "run", "--threads", "1"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def setup(model_dirs, tmp_path_factory):
    d = model_dirs("qwen3", max_position_embeddings=8192)
    rng = random.Random(0)
    prompts = {"doc": [rng.randrange(4, 500) for _ in range(4099)],     # not divisible by 2 x cp
               "short": [rng.randrange(4, 500) for _ in range(7)],      # below --cp-min-tokens: ordinary requests
               "doc2": [rng.randrange(4, 500) for _ in range(1201)],   # spread over the CP ranks (--cp-short)
               "s2": [rng.randrange(4, 500) for _ in range(150)],
               "s3": [rng.randrange(4, 500) for _ in range(3)],
               "s4": [rng.randrange(4, 500) for _ in range(40)]}
    tmp = tmp_path_factory.mktemp("cp")
    inp = tmp / "in.jsonl"
    with open(inp, "w") as f:
        f.writelines(json.dumps({"id": k, "prompt_token_ids": p, "max_tokens": NEW, "logprobs": True,
                                "ignore_eos": True}) + "\n" for k, p in prompts.items())
    ref = dict(zip(prompts, hf_greedy(d, list(prompts.values()), NEW)))
    return d, str(inp), ref


@pytest.mark.parametrize("n,flags", by_ranks([(2, ["--cp", "2"]), (4, ["--cp", "4"]), (3, ["--cp", "3"]),
                                               (4, ["--tp", "2", "--cp", "2"]),
                                               (2, ["--cp", "2", "--cp-short", "first"]),
                                               (4, ["--cp", "2"])]))   # dp=2 replicas of cp=2
def test_cp_matches_reference(n, flags, setup, tmp_path):
    d, inp, ref = setup
    out = tmp_path / "o.jsonl"
    p = mpirun(n, ["-m", d, "-i", inp, "-o", str(out), "--max-seq-len", "8192", "--cp-min-tokens", "1000"] + flags)
    assert p.returncode == 0, p.stderr
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(recs) == list(ref)
    for k, (toks, lps) in ref.items():
        assert recs[k]["token_ids"] == toks, k
        assert max(abs(a - b) for a, b in zip(recs[k]["logprobs"], lps)) < 1e-4, k


@pytest.mark.parametrize("n,flags", by_ranks([(2, ["--cp", "2"]), (4, ["--tp", "2", "--cp", "2"])]))
def test_cp_with_a_bfloat16_kv_cache(n, flags, setup, tmp_path):
    """``--kv-dtype bfloat16`` under float32 weights: the ring passes bfloat16 K/V blocks and the CP decode reads a
    bfloat16 shard, both computing in float32: tokens equal transformers' with its cache rounded to bfloat16
    (tests/reference.py), for the document, the spread prompts and the short ones; logprobs as in
    test_parity.py::test_bfloat16_kv_cache_under_a_float32_model (float32 noise at the median, 2e-3 at most: a value
    at a rounding boundary may round the other way)."""
    import statistics

    import torch
    d, inp, _ = setup
    prompts = {r["id"]: r["prompt_token_ids"] for r in map(json.loads, open(inp))}
    ref = dict(zip(prompts, hf_greedy(d, list(prompts.values()), NEW, kv_dtype=torch.bfloat16)))
    out = tmp_path / "o.jsonl"
    p = mpirun(n, ["-m", d, "-i", inp, "-o", str(out), "--max-seq-len", "8192", "--cp-min-tokens", "1000",
                   "--kv-dtype", "bfloat16"] + flags)
    assert p.returncode == 0, p.stderr
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(recs) == list(ref)
    diffs = []
    for k, (toks, lps) in ref.items():
        assert recs[k]["token_ids"] == toks, k
        diffs += [abs(a - b) for a, b in zip(recs[k]["logprobs"], lps)]
    assert max(diffs) < 2e-3 and statistics.median(diffs) < 1e-5, (max(diffs), statistics.median(diffs))


def test_document_beyond_one_ranks_kv_budget_needs_cp(setup, tmp_path):
    d, inp, ref = setup
    # qwen3 tiny: 2 layers x 2 KV heads x 16 dims x 2 (K, V) x 4 bytes = 512 bytes per token and rank
    budget = str(3000 * 512)          # 3000 tokens per rank: the 4099-token document needs 2 ranks
    out1 = tmp_path / "one.jsonl"
    p = mpirun(1, ["-m", d, "-i", inp, "-o", str(out1), "--max-seq-len", "8192", "--kv-budget", budget])
    assert p.returncode == 0, p.stderr
    recs = {r["id"]: r for r in map(json.loads, out1.read_text().splitlines())}
    assert recs["doc"]["error"]["type"] == "prompt_too_long"
    assert "--cp" in recs["doc"]["error"]["message"]
    assert "error" not in recs["short"]
    out2 = tmp_path / "cp.jsonl"
    p = mpirun(2, ["-m", d, "-i", inp, "-o", str(out2), "--max-seq-len", "8192", "--kv-budget", budget,
                   "--cp", "2", "--cp-min-tokens", "1000"])
    assert p.returncode == 0, p.stderr
    recs = {r["id"]: r for r in map(json.loads, out2.read_text().splitlines())}
    assert recs["doc"]["token_ids"] == ref["doc"][0]


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_cp_documents_in_a_tight_cache_grow_and_are_preempted(arch, model_dirs, tmp_path):
    """CP documents take their prompt shard's blocks and then a block at a time, beside ordinary requests, in a
    cache too small for everything at once: decodes find no block, sequences (CP ones included) are preempted and
    start over, caches end up in several runs (CP decode attends run by run, the ring gathers its rows), and every
    answer is still transformers' (Gemma 3: windowed layers over the runs too)."""
    from mpiinfer.config import ModelConfig
    from mpiinfer.engine.kv_cache import kv_bytes_per_token
    d = model_dirs(arch, max_position_embeddings=8192,
                   **({"sliding_window": 100, "num_hidden_layers": 3} if arch == "gemma3" else {}))
    rng = random.Random(11)
    lengths, new = [100, 120, 90, 110, 100, 130, 80, 95, 1500, 1201], 100
    prompts = [[rng.randrange(4, 500) for _ in range(n)] for n in lengths]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "prompt_token_ids": p, "max_tokens": new, "logprobs": True,
                                       "ignore_eos": True}) + "\n" for i, p in enumerate(prompts)))
    ref = hf_greedy(d, prompts, new)
    per_token = kv_bytes_per_token(ModelConfig.from_dir(d), 4)
    out = tmp_path / "o.jsonl"
    # 1,400 rows per CP rank: the first document's shard (750 rows, 800 with its new tokens) and the short
    # requests' prompts fit, not all their answers
    p = mpirun(2, ["-m", d, "-i", str(inp), "-o", str(out), "--max-seq-len", "8192", "--cp-min-tokens", "1000",
                   "--cp", "2", "--kv-budget", str(1400 * per_token), "--max-batch", "8"])
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [str(i) for i in range(len(prompts))]
    for r, (toks, lps) in zip(recs, ref):
        assert r["token_ids"] == toks, r["id"]
        assert max(abs(a - b) for a, b in zip(r["logprobs"], lps)) < 1e-4, r["id"]
    assert json.loads(open(str(out) + ".summary.json").read())["preemptions"] > 0


@pytest.mark.parametrize("arch,n,flags", by_ranks([("qwen3", 2, ["--cp", "2"]), ("gemma3", 2, ["--cp", "2"]),
                                                  ("qwen3", 4, ["--tp", "2", "--cp", "2"]),
                                                  ("qwen3", 3, ["--cp", "3"])], ranks=lambda c: c[1]))
def test_cp_documents_share_the_prefix_cache(arch, n, flags, model_dirs, tmp_path):
    """Documents sharing a prefix share CP groups through the prefix cache (questions after one document, a document
    cut short and continued differently, an identical one, one whose every group is cached, one laid out partly
    in another prompt's layout; the later ones wait for the first to compute the groups): tokens are transformers',
    logprobs within 1e-4, and the summary counts at least 90% of the shareable tokens as shared; with
    ``--prefix-cache off`` nothing is shared and the answers are the same (Gemma 3: windowed layers over queries
    that are only the uncached part)."""
    from mpiinfer.parallel.shard import cp_groups
    d = model_dirs(arch, max_position_embeddings=8192,
                   **({"sliding_window": 100, "num_hidden_layers": 3} if arch == "gemma3" else {}))
    rng = random.Random(5)
    doc = [rng.randrange(4, 500) for _ in range(2400)]       # cp=2: 4 groups of 512 tokens, one of 256, a tail
    qs = [[rng.randrange(4, 500) for _ in range(k)] for k in (30, 41, 25)]
    # ... doc[:2304] + 1 token: every group cached, a 1-token tail, so CP ranks > 0 have no query at all; doc[:2040]
    # + a question: at cp=2 its default layout (4 groups of 512) would straddle 2,040: it shares 3 and lays out the
    # rest its own way (2 groups of 256); doc[:1900] + a question: at cp=2 its default layout (7 groups of 256)
    # shares nothing with the others', it takes their 3 groups of 512 and the previous prompt's first group of 256
    prompts = [doc + qs[0], doc + qs[1], doc[:2200] + qs[2], list(doc), doc + qs[0], doc[:2304] + [7],
               doc[:2040] + qs[2], doc[:1900] + qs[1], qs[1] * 3]
    cp = int(flags[-1])
    assert cp != 2 or (cp_groups(len(doc), cp) == [128] * 4 + [64] and cp_groups(2065, cp) == [128] * 4 and
                       cp_groups(1941, cp) == [64] * 7)
    # what a prompt could take at best: its common prefix with an earlier one, its last token computed
    ideal = sum(max(min(next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))), len(a) - 1)
                    for b in prompts[:i]) for i, a in enumerate(prompts[:8]) if i)
    # worked out by hand from the layouts: at cp=2 2,304 x 4 + 2,048 + 1,536 + 1,792; at cp=3 (groups of 384)
    # 2,304 x 4 + 1,920 x 2 + 1,536
    want = 14592
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "prompt_token_ids": p, "max_tokens": NEW, "logprobs": True,
                                       "ignore_eos": True}) + "\n" for i, p in enumerate(prompts)))
    ref = hf_greedy(d, prompts, NEW)
    cached = {}
    for mode in ("on", "off"):
        out = tmp_path / f"{mode}.jsonl"
        p = mpirun(n, ["-m", d, "-i", str(inp), "-o", str(out), "--max-seq-len", "8192", "--cp-min-tokens", "1000",
                       "--prefix-cache", mode] + flags)
        assert p.returncode == 0, p.stderr
        recs = [json.loads(x) for x in out.read_text().splitlines()]
        assert [r["id"] for r in recs] == [str(i) for i in range(len(prompts))]
        for r, (toks, lps) in zip(recs, ref):
            assert r["token_ids"] == toks, (mode, r["id"])
            assert max(abs(a - b) for a, b in zip(r["logprobs"], lps)) < 1e-4, (mode, r["id"])
        cached[mode] = json.loads(open(str(out) + ".summary.json").read())["prompt_tokens_cached"]
    # groups are 2 x cp x 64 tokens at the finest: over 90% of the best possible
    assert cached["on"] == want > 0.9 * ideal and cached["off"] == 0, (cached, want, ideal)


@pytest.mark.slow
def test_cp_with_moe_model(model_dirs, tmp_path):
    """CP composes with MoE layers (experts see only this rank's tokens) and with in-replica EP."""
    d = model_dirs("qwen2_moe", max_position_embeddings=8192)
    rng = random.Random(3)
    prompt = [rng.randrange(4, 500) for _ in range(2501)]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "doc", "prompt_token_ids": prompt, "max_tokens": NEW, "logprobs": True,
                               "ignore_eos": True}) + "\n")
    (toks, lps), = hf_greedy(d, [prompt], NEW)
    for n, flags in ((2, ["--cp", "2"]), (4, ["--cp", "2", "--tp", "2", "--ep", "2"])):
        out = tmp_path / f"o{n}.jsonl"
        p = mpirun(n, ["-m", d, "-i", str(inp), "-o", str(out), "--max-seq-len", "8192", "--cp-min-tokens", "1000"]
                   + flags)
        assert p.returncode == 0, p.stderr
        r = json.loads(out.read_text())
        assert r["token_ids"] == toks
        assert max(abs(a - b) for a, b in zip(r["logprobs"], lps)) < 1e-4


@pytest.fixture(scope="module")
def per_layer_docs(model_dirs, tmp_path_factory):
    """A 2,501-token document (ring blocks of ~1,250 rows) for models whose layers attend differently: Gemma 3 (a
    window of 100 on layers 0 and 2, full attention on layer 1: windows reach across the CP shards' edges in the
    prefill and every decode), Llama 4 unchunked (RoPE layers with L2 q/k norm, a NoPE layer with temperature
    tuning from position 3, a MoE layer between dense ones) and chunked (chunks of 700 positions on the RoPE layers,
    cutting across the CP shards: ring blocks in earlier chunks skipped, the decodes' chunk spread over ranks)."""
    rng = random.Random(5)
    prompt = [rng.randrange(4, 500) for _ in range(2501)]
    inp = tmp_path_factory.mktemp("layers_cp") / "in.jsonl"
    inp.write_text(json.dumps({"id": "doc", "prompt_token_ids": prompt, "max_tokens": NEW, "logprobs": True,
                               "ignore_eos": True}) + "\n")
    made = {}

    def get(arch):
        if arch not in made:
            d = model_dirs(arch.removesuffix("_chunked"), max_position_embeddings=8192, num_hidden_layers=3,
                           **({"sliding_window": 100} if arch in ("gemma3", "gpt_oss") else
                              {"attention_chunk_size": None, "floor_scale": 4} if arch == "llama4" else
                              {"attention_chunk_size": 700, "floor_scale": 4} if arch == "llama4_chunked" else {}))
            made[arch] = d, inp, hf_greedy(d, [prompt], NEW)[0]
        return made[arch]
    return get


@pytest.mark.parametrize("arch", ["gemma3", "llama4", "llama4_chunked", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("n,flags", by_ranks([(2, ["--cp", "2"]), (4, ["--tp", "2", "--cp", "2"])]))
def test_cp_with_per_layer_attention(arch, n, flags, per_layer_docs, tmp_path):
    """Layers of one model that attend differently under ring attention: one ring plan per window, NoPE layers'
    identity rotation and position-dependent temperature on every CP shard, gpt-oss's sinks joined once after the
    ring's and the CP decode's merge, DeepSeek-V3's latent rows as the ring's K and V blocks."""
    d, inp, (toks, lps) = per_layer_docs(arch)
    out = tmp_path / "o.jsonl"
    p = mpirun(n, ["-m", d, "-i", str(inp), "-o", str(out), "--max-seq-len", "8192", "--cp-min-tokens", "1000"]
               + flags)
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["token_ids"] == toks and len(set(toks)) >= 4
    assert max(abs(a - b) for a, b in zip(r["logprobs"], lps)) < 1e-4


@pytest.mark.parametrize("n,flags", by_ranks([(2, ["--cp", "2"]), (4, ["--tp", "2", "--cp", "2"])]))
def test_cp_embeddings_and_structured_output(n, flags, setup, tmp_path):
    """A 4,099-token document embedded over the CP ranks (last token on whichever rank holds it, mean summed over
    the shards) and the short inputs on their home ranks, against transformers' final hidden states (cosine >=
    0.99999); a constrained answer about the document is one of its choices, identical to one rank's."""
    import torch
    from transformers import AutoModelForCausalLM
    d, inp, _ = setup
    docs = {json.loads(x)["id"]: json.loads(x)["prompt_token_ids"] for x in open(inp)}
    recs = [{"id": f"{k}-{pool}", "input": docs[k], "pooling": pool} for k in ("doc", "short", "doc2")
            for pool in ("last", "mean")]
    recs.append({"id": "choice", "prompt_token_ids": docs["doc"], "choice": ["sea", "sky", "ship"],
                 "max_tokens": 8})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    outs = {}
    for name, k, fl in (("one", 1, []), ("cp", n, flags)):
        out = tmp_path / f"{name}.jsonl"
        p = mpirun(k, ["-m", d, "-i", str(src), "-o", str(out), "--max-seq-len", "8192", "--cp-min-tokens", "1000"]
                   + fl)
        assert p.returncode == 0, p.stderr
        outs[name] = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert outs["cp"]["choice"]["text"] == outs["one"]["choice"]["text"] in ("sea", "sky", "ship")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for k in ("doc", "short", "doc2"):
        with torch.no_grad():
            h = hf(torch.tensor([docs[k]]), output_hidden_states=True).hidden_states[-1][0].float()
        for pool, v in (("last", h[-1]), ("mean", h.mean(0))):
            want = torch.nn.functional.normalize(v, dim=0).double()
            got = torch.tensor(outs["cp"][f"{k}-{pool}"]["embedding"], dtype=torch.float64)
            assert float(got @ want / got.norm()) >= 0.99999, (k, pool)
