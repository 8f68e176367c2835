"""`mpiinfer run` end to end: formats, bad input records, bad checkpoints, resume, env vars."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mpiinfer.cli import main


def run_cli(args, env=None):
    r = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    return r.exit_code, r.output


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mpiinfer.tools.init_model import init_model
    return init_model(str(tmp_path_factory.mktemp("m") / "llama"), arch="llama", preset="tiny")


def write(path, lines):
    with open(path, "wb") as f:
        f.writelines(line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines)
    return str(path)


def test_formats_and_bad_records(tiny, tmp_path):
    long_prompt = " ".join(["word"] * 3000)
    inp = write(tmp_path / "in.jsonl", [
        '{"id": "a", "prompt": "Hello there"}',
        '{"prompt": "no id here", "max_tokens": 3}',
        '{"id": 7, "messages": [{"role": "user", "content": "Hi"}]}',
        '{"id": "tok", "prompt_token_ids": [5, 6, 7], "logprobs": true, "max_tokens": 4}',
        '{"id": "bad json", "prompt": ',
        '{"id": "missing"}',
        '{"id": "empty", "prompt": ""}',
        json.dumps({"id": "long", "prompt": long_prompt}),
        '{"id": "neg", "prompt": "x", "max_tokens": -1}',
        '{"id": "temp", "prompt": "x", "temperature": "hot"}',
        '{"id": "typo", "prompt": "x", "temprature": 0.5}',
        b'{"id": "utf8", "prompt": "\xff\xfe"}\n',
        '{"id": "vocab", "prompt_token_ids": [99999999]}',
        '',
        '{"id": "last", "prompt": "The end"}',
    ])
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["run", "-m", tiny, "-i", inp, "-o", out, "--max-tokens", "6", "--max-seq-len", "1024"])
    assert code == 0, text
    recs = read_jsonl(out)
    ids = [r["id"] for r in recs]
    assert ids == ["a", 2, 7, "tok", 5, "missing", "empty", "long", "neg", "temp", "typo", 12, "vocab", "last"]
    by = {r["id"]: r for r in recs}
    for k in ("a", 2, 7, "tok", "last"):
        assert "error" not in by[k], by[k]
        assert by[k]["finish_reason"] in ("stop", "length")
        assert by[k]["usage"]["completion_tokens"] == len(by[k]["token_ids"]) > 0
    assert by[2]["usage"]["completion_tokens"] <= 3
    assert len(by["tok"]["logprobs"]) == len(by["tok"]["token_ids"])
    assert by["tok"]["usage"]["prompt_tokens"] == 3
    assert "logprobs" not in by["a"]
    expect = {5: ("invalid_json", "JSON"), "missing": ("invalid_request", "prompt"),
              "empty": ("invalid_request", "empty"), "long": ("prompt_too_long", "tokens"),
              "neg": ("invalid_request", "max_tokens"), "temp": ("invalid_request", "temperature"),
              "typo": ("invalid_request", "temprature"), 12: ("invalid_encoding", "UTF-8"),
              "vocab": ("invalid_request", "vocab")}
    for k, (typ, word) in expect.items():
        assert by[k]["error"]["type"] == typ, by[k]
        assert word.lower() in by[k]["error"]["message"].lower(), by[k]


def test_resume_and_finished_noop(tiny, tmp_path):
    inp = write(tmp_path / "in.jsonl", [json.dumps({"id": i, "prompt": f"prompt number {i}"}) for i in range(12)])
    out = str(tmp_path / "out.jsonl")
    code, _ = run_cli(["run", "-m", tiny, "-i", inp, "-o", out, "--max-tokens", "5"])
    assert code == 0
    full = read_jsonl(out)
    # simulate a crash: keep 5 records and a torn sixth line
    with open(out) as f:
        lines = f.readlines()
    with open(out, "w") as f:
        f.writelines(lines[:5])
        f.write(lines[5][:10])
    code, text = run_cli(["run", "-m", tiny, "-i", inp, "-o", out, "--max-tokens", "5"])
    assert code == 0, text
    assert read_jsonl(out) == full
    code, text = run_cli(["run", "-m", tiny, "-i", inp, "-o", out, "--max-tokens", "5"])
    assert code == 0 and "nothing to do" in text
    assert read_jsonl(out) == full
    code, _ = run_cli(["run", "-m", tiny, "-i", inp, "-o", out, "--max-tokens", "2", "--overwrite"])
    assert code == 0
    assert all(len(r["token_ids"]) <= 2 for r in read_jsonl(out))


def test_env_vars_set_options(tiny, tmp_path):
    inp = write(tmp_path / "in.jsonl", ['{"prompt": "hello"}'])
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["run", "-i", inp, "-o", out],
                         env={"MPIINFER_MODEL": tiny, "MPIINFER_MAX_TOKENS": "3", "MPIINFER_IGNORE": "1"})
    assert code == 0, text
    assert read_jsonl(out)[0]["usage"]["completion_tokens"] <= 3


def _bad_model(tiny, tmp_path, mutate):
    d = tmp_path / "bad"
    shutil.copytree(tiny, d)
    mutate(d)
    return str(d)


def _rewrite_tensors(d, fn):
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def _set_cfg(d, **kw):
    p = d / "config.json"
    c = json.loads(p.read_text())
    c.update(kw)
    p.write_text(json.dumps(c))


BAD_CHECKPOINTS = {
    "pickle": (lambda d: (os.remove(d / "model.safetensors"), (d / "pytorch_model.bin").write_bytes(b"x")),
               "never unpickles"),
    "arch": (lambda d: _set_cfg(d, architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    "missing": (lambda d: _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                "missing 1 tensor(s): model.layers.1.mlp.up_proj.weight"),
    "shape": (lambda d: _rewrite_tensors(d, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"][:-1])),
              "model.norm.weight has shape"),
    "unexpected": (lambda d: _rewrite_tensors(d, lambda t: t.__setitem__("model.extra.weight", t["model.norm.weight"].clone())),
                   "unexpected 1 tensor(s): model.extra.weight"),
    "no_config": (lambda d: os.remove(d / "config.json"), "has no config.json"),
    "truncated": (lambda d: open(d / "model.safetensors", "r+b").truncate(1000), "truncated"),
    "no_tokenizer": (lambda d: os.remove(d / "tokenizer.json"), "no tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_refused(case, tiny, tmp_path):
    mutate, message = BAD_CHECKPOINTS[case]
    d = _bad_model(tiny, tmp_path, mutate)
    inp = write(tmp_path / "in.jsonl", ['{"prompt": "hello"}'])
    out = tmp_path / "out.jsonl"
    code, text = run_cli(["run", "-m", d, "-i", inp, "-o", str(out)])
    assert code == 2, text
    assert message in text, text
    assert "Traceback" not in text
    assert not out.exists() or out.read_text() == ""


def test_real_console_script_and_mpiexec(tiny, tmp_path):
    inp = write(tmp_path / "in.jsonl", ['{"id": 1, "prompt": "hello"}', '{"id": 2, "prompt": "world"}'])
    outs = []
    for launcher in ([], [shutil.which("mpiexec") or pytest.skip("no mpiexec"), "-n", "1"]):
        out = tmp_path / f"out{len(outs)}.jsonl"
        cmd = launcher + [sys.executable, "-m", "mpiinfer", "run", "-m", tiny, "-i", inp, "-o", str(out),
                          "--max-tokens", "8"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        outs.append(read_jsonl(out))
    assert outs[0] == outs[1]
    assert [r["id"] for r in outs[0]] == [1, 2]


def test_long_run_of_bad_lines_then_good(tiny, tmp_path):
    """Hundreds of consecutive malformed lines (more than a batch) must not stall the reader."""
    inp = write(tmp_path / "in.jsonl", [f'{{"id": {i}, "prompt": ""}}' for i in range(300)]
                + ['{"id": "good", "prompt": "the sea"}'])
    out = tmp_path / "out.jsonl"
    code, text = run_cli(["run", "-m", tiny, "-i", inp, "-o", str(out), "--max-tokens", "3", "--max-batch", "4"])
    assert code == 0, text
    recs = read_jsonl(out)
    assert len(recs) == 301 and all("error" in r for r in recs[:300]) and "error" not in recs[300]


def test_null_engine_runs_without_a_model(tmp_path):
    """--engine null: every record gets --max-tokens made-up tokens, in input order, with no checkpoint;
    parse errors stay error records; resume checks work as with a model; --model is required otherwise."""
    inp = write(tmp_path / "in.jsonl", [json.dumps({"id": f"r{i}", "prompt": "p" * (i + 1)}) for i in range(300)]
                + ['{"id": "bad", "prompt": ', '{"id": "five", "prompt": "x", "max_tokens": 5}'])
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["run", "--engine", "null", "-i", inp, "-o", out, "--max-tokens", "3", "--max-batch", "7"])
    assert code == 0, text
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(300)] + [301, "five"]
    assert all(r["token_ids"] == [0, 1, 2] and r["text"] == "abc" for r in recs[:300]), recs[:2]
    assert recs[7]["usage"] == {"prompt_tokens": 8, "completion_tokens": 3}
    assert recs[300]["error"]["type"] == "invalid_json" and recs[301]["text"] == "abcde"
    summary = json.load(open(out + ".summary.json"))
    assert summary["records"] == 302 and summary["errors"] == 1 and summary["rank0_cpu_s"] > 0
    # resuming works as with a model: the finished output is a no-op, other options are refused
    code, text = run_cli(["run", "--engine", "null", "-i", inp, "-o", out, "--max-tokens", "3"])
    assert code == 0 and "nothing to do" in text
    code, text = run_cli(["run", "--engine", "null", "-i", inp, "-o", out, "--max-tokens", "4"])
    assert code == 2 and "max_tokens" in text
    code, text = run_cli(["run", "-i", inp, "-o", str(tmp_path / "o2.jsonl")])
    assert code == 2 and "--model" in text


def test_duplicate_ids_are_kept_apart_and_reported(tmp_path):
    """Records that repeat an id (or an OpenAI custom_id) are computed and written each at its own position,
    named in the log and counted in the summary, also across a resume."""
    recs = [{"id": i, "prompt": f"p{i}"} for i in ["a", "b", "a", "c", 5, "b"]] + [{"prompt": "no id: line 7"}]
    inp = write(tmp_path / "in.jsonl", [json.dumps(r) for r in recs] + [json.dumps({"id": 7, "prompt": "x"})])
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["run", "--engine", "null", "-i", inp, "-o", out, "--max-tokens", "2"])
    assert code == 0, text
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "a", "c", 5, "b", 7, 7]
    assert "input record 3 has the id 'a' of an earlier record" in text and "record 6 has the id 'b'" in text
    assert json.load(open(out + ".summary.json"))["duplicate_ids"] == 3   # a, b, and the 7 of line 7
    # resumed after 4 records: the repeats after them are still noticed, against the output's ids
    lines = open(out).readlines()
    open(out, "w").writelines(lines[:4])
    code, text = run_cli(["run", "--engine", "null", "-i", inp, "-o", out, "--max-tokens", "2"])
    assert code == 0, text
    assert json.load(open(out + ".summary.json"))["duplicate_ids"] == 2 and open(out).readlines() == lines
    # OpenAI batch input: custom_id
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    oin = write(tmp_path / "batch.jsonl", [json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                                                       "body": body}) for c in ["x", "y", "x"]])
    oout = str(tmp_path / "batch_out.jsonl")
    code, text = run_cli(["run", "--engine", "null", "-i", oin, "-o", oout, "--max-tokens", "2"])
    assert code == 0, text
    assert [r["custom_id"] for r in read_jsonl(oout)] == ["x", "y", "x"]
    assert len({r["id"] for r in read_jsonl(oout)}) == 3            # the response ids stay distinct
    assert json.load(open(oout + ".summary.json"))["duplicate_ids"] == 1 and "'x'" in text
