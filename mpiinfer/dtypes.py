"""The one table of tensor dtypes: their names, aliases, torch dtypes and safetensors codes.

Owns: ``torch_dtype`` (``--dtype`` names and aliases, config.json's ``torch_dtype``, safetensors header
names -> torch), ``canonical`` (any of those -> "float32" / "bfloat16" / ...), ``name_of_code`` /
``code_of`` (safetensors' "F32", "BF16", ... <-> names) and ``COMPUTE`` (the dtypes a model computes
in).  Every other module asks here.
"""
from __future__ import annotations

import torch

# canonical name -> (torch dtype, safetensors code)
TABLE = {
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float64": (torch.float64, "F64"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
    # known to safetensors, not loadable here (no scales): named in messages, refused by the loader
    "float8_e4m3fn": (None, "F8_E4M3"),
    "float8_e5m2": (None, "F8_E5M2"),
}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
COMPUTE = ("float32", "bfloat16", "float16")        # what weights and activations may be


def canonical(name) -> str:
    """"float32" for "float32", "fp32", "torch.float32", torch.float32, ...; ValueError when unknown."""
    if isinstance(name, torch.dtype):
        for key, (dt, _) in TABLE.items():
            if dt is name:
                return key
        raise ValueError(f"unsupported dtype {name}")
    key = str(name).lower().replace("torch.", "")
    key = ALIASES.get(key, key)
    if key not in TABLE:
        raise ValueError(f"unknown dtype {name!r}")
    return key


def torch_dtype(name) -> torch.dtype:
    dt = TABLE[canonical(name)][0]
    if dt is None:
        raise ValueError(f"unsupported dtype {name!r}")
    return dt


def code_of(name) -> str:
    """The safetensors header code ("F32", "BF16", ...) of a dtype."""
    return TABLE[canonical(name)][1]


_BY_CODE = {code: key for key, (_, code) in TABLE.items()}


def name_of_code(code: str) -> str:
    """The canonical name of a safetensors header code (unknown codes are returned as they are)."""
    return _BY_CODE.get(code, code)

