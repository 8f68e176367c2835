"""OpenAI completions ``echo: true``: the prompt comes back before the completion, and with ``logprobs: k`` the
prompt tokens' logprobs and k alternatives (transformers' forward within 1e-4) before the completion's, in the
shape the ``openai`` package reads; ``max_tokens: 0`` scores the prompt alone (lm-eval-harness' loglikelihood
requests)."""
import json

import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.io.openai_batch import batch_output_record, parse_openai_record
from mpiinfer.io.resume import result_from_json, result_to_json
from mpiinfer.messages import Result
from mpiinfer.tokenizer import Tokenizer

DEFAULTS = SamplingParams(max_tokens=16)


def parse(url="/v1/completions", **body):
    body = {"model": "m", **body}
    return parse_openai_record(json.dumps({"custom_id": "c", "method": "POST", "url": url, "body": body}), 1, 0,
                               DEFAULTS)


def test_echo_fields():
    r = parse(prompt="hi", echo=True, logprobs=2, max_tokens=0)
    assert r.sampling.echo and r.sampling.prompt_logprobs and r.sampling.top_logprobs == 2
    r = parse(prompt="hi", echo=True, n=3, temperature=1.0)            # no logprobs: the prompt text only
    assert r.sampling.echo and not r.sampling.prompt_logprobs
    for bad, words in [(dict(prompt="hi", echo=True, logprobs=1, n=2), "n > 1"),
                       (dict(prompt="hi", echo="yes"), "body.echo must be true or false"),
                       (dict(prompt="hi", echo=True, max_tokens=0), "needs prompt_logprobs")]:
        e = parse(**bad)
        assert isinstance(e, Result) and words in e.error.message, (bad, e.error)
    e = parse("/v1/chat/completions", messages=[{"role": "user", "content": "x"}], echo=True)
    assert "body.echo in a chat completion" in e.error.message and "not supported" in e.error.message


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_echo_logprobs_match_transformers_in_openai_shape(arch, model_dirs):
    openai = pytest.importorskip("openai")
    from transformers import AutoModelForCausalLM
    d = model_dirs(arch)
    tok = Tokenizer(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24), Mesh.single(), Device("cpu"))
    eng = Engine(runner, tok, max_batch=4, step_tokens=8)
    prompts = ["the old man and the sea", "salt wind over the night ship", "blue"]
    reqs = [parse(prompt=p, echo=True, logprobs=3, max_tokens=0 if i == 1 else 5, temperature=0)
            for i, p in enumerate(prompts)]
    reqs = [r.__class__(**{**r.__dict__, "index": i}) for i, r in enumerate(reqs)]
    res = sorted(eng.generate(reqs), key=lambda r: r.index)
    for p, r in zip(prompts, res):
        assert r.error is None
        back = result_from_json(json.loads(json.dumps(result_to_json(r))))          # the journal keeps it all
        assert back.prompt_top_logprobs == r.prompt_top_logprobs and back.prompt_text == p
        body = batch_output_record(back, created=1, model="m", token_str=lambda t: f"<{t}>")["response"]["body"]
        lp = body["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None   # the wire format (vLLM's)
        # the openai package's types have no null inside these lists: its model validates the rest
        sdk = json.loads(json.dumps(body))
        sdk["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
        sdk["choices"][0]["logprobs"]["top_logprobs"][0] = {}
        obj = openai.types.Completion.model_validate(sdk)
        c = obj.choices[0]
        assert c.text == p + r.text
        ids = tok.encode(p)
        assert len(c.logprobs.tokens) == len(ids) + len(r.token_ids)
        full = ids + r.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
        for j in range(1, len(full)):
            assert abs(c.logprobs.token_logprobs[j] - logp[j - 1, full[j]].item()) < 1e-4
            vals, want = torch.topk(logp[j - 1], 3)
            got = sorted(((int(k[1:-1]), v) for k, v in c.logprobs.top_logprobs[j].items()), key=lambda x: -x[1])
            assert [t for t, _ in got] == want.tolist() and c.logprobs.tokens[j] == f"<{full[j]}>"
            assert [v for _, v in got] == pytest.approx(vals.tolist(), abs=1e-4)
        if r.token_ids:
            assert c.finish_reason == "length" and len(r.token_ids) == 5
        else:
            assert obj.usage.completion_tokens == 0


def test_echo_without_logprobs_prefixes_every_choice(model_dirs):
    d = model_dirs("llama")
    tok = Tokenizer(d)
    eng = Engine(ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24), Mesh.single(), Device("cpu")), tok)
    req = parse(prompt="the sea", echo=True, n=3, temperature=1.0, seed=2, max_tokens=4)
    res = next(iter(eng.generate([req])))
    body = batch_output_record(res, created=1, model="m")["response"]["body"]
    assert [c["text"] for c in body["choices"]] == ["the sea" + c.text for c in res.choices]
    assert all(c["logprobs"] is None for c in body["choices"])


@pytest.mark.parametrize("url", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_prompt_logprobs_field(url, model_dirs):
    """vLLM's body field prompt_logprobs k: per prompt token {id: {logprob, rank, decoded_token}} for the token and
    its k most likely alternatives (transformers' forward within 1e-4, ranks exact), None first; the body is
    otherwise the endpoint's usual one."""
    openai = pytest.importorskip("openai")
    from transformers import AutoModelForCausalLM
    d = model_dirs("llama")
    tok = Tokenizer(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    eng = Engine(ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24), Mesh.single(), Device("cpu")), tok)
    chat = "chat" in url
    src = {"messages": [{"role": "user", "content": "the old man and the sea"}]} if chat else \
        {"prompt": "the old man and the sea"}
    req = parse(url, **src, prompt_logprobs=2, max_tokens=3, temperature=0)
    r = next(iter(eng.generate([req])))
    assert r.error is None
    body = batch_output_record(r, created=1, model="m", token_str=lambda t: f"<{t}>")["response"]["body"]
    (openai.types.chat.ChatCompletion if chat else openai.types.Completion).model_validate(body)
    ids = tok.encode_messages(src["messages"]) if chat else tok.encode(src["prompt"])
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    pl = body["prompt_logprobs"]
    assert len(pl) == len(ids) and pl[0] is None
    for j in range(1, len(ids)):
        row = logp[j - 1]
        mine = pl[j][str(ids[j])]
        assert abs(mine["logprob"] - row[ids[j]].item()) < 1e-4 and mine["decoded_token"] == f"<{ids[j]}>"
        assert mine["rank"] == int((row > row[ids[j]]).sum()) + 1
        vals, top = torch.topk(row, 2)
        for rank, (t, v) in enumerate(zip(top.tolist(), vals.tolist()), start=1):
            assert abs(pl[j][str(t)]["logprob"] - v) < 1e-4 and pl[j][str(t)]["rank"] == rank
        assert len(pl[j]) in (2, 3)
    # echo without logprobs keeps vLLM's prompt_logprobs k alternatives
    r = next(iter(eng.generate([parse(prompt="the old man", echo=True, prompt_logprobs=3, max_tokens=1)])))
    assert all(len(pos) == 3 for pos in r.prompt_top_logprobs[1:])
    e = parse(prompt="x", echo=True, logprobs=1, prompt_logprobs=1)
    assert "give one of them" in e.error.message
    e = parse(prompt="x", prompt_logprobs=21)
    assert "prompt_logprobs must be an integer from 0 to 20" in e.error.message
