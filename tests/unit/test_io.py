"""JSONL input/output layer: records, readers, writers."""
import io
import json
import os
import sys

import pytest

from mpiinfer.config import SamplingParams
from mpiinfer.io import readers, writers
from mpiinfer.io.readers import count_lines, iter_jsonl, open_input
from mpiinfer.io.records import RecordError, parse_record
from mpiinfer.io.writers import (
    JsonlWriter,
    OrderedWriter,
    ReorderOverflow,
    recover_jsonl,
)
from mpiinfer.messages import ErrorInfo, Request, Result

DEFAULTS = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, top_k=40, seed=None,
                          stop=("###",), stop_token_ids=(2,), logprobs=False, ignore_eos=False)


def parse(obj, line_no=7, index=3, defaults=DEFAULTS):
    if isinstance(obj, dict):
        obj = json.dumps(obj).encode()
    return parse_record(obj, line_no, index, defaults)


def ok(obj, **kw):
    r = parse(obj, **kw)
    assert isinstance(r, Request), r
    return r


def err(obj, type="invalid_request", **kw):
    r = parse(obj, **kw)
    assert isinstance(r, Result), r
    assert r.error is not None and r.error.type == type, r.error
    return r


# ------------------------------------------------------------------ valid records

def test_prompt_defaults_applied():
    r = ok({"id": "a", "prompt": "hello"})
    assert r == Request(index=3, id="a", sampling=DEFAULTS, prompt="hello")
    assert r.messages is None and r.prompt_token_ids is None


def test_messages():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": ""}]
    r = ok({"id": 5, "messages": msgs})
    assert r.id == 5 and isinstance(r.id, int)
    assert r.messages == msgs and r.prompt is None


def test_prompt_token_ids():
    r = ok({"id": 0, "prompt_token_ids": [1, 0, 31999]})
    assert r.prompt_token_ids == [1, 0, 31999] and r.id == 0


def test_missing_id_gets_line_number():
    assert ok({"prompt": "x"}, line_no=12).id == 12
    assert ok({"id": None, "prompt": "x"}, line_no=4).id == 4


def test_overrides_applied():
    r = ok({"id": 1, "prompt": "x", "max_tokens": 5, "temperature": 0, "top_p": 1, "top_k": 0,
            "seed": 2**63 - 1, "stop": "\n", "stop_token_ids": [7, 8], "logprobs": True,
            "ignore_eos": True})
    assert r.sampling == SamplingParams(max_tokens=5, temperature=0.0, top_p=1.0, top_k=0,
                                        seed=2**63 - 1, stop=("\n",), stop_token_ids=(7, 8),
                                        logprobs=True, ignore_eos=True)
    assert isinstance(r.sampling.temperature, float)
    r = ok({"prompt": "x", "stop": ["a", "b"], "stop_token_ids": []})
    assert r.sampling.stop == ("a", "b") and r.sampling.stop_token_ids == ()
    # unspecified fields keep the defaults; null means default
    r = ok({"prompt": "x", "max_tokens": 9, "seed": None, "temperature": None})
    assert r.sampling == DEFAULTS.replace(max_tokens=9)


def test_accepts_parsed_dict_str_and_crlf():
    d = {"id": "z", "prompt": "x", "top_k": 3}
    r = parse_record(d, 1, 0, DEFAULTS)
    assert isinstance(r, Request) and r.sampling.top_k == 3 and d == {"id": "z", "prompt": "x", "top_k": 3}
    assert isinstance(parse_record('{"prompt": "y"}', 1, 0, DEFAULTS), Request)
    assert isinstance(parse_record(b'{"prompt": "y"}\r\n', 1, 0, DEFAULTS), Request)


def test_unicode_kept():
    r = ok({"id": "ü", "prompt": "naïve 日本語 🚀"})
    assert r.prompt == "naïve 日本語 🚀"


# ------------------------------------------------------------------ bad records

@pytest.mark.parametrize("line,type,needle", [
    (b'{"prompt": "x"', "invalid_json", "JSON"),
    (b'{"prompt": "x"} {"prompt": "y"}', "invalid_json", "Extra data"),
    (b'{"prompt": "x", "temperature": NaN}', "invalid_json", "NaN"),
    (b'{"prompt": "caf\xe9"}', "invalid_encoding", "UTF-8"),
    (b'\xff\xfe', "invalid_encoding", "UTF-8"),
    (b'"just a string"', "invalid_request", "object"),
    (b'{"prompt": "x", "temperature": 1e999}', "invalid_request", "temperature"),
    (b'{"id": "x", "prompt": "x"}', None, None),
])
def test_bad_lines(line, type, needle):
    r = parse_record(line, 9, 2, DEFAULTS)
    if type is None:
        assert isinstance(r, Request) and r.id == "x" and r.index == 2
        return
    assert isinstance(r, Result) and r.error.type == type and needle in r.error.message
    assert r.id == 9 and r.index == 2


@pytest.mark.parametrize("obj,needle", [
    ([1, 2], "object"),
    (None, "object"),
    ({"id": 1}, "prompt"),
    ({"id": 1, "prompt": None}, "prompt"),
    ({"id": 1, "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "prompt, messages"),
    ({"id": 1, "prompt": "x", "prompt_token_ids": [1]}, "prompt_token_ids"),
    ({"id": 1, "prompt": ""}, "prompt"),
    ({"id": 1, "prompt": 5}, "prompt"),
    ({"id": 1, "prompt": ["a"]}, "prompt"),
    ({"id": 1, "prompt": "\ud800"}, "prompt"),
    ({"id": 1, "messages": []}, "messages"),
    ({"id": 1, "messages": "hi"}, "messages"),
    ({"id": 1, "messages": ["hi"]}, "messages[0]"),
    ({"id": 1, "messages": [{"content": "hi"}]}, "role"),
    ({"id": 1, "messages": [{"role": "user"}]}, "content"),
    ({"id": 1, "messages": [{"role": "", "content": "x"}]}, "role"),
    ({"id": 1, "messages": [{"role": 1, "content": "x"}]}, "role"),
    ({"id": 1, "messages": [{"role": "user", "content": None}]}, "content"),
    ({"id": 1, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "content"),
    ({"id": 1, "messages": [{"role": "user", "content": "x", "nme": "a"}]}, "nme"),
    ({"id": 1, "prompt_token_ids": []}, "prompt_token_ids"),
    ({"id": 1, "prompt_token_ids": "1 2"}, "prompt_token_ids"),
    ({"id": 1, "prompt_token_ids": [1, -2]}, "prompt_token_ids[1]"),
    ({"id": 1, "prompt_token_ids": [1, 2.0]}, "prompt_token_ids[1]"),
    ({"id": 1, "prompt_token_ids": [True, 2]}, "prompt_token_ids[0]"),
    ({"id": 1, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"id": 1, "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"id": 1, "prompt": "x", "max_tokens": 10.0}, "max_tokens"),
    ({"id": 1, "prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"id": 1, "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"id": 1, "prompt": "x", "temperature": -0.1}, "temperature"),
    ({"id": 1, "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"id": 1, "prompt": "x", "temperature": False}, "temperature"),
    ({"id": 1, "prompt": "x", "temperature": 1e999}, "temperature"),
    ({"id": 1, "prompt": "x", "top_p": 0}, "top_p"),
    ({"id": 1, "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"id": 1, "prompt": "x", "top_p": [0.5]}, "top_p"),
    ({"id": 1, "prompt": "x", "top_k": -1}, "top_k"),
    ({"id": 1, "prompt": "x", "top_k": 1.5}, "top_k"),
    ({"id": 1, "prompt": "x", "seed": -1}, "seed"),
    ({"id": 1, "prompt": "x", "seed": 2**63}, "seed"),
    ({"id": 1, "prompt": "x", "seed": "42"}, "seed"),
    ({"id": 1, "prompt": "x", "seed": True}, "seed"),
    ({"id": 1, "prompt": "x", "stop": 3}, "stop"),
    ({"id": 1, "prompt": "x", "stop": ["a", 3]}, "stop[1]"),
    ({"id": 1, "prompt": "x", "stop": ""}, "stop"),
    ({"id": 1, "prompt": "x", "stop_token_ids": 3}, "stop_token_ids"),
    ({"id": 1, "prompt": "x", "stop_token_ids": [3, -1]}, "stop_token_ids[1]"),
    ({"id": 1, "prompt": "x", "logprobs": 1}, "logprobs"),
    ({"id": 1, "prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"id": 1, "prompt": "x", "max_token": 5}, "max_token"),
    ({"id": 1, "prompt": "x", "temprature": 1, "model": "m"}, "temprature"),
])
def test_invalid_request(obj, needle):
    r = parse_record(obj, 7, 3, DEFAULTS)
    assert isinstance(r, Result), r
    assert r.error.type == "invalid_request", r.error
    assert needle in r.error.message, r.error.message
    assert r.index == 3
    assert r.id == (1 if isinstance(obj, dict) and "id" in obj else 7)
    # the same record as raw bytes gives the same result
    if isinstance(obj, dict) and "\ud800" not in str(obj) and obj.get("temperature") != 1e999:
        assert parse_record(json.dumps(obj).encode(), 7, 3, DEFAULTS) == r


def test_unknown_fields_all_named_with_hint():
    r = err({"prompt": "x", "temprature": 1, "model": "m"})
    assert "'temprature'" in r.error.message and "'model'" in r.error.message
    assert "did you mean 'temperature'" in r.error.message


def test_unknown_fields_message_is_bounded():
    obj = {"prompt": "x", **{f"k{i}": i for i in range(500)}, "z" * 1000: 1}
    r = err(obj)
    assert "'k0'" in r.error.message and "and 491 more" in r.error.message
    assert len(r.error.message) < 1000


def test_pathological_lines_do_not_raise():
    r = parse_record(b"[" * 100000 + b"]" * 100000, 1, 0, DEFAULTS)
    assert r.error.type == "invalid_json"
    r = parse_record(b'{"prompt": ' + b"[" * 900 + b"]" * 900 + b"}", 1, 0, DEFAULTS)
    assert r.error.type == "invalid_request" and len(r.error.message) < 200
    r = parse_record({1: 2, "prompt": "x"}, 1, 0, DEFAULTS)
    assert r.error.type == "invalid_request"


@pytest.mark.parametrize("bad_id", [1.5, True, [1], {"a": 1}])
def test_bad_id_uses_line_number(bad_id):
    r = err({"id": bad_id, "prompt": "x"}, line_no=42)
    assert r.id == 42 and "id" in r.error.message


def test_error_id_is_record_id_when_valid():
    assert err({"id": "keep", "prompt": ""}).id == "keep"
    assert err({"id": 0, "prompt": "x", "top_k": -1}).id == 0


def test_record_error_type():
    e = RecordError("invalid_json", "msg")
    assert e.type == "invalid_json" and str(e) == "msg"


def test_error_result_to_record():
    r = err({"id": 3, "prompt": "x", "top_p": 2})
    assert r.to_record() == {"id": 3, "error": {"type": "invalid_request", "message": r.error.message}}


# ------------------------------------------------------------------ readers

def write_bytes(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


MIXED = (b'\xef\xbb\xbf{"id": "a", "prompt": "one"}\n'   # 1 (with a BOM)
         b'\n'                                            # 2 blank
         b'{"prompt": "two", "max_tokens": 3}\r\n'        # 3 no id -> 3
         b'   \t \n'                                      # 4 blank
         b'{"id": "bad", "prompt": "x" \n'                # 5 invalid json
         b'{"id": 5, "prompt": "caf\xe9"}\n'              # 6 invalid utf-8
         b'{"id": 6, "prompt_token_ids": [1, 2]}\n'       # 7
         b'[1, 2]\n'                                      # 8 not an object
         b'{"id": 8, "prompt": "x", "typo": 1}\n'         # 9 unknown field
         b'\n'                                            # 10 blank
         b'{"id": 9, "messages": [{"role": "user", "content": "hi"}]}')  # 11, no final newline


def check_mixed(items, start=0):
    assert [it.index for it in items] == list(range(start, start + 8))
    kinds = [(type(it).__name__, it.id, it.error.type if isinstance(it, Result) else None) for it in items]
    assert kinds == [
        ("Request", "a", None),
        ("Request", 3, None),
        ("Result", 5, "invalid_json"),
        ("Result", 6, "invalid_encoding"),
        ("Request", 6, None),
        ("Result", 8, "invalid_request"),
        ("Result", 8, "invalid_request"),
        ("Request", 9, None),
    ]
    assert items[1].sampling.max_tokens == 3 and items[1].prompt == "two"


def test_iter_jsonl_mixed_file(tmp_path):
    p = write_bytes(tmp_path, "in.jsonl", MIXED)
    check_mixed(list(iter_jsonl(p, DEFAULTS)))
    check_mixed(list(iter_jsonl(str(p), DEFAULTS, start_index=100)), start=100)


def test_iter_jsonl_skip(tmp_path):
    p = write_bytes(tmp_path, "in.jsonl", MIXED)
    items = list(iter_jsonl(p, DEFAULTS, start_index=10, skip=3))
    assert [it.index for it in items] == list(range(13, 18))
    assert items[0].id == 6 and items[0].error.type == "invalid_encoding"
    assert list(iter_jsonl(p, DEFAULTS, skip=100)) == []


def test_iter_jsonl_stream_and_stdin(tmp_path, monkeypatch):
    check_mixed(list(iter_jsonl(io.BytesIO(MIXED), DEFAULTS)))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MIXED)))
    check_mixed(list(iter_jsonl("-", DEFAULTS)))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MIXED)))
    check_mixed(list(open_input("-", defaults=DEFAULTS)))


def test_iter_jsonl_empty_and_missing(tmp_path):
    assert list(iter_jsonl(write_bytes(tmp_path, "e.jsonl", b""), DEFAULTS)) == []
    assert list(iter_jsonl(write_bytes(tmp_path, "b.jsonl", b"\n \n\r\n"), DEFAULTS)) == []
    with pytest.raises(FileNotFoundError):
        iter_jsonl(tmp_path / "nope.jsonl", DEFAULTS)   # raises at call time, not on next()
    with pytest.raises(ValueError, match="max_tokens"):
        iter_jsonl(io.BytesIO(b""), SamplingParams(max_tokens=0))


class CountingRaw(io.RawIOBase):
    """A raw file that counts the bytes handed out."""

    def __init__(self, path):
        self._f = open(path, "rb", buffering=0)
        self.bytes_read = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self._f.readinto(b)
        self.bytes_read += n or 0
        return n

    def close(self):
        self._f.close()
        super().close()


def test_iter_jsonl_is_lazy(tmp_path):
    line = b'{"id": 1, "prompt": "' + b"x" * 200 + b'"}\n'
    p = tmp_path / "big.jsonl"
    with open(p, "wb") as f:
        f.writelines(line * 1000 for _ in range(20))           # ~4.4 MB
    size = p.stat().st_size
    raw = CountingRaw(p)
    stream = io.BufferedReader(raw, buffer_size=64 * 1024)
    it = iter_jsonl(stream, DEFAULTS)
    assert raw.bytes_read == 0              # nothing read before iteration starts
    first = next(it)
    assert isinstance(first, Request) and first.index == 0
    assert raw.bytes_read <= 128 * 1024 < size
    for _ in range(10):
        next(it)
    assert raw.bytes_read <= 128 * 1024
    it.close()
    assert not stream.closed                # streams passed in are the caller's
    stream.close()


def test_iter_jsonl_closes_owned_file(tmp_path, monkeypatch):
    p = write_bytes(tmp_path, "in.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n')
    opened = []
    real_open = open

    def spy_open(*a, **k):
        f = real_open(*a, **k)
        opened.append(f)
        return f
    monkeypatch.setattr("builtins.open", spy_open)
    it = iter_jsonl(p, DEFAULTS)
    next(it)
    it.close()
    assert opened and all(f.closed for f in opened)


@pytest.mark.parametrize("data,n", [
    (b"", 0), (b"a\n", 1), (b"a", 1), (b"a\nb", 2), (b"\n\n\n", 3), (b"a\n" * 300000, 300000),
])
def test_count_lines(tmp_path, data, n):
    assert count_lines(write_bytes(tmp_path, "c.jsonl", data)) == n


def test_count_lines_stdin():
    assert count_lines("-") is None


def test_open_input_dispatch(tmp_path):
    for ext in (".jsonl", ".json", ".ndjson", ".JSONL"):
        p = write_bytes(tmp_path, "in" + ext, b'{"prompt": "a"}\n')
        items = list(open_input(p, defaults=DEFAULTS, start_index=4))
        assert len(items) == 1 and items[0].index == 4 and items[0].id == 1
    p = write_bytes(tmp_path, "in.txt", b'{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="not supported"):
        open_input(p, defaults=DEFAULTS)
    assert len(list(open_input(p, fmt="jsonl", defaults=DEFAULTS))) == 1
    with pytest.raises(ValueError, match="not supported"):
        open_input(p, fmt="csv", defaults=DEFAULTS)
    assert readers.READERS["jsonl"] is iter_jsonl


# ------------------------------------------------------------------ writers

def res(i, id=None, text="t"):
    return Result(index=i, id=i if id is None else id, text=text, token_ids=[1, 2],
                  finish_reason="stop", prompt_tokens=3)


def read_records(p):
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]


def test_jsonl_writer_format(tmp_path):
    p = tmp_path / "out.jsonl"
    err_res = Result(index=1, id="e", error=ErrorInfo("invalid_json", "bad"))
    with JsonlWriter(p) as w:
        w.write(res(0, id=7, text="héllo 日本"))
        w.write(err_res)
        w.write(Result(index=2, id="\ud800x", text="a"))   # unpaired surrogate id still writes
    data = p.read_bytes()
    assert data.splitlines()[0].decode() == json.dumps(res(0, id=7, text="héllo 日本").to_record(),
                                                       ensure_ascii=False)
    recs = read_records(p)
    assert recs[0] == res(0, id=7, text="héllo 日本").to_record() and isinstance(recs[0]["id"], int)
    assert recs[1] == err_res.to_record()
    assert recs[2]["id"] == "\ud800x"
    # append mode
    with JsonlWriter(p) as w:
        w.write(res(3))
    assert len(read_records(p)) == 4


def test_jsonl_writer_fsyncs(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    p = tmp_path / "out.jsonl"
    w = JsonlWriter(p, flush_every_records=3, flush_every_seconds=1e9)
    fd = w._f.fileno()
    file_syncs = lambda: sum(1 for c in calls if c == fd)
    for i in range(7):
        w.write(res(i))
    assert file_syncs() == 2                      # after records 3 and 6
    assert len(read_records(p)) == 6              # the 7th is still buffered
    w.close()
    assert file_syncs() == 3 and len(read_records(p)) == 7
    w.close()                                     # idempotent
    with pytest.raises(ValueError):
        w.write(res(8))


def test_jsonl_writer_time_flush(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    now = [1000.0]
    monkeypatch.setattr(writers.time, "monotonic", lambda: now[0])
    p = tmp_path / "out.jsonl"
    with JsonlWriter(p, flush_every_records=1000, flush_every_seconds=5.0) as w:
        fd = w._f.fileno()
        w.write(res(0))
        assert fd not in calls
        now[0] += 6
        w.write(res(1))
        assert calls.count(fd) == 1 and len(read_records(p)) == 2
    assert calls.count(fd) == 1                   # nothing new to sync on close


def test_ordered_writer_reorders(tmp_path):
    p = tmp_path / "out.jsonl"
    order = [3, 0, 2, 5, 1, 4, 7, 6]
    with OrderedWriter(JsonlWriter(p), start_index=0) as w:
        for i in order:
            w.write(res(i, id=f"r{i}"))
            assert w.pending == len([j for j in order[:order.index(i) + 1] if j >= w.next_index])
    assert [r["id"] for r in read_records(p)] == [f"r{i}" for i in range(8)]


class ListWriter:
    def __init__(self):
        self.items, self.closed = [], False

    def write(self, r):
        self.items.append(r.index)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_ordered_writer_start_index_and_guards():
    inner = ListWriter()
    w = OrderedWriter(inner, start_index=10, max_pending=2)
    w.write(res(12))
    w.write(res(11))
    assert inner.items == [] and w.pending == 2
    with pytest.raises(ReorderOverflow, match="max_pending"):
        w.write(res(13))
    w.write(res(10))
    assert inner.items == [10, 11, 12] and w.pending == 0 and w.next_index == 13
    with pytest.raises(ValueError, match="duplicate"):
        w.write(res(11))
    w.write(res(14))
    with pytest.raises(ValueError, match="duplicate"):
        w.write(res(14))
    with pytest.raises(RuntimeError, match="index 13 never arrived"):
        w.close()
    assert inner.closed and inner.items == [10, 11, 12]


def test_ordered_writer_exit_does_not_mask_error():
    inner = ListWriter()
    with pytest.raises(KeyError), OrderedWriter(inner) as w:
        w.write(res(1))
        raise KeyError("boom")
    assert inner.closed


def test_recover_missing_and_clean(tmp_path):
    assert recover_jsonl(tmp_path / "none.jsonl") == (0, 0)
    p = tmp_path / "out.jsonl"
    p.write_bytes(b"")
    assert recover_jsonl(p) == (0, 0)
    with JsonlWriter(p) as w:
        for i in range(5):
            w.write(res(i))
    size = p.stat().st_size
    assert recover_jsonl(p) == (5, size) and p.stat().st_size == size


@pytest.mark.parametrize("tail", [
    b'{"id": 5, "text": "hal',        # torn mid-record
    b'{"id": 5, "text": "x"}',        # complete JSON but no newline
    b'\x00\x00\x00\x00',              # zero-filled tail
    b'{"id": 5, "te\n',               # newline but not valid JSON
    b'\xff\xfe garbage\n',            # not UTF-8
])
def test_recover_truncates_torn_last_line(tmp_path, tail):
    p = tmp_path / "out.jsonl"
    with JsonlWriter(p) as w:
        for i in range(5):
            w.write(res(i))
    good = p.stat().st_size
    with open(p, "ab") as f:
        f.write(tail)
    assert recover_jsonl(p) == (5, good)
    assert p.stat().st_size == good
    assert [r["id"] for r in read_records(p)] == [0, 1, 2, 3, 4]
    # resuming appends cleanly
    with JsonlWriter(p) as w:
        w.write(res(5))
    assert recover_jsonl(p) == (6, p.stat().st_size)


def test_recover_refuses_corruption_in_the_middle(tmp_path):
    p = tmp_path / "out.jsonl"
    data = b'{"id": 0}\n{"id": 1, "te\n{"id": 2}\n'
    p.write_bytes(data)
    with pytest.raises(ValueError, match="line 2"):
        recover_jsonl(p)
    assert p.read_bytes() == data


def test_resume_round_trip(tmp_path):
    """recover count + iter_jsonl(skip=) resumes exactly where the output stopped."""
    inp = write_bytes(tmp_path, "in.jsonl", b"".join(
        b'{"id": %d, "prompt": "p"}\n\n' % i for i in range(10)))
    out = tmp_path / "out.jsonl"
    with OrderedWriter(JsonlWriter(out)) as w:
        for it in list(iter_jsonl(inp, DEFAULTS))[:4]:
            w.write(Result(index=it.index, id=it.id, text="done"))
    with open(out, "ab") as f:
        f.write(b'{"id": 4, "te')
    n, _ = recover_jsonl(out)
    assert n == 4
    with OrderedWriter(JsonlWriter(out), start_index=n) as w:
        for it in iter_jsonl(inp, DEFAULTS, skip=n):
            w.write(Result(index=it.index, id=it.id, text="done"))
    assert [r["id"] for r in read_records(out)] == list(range(10))


def test_duplicate_ids_match_a_python_set():
    """The compact id-hash set and the chunked check report exactly the repeats a plain set finds, also across
    chunk boundaries, within one chunk, and against ids seen before (a resumed output's)."""
    import random

    from mpiinfer.config import SamplingParams
    from mpiinfer.coordinator import DuplicateIds, IdHashes
    from mpiinfer.io.resume import id_hash
    from mpiinfer.messages import Request, Result
    rng = random.Random(3)
    before = [f"id{rng.randrange(3000)}" for _ in range(500)]
    ids = [rng.choice([f"id{rng.randrange(3000)}", rng.randrange(400)]) for _ in range(5000)]
    items = [Request(index=i, id=x, sampling=SamplingParams(), prompt="p") if i % 97 else
             Result(index=i, id=x) for i, x in enumerate(ids)]
    seen, want = set(before), []
    for it in items:
        if isinstance(it, Request):
            if it.id in seen:
                want.append(it.index)
            seen.add(it.id)
    d = DuplicateIds("jsonl", [id_hash(x) for x in before])
    got = []
    d._report = lambda item, key: got.append(item.index)
    assert [it.index for it in d.check(items)] == list(range(5000))      # every item passes, in order
    assert got == want and len(want) > 1000
    s = IdHashes()
    import numpy as np
    for lo in range(0, 3000, 7):
        s.add(np.sort(np.arange(lo, min(lo + 7, 3000), dtype=np.int64) * 11))
    assert len(s) == 3000 and s.contains(np.array([0, 11, 32989, 5, 33000])).tolist() == [True, True, True, False, False]
