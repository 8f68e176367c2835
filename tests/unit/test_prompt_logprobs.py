"""prompt_logprobs: every prompt token's logprob given the tokens before it (evaluation, data filtering), with
max_tokens 0 for scoring alone; against transformers' forward pass."""
import json
import math

import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.io.records import parse_record
from mpiinfer.io.resume import result_from_json, result_to_json
from mpiinfer.messages import Request
from mpiinfer.tokenizer import Tokenizer

from ..reference import hf_greedy
from .test_prefix_cache import shared_prefix_prompts


def test_records_ask_for_prompt_logprobs():
    d = SamplingParams()
    r = parse_record(json.dumps({"id": "a", "prompt": "hi", "prompt_logprobs": True, "max_tokens": 0}), 1, 0, d)
    assert r.sampling.prompt_logprobs and r.sampling.max_tokens == 0
    for bad, words in [({"max_tokens": 0}, "needs prompt_logprobs"),
                       ({"prompt_logprobs": True, "n": 2}, "n > 1"),
                       ({"prompt_logprobs": 1}, "prompt_logprobs must be true or false"),
                       ({"max_tokens": -1}, "max_tokens must be a positive integer")]:
        e = parse_record(json.dumps({"id": "a", "prompt": "hi", **bad}), 1, 0, d)
        assert e.error is not None and words in e.error.message, (bad, e.error)


def _hf_prompt_logprobs(model, prompt):
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long)).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    return [None] + [lp[j - 1, t].item() for j, t in enumerate(prompt) if j > 0]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral"])
def test_prompt_logprobs_match_transformers(arch, model_dirs):
    """Prompts sharing prefixes (the prefix cache must not skip a scored prompt's tokens), chunked over steps of
    7 tokens, scoring alone (max_tokens 0) beside scoring with generation; generated tokens stay transformers'."""
    from transformers import AutoModelForCausalLM
    d = model_dirs(arch)
    prompts = shared_prefix_prompts(Tokenizer(d).vocab_size, seed=8)[:7]
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24, prefix_min_blocks=1), Mesh.single(), Device("cpu"))
    eng = Engine(runner, Tokenizer(d), max_batch=4, step_tokens=7)
    reqs = []
    for i, p in enumerate(prompts):
        sp = SamplingParams(max_tokens=0 if i % 2 else 6, prompt_logprobs=i != 3, logprobs=True, ignore_eos=True)
        reqs.append(Request(i, i, sp, prompt_token_ids=p))
    res = sorted(eng.generate(reqs), key=lambda r: r.index)
    gen = hf_greedy(d, [p for i, p in enumerate(prompts) if i % 2 == 0], 6)
    for i, (p, r) in enumerate(zip(prompts, res)):
        assert r.error is None, r.error
        if i == 3:
            assert r.prompt_logprobs is None and "prompt_logprobs" not in r.to_record()
            continue
        want = _hf_prompt_logprobs(hf, p)
        assert len(r.prompt_logprobs) == len(p) and r.prompt_logprobs[0] is None
        assert max(abs(a - b) for a, b in zip(r.prompt_logprobs[1:], want[1:])) < 1e-4, i
        rec = r.to_record()
        assert rec["prompt_logprob_sum"] == pytest.approx(sum(want[1:]), abs=1e-3)
        assert rec["prompt_perplexity"] == pytest.approx(math.exp(-sum(want[1:]) / (len(p) - 1)), rel=1e-4)
        if i % 2:
            assert r.token_ids == [] and r.finish_reason == "length" and rec["usage"]["completion_tokens"] == 0
        else:
            assert r.token_ids == gen[i // 2][0]
        back = result_from_json(json.loads(json.dumps(result_to_json(r))))
        assert back.prompt_logprobs == r.prompt_logprobs
    assert res[5].cached_tokens == 0 and res[4].cached_tokens == 0           # identical prompts, still computed
    for pool in eng.sched.pools:                                             # no leak
        pool.check()
        assert pool.available == pool.num_blocks and not any(pool.ref)
