"""Shared fixtures: tiny random checkpoints per architecture (written once per session)."""
import hashlib
import json
import os

import pytest

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """arch -> directory of a tiny random checkpoint, made lazily."""
    from mpiinfer.init_model import init_model
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(arch, **overrides):
        key = arch + json.dumps(overrides, sort_keys=True)
        if key not in made:
            name = arch + ("-" + hashlib.sha1(key.encode()).hexdigest()[:8] if overrides else "")
            made[key] = init_model(os.path.join(root, name), arch=arch, preset="tiny", overrides=overrides or None)
        return made[key]
    return get
