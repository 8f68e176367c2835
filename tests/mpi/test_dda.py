"""DDA (shared-memory) allreduce under mpiexec with 2, 3 and 4 ranks: see tests/mpi/dda_worker.py.

Every launch has a timeout.  Where the machine allows it (root, util-linux ``unshare``),
each job runs in a private mount namespace with its own tmpfs on /dev/shm, so the
"nothing left in /dev/shm" check sees exactly this job's segments and not those of other
MPI jobs running at the same time; elsewhere the check compares /dev/shm before and after
for DDA window files (MPICH names them ``mpich_shar_tmp*``).

Found with MPICH 5.0: the DDA window file is unlinked as soon as every rank has mapped it,
so it never outlives the job, even under kill -9.  MPICH's own per-job init segment
(``mpich_shm_<hash>_0``, 2 MiB) is unlinked only in MPI_Finalize, so a job that dies
leaves it behind whatever DDA does; the die test asserts that this is the only leftover.
"""
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from ..tiers import by_ranks

MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")
WORKER = str(Path(__file__).with_name("dda_worker.py"))
TIMEOUT = 90
MARK = "@@SHM-LEFT@@"


@lru_cache(maxsize=1)
def private_shm() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        p = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


def shm_listing() -> set:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def launch(n, args, env=None, extra=(), timeout=TIMEOUT):
    """Run the worker on n ranks; returns (process, names left in /dev/shm by this job)."""
    cmd = [MPIEXEC, *extra, "-n", str(n), sys.executable, WORKER, *args]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if private_shm():
        script = f'mount -t tmpfs tmpfs /dev/shm || exit 99; "$@"; rc=$?; echo "{MARK}$(ls -A /dev/shm | tr "\\n" " ")"; exit $rc'
        p = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *cmd],
                           capture_output=True, text=True, timeout=timeout, env=e)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
        assert line, p.stdout + p.stderr
        return p, set(line[-1][len(MARK):].split())
    before = shm_listing()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e)
    return p, {f for f in shm_listing() - before if f.startswith("mpich_shar")}


def ok(p, left, mode):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"OK {mode}" in p.stdout
    assert not left, f"left in /dev/shm: {left}"


# (ranks, worker args, environment): the matrix as data; 4 ranks oversubscribe 2 cores, keep them light
CASES = [
    (2, ["check", "--random", "4", "--big"], {}),
    (3, ["check", "--random", "2", "--seed", "1"], {}),
    (4, ["check", "--random", "0", "--seed", "2", "--dtypes", "float32,bfloat16"], {}),
    (2, ["burst", "--iters", "300"], {}),
    (3, ["burst", "--iters", "100", "--algo", "2shot"], {}),
    (4, ["burst", "--iters", "24", "--algo", "1shot"], {}),
    # hierarchical: fake nodes of k consecutive ranks ([0 1] [2 3]; [0 1] [2])
    (4, ["check", "--random", "0", "--seed", "3", "--dtypes", "float32,float16"], {"MPIINFER_FAKE_NODE_SIZE": "2"}),
    (3, ["burst", "--iters", "30"], {"MPIINFER_FAKE_NODE_SIZE": "2"}),
]


@pytest.mark.parametrize("n,args,env", by_ranks(CASES, ids=[
    f"n{n}-{'-'.join(a[:1] + a[a.index('--algo') + 1:a.index('--algo') + 2] if '--algo' in a else a[:1])}"
    + ("-fake" + e["MPIINFER_FAKE_NODE_SIZE"] if e else "") for n, a, e in CASES]))
def test_dda(n, args, env):
    p, left = launch(n, args, env)
    ok(p, left, args[0])


@pytest.mark.slow      # each case waits out a 3 s DDA timeout
@pytest.mark.parametrize("n,die_rank,env", [(2, 1, {}), (3, 2, {}), (4, 3, {"MPIINFER_FAKE_NODE_SIZE": "2"})])
def test_dead_rank_times_out(n, die_rank, env):
    # -disable-auto-cleanup: hydra must not kill the survivors before they notice on their own
    p, left = launch(n, ["die", "--timeout", "3", "--die-rank", str(die_rank)], env,
                     extra=["-disable-auto-cleanup"], timeout=60)
    out = p.stdout + p.stderr
    # ranks print concurrently: their lines may run together, so match the messages, not lines
    msgs = re.findall(r"DDATIMEOUT: ((?:rank \d+ did not reach|node leaders') .*? within [\d.]+ s)", out)
    assert msgs, out[-3000:]
    if not env:   # flat: every survivor waits on the dead rank directly
        assert len(msgs) == n - 1, out[-3000:]
        assert all(f"rank {die_rank} did not reach allreduce epoch 21 within 3 s" in m for m in msgs), msgs
    else:         # hierarchical: its node leader times out on it, the others wait on a leader or MPI
        assert any(f"rank {die_rank} did not reach allreduce epoch" in m for m in msgs), msgs
    assert p.returncode != 0
    assert not {f for f in left if f.startswith("mpich_shar")}, f"DDA window left in /dev/shm: {left}"
    assert all(f.startswith("mpich_shm_") for f in left), left   # MPICH's own init segment only
