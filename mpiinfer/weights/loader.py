"""Read exactly this rank's bytes of checkpoint tensors.

Owns: opening safetensors files (``safe_open``, framework "pt"), reading a
``Slice`` of a tensor with ``get_slice()[a:b]`` so that bytes a rank does not own
are never materialised, casting to the target dtype, and loud failures on a
missing or mis-shaped tensor.
"""
from __future__ import annotations

import torch
from safetensors import safe_open

from ..config import ConfigError
from .index import CheckpointIndex
from .shard import Slice


class WeightSource:
    def __init__(self, index: CheckpointIndex):
        self.index = index
        self._handles = {}
        self.bytes_read = 0
        self.names_read = set()

    def _handle(self, path):
        h = self._handles.get(path)
        if h is None:
            h = safe_open(path, framework="pt", device="cpu")
            self._handles[path] = h
        return h

    def read(self, name: str, expected_shape: tuple, sl: Slice = Slice()) -> torch.Tensor:
        """Return the slice ``sl`` of tensor ``name`` after checking its full shape."""
        if name not in self.index:
            raise ConfigError(f"checkpoint {self.index.model_dir} is missing tensor {name!r}")
        info = self.index[name]
        if tuple(info.shape) != tuple(expected_shape):
            raise ConfigError(
                f"tensor {name!r} has shape {list(info.shape)} in {info.file}, expected {list(expected_shape)} "
                "from config.json")
        h = self._handle(info.file)
        s = h.get_slice(name)
        if sl.dim is None:
            t = s[:]
        else:
            idx = tuple([slice(None)] * sl.dim + [slice(sl.start, sl.stop)])
            t = s[idx]
        self.bytes_read += t.numel() * t.element_size()
        self.names_read.add(name)
        return t

    def close(self):
        self._handles.clear()
