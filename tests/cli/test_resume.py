"""Resume proves it continues the same job (manifest, ids), and finished work is never recomputed or lost (the
completion journal), whatever stops the job."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from mpiinfer import coordinator
from mpiinfer.cli import main
from mpiinfer.io.resume import journal_path, manifest_path, read_journal, result_to_json


def run_cli(args):
    r = CliRunner().invoke(main, ["run"] + args, catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mpiinfer.tools.init_model import init_model
    return init_model(str(tmp_path_factory.mktemp("m") / "llama"), arch="llama", preset="tiny")


def write_input(path, n, prefix="p", max_tokens=None):
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"{prefix}{i}", "prompt": f"the sea and the sky number {i}"}
            if max_tokens is not None:
                rec["max_tokens"] = max_tokens(i)
            f.write(json.dumps(rec) + "\n")
    return str(path)


def test_another_input_is_refused_before_loading(tiny, tmp_path):
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["-m", tiny, "-i", write_input(tmp_path / "a.jsonl", 3), "-o", out, "--max-tokens", "3"])
    assert code == 0, text
    before = open(out).read()
    # a different input of 6 records: it used to write p0,p1,p2,other-3,other-4,other-5 with exit 0
    code, text = run_cli(["-m", tiny, "-i", write_input(tmp_path / "b.jsonl", 6, "other-"), "-o", out,
                          "--max-tokens", "3"])
    assert code == 2, text
    assert "cannot be resumed" in text and "--overwrite" in text and "loaded" not in text
    assert open(out).read() == before
    # the same input, longer: refused too (it is another input)
    code, text = run_cli(["-m", tiny, "-i", write_input(tmp_path / "a.jsonl", 5), "-o", out, "--max-tokens", "3"])
    assert code == 2 and "bytes" in text, text
    # --overwrite starts over
    code, text = run_cli(["-m", tiny, "-i", str(tmp_path / "b.jsonl"), "-o", out, "--max-tokens", "3",
                          "--overwrite"])
    assert code == 0, text
    assert [json.loads(x)["id"] for x in open(out)] == [f"other-{i}" for i in range(6)]


def test_a_short_input_against_a_long_output_is_refused(tiny, tmp_path):
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["-m", tiny, "-i", write_input(tmp_path / "a.jsonl", 120), "-o", out, "--max-tokens", "1"])
    assert code == 0, text
    code, text = run_cli(["-m", tiny, "-i", write_input(tmp_path / "b.jsonl", 5), "-o", out, "--max-tokens", "1"])
    assert code == 2 and "nothing to do" not in text, text


@pytest.mark.parametrize("flag,value,name", [("--max-tokens", "4", "max_tokens"), ("--seed", "9", "seed"),
                                             ("--temperature", "0.5", "temperature"),
                                             ("--kv-dtype", "bfloat16", "kv_dtype")])
def test_other_options_are_refused(tiny, tmp_path, flag, value, name):
    inp, out = write_input(tmp_path / "a.jsonl", 4), str(tmp_path / "out.jsonl")
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", out, "--max-tokens", "3"])
    assert code == 0, text
    lines = open(out).readlines()
    with open(out, "w") as f:
        f.writelines(lines[:2])                     # as if stopped after two records
    args = ["-m", tiny, "-i", inp, "-o", out, "--max-tokens", "3"]
    code, text = run_cli(args + [flag, value])
    assert code == 2 and name in text, text
    code, text = run_cli(args)                      # the same options resume
    assert code == 0, text
    assert open(out).readlines() == lines


def test_without_a_manifest_the_ids_are_checked(tiny, tmp_path):
    """An output from before manifests existed: the ids of its records must be the input's."""
    inp, out = write_input(tmp_path / "a.jsonl", 4), str(tmp_path / "out.jsonl")
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", out, "--max-tokens", "3"])
    assert code == 0, text
    full = open(out).read()
    lines = full.splitlines(keepends=True)
    with open(out, "w") as f:
        f.writelines(lines[:2])
    os.remove(manifest_path(out))
    other = write_input(tmp_path / "b.jsonl", 4, "q")
    code, text = run_cli(["-m", tiny, "-i", other, "-o", out, "--max-tokens", "3"])
    assert code == 2 and "has id 'p0' but input record 1 has id 'q0'" in text, text
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", out, "--max-tokens", "3"])
    assert code == 0, text
    assert open(out).read() == full


def test_journaled_results_are_written_not_recomputed(tiny, tmp_path):
    inp, out = write_input(tmp_path / "a.jsonl", 10), str(tmp_path / "out.jsonl")
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", out, "--max-tokens", "4"])
    assert code == 0, text
    assert not os.path.exists(journal_path(out))    # a finished job leaves no journal
    full = open(out).read().splitlines(keepends=True)
    # a stopped job: 3 records in order in the output, the finished records 5, 7, 8 only in the journal
    with open(out, "w") as f:
        f.writelines(full[:3])
    marked = {}
    with open(journal_path(out), "w") as f:
        for i in (5, 7, 8):
            rec = json.loads(full[i])
            rec["text"] = f"FROM THE JOURNAL {i}"      # what a recomputation could never produce
            marked[i] = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(json.dumps({"index": i, "id": rec["id"], "text": rec["text"], "token_ids": rec["token_ids"],
                                "finish_reason": rec["finish_reason"],
                                "prompt_tokens": rec["usage"]["prompt_tokens"], "logprobs": None, "error": None,
                                "extra": {}, "ttft": None, "latency": None}) + "\n")
        f.write('{"index": 9, "id": "p9", "te')       # a torn last line is ignored
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", out, "--max-tokens", "4"])
    assert code == 0, text
    got = open(out).read().splitlines(keepends=True)
    assert got == [marked.get(i, full[i]) for i in range(10)]
    summary = json.load(open(out + ".summary.json"))
    assert summary["restored_from_journal"] == 3 and summary["records"] == 10 - 3 - 3
    assert not os.path.exists(journal_path(out))


def test_results_waiting_beyond_memory_wait_in_the_journal(tiny, tmp_path, monkeypatch):
    """Record 0 is slow (many tokens), the others finish first and wait for it; with room for only 2 waiting
    results in memory the rest wait in the journal only.  Same bytes as with all of them in memory."""
    inp = write_input(tmp_path / "a.jsonl", 24, max_tokens=lambda i: 60 if i == 0 else 1 + i % 3)
    ref = str(tmp_path / "ref.jsonl")
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", ref, "--max-batch", "8"])
    assert code == 0, text
    monkeypatch.setattr(coordinator, "MEM_PENDING", 2)
    spilled = []
    real = coordinator.Coordinator._resolve
    monkeypatch.setattr(coordinator.Coordinator, "_resolve",
                        lambda self, e: spilled.append(isinstance(e, coordinator.Spilled)) or real(self, e))
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", out, "--max-batch", "8"])
    assert code == 0, text
    assert sum(spilled) >= 5, spilled
    assert open(out, "rb").read() == open(ref, "rb").read()
    assert not os.path.exists(journal_path(out))


def _job(tiny, inp, out, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "mpiinfer", "run", "-m", tiny, "-i", inp, "-o", out,
                             "--threads", "1", "--max-batch", "8", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _journal_lines(out):
    try:
        with open(journal_path(out), "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_stop_behind_a_slow_record_loses_no_finished_work(tiny, tmp_path, sig):
    """The first record is slow; the records after it finish and wait.  Killing the job (SIGKILL), stopping it
    (SIGTERM) or interrupting it (Ctrl-C) leaves every finished record in the output or the journal, and the
    re-run writes byte for byte what an uninterrupted run writes, computing only the rest."""
    inp = write_input(tmp_path / "a.jsonl", 40, max_tokens=lambda i: 1500 if i == 0 else 2)
    ref = str(tmp_path / "ref.jsonl")
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", ref, "--max-batch", "8", "--threads", "1"])
    assert code == 0, text
    out = str(tmp_path / "out.jsonl")
    p = _job(tiny, inp, out)
    t0 = time.time()
    while _journal_lines(out) < 10 and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.01)
    assert p.poll() is None, "the job finished before it could be stopped: make record 0 slower"
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    finished = read_journal(journal_path(out))
    in_output = len(open(out).readlines()) if os.path.exists(out) else 0
    assert len(finished) + in_output >= 10, err
    if sig == signal.SIGTERM:
        assert p.returncode == 0 and "re-run the same command to resume" in err, err
    elif sig == signal.SIGINT:
        assert p.returncode == 130 and "re-run the same command to resume" in err and "Traceback" not in err, err
    restored = len([i for i in finished if i >= in_output])
    p = _job(tiny, inp, out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert open(out, "rb").read() == open(ref, "rb").read()
    summary = json.load(open(out + ".summary.json"))
    assert summary["restored_from_journal"] == restored and summary["records"] == 40 - in_output - restored
    assert not os.path.exists(journal_path(out))


def test_journal_lines_round_trip():
    from mpiinfer.io.resume import result_from_json
    from mpiinfer.messages import ErrorInfo, Result
    for r in (Result(3, "\ud800odd", text="t\u00e9xt", token_ids=[1, 2], finish_reason="stop", prompt_tokens=4,
                     logprobs=[-0.1, -1e-20], extra={"custom_id": "c"}, ttft=0.5, latency=1.25),
              Result(4, 7, error=ErrorInfo("invalid_json", "bad"))):
        line = json.dumps(result_to_json(r), ensure_ascii=True)
        assert result_from_json(json.loads(line)) == r


# ------------------------------------------------------------------ refused in the first second, before torch

def _refused(args, **kw):
    """Run `mpiinfer run ARGS` in a fresh interpreter -> (exit code, stderr, seconds, torch imported?)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "mpiinfer", "run"] + args, capture_output=True,
                       text=True, timeout=60, **kw)
    took = time.time() - t0
    torch_imported = any(line.startswith("import time:") and line.split("|")[-1].strip() == "torch"
                         for line in p.stderr.splitlines())
    msgs = "\n".join(line for line in p.stderr.splitlines() if not line.startswith("import time:"))
    return p.returncode, msgs, took, torch_imported


@pytest.mark.parametrize("case", ["no tokenizer", "hub id", "empty input", "bad extension", "read-only output"])
def test_bad_set_up_refused_early(tiny, tmp_path, case):
    import shutil
    model, inp = tiny, write_input(tmp_path / "in.jsonl", 2)
    out, cmd_prefix = str(tmp_path / "out.jsonl"), []
    if case == "no tokenizer":
        model = str(tmp_path / "model")
        shutil.copytree(tiny, model)
        os.remove(os.path.join(model, "tokenizer.json"))
        want = "has no tokenizer.json"
    elif case == "hub id":
        model, want = "meta-llama/Llama-3.2-1B", "never downloads"
    elif case == "empty input":
        inp, want = str(tmp_path / "empty.jsonl"), "has no records"
        open(inp, "w").write("\n\n")
    elif case == "bad extension":
        out, want = str(tmp_path / "out.txt"), "output extension '.txt' is not supported"
    else:
        if shutil.which("unshare") is None or os.geteuid() != 0:
            pytest.skip("needs root and unshare for a read-only mount")
        ro = tmp_path / "ro"
        ro.mkdir()
        out, want = str(ro / "out.jsonl"), "cannot write the output"
        cmd_prefix = ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {ro} || exit 99; exec "$@"', "sh"]
    args = ["-m", model, "-i", inp, "-o", out]
    if cmd_prefix:
        p = subprocess.run(cmd_prefix + [sys.executable, "-m", "mpiinfer", "run"] + args, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode != 99, "could not mount a read-only tmpfs"
        code, err = p.returncode, p.stderr
    else:
        code, err, took, torch_imported = _refused(args)
        assert not torch_imported, "torch was imported before the refusal"
        assert took < 5, took              # generous: a shared, noisy machine; typically well under a second
    assert code == 2, err
    assert want in err and "Traceback" not in err and "loaded" not in err, err


def test_a_sigterm_during_loading_stops_cleanly(tiny, tmp_path):
    """SIGTERM while the model loads (Slurm's warning can come early) is not lost: the job stops before it
    computes anything, exits 0 and says how to resume; the re-run does the whole job."""
    inp, out = write_input(tmp_path / "a.jsonl", 6), str(tmp_path / "out.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIINFER_TEST_FAULT="load:0:sleep=3")
    p = subprocess.Popen([sys.executable, "-m", "mpiinfer", "run", "-m", tiny, "-i", inp, "-o", out, "--max-tokens",
                          "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.5)                               # inside the 3 s pause before the weights are read
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "stopped by SIGTERM" in err and "re-run the same command to resume" in err, err
    assert (open(out).read() if os.path.exists(out) else "") == ""
    code, text = run_cli(["-m", tiny, "-i", inp, "-o", out, "--max-tokens", "3"])
    assert code == 0, text
    assert [json.loads(x)["id"] for x in open(out)] == [f"p{i}" for i in range(6)]


def test_max_tokens_clipped_by_the_context_is_recorded(tiny, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "long", "prompt": "the sea", "max_tokens": 500, "ignore_eos": True}) + "\n"
                   + json.dumps({"id": "short", "prompt": "the sea", "max_tokens": 5, "ignore_eos": True}) + "\n")
    out = str(tmp_path / "out.jsonl")
    code, text = run_cli(["-m", tiny, "-i", str(inp), "-o", out, "--max-seq-len", "40"])
    assert code == 0, text
    long, short = [json.loads(x) for x in open(out)]
    assert long["finish_reason"] == "length" and long["max_tokens_clipped_to"] == len(long["token_ids"]) < 500
    assert long["usage"]["prompt_tokens"] + len(long["token_ids"]) == 40
    assert "max_tokens_clipped_to" not in short and len(short["token_ids"]) == 5
    assert json.load(open(out + ".summary.json"))["max_tokens_clipped"] == 1


def _retry_inputs(tmp_path, fixed):
    """12 records: record 3 malformed (fixed: a good one), record 7 too long for --max-seq-len 64."""
    lines = [json.dumps({"id": f"p{i}", "prompt": f"the sea and the sky number {i}"}) for i in range(12)]
    lines[7] = json.dumps({"id": "p7", "prompt": " ".join(["sea"] * 200)})
    lines[3] = json.dumps({"id": "p3", "prompt": "fixed now"}) if fixed else '{"id": "p3", "prompt": '
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _rewrite_record(out, fmt, i, text):
    """Change the text of record i of a JSONL / OpenAI output: what a recomputation could never produce."""
    lines = open(out).read().splitlines(keepends=True)
    rec = json.loads(lines[i])
    if fmt == "openai":
        rec["response"]["body"]["choices"][0]["text"] = text
    else:
        rec["text"] = text
    lines[i] = json.dumps(rec, ensure_ascii=False) + "\n"
    open(out, "w").writelines(lines)
    return lines[i]


@pytest.mark.parametrize("fmt", ["jsonl", "openai", "hdf5"])
def test_retry_errors_computes_only_the_errors(tiny, tmp_path, fmt):
    """--retry-errors after fixing a malformed line and raising --max-seq-len: the two error records are
    computed, every good record is kept as it was (a marked one stays marked), the output is in input order and
    otherwise what a fresh run of the fixed job writes; an incomplete output is finished too."""
    from mpiinfer.io.hdf5 import read_hdf5_results
    ext = ".h5" if fmt == "hdf5" else ".jsonl"
    out, ref = str(tmp_path / f"out{ext}"), str(tmp_path / f"ref{ext}")
    base = ["-m", tiny, "--max-tokens", "4", *(["--output-format", "openai"] if fmt == "openai" else [])]
    code, text = run_cli([*base, "-i", _retry_inputs(tmp_path, fixed=False), "-o", out, "--max-seq-len", "64"])
    assert code == 0, text
    if fmt == "hdf5":
        errors = [r.index for r in read_hdf5_results(out) if r.error is not None]
    else:
        errors = [i for i, x in enumerate(open(out)) if json.loads(x).get("error")]
        marked = _rewrite_record(out, fmt, 0, "KEPT AS IT WAS")
        with open(out, "r+") as f:                  # the job was stopped before its last record
            lines = f.readlines()
            f.seek(0)
            f.truncate()
            f.writelines(lines[:11])
    assert errors == [3, 7]
    fixed = _retry_inputs(tmp_path, fixed=True)
    code, text = run_cli([*base, "-i", fixed, "-o", ref, "--max-seq-len", "1024"])
    assert code == 0, text
    # options that decide a kept record's result cannot change
    code, text = run_cli([*base[:-2], "--max-tokens", "5", "-i", fixed, "-o", out, "--retry-errors"])
    assert code == 2 and "max_tokens" in text, text
    code, text = run_cli([*base, "-i", fixed, "-o", out, "--max-seq-len", "1024", "--retry-errors"])
    assert code == 0, text
    assert "retrying the 2 error records" in text
    summary = json.load(open(out + ".summary.json"))
    assert summary["retried_errors"] == 2 and summary["errors"] == 0
    assert summary["records"] == (2 if fmt == "hdf5" else 3) and summary["in_output"] == 12
    if fmt == "hdf5":
        assert [vars(r) for r in read_hdf5_results(out)] == [vars(r) for r in read_hdf5_results(ref)]
    else:
        want = open(ref).read().splitlines(keepends=True)
        want[0] = marked
        assert open(out).read().splitlines(keepends=True) == want
    assert not os.path.exists(journal_path(out)) and not os.path.exists(out + ".retry.tmp")
    code, text = run_cli([*base, "-i", fixed, "-o", out, "--max-seq-len", "1024", "--retry-errors"])
    assert code == 0 and "nothing to retry" in text, text


def test_retry_errors_checks_ids_and_uses_the_journal(tiny, tmp_path):
    """An input whose ids moved is refused; results an interrupted retry journaled are written, not computed
    again (its half-written new output is discarded); --retry-errors and --overwrite exclude each other."""
    out = str(tmp_path / "out.jsonl")
    base = ["-m", tiny, "--max-tokens", "4"]
    code, text = run_cli([*base, "-i", _retry_inputs(tmp_path, fixed=False), "-o", out, "--max-seq-len", "64"])
    assert code == 0, text
    before = open(out).read()
    fixed = _retry_inputs(tmp_path, fixed=True)
    good = open(fixed).read()
    open(fixed, "w").write(good.replace('"p5"', '"q5"'))
    code, text = run_cli([*base, "-i", fixed, "-o", out, "--retry-errors"])
    assert code == 2 and "'p5'" in text and "'q5'" in text, text
    open(fixed, "w").write(good)
    # an interrupted retry: record 7 journaled (marked), a partial new output left behind
    with open(journal_path(out), "w") as f:
        f.write(json.dumps(result_to_json(coordinator.Result(index=7, id="p7", text="FROM THE JOURNAL",
                                                             token_ids=[5, 6], finish_reason="length",
                                                             prompt_tokens=201))) + "\n")
    open(out + ".retry.tmp", "w").write('{"id": "p0"')
    code, text = run_cli([*base, "-i", fixed, "-o", out, "--max-seq-len", "1024", "--retry-errors"])
    assert code == 0, text
    recs = [json.loads(x) for x in open(out)]
    assert [r["id"] for r in recs] == [f"p{i}" for i in range(12)]
    assert recs[7]["text"] == "FROM THE JOURNAL" and "error" not in recs[3]
    assert [x for i, x in enumerate(open(out)) if i not in (3, 7)] == \
        [x for i, x in enumerate(before.splitlines(keepends=True)) if i not in (3, 7)]
    summary = json.load(open(out + ".summary.json"))
    assert summary["restored_from_journal"] == 1 and summary["records"] == 1
    code, text = run_cli([*base, "-i", fixed, "-o", out, "--retry-errors", "--overwrite"])
    assert code == 2 and "pick one" in text
