"""Sampling: seeds independent of the batch, top-k / top-p sets, stop strings, stop ids and eos."""
import json
import shutil

import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.engine.sampling import filter_logits
from mpiinfer.messages import Request
from mpiinfer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mpiinfer.tools.init_model import init_model
    return init_model(str(tmp_path_factory.mktemp("s") / "qwen3"), arch="qwen3", preset="tiny")


def make_engine(d, **kw):
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24), Mesh.single(), Device("cpu"))
    return Engine(runner, Tokenizer(d), **kw)


def run(d, reqs, **kw):
    return {r.id: r for r in make_engine(d, **kw).generate(reqs)}


def test_seed_gives_same_tokens_whatever_the_batch(tiny):
    target = SamplingParams(max_tokens=24, temperature=1.3, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(tiny, [Request(0, "t", target, prompt="the old man and the sea")])["t"]
    others = [Request(i + 1, f"o{i}", SamplingParams(max_tokens=5 + 7 * i, temperature=0.8 * (i % 2), seed=i,
                                                   ignore_eos=True), prompt="x " * (3 + 11 * i)) for i in range(5)]
    for max_batch, step in ((6, 512), (2, 5), (4, 3)):
        reqs = others[:2] + [Request(0, "t", target, prompt="the old man and the sea")] + others[2:]
        got = run(tiny, reqs, max_batch=max_batch, step_tokens=step)["t"]
        assert got.token_ids == alone.token_ids
    other_seed = run(tiny, [Request(0, "t", target.replace(seed=99), prompt="the old man and the sea")])["t"]
    assert other_seed.token_ids != alone.token_ids


def test_unseeded_requests_reproducible_from_run_seed(tiny):
    sp = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    reqs = [Request(i, i, sp, prompt="a story about") for i in range(3)]
    a = run(tiny, reqs)
    b = run(tiny, reqs)
    assert [a[i].token_ids for i in range(3)] == [b[i].token_ids for i in range(3)]
    assert len({tuple(a[i].token_ids) for i in range(3)}) == 3   # different positions, different streams


def _hf_logits(d, prompt_ids, out_ids):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = torch.tensor([prompt_ids + out_ids])
    with torch.no_grad():
        logits = m(ids).logits[0]
    return logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(out_ids)]


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.7)])
def test_sampled_tokens_stay_in_allowed_set(tiny, top_k, top_p):
    tok = Tokenizer(tiny)
    prompt = tok.encode("once upon a time there was")
    sp = SamplingParams(max_tokens=40, temperature=2.5, top_k=top_k, top_p=top_p, seed=7, ignore_eos=True)
    res = run(tiny, [Request(0, 0, sp, prompt_token_ids=prompt)])[0]
    logits = _hf_logits(tiny, prompt, res.token_ids)
    outside_plain_topk = 0
    for row, t in zip(logits, res.token_ids):
        x = row / 2.5
        allowed = torch.ones_like(x, dtype=torch.bool)
        if top_k:
            allowed &= x >= torch.topk(x, top_k).values[-1]
        if top_p < 1:
            p = torch.softmax(torch.where(allowed, x, torch.tensor(float("-inf"))), -1)
            sp_, order = torch.sort(p, descending=True)
            keep = (sp_.cumsum(0) - sp_) < top_p
            nucleus = torch.zeros_like(allowed)
            nucleus[order[keep]] = True
            allowed &= nucleus
        assert bool(allowed[t]), f"token {t} outside the allowed set"
        outside_plain_topk += int(t != int(torch.argmax(row)))
    assert outside_plain_topk > 0, "temperature 2.5 never left greedy: the test would not catch a broken sampler"


def test_filter_logits_unit():
    x = torch.tensor([1.0, 3.0, 2.0, 0.0, 2.5])
    assert torch.isfinite(filter_logits(x, 1.0, 2, 1.0)).tolist() == [False, True, False, False, True]
    p = torch.softmax(x, -1)   # sorted: 3.0 (.43), 2.5 (.26), 2.0 (.16), ...
    assert torch.isfinite(filter_logits(x, 1.0, 0, 0.5)).tolist() == [False, True, False, False, True]
    assert torch.isfinite(filter_logits(x, 1.0, 0, 0.4)).tolist() == [False, True, False, False, False]
    assert torch.isfinite(filter_logits(x, 1.0, 0, float(p[1] + p[4] + p[2]) + 1e-6)).sum() == 4
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(filter_logits(x, 1.0, 0, 1.0), -1)
    draws = torch.multinomial(probs, 20000, replacement=True, generator=g)
    freq = torch.bincount(draws, minlength=5).float() / 20000
    assert torch.allclose(freq, p, atol=0.02)


def test_stop_strings_stop_ids_and_eos(tiny, tmp_path):
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    greedy = run(tiny, [Request(0, 0, sp, prompt="the sea and the")])[0]
    text = greedy.text
    assert len(text) > 12
    stop = text[8:12]
    first = text.find(stop)
    r = run(tiny, [Request(0, 0, sp.replace(stop=(stop,)), prompt="the sea and the")])[0]
    assert r.finish_reason == "stop"
    assert r.text == text[:first]
    assert r.token_ids == greedy.token_ids[:len(r.token_ids)]
    # stop token id: the 6th greedy token (first occurrence)
    t6 = greedy.token_ids[5]
    k = greedy.token_ids.index(t6)
    r = run(tiny, [Request(0, 0, sp.replace(stop_token_ids=(t6,)), prompt="the sea and the")])[0]
    assert r.finish_reason == "stop" and r.token_ids == greedy.token_ids[:k + 1]
    # eos from generation_config.json (honoured unless ignore_eos)
    d = tmp_path / "eos"
    shutil.copytree(tiny, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [t6]}))
    r = run(str(d), [Request(0, 0, sp.replace(ignore_eos=False), prompt="the sea and the")])[0]
    assert r.finish_reason == "stop" and r.token_ids == greedy.token_ids[:k + 1]
    r = run(str(d), [Request(0, 0, sp, prompt="the sea and the")])[0]
    assert r.finish_reason == "length" and r.token_ids == greedy.token_ids
