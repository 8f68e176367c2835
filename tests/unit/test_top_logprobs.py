"""top_logprobs: the k most likely tokens at each position, against transformers, in every output shape."""
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
from mpiinfer.messages import Request, Result
from mpiinfer.tokenizer import Tokenizer

DEFAULTS = SamplingParams()


def test_records_ask_for_top_logprobs():
    r = parse_record(json.dumps({"id": "a", "prompt": "hi", "logprobs": True, "top_logprobs": 3}), 1, 0, DEFAULTS)
    assert r.sampling.top_logprobs == 3 and r.sampling.logprobs
    for bad, words in [({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
                       ({"logprobs": True, "top_logprobs": 21}, "from 0 to 20"),
                       ({"logprobs": True, "top_logprobs": -1}, "from 0 to 20")]:
        e = parse_record(json.dumps({"id": "a", "prompt": "hi", **bad}), 1, 0, DEFAULTS)
        assert e.error is not None and words in e.error.message, (bad, e.error)

    def oa(url, **body):
        return parse_openai_record(json.dumps({"custom_id": "c", "url": url, "body": {
            "messages" if "chat" in url else "prompt": [{"role": "user", "content": "hi"}] if "chat" in url else "hi",
            **body}}), 1, 0, DEFAULTS)
    assert oa("/v1/chat/completions", logprobs=True, top_logprobs=5).sampling.top_logprobs == 5
    assert "needs logprobs" in oa("/v1/chat/completions", top_logprobs=5).error.message
    c = oa("/v1/completions", logprobs=4).sampling
    assert c.logprobs and c.top_logprobs == 4
    assert oa("/v1/completions", logprobs=0).sampling.top_logprobs == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_top_logprobs_match_transformers(arch, model_dirs):
    from transformers import AutoModelForCausalLM
    d = model_dirs(arch)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, Tokenizer(d).vocab_size, (n,), generator=g).tolist() for n in (4, 23)]
    new, k = 12, 5
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24), Mesh.single(), Device("cpu"))
    eng = Engine(runner, Tokenizer(d), max_batch=2, step_tokens=16)
    sp = SamplingParams(max_tokens=new, logprobs=True, top_logprobs=k, ignore_eos=True)
    res = sorted(eng.generate([Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]),
                 key=lambda r: r.index)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for p, r in zip(prompts, res):
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                          pad_token_id=0)
        assert r.token_ids == out.sequences[0, len(p):].tolist()
        assert len(r.top_logprobs) == new
        for pos, logits in zip(r.top_logprobs, out.logits):
            vals, want = torch.topk(torch.log_softmax(logits[0].float(), -1), k)
            assert [t for t, _ in pos] == want.tolist()
            assert max(abs(v - w) for (_, v), w in zip(pos, vals.tolist())) < 1e-4
        assert [pos[0][0] for pos in r.top_logprobs] == r.token_ids        # greedy: the chosen one leads
        assert all(abs(pos[0][1] - lp) < 1e-6 for pos, lp in zip(r.top_logprobs, r.logprobs))


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/completions"])
def test_top_logprobs_in_every_output_shape(url):
    openai = pytest.importorskip("openai")
    top = [[[5, -0.1], [7, -2.5]], [[9, -0.3], [5, -1.0]]]
    res = Result(0, "c", text="ab", token_ids=[5, 9], finish_reason="length", prompt_tokens=3, logprobs=[-0.1, -0.3],
                 top_logprobs=top, extra={"custom_id": "c", "url": url})
    assert res.to_record()["top_logprobs"] == [[{"token_id": 5, "logprob": -0.1}, {"token_id": 7, "logprob": -2.5}],
                                               [{"token_id": 9, "logprob": -0.3}, {"token_id": 5, "logprob": -1.0}]]
    back = result_from_json(json.loads(json.dumps(result_to_json(res))))            # the journal keeps them
    assert back.top_logprobs == top
    body = batch_output_record(res, created=1, model="m", token_str=lambda t: f"<{t}>")["response"]["body"]
    if "chat" in url:
        obj = openai.types.chat.ChatCompletion.model_validate(body)
        alts = obj.choices[0].logprobs.content[1].top_logprobs
        assert [(a.token, a.logprob) for a in alts] == [("<9>", -0.3), ("<5>", -1.0)] and alts[0].bytes == [60, 57, 62]
    else:
        obj = openai.types.Completion.model_validate(body)
        assert obj.choices[0].logprobs.top_logprobs == [{"<5>": -0.1, "<7>": -2.5}, {"<9>": -0.3, "<5>": -1.0}]
