"""Find and index the safetensors files of a Hugging Face checkpoint directory.

Owns: which file holds which tensor, each tensor's full shape and dtype (read from
the safetensors headers only, never the data), and the refusal of anything that is
not safetensors.  Pickle-based checkpoints (.bin/.pt/.pth/.ckpt) are never opened.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from ..config import ConfigError
from ..dtypes import name_of_code

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    shape: tuple
    dtype: str
    offset: int = 0      # absolute byte offset of the tensor's data in the file
    nbytes: int = 0


def _read_header(path: str) -> tuple:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ConfigError(f"{path} is not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100 * 1024 * 1024:
                raise ConfigError(f"{path} is not a safetensors file (header size {n})")
            size = os.fstat(f.fileno()).st_size
            if size < 8 + n:
                raise ConfigError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}")
            header = json.loads(f.read(n))
            data_len = size - 8 - n
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot read safetensors header of {path}: {e}") from None
    header.pop("__metadata__", None)
    for name, meta in header.items():
        _start, stop = meta["data_offsets"]
        if stop > data_len:
            raise ConfigError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
    return header, 8 + n


class CheckpointIndex:
    """Tensor name -> TensorInfo for every tensor of the checkpoint."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        files = self._find_files(model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in files:
            header, data_start = _read_header(path)
            for name, meta in header.items():
                if name in self.tensors:
                    raise ConfigError(f"tensor {name!r} appears in two files: {self.tensors[name].file} and {path}")
                dt = name_of_code(meta["dtype"])
                a, b = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, path, tuple(meta["shape"]), dt, data_start + a, b - a)
        # a checkpoint saved from the base model (``AutoModel``, e.g. Qwen3-Embedding: config.json says
        # Qwen3ForCausalLM, the tensors are "embed_tokens.weight", "layers.0...."): the same tensors under the
        # causal LM's names; TensorInfo.name keeps the file's own
        if "model.embed_tokens.weight" not in self.tensors and "embed_tokens.weight" in self.tensors:
            self.tensors = {(n if n.startswith("lm_head.") else "model." + n): t for n, t in self.tensors.items()}
        # a multimodal checkpoint (Gemma 3 4B+, Llama 4 Scout / Maverick): its language model's tensors under the
        # causal LM's names ("language_model.model.X" as published, "model.language_model.X" as transformers 5
        # saves); the vision tower and projector are left out (not read)
        for prefix, lm_head in (("language_model.model.", "language_model.lm_head."),
                                ("model.language_model.", "lm_head.")):
            if any(n.startswith(prefix) for n in self.tensors):
                self.tensors = {"model." + n[len(prefix):] if n.startswith(prefix) else "lm_head." + n[len(lm_head):]:
                                t for n, t in self.tensors.items()
                                if n.startswith((prefix, lm_head))}
                break

    @staticmethod
    def _find_files(model_dir: str) -> list:
        if not os.path.isdir(model_dir):
            raise ConfigError(f"model directory not found: {model_dir}")
        names = sorted(os.listdir(model_dir))
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(f"cannot read {index_path}: {e}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
            if missing:
                raise ConfigError(f"{index_path} names shard files that are missing: {', '.join(missing)}")
            return [os.path.join(model_dir, f) for f in files]
        st = [n for n in names if n.endswith(".safetensors")]
        if st:
            return [os.path.join(model_dir, n) for n in st]
        pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        if pickled:
            raise ConfigError(
                f"{model_dir} holds only pickle-format weights ({', '.join(pickled[:3])}); mpiinfer loads "
                "safetensors only and never unpickles checkpoints. Convert them to safetensors first.")
        raise ConfigError(f"{model_dir} has no *.safetensors weight files")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def names(self) -> set:
        return set(self.tensors)
