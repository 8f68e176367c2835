"""Input/output formats beyond plain JSONL: OpenAI batch, HDF5, text directories, the summary."""
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mpiinfer.config import SamplingParams
from mpiinfer.io import writers
from mpiinfer.io.openai_batch import (
    CHAT_URL,
    COMPLETIONS_URL,
    batch_output_record,
    parse_openai_record,
    result_from_batch_output,
)
from mpiinfer.io.readers import detect_format, open_input
from mpiinfer.io.summary import Reservoir, Summary, summary_path
from mpiinfer.io.writers import default_output_format, open_output, recover_output
from mpiinfer.messages import ErrorInfo, Request, Result

h5py = pytest.importorskip("h5py")

DEFAULTS = SamplingParams(max_tokens=32, temperature=0.0)


def write_lines(p, objs):
    p.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs),
                 encoding="utf-8")
    return p


def chat(cid, content="hi", **body):
    return {"custom_id": cid, "method": "POST", "url": CHAT_URL,
            "body": {"model": "m1", "messages": [{"role": "user", "content": content}], **body}}


def comp(cid, prompt="once upon", **body):
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS_URL,
            "body": {"model": "m2", "prompt": prompt, **body}}


def parse(obj, line_no=3, index=7):
    return parse_openai_record(json.dumps(obj).encode(), line_no, index, DEFAULTS)


# ------------------------------------------------------------------ OpenAI batch input

def test_openai_chat_request():
    r = parse(chat("a", max_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop="\n",
                   logprobs=True, n=1, presence_penalty=0.1, user="u", stream=False))
    assert isinstance(r, Request) and r.id == "a" and r.index == 7
    assert r.messages == [{"role": "user", "content": "hi"}] and r.prompt is None
    assert r.sampling == DEFAULTS.replace(max_tokens=5, temperature=0.5, top_p=0.9, seed=3,
                                          stop=("\n",), logprobs=True, presence_penalty=0.1)
    assert r.extra == {"custom_id": "a", "url": CHAT_URL, "model": "m1"}


def test_openai_body_fields_are_applied_accepted_or_refused():
    """Nothing that changes a result is dropped: harmless fields and default values pass, others are refused."""
    ok = parse(chat("a", user="u", metadata={"k": "v"}, store=False, service_tier="auto", response_format={"type": "text"},
                    tools=[], tool_choice="none", parallel_tool_calls=True, stream_options=None, logit_bias=None))
    assert isinstance(ok, Request) and ok.sampling == DEFAULTS
    for field, value in [("tools", [{"type": "function"}]), ("tool_choice", "auto"), ("truncate_prompt_tokens", 3),
                         ("frobnicate", 1), ("guided_whitespace_pattern", " "), ("logits_processors", ["x"]),
                         ("reasoning_effort", "low")]:
        r = parse(chat("a", **{field: value}))
        assert isinstance(r, Result) and r.error.type == "invalid_request", field
        assert f"body.{field}" in r.error.message and "not supported" in r.error.message, r.error.message


def test_openai_model_must_be_served():
    def parse_served(obj, served):
        return parse_openai_record(json.dumps(obj).encode(), 1, 0, DEFAULTS, served=frozenset(served))
    assert isinstance(parse_served(chat("a"), {"m1", "other"}), Request)
    no_model = chat("b")
    del no_model["body"]["model"]
    assert isinstance(parse_served(no_model, {"x"}), Request)              # no model named: the loaded one
    r = parse_served(chat("c"), {"demo"})
    assert r.error.type == "model_not_found" and "`m1` does not exist" in r.error.message and "demo" in r.error.message
    rec = batch_output_record(r, 0)
    assert check_batch_output(rec) == "error"
    assert rec["response"]["status_code"] == 404 and rec["error"]["error"]["param"] == "model"


def test_openai_chat_variants():
    o = chat("b", max_tokens=9, max_completion_tokens=4)
    o["body"]["messages"] = [{"role": "developer", "content": "be brief", "name": "x"},
                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]}]
    r = parse(o)
    assert r.sampling.max_tokens == 4
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert parse(chat("c")).sampling == DEFAULTS          # absent fields: run defaults


def test_openai_completion_request():
    r = parse(comp("c", max_tokens=6, logprobs=0, top_k=5, stop_token_ids=[2], ignore_eos=True))
    assert r.prompt == "once upon" and r.sampling.logprobs is True and r.sampling.top_k == 5
    assert r.sampling.stop_token_ids == (2,) and r.sampling.ignore_eos and r.sampling.max_tokens == 6
    assert r.extra["url"] == COMPLETIONS_URL and r.extra["model"] == "m2"
    assert parse(comp("d", prompt=[1, 2, 3])).prompt_token_ids == [1, 2, 3]
    assert parse(comp("e", prompt=["x"])).prompt == "x"
    assert parse(comp("f", prompt=[[4, 5]])).prompt_token_ids == [4, 5]
    no_model = comp("g")
    del no_model["body"]["model"], no_model["method"]
    assert "model" not in parse(no_model).extra


@pytest.mark.parametrize("obj,needle,cid", [
    ({**chat("a"), "url": "/v1/rerank"}, "url '/v1/rerank'", "a"),
    ({k: v for k, v in chat("a").items() if k != "url"}, "no url", "a"),
    ({k: v for k, v in chat("a").items() if k != "custom_id"}, "no custom_id", None),
    ({**chat("a"), "custom_id": 5}, "custom_id must be a string", None),
    ({**chat("a"), "method": "GET"}, "POST", "a"),
    ({**chat("a"), "body": "x"}, "body must be an object", "a"),
    (chat("a", n=129), "n must be an integer from 1 to 128", "a"),   # n samples: 1-128
    (chat("a", n="1"), "n must be an integer", "a"),
    (chat("a", stream=True), "stream", "a"),
    (chat("a", top_logprobs=2), "top_logprobs", "a"),
    (chat("a", max_tokens="5"), "body.max_tokens must be an integer", "a"),
    (chat("a", temperature=-1), "temperature", "a"),
    (chat("a", stop=[1]), "stop", "a"),
    (chat("a", content=None), "without content", "a"),
    (chat("a", content=[{"type": "image_url", "image_url": {}}]), "image_url", "a"),
    ({**chat("a"), "body": {"model": 3, "messages": []}}, "body.model must be a string", "a"),
    ({**chat("a"), "body": {"messages": []}}, "messages must not be empty", "a"),
    ({**chat("a"), "body": {"prompt": "x"}}, "no messages", "a"),
    (comp("a", prompt=["x", "y"]), "2 prompts", "a"),
    (comp("a", prompt=""), "empty", "a"),
    (comp("a", prompt=[-1]), "non-negative", "a"),
    (comp("a", logprobs=21), "top_logprobs must be an integer from 0 to 20", "a"),
    (comp("a", logprobs=True), "logprobs must be an integer", "a"),
    (chat("a", echo=True), "body.echo in a chat completion", "a"),
    (comp("a", best_of=2), "best_of", "a"),
    ([1], "JSON object", None),
])
def test_openai_bad_records(obj, needle, cid):
    r = parse(obj)
    assert isinstance(r, Result) and r.error.type == "invalid_request", r
    assert needle in r.error.message, r.error.message
    assert r.extra["custom_id"] == cid and r.id == (cid if cid is not None else 3) and r.index == 7


def test_openai_bad_json_and_encoding():
    r = parse_openai_record(b'{"custom_id": "a"', 4, 0, DEFAULTS)
    assert r.error.type == "invalid_json" and r.id == 4 and r.extra == {"custom_id": None}
    r = parse_openai_record(b'{"custom_id": "\xff"}', 5, 1, DEFAULTS)
    assert r.error.type == "invalid_encoding" and r.id == 5


def test_detect_format_and_sniff(tmp_path):
    o = write_lines(tmp_path / "b.jsonl", ["", chat("a")])
    p = write_lines(tmp_path / "p.jsonl", [{"prompt": "x"}])
    j = write_lines(tmp_path / "j.json", ["not json", chat("a")])
    (tmp_path / "d").mkdir()
    assert detect_format(o) == "openai" and detect_format(p) == "jsonl" and detect_format(j) == "jsonl"
    assert detect_format(tmp_path / "d") == "text" and detect_format("-") == "jsonl"
    assert detect_format(tmp_path / "x.h5") == "hdf5" and detect_format(tmp_path / "x.HDF5") == "hdf5"
    with pytest.raises(ValueError, match="not supported"):
        detect_format(tmp_path / "x.csv")
    items = list(open_input(o, defaults=DEFAULTS, start_index=2))
    assert [(i.index, i.id) for i in items] == [(2, "a")] and isinstance(items[0], Request)
    # an explicit format wins over sniffing
    assert isinstance(next(iter(open_input(o, "jsonl", defaults=DEFAULTS))), Result)


def test_openai_stdin_sniff_and_skip(monkeypatch):
    data = ("\n" + "".join(json.dumps(chat(f"c{i}")) + "\n" for i in range(4))).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    items = list(open_input("-", defaults=DEFAULTS, skip=1))
    assert [(i.index, i.id) for i in items] == [(1, "c1"), (2, "c2"), (3, "c3")]
    assert all(isinstance(i, Request) for i in items)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "x"}\n')))
    assert next(iter(open_input("-", defaults=DEFAULTS))).prompt == "x"


def test_open_input_options(tmp_path):
    p = write_lines(tmp_path / "p.jsonl", [{"prompt": "x"}])
    # options of other formats are ignored, unknown ones rejected
    assert len(list(open_input(p, defaults=DEFAULTS, prompt_template="S: {document}", dataset="x"))) == 1
    with pytest.raises(TypeError, match="templat"):
        open_input(p, defaults=DEFAULTS, templat="x")
    with pytest.raises(ValueError, match="not supported"):
        open_input(p, "csv", defaults=DEFAULTS)


# ------------------------------------------------------------------ OpenAI batch output schema

def _check(obj, spec, where="record"):
    """Tiny schema checker: spec maps key -> type / tuple of types / nested spec dict / [item spec]."""
    assert isinstance(obj, dict), f"{where}: not an object"
    missing = set(spec) - set(obj)
    assert not missing, f"{where}: missing {missing}"
    for k, t in spec.items():
        v, w = obj[k], f"{where}.{k}"
        if isinstance(t, dict):
            _check(v, t, w)
        elif isinstance(t, list):
            assert isinstance(v, list), f"{w}: not an array"
            for i, item in enumerate(v):
                if isinstance(t[0], dict):
                    _check(item, t[0], f"{w}[{i}]")
                else:
                    assert isinstance(item, t[0]), f"{w}[{i}]"
        else:
            assert isinstance(v, t) and not (isinstance(v, bool) and t in (int, (int, float))), \
                f"{w}: {type(v).__name__} is not {t}"


NONE = type(None)
USAGE = {"prompt_tokens": int, "completion_tokens": int, "total_tokens": int}
CHAT_LOGPROBS = {"content": [{"token": str, "logprob": (int, float), "bytes": [int], "top_logprobs": list}]}
COMP_LOGPROBS = {"tokens": [str], "token_logprobs": [(int, float)], "text_offset": [int]}


def check_batch_output(rec):
    """OpenAI batch output record (as the Batch API / vLLM run-batch BatchRequestOutput)."""
    _check(rec, {"id": str, "custom_id": (str, NONE), "response": (dict, NONE), "error": (dict, NONE)})
    assert rec["id"].startswith("batch_req_")
    if rec["error"] is not None:
        # vLLM's ErrorResponse in "error", OpenAI's 4xx response with the error as its body
        _check(rec["error"], {"error": dict}, "error")
        e = rec["error"]["error"]
        _check(e, {"message": str, "type": str, "param": (str, NONE), "code": int}, "error.error")
        assert rec["response"] == {"status_code": e["code"], "request_id": rec["response"]["request_id"],
                                   "body": {"error": e}} and e["code"] in (400, 404)
        return "error"
    assert rec["response"] is not None
    resp = rec["response"]
    _check(resp, {"status_code": int, "request_id": str, "body": dict}, "response")
    assert resp["status_code"] == 200
    body = resp["body"]
    _check(body, {"id": str, "object": str, "created": int, "model": str, "choices": list,
                  "usage": USAGE}, "body")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert len(body["choices"]) == 1
    ch = body["choices"][0]
    _check(ch, {"index": int, "finish_reason": (str, NONE), "logprobs": (dict, NONE)}, "choice")
    assert ch["index"] == 0 and ch["finish_reason"] in ("stop", "length")
    if body["object"] == "chat.completion":
        assert body["id"].startswith("chatcmpl-")
        _check(ch, {"message": {"role": str, "content": str}}, "choice")
        assert ch["message"]["role"] == "assistant"
        if ch["logprobs"] is not None:
            _check(ch["logprobs"], CHAT_LOGPROBS, "logprobs")
        return "chat"
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    _check(ch, {"text": str}, "choice")
    if ch["logprobs"] is not None:
        _check(ch["logprobs"], COMP_LOGPROBS, "logprobs")
    return "completion"


def done(req, text="out", toks=(5, 6, 7), lps=None):
    return Result(index=req.index, id=req.id, text=text, token_ids=list(toks), finish_reason="length",
                  prompt_tokens=4, logprobs=lps, extra=req.extra)


def test_openai_output_schema_and_round_trip(tmp_path):
    inp = write_lines(tmp_path / "batch.jsonl",
                      [chat("a"), chat("b", logprobs=True), comp("c"), comp("d", logprobs=0),
                       {**chat("e"), "url": "/v1/bad"}])
    items = list(open_input(inp, defaults=DEFAULTS))
    assert default_output_format("openai", tmp_path / "o.jsonl") == "openai"
    results = [i if isinstance(i, Result) else
               done(i, lps=[-0.5, -1.0, -2.0] if i.sampling.logprobs else None) for i in items]
    out = tmp_path / "o.jsonl"
    with open_output(out, "openai", created=1700000000, model="fallback", flush_every_records=2) as w:
        for r in results:
            w.write(r)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    kinds = [check_batch_output(r) for r in recs]
    assert kinds == ["chat", "chat", "completion", "completion", "error"]
    assert [r["custom_id"] for r in recs] == ["a", "b", "c", "d", "e"]
    assert recs[0]["response"]["body"]["model"] == "m1" and recs[0]["response"]["body"]["created"] == 1700000000
    assert recs[0]["response"]["body"]["choices"][0]["message"]["content"] == "out"
    assert recs[1]["response"]["body"]["choices"][0]["logprobs"]["content"][1] == \
        {"token": "token_id:6", "logprob": -1.0, "bytes": list(b"token_id:6"), "top_logprobs": []}
    assert recs[3]["response"]["body"]["choices"][0]["logprobs"]["token_logprobs"] == [-0.5, -1.0, -2.0]
    e = recs[4]["error"]["error"]
    assert e["type"] == "invalid_request" and e["code"] == 400 and "/v1/bad" in e["message"]
    assert len({r["id"] for r in recs}) == 5
    back = [result_from_batch_output(r, i) for i, r in enumerate(recs)]
    for b, r in zip(back, results):
        assert (b.id, b.text, b.finish_reason, b.logprobs, b.error) == \
            (r.id, r.text, r.finish_reason, r.logprobs, r.error)
        if r.error is None:
            assert b.prompt_tokens == r.prompt_tokens and b.extra == r.extra
    # a resumed run (recover, then append the rest) writes the same bytes
    full = out.read_bytes()
    out2 = tmp_path / "o2.jsonl"
    out2.write_bytes(full[:full.index(b"\n", full.index(b"\n") + 1) + 1] + b'{"id": "batch_req_x", "cus')
    assert recover_output(out2, "openai") == 2
    with open_output(out2, "openai", created=1700000000, model="fallback") as w:
        for r in results[2:]:
            w.write(r)
    assert out2.read_bytes() == full


def test_openai_output_for_jsonl_results_and_token_str():
    r = Result(index=3, id=9, text="x", token_ids=[1, 2], finish_reason="stop", prompt_tokens=1,
               logprobs=[-1.0, -2.0])
    rec = batch_output_record(r, 5, "mdl", token_str=lambda t: "ab"[t - 1])
    assert check_batch_output(rec) == "completion"
    assert rec["custom_id"] == "9" and rec["response"]["body"]["model"] == "mdl"
    assert rec["response"]["body"]["choices"][0]["logprobs"]["tokens"] == ["a", "b"]
    assert rec["response"]["body"]["choices"][0]["logprobs"]["text_offset"] == [0, 1]
    assert batch_output_record(r, 5)["id"] == rec["id"]                  # deterministic
    assert batch_output_record(Result(index=4, id=9), 5)["id"] != rec["id"]
    e = batch_output_record(Result(index=0, id=2, error=ErrorInfo("invalid_json", "bad"),
                                   extra={"custom_id": None}), 5)
    assert check_batch_output(e) == "error" and e["custom_id"] is None


# ------------------------------------------------------------------ HDF5 input

def make_h5_input(p, rows, ids=None, dtype=np.int64, name="input_ids"):
    with h5py.File(p, "w") as f:
        d = f.create_dataset(name, (len(rows),), dtype=h5py.vlen_dtype(np.dtype(dtype)))
        for i, r in enumerate(rows):
            d[i] = np.asarray(r, dtype=dtype)
        if ids is not None:
            if isinstance(ids[0], str):
                f.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
            else:
                f.create_dataset("ids", data=np.asarray(ids, dtype=np.int64))
    return p


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_hdf5_input(tmp_path, dtype):
    rows = [[1, 2, 3], [4], [], [7, 8], [9, -1], [10]]
    p = make_h5_input(tmp_path / "in.h5", rows, ids=["a", "b", "c", "d", "e", "f"], dtype=dtype)
    items = list(open_input(p, defaults=DEFAULTS, start_index=10, chunk_rows=4))
    assert [i.index for i in items] == list(range(10, 16))
    assert [i.id for i in items] == ["a", "b", "c", "d", "e", "f"]
    assert items[0].prompt_token_ids == [1, 2, 3] and items[0].sampling == DEFAULTS
    assert type(items[0].prompt_token_ids[0]) is int
    assert items[2].error.type == "invalid_request" and "empty" in items[2].error.message
    assert "negative" in items[4].error.message
    assert [i.index for i in open_input(p, defaults=DEFAULTS, skip=4, chunk_rows=2)] == [4, 5]
    assert list(open_input(p, defaults=DEFAULTS, skip=9)) == []


def test_hdf5_input_int_ids_no_ids_named_dataset_and_errors(tmp_path):
    p = make_h5_input(tmp_path / "a.hdf5", [[1], [2]], ids=[10, 20])
    assert [i.id for i in open_input(p, defaults=DEFAULTS)] == [10, 20]
    q = make_h5_input(tmp_path / "b.h5", [[1], [2], [3]], name="toks")
    assert [(i.id, i.prompt_token_ids) for i in open_input(q, defaults=DEFAULTS, dataset="toks")] == \
        [(0, [1]), (1, [2]), (2, [3])]
    with pytest.raises(ValueError, match="no dataset 'input_ids'.*toks"):
        open_input(q, defaults=DEFAULTS)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["input_ids"] = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="integer"):
        open_input(tmp_path / "c.h5", defaults=DEFAULTS)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["input_ids"] = np.arange(6, dtype=np.int32).reshape(2, 3)
        f["ids"] = np.array([1])
    with pytest.raises(ValueError, match="at least 2 rows"):
        open_input(tmp_path / "d.h5", defaults=DEFAULTS)
    assert [i.prompt_token_ids for i in open_input(tmp_path / "d.h5", defaults=DEFAULTS, ids_dataset="")] \
        == [[0, 1, 2], [3, 4, 5]]


def test_hdf5_input_is_lazy(tmp_path, monkeypatch):
    p = make_h5_input(tmp_path / "in.h5", [[i + 1] for i in range(50)])
    reads = []
    orig = h5py.Dataset.__getitem__

    def spy(self, key):
        reads.append(key)
        return orig(self, key)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    it = open_input(p, defaults=DEFAULTS, chunk_rows=8)
    assert next(it).prompt_token_ids == [1]
    assert reads == [slice(0, 8)]
    it.close()


# ------------------------------------------------------------------ HDF5 output

def results(n, start=0):
    out = []
    for i in range(start, start + n):
        if i % 4 == 3:
            out.append(Result(index=i, id=f"r{i}", error=ErrorInfo("prompt_too_long", f"too long {i}")))
        else:
            out.append(Result(index=i, id=f"r{i}", text=f"tëxt {i}", token_ids=list(range(i % 3 + 1)),
                              finish_reason="stop" if i % 2 else "length", prompt_tokens=i,
                              logprobs=[-0.25] * (i % 3 + 1) if i % 2 else None))
    return out


def strip(r):
    return (r.index, str(r.id), r.text, list(r.token_ids), r.finish_reason, r.prompt_tokens,
            r.logprobs, r.error)


def test_hdf5_output_round_trip(tmp_path):
    from mpiinfer.io.hdf5 import OUTPUT_DATASETS, read_hdf5_results
    p = tmp_path / "out.h5"
    with open_output(p, flush_every_records=3, model="ignored", created=1) as w:
        for r in results(10):
            w.write(r)
    assert [strip(r) for r in read_hdf5_results(p)] == [strip(r) for r in results(10)]
    with h5py.File(p, "r") as f:
        assert set(OUTPUT_DATASETS) <= set(f) and all(f[k].maxshape == (None,) for k in OUTPUT_DATASETS)
        assert f["token_ids"].dtype.metadata["vlen"] == np.int32
        assert f["logprobs"].dtype.metadata["vlen"] == np.float32
        assert f["completion_tokens"][:4].tolist() == [1, 2, 3, 0] and f["error_type"][3] == b"prompt_too_long"
    assert recover_output(p) == 10
    with open_output(p) as w:                                   # append after recovery
        for r in results(3, start=10):
            w.write(r)
    assert [strip(r) for r in read_hdf5_results(p)] == [strip(r) for r in results(13)]
    assert default_output_format("openai", p) == "hdf5" and default_output_format("text", p) == "hdf5"
    with pytest.raises(ValueError, match="stdout"):
        open_output("-", "hdf5")


SWMR_READER = textwrap.dedent("""
    import sys, h5py
    with h5py.File(sys.argv[1], "r", swmr=True, libver="latest") as f:
        print(f["ids"].shape[0], f["token_ids"][f["token_ids"].shape[0] - 1].tolist(),
              f["text"][f["text"].shape[0] - 1].decode())
""")


def test_hdf5_swmr_readable_mid_write(tmp_path):
    p = tmp_path / "live.h5"
    w = open_output(p, flush_every_records=1000, flush_every_seconds=1e9)
    try:
        for r in results(5):
            w.write(r)
        w.flush()
        for r in results(2, start=5):      # buffered, not flushed: not visible
            w.write(r)
        out = subprocess.run([sys.executable, "-c", SWMR_READER, str(p)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split(None, 1)[0] == "5"
        assert out.stdout.strip().endswith("[0, 1] tëxt 4")
        # an in-process SWMR handle sees later flushes after refresh()
        with h5py.File(p, "r", swmr=True, libver="latest") as f:
            d = f["ids"]
            assert d.shape[0] == 5
            w.flush()
            d.refresh()
            assert d.shape[0] == 7 and d[6] == b"r6"
    finally:
        w.close()


CRASH_WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from mpiinfer.io.writers import open_output
    from mpiinfer.messages import Result
    w = open_output(sys.argv[1], flush_every_records=4)
    for i in range(8):
        w.write(Result(index=i, id=i, text="t", token_ids=[i], finish_reason="stop", prompt_tokens=1))
    # a torn append: two datasets grew, then the process dies
    for name in ("ids", "token_ids"):
        d = w._ds[name]
        d.resize((10,))
    w._ds["ids"][8:10] = np.array([b"x", b"y"], dtype=object)
    w._f.flush()
    os._exit(9)
""")


def test_hdf5_recovery_truncates_partial_append(tmp_path):
    from mpiinfer.io.hdf5 import read_hdf5_results, recover_hdf5
    p = tmp_path / "crash.h5"
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CRASH_WRITER, str(p)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 9, out.stderr
    with h5py.File(p, "r", swmr=True, libver="latest") as f:
        assert f["ids"].shape[0] == 10 and f["text"].shape[0] == 8
    assert recover_hdf5(p) == 8
    assert recover_hdf5(p) == 8                                   # idempotent, clean now
    with open_output(p) as w:
        w.write(Result(index=8, id=8, text="u", token_ids=[8], finish_reason="stop"))
    got = read_hdf5_results(p)
    assert [r.id for r in got] == [str(i) for i in range(9)] and got[8].text == "u"
    assert not os.path.exists(str(p) + ".tmp")
    # a cleanly closed file with unequal lengths is truncated in place
    with h5py.File(p, "r+", libver="latest") as f:
        f["text"].resize((11,))
    assert recover_hdf5(p) == 9
    with h5py.File(p, "r") as f:
        assert f["text"].shape[0] == 9
    assert recover_hdf5(tmp_path / "missing.h5") == 0
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        recover_hdf5(tmp_path / "junk.h5")


# ------------------------------------------------------------------ text directories

def test_text_dir(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.md").write_text("# B doc {filename}", encoding="utf-8")
    (d / "a.txt").write_bytes("\ufeffalpha é".encode("utf-8"))
    (d / "c.txt").write_bytes(b"bad \xff byte")
    (d / "d.txt").write_text("  \n")
    (d / "e.csv").write_text("skipped")
    (d / ".hidden.txt").write_text("skipped")
    (d / "sub" / "z.txt").write_text("nested")
    items = list(open_input(d, defaults=DEFAULTS, start_index=1,
                            prompt_template="Summarize {filename}:\n{document}\n{document}"))
    assert [i.id for i in items] == ["a.txt", "b.md", "c.txt", "d.txt"]
    assert [i.index for i in items] == [1, 2, 3, 4]
    assert items[0].prompt == "Summarize a.txt:\nalpha é\nalpha é" and items[0].sampling == DEFAULTS
    assert items[1].prompt == "Summarize b.md:\n# B doc {filename}\n# B doc {filename}"
    assert items[2].error.type == "invalid_encoding" and "c.txt" in items[2].error.message
    assert items[3].error.type == "invalid_request" and "empty" in items[3].error.message
    rec = list(open_input(d, "text", defaults=DEFAULTS, recursive=True, skip=3))
    assert [(i.index, i.id) for i in rec] == [(3, "d.txt"), (4, "sub/z.txt")]
    assert rec[1].prompt == "nested"
    with pytest.raises(ValueError, match="document"):
        open_input(d, defaults=DEFAULTS, prompt_template="no placeholder")


# ------------------------------------------------------------------ output dispatch

@pytest.mark.parametrize("fmt,name", [("jsonl", "o.jsonl"), ("openai", "o.jsonl"), ("hdf5", "o.h5")])
def test_every_output_format_round_trips_and_recovers(tmp_path, fmt, name):
    from mpiinfer.io.hdf5 import read_hdf5_results
    p = tmp_path / name
    rs = results(6)
    with open_output(p, fmt, flush_every_records=2, created=7, model="m") as w:
        for r in rs[:4]:
            w.write(r)
    assert recover_output(p, fmt) == 4
    with open_output(p, fmt, created=7, model="m") as w:
        for r in rs[4:]:
            w.write(r)
    assert recover_output(p, fmt) == 6
    if fmt == "hdf5":
        back = read_hdf5_results(p)
        assert [strip(r) for r in back] == [strip(r) for r in rs]
        return
    recs = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]
    if fmt == "jsonl":
        assert recs == [r.to_record() for r in rs]
    else:
        for i, (rec, r) in enumerate(zip(recs, rs)):
            check_batch_output(rec)
            b = result_from_batch_output(rec, i)
            assert (b.text, b.logprobs, b.error, b.finish_reason) == (r.text, r.logprobs, r.error, r.finish_reason)
    assert recover_output("-") == 0
    with pytest.raises(ValueError, match="not supported"):
        open_output(tmp_path / "x.csv")
    assert writers.detect_output_format(tmp_path / "x.HDF5") == "hdf5"
    assert default_output_format("jsonl", p) == ("hdf5" if fmt == "hdf5" else "jsonl")


# ------------------------------------------------------------------ summary

def test_summary_percentiles_and_counts(tmp_path):
    s = Summary(mesh="dp=2 x tp=1 (2 ranks)", resumed=3)
    for i in range(101):   # ttft 0..100 ms, per-token (latency - ttft) / (n - 1) = i / 1000 s
        s.add(Result(index=i, id=i, token_ids=[1] * 11, prompt_tokens=2, finish_reason="stop",
                     ttft=i / 1000, latency=i / 1000 + 10 * i / 1000))
    s.add(Result(index=101, id=101, token_ids=[1], prompt_tokens=5, ttft=0.5, latency=0.5))  # 1 token
    s.add(Result(index=102, id=102, error=ErrorInfo("invalid_json", "x")))
    s.add(Result(index=103, id=103, error=ErrorInfo("invalid_json", "y")))
    s.add(Result(index=104, id=104, error=ErrorInfo("prompt_too_long", "z")))
    s.finish()
    d = s.to_dict()
    assert (d["records"], d["ok"], d["errors"]) == (105, 102, 3)
    assert d["errors_by_type"] == {"invalid_json": 2, "prompt_too_long": 1}
    assert d["prompt_tokens"] == 207 and d["completion_tokens"] == 1112 and d["resumed_records"] == 3
    assert d["per_token_latency_s"] == pytest.approx({"p50": 0.050, "p90": 0.090, "p99": 0.099})
    ttft = sorted([i / 1000 for i in range(101)] + [0.5])
    assert d["ttft_s"] == pytest.approx({f"p{p}": float(np.percentile(ttft, p)) for p in (50, 90, 99)})
    assert d["mesh"] == "dp=2 x tp=1 (2 ranks)" and d["records_per_s"] > 0
    assert d["generated_tokens_per_s"] == pytest.approx(1112 / d["wall_time_s"])
    out = tmp_path / "o.jsonl"
    path = summary_path(str(out))
    assert path == str(out) + ".summary.json" and summary_path("-") is None
    s.write(path)
    assert json.loads(open(path).read()) == json.loads(json.dumps(d))
    assert os.listdir(tmp_path) == ["o.jsonl.summary.json"]         # no temp file left
    assert Summary().to_dict()["ttft_s"] is None


def test_summary_memory_bounded():
    r = Reservoir(size=1000, seed=1)
    for i in range(200_000):
        r.add(i / 200_000)
    assert len(r.values) == 1000 and r.seen == 200_000
    p = r.percentiles()
    assert abs(p["p50"] - 0.5) < 0.06 and abs(p["p90"] - 0.9) < 0.04 and abs(p["p99"] - 0.99) < 0.02
    s = Summary(reservoir_size=500)
    for i in range(20_000):
        s.add(Result(index=i, id=i, token_ids=[1, 2], ttft=0.01, latency=0.02))
    assert len(s.ttft.values) == 500 and len(s.per_token.values) == 500
    assert s.to_dict()["latency_samples"]["ttft"] == {"seen": 20_000, "kept": 500}
