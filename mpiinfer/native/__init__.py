"""CPU kernels in C for the per-token work between the matmuls (``kernels.c``, ``rope.c`` beside this file).

Owns: building ``kernels.c`` and ``rope.c`` once per machine type into a shared library (``cc -O3 -march=native
-fopenmp``, cached under ``$MPIINFER_CACHE`` or ``~/.cache/mpiinfer``, keyed by the source, the compiler and the CPU's flags:
nodes of another CPU type sharing a home directory build their own), loading it with ctypes, and calls on
contiguous CPU tensors of float32 or bfloat16:

* ``decode_attention``: attention of many query rows, each over its own runs of a paged KV cache, read where they
  lie (no gather, no Python loop over sequences): the one-token decodes, and each row of a prompt chunk over the
  rows up to its position (``models.attention.native_items``); one OpenMP item per (query row, KV head), in tiles
  of 16 rows with AVX-512, 8 with AVX2 + FMA, else a row at a time (whatever ``-march=native`` gives);
* ``rope_store``: rotary embedding of q and k in place and the step's K/V rows written into the cache (what
  ``Rotary.apply`` twice and two ``index_copy_`` did, bit for bit);
* ``logit_stats``: each row's first maximum (greedy tokens, as ``torch.argmax``) and, when asked, its maximum and
  log-sum-exp (logprobs by torch's log_softmax formula), in one pass per row chunk; a row's results do not depend
  on the rows beside it;
* ``rms_norm`` (with the residual add before it, in place) and ``silu_mul`` (SwiGLU's activation): one pass each
  instead of 4-8 torch ops that each allocate a temporary; within rounding of the torch ops (the sum of squares
  and the exponential in another order / formula).

Why: at batch 200+ the decode attention as a loop of torch calls cost as much as all the matmuls of a step (2
bmm + softmax per sequence and layer, ~10 us each; SmolLM2-135M at 222 sequences: ~200 ms a step of ~400).

``available()`` is False when no C compiler works (or ``MPIINFER_NATIVE=0``): the models then use their torch
paths, which stay the reference for these kernels in the tests.  The build is three compiler calls (~1 s); ranks
building at once write their own temporary files and rename the library into place.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger("mpiinfer")

HERE = Path(__file__).parent
# (source, its own flags): the attention may fuse multiply-adds; the rotary embedding must round as torch does
SOURCES = (("kernels.c", ["-ffp-contract=fast"]), ("rope.c", ["-ffp-contract=off"]))
HEADERS = ("common.h",)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11"]
# builds for CPUs with fewer vector extensions than this one (x86), for the tests and bench_decode.py --isa:
# AVX-512 without its bfloat16 dot products (Skylake-SP to Ice Lake), the AVX2 + FMA tiles, and the row-at-a-time
# kernel (no AVX2: an old x86, or a CPU of another ISA)
ISA_FLAGS = {"native": [], "avx512": ["-mno-avx512bf16"], "avx2": ["-mno-avx512f"],
             "rows": ["-mno-avx512f", "-mno-avx2", "-mno-fma"]}
MAX_GROUP = 64          # query heads per KV head the decode kernel holds (kernels.c's l[64])

_LIB: list = []          # [ctypes.CDLL or None], once tried
_I64, _F32 = ctypes.c_int64, ctypes.c_float
_P, _INT = ctypes.c_void_p, ctypes.c_int


def _cpu_key() -> str:
    """The CPU's model and flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        import platform
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("MPIINFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mpiinfer")
    return Path(base) / "native"


def _build() -> Path | None:
    cc = _compiler()
    if cc is None:
        log.info("native kernels off: no C compiler (cc / gcc / $CC) found; using the torch paths")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.info("native kernels off: %s --version failed (%s)", cc, e)
        return None
    parts = [(HERE / name).read_bytes() + " ".join(flags).encode() for name, flags in SOURCES]
    parts += [(HERE / name).read_bytes() for name in HEADERS]
    key = hashlib.sha256(b"\0".join(parts + [" ".join(FLAGS).encode(), version.encode(), _cpu_key().encode()]))
    out = _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    try:
        build_library(out, cc=cc)
        return out
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning("native kernels off: building them with %s failed (%s)", cc, e)
        return None


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_library(out: Path, extra_flags=(), source_dir: Path = HERE, cc: str | None = None) -> None:
    """Compile the kernels into the shared library ``out`` (renamed into place: another rank building the same
    file is harmless).  ``extra_flags`` come after FLAGS: e.g. ``-mno-avx512f`` builds what a CPU without AVX-512
    runs (the tests and ``bench_decode.py --isa``); ``source_dir``: another tree's sources (the benchmark's
    before/after)."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc / $CC)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tempfile.mkdtemp(dir=out.parent)
    try:
        objs = []
        for name, flags in SOURCES:
            obj = os.path.join(tmpdir, name + ".o")
            _compile([cc, *FLAGS, *extra_flags, *flags, "-c", str(Path(source_dir) / name), "-o", obj])
            objs.append(obj)
        tmp = os.path.join(tmpdir, "kernels.so")
        _compile([cc, "-shared", "-fopenmp", *objs, "-o", tmp, "-lm"])
        os.replace(tmp, out)           # atomic
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def load_library(path: Path):
    """The ctypes library at ``path`` with the kernels' signatures declared."""
    lib = ctypes.CDLL(str(path))
    lib.decode_attention.restype = None
    lib.decode_attention.argtypes = [
        _P, _I64, _P, _P, _I64, _INT, _INT, _INT, _I64, _P, _P, _P, _P, _I64, _F32, _P, _I64,
        _P, _P, _P, _INT, _INT, _INT]
    if hasattr(lib, "rms_norm"):                   # not in builds of older sources either
        lib.rms_norm.restype = None
        lib.rms_norm.argtypes = [_P, _I64, _P, _I64, _P, _I64, _I64, _INT, _INT, _P, _P, _F32, _INT, _INT, _INT]
        lib.silu_mul.restype = None
        lib.silu_mul.argtypes = [_P, _I64, _I64, _INT, _P, _I64, _INT, _INT]
    if hasattr(lib, "logit_stats"):                # not in builds of older sources
        lib.logit_stats.restype = None
        lib.logit_stats.argtypes = [_P, _I64, _I64, _I64, _INT, _P, _P, _P, _INT]
    if hasattr(lib, "decode_tile_width"):          # not in builds of older sources (bench_decode.py --old-src)
        lib.decode_tile_width.restype = _INT
        lib.decode_tile_width.argtypes = []
    if hasattr(lib, "decode_bf16_dot"):
        lib.decode_bf16_dot.restype = _INT
        lib.decode_bf16_dot.argtypes = []
    lib.rope_store.restype = None
    lib.rope_store.argtypes = [
        _P, _I64, _INT, _P, _I64, _P, _I64, _INT, _INT, _I64, _P, _P, _P, _P, _P, _I64, _P,
        _INT, _INT, _INT]
    return lib


def _compile(cmd: list) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}:\n{p.stderr[-2000:]}")


def _lib():
    if not _LIB:
        lib = None
        if os.environ.get("MPIINFER_NATIVE", "1") not in ("0", "off", "no"):
            so = _build()
            if so is not None:
                try:
                    lib = load_library(so)
                except OSError as e:
                    log.warning("native kernels off: loading %s failed (%s)", so, e)
                    lib = None
        _LIB.append(lib)
    return _LIB[0]


def available() -> bool:
    """The kernels are built and loaded (False: no compiler, a failed build, or MPIINFER_NATIVE=0)."""
    return _lib() is not None


def tile_width() -> int:
    """Cache rows per tile of this build's decode attention: 16 (AVX-512), 8 (AVX2 + FMA), 0 (a row at a time);
    0 without the kernels."""
    lib = _lib()
    return lib.decode_tile_width() if lib is not None else 0


def usable(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> bool:
    """The kernels serve activations of ``dtype`` and a KV cache of ``kv_dtype`` (default: ``dtype``) on
    ``device``."""
    ok = (torch.float32, torch.bfloat16)
    return device.type == "cpu" and dtype in ok and (kv_dtype or dtype) in ok and available()


def _bf16(t: torch.Tensor) -> int:
    if t.dtype == torch.bfloat16:
        return 1
    if t.dtype == torch.float32:
        return 0
    raise TypeError(f"native kernels take float32 or bfloat16, not {t.dtype}")


def _rows(t: torch.Tensor, width: int) -> int:
    """The row stride of a (T, >= width) view whose rows are each contiguous."""
    if t.dim() != 2 or t.stride(1) != 1 or t.shape[1] < width:
        raise ValueError(f"expected a (T, {width}) view with contiguous rows, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")
    return t.stride(0)


class DecodeRuns:
    """The query rows a step attends with ``decode_attention`` (one-token decodes, and prompt-chunk rows each over
    the rows up to its position), as the kernel reads them: packed query rows (B,), each item's cache runs
    (``run_off`` (B + 1,), ``runs`` (R, 2) of start, rows), the rows a sliding window leaves out at the start
    (``skip`` (B,) or None) and the longest attended length."""

    def __init__(self, q_rows: list, run_lists: list, skip: list | None):
        self._set(np.asarray(q_rows, dtype=np.int64), np.array([len(r) for r in run_lists], dtype=np.int64),
                  np.array([x for r in run_lists for x in r], dtype=np.int64),
                  None if skip is None else np.asarray(skip, dtype=np.int64))

    @classmethod
    def from_arrays(cls, q_rows: np.ndarray, counts: np.ndarray, runs: np.ndarray,
                    skip: np.ndarray | None) -> DecodeRuns:
        """The same from arrays: each item's query row (B,), its number of runs (B,), the runs (R, 2) of start, rows
        in item order, and the rows its window leaves out (B,) or None."""
        d = cls.__new__(cls)
        d._set(q_rows, counts, runs, skip)
        return d

    def _set(self, q_rows, counts, runs, skip) -> None:
        self.n = len(q_rows)
        self.q_rows = torch.from_numpy(np.ascontiguousarray(q_rows, dtype=np.int64))
        off = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(counts, out=off[1:])
        self.run_off = torch.from_numpy(off)
        runs = np.ascontiguousarray(runs, dtype=np.int64).reshape(-1, 2)
        self.runs = torch.from_numpy(runs.reshape(-1))
        upto = np.zeros(len(runs) + 1, dtype=np.int64)       # rows of the runs before each, so items of no runs
        np.cumsum(runs[:, 1], out=upto[1:])                  # (an empty shared-prefix tail) count 0 rows
        rows = upto[off[1:]] - upto[off[:-1]]
        self.skip = None
        if skip is not None and skip.any():
            rows = rows - skip
            self.skip = torch.from_numpy(np.ascontiguousarray(skip, dtype=np.int64))
        self.max_rows = int(rows.max()) if self.n else 0


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, d: DecodeRuns, scale: float,
                     out: torch.Tensor, n_q: int, init=None) -> None:
    """Write the attention of each decode's ``n_q`` query heads (at ``q[d.q_rows]``, heads ordered KV head by KV
    head) over its cache runs into ``out[d.q_rows]``.  q, out: (T, >= n_q * hd) with contiguous rows; caches:
    (n_kv, pool, hd) contiguous, of q's dtype or the other one (a bfloat16 cache under a float32 model).
    ``init``: (m, l, acc) float32 state of a prefix attended elsewhere, per decode and query head ((B, n_q),
    (B, n_q), (B, n_q, hd) or None for zeros), to continue from."""
    if d.n == 0:
        return
    n_kv, pool, hd = k_cache.shape
    grp = n_q // n_kv
    if grp > MAX_GROUP or n_q % n_kv:
        raise ValueError(f"{n_q} query heads over {n_kv} KV heads: the kernel takes at most {MAX_GROUP} a KV head")
    bf, qbf = _bf16(k_cache), _bf16(q)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or not (q.dtype == out.dtype and
                                                                          k_cache.dtype == v_cache.dtype):
        raise ValueError("decode_attention needs contiguous caches of one dtype, and q and out of one dtype")
    qs, os_ = _rows(q, n_q * hd), _rows(out, n_q * hd)
    im = il = ia = None
    if init is not None:
        m, l, acc = (t if t is None else t.contiguous() for t in init)
        im, il, ia = m.data_ptr(), l.data_ptr(), None if acc is None else acc.data_ptr()
    _lib().decode_attention(
        q.data_ptr(), qs, k_cache.data_ptr(), v_cache.data_ptr(), pool, n_kv, grp, hd, d.n, d.q_rows.data_ptr(),
        d.run_off.data_ptr(), d.runs.data_ptr(), d.skip.data_ptr() if d.skip is not None else None, d.max_rows,
        scale, out.data_ptr(), os_, im, il, ia, bf, qbf, torch.get_num_threads())


def rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, write_index: torch.Tensor) -> None:
    """Rotate q (T, n_q * hd) and k (T, n_kv * hd) in place by ``positions`` with the float32 tables ``cos`` /
    ``sin`` (positions, hd), then write k and v (T, n_kv * hd) into the caches (n_kv, pool, hd) at rows
    ``write_index`` (T,), rounded to the caches' dtype where it is not theirs (as ``Tensor.to`` rounds).  Views
    with contiguous rows (e.g. slices of the fused qkv output)."""
    n_kv, pool, hd = k_cache.shape
    T = q.shape[0]
    if T == 0:
        return
    n_q = q.shape[1] // hd
    bf, kvbf = _bf16(q), _bf16(k_cache)
    if not (q.dtype == k.dtype == v.dtype and k_cache.dtype == v_cache.dtype):
        raise ValueError("rope_store: q, k and v must have one dtype, and the caches one dtype")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
            and cos.dtype == sin.dtype == torch.float32 and cos.shape[1] == hd):
        raise ValueError("rope_store: contiguous caches, and float32 (positions, head_dim) tables")
    pos = positions.contiguous()
    widx = write_index.contiguous()
    _lib().rope_store(q.data_ptr(), _rows(q, n_q * hd), n_q, k.data_ptr(), _rows(k, n_kv * hd), v.data_ptr(),
                      _rows(v, n_kv * hd), n_kv, hd, T, pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                      k_cache.data_ptr(), v_cache.data_ptr(), pool, widx.data_ptr(), bf, kvbf,
                      torch.get_num_threads())


def _rows3(t: torch.Tensor) -> tuple | None:
    """(T, H, n, row stride) of a (T, n) or (T, H, n) view whose rows of n are contiguous and, within a row of
    the first dimension, adjacent; None for other layouts."""
    if t.dim() == 2 and t.stride(1) == 1:
        return t.shape[0], 1, t.shape[1], t.stride(0)
    if t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        return t.shape[0], t.shape[1], t.shape[2], t.stride(0)
    return None


NORM_WEIGHT, NORM_F32_SCALE, NORM_NONE = 0, 1, 2


def rms_norm(x: torch.Tensor, mode: int, weight: torch.Tensor | None, scale: torch.Tensor | None, eps: float,
             add: torch.Tensor | None = None) -> torch.Tensor | None:
    """``models.layers.RMSNorm`` of x's rows ((T, n) or (T, H, n), rows contiguous) in one pass, as a new
    contiguous tensor; with ``add`` (laid out as x): x's rows become ``x + add`` in place first (the residual
    add before a norm).  ``mode``: NORM_WEIGHT (weight * norm, in x's dtype), NORM_F32_SCALE (norm * the float32
    ``scale``, then rounded), NORM_NONE.  None when the layout is not one the kernel takes (the caller then runs
    the torch ops)."""
    shape = _rows3(x)
    if shape is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    T, H, n, xs = shape
    ashape = _rows3(add) if add is not None else None
    if add is not None and (ashape is None or add.shape != x.shape or add.dtype != x.dtype
                            or (T > 1 and xs < H * n)):            # rows written in place must not overlap
        return None
    if mode == NORM_WEIGHT and not (weight is not None and weight.dtype == x.dtype and weight.is_contiguous()
                                    and weight.numel() == n):
        return None
    if mode == NORM_F32_SCALE and not (scale is not None and scale.dtype == torch.float32
                                       and scale.is_contiguous() and scale.numel() == n):
        return None
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    w = weight.data_ptr() if mode == NORM_WEIGHT else None
    sc = scale.data_ptr() if mode == NORM_F32_SCALE else None
    _lib().rms_norm(x.data_ptr(), xs, add.data_ptr() if add is not None else None,
                    ashape[3] if add is not None else 0, out.data_ptr(), H * n, T, H, n, w, sc, eps, mode,
                    _bf16(x), torch.get_num_threads())
    return out


def silu_mul(gu: torch.Tensor, n: int) -> torch.Tensor | None:
    """``F.silu(gu[:, :n]) * gu[:, n:2n]`` of a (T, >= 2n) CPU view with contiguous rows, in one pass (a new
    (T, n) tensor); None for another layout or dtype (the caller then runs the torch ops)."""
    if gu.dim() != 2 or gu.stride(1) != 1 or gu.shape[1] < 2 * n or gu.device.type != "cpu" or \
            gu.dtype not in (torch.float32, torch.bfloat16):
        return None
    T = gu.shape[0]
    out = torch.empty(T, n, dtype=gu.dtype, device=gu.device)
    if T:
        _lib().silu_mul(gu.data_ptr(), gu.stride(0), T, n, out.data_ptr(), n, _bf16(gu), torch.get_num_threads())
    return out


class LogitStats(NamedTuple):
    """Per row of a step's logits: ``tokens`` (S,) int64, each row's first maximum; with norms, ``mx`` and ``ls``
    (S,) float32, its maximum and log(sum(exp(x - mx))): a token's logprob is (x - mx) - ls."""
    tokens: torch.Tensor
    mx: torch.Tensor | None
    ls: torch.Tensor | None


def logit_stats(x: torch.Tensor, norms: bool = False) -> LogitStats | None:
    """``logit_stats`` of the rows of a (S, V) CPU float32 / bfloat16 view with contiguous rows; None where the
    kernels do not take it (another device, dtype or layout: the caller then uses torch)."""
    if x.dim() != 2 or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or \
            (x.shape[1] > 1 and x.stride(1) != 1):
        return None
    lib = _lib()
    if lib is None or not hasattr(lib, "logit_stats"):
        return None
    S, V = x.shape
    tokens = torch.empty(S, dtype=torch.int64)
    mx = torch.empty(S, dtype=torch.float32) if norms else None
    ls = torch.empty(S, dtype=torch.float32) if norms else None
    if S and V:
        lib.logit_stats(x.data_ptr(), x.stride(0), S, V, _bf16(x), tokens.data_ptr(),
                        mx.data_ptr() if norms else None, ls.data_ptr() if norms else None, torch.get_num_threads())
        if tokens[0] < 0:
            raise MemoryError(f"logit_stats: no memory for the statistics of {S} x {V} logits")
    elif S:
        return None                                  # no columns: torch's error, not ours
    return LogitStats(tokens, mx, ls)
