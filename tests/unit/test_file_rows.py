"""``FileRows``: embedding rows read from the checkpoint on demand equal the loaded table's rows."""
import pytest
import torch

from mpiinfer.weights.index import CheckpointIndex
from mpiinfer.weights.loader import FileRows, WeightSource


@pytest.mark.parametrize("ckpt_dtype,run_dtype", [("float32", torch.float32), ("bfloat16", torch.float32),
                                                  ("bfloat16", torch.bfloat16), ("float32", torch.bfloat16)])
def test_rows_equal_loaded_table(tmp_path, ckpt_dtype, run_dtype):
    from mpiinfer.tools.init_model import init_model
    d = init_model(str(tmp_path / "m"), arch="llama", preset="tiny", dtype=ckpt_dtype)
    index = CheckpointIndex(d)
    name = "model.embed_tokens.weight"
    vocab, hidden = index[name].shape
    src = WeightSource(index)
    table = src.read(name, (vocab, hidden)).to(run_dtype)       # what loading puts in memory
    src.close()
    start, stop = 5, vocab - 3                                   # a vocab-parallel shard
    rows = FileRows(index, name, start, stop, run_dtype)
    ids = torch.tensor([0, 7, 7, stop - start - 1, 3, 0, 12])  # repeats, both ends
    got = rows[ids]
    assert got.dtype == run_dtype and got.shape == (len(ids), hidden)
    assert torch.equal(got, table[start:stop][ids])
    assert torch.equal(rows.block(2, 9), table[start + 2:start + 9])
    assert torch.equal(rows.block(0, stop - start), table[start:stop])
    with pytest.raises(IndexError):
        rows[torch.tensor([stop - start])]
    with pytest.raises(IndexError):
        rows.block(3, stop - start + 1)
    rows.close()
