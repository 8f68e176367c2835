"""Direct-data-access collectives on CUDA tensors: CuPy IPC buffers, flags in device memory.

Owns: ``CudaDDAComm`` (the GPU twin of ``dda.DDAComm``: same constructor, ``Get_size``,
``Get_rank``, ``all_reduce_tensor``, ``all_gather_tensor``, ``set_algo``, ``close``),
``cuda_aware_mpi`` (detection, with a host-staged fallback when MPI is not CUDA-aware)
and the pure launch arithmetic.  Communicator: the one passed in; a node communicator
inside it (real, or fake nodes with ``MPIINFER_FAKE_NODE_SIZE``) exchanges the IPC
handles once; node leaders (or NCCL over the whole communicator) carry the large and the
inter-node messages.  CuPy is imported lazily: this module imports on CPU-only machines.

STATUS: written without a GPU; only the pure functions are tested (tests/unit).  What is
unverified is listed in ``UNVERIFIED`` below and in the project note.

Buffers: every rank ``cudaMalloc``s one segment (256-byte header of int64 flags + two slots
of ``max_bytes``), exports it with ``cudaIpcGetMemHandle``, and opens its node peers'
segments with ``cudaIpcOpenMemHandle``; handles travel once over ``node.allgather``.  The
epoch / double-slot protocol is the CPU one (see ``dda.py``), executed in stream order on
the caller's current torch stream:

    one-shot   memcpyAsync(in -> my slot b); signal kernel (threadfence_system, ARRIVE = e,
               spin until every peer's ARRIVE >= e); sum kernel over slot b of ranks 0..n-1.
    two-shot   ... ARRIVE; sum kernel over my slice, written to out and to my slot; signal
               SLICE; memcpyAsync every peer's slice.
    hierarchical  node leader sums its node, inter-node allreduce (NCCL or MPI), copies the
               result to its slot, signals BCAST; the others wait on BCAST and copy.

The signal kernel spins with a %globaltimer deadline; on timeout it writes peer+1 into a
mapped pinned host word and returns.  The host checks that word at the next call (and in
``check()``), raising ``DDATimeout`` naming the peer; results computed after a timeout are
garbage, as with any aborted collective.  Sum order: rank 0..n-1, in float32 for
bfloat16 / float16 (rounded once); hierarchical 16-bit rounds the node sum once more.
"""
from __future__ import annotations

import ctypes
import os
import subprocess

import numpy as np
import torch

from .dda import (
    ALGOS,
    ARRIVE,
    BCAST,
    DEFAULT_TIMEOUT_S,
    HEADER,
    SLICE,
    CommWrapper,
    DDATimeout,
    choose_algo,
    fake_node_size,
    split_bounds,
)

UNVERIFIED = (
    "every CUDA path: IPC handle exchange and mapping, the signal / sum kernels (NVRTC compile,"
    " memory ordering with __threadfence_system across processes), timeout reporting through"
    " mapped host memory, NCCL init and calls (NCCL refuses two ranks on one GPU: then MPI is used),"
    " CUDA-aware MPI buffer passing, the host-staged fallback, thresholds (defaults are guesses)")

GPU_THRESHOLDS = {"oneshot_max_bytes": 256 << 10, "twoshot_max_bytes": 8 << 20}   # untuned guesses
THREADS = 512
MAX_BLOCKS = 1024
_cp = None


def _cupy():
    global _cp
    if _cp is None:
        import cupy
        _cp = cupy
    return _cp


# ---------------------------------------------------------------- pure logic

def launch_config(numel: int, threads: int = THREADS, max_blocks: int = MAX_BLOCKS) -> tuple:
    """(blocks, threads) for a grid-stride loop over ``numel`` elements (at least one block)."""
    return (max(1, min(max_blocks, -(-numel // threads))), threads)


def cuda_aware_mpi(version: str = "", env=None, ompi_info=None) -> bool:
    """Whether MPI may be handed device pointers.

    ``MPIINFER_CUDA_AWARE_MPI=1|0`` decides when set.  Else: Open MPI when ``ompi_info``
    reports ``mpi_built_with_cuda_support:value:true`` (and opal_cuda_support is not
    switched off), MPICH when built ``--with-cuda`` and ``MPIR_CVAR_ENABLE_GPU`` is not 0,
    MVAPICH2 with ``MV2_USE_CUDA=1``.  Anything else: no (host-staged copies)."""
    env = os.environ if env is None else env
    forced = env.get("MPIINFER_CUDA_AWARE_MPI", "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    v = version or ""
    if "Open MPI" in v:
        if env.get("OMPI_MCA_opal_cuda_support", "").lower() in ("0", "false"):
            return False
        info = ompi_info if ompi_info is not None else _ompi_info()
        return "mpi_built_with_cuda_support:value:true" in info
    if "MVAPICH" in v:
        return env.get("MV2_USE_CUDA", "0") == "1"
    if "MPICH" in v:
        return "with-cuda" in v and env.get("MPIR_CVAR_ENABLE_GPU", "1") != "0"
    return False


def nccl_communicator(comm):
    """(CuPy NCCL communicator over ``comm``, None) or (None, why not), the outcome agreed by every rank, so none
    waits in a collective the others skipped (not built; ranks sharing a GPU: "Duplicate GPU detected")."""
    uid = err = None
    try:
        from cupy.cuda import nccl
        if comm.Get_rank() == 0:
            uid = nccl.get_unique_id()
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    errs = [e for e in comm.allgather(err) if e]          # agreed before the collective constructor
    if errs:
        return None, errs[0]
    uid = comm.bcast(uid, root=0)
    nc = None
    try:
        nc = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    errs = [e for e in comm.allgather(err) if e]
    return (None, errs[0]) if errs else (nc, None)


def nccl_dtype(dtype: torch.dtype):
    """NCCL's code for a torch dtype (None: NCCL does not take it here)."""
    from cupy.cuda import nccl
    return {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
            torch.bfloat16: getattr(nccl, "NCCL_BFLOAT16", None)}.get(dtype)


def _ompi_info() -> str:
    try:
        return subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True,
                              timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ---------------------------------------------------------------- kernels

_SRC = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef long long i64;
typedef unsigned long long u64;

__device__ __forceinline__ u64 now_ns() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }

// One thread.  publish >= 0: set my flag[publish] = epoch (after a system fence, so every
// earlier write of this stream is visible first).  Then wait until flag[wait] >= epoch on
// every peer (wait_rank < 0) or on wait_rank only.  Timeout: *status = peer + 1.
extern "C" __global__ void dda_signal(const u64* bases, int n, int me, int publish, int wait,
                                      int wait_rank, i64 epoch, i64 timeout_ns, int* status) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (publish >= 0) {
        __threadfence_system();
        *((volatile i64*)bases[me] + publish) = epoch;
    }
    if (wait < 0) return;
    u64 t0 = now_ns();
    for (int p = 0; p < n; ++p) {
        if (p == me || (wait_rank >= 0 && p != wait_rank)) continue;
        volatile const i64* f = (volatile const i64*)bases[p] + wait;
        while (*f < epoch) {
            if ((i64)(now_ns() - t0) > timeout_ns) { *(volatile int*)status = p + 1; __threadfence_system(); return; }
        }
    }
    __threadfence_system();
}

// out[i] = sum over p = 0..n-1 of slot_p[i] for i in [lo, hi), summed in float, in rank order;
// own (may be null) gets the same value (two-shot: my reduced slice, read by the peers).
#define DDA_SUM(NAME, T, TOF, FROMF)                                                          \
extern "C" __global__ void NAME(const u64* bases, int n, i64 off, i64 lo, i64 hi, T* out, T* own) { \
    for (i64 i = lo + blockIdx.x * (i64)blockDim.x + threadIdx.x; i < hi; i += (i64)gridDim.x * blockDim.x) { \
        float acc = TOF(__ldcg((const T*)(bases[0] + off) + i));                              \
        for (int p = 1; p < n; ++p) acc += TOF(__ldcg((const T*)(bases[p] + off) + i));       \
        T v = FROMF(acc);                                                                     \
        out[i] = v;                                                                           \
        if (own) own[i] = v;                                                                  \
    }                                                                                         \
}
__device__ __forceinline__ float id_f(float x) { return x; }
DDA_SUM(dda_sum_f32, float, id_f, id_f)
DDA_SUM(dda_sum_f16, __half, __half2float, __float2half_rn)
DDA_SUM(dda_sum_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
"""

_SUM_KERNEL = {torch.float32: "dda_sum_f32", torch.float16: "dda_sum_f16", torch.bfloat16: "dda_sum_bf16"}
_module = None


def _kernels():
    global _module
    if _module is None:
        cp = _cupy()
        _module = cp.RawModule(code=_SRC, options=("--std=c++14",), name_expressions=None)
    return _module


# ---------------------------------------------------------------- the communicator

class CudaDDAComm(CommWrapper):
    """``CudaDDAComm(comm, max_bytes=8 << 20, algo="auto", thresholds=None, timeout=30.0, use_nccl=None)``

    Same contract as ``dda.DDAComm`` for CUDA tensors on this rank's current device.
    ``use_nccl``: None = when ``cupy.cuda.nccl`` imports and initialises; the large-message
    path is NCCL, else MPI (CUDA-aware when ``cuda_aware_mpi()``, else host-staged)."""

    def __init__(self, comm, max_bytes: int = 8 << 20, algo: str = "auto",
                 thresholds: dict | None = None, timeout: float = DEFAULT_TIMEOUT_S, use_nccl: bool | None = None):
        from mpi4py import MPI
        cp = _cupy()
        if algo not in ALGOS:
            raise ValueError(f"allreduce algorithm must be one of {ALGOS}, got {algo!r}")
        self.comm, self.algo, self.timeout = comm, algo, float(timeout)
        self._MPI = MPI
        self._size, self._rank = comm.Get_size(), comm.Get_rank()
        self.thresholds = dict(thresholds or GPU_THRESHOLDS)
        self.capacity = -(-int(max_bytes) // 256) * 256
        self._epoch = 0
        self._closed = False
        self.cuda_aware = cuda_aware_mpi(MPI.Get_library_version())

        shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self._rank)
        k = fake_node_size()
        self.node = shared.Split(color=self._rank // k, key=self._rank) if k > 0 else shared
        if k > 0:
            shared.Free()
        self._n, self._me = self.node.Get_size(), self.node.Get_rank()
        self.hierarchical = self._n < self._size
        lead = comm.Split(color=0 if self._me == 0 else MPI.UNDEFINED, key=self._rank) if self.hierarchical else None
        self.leaders = None if lead is None or lead == MPI.COMM_NULL else lead
        self._comm_rank_of = self.node.allgather(self._rank)

        rt = cp.cuda.runtime
        seg = HEADER + 2 * self.capacity
        self._own = rt.malloc(seg)
        rt.memset(self._own, 0, HEADER)
        rt.deviceSynchronize()
        handles = self.node.allgather(rt.ipcGetMemHandle(self._own))
        err = None
        self._bases = []
        for r, h in enumerate(handles):
            try:                     # lazy peer access; fails without peer-to-peer between the two GPUs
                self._bases.append(self._own if r == self._me else rt.ipcOpenMemHandle(h, 1))
            except Exception as e:
                err = f"rank {self._rank} cannot map the buffer of node rank {r}: {type(e).__name__}: {e}"
                break
        errs = [e for e in self.node.allgather(err) if e]
        if errs:                     # agreed: every rank of the node raises (Mesh.build falls back to MPI)
            for r, b in enumerate(self._bases):
                if r != self._me:
                    rt.ipcCloseMemHandle(b)
            rt.free(self._own)
            raise RuntimeError("CUDA IPC between this node's GPUs failed: " + errs[0])
        self._bases_dev = cp.asarray(np.array(self._bases, dtype=np.uint64))
        self._status_host = rt.hostAlloc(4, 2)                                    # cudaHostAllocMapped
        ctypes.c_int.from_address(self._status_host).value = 0
        # the device's address of the mapped word (equal to the host's under unified addressing)
        self._status_dev = rt.pointerGetAttributes(self._status_host).devicePointer
        mod = _kernels()
        self._signal = mod.get_function("dda_signal")
        self._sum_k = {dt: mod.get_function(n) for dt, n in _SUM_KERNEL.items()}
        self._streams: dict = {}
        self._timeout_ns = int(self.timeout * 1e9)

        self.nccl = None
        if use_nccl is not False:
            self.nccl, why = nccl_communicator(comm)
            if self.nccl is None and use_nccl:
                raise RuntimeError(f"NCCL was asked for and could not start: {why}")
        self.node.Barrier()

    def set_algo(self, algo: str, thresholds: dict | None = None) -> None:
        if algo not in ALGOS:
            raise ValueError(f"allreduce algorithm must be one of {ALGOS}, got {algo!r}")
        self.algo = algo
        if thresholds:
            self.thresholds = dict(thresholds)

    def check(self) -> None:
        """Raise ``DDATimeout`` if a signal kernel of this object timed out."""
        v = ctypes.c_int.from_address(self._status_host).value
        if v:
            raise DDATimeout(f"rank {self._comm_rank_of[v - 1]} did not reach a DDA epoch within "
                             f"{self.timeout:g} s (seen by rank {self._rank}, device side)")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        cp = _cupy()
        rt = cp.cuda.runtime
        rt.deviceSynchronize()
        self.node.Barrier()                  # nobody reads my segment any more
        for r, b in enumerate(self._bases):
            if r != self._me:
                rt.ipcCloseMemHandle(b)
        self.node.Barrier()
        rt.free(self._own)
        rt.freeHost(self._status_host)
        if self.leaders is not None:
            self.leaders.Free()
        self.node.Free()

    # ------------------------------------------------------------ pieces
    def _stream(self):
        ptr = torch.cuda.current_stream().cuda_stream
        s = self._streams.get(ptr)
        if s is None:
            s = self._streams[ptr] = _cupy().cuda.ExternalStream(ptr)
        return s

    def _sig(self, stream, publish, wait, e, wait_rank=-1):
        self._signal((1,), (1,), (self._bases_dev, np.int32(self._n), np.int32(self._me), np.int32(publish),
                                  np.int32(wait), np.int32(wait_rank), np.int64(e), np.int64(self._timeout_ns),
                                  np.uint64(self._status_dev)), stream=stream)

    def _copy(self, dst, src, nbytes, stream):
        if nbytes:
            _cupy().cuda.runtime.memcpyAsync(dst, src, nbytes, 4, stream.ptr)   # cudaMemcpyDefault (UVA)

    def _sum(self, t, stream, off, lo, hi, out_ptr, own_ptr):
        if hi <= lo:
            return
        k = self._sum_k[t.dtype]
        blocks, threads = launch_config(hi - lo)
        k((blocks,), (threads,), (self._bases_dev, np.int32(self._n), np.int64(off), np.int64(lo), np.int64(hi),
                                  np.uint64(out_ptr), np.uint64(own_ptr)), stream=stream)

    def _large(self, t: torch.Tensor, comm=None) -> torch.Tensor:
        """NCCL over the whole communicator, else MPI (CUDA-aware or host-staged)."""
        if comm is None and self.nccl is not None:
            code = nccl_dtype(t.dtype)
            if code is not None:
                from cupy.cuda import nccl
                self.nccl.allReduce(t.data_ptr(), t.data_ptr(), t.numel(), code, nccl.NCCL_SUM,
                                    torch.cuda.current_stream().cuda_stream)
                return t
        comm = comm if comm is not None else self.comm
        MPI = self._MPI
        if self.cuda_aware:
            f = t if t.dtype == torch.float32 else t.float()
            torch.cuda.current_stream().synchronize()
            comm.Allreduce(MPI.IN_PLACE, [f, MPI.FLOAT], op=MPI.SUM)
            if f is not t:
                t.copy_(f)
            return t
        h = t.float().cpu()                  # host-staged (synchronises)
        comm.Allreduce(MPI.IN_PLACE, h.numpy(), op=MPI.SUM)
        t.copy_(h)
        return t

    # ------------------------------------------------------------ collectives
    def all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self._size == 1:
            return t
        if self._closed:
            raise RuntimeError("CudaDDAComm used after close()")
        if not t.is_cuda:
            raise TypeError("CudaDDAComm reduces CUDA tensors; use dda.DDAComm for CPU tensors")
        self.check()
        if self.hierarchical and self.nccl is not None:
            return self._large(t)          # NCCL spans the nodes itself: no node step before it
        if not t.is_contiguous():
            return t.copy_(self.all_reduce_tensor(t.contiguous()))
        nbytes = t.numel() * t.element_size()
        algo = choose_algo(nbytes, self.algo, self.thresholds, self.capacity)
        if t.dtype not in _SUM_KERNEL or algo == "mpi" or t.numel() == 0:
            return self._large(t)
        self._epoch += 1
        e, b = self._epoch, self._epoch & 1
        off = HEADER + b * self.capacity
        own = self._own + off
        s = self._stream()
        ptr = t.data_ptr()
        self._copy(own, ptr, nbytes, s)
        if self.hierarchical:
            if self._me == 0:
                self._sig(s, ARRIVE, ARRIVE, e)
                self._sum(t, s, off, 0, t.numel(), ptr, 0)
                self._large(t, self.leaders)
                self._copy(own, ptr, nbytes, s)
                self._sig(s, BCAST, -1, e)
            else:
                self._sig(s, ARRIVE, BCAST, e, wait_rank=0)
                self._copy(ptr, self._bases[0] + off, nbytes, s)
            return t
        if algo == "1shot":
            self._sig(s, ARRIVE, ARRIVE, e)
            self._sum(t, s, off, 0, t.numel(), ptr, 0)
            return t
        es = t.element_size()
        bounds = split_bounds(t.numel(), self._n, es, align=256)
        self._sig(s, ARRIVE, ARRIVE, e)
        self._sum(t, s, off, bounds[self._me], bounds[self._me + 1], ptr, own)
        self._sig(s, SLICE, SLICE, e)
        for r in range(self._n):
            if r != self._me:
                lo, hi = bounds[r], bounds[r + 1]
                self._copy(ptr + lo * es, self._bases[r] + off + lo * es, (hi - lo) * es, s)
        return t

    def all_gather_tensor(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self._size == 1:
            return t
        self.check()
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        out = torch.empty((self._size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        if self.hierarchical or nbytes > self.capacity or self.algo == "mpi":
            code = nccl_dtype(t.dtype) if self.nccl is not None else None
            if code is not None:
                self.nccl.allGather(t.data_ptr(), out.data_ptr(), t.numel(), code,
                                    torch.cuda.current_stream().cuda_stream)
            else:
                from .collectives import mpi_all_gather
                return mpi_all_gather(t.cpu(), self.comm, dim).to(t.device)
        else:
            self._epoch += 1
            e, b = self._epoch, self._epoch & 1
            off = HEADER + b * self.capacity
            s = self._stream()
            self._copy(self._own + off, t.data_ptr(), nbytes, s)
            self._sig(s, ARRIVE, ARRIVE, e)
            for r in range(self._n):
                self._copy(out[r].data_ptr(), self._bases[r] + off, nbytes, s)
        return torch.cat(out.unbind(0), dim=dim % t.dim()) if t.dim() else out
