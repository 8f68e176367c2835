"""Every OpenAI batch endpoint end to end, as vLLM's run-batch files carry them: chat completions, completions
(echo with prompt logprobs, scoring with max_tokens 0), embeddings (several inputs, float and base64) and vLLM's
score (cosine of embeddings), under
one process, dp=2 and tp=2: each body valid for the ``openai`` package's model of its endpoint, and every layout
equal to one rank (tokens, texts and ids exactly, floats within 1e-4)."""
import base64
import json

import numpy as np
import pytest

from ..tiers import by_ranks
from .test_pipeline import MPIEXEC, assert_close, cmd, lines, run

pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")
WORDS = ["the", "old", "man", "and", "the", "sea", "salt", "wind", "over", "night", "ship"]


def batch_file(path):
    bodies = []
    for i in range(24):
        words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 7))
        kind = i % 4
        if kind == 0:
            bodies.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": words}],
                                                    "max_tokens": 6, "logprobs": True, "top_logprobs": 2}))
        elif kind == 1:
            bodies.append(("/v1/completions", {"prompt": words, "max_tokens": 0 if i % 8 == 1 else 4, "echo": True,
                                               "logprobs": 2}))
        elif kind == 2:
            bodies.append(("/v1/embeddings", {"input": [words, words.upper(), [5, 6, 7]],
                                              "encoding_format": "base64" if i % 8 == 2 else "float"}))
        elif i % 8 == 3:
            bodies.append(("/v1/embeddings", {"input": words, "normalize": False}))
        else:
            bodies.append(("/v1/score", {"text_1": words, "text_2": [words.upper(), "sea", words]}))
    with open(path, "w") as f:
        for i, (url, body) in enumerate(bodies):
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url,
                                "body": {"model": "tiny", **body}}) + "\n")
    return str(path), bodies


def decoded(body):
    """An embeddings body with base64 vectors decoded (the openai client does it before its model)."""
    return {**body, "data": [{**d, "embedding": np.frombuffer(base64.b64decode(d["embedding"]), "<f4").tolist()
                              if isinstance(d["embedding"], str) else d["embedding"]} for d in body["data"]]}


@pytest.fixture(scope="module")
def one_rank(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("ep")
    tiny = model_dirs("llama")
    inp, bodies = batch_file(d / "batch.jsonl")
    out = str(d / "one.jsonl")
    run(cmd(1, tiny, inp, out, "--max-batch", "8", "--served-model-name", "tiny"))
    return tiny, inp, bodies, [json.loads(x) for x in lines(out)]


def test_every_endpoint_in_its_openai_shape(one_rank):
    import openai
    _, _, bodies, recs = one_rank
    assert len(recs) == len(bodies)
    for (url, req), rec in zip(bodies, recs):
        assert rec["error"] is None and rec["response"]["status_code"] == 200, rec
        body = rec["response"]["body"]
        if url == "/v1/chat/completions":
            obj = openai.types.chat.ChatCompletion.model_validate(body)
            assert len(obj.choices[0].logprobs.content) == obj.usage.completion_tokens
        elif url == "/v1/completions":
            lp = body["choices"][0]["logprobs"]
            assert lp["token_logprobs"][0] is None and body["choices"][0]["text"].startswith(req["prompt"])
            assert len(lp["tokens"]) == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
            sdk = json.loads(json.dumps(body))
            sdk["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
            sdk["choices"][0]["logprobs"]["top_logprobs"][0] = {}
            openai.types.Completion.model_validate(sdk)
        elif url == "/v1/score":          # vLLM's own shape (the openai package has no score type)
            assert body["object"] == "list" and [d["object"] for d in body["data"]] == ["score"] * 3
            assert all(-1 - 1e-6 <= d["score"] <= 1 + 1e-6 for d in body["data"])
            assert body["data"][2]["score"] == pytest.approx(1.0, abs=1e-5)        # a text against itself
        else:
            obj = openai.types.CreateEmbeddingResponse.model_validate(decoded(body))
            n = len(req["input"]) if isinstance(req["input"], list) and not isinstance(req["input"][0], int) else 1
            assert len(obj.data) == n and [d.index for d in obj.data] == list(range(n))
            norms = [float(np.linalg.norm(d.embedding)) for d in obj.data]
            if req.get("normalize") is False:
                assert all(abs(x - 1) > 1e-3 for x in norms)
            else:
                assert norms == pytest.approx([1.0] * n, abs=1e-5)


@pytest.mark.parametrize("n,flags", by_ranks([(2, []), (2, ["--tp", "2"])]))
def test_layouts_equal_one_rank(n, flags, one_rank, tmp_path):
    tiny, inp, _, want = one_rank
    out = str(tmp_path / "many.jsonl")
    run(cmd(n, tiny, inp, out, "--max-batch", "8", "--served-model-name", "tiny", *flags))
    got = [json.loads(x) for x in lines(out)]
    want = json.loads(json.dumps(want))          # the fixture's records stay as they are for the other layouts
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g["response"]["body"].pop("created"), w["response"]["body"].pop("created")
        if w["response"]["body"].get("object") == "list" and "embedding" in w["response"]["body"]["data"][0]:
            g["response"]["body"], w["response"]["body"] = decoded(g["response"]["body"]), \
                decoded(w["response"]["body"])
        assert_close(g, w, where=w["custom_id"])
