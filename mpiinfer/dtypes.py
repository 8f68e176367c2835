"""The one table of tensor dtypes: their names, aliases, torch dtypes and safetensors codes.

Owns: ``canonical`` (``--dtype`` names and aliases, config.json's ``torch_dtype``, torch dtypes -> "float32",
"bfloat16", ...), ``torch_dtype`` (-> the torch dtype; torch is imported only then, so checking a checkpoint's
header needs no torch), ``name_of_code`` / ``code_of`` (safetensors' "F32", "BF16", ... <-> names) and
``COMPUTE`` (the dtypes a model computes in).  Every other module asks here.
"""
from __future__ import annotations

# canonical name (torch's attribute name) -> safetensors code
CODES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    # known to safetensors, not loadable here (no scales): named in messages, refused by the loader
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
UNLOADABLE = ("float8_e4m3fn", "float8_e5m2")      # as model dtypes (FP8 weights with block scales: the loader)
_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
COMPUTE = ("float32", "bfloat16", "float16")        # what weights and activations may be


def canonical(name) -> str:
    """"float32" for "float32", "fp32", "torch.float32", torch.float32, ...; ValueError when unknown."""
    key = str(name).lower().replace("torch.", "")
    key = ALIASES.get(key, key)
    if key not in CODES:
        raise ValueError(f"unknown dtype {name!r}")
    return key


def compute_name(name) -> str:
    """The canonical name of a dtype models may compute in; ValueError naming the choices otherwise."""
    try:
        key = canonical(name)
    except ValueError:
        key = None
    if key not in COMPUTE:
        raise ValueError(f"unsupported dtype {name!r} (use float32, bfloat16 or float16)")
    return key


def torch_dtype(name):
    key = canonical(name)
    if key in UNLOADABLE:
        raise ValueError(f"unsupported dtype {name!r}")
    import torch
    return getattr(torch, key)


def itemsize(name: str) -> int:
    """Bytes per element of a dtype (canonical name, alias or safetensors code)."""
    code = name if name in _BYTES else CODES.get(canonical(name))
    if code not in _BYTES:
        raise ValueError(f"unsupported dtype {name}")
    return _BYTES[code]


def code_of(name) -> str:
    """The safetensors header code ("F32", "BF16", ...) of a dtype."""
    return CODES[canonical(name)]


_BY_CODE = {code: key for key, code in CODES.items()}


def name_of_code(code: str) -> str:
    """The canonical name of a safetensors header code (unknown codes are returned as they are)."""
    return _BY_CODE.get(code, code)
