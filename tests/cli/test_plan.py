"""`mpiinfer plan`: mesh groups and per-rank weight bytes without loading; same refusals as `run`."""
import json

from click.testing import CliRunner

from mpiinfer.cli import main


def plan(args):
    r = CliRunner().invoke(main, ["plan"] + args)
    return r.exit_code, r.output


def test_plan_weight_bytes_match_the_loaded_shards(model_dirs):
    from mpiinfer.comm.mesh import Layout, Mesh
    from mpiinfer.config import EngineConfig
    from mpiinfer.device import Device
    from mpiinfer.engine.runner import ModelRunner
    sizes = {}
    for arch, over, tp, ep in (("llama", {}, 2, 1), ("qwen2_moe", {}, 2, 2), ("qwen3_moe", {}, 4, 2),
                               ("llama", {}, 4, 1), ("qwen3_moe", {"num_experts": 6}, 4, 4),    # 2 2 1 1 experts
                               ("gemma3", {}, 2, 1), ("llama4", {}, 2, 1), ("llama4", {}, 2, 2),
                               ("gpt_oss", {}, 2, 2), ("gpt_oss", {"mxfp4": True}, 2, 1),
                               ("deepseek_v3", {}, 2, 1)):
        d = model_dirs(arch, **over)
        code, out = plan(["-m", d, "--world", str(tp), "--tp", str(tp), "--ep", str(ep), "--json"])
        assert code == 0, out
        p = json.loads(out)
        # build each rank's real shard (no MPI needed to construct and load) and compare bytes
        for r in p["ranks"]:
            mesh = Mesh(Layout(world=tp, tp=tp, ep=ep), r["rank"])
            runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 20), mesh, Device("cpu"))
            assert runner.weight_bytes == r["weight_bytes"]
            sizes[(arch, tp, ep, r["rank"])] = r["weight_bytes"]
            assert runner.weight_bytes_read <= runner.weight_bytes
        code1, out1 = plan(["-m", d, "--world", "1", "--json"])
        assert code1 == 0, out1
        full = json.loads(out1)["ranks"][0]["weight_bytes"]
        total = sum(r["weight_bytes"] for r in p["ranks"])
        assert total >= full and (arch == "llama" and tp == 4 or total <= full * 1.3)
    uneven = [sizes[("qwen3_moe", 4, 4, r)] for r in range(4)]
    assert uneven[0] == uneven[1] > uneven[2] == uneven[3]       # the first E % ep ranks hold one more expert


def test_plan_groups_and_fit(model_dirs):
    d = model_dirs("llama")
    code, out = plan(["-m", d, "--world", "8", "--tp", "2", "--memory-per-rank", "100GB"])
    assert code == 0, out
    assert "tp groups        [0 1] [2 3] [4 5] [6 7]" in out
    assert "dp groups        [0 2 4 6] [1 3 5 7]" in out
    assert "fits in" in out
    code, out = plan(["-m", d, "--world", "2", "--tp", "2", "--memory-per-rank", "1MB"])
    assert code == 3 and "does NOT fit" in out


def test_plan_refuses_like_run(model_dirs):
    d = model_dirs("llama")
    code, out = plan(["-m", d, "--world", "6", "--tp", "4"])
    assert code != 0 and "world size 6 is not divisible by tp x cp = 4 x 1" in out
    code, out = plan(["-m", d, "--world", "8", "--tp", "8"])
    assert code != 0 and "--tp 8 is larger than num_key_value_heads=2 and does not divide num_attention_heads=4" in out
    code, out = plan(["-m", d, "--world", "2", "--tp", "2", "--ep", "2"])
    assert code != 0 and "has no experts" in out


def test_plan_sizes_the_kv_cache_as_run_does(model_dirs):
    """A layout that runs in 1 GB per rank fits in plan's answer, and the KV tokens plan reports are the pool the
    runner allocates from the same budget."""
    from mpiinfer.comm.mesh import Layout, Mesh
    from mpiinfer.config import EngineConfig
    from mpiinfer.device import Device
    from mpiinfer.engine.runner import ModelRunner
    d = model_dirs("llama")
    code, out = plan(["-m", d, "--world", "2", "--tp", "2", "--memory-per-rank", "1GB"])
    assert code == 0 and "fits in" in out and "does NOT" not in out, out
    code, out = plan(["-m", d, "--world", "2", "--tp", "2", "--kv-budget", "3MB", "--json"])
    assert code == 0, out
    for r in json.loads(out)["ranks"]:
        runner = ModelRunner(d, EngineConfig(kv_budget_bytes=3_000_000), Mesh(Layout(world=2, tp=2), r["rank"]),
                             Device("cpu"))
        assert runner.pool_tokens == r["kv_tokens"]
        from mpiinfer.engine.scheduler import Scheduler
        assert Scheduler(1, runner.pool_tokens, 8, 64).pools[0].num_blocks == r["kv_blocks"] > 0


def test_plan_and_run_size_a_bfloat16_kv_cache_alike(model_dirs):
    """``--kv-dtype bfloat16`` under float32 weights: half the KV bytes per token, twice the tokens in a budget, in
    plan's answer and in the pool the runner allocates (whose tensors are bfloat16); the weights stay float32."""
    import torch

    from mpiinfer.comm.mesh import Mesh
    from mpiinfer.config import EngineConfig
    from mpiinfer.device import Device
    from mpiinfer.engine.runner import ModelRunner
    d = model_dirs("llama")
    got = {}
    for kv in ("auto", "bfloat16"):
        code, out = plan(["-m", d, "--world", "1", "--kv-budget", "3MB", "--kv-dtype", kv, "--json"])
        assert code == 0, out
        got[kv] = json.loads(out)
    full, half = got["auto"], got["bfloat16"]
    assert full["kv_dtype"] == full["dtype"] == half["dtype"] == "float32" and half["kv_dtype"] == "bfloat16"
    assert half["ranks"][0]["kv_bytes_per_token"] * 2 == full["ranks"][0]["kv_bytes_per_token"]
    assert half["ranks"][0]["weight_bytes"] == full["ranks"][0]["weight_bytes"]
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=3_000_000, kv_dtype="bfloat16"), Mesh.single(),
                         Device("cpu"))
    assert runner.pool_tokens == half["ranks"][0]["kv_tokens"] >= 2 * full["ranks"][0]["kv_tokens"] - 1
    assert runner.kv.k[0].dtype == runner.kv.v[-1].dtype == torch.bfloat16
    assert next(runner.model.parameters()).dtype == torch.float32
    code, out = plan(["-m", d, "--world", "1", "--kv-budget", "3MB", "--kv-dtype", "bfloat16"])
    assert code == 0 and "float32, KV cache bfloat16" in out, out
