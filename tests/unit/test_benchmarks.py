"""The benchmark scripts run (``--quick``, tiny model) and their results say what they claim.

Not timings (those live in the benchmarks' own output): that the scripts still work against the current
package, that the engine benchmark's workloads give the same greedy tokens as transformers, and that its
matmul floor and ceiling are computed and consistent."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=REPO)
    assert p.returncode == 0, f"{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_engine_quick(tmp_path):
    out = tmp_path / "engine.json"
    text = _run("bench_engine.py", "--quick", "--threads", "1", "--scenarios", "fp32_b1,fp32_b16,mixed64",
                "--json", str(out))
    res = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in res["rows"]}
    assert set(rows) == {"fp32_b1", "fp32_b16", "mixed64"}
    for s, r in rows.items():
        assert r["tokens_match"], f"{s}: mpiinfer's greedy tokens differ from transformers'"
        fl = r["mpiinfer"]["matmul_floor"]
        assert fl["floor_s"] > 0
        # time/floor and ceiling are the ratios the benchmark documents
        assert r["mpiinfer_over_floor"] == pytest.approx(r["mpiinfer"][fl["compare_with"]] / fl["floor_s"])
        assert r["ceiling_ratio"] == pytest.approx(r["transformers"][fl["compare_with"]] / fl["floor_s"])
    assert rows["fp32_b16"]["mpiinfer"]["matmul_floor"]["rows"] == 16
    b1 = rows["fp32_b1"]
    pr = b1["mpiinfer"]["paired_read"]
    assert pr["rounds"] == len(pr["steps_s"]) == len(pr["reads_s"]) > 0
    assert pr["read_bytes"] == res["loads"]["mpiinfer_float32"]["weight_bytes"]   # every weight read once
    assert b1["paired_frac_of_bound"] == pytest.approx(pr["read_median_s"] / pr["step_median_s"])
    assert rows["mixed64"]["mpiinfer"]["matmul_floor"]["prompt_tokens"] > 0
    assert "ceiling" in text and "fp32_b16" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "kernels.json"
    _run("bench_kernels.py", "--quick", "--threads", "1", "--json", str(out))
    res = json.loads(out.read_text())
    cells = [(r["out"], r["in"], r["M"], k, r[k]) for r in res["rows"] for k in res["config"]["kernels"] if r.get(k)]
    assert len(res["rows"]) == 9 and cells, "bench_kernels measured nothing"
    for o, i, m, k, c in cells:
        assert c["gflops"] > 0
        # every kernel computes the same product as MKL's x @ w.t() (bfloat16 to its precision)
        assert c["max_rel_err_vs_mkl"] <= (2e-2 if k.startswith("bf16") else 1e-4), (o, i, m, k)


@pytest.mark.timeout(300)
def test_bench_decode_small(tmp_path):
    """The decode-kernel benchmark runs and its kernel computes the torch path's attention (hd 64 and 128, the
    AVX-512 tiles' sizes, over paged runs)."""
    from mpiinfer import native
    if not native.available():
        pytest.skip("no C compiler: the native kernels are off")
    for hd, grp in ((64, 3), (128, 4)):
        out = tmp_path / f"decode{hd}.json"
        _run("bench_decode.py", "--seqs", "24", "--rows", "45", "--runs", "3", "--hd", str(hd), "--grp", str(grp),
             "--threads", "1", "--repeat", "2", "--rounds", "1", "--json", str(out))
        rows = {(r["dtype"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
        assert set(rows) == {(d, i) for d in ("float32", "bfloat16") for i in ("kernel", "torch")}
        assert rows["float32", "kernel"]["max_abs_diff"] < 1e-5 and rows["bfloat16", "kernel"]["max_abs_diff"] < 3e-2
        assert all(r["ms"] > 0 and r["gb_s"] > 0 for r in rows.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_coordinator_quick(tmp_path):
    out = tmp_path / "coordinator.json"
    text = _run("bench_coordinator.py", "--quick", "--dp", "1,2", "--json", str(out))
    res = json.loads(out.read_text())
    assert {(r["dp"], r["format"]) for r in res["rows"]} == {(1, "jsonl"), (1, "openai"), (2, "jsonl"), (2, "openai")}
    for r in res["rows"]:
        assert r["records_per_s"] > 0 and r["capacity_records_per_s"] == pytest.approx(1e6 / r["cpu_us_per_record"])
        assert all(run["records"] == run["lines"] == 5000 for run in r["runs"])
    assert "replicas at 10 rec/s" in text


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_grammar_and_structured_quick(tmp_path):
    """The grammar-engine comparison (llguidance only: the others are optional) measures compile, masks and the
    feature table; the structured-output benchmark runs both jobs and checks every answer with jsonschema."""
    out = tmp_path / "grammar.json"
    text = _run("bench_grammar.py", "--engines", "llguidance", "--out", str(out))
    row = json.loads(out.read_text())["engines"][0]
    assert row["engine"] == "llguidance" and row["answer_accepted"] and row["mask_tokens"] > 50
    assert row["coverage"]["uniqueItems"].startswith("compile error") and row["features_ok"] >= 20
    assert "| llguidance |" in text
    out = tmp_path / "s.json"                 # (a --quick run renames a default structured.json)
    _run("bench_structured.py", "--quick", "--json", str(out))
    rnd = json.loads(out.read_text())["rounds"][0]
    assert rnd["schema"]["answers"] == rnd["free"]["answers"] == 8
    # a random tiny model's answers: every one that is not cut by max_tokens validates
    assert rnd["schema"]["valid"] == rnd["schema"]["answers"] - rnd["schema"]["cut"]
    assert rnd["ratio"] > 0


@pytest.mark.timeout(200)
def test_bench_prefix_cp_quick(tmp_path):
    """The shared-prefix benchmark over 2 CP ranks: every question after the first takes the document's full CP
    groups from the prefix cache (700 + 5 tokens at cp=2: 2 groups of 256), none with the cache off."""
    from mpiinfer.parallel.shard import cp_groups
    out = tmp_path / "p.json"
    _run("bench_prefix.py", "--quick", "--cp", "2", "--json", str(out), timeout=180)
    res = json.loads((tmp_path / "p_cp.json").read_text())
    units = cp_groups(705, 2)
    on, off = res["runs"]["shared_on"], res["runs"]["shared_off"]
    assert on["records"] == 24 and off["records"] == 8 and on["errors"] == off["errors"] == 0
    assert on["prompt_tokens_cached"] == 23 * 4 * sum(units) == 23 * 512 and off["prompt_tokens_cached"] == 0
    assert res["shared_prefix_speedup"] > 0


def test_bench_cp_reuse_small(tmp_path):
    """The CP reuse benchmark drives the real scheduler: every question after the first takes most of the document
    from the cache, never more than the document, and the first takes nothing."""
    out = tmp_path / "r.json"
    _run("bench_cp_reuse.py", "--docs", "4", "--questions", "4", "--max", "12000", "--json", str(out), timeout=120)
    res = json.loads(out.read_text())
    for row in res["rows"]:
        assert row["cached"][0] == 0 and all(0.7 * row["doc"] < c <= row["doc"] for c in row["cached"][1:]), row
    assert all(s["second_lose_all"] == 0 for s in res["summary"])
