"""Single-process engine vs transformers: greedy tokens identical, logprobs within 1e-4 (float32)."""
import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.messages import Request
from mpiinfer.tokenizer import Tokenizer

from ..conftest import ARCHS
from ..reference import hf_greedy

NEW = 32
LENGTHS = (3, 17, 9, 41, 1, 25)


def prompts_for(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def run_engine(model_dir, prompts, max_batch, step_tokens, new=NEW, pack_weights=None):
    runner = ModelRunner(model_dir, EngineConfig(kv_budget_bytes=1 << 24, pack_weights=pack_weights), Mesh.single(),
                         Device("cpu"))
    engine = Engine(runner, Tokenizer(model_dir), max_batch=max_batch, step_tokens=step_tokens)
    sp = SamplingParams(max_tokens=new, logprobs=True, ignore_eos=True)
    reqs = [Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]
    res = sorted(engine.generate(reqs), key=lambda r: r.index)
    assert [r.error for r in res] == [None] * len(prompts)
    return res, engine


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_transformers(arch, model_dirs):
    d = model_dirs(arch)
    vocab = Tokenizer(d).vocab_size
    prompts = prompts_for(vocab)
    ref = hf_greedy(d, prompts, NEW)
    # all prompts in one batch, whole prompts per step
    res, _ = run_engine(d, prompts, max_batch=len(prompts), step_tokens=4096)
    # continuous batching: 2 slots refilled mid-run, prompts chunked across steps next to decodes
    res_cb, eng = run_engine(d, prompts, max_batch=2, step_tokens=7)
    assert eng.steps > NEW * 3   # slots really were refilled
    for (toks, lps), r, rc in zip(ref, res, res_cb):
        assert len(set(toks)) >= 4, "degenerate reference output: the test model is too weak to catch errors"
        assert r.token_ids == toks
        assert rc.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4
        assert max(abs(a - b) for a, b in zip(rc.logprobs, lps)) < 1e-4
        assert r.finish_reason == "length" and len(r.token_ids) == NEW


def test_llama3_rope_scaling_and_tied_embeddings(model_dirs):
    d = model_dirs("llama", tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   rope_theta=500000.0)
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=1)
    ref = hf_greedy(d, prompts, NEW)
    res, eng = run_engine(d, prompts, max_batch=3, step_tokens=16, pack_weights=True)
    model = eng.runner.model
    # packed: the tied head is a packed copy, the embedding reads its rows from the checkpoint file
    assert all(b.is_mkldnn for b in model.tied_head) and model.embed.weight is None and model.embed.rows is not None
    res_plain, eng = run_engine(d, prompts, max_batch=3, step_tokens=16, pack_weights=False)
    assert eng.runner.model.embed.weight is not None and eng.runner.model.tied_head is None
    for (toks, lps), r, rp in zip(ref, res, res_plain):
        assert rp.token_ids == toks
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


def test_mistral_sliding_window(model_dirs):
    d = model_dirs("mistral", sliding_window=8)
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=2)
    ref = hf_greedy(d, prompts, NEW)
    res, _ = run_engine(d, prompts, max_batch=6, step_tokens=5)
    for (toks, lps), r in zip(ref, res):
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("pack", [False, True])
def test_parity_plain_and_packed_weights(arch, pack, model_dirs):
    """Both CPU weight layouts (plain, and oneDNN-packed incl. MoE experts) match transformers."""
    d = model_dirs(arch)
    prompts = prompts_for(Tokenizer(d).vocab_size)
    ref = hf_greedy(d, prompts, NEW)
    res, eng = run_engine(d, prompts, max_batch=3, step_tokens=9, pack_weights=pack)
    assert eng.runner.packed is pack
    assert eng.runner.model.layers[0].attn.qkv.weight.is_mkldnn is pack
    for (toks, lps), r in zip(ref, res):
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4
