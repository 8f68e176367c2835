"""Logit bias and the presence / frequency / repetition penalties: the arithmetic, the records that ask for them,
and greedy decoding with them against transformers (its RepetitionPenaltyLogitsProcessor, and OpenAI's formula
as a transformers logits processor)."""
import json

import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.engine.sampling import process_logits, sample
from mpiinfer.io.openai_batch import parse_openai_record
from mpiinfer.io.records import parse_record
from mpiinfer.messages import Request
from mpiinfer.tokenizer import Tokenizer

from ..reference import hf_greedy

DEFAULTS = SamplingParams()


def test_process_logits_arithmetic():
    x = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    p = SamplingParams(logit_bias=((5, 10.0), (0, -1.5)), repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25)
    got = process_logits(x, p, prompt=[1, 1], out=[3, 3, 2])
    want = x.clone()
    want[5] += 10.0
    want[0] -= 1.5
    for t in (1, 3, 2):                                   # prompt and output tokens, each once
        want[t] = want[t] * 2.0 if want[t] < 0 else want[t] / 2.0
    want[3] -= 0.5 * 2 + 0.25                             # output counts only
    want[2] -= 0.5 * 1 + 0.25
    assert torch.equal(got, want)
    assert torch.equal(x, torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0]))    # the raw logits are untouched
    # the chosen token follows the processed logits, its logprob stays the model's own
    toks, lps, _ = sample(x[None], [SamplingParams(logit_bias=((4, 100.0),), logprobs=True)], [None], [True],
                       [([0], [])])
    assert toks == [4] and lps[0] == pytest.approx(torch.log_softmax(x, -1)[4].item())


@pytest.mark.parametrize("fmt", ["jsonl", "openai"])
def test_records_carry_penalties_and_bias(fmt):
    fields = {"presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.2,
              "logit_bias": {"17": 5, "3": -100}}

    def parse(extra):
        if fmt == "jsonl":
            return parse_record(json.dumps({"id": "a", "prompt": "hi", **extra}), 1, 0, DEFAULTS)
        body = {"model": "m", "prompt": "hi", **extra}
        return parse_openai_record(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                               "body": body}), 1, 0, DEFAULTS)
    sp = parse(fields).sampling
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.5, -0.25, 1.2)
    assert sp.logit_bias == ((3, -100.0), (17, 5.0)) and sp.processes_logits
    for bad, words in [({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
                       ({"repetition_penalty": 0}, "repetition_penalty must be in (0, 2]"),
                       ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
                       ({"logit_bias": {"5": 101}}, "logit_bias values must be in [-100, 100]"),
                       ({"logit_bias": [1, 2]}, "logit_bias must be an object"),
                       ({"frequency_penalty": "a"}, "frequency_penalty must be a number")]:
        r = parse(bad)
        assert r.error is not None and words in r.error.message, (bad, r.error)


class OpenAIPenalties:
    """OpenAI's presence / frequency penalties over the generated tokens, as a transformers logits processor."""

    def __init__(self, prompt_len, presence, frequency):
        self.n, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[0, self.n:]
        if out.numel():
            counts = torch.bincount(out, minlength=scores.shape[-1])[:scores.shape[-1]].to(scores.dtype)
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        return scores


def _engine(d, prompts, sp, max_batch=4):
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24), Mesh.single(), Device("cpu"))
    eng = Engine(runner, Tokenizer(d), max_batch=max_batch, step_tokens=32)
    res = sorted(eng.generate([Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]),
                 key=lambda r: r.index)
    assert [r.error for r in res] == [None] * len(prompts)
    return res


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_with_penalties_matches_transformers(arch, model_dirs):
    from transformers import LogitsProcessorList
    d = model_dirs(arch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, Tokenizer(d).vocab_size, (n,), generator=g).tolist() for n in (5, 19, 33)]
    new = 24
    plain = hf_greedy(d, prompts, new)
    # repetition penalty: transformers' own processor (prompt and output tokens)
    ref = hf_greedy(d, prompts, new, repetition_penalty=1.6)
    assert [t for t, _ in ref] != [t for t, _ in plain]          # the penalty changes the output
    res = _engine(d, prompts, SamplingParams(max_tokens=new, repetition_penalty=1.6, logprobs=True, ignore_eos=True))
    for (toks, lps), r in zip(ref, res):
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4      # raw logprobs, as transformers'
    # presence + frequency (OpenAI's formula), one prompt at a time: the processor knows the prompt's length
    for p in prompts:
        ref = hf_greedy(d, [p], new, logits_processor=LogitsProcessorList([OpenAIPenalties(len(p), 0.7, 0.9)]))
        r = _engine(d, [p], SamplingParams(max_tokens=new, presence_penalty=0.7, frequency_penalty=0.9,
                                           ignore_eos=True))[0]
        assert r.token_ids == ref[0][0]
    # logit bias: +100 on one token makes it every choice; -100 on the plain greedy first token removes it
    r = _engine(d, prompts, SamplingParams(max_tokens=6, logit_bias=((7, 100.0),), ignore_eos=True))
    assert all(x.token_ids == [7] * 6 for x in r)
    r = _engine(d, prompts[:1], SamplingParams(max_tokens=1, logit_bias=((plain[0][0][0], -100.0),),
                                               ignore_eos=True))
    assert r[0].token_ids[0] != plain[0][0][0]


def test_bias_on_a_token_beyond_the_vocabulary_is_an_error_record(model_dirs):
    d = model_dirs("llama")
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 22), Mesh.single(), Device("cpu"))
    eng = Engine(runner, Tokenizer(d))
    big = runner.cfg.vocab_size
    err = eng.add(Request(0, "x", SamplingParams(max_tokens=2, logit_bias=((big, 1.0),)), prompt_token_ids=[1, 2]))
    assert err.error.type == "invalid_request" and f"token id {big}" in err.error.message


def test_sampled_penalties_do_not_depend_on_the_batch(model_dirs):
    d = model_dirs("llama")
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=3, frequency_penalty=1.0, repetition_penalty=1.3,
                        ignore_eos=True)
    one = [_engine(d, [p], sp, max_batch=1)[0].token_ids for p in prompts]
    together = [r.token_ids for r in _engine(d, prompts, sp, max_batch=3)]
    assert one == together


class Bias:
    """A logits processor adding ``bias`` to one token (transformers' side of a logit_bias)."""

    def __init__(self, token, bias):
        self.token, self.bias = token, bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] += self.bias
        return scores


def test_min_tokens_matches_transformers_min_new_tokens(model_dirs):
    """vLLM's min_tokens: no end-of-sequence or stop token (nor stop string) before that many tokens; against
    transformers' min_new_tokens with the end token pushed up by a bias so it would come first."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList
    d = model_dirs("llama")
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    eos = hf.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    p = [5, 6, 7, 8]
    ids = torch.tensor([p])
    for k in (0, 3, 7):
        g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=k,
                        do_sample=False, eos_token_id=eos, pad_token_id=0,
                        logits_processor=LogitsProcessorList([Bias(eos, 30.0)]))
        want = g[0, len(p):].tolist()
        r = _engine(d, [p], SamplingParams(max_tokens=10, min_tokens=k, logit_bias=((eos, 30.0),)))[0]
        assert r.token_ids == want and r.token_ids[-1] == eos and len(r.token_ids) == k + 1
    # a stop token and a stop string wait too
    r = _engine(d, [p], SamplingParams(max_tokens=10, min_tokens=4, stop_token_ids=(9,), logit_bias=((9, 50.0),)))[0]
    assert len(r.token_ids) == 5 and r.token_ids[-1] == 9 and 9 not in r.token_ids[:4] and r.finish_reason == "stop"
    tok = Tokenizer(d)
    text = tok.decode(_engine(d, [p], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids)
    r = _engine(d, [p], SamplingParams(max_tokens=6, min_tokens=6, stop=(text[:1],), ignore_eos=True))[0]
    assert len(r.token_ids) == 6 and r.text == text and r.finish_reason == "length"    # the early match is not one
    r = _engine(d, [p], SamplingParams(max_tokens=6, stop=(text[:1],), ignore_eos=True))[0]
    assert r.text == "" and r.finish_reason == "stop"                                   # without min_tokens it is
    for bad, words in [({"min_tokens": 11, "max_tokens": 10}, "min_tokens must be an integer from 0 to max_tokens"),
                       ({"min_tokens": 2, "choice": ["a"]}, "min_tokens with a structured-output constraint")]:
        e = parse_record(json.dumps({"id": "a", "prompt": "hi", **bad}), 1, 0, DEFAULTS)
        assert e.error is not None and words in e.error.message, (bad, e.error)
