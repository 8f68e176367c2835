"""Every input and output format through `mpiinfer run`, including resume of a cut-short output."""
import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from mpiinfer.cli import main


def run(args):
    r = CliRunner().invoke(main, ["run"] + args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def tiny(model_dirs):
    return model_dirs("llama")


def test_text_dir_with_template(tiny, tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("The sea was calm that night.")
    (docs / "sub" / "b.md").write_text("# Notes\nSalt and wind.")
    out = tmp_path / "o.jsonl"
    run(["-m", tiny, "-i", str(docs), "-o", str(out), "--max-tokens", "4", "--prompt-template",
         "Summarize:\\n{document}"])
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["a.txt"]   # not recursive by default
    from mpiinfer.tokenizer import Tokenizer
    n = len(Tokenizer(tiny).encode("Summarize:\nThe sea was calm that night."))
    assert recs[0]["usage"]["prompt_tokens"] == n
    summary = json.loads((tmp_path / "o.jsonl.summary.json").read_text())
    assert summary["records"] == 1 and summary["completion_tokens"] == recs[0]["usage"]["completion_tokens"]


def test_openai_batch_roundtrip_and_resume(tiny, tmp_path):
    inp = tmp_path / "batch.jsonl"
    with open(inp, "w") as f:
        for i in range(6):
            body = ({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 5} if i % 2 else
                    {"model": "m", "prompt": f"p{i}", "max_tokens": 4, "logprobs": 0})
            url = "/v1/chat/completions" if i % 2 else "/v1/completions"
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}) + "\n")
        f.write(json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings", "body": {}}) + "\n")
        f.write(json.dumps({"custom_id": "other", "method": "POST", "url": "/v1/completions",
                            "body": {"model": "another-model", "prompt": "x"}}) + "\n")
    out = tmp_path / "out.jsonl"
    run(["-m", tiny, "-i", str(inp), "-o", str(out), "--served-model-name", "m"])
    full = out.read_text()
    recs = [json.loads(x) for x in full.splitlines()]
    assert [r["custom_id"] for r in recs] == [f"c{i}" for i in range(6)] + ["bad", "other"]
    for i, r in enumerate(recs[:6]):
        body = r["response"]["body"]
        assert r["error"] is None and r["response"]["status_code"] == 200
        assert body["object"] == ("chat.completion" if i % 2 else "text_completion")
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert recs[6]["response"]["status_code"] == 400 and recs[6]["error"]["error"]["type"] == "invalid_request"
    e = recs[7]["error"]["error"]                      # a model this job does not serve: vLLM's 404
    assert recs[7]["response"]["status_code"] == 404 and e["param"] == "model" and "another-model" in e["message"]
    assert {r["response"]["body"]["model"] for r in recs[:6]} == {"m"}
    # cut the output short (torn line) and resume: byte-identical file
    out.write_text(full[:len(full) // 2])
    run(["-m", tiny, "-i", str(inp), "-o", str(out), "--served-model-name", "m"])
    assert out.read_text() == full
    # the model directory's own name is served when no --served-model-name is given
    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": os.path.basename(tiny), "prompt": "x", "max_tokens": 2}}) + "\n")
    run(["-m", tiny, "-i", str(named), "-o", str(tmp_path / "named_out.jsonl")])
    rec = json.loads((tmp_path / "named_out.jsonl").read_text())
    assert rec["error"] is None and rec["response"]["body"]["model"] == os.path.basename(tiny)


def test_hdf5_in_and_out_with_resume(tiny, tmp_path):
    inp = tmp_path / "in.h5"
    rng = np.random.default_rng(0)
    with h5py.File(inp, "w") as f:
        ds = f.create_dataset("input_ids", (12,), dtype=h5py.vlen_dtype(np.int64))
        for i in range(12):
            ds[i] = rng.integers(0, 500, size=int(rng.integers(1, 30)))
    out_jsonl = tmp_path / "o.jsonl"
    run(["-m", tiny, "-i", str(inp), "-o", str(out_jsonl), "--max-tokens", "6"])
    recs = [json.loads(x) for x in out_jsonl.read_text().splitlines()]
    assert len(recs) == 12 and all("error" not in r for r in recs)
    out_h5 = tmp_path / "o.h5"
    run(["-m", tiny, "-i", str(inp), "-o", str(out_h5), "--max-tokens", "6"])
    with h5py.File(out_h5, "r") as f:
        toks = [list(x) for x in f["token_ids"][:]]
    assert toks == [r["token_ids"] for r in recs]
    # truncate the HDF5 output to 5 rows and resume
    with h5py.File(out_h5, "a") as f:
        for name in f:
            f[name].resize((5,) + f[name].shape[1:])
    run(["-m", tiny, "-i", str(inp), "-o", str(out_h5), "--max-tokens", "6"])
    with h5py.File(out_h5, "r") as f:
        assert [list(x) for x in f["token_ids"][:]] == toks


def test_jsonl_messages_written_as_chat_completions(tiny, tmp_path):
    """A JSONL record with messages becomes a chat completion in an OpenAI batch output, a prompt a text one;
    `created` is the job's start (kept on resume), not the input file's time."""
    import time
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) + "\n"
                   + json.dumps({"id": "p", "prompt": "the sea", "max_tokens": 3}) + "\n")
    os.utime(inp, (1_000_000_000, 1_000_000_000))
    out = tmp_path / "out.jsonl"
    t0 = int(time.time())
    run(["-m", tiny, "-i", str(inp), "-o", str(out), "--output-format", "openai"])
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["response"]["body"]["object"] for r in recs] == ["chat.completion", "text_completion"]
    assert "message" in recs[0]["response"]["body"]["choices"][0]
    assert all(r["response"]["body"]["created"] >= t0 for r in recs)


def test_hdf5_output_with_nul_in_ids_resumes(tiny, tmp_path):
    """HDF5 stores a NUL of an id as U+FFFD: the resume check compares ids the same way."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"a\u0000{i}", "prompt": "the sea", "max_tokens": 3}) + "\n"
                           for i in range(6)))
    out = tmp_path / "o.h5"
    run(["-m", tiny, "-i", str(inp), "-o", str(out)])
    with h5py.File(out, "r") as f:
        full = [list(x) for x in f["token_ids"][:]]
    with h5py.File(out, "a") as f:
        for name in f:
            f[name].resize((3,) + f[name].shape[1:])
    run(["-m", tiny, "-i", str(inp), "-o", str(out)])
    with h5py.File(out, "r") as f:
        assert [list(x) for x in f["token_ids"][:]] == full
        assert [x.decode() for x in f["ids"][:]] == [f"a\ufffd{i}" for i in range(6)]


def test_n_samples_in_jsonl_openai_and_hdf5_outputs(tiny, tmp_path):
    """n = 3 comes back as a JSONL ``choices`` list and as OpenAI ``choices[i]``; HDF5 output (one sample per
    record) makes it an error record and the job goes on; the summary counts every sample's tokens."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "the sea", "n": 3, "temperature": 0.8, "seed": 4,
                               "max_tokens": 5, "ignore_eos": True}) + "\n"
                   + json.dumps({"id": "b", "prompt": "old man", "max_tokens": 5, "ignore_eos": True}) + "\n")
    out = tmp_path / "o.jsonl"
    run(["-m", tiny, "-i", str(inp), "-o", str(out)])
    a, b = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(a["choices"]) == 3 and "text" not in a and "text" in b and "choices" not in b
    assert a["usage"]["completion_tokens"] == 15 and all(len(c["token_ids"]) == 5 for c in a["choices"])
    assert json.loads((tmp_path / "o.jsonl.summary.json").read_text())["completion_tokens"] == 20
    oa = tmp_path / "o_openai.jsonl"
    run(["-m", tiny, "-i", str(inp), "-o", str(oa), "--output-format", "openai"])
    ch = json.loads(oa.read_text().splitlines()[0])["response"]["body"]["choices"]
    assert [c["index"] for c in ch] == [0, 1, 2]
    assert [c["text"] for c in ch] == [c["text"] for c in a["choices"]]
    h5 = tmp_path / "o.h5"
    with open(inp, "a") as f:            # alternatives too: JSONL and OpenAI outputs hold them, HDF5 refuses
        f.write(json.dumps({"id": "c", "prompt": "blue sky", "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
                + "\n")
    run(["-m", tiny, "-i", str(inp), "-o", str(h5)])
    with h5py.File(h5, "r") as f:
        assert f["error_type"][0].decode() == "invalid_request" and "n=3" in f["error_message"][0].decode()
        assert f["error_type"][1].decode() == "" and len(f["token_ids"][1]) == 5
        assert f["error_type"][2].decode() == "invalid_request" and "top_logprobs" in f["error_message"][2].decode()
    out2 = tmp_path / "o2.jsonl"
    run(["-m", tiny, "-i", str(inp), "-o", str(out2)])
    c = json.loads(out2.read_text().splitlines()[2])
    assert len(c["top_logprobs"]) == 3 and all(len(p) == 2 for p in c["top_logprobs"])
    assert [p[0]["token_id"] for p in c["top_logprobs"]] == c["token_ids"]


def test_prompt_scoring_in_jsonl_and_hdf5_refused_in_openai(tiny, tmp_path):
    """max_tokens 0 with prompt_logprobs scores a prompt alone; an HDF5 output holds the same arrays, an OpenAI
    output (which has echo for that) refuses it per record; an output made before these datasets resumes."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "s", "prompt": "the old man and the sea", "max_tokens": 0, "prompt_logprobs": True})
                   + "\n" + json.dumps({"id": "g", "prompt": "blue sky", "max_tokens": 2}) + "\n")
    out = tmp_path / "o.jsonl"
    run(["-m", tiny, "-i", str(inp), "-o", str(out)])
    s, g = [json.loads(x) for x in out.read_text().splitlines()]
    n = s["usage"]["prompt_tokens"]
    assert len(s["prompt_logprobs"]) == n and s["prompt_logprobs"][0] is None and s["token_ids"] == []
    assert s["prompt_logprob_sum"] == pytest.approx(sum(s["prompt_logprobs"][1:]))
    assert s["prompt_perplexity"] > 1 and "prompt_logprobs" not in g
    oa = tmp_path / "o_openai.jsonl"
    run(["-m", tiny, "-i", str(inp), "-o", str(oa), "--output-format", "openai"])
    s, g = [json.loads(x) for x in oa.read_text().splitlines()]
    assert s["error"]["error"]["type"] == "invalid_request" and "echo" in s["error"]["error"]["message"]
    assert g["error"] is None
    # echo needs an OpenAI output (JSONL and HDF5 records have no place for the echoed prompt)
    ob = tmp_path / "echo.jsonl"
    ob.write_text(json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/completions",
                              "body": {"prompt": "the sea", "max_tokens": 2, "echo": True}}) + "\n")
    run(["-m", tiny, "-i", str(ob), "-o", str(tmp_path / "echo_out.jsonl"), "--output-format", "jsonl"])
    e = json.loads((tmp_path / "echo_out.jsonl").read_text())
    assert e["error"]["type"] == "invalid_request" and "echo: written to OpenAI outputs only" in e["error"]["message"]
    from mpiinfer.io.hdf5 import ADDED_DATASETS, read_hdf5_results
    h5 = tmp_path / "o.h5"
    run(["-m", tiny, "-i", str(inp), "-o", str(h5)])
    want = [json.loads(x) for x in out.read_text().splitlines()]
    with h5py.File(h5, "r") as f:
        assert f["prompt_logprob_sum"][0] == pytest.approx(want[0]["prompt_logprob_sum"], abs=1e-4)
        assert f["prompt_perplexity"][0] == pytest.approx(want[0]["prompt_perplexity"], rel=1e-4)
        assert np.isnan(f["prompt_logprob_sum"][1]) and np.isnan(f["prompt_perplexity"][1])
        assert np.isnan(f["prompt_logprobs"][0][0]) and len(f["prompt_logprobs"][1]) == 0
    back = read_hdf5_results(h5)
    assert back[0].prompt_logprobs[0] is None
    assert back[0].prompt_logprobs[1:] == pytest.approx(want[0]["prompt_logprobs"][1:], abs=1e-5)
    # an output written before the datasets were added: they are added (empty rows) when it resumes
    with h5py.File(h5, "r+") as f:
        for k in ADDED_DATASETS:
            del f[k]
        for k in f:
            f[k].resize((1,))
    run(["-m", tiny, "-i", str(inp), "-o", str(h5)])
    with h5py.File(h5, "r") as f:
        assert f["text"].shape == f["prompt_perplexity"].shape == (2,)
        assert np.isnan(f["prompt_perplexity"][0]) and f["text"][1].decode() == want[1]["text"]
