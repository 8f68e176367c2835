"""Jobs on a real one-node Slurm: srun with the MPICH wheel's PMI-2 gives the same output as one process, srun
without a PMI plugin is refused, and the script `mpiinfer slurm` writes survives its time-limit chain (the
warning, the clean stop through Slurm, the drain, the re-submission of a piped script with the options given
to sbatch, the resume) with every record exactly once.  Every wait is bounded."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

MPI = "pmi2"        # the mpich wheel of the test extras


def make_input(path, n):
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": i, "prompt": "the sea " * (1 + i % 13), "max_tokens": 8}) + "\n"
                     for i in range(n))
    return str(path)


def mpiinfer_run(env, launcher, model, inp, out, *flags, timeout=300):
    cmd = launcher + [sys.executable, "-m", "mpiinfer", "run", "-m", model, "-i", inp, "-o", out, "--threads", "1",
                      "--max-batch", "8", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(model_dirs):
    return model_dirs("llama")


def test_srun_layouts_equal_one_process(slurm, tiny, tmp_path):
    inp = make_input(tmp_path / "in.jsonl", 60)
    one = mpiinfer_run(slurm, [], tiny, inp, str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    want = open(tmp_path / "one.jsonl").read()
    for name, flags in (("dp2", []), ("tp2", ["--tp", "2"])):
        p = mpiinfer_run(slurm, ["srun", f"--mpi={MPI}", "-n", "2"], tiny, inp, str(tmp_path / f"{name}.jsonl"),
                         *flags)
        assert p.returncode == 0, p.stderr
        assert open(tmp_path / f"{name}.jsonl").read() == want, name


def test_srun_without_a_pmi_plugin_is_refused(slurm, tiny, tmp_path):
    """Slurm's default MpiDefault=none starts two singletons: both used to write the same output, exit 0."""
    inp, out = make_input(tmp_path / "in.jsonl", 10), str(tmp_path / "out.jsonl")
    p = mpiinfer_run(slurm, ["srun", "--mpi=none", "-n", "2"], tiny, inp, out)
    assert p.returncode != 0
    assert p.stderr.count("the launcher started 2 tasks but MPI sees a world of 1") == 2, p.stderr
    assert not os.path.exists(out)


def _squeue(env):
    p = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=env, capture_output=True, text=True, timeout=30)
    return dict(line.split() for line in p.stdout.splitlines() if line.strip())


def _job(env, jid):
    p = subprocess.run(["scontrol", "show", "job", jid], env=env, capture_output=True, text=True, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def _lines(path):
    try:
        with open(path) as f:
            return f.read().count("\n")
    except FileNotFoundError:
        return 0


def _wait(cond, timeout, what):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def test_time_limit_chain_resubmits_and_resumes(slurm, tiny, tmp_path):
    n = 8000
    inp, out = make_input(tmp_path / "in.jsonl", n), str(tmp_path / "out.jsonl")
    r = subprocess.run([sys.executable, "-m", "mpiinfer", "slurm", "--tasks-per-node", "2", "--time", "30",
                        "--grace", "60", "--max-resubmits", "5", "--mpi", MPI, "--", "-m", tiny, "-i", inp, "-o", out,
                        "--threads", "1", "--max-batch", "16", "--flush-every", "20"],
                       env=slurm, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # submitted through a pipe, with a name and a time limit that only the sbatch command line gives
    p = subprocess.run(["sbatch", "--parsable", "--job-name=chain", "--time=20", f"--chdir={tmp_path}"],
                       input=r.stdout, env=slurm, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    jobs = [p.stdout.strip().split(";")[0]]
    for stop in range(2):                       # two time limits, then the last allocation finishes the job
        jid = jobs[-1]
        _wait(lambda jid=jid: _job(slurm, jid).get("JobState") == "RUNNING", 120, f"job {jid} to run")
        start = _lines(out)
        _wait(lambda start=start: _lines(out) >= start + 1000, 180, f"job {jid} to write records")
        # what --signal=B:USR1@GRACE does before the time limit, sent now
        subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=slurm, check=True, timeout=30)
        _wait(lambda jid=jid: _job(slurm, jid).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
              180, f"job {jid} to end")
        _wait(lambda jid=jid: any(int(j) > int(jid) for j in _squeue(slurm)), 60, "the re-submitted job")
        jobs.append(max(_squeue(slurm), key=int))
    _wait(lambda: not _squeue(slurm), 300, "the chain to finish")
    logs = {j: (tmp_path / f"mpiinfer-{j}.log").read_text() for j in jobs}
    for j in jobs:
        info = _job(slurm, j)
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (j, info, logs[j])
        assert info.get("JobName") == "chain" and info.get("TimeLimit") == "00:20:00", (j, info)
    for j in jobs[:-1]:
        assert "re-submitting to resume" in logs[j] and "srun: forcing job termination" not in logs[j], logs[j]
    assert "re-submitting" not in logs[jobs[-1]]
    ids = [json.loads(x)["id"] for x in open(out)]
    assert ids == list(range(n))
    assert not os.path.exists(out + ".journal.jsonl")
