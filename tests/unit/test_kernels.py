"""CPU kernels: oneDNN linear equals F.linear per dtype; 16-bit weights run end to end."""
import pytest
import torch
import torch.nn.functional as F

from mpiinfer.kernels import linear


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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_weights_generate(dtype, model_dirs):
    from mpiinfer.config import EngineConfig, SamplingParams
    from mpiinfer.device import Device
    from mpiinfer.dist.mesh import Mesh
    from mpiinfer.engine.generate import Engine
    from mpiinfer.engine.runner import ModelRunner
    from mpiinfer.messages import Request
    from mpiinfer.tokenizer import Tokenizer
    d = model_dirs("qwen3")
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 22, dtype=dtype), Mesh.single(), Device("cpu"))
    assert runner.model.layers[0].attn.qkv.weight.dtype == getattr(torch, dtype)
    eng = Engine(runner, Tokenizer(d), max_batch=2, step_tokens=8)
    sp = SamplingParams(max_tokens=12, logprobs=True, ignore_eos=True)
    res = list(eng.generate([Request(i, i, sp, prompt="the old man and the sea " * (i + 1)) for i in range(3)]))
    assert all(len(r.token_ids) == 12 and all(lp <= 0 and lp > -50 for lp in r.logprobs) for r in res)
