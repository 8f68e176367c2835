"""CPU kernels: oneDNN linear equals F.linear per dtype; 16-bit weights run end to end."""
import pytest
import torch

from mpiinfer.kernels import can_pack, linear, pack, should_pack


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_linear_matches_reference(dtype, tol, m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 96, generator=g).to(dtype)
    w = torch.randn(40, 96, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    want = x.double() @ w.double().t() + b.double()
    got = linear(x, w, b)
    assert got.dtype == dtype and got.shape == (m, 40)
    assert torch.allclose(got.double(), want, atol=tol * 10, rtol=tol)
    assert linear(x[:0], w).shape == (0, 40)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_packed_linear_matches_reference(dtype, tol, m):
    if not can_pack(torch.device("cpu"), dtype):
        pytest.skip("this torch has no oneDNN weight packing")
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, 96, generator=g).to(dtype)
    w = torch.randn(40, 96, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    p = pack(w)
    assert p.is_mkldnn and not w.is_mkldnn
    want = x.double() @ w.double().t() + b.double()
    with torch.inference_mode():
        got = linear(x, p, b)
    assert got.dtype == dtype and got.shape == (m, 40)
    assert torch.allclose(got.double(), want, atol=tol * 10, rtol=tol)
    assert linear(x[:0], p).shape == (0, 40)


def test_pack_policy():
    cpu = torch.device("cpu")
    assert not should_pack(torch.device("meta"), torch.bfloat16, 64)
    assert not should_pack(cpu, torch.float16, 64)
    if can_pack(cpu, torch.float32):
        assert should_pack(cpu, torch.bfloat16, 1)        # bf16: faster at every batch size
        assert should_pack(cpu, torch.float32, 16) and not should_pack(cpu, torch.float32, 1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_weights_generate(dtype, model_dirs):
    from mpiinfer.comm.mesh import Mesh
    from mpiinfer.config import EngineConfig, SamplingParams
    from mpiinfer.device import Device
    from mpiinfer.engine.generate import Engine
    from mpiinfer.engine.runner import ModelRunner
    from mpiinfer.messages import Request
    from mpiinfer.tokenizer import Tokenizer
    d = model_dirs("qwen3")
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 22, dtype=dtype), Mesh.single(), Device("cpu"))
    assert runner.model.layers[0].attn.qkv.weight.dtype == getattr(torch, dtype)
    assert runner.model.layers[0].attn.qkv.weight.is_mkldnn is (dtype == "bfloat16")   # packed by default
    eng = Engine(runner, Tokenizer(d), max_batch=2, step_tokens=8)
    sp = SamplingParams(max_tokens=12, logprobs=True, ignore_eos=True)
    res = list(eng.generate([Request(i, i, sp, prompt="the old man and the sea " * (i + 1)) for i in range(3)]))
    assert all(len(r.token_ids) == 12 and all(lp <= 0 and lp > -50 for lp in r.logprobs) for r in res)
