"""jobs/gpu_check.sh --dry-run: the GPU run's script, on CPU, so it cannot rot between GPU machines."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "jobs", "gpu_check.sh")
EVERY = ["env", "parity_llama_fp32", "parity_llama_bf16", "parity_llama_fp32_kvbf16", "parity_mixtral_fp32", "sampling",
         "tp2_dda", "tp2_mpi", "ep2", "cp2_4k", "demo_model", "comm_bench", "decode_1b", "bulk_job"]


def dry_run(tmp_path, *args, timeout=420):
    env = dict(os.environ, MPIINFER_VENV=os.path.dirname(os.path.dirname(sys.executable)))
    return subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(tmp_path), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec")
def test_dry_run_every_check(tmp_path):
    p = dry_run(tmp_path, "--work", str(tmp_path / "scratch"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "scratch"]   # the report apart from the scratch
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["mode"] == "dry run on CPU"
    by = {c["check"]: c for c in doc["checks"]}
    assert list(by) == EVERY
    assert {c["status"] for c in by.values()} == {"ok"}, {n: c["detail"] for n, c in by.items() if c["status"] != "ok"}
    # the figures behind each ok: measured against transformers, within the tolerances
    for name in ("parity_llama_fp32", "parity_mixtral_fp32", "tp2_dda", "tp2_mpi", "ep2", "cp2_4k", "demo_model"):
        assert by[name]["figures"]["max_logprob_diff"] < doc["tolerances"]["float32"], name
    for name in ("parity_llama_bf16", "parity_llama_fp32_kvbf16"):
        assert by[name]["figures"]["max_logprob_diff"] < doc["tolerances"]["bfloat16_teacher_forced"], name
    rows = by["comm_bench"]["figures"]["rows"]
    assert {r["algo"] for r in rows} >= {"dda", "mpi"} and all(r["latency_us"] > 0 for r in rows)
    assert [b["batch"] for b in by["decode_1b"]["figures"]["batches"]] == [1, 4]
    assert by["bulk_job"]["figures"]["records"] == 8 and by["bulk_job"]["figures"]["completion_tokens"] > 0
    # what needs a GPU is said to be skipped, by name
    assert any("NCCL" in s for s in doc["skipped_parts"]) and any("IPC" in s for s in doc["skipped_parts"])
    for line in ("ok  parity_llama_fp32", "| check | status |", "CUDA parts skipped on CPU"):
        assert line in p.stdout


def test_unknown_check_refused(tmp_path):
    p = dry_run(tmp_path, "--only", "nonsense", timeout=60)
    assert p.returncode == 2 and "unknown checks ['nonsense']" in p.stderr


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec")
def test_a_failing_check_is_reported_and_the_others_go_on(tmp_path):
    # a model directory that cannot be written: init-model fails, its check says FAIL with the reason, the
    # env check still runs, and the exit status says a check failed
    work = tmp_path / "work"
    work.mkdir()
    (work / "models").write_text("not a directory")
    p = dry_run(tmp_path, "--only", "parity_llama_fp32", "--work", str(work), timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    st = {c["check"]: c for c in doc["checks"]}
    assert st["env"]["status"] == "ok"
    assert st["parity_llama_fp32"]["status"] == "FAIL" and "init-model" in st["parity_llama_fp32"]["detail"]
