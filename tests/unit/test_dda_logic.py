"""Pure logic of the DDA collectives (no MPI, no GPU): slicing, algorithm choice, thresholds,
bench helpers, CUDA-aware detection, and that the GPU module imports without CuPy."""
import itertools
import subprocess
import sys

import pytest
import torch

from mpiinfer.comm import collectives
from mpiinfer.comm.dda import (
    FALLBACK_THRESHOLDS,
    choose_algo,
    load_thresholds,
    split_bounds,
    thresholds_for,
)
from mpiinfer.comm.dda_cuda import cuda_aware_mpi, launch_config
from mpiinfer.tools.comm_bench import (
    format_table,
    iters_for,
    parse_sizes,
    pick_thresholds,
)


@pytest.mark.parametrize("numel", [0, 1, 7, 15, 16, 17, 1000, 1000003])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("esize", [2, 4])
def test_split_bounds_cover_and_align(numel, n, esize):
    b = split_bounds(numel, n, esize)
    assert len(b) == n + 1 and b[0] == 0 and b[-1] == numel
    assert all(x <= y for x, y in itertools.pairwise(b))
    step = 64 // esize
    assert all(x % step == 0 for x in b[:-1])          # inner boundaries on 64-byte lines
    sizes = [y - x for x, y in itertools.pairwise(b)]
    if numel >= n * step:                               # balanced to within one cache line
        assert max(sizes) - min(sizes) <= step + numel % step


def test_split_bounds_small_message_leaves_trailing_slices_empty():
    assert split_bounds(7, 4, 4) == [0, 0, 0, 0, 7]
    assert split_bounds(40, 2, 4) == [0, 16, 40]


TH = {"oneshot_max_bytes": 1024, "twoshot_max_bytes": 65536}


@pytest.mark.parametrize("nbytes,algo,want", [
    (8, "auto", "1shot"), (1024, "auto", "1shot"), (1028, "auto", "2shot"), (65536, "auto", "2shot"),
    (65540, "auto", "mpi"), (65540, "dda", "2shot"), (8, "dda", "1shot"),
    (10 ** 6, "1shot", "1shot"), (8, "2shot", "2shot"), (8, "mpi", "mpi"),
    (2 << 20, "dda", "mpi"), (2 << 20, "1shot", "mpi"),          # over capacity: MPI whatever asked
])
def test_choose_algo(nbytes, algo, want):
    assert choose_algo(nbytes, algo, TH, capacity=1 << 20) == want


def test_choose_algo_rejects_unknown():
    with pytest.raises(ValueError, match="allreduce algorithm"):
        choose_algo(8, "nccl", TH, 1 << 20)


def test_thresholds_for():
    table = {2: {"oneshot_max_bytes": 1, "twoshot_max_bytes": 2}, 4: {"oneshot_max_bytes": 3, "twoshot_max_bytes": 4}}
    assert thresholds_for(2, table)["twoshot_max_bytes"] == 2
    assert thresholds_for(3, table)["twoshot_max_bytes"] == 2      # nearest smaller measured size
    assert thresholds_for(8, table)["oneshot_max_bytes"] == 3
    assert thresholds_for(2, {}) == FALLBACK_THRESHOLDS


def test_shipped_thresholds_file_is_sane():
    table = load_thresholds()
    assert 2 in table
    for th in table.values():
        assert 0 <= th["oneshot_max_bytes"] <= th["twoshot_max_bytes"]


def test_load_thresholds_missing_file(tmp_path):
    assert load_thresholds(tmp_path / "nope.json") == {}


def _rows(lat):
    return [{"op": "allreduce", "algo": a, "bytes": s, "ranks": 2, "latency_us": v, "busbw_gbps": 0.0}
            for s, per in lat.items() for a, v in per.items()]


def test_pick_thresholds():
    rows = _rows({8: {"dda-1shot": 2, "dda-2shot": 5, "mpi": 4},
                  1024: {"dda-1shot": 3, "dda-2shot": 4, "mpi": 6},
                  65536: {"dda-1shot": 30, "dda-2shot": 20, "mpi": 40},
                  1 << 20: {"dda-1shot": 400, "dda-2shot": 390, "mpi": 300}})
    assert pick_thresholds(rows) == {"oneshot_max_bytes": 1024, "twoshot_max_bytes": 65536}
    # MPI always faster: nothing for DDA
    rows = _rows({8: {"dda-1shot": 9, "dda-2shot": 9, "mpi": 1}})
    assert pick_thresholds(rows) == {"oneshot_max_bytes": 0, "twoshot_max_bytes": 0}


def test_bench_helpers():
    assert parse_sizes("8:64") == [8, 16, 32, 64]
    assert parse_sizes("8:64M:4")[-1] == 32 << 20
    assert parse_sizes("8,1K,64KiB".replace("iB", "")) == [8, 1024, 65536]
    assert iters_for(8, 200) == 200 and iters_for(64 << 20, 200) == 30
    rows = _rows({8: {"dda": 2.0, "auto": 2.0, "mpi": 4.0}})
    table = format_table(rows, ["dda", "auto", "mpi"])
    assert "8 B" in table and "2.00" in table


def test_launch_config():
    assert launch_config(0) == (1, 512)
    assert launch_config(513) == (2, 512)
    assert launch_config(10 ** 9) == (1024, 512)


@pytest.mark.parametrize("version,env,info,want", [
    ("MPICH Version: 5.0.2 ... --with-device=ch4:ucx", {}, "", False),
    ("MPICH Version: 4.2 ... --with-cuda=/usr/local/cuda", {}, "", True),
    ("MPICH Version: 4.2 ... --with-cuda=/usr/local/cuda", {"MPIR_CVAR_ENABLE_GPU": "0"}, "", False),
    ("Open MPI v5.0.3", {}, "mca:mpi:base:param:mpi_built_with_cuda_support:value:true", True),
    ("Open MPI v5.0.3", {}, "mca:mpi:base:param:mpi_built_with_cuda_support:value:false", False),
    ("Open MPI v5.0.3", {"OMPI_MCA_opal_cuda_support": "false"},
     "mpi_built_with_cuda_support:value:true", False),
    ("MVAPICH2 2.3.7", {"MV2_USE_CUDA": "1"}, "", True),
    ("whatever", {"MPIINFER_CUDA_AWARE_MPI": "1"}, "", True),
    ("Open MPI v5", {"MPIINFER_CUDA_AWARE_MPI": "0"}, "mpi_built_with_cuda_support:value:true", False),
])
def test_cuda_aware_mpi(version, env, info, want):
    assert cuda_aware_mpi(version, env, ompi_info=info) is want


def test_gpu_module_imports_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"           # make `import cupy` fail
            "import mpiinfer.comm.dda_cuda as m\n"
            "assert m._cp is None and m.CudaDDAComm and m.UNVERIFIED\n"
            "try:\n    m._cupy()\nexcept ImportError:\n    print('lazy')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "lazy" in p.stdout, p.stderr


class _FakeDDA:
    """Duck-typed communicator: collectives must hand tensors to its methods."""
    def __init__(self):
        self.calls = []

    def Get_size(self):
        return 2

    def all_reduce_tensor(self, t):
        self.calls.append("reduce")
        return t.mul_(2)

    def all_gather_tensor(self, t, dim):
        self.calls.append(("gather", dim))
        return torch.cat([t, t], dim=dim)


def test_collectives_delegate_by_duck_typing():
    c = _FakeDDA()
    assert torch.equal(collectives.all_reduce(torch.ones(3), c), torch.full((3,), 2.0))
    assert collectives.all_gather(torch.ones(2, 3), c, 0).shape == (4, 3)
    assert c.calls == ["reduce", ("gather", 0)]
    x = torch.ones(3)
    assert collectives.all_reduce(x, None) is x
