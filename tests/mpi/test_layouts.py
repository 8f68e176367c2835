"""Parallel layouts under mpiexec vs transformers and vs one rank: greedy tokens identical, logprobs within 1e-4.

Each case is a real `mpiexec -n N python -m mpiinfer run ...` with a timeout, on a tiny checkpoint, threads=1 per
rank (ranks beyond 2 oversubscribe this machine's cores: fine for correctness).  The transformers reference and
the single-rank job are computed once per checkpoint (``references``) and shared by its layouts."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from ..reference import dequantized_twin, hf_greedy
from ..tiers import SLOW

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")

NEW = 24
LENGTHS = (3, 17, 9, 30)
TIMEOUT = 180

# (arch, config overrides, ranks, extra flags) -- the layout matrix as data
LAYOUTS = [
    ("llama", {}, 2, ["--tp", "2"]),
    ("llama", {}, 4, ["--tp", "4"]),                          # tp 4 > 2 KV heads: KV heads replicated
    ("llama", {"num_key_value_heads": 1}, 2, ["--tp", "2"]),  # a model with 1 KV head
    ("llama", {"tie_word_embeddings": True}, 2, ["--tp", "2"]),  # packed tied head, embedding rows from the file
    # uneven split, as SmolLM2-135M (9 query / 3 KV heads) at tp=2: KV heads 2 + 1, MLP columns 38 + 37
    ("llama", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16,
               "intermediate_size": 75},
     2, ["--tp", "2"]),
    ("mistral", {}, 2, ["--tp", "2"]),
    ("qwen2", {}, 2, ["--tp", "2"]),
    ("qwen3", {}, 2, ["--tp", "2"]),
    ("qwen3", {}, 4, ["--tp", "4"]),
    ("mistral", {}, 4, ["--tp", "4"]),
    ("qwen2", {}, 4, ["--tp", "4"]),
    ("mixtral", {}, 4, ["--tp", "4"]),
    ("mixtral", {}, 4, ["--tp", "4", "--ep", "2"]),
    ("mixtral", {}, 2, ["--tp", "2"]),
    ("mixtral", {}, 2, ["--tp", "2", "--ep", "2"]),
    ("qwen2_moe", {}, 2, ["--tp", "2", "--ep", "2"]),
    ("qwen3_moe", {}, 2, ["--tp", "2", "--ep", "2"]),
    ("qwen3_moe", {}, 4, ["--tp", "4", "--ep", "2"]),
    ("qwen2_moe", {}, 4, ["--tp", "4", "--ep", "2"]),
    # wide EP: data-parallel attention, experts over all dp x tp ranks, all-to-all dispatch
    ("qwen3_moe", {}, 2, ["--ep", "2"]),
    ("mixtral", {}, 2, ["--ep", "2"]),
    ("qwen2_moe", {}, 2, ["--ep", "2"]),
    ("mixtral", {}, 4, ["--ep", "4"]),
    ("qwen2_moe", {}, 4, ["--tp", "2", "--ep", "4"]),
    # experts that do not divide by ep: the first E % ep EP ranks hold one more
    ("qwen3_moe", {"num_experts": 5}, 2, ["--tp", "2", "--ep", "2"]),     # 3 + 2, in a replica
    ("mixtral", {"num_local_experts": 5}, 2, ["--ep", "2"]),              # 3 + 2, wide EP
    ("qwen2_moe", {"num_experts": 7}, 2, ["--tp", "2", "--ep", "2"]),     # 4 + 3, with the shared expert
    ("mixtral", {"num_local_experts": 6}, 4, ["--tp", "4", "--ep", "4"]),  # 6 at ep=4: 2 2 1 1
    ("qwen2_moe", {"num_experts": 6}, 4, ["--ep", "4"]),                  # wide EP, 2 2 1 1
    ("qwen3_moe", {"num_experts": 15}, 8, ["--ep", "8"]),                 # 60-style: 2 x 7 + 1 at ep=8
    # Gemma 3: sliding and full layers, two RoPE bases, (1 + w) norms, GeGLU
    ("gemma3", {}, 2, ["--tp", "2"]),
    ("gemma3", {}, 4, ["--tp", "4"]),
    ("gemma3", {"num_key_value_heads": 1}, 2, ["--tp", "2"]),   # gemma-3-1b's single KV head, replicated
    ("gemma3", {}, 2, []),                                       # dp=2
    # Llama 4: sigmoid top-1 routing scaling expert inputs, fused expert tensors, chunked / NoPE layers
    ("llama4", {}, 2, ["--tp", "2"]),
    ("llama4", {}, 2, ["--tp", "2", "--ep", "2"]),
    ("llama4", {}, 2, ["--ep", "2"]),                            # wide EP
    ("llama4", {}, 4, ["--tp", "4", "--ep", "2"]),
    ("llama4", {"num_local_experts": 5}, 4, ["--ep", "4"]),      # wide EP, 2 1 1 1
    ("llama4", {}, 2, []),                                       # dp=2
    # gpt-oss: sinks, banded / full layers, YaRN, biased router and experts (interleaved gate/up), clamped SwiGLU
    ("gpt_oss", {}, 2, ["--tp", "2"]),
    ("gpt_oss", {}, 4, ["--tp", "4"]),                            # sinks split with the query heads
    ("gpt_oss", {}, 2, ["--ep", "2"]),                            # wide EP
    ("gpt_oss", {"num_local_experts": 5}, 4, ["--tp", "4", "--ep", "2"]),   # 3 + 2 experts, down bias once
    # MXFP4 experts (reference: transformers on a float32 copy): blocks split by expert TP (16 of a 32-block; 48
    # of 96 columns: the second rank's down blocks start at block 1, mid-block)
    ("gpt_oss", {"mxfp4": True}, 2, ["--tp", "2"]),
    ("gpt_oss", {"mxfp4": True, "intermediate_size": 96}, 2, ["--tp", "2"]),
    ("gpt_oss", {"mxfp4": True}, 2, ["--tp", "2", "--ep", "2"]),
    ("gpt_oss", {}, 2, []),                                       # dp=2
    # DeepSeek-V3: latent attention (heads split, the latent replicated), grouped sigmoid routing, shared expert
    ("deepseek_v3", {}, 2, ["--tp", "2"]),
    ("deepseek_v3", {}, 4, ["--tp", "4"]),
    ("deepseek_v3", {}, 2, ["--tp", "2", "--ep", "2"]),
    ("deepseek_v3", {}, 2, ["--ep", "2"]),                        # wide EP
    ("deepseek_v3", {"n_routed_experts": 6, "n_group": 3}, 4, ["--ep", "4"]),   # wide EP, 2 2 1 1
    ("deepseek_v3", {}, 2, []),                                   # dp=2
    # FP8 e4m3 weights with 24 x 40 block scales (reference: transformers on a float32 copy): TP slices start
    # mid-block (kv_b_proj's 56 rows a rank, o_proj's 24 columns)
    ("deepseek_v3", {"fp8": [24, 40]}, 2, ["--tp", "2"]),
    # DeepSeek-V2: the same latent attention, softmax routing limited to groups
    ("deepseek_v2", {}, 2, ["--tp", "2"]),
    ("deepseek_v2", {}, 2, ["--ep", "2"]),
    ("deepseek_v2", {}, 4, ["--tp", "4", "--ep", "2"]),
]


def mpirun(n, args, timeout=TIMEOUT, env=None):
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpiinfer", "run"] + args
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)


def prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def write_input(path, ps):
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": NEW, "logprobs": True,
                                "ignore_eos": True}) + "\n" for i, p in enumerate(ps))


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _key(arch, overrides):
    return arch + json.dumps(overrides, sort_keys=True)


@pytest.fixture(scope="session")
def references(model_dirs, tmp_path_factory):
    """(checkpoint, arch + overrides) -> (its directory, transformers' greedy tokens and logprobs, the
    single-rank job's records), computed once per checkpoint for all the layouts that use it."""
    made = {}

    def get(arch, overrides):
        key = _key(arch, overrides)
        if key not in made:
            d = model_dirs(arch, **overrides)
            tmp = tmp_path_factory.mktemp("ref")
            ps = prompts(512)
            write_input(tmp / "in.jsonl", ps)
            p1 = mpirun(1, common_args(d, tmp / "in.jsonl") + ["-o", str(tmp / "one.jsonl")])
            assert p1.returncode == 0, p1.stderr
            # MXFP4 experts, FP8 weights: transformers runs a float32 copy of the same values
            hf_dir = dequantized_twin(d, tmp / "float32") if overrides.get("mxfp4") or overrides.get("fp8") else d
            made[key] = (d, tmp / "in.jsonl", hf_greedy(hf_dir, ps, NEW), read(tmp / "one.jsonl"))
        return made[key]
    return get


def common_args(d, inp):
    return ["-m", d, "-i", str(inp), "--threads", "1", "--max-batch", "3", "--step-tokens", "8"]


def layout_id(arch, overrides, n, flags):
    return (f"{arch}-{'-'.join(flags[i] + flags[i + 1] for i in range(0, len(flags), 2))}"
            + ("-" + "-".join(f"{k[:6]}{v}" for k, v in overrides.items()) if overrides else ""))


# the quick loop (-m "not slow") runs one layout of each kind on 2 ranks: dense TP with an uneven split,
# EP inside a replica, wide EP; the rest of the matrix is in the slow tier
QUICK_LAYOUTS = {"llama---tp2-hidden96-num_at6-num_ke3-head_d16-interm75", "mixtral---tp2---ep2", "qwen3_moe---ep2",
                 "qwen3_moe---tp2---ep2-num_ex5", "mixtral---ep2-num_lo5", "gemma3---tp2",
                 "llama4---tp2---ep2", "llama4---ep2", "gpt_oss---tp2-mxfp4True-interm96", "gpt_oss---ep2",
                 "deepseek_v3---tp2", "deepseek_v3---tp2-fp8[24, 40]"}


@pytest.mark.parametrize("arch,overrides,n,flags", [
    pytest.param(*case, id=layout_id(*case), marks=() if layout_id(*case) in QUICK_LAYOUTS else SLOW)
    for case in LAYOUTS])
def test_layout_matches_reference(arch, overrides, n, flags, references, tmp_path):
    d, inp, ref, one = references(arch, overrides)
    pn = mpirun(n, common_args(d, inp) + ["-o", str(tmp_path / "par.jsonl")] + flags)
    assert pn.returncode == 0, pn.stderr
    par = read(tmp_path / "par.jsonl")
    assert len(par) == len(one) == len(ref) == len(LENGTHS)
    for (toks, lps), a, b in zip(ref, one, par):
        assert a["token_ids"] == toks
        assert b["token_ids"] == toks, f"{flags}: parallel tokens differ from transformers"
        assert max(abs(x - y) for x, y in zip(b["logprobs"], lps)) < 1e-4
        assert max(abs(x - y) for x, y in zip(b["logprobs"], a["logprobs"])) < 1e-4


@pytest.mark.parametrize("where", ["load", "step"])
@pytest.mark.parametrize("rank", [0, 1])
def test_failure_on_one_rank_ends_the_job(where, rank, model_dirs, tmp_path):
    d = model_dirs("llama")
    inp = tmp_path / "in.jsonl"
    write_input(inp, prompts(512))
    t0 = time.time()
    p = mpirun(2, ["-m", d, "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "--tp", "2", "--threads", "1"],
               timeout=60, env={"MPIINFER_TEST_FAULT": f"{where}:{rank}"})
    assert p.returncode != 0
    assert f"injected fault at {where} on rank {rank}" in p.stderr
    assert time.time() - t0 < 60


@pytest.mark.parametrize("flags,message", [
    (["--tp", "3"], "world size 2 is not divisible by tp x cp"),
    (["--tp", "2", "--ep", "3"], "--ep 3 must divide --tp 2"),
])
def test_impossible_layout_refused_before_loading(flags, message, model_dirs, tmp_path):
    d = model_dirs("llama")
    inp = tmp_path / "in.jsonl"
    write_input(inp, prompts(512)[:1])
    p = mpirun(2, ["-m", d, "-i", str(inp), "-o", str(tmp_path / "o.jsonl")] + flags, timeout=60)
    assert p.returncode != 0
    assert message in p.stderr
    assert "loaded" not in p.stderr and "Traceback" not in p.stderr


def test_model_not_divisible_refused(model_dirs, tmp_path):
    d = model_dirs("mixtral")
    inp = tmp_path / "in.jsonl"
    write_input(inp, prompts(512)[:1])
    p = mpirun(2, ["-m", d, "-i", str(inp), "-o", str(tmp_path / "o.jsonl"), "--tp", "2", "--ep", "2",
                   "--kv-budget", "1MB"], timeout=60)
    assert p.returncode == 0, p.stderr   # control: this layout is valid
    d2 = model_dirs("llama", num_attention_heads=3, num_key_value_heads=1, head_dim=16)
    p = mpirun(2, ["-m", d2, "-i", str(inp), "-o", str(tmp_path / "o2.jsonl"), "--tp", "2"], timeout=60)
    assert p.returncode == 2
    assert "--tp 2 is larger than num_key_value_heads=1 and does not divide num_attention_heads=3" in p.stderr
