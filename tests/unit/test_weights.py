"""The loader reads exactly the requested slice, byte for byte, for every dtype and slice direction."""
import itertools

import pytest
import torch
from safetensors.torch import save_file

from mpiinfer.config import ConfigError
from mpiinfer.parallel.shard import (
    Slice,
    balanced_range,
    even_range,
    kv_heads_for_rank,
    q_heads_for_rank,
)
from mpiinfer.weights.index import CheckpointIndex
from mpiinfer.weights.loader import WeightSource


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_slices_equal_full_tensor_slices(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(12, 10, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype),
               "c": torch.randn(3, 5, 4, generator=g).to(dtype), "s": torch.tensor(2.5).to(dtype)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    src = WeightSource(CheckpointIndex(str(tmp_path)))
    a = tensors["a"]
    assert torch.equal(src.read("a", (12, 10)), a)
    assert torch.equal(src.read("a", (12, 10), Slice(0, 3, 9)), a[3:9])
    assert torch.equal(src.read("a", (12, 10), Slice(1, 2, 7)), a[:, 2:7])
    assert torch.equal(src.read("b", (7,), Slice(0, 1, 4)), tensors["b"][1:4])
    assert torch.equal(src.read("c", (3, 5, 4), Slice(0, 1, 3)), tensors["c"][1:3])
    assert src.bytes_read == (120 + 60 + 60 + 3 + 40) * a.element_size()
    # blocks of 3-d tensors (Llama 4's fused experts): experts x columns of the last dim, experts x middle rows
    c = tensors["c"]
    assert torch.equal(src.read("c", (3, 5, 4), Slice(0, 1, 3), Slice(2, 1, 3)), c[1:3, :, 1:3])
    assert torch.equal(src.read("c", (3, 5, 4), Slice(0, 0, 2), Slice(1, 2, 5)), c[0:2, 2:5])
    assert torch.equal(src.read("c", (3, 5, 4), Slice(1, 4, 5)), c[:, 4:5])
    assert torch.equal(src.read("c", (3, 5, 4), Slice(0, 2, 2)), c[2:2])
    with pytest.raises(ValueError, match="unsupported slice"):
        src.read("c", (3, 5, 4), Slice(3, 0, 1))
    assert torch.equal(src.read("s", ()), tensors["s"])                   # a scalar
    with pytest.raises(ConfigError, match="has shape"):
        src.read("a", (10, 12))
    with pytest.raises(ConfigError, match="missing tensor 'zzz'"):
        src.read("zzz", (1,))
    src.close()


def test_shard_arithmetic():
    assert [even_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # tp > kv heads: each KV head replicated on consecutive ranks
    assert [kv_heads_for_rank(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_heads_for_rank(1, 2, r) for r in range(2)] == [(0, 1), (0, 1)]
    assert [kv_heads_for_rank(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        kv_heads_for_rank(3, 4, 0)
    # uneven: whole GQA groups, the first ranks one more (SmolLM2-135M: 9 query / 3 KV heads at tp=2)
    assert [kv_heads_for_rank(3, 2, r) for r in range(2)] == [(0, 2), (2, 3)]
    assert [q_heads_for_rank(9, 3, 2, r) for r in range(2)] == [(0, 6), (6, 9)]
    assert [q_heads_for_rank(8, 2, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [balanced_range(1536 + 3, r, 4) for r in range(4)] == [(0, 385), (385, 770), (770, 1155), (1155, 1539)]
    for size, world in ((7, 3), (75, 2), (12, 4)):
        parts = [balanced_range(size, r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == size and all(a[1] == b[0] for a, b in itertools.pairwise(parts))


def test_mxfp4_dequantize_equals_transformers_and_round_trips():
    """gpt-oss's MXFP4 blocks: the same values as transformers' dequantization (which also transposes to
    input-major), and ``quantize`` (test checkpoints) picks the nearest code."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mpiinfer.weights.mxfp4 import dequantize, quantize
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(115, 135, (3, 8, 2), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)        # (3, 64, 8)
    assert torch.equal(dequantize(blocks, scales), ref.transpose(1, 2))
    w = torch.randn(2, 4, 64, generator=g)
    b, s = quantize(w)
    assert torch.equal(dequantize(*quantize(dequantize(b, s))), dequantize(b, s))   # codes are fixed points
    amax = w.abs().reshape(2, 4, 2, 32).amax(-1).repeat_interleave(32, -1)       # each block's largest value
    # a block's largest value scales into (3, 6]: the widest FP4 step (4 -> 6) is 2, half of it 1, over 3
    assert ((dequantize(b, s) - w).abs() / amax).max() <= 1 / 3
    with pytest.raises(ValueError, match="do not pair up"):
        dequantize(blocks, scales[..., :1])


def test_fp8_block_scaled_slices_equal_the_dequantized_whole(tmp_path):
    """FP8 e4m3 weights with one float32 scale per 3 x 4 block: any row or column slice (starting mid-block) is the
    same slice of the whole dequantized matrix; a float8 tensor without scales is refused."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(7, 10, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 3, generator=g) + 0.5                         # ceil(7 / 3) x ceil(10 / 4)
    save_file({"w.weight": q, "w.weight_scale_inv": scale, "bare.weight": q.clone()}, str(tmp_path / "model.safetensors"))
    whole = q.float() * scale.repeat_interleave(3, 0).repeat_interleave(4, 1)[:7, :10]
    src = WeightSource(CheckpointIndex(str(tmp_path)), fp8_block=(3, 4))
    assert torch.equal(src.read("w.weight", (7, 10)), whole)
    assert torch.equal(src.read("w.weight", (7, 10), Slice(0, 2, 6)), whole[2:6])
    assert torch.equal(src.read("w.weight", (7, 10), Slice(1, 5, 9)), whole[:, 5:9])
    with pytest.raises(ConfigError, match="without block scales"):
        src.read("bare.weight", (7, 10))
    with pytest.raises(ConfigError, match="without block scales"):
        WeightSource(CheckpointIndex(str(tmp_path))).read("w.weight", (7, 10))
    src.close()
