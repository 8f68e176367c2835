"""Structured outputs end to end: a vLLM-style OpenAI batch file with every constraint field, on both endpoints,
under one process, dp=2 and tp=2 (the masks are applied on each replica's leader): the same bytes in every
layout, every body a valid ``openai`` ChatCompletion / Completion, every completed answer inside its constraint,
and a schema that does not compile a 400 error record."""
import json
import re

import jsonschema
import pytest

from ..tiers import by_ranks
from .test_pipeline import MPIEXEC, cmd, lines, run

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "tags": {"type": "array", "items": {"enum": ["sea", "sky"]},
                                                    "maxItems": 2}},
          "required": ["city", "rank"], "additionalProperties": False}
CONSTRAINTS = [
    ("json", SCHEMA, {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}}),
    ("json", SCHEMA, {"guided_json": SCHEMA}),
    ("json", SCHEMA, {"structured_outputs": {"json": SCHEMA}}),
    ("json_object", None, {"response_format": {"type": "json_object"}}),
    ("regex", "[a-z]{3,8}-[0-9]{2}", {"guided_regex": "[a-z]{3,8}-[0-9]{2}"}),
    ("choice", ["sea", "sky", "ship"], {"guided_choice": ["sea", "sky", "ship"]}),
    ("choice", ["yes", "no"], {"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}}),
]


def batch_file(path):
    with open(path, "w") as f:
        for i in range(28):
            _kind, _spec, fields = CONSTRAINTS[i % len(CONSTRAINTS)]
            chat = i % 2 == 0
            body = {"model": "tiny", "max_tokens": 80, **fields}
            if chat:
                body["messages"] = [{"role": "user", "content": f"the old man and the sea {i}"}]
            else:
                body["prompt"] = f"wind and salt {i}"
            if i % 3 == 1:
                body.update(temperature=1.0, seed=i, n=2)
            url = "/v1/chat/completions" if chat else "/v1/completions"
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}) + "\n")
        bad = {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "u", "schema": {
                   "type": "array", "uniqueItems": True}}}}
        f.write(json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": bad}) + "\n")
    return str(path)


def check(kind, spec, text):
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    else:
        assert text in spec, text


@pytest.fixture(scope="module")
def one_rank(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("so")
    tiny = model_dirs("llama")
    inp = batch_file(d / "batch.jsonl")
    out = str(d / "one.jsonl")
    run(cmd(1, tiny, inp, out, "--max-batch", "8", "--served-model-name", "tiny"))
    return tiny, inp, lines(out)


def test_every_answer_is_inside_its_constraint(one_rank):
    import openai
    _, _, got = one_rank
    recs = [json.loads(x) for x in got]
    completed = 0
    for i, r in enumerate(recs[:-1]):
        kind, spec, _ = CONSTRAINTS[i % len(CONSTRAINTS)]
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        chat = i % 2 == 0
        (openai.types.chat.ChatCompletion if chat else openai.types.Completion).model_validate(body)
        assert len(body["choices"]) == (2 if i % 3 == 1 else 1)
        for c in body["choices"]:
            if c["finish_reason"] == "stop":
                check(kind, spec, c["message"]["content"] if chat else c["text"])
                completed += 1
    assert completed >= 30                          # of 36 answers: a random model rarely runs out of tokens
    bad = recs[-1]
    assert bad["custom_id"] == "bad" and bad["response"]["status_code"] == 400
    assert "uniqueItems" in bad["error"]["error"]["message"]


@pytest.mark.parametrize("n,flags", by_ranks([(2, []), (2, ["--tp", "2"])]))
def test_layouts_write_the_same_bytes(n, flags, one_rank, tmp_path):
    tiny, inp, want = one_rank
    out = str(tmp_path / "many.jsonl")
    run(cmd(n, tiny, inp, out, "--max-batch", "8", "--served-model-name", "tiny", *flags))
    got = lines(out)
    assert len(got) == len(want) == 29
    for g, w in zip(got, want):          # ids and created hash (index, custom_id) and the job's start time
        g, w = json.loads(g), json.loads(w)
        if w["response"]["status_code"] == 200:
            for k in ("created",):
                g["response"]["body"].pop(k), w["response"]["body"].pop(k)
        assert g == w
