"""``n`` samples per request: sample i is exactly the request run alone with seed + i, whatever the batch, the
prefix cache or preemption; greedy ``n`` gives n identical choices; the forks share the prompt's blocks (one
prefill); and the choices come out in the JSONL, OpenAI and journal shapes."""
import json

import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.io.openai_batch import batch_output_record, parse_openai_record
from mpiinfer.io.records import parse_record
from mpiinfer.io.resume import result_from_json, result_to_json
from mpiinfer.messages import Choice, Request, Result
from mpiinfer.tokenizer import Tokenizer


def _engine(d, max_batch=8, kv_budget=1 << 24, prefix_cache=True):
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=kv_budget, prefix_cache=prefix_cache), Mesh.single(),
                         Device("cpu"))
    return Engine(runner, Tokenizer(d), max_batch=max_batch, step_tokens=32)


def _prompts(vocab, k=3, length=45):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (length + 7 * i,), generator=g).tolist() for i in range(k)]


def _run(engine, reqs):
    res = sorted(engine.generate(reqs), key=lambda r: r.index)
    assert [r.error for r in res] == [None] * len(reqs)
    return res


def test_sample_i_is_the_request_alone_with_seed_plus_i(model_dirs):
    d = model_dirs("llama")
    prompts = _prompts(Tokenizer(d).vocab_size, length=100)   # 6+ full blocks: the forks share them
    n = 4
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=100, ignore_eos=True, logprobs=True, n=n)
    alone = {}
    for i, p in enumerate(prompts):
        for s in range(n):
            eng = _engine(d, max_batch=1)
            [r] = _run(eng, [Request(0, 0, sp.replace(n=1, seed=100 * (i + 1) + s), prompt_token_ids=p)])
            alone[i, s] = r.token_ids
    # the same samples in one batch, in waves of 3 sequences, without the prefix cache, and under preemption
    probe = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 20), Mesh.single(), Device("cpu"))
    for kw in ({}, {"max_batch": 3}, {"prefix_cache": False}, {"kv_budget": 9 * 16 * probe.kv_bytes_per_token}):
        eng = _engine(d, **kw)
        res = _run(eng, [Request(i, f"r{i}", sp.replace(seed=100 * (i + 1)), prompt_token_ids=p)
                         for i, p in enumerate(prompts)])
        for i, r in enumerate(res):
            assert len(r.choices) == n, kw
            assert [c.token_ids for c in r.choices] == [alone[i, s] for s in range(n)], (kw, i)
            assert r.token_ids == r.choices[0].token_ids and r.completion_tokens == n * 10
            assert all(len(c.logprobs) == 10 and c.finish_reason == "length" for c in r.choices)
        assert len({tuple(c.token_ids) for c in res[0].choices}) > 1      # the samples differ
        if "kv_budget" in kw:
            assert eng.sched.preemptions > 0, "the small budget was meant to force preemption"
        for pool in eng.sched.pools:
            pool.check()
            assert pool.available == pool.num_blocks


def test_forks_share_the_prompt_blocks(model_dirs):
    """n sampled forks of a 100-token prompt compute its 6 full blocks once: the other forks compute only the
    4-token tail (less than a block), with the prefix cache on; off, every fork computes all 100."""
    d = model_dirs("llama")
    [p] = _prompts(Tokenizer(d).vocab_size, k=1, length=100)
    sp = SamplingParams(max_tokens=4, temperature=0.8, seed=3, ignore_eos=True, n=5)
    for prefix_cache, expect in ((True, 100 + 4 * 4), (False, 5 * 100)):
        eng = _engine(d, prefix_cache=prefix_cache)
        computed = []
        advance = eng.sched.advance
        eng.sched.advance = lambda planned, c=computed, a=advance: (c.extend(n for s, n in planned if s.in_prefill),
                                                                   a(planned))
        _run(eng, [Request(0, 0, sp, prompt_token_ids=p)])
        assert sum(computed) == expect, prefix_cache


def test_greedy_n_gives_identical_choices(model_dirs):
    d = model_dirs("qwen3")
    prompts = _prompts(Tokenizer(d).vocab_size, k=2)
    sp = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=True)
    one = _run(_engine(d), [Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)])
    three = _run(_engine(d), [Request(i, i, sp.replace(n=3), prompt_token_ids=p) for i, p in enumerate(prompts)])
    for a, b in zip(one, three):
        assert [c.token_ids for c in b.choices] == [a.token_ids] * 3
        assert [c.logprobs for c in b.choices] == [a.logprobs] * 3


def test_n_in_records_and_outputs():
    sp = SamplingParams()
    r = parse_record(json.dumps({"id": "a", "prompt": "hi", "n": 3}), 1, 0, sp)
    assert isinstance(r, Request) and r.sampling.n == 3
    for bad in (0, 129, "2", 1.5):
        e = parse_record(json.dumps({"id": "a", "prompt": "hi", "n": bad}), 1, 0, sp)
        assert isinstance(e, Result) and e.error.type == "invalid_request" and "n" in e.error.message, bad
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    line = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": body}
    q = parse_openai_record(json.dumps(line), 1, 0, sp)
    assert isinstance(q, Request) and q.sampling.n == 2
    e = parse_openai_record(json.dumps({**line, "body": {**body, "best_of": 4}}), 1, 0, sp)
    assert isinstance(e, Result) and "best_of" in e.error.message
    res = Result(0, "c", text="x", token_ids=[1], finish_reason="stop", prompt_tokens=4, extra=q.extra,
                 choices=[Choice("x", [1], "stop", [-0.5]), Choice("yz", [2, 3], "length", [-1.0, -2.0])])
    rec = res.to_record()
    assert rec == {"id": "c", "usage": {"prompt_tokens": 4, "completion_tokens": 3},
                   "choices": [{"text": "x", "token_ids": [1], "finish_reason": "stop", "logprobs": [-0.5]},
                               {"text": "yz", "token_ids": [2, 3], "finish_reason": "length",
                                "logprobs": [-1.0, -2.0]}]}
    out = batch_output_record(res, created=1)
    ch = out["response"]["body"]["choices"]
    assert [c["index"] for c in ch] == [0, 1] and [c["message"]["content"] for c in ch] == ["x", "yz"]
    assert [len(c["logprobs"]["content"]) for c in ch] == [1, 2]
    assert out["response"]["body"]["usage"]["completion_tokens"] == 3
    back = result_from_json(json.loads(json.dumps(result_to_json(res))))
    assert back.choices == res.choices and back.to_record() == rec


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_openai_output_validates_with_n(fmt):
    openai = pytest.importorskip("openai")
    res = Result(0, "c", text="x", token_ids=[1], finish_reason="stop", prompt_tokens=4,
                 extra={"custom_id": "c", "url": "/v1/chat/completions" if fmt == "jsonl" else "/v1/completions"},
                 choices=[Choice("x", [1], "stop"), Choice("y", [2], "length")])
    body = batch_output_record(res, created=1, model="m")["response"]["body"]
    model = openai.types.chat.ChatCompletion if fmt == "jsonl" else openai.types.Completion
    obj = model.model_validate(body)
    assert len(obj.choices) == 2 and obj.choices[1].index == 1
