"""`mpiinfer slurm`: the rendered script parses, its srun line runs, and the time-limit path stops the step
cleanly and re-submits; a finished job is not re-submitted. srun/sbatch are stand-ins in tests/cli/fakeslurm."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from mpiinfer.cli import main

FAKE = os.path.join(os.path.dirname(__file__), "fakeslurm")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_rendered_scripts_parse_and_committed_examples_are_current():
    """The committed examples are what `mpiinfer slurm` prints for the command in their header, byte for byte:
    the srun line carries every run option given ($VAR references stay expansions) and the PMI plugin."""
    for name, args in EXAMPLES.items():
        r = CliRunner().invoke(main, ["slurm"] + args)
        assert r.exit_code == 0, r.output
        text = r.output
        p = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert p.returncode == 0, p.stderr
        srun = next(line for line in text.splitlines() if line.startswith("srun "))
        run_args = args[args.index("--") + 1:]
        assert srun.endswith(" ".join(f'"{a}"' if a.startswith("$") else a for a in run_args) + " &"), srun
        assert "--mpi=pmi2" in srun and "--cpus-per-task=${SLURM_CPUS_PER_TASK:-1}" in srun
        with open(os.path.join(ROOT, "slurm", name)) as f:
            assert f.read() == text, f"slurm/{name} is stale: regenerate it with mpiinfer {' '.join(args)}"


EXAMPLES = {
    "single_node.sbatch": ["--tasks-per-node", "2", "--cpus-per-task", "16", "--mpi", "pmi2", "--",
                           "-m", "$MODEL", "-i", "$INPUT", "-o", "$OUTPUT"],
    "multi_node_gpu.sbatch": ["--nodes", "4", "--tasks-per-node", "4", "--cpus-per-task", "8", "--gpus-per-node",
                              "4", "--mpi", "pmi2", "--", "-m", "$MODEL", "-i", "$INPUT", "-o", "$OUTPUT",
                              "--tp", "4"],
}


@pytest.mark.parametrize("args,message", [
    (["--", "-m", "M", "-i", "I", "-o", "O", "--tpp", "2"], "`mpiinfer run` has no option --tpp"),
    (["--time", "5", "--grace", "300", "--", "-m", "M"], "--grace 300 s is not shorter than the time limit"),
    (["--time", "soon", "--", "-m", "M"], "is not a Slurm time limit"),
])
def test_render_refuses(args, message):
    r = CliRunner().invoke(main, ["slurm"] + args)
    assert r.exit_code == 2 and message in r.output, r.output


def test_parse_time():
    from mpiinfer.tools.slurm import parse_time
    assert [parse_time(t) for t in ("30", "1:30", "04:00:00", "2-0", "1-2:3", "1-02:03:04")] == [
        1800, 90, 14400, 172800, 93780, 93784]


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec")
@pytest.mark.slow
def test_time_limit_stops_cleanly_resubmits_and_resumes(model_dirs, tmp_path):
    d = model_dirs("llama")
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        f.writelines(json.dumps({"id": i, "prompt": f"the sea {i} " * (1 + i % 13), "max_tokens": 24}) + "\n" for i in range(3000))
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(main, ["slurm", "--tasks-per-node", "2", "--grace", "60", "--", "-m", d, "-i", str(inp),
                                  "-o", str(out), "--threads", "1", "--flush-every", "1",
                                  # few sequences at once: the job lasts well past the first flush on a fast machine
                                  # too (the whole job took ~1 s at the default 64, before the signal could land)
                                  "--max-batch", "4"])
    assert r.exit_code == 0, r.output
    script = tmp_path / "job.sbatch"
    script.write_text(r.output)
    log = tmp_path / "sbatch.log"
    env = dict(os.environ, PATH=FAKE + os.pathsep + os.environ["PATH"], SLURM_NTASKS="2", FAKE_SBATCH_LOG=str(log),
               OMP_NUM_THREADS="1")
    env.pop("MPIINFER_RESUBMITS", None)
    p = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (out.exists() and out.stat().st_size > 4000) and time.time() - t0 < 120 and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[0]
    p.send_signal(signal.SIGUSR1)            # what --signal=B:USR1@GRACE does
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 0, text
    assert "re-submitting to resume (1/20)" in text
    assert len(log.read_text().splitlines()) == 1 and "RESUBMITS=1" in log.read_text()
    partial = out.read_text().splitlines()
    assert 0 < len(partial) < 3000
    # the re-submitted job: runs to the end and does not re-submit again
    env["MPIINFER_RESUBMITS"] = "1"
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(log.read_text().splitlines()) == 1
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == list(range(3000))
    assert recs[:len(partial)] == [json.loads(x) for x in partial]
