"""``mpiinfer plan``: the mesh and per-rank memory of a layout, without loading weights.

Owns: nothing new -- it reuses the same validation as ``run`` (``Layout``,
``registry.validate_layout``) and builds each distinct rank's model on the ``meta``
device, so the weight bytes it reports are exactly what ``run`` allocates.
"""
from __future__ import annotations

import torch

from ..comm.mesh import Layout, Mesh
from ..config import ModelConfig
from ..device import Device, parse_dtype
from ..engine.kv_cache import KV_BLOCK, MIN_KV_TOKENS, kv_bytes_per_token, usable_blocks
from ..engine.kv_cache import kv_budget as size_kv
from ..models.registry import validate_layout

RUNTIME_OVERHEAD = 600 << 20   # torch + MPI + Python per rank, measured on CPU (benchmarks/bench_parallel.py)


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def make_plan(model_dir: str, world: int, tp: int = 1, cp: int = 1, ep: int = 1, dtype: str | None = None,
              kv_dtype: str | None = None, max_seq_len: int | None = None, max_batch: int = 64, kv_budget: int | None = None,
              memory_per_rank: int | None = None, device: str = "cpu") -> dict:
    """``dtype`` None / "auto": what ``run`` takes on ``device`` (float32 on CPU, the checkpoint's on CUDA);
    ``kv_dtype`` None / "auto": ``dtype``.  The
    KV cache is sized as ``run`` sizes it (``engine.kv_cache.kv_budget``): the memory left after the weights
    is ``memory_per_rank`` less the weights and the runtime, else this machine's free memory (CPU)."""
    cfg = ModelConfig.from_dir(model_dir)
    layout = Layout(world=world, tp=tp, cp=cp, ep=ep)
    validate_layout(cfg, layout)
    tdtype = parse_dtype(dtype) or Device(device).default_dtype(cfg.torch_dtype)
    kdtype = parse_dtype(kv_dtype) or tdtype
    esize = kdtype.itemsize
    seq = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    from ..models.llama import CausalLM
    ranks = []
    cache = {}
    for r in range(world):
        mesh = Mesh(layout, r)
        key = (mesh.tp_rank, mesh.ep_rank)
        if key not in cache:
            with torch.device("meta"):
                model = CausalLM(cfg, mesh, tdtype, torch.device("meta"))
            wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
            per_tok = kv_bytes_per_token(cfg, esize, tp, mesh.tp_rank)
            cache[key] = (wbytes, per_tok)
        wbytes, per_tok = cache[key]
        if memory_per_rank is not None:
            free = memory_per_rank - wbytes - RUNTIME_OVERHEAD
        else:
            free = Device("cpu").free_memory() if device == "cpu" else 1 << 62
        kv = size_kv(max_batch, seq, per_tok, free, kv_budget)
        total = wbytes + kv + RUNTIME_OVERHEAD
        ranks.append({"rank": r, "dp": mesh.dp_rank, "cp": mesh.cp_rank, "tp": mesh.tp_rank, "ep": mesh.ep_rank,
                      "weight_bytes": wbytes, "kv_bytes_per_token": per_tok, "kv_bytes": kv,
                      "kv_tokens": kv // per_tok, "kv_blocks": usable_blocks(kv // per_tok, cp),
                      "total_bytes": total,
                      "fits": None if memory_per_rank is None else (total <= memory_per_rank
                                                                    and kv // per_tok >= MIN_KV_TOKENS)})
    groups = {
        "tp": sorted({tuple(layout.tp_group(r)) for r in range(world)}),
        "cp": sorted({tuple(layout.cp_group(r)) for r in range(world)}),
        "dp": sorted({tuple(layout.dp_group(r)) for r in range(world)}),
        "replicas": sorted({tuple(layout.replica_group(r)) for r in range(world)}),
    }
    return {"model": model_dir, "arch": cfg.arch, "params": cfg.num_params, "dtype": str(tdtype).replace("torch.", ""),
            "kv_dtype": str(kdtype).replace("torch.", ""), "layout": {"world": world, "dp": layout.dp, "cp": cp, "tp": tp, "ep": ep}, "groups": groups,
            "max_seq_len": seq, "max_batch": max_batch, "ranks": ranks, "memory_per_rank": memory_per_rank,
            "runtime_overhead_bytes": RUNTIME_OVERHEAD}


def format_plan(p: dict) -> str:
    L = p["layout"]
    kv = "" if p["kv_dtype"] == p["dtype"] else f", KV cache {p['kv_dtype']}"
    lines = [f"{p['arch']} ({p['params'] / 1e9:.2f}B parameters, {p['dtype']}{kv}) from {p['model']}",
             f"mesh: world={L['world']} = dp {L['dp']} x cp {L['cp']} x tp {L['tp']}; ep={L['ep']}"]
    for axis in ("replicas", "tp", "cp", "dp"):
        groups = p["groups"][axis]
        shown = " ".join("[" + " ".join(map(str, g)) + "]" for g in groups[:8])
        lines.append(f"  {axis + ' groups':16s} {shown}{' ...' if len(groups) > 8 else ''}")
    lines.append(f"per rank (KV as `run` sizes it: --kv-budget, else {p['max_batch']} sequences x {p['max_seq_len']} "
                 f"tokens within 30% of the memory left after the weights and 8 GiB; runtime overhead "
                 f"{_gib(p['runtime_overhead_bytes'])}; blocks of {KV_BLOCK} tokens, taken as tokens are written):")
    lines.append(f"  {'rank':>4} {'dp':>3} {'cp':>3} {'tp':>3} {'ep':>3} {'weights':>11} {'KV/token':>9} "
                 f"{'KV':>11} {'KV blocks':>10} {'total':>11}" + ("  fits" if p["memory_per_rank"] else ""))
    for r in p["ranks"]:
        lines.append(f"  {r['rank']:>4} {r['dp']:>3} {r['cp']:>3} {r['tp']:>3} {r['ep']:>3} "
                     f"{_gib(r['weight_bytes']):>11} {r['kv_bytes_per_token'] / 1024:>7.1f}Ki "
                     f"{_gib(r['kv_bytes']):>11} {r['kv_blocks']:>10} {_gib(r['total_bytes']):>11}"
                     + (("  yes" if r["fits"] else "  NO") if p["memory_per_rank"] else ""))
    if p["memory_per_rank"]:
        ok = all(r["fits"] for r in p["ranks"])
        lines.append(f"{'fits' if ok else 'does NOT fit'} in {_gib(p['memory_per_rank'])} per rank")
    return "\n".join(lines)
