"""A real one-node Slurm (Debian's slurm-wlm and munge) for the tests of this folder, started once per session
with all its state in a temporary folder (tests/slurm/cluster.sh) and stopped by PID at the end.  Skipped, with
the reason, where it cannot run (not root, Slurm not installed: `apt-get install slurm-wlm munge`)."""
import os
import shutil
import socket
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port_pair() -> int:
    """A port p on loopback with p and p + 1 free (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("", port + 1))
                    return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    missing = [b for b in ("slurmctld", "slurmd", "munged", "srun", "sbatch", "scancel") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root")
    d = str(tmp_path_factory.mktemp("slurm"))
    p = subprocess.run(["bash", os.path.join(HERE, "cluster.sh"), "start", d], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, SLURM_TEST_PORT=str(_free_port_pair())))
    if p.returncode != 0:
        pytest.fail(f"the one-node Slurm did not start:\n{p.stdout}\n{p.stderr}")
    env = dict(os.environ, SLURM_CONF=os.path.join(d, "slurm.conf"), OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith(("SLURM_JOB", "SLURM_STEP", "MPIINFER_"))]:
        env.pop(k)
    yield env
    subprocess.run(["bash", os.path.join(HERE, "cluster.sh"), "stop", d], capture_output=True, timeout=60)
