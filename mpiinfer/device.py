"""The one place that knows about device kinds (CPU, CUDA).

Owns: resolving ``--device`` (auto: CUDA when visible), binding a rank to a GPU
by its node-local rank, the default compute dtype per device, synchronisation and
free-memory queries.  Everything else receives a ``Device`` and uses its
``torch.device``; no other module checks ``torch.cuda`` directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import dtypes
from .config import ConfigError

LOCAL_RANK_VARS = ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK",
                   "MV2_COMM_WORLD_LOCAL_RANK", "LOCAL_RANK")


def local_rank_from_env():
    for var in LOCAL_RANK_VARS:
        v = os.environ.get(var)
        if v is not None and v.isdigit():
            return int(v)
    return None


@dataclass(frozen=True)
class Device:
    kind: str                # "cpu" | "cuda"
    index: int = 0

    @property
    def torch(self) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.index)

    @staticmethod
    def resolve(name: str = "auto", local_rank: int | None = None, local_size: int = 1,
                allow_shared_gpu: bool = False) -> Device:
        """This rank's device.  ``cuda``: GPU ``node-local rank % visible GPUs`` (a launcher that gives each
        rank its own GPU through CUDA_VISIBLE_DEVICES leaves one visible: index 0); whether two ranks of a
        node ended up on one GPU is checked across the ranks afterwards (``job.place``, by GPU UUID), since
        visible counts alone cannot tell.  ``cuda:N``: that GPU, for one rank per node unless shared."""
        name = (name or "auto").lower()
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            return Device("cpu")
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to this process")
            n = torch.cuda.device_count()
            if ":" in name:
                try:
                    idx = int(name.split(":", 1)[1])
                except ValueError:
                    raise ConfigError(f"unknown --device {name!r} (use auto, cpu, cuda or cuda:N)") from None
                if not 0 <= idx < n:
                    raise ConfigError(f"--device {name}: this process sees {n} GPU(s) (cuda:0..cuda:{n - 1})")
                if local_size > 1 and not allow_shared_gpu:
                    raise ConfigError(f"--device {name} puts all {local_size} ranks of this node on one GPU: "
                                      "use --device cuda (one GPU per rank), or pass --share-gpus")
                return Device("cuda", idx)
            lr = local_rank if local_rank is not None else (local_rank_from_env() or 0)
            return Device("cuda", lr % n)
        raise ConfigError(f"unknown --device {name!r} (use auto, cpu, cuda or cuda:N)")

    def uuid(self) -> str | None:
        """The GPU's UUID (the same GPU seen through different CUDA_VISIBLE_DEVICES has the same one)."""
        if self.kind != "cuda":
            return None
        return str(torch.cuda.get_device_properties(self.index).uuid)

    def default_dtype(self, checkpoint_dtype: str) -> torch.dtype:
        """float32 on CPU (exact parity with the float32 reference; pass --dtype bfloat16 for speed where
        the CPU has AVX-512 BF16); the checkpoint's dtype on GPU."""
        if self.kind == "cpu":
            return torch.float32
        try:
            name = dtypes.canonical(checkpoint_dtype)
        except ValueError:
            name = "bfloat16"
        return dtypes.torch_dtype(name if name in dtypes.COMPUTE else "bfloat16")

    def activate(self) -> None:
        if self.kind == "cuda":
            torch.cuda.set_device(self.index)

    def synchronize(self) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.index)

    def free_memory(self) -> int:
        """Bytes that can still be allocated on this device."""
        if self.kind == "cuda":
            free, _ = torch.cuda.mem_get_info(self.index)
            return int(free)
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 8 << 30


def parse_dtype(name: str | None):
    if name is None or name == "auto":
        return None
    try:
        return dtypes.torch_dtype(dtypes.compute_name(name))
    except ValueError:
        raise ConfigError(f"unknown --dtype {name!r} (use float32, bfloat16 or float16)") from None
