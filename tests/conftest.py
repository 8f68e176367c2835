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

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]


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
