"""Read exactly this rank's bytes of checkpoint tensors.

Owns: reading a ``Slice`` of a safetensors tensor with positioned reads
(``os.preadv``) straight into the destination buffer, using the byte offsets of
the file header.  Nothing is memory-mapped, so the bytes a rank does not own are
never read and never count towards its resident memory: a block is one read per
contiguous run (a slice along dim 0: one read; along dim 1 of a matrix: one per row).  Also
owns the loud failure on a missing or mis-shaped tensor, and ``FileRows``: rows of
a table (the token embedding) read from the file when a step needs them.
"""
from __future__ import annotations

import itertools
import math
import os
import weakref

import torch

from .. import dtypes
from ..config import ConfigError
from ..parallel.shard import Slice
from .index import CheckpointIndex


def _ranges(shape, slices: tuple) -> list:
    """[start, stop) along each dim of a tensor of ``shape`` that ``slices`` (at most one per dim) select."""
    ranges = [(0, n) for n in shape]
    for s in slices:
        if s.dim is not None:
            if not 0 <= s.dim < len(shape) or not 0 <= s.start <= s.stop <= shape[s.dim]:
                raise ValueError(f"unsupported slice {s} of a {len(shape)}-d tensor")
            ranges[s.dim] = (s.start, s.stop)
    return ranges


class WeightSource:
    """``fp8_block``: (rows, cols) of one scale of FP8 e4m3 weights stored with ``<name>_scale_inv`` (float32, one
    per block): such a weight's slice is read with the scales of the blocks it touches and returned dequantized
    (float32, w = fp8 * scale_inv)."""

    def __init__(self, index: CheckpointIndex, fp8_block: tuple = ()):
        self.index = index
        self.fp8_block = tuple(fp8_block)
        self._fds = {}
        self.bytes_read = 0

    def _fd(self, path):
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return fd

    def read(self, name: str, expected_shape: tuple, sl: Slice = Slice(), *more: Slice) -> torch.Tensor:
        """Return the block ``sl`` (and ``more`` slices along other dims) of tensor ``name`` (a new CPU tensor)
        after checking its full shape: one positioned read per contiguous run of the block (one for a slice along
        dim 0; one per row for a slice along the last dim; one per expert for Llama 4's (E, I, h) down
        projection sliced along E and I)."""
        if name not in self.index:
            raise ConfigError(f"checkpoint {self.index.model_dir} is missing tensor {name!r}")
        info = self.index[name]
        if tuple(info.shape) != tuple(expected_shape):
            raise ConfigError(
                f"tensor {name!r} has shape {list(info.shape)} in {info.file}, expected {list(expected_shape)} "
                "from config.json")
        if info.dtype == "float8_e4m3fn":
            return self._read_fp8(name, info, (sl,) + more)
        try:
            dtype = dtypes.torch_dtype(info.dtype)
        except ValueError:
            raise ConfigError(f"tensor {name!r} has unsupported dtype {info.dtype}") from None
        return self._read_block(info, dtype, (sl,) + more)

    def _read_fp8(self, name: str, info, slices: tuple) -> torch.Tensor:
        """A block of an FP8 e4m3 matrix, dequantized with the scales of the blocks it touches (float32)."""
        scale_name = name + "_scale_inv"
        if not self.fp8_block or scale_name not in self.index or len(info.shape) != 2:
            raise ConfigError(f"tensor {name!r} is float8 without block scales ({scale_name}) and a "
                              f"quantization_config weight_block_size")
        br, bc = self.fp8_block
        rows, cols = info.shape
        want = (-(-rows // br), -(-cols // bc))
        if tuple(self.index[scale_name].shape) != want:
            raise ConfigError(f"tensor {scale_name!r} has shape {list(self.index[scale_name].shape)}, expected "
                              f"{list(want)} for {name} {list(info.shape)} in blocks of {br} x {bc}")
        q = self._read_block(info, torch.uint8, slices).view(torch.float8_e4m3fn)
        (r0, r1), (c0, c1) = _ranges(info.shape, slices)
        g0, h0 = r0 // br, c0 // bc
        scales = self.read(scale_name, want, Slice(0, g0, -(-r1 // br) if r1 > r0 else g0),
                           Slice(1, h0, -(-c1 // bc) if c1 > c0 else h0)).float()
        full = scales.repeat_interleave(br, 0).repeat_interleave(bc, 1)
        return q.float() * full[r0 - g0 * br:r1 - g0 * br, c0 - h0 * bc:c1 - h0 * bc]

    def _read_block(self, info, dtype: torch.dtype, slices: tuple) -> torch.Tensor:
        """The block of ``info``'s tensor that ``slices`` (at most one per dim) select, as ``dtype`` bytes."""
        shape = list(info.shape)
        ranges = _ranges(shape, slices)
        esize = dtypes.itemsize(info.dtype)
        if dtype == torch.uint8 and esize != 1:
            raise ValueError("raw bytes of a multi-byte tensor")
        scalar = not shape
        if scalar:                                      # one read of one element
            ranges, shape = [(0, 1)], [1]
        out = torch.empty([b - a for a, b in ranges], dtype=dtype)
        # the last dim whose range is not whole: below it every run of the block is contiguous in the file
        k = max((d for d, (a, b) in enumerate(ranges) if (a, b) != (0, shape[d])), default=0)
        run = (ranges[k][1] - ranges[k][0]) * math.prod(shape[k + 1:])     # elements per contiguous run
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        mv = memoryview(out.view(torch.uint8).numpy().reshape(-1)) if out.numel() else memoryview(b"")
        fd, at, nb = self._fd(info.file), 0, run * esize
        for idx in itertools.product(*(range(a, b) for a, b in ranges[:k])):
            first = sum(i * st for i, st in zip(idx, strides)) + ranges[k][0] * strides[k]
            self._pread(fd, mv[at:at + nb], info.offset + first * esize, info.name)
            at += nb
        self.bytes_read += out.numel() * out.element_size()
        return out.reshape(()) if scalar else out

    @staticmethod
    def _pread(fd, mv: memoryview, offset: int, name: str) -> None:
        done = 0
        total = len(mv)
        while done < total:
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise ConfigError(f"short read of tensor {name!r} (file truncated?)")
            done += n

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class FileRows:
    """Rows [start, stop) of a 2-D checkpoint tensor, read on demand with one positioned read per distinct row
    and converted to ``dtype`` exactly as loading would.  Stands in for an embedding table that need not stay
    in memory (a decode step reads a few KB; a 2048-token prefill step ~2048 small reads from the page cache)."""

    def __init__(self, index: CheckpointIndex, name: str, start: int, stop: int, dtype: torch.dtype):
        info = index[name]
        if len(info.shape) != 2 or not 0 <= start < stop <= info.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of {name} {list(info.shape)}")
        self.name, self.src_dtype, self.dtype = name, dtypes.torch_dtype(info.dtype), dtype
        self.rows, self.cols = stop - start, info.shape[1]
        self.row_bytes = self.cols * torch.tensor([], dtype=self.src_dtype).element_size()
        self.base = info.offset + start * self.row_bytes
        self.fd = os.open(info.file, os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self.fd)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """(T, cols) in ``dtype`` for local row indices ``ids`` (T,), like ``table[ids]``."""
        uniq, inverse = torch.unique(ids, return_inverse=True)
        buf = torch.empty(len(uniq), self.cols, dtype=self.src_dtype)
        raw = buf.view(torch.uint8).numpy().reshape(len(uniq), self.row_bytes)
        for j, r in enumerate(uniq.tolist()):
            if not 0 <= r < self.rows:
                raise IndexError(f"row {r} outside [0, {self.rows}) of {self.name}")
            if os.preadv(self.fd, [raw[j]], self.base + r * self.row_bytes) != self.row_bytes:
                raise OSError(f"short read of {self.name} row {r}")
        return buf.to(self.dtype)[inverse]

    def block(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) as one (b - a, cols) tensor in ``dtype`` (one read)."""
        if not 0 <= a < b <= self.rows:
            raise IndexError(f"rows [{a}, {b}) outside [0, {self.rows}) of {self.name}")
        buf = torch.empty(b - a, self.cols, dtype=self.src_dtype)
        WeightSource._pread(self.fd, memoryview(buf.view(torch.uint8).numpy().reshape(-1)),
                            self.base + a * self.row_bytes, self.name)
        return buf.to(self.dtype)

    def close(self) -> None:
        self._closer()
