"""Structured outputs: the record fields that ask for a constraint (JSONL and OpenAI / vLLM bodies), compiling
them (errors become error records), the masks, and generation: greedy against transformers with the same
constraint applied to its logits, every output valid against its schema / regex / choices, with sampling, n
samples, preemption and any batch."""
import json
import re

import jsonschema
import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.engine.sampling import sample
from mpiinfer.engine.structured import ConstraintError, Grammars
from mpiinfer.io.openai_batch import parse_openai_record
from mpiinfer.io.records import parse_record
from mpiinfer.messages import Request, Result
from mpiinfer.tokenizer import Tokenizer

DEFAULTS = SamplingParams()
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "score": {"type": ["number", "null"]}},
    "required": ["name", "age", "role"], "additionalProperties": False}
REGEX = r"[A-Z]{2}-[0-9]{3}(-[a-z]{1,4})?"
CHOICES = ["positive", "negative", "neutral"]


def jsonl(**fields):
    return parse_record(json.dumps({"id": "a", "prompt": "hi", **fields}), 1, 0, DEFAULTS)


def openai(url="/v1/chat/completions", **body):
    body = {"model": "m", **body}
    if url.endswith("chat/completions"):
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        body.setdefault("prompt", "hi")
    return parse_openai_record(json.dumps({"custom_id": "a", "method": "POST", "url": url, "body": body}), 1, 0,
                               DEFAULTS)


def test_fields_map_to_constraints():
    schema_text = json.dumps(PERSON, separators=(",", ":"))
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    cases = [
        (jsonl(response_format=rf), ("json", schema_text)),
        (jsonl(response_format={"type": "json_object"}), ("json_object", "")),
        (jsonl(response_format={"type": "text"}), ()),
        (jsonl(regex=REGEX), ("regex", REGEX)),
        (jsonl(choice=CHOICES), ("choice", json.dumps(CHOICES))),
        (jsonl(grammar='start: "a"+'), ("grammar", 'start: "a"+')),
        (openai(response_format=rf), ("json", schema_text)),
        (openai("/v1/completions", response_format={"type": "json_object"}), ("json_object", "")),
        (openai(guided_json=PERSON), ("json", schema_text)),
        (openai(guided_json=json.dumps(PERSON)), ("json", schema_text)),     # vLLM takes the schema as text too
        (openai(guided_regex=REGEX), ("regex", REGEX)),
        (openai(guided_choice=CHOICES, guided_decoding_backend="xgrammar"), ("choice", json.dumps(CHOICES))),
        (openai(guided_grammar='root ::= "x"'), ("grammar", 'root ::= "x"')),
        (openai(structured_outputs={"json": PERSON}), ("json", schema_text)),
        (openai(structured_outputs={"regex": REGEX, "disable_any_whitespace": True}), ("regex", REGEX)),
        (openai(structured_outputs={"choice": CHOICES}), ("choice", json.dumps(CHOICES))),
        (openai(structured_outputs={"json_object": True}), ("json_object", "")),
    ]
    for r, want in cases:
        assert isinstance(r, Request), r.error
        assert r.sampling.structured == want


@pytest.mark.parametrize("rec, words", [
    (jsonl(regex="a", choice=["a"]), "at most one structured-output constraint, got regex, choice"),
    (jsonl(response_format={"type": "json"}), 'response_format.type must be "text", "json_object" or'),
    (jsonl(response_format={"type": "json_schema"}), "response_format.json_schema must be an object"),
    (jsonl(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "json_schema has no schema"),
    (jsonl(response_format={"type": "json_schema", "json_schema": {"schema": {}, "strict": True, "nmae": 1}}),
     "unknown field 'nmae' (did you mean 'name'?)"),
    (jsonl(response_format={"type": "json_object", "schema": {}}), "response_format has unknown field 'schema'"),
    (jsonl(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}), "must be a JSON schema"),
    (jsonl(choice=[]), "choice must be a non-empty array of strings"),
    (jsonl(choice=["a", 1]), "choice[1] must be a string"),
    (jsonl(regex=""), "regex must be a non-empty string"),
    (jsonl(grammar=5), "grammar must be a non-empty string"),
    (jsonl(respons_format={"type": "text"}), "did you mean 'response_format'?"),
    (openai(guided_json="{not json"), "body.guided_json must be a JSON schema"),
    (openai(guided_json={"type": "object"}, response_format={"type": "json_object"}),
     "got body.guided_json, body.response_format"),
    (openai(structured_outputs={"json": PERSON, "regex": "a"}), "at most one"),
    (openai(structured_outputs={"structural_tag": "x"}), "body.structured_outputs has unknown field"),
    (openai(structured_outputs={"choice": ["a"], "disable_any_whitespace": False}), "not supported"),
    (openai(guided_whitespace_pattern=" "), "body.guided_whitespace_pattern"),
    (openai(structured_outputs={"json_object": "yes"}), "json_object must be true or false"),
    (openai(structured_outputs={"choice": ["a"], "disable_any_whitespace": "false"}), "must be true or false"),
])
def test_bad_constraint_fields_are_error_records(rec, words):
    assert isinstance(rec, Result) and rec.error.type == "invalid_request"
    assert words in rec.error.message, rec.error.message


@pytest.fixture(scope="module")
def demo_grammars(model_dirs):
    d = model_dirs("llama")
    tok = Tokenizer(d)
    return Grammars(tok.tok.to_str(), 576, [0]), tok


def test_compile_errors_and_cache(demo_grammars):
    g, _ = demo_grammars
    for c, words in [(("json", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
                     (("json", '{"type": "strin"}'), "strin"),
                     (("regex", "[a-"), "unclosed character class"),
                     (("grammar", "start: nothing_defined"), "nothing_defined"),
                     (("grammar", "root ::= ("), "Expected ')'"),
                     (("json", '{"type": "string", "format": "ipv9"}'), "Unknown format: ipv9"),
                     (("json", '{"$ref": "#/nope"}'), "'/nope' does not exist")]:
        with pytest.raises(ConstraintError, match=re.escape(words)):
            g.matcher(c)
    a, b = g.matcher(("choice", json.dumps(CHOICES))), g.matcher(("choice", json.dumps(CHOICES)))
    assert a is not b                        # each sequence has its own state: consuming in one leaves the other
    _, tok = demo_grammars
    for t in tok.encode("neg", add_special_tokens=False):
        assert a.consume_token(t)
    assert a.rollback(0) and not b.is_stopped()
    assert all("negative".startswith(s) or "neutral".startswith(s) or "positive".startswith(s)
               for s in allowed_texts(g, tok, b))


def allowed_texts(g, tok, m):
    mask = g.masks(g.start_masks([m]))[0][0] == 0
    return {tok.decode([t], skip_special_tokens=False) for t in torch.nonzero(mask)[:, 0].tolist()}


def test_masks_follow_the_constraint(demo_grammars):
    g, tok = demo_grammars
    m = g.matcher(("choice", json.dumps(["red", "green"])))
    first = allowed_texts(g, tok, m)
    assert first and all("red".startswith(s) or "green".startswith(s) for s in first)
    for t in tok.encode("gre", add_special_tokens=False):
        assert m.consume_token(t)
    assert all("en".startswith(s) for s in allowed_texts(g, tok, m))
    for t in tok.encode("en", add_special_tokens=False):
        assert m.consume_token(t)
    assert m.is_stopped()
    # the masks of a step are independent per matcher, computed on the background thread
    ms = [g.matcher(("regex", "[0-9]+")), g.matcher(("choice", json.dumps(["x"])))]
    bias, stuck = g.masks(g.start_masks(ms))
    assert stuck == [False, False]
    assert set(bias.unique().tolist()) == {0.0, float("-inf")}
    rows = bias == 0
    assert rows.shape == (2, 576) and not rows[:, 512:].any()      # ids beyond the tokenizer never come
    digits = {tok.decode([t]) for t in torch.nonzero(rows[0])[:, 0].tolist()}
    assert digits and all(s.isdigit() for s in digits)


def test_sample_applies_masks():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0], [5.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    inf = float("-inf")
    allowed = ([0, 2], torch.tensor([[inf, inf, 0.0, 0.0], [inf, 0.0, inf, inf]]))
    ps = [SamplingParams(logprobs=True), SamplingParams(), SamplingParams(temperature=1.0)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        toks, lps, _ = sample(logits, ps, [None, None, gen], [True, False, False], [([], [])] * 3, allowed)
        assert toks == [2, 0, 1]
    assert lps[0] == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())   # the model's own logprob
    # penalties and bias act on the masked logits: a bias cannot bring back a token the constraint forbids
    biased = [SamplingParams(logit_bias=((0, 100.0), (3, 9.0))), SamplingParams(), SamplingParams()]
    toks, _, _ = sample(logits, biased, [None] * 3, [False] * 3, [([], [])] * 3, allowed)
    assert toks == [3, 0, 1]


def engine(d, kv=1 << 24, max_batch=8):
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=kv), Mesh.single(), Device("cpu"))
    return Engine(runner, Tokenizer(d), max_batch=max_batch, step_tokens=64)


def run(eng, reqs):
    return sorted(eng.generate(reqs), key=lambda r: r.index)


def hf_constrained_greedy(d, prompt, grammars, constraint, max_new):
    """transformers' forward, greedy over the tokens the constraint allows (the same llguidance matcher), stopping
    as the engine does: at an end-of-sequence token, when the constraint is complete, or at max_new."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    m = grammars.matcher(constraint)
    ids, out, lps = list(prompt), [], []
    while len(out) < max_new:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        mask = grammars.masks(grammars.start_masks([m]))[0][0][:logits.shape[0]] == 0
        t = int(torch.argmax(logits.masked_fill(~mask, float("-inf"))))
        out.append(t)
        lps.append(torch.log_softmax(logits, -1)[t].item())
        ids.append(t)
        m.consume_token(t)
        if t in eos or m.is_stopped():
            break
    return out, lps


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_greedy_constrained_matches_transformers(arch, model_dirs):
    d = model_dirs(arch)
    eng = engine(d)
    tok = Tokenizer(d)
    constraints = [("json", json.dumps(PERSON)), ("regex", REGEX), ("choice", json.dumps(CHOICES)),
                   ("json_object", ""), ("grammar", 'root ::= "say " ("yes" | "no") "!"')]
    prompts = [tok.encode(p) for p in ("the old man and the sea", "blue sky", "wind over salt")]
    reqs, want = [], []
    for c in constraints:
        for p in prompts:
            reqs.append(Request(len(reqs), len(reqs), SamplingParams(max_tokens=60, structured=c, logprobs=True),
                                prompt_token_ids=p))
            want.append(hf_constrained_greedy(d, p, eng.grammars, c, 60))
    for r, (toks, lps) in zip(run(eng, reqs), want):
        assert r.error is None and r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


def check_valid(constraint, text, finish):
    kind, spec = constraint
    assert finish == "stop", (constraint, text)
    if kind == "json":
        jsonschema.validate(json.loads(text), json.loads(spec))
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    elif kind == "choice":
        assert text in json.loads(spec)


def test_every_output_is_valid_sampled_n_preempted_any_batch(model_dirs):
    """Sampled outputs (n = 3) all satisfy their constraint, identically with a roomy cache and batch, one sequence
    at a time, and a tiny cache that forces preemptions (a preempted sequence's matcher starts over)."""
    d = model_dirs("llama")
    tok = Tokenizer(d)
    constraints = [("json", json.dumps(PERSON)), ("regex", REGEX), ("choice", json.dumps(CHOICES)),
                   ("json", json.dumps({"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 2,
                                        "maxItems": 4}))]
    prompts = [tok.encode(p) for p in ("the old man", "salt and wind over the night sea ship", "sky")]
    reqs = []
    for c in constraints:
        for p in prompts:
            sp = SamplingParams(max_tokens=120, temperature=1.0, seed=len(reqs), n=3, structured=c)
            reqs.append(Request(len(reqs), len(reqs), sp, prompt_token_ids=p))
    roomy = run(engine(d), reqs)
    for r in roomy:
        assert r.error is None and len(r.choices) == 3
        for c in r.choices:
            check_valid(r_constraint(reqs, r), c.text, c.finish_reason)
    assert any(len({c.text for c in r.choices}) > 1 for r in roomy)        # the samples differ
    one = run(engine(d, max_batch=1), reqs)
    eng = engine(d, kv=5 * 1024 * 16, max_batch=8)
    tight = run(eng, reqs)
    assert eng.sched.preemptions > 0
    for a, b, c in zip(roomy, one, tight):
        assert [x.token_ids for x in a.choices] == [x.token_ids for x in b.choices] == \
               [x.token_ids for x in c.choices]


def r_constraint(reqs, r):
    return reqs[r.index].sampling.structured


def test_engine_refuses_what_does_not_compile_and_goes_on(model_dirs):
    d = model_dirs("llama")
    eng = engine(d)
    good = SamplingParams(max_tokens=30, structured=("choice", json.dumps(CHOICES)))
    bad = SamplingParams(max_tokens=30, structured=("json", '{"type": "array", "uniqueItems": true}'))
    res = run(eng, [Request(0, "g", good, prompt_token_ids=[5, 6]), Request(1, "b", bad, prompt_token_ids=[5, 6]),
                    Request(2, "h", good.replace(n=2, temperature=1.0, seed=1), prompt_token_ids=[7])])
    assert res[0].error is None and res[0].text in CHOICES
    assert res[1].error.type == "invalid_request" and "JSON schema cannot be used" in res[1].error.message \
        and "uniqueItems" in res[1].error.message
    assert all(c.text in CHOICES for c in res[2].choices)
    # with ignore_eos a finished constraint still ends the sequence
    r = run(eng, [Request(0, 0, good.replace(ignore_eos=True), prompt_token_ids=[5, 6])])[0]
    assert r.text in CHOICES and r.finish_reason == "stop"
    # max_tokens cuts an unfinished answer: "length"
    r = run(eng, [Request(0, 0, SamplingParams(max_tokens=3, structured=("json", json.dumps(PERSON))),
                          prompt_token_ids=[5, 6])])[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 3 and r.text.startswith('{"')


def test_a_failed_matcher_is_an_error_record_not_a_stop(model_dirs):
    """A matcher that enters its error state (here: fed a token its constraint forbids, as a parser limit would
    leave it) ends its sequence with a structured_output_error record, never a "stop" answer."""
    d = model_dirs("llama")
    eng = engine(d)
    tok = Tokenizer(d)
    c = ("choice", json.dumps(["red", "green"]))
    assert eng.add(Request(0, "x", SamplingParams(max_tokens=20, structured=c), prompt_token_ids=[5, 6])) is None
    assert eng.add(Request(1, "ok", SamplingParams(max_tokens=20, structured=c), prompt_token_ids=[5, 6])) is None
    bad = next(s for s in eng.waiting if s.req.id == "x")
    assert not bad.matcher.consume_token(tok.encode("z", add_special_tokens=False)[0]) and bad.matcher.is_error()
    res = {}
    while eng.has_work():
        res.update({r.id: r for r in eng.step()})
    assert res["x"].error.type == "structured_output_error" and "structured-output engine failed" in \
        res["x"].error.message
    assert res["ok"].error is None and res["ok"].text in ("red", "green")


def test_a_failed_sample_drops_its_request_and_leaves_nothing_behind(model_dirs):
    """One of n sampled answers failing fails the request once: its other samples finish without a result, and
    the engine forgets the request after the last of them (no entry kept per failed request).  The same after a
    stop drops a request whose samples have not all started."""
    d = model_dirs("llama")
    tok = Tokenizer(d)
    c = ("choice", json.dumps(["red", "green"]))
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=4, structured=c, n=3)
    eng = engine(d)
    assert eng.add(Request(0, "x", sp, prompt_token_ids=[5, 6])) is None
    bad = [s for s in eng.waiting if s.req.id == "x"][1]            # the second sample's matcher breaks
    assert not bad.matcher.consume_token(tok.encode("z", add_special_tokens=False)[0]) and bad.matcher.is_error()
    res = []
    while eng.has_work():
        res += eng.step()
    assert [r.error.type for r in res] == ["structured_output_error"]
    assert eng._samples == {}
    # a stop while samples wait: the running ones finish without a result, the request is forgotten
    eng = engine(d, max_batch=2)
    long = sp.replace(structured=("json", json.dumps(PERSON)), max_tokens=12)   # not done in one step
    for i in range(2):
        assert eng.add(Request(i, f"r{i}", long, prompt_token_ids=[5, 6 + i])) is None
    eng.step()
    assert len(eng.sched.running) == 2 and len(eng.waiting) == 4
    eng.drop_waiting()
    assert eng._samples == {0: 2}                                   # request 0's two running samples
    res = []
    while eng.has_work():
        res += eng.step()
    assert res == [] and eng._samples == {}


def test_models_the_grammar_engine_cannot_take(model_dirs, tmp_path):
    """No end-of-sequence token anywhere: constrained records are error records (the job goes on); only the
    tokenizer's eos_token: it is used.  A tokenizer larger than the logits: masks are as wide as the logits."""
    import shutil
    src = model_dirs("llama")
    for name, tok_eos in (("noeos", False), ("tokeos", True)):
        d = tmp_path / name
        shutil.copytree(src, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.pop("eos_token_id", None)
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "generation_config.json").unlink(missing_ok=True)
        tc = json.loads((d / "tokenizer_config.json").read_text())
        if not tok_eos:
            tc.pop("eos_token", None)
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
        eng = engine(str(d))
        c = ("choice", json.dumps(CHOICES))
        res = run(eng, [Request(0, 0, SamplingParams(max_tokens=20, structured=c), prompt_token_ids=[5, 6]),
                        Request(1, 1, SamplingParams(max_tokens=3), prompt_token_ids=[5, 6])])
        if tok_eos:
            assert res[0].error is None and res[0].text in CHOICES
        else:
            assert res[0].error.type == "invalid_request" and "no end-of-sequence token" in res[0].error.message
        assert res[1].error is None and len(res[1].token_ids) == 3
    tok = Tokenizer(src)
    g = Grammars(tok.tok.to_str(), 500, [0], tokenizer_vocab=tok.vocab_size)
    bias, stuck = g.masks(g.start_masks([g.matcher(("regex", "[0-9]+"))]))
    assert bias.shape == (1, 500) and stuck == [False]
    toks, _, _ = sample(torch.zeros(1, 500), [SamplingParams()], [None], [False], [([], [])], ([0], bias))
    assert tok.decode(toks).isdigit()
