"""Embeddings: how a sequence's final hidden states (after the model's last norm) become one vector.

Owns: the checkpoint's pooling (sentence-transformers' ``modules.json`` naming a ``Pooling`` module whose
``config.json`` sets ``pooling_mode_lasttoken`` or ``pooling_mode_mean_tokens``, and a ``Normalize`` module),
the default without one (last token, normalised: what decoder embedding models such as Qwen3-Embedding use, and
vLLM's default), and the pooling itself.  Reads JSON files only.
"""
from __future__ import annotations

import json
import os

import torch

from ..config import ConfigError


def checkpoint_pooling(model_dir: str) -> tuple:
    """(pooling "last" | "mean", normalize) the checkpoint asks for; ("last", True) without sentence-transformers
    files.  A pooling mode mpiinfer does not implement (CLS, max, weighted mean) is a ConfigError."""
    path = os.path.join(model_dir, "modules.json")
    if not os.path.isfile(path):
        return "last", True
    try:
        with open(path) as f:
            modules = json.load(f)
        kinds = {m.get("type", ""): m.get("path", "") for m in modules}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    normalize = any(k.endswith("models.Normalize") for k in kinds)
    other = [k for k in kinds if not k.endswith(("models.Transformer", "models.Pooling", "models.Normalize"))]
    if other:       # a Dense projection etc.: pooled hidden states alone would be other vectors than the model's
        raise ConfigError(f"{path} lists {', '.join(other)}: only Transformer, Pooling and Normalize modules are "
                          "supported")
    pool = next((p for k, p in kinds.items() if k.endswith("models.Pooling")), None)
    if pool is None:
        return "last", normalize
    cpath = os.path.join(model_dir, pool, "config.json")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {cpath}: {e}") from None
    modes = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
    if modes == ["lasttoken"]:
        return "last", normalize
    if modes == ["mean_tokens"]:
        return "mean", normalize
    raise ConfigError(f"{cpath}: pooling {' + '.join(modes) or 'none'} is not supported (last token or mean)")


def pool(pooling: str, normalize: bool, last: torch.Tensor | None, total: torch.Tensor | None, n: int,
         dimensions: int = 0) -> list:
    """The vector: the last token's hidden state, or the mean of all (``total`` / ``n``), its first ``dimensions``
    values when given (Matryoshka); unit length when ``normalize`` (as sentence-transformers' Normalize:
    x / max(|x|, 1e-12)), after the truncation."""
    v = last if pooling == "last" else total / n
    v = v.float()
    if dimensions:
        v = v[:dimensions]
    if normalize:
        v = v / v.norm().clamp_min(1e-12)
    return v.tolist()
