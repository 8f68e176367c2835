"""Sparse mixture-of-experts MLP: Mixtral, Qwen2-MoE (shared expert with a sigmoid
gate), Qwen3-MoE (``norm_topk_prob``).

Expert parallelism inside a replica: the EP group is the TP group split in ``ep``
blocks; the rank block ``tp_rank // (tp / ep)`` owns experts
``experts_for_rank(E, ep, ep_rank)`` and shards each of them tensor-parallel over
the ``tp / ep`` ranks of its block.  Every rank routes all tokens (the router is
replicated), computes only the tokens routed to its own experts, and the partial
outputs of all ranks are summed by one allreduce over ``mesh.tp_comm`` (the shared
expert's row-parallel output joins the same allreduce).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..dist.collectives import all_reduce
from ..dist.mesh import Mesh
from ..kernels import linear
from ..weights.shard import Slice, even_range, experts_for_rank
from . import registry


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype):
        super().__init__()
        self.cfg, self.mesh = cfg, mesh
        self.names = registry.moe_names(cfg, layer)
        ep = mesh.ep if mesh.ep <= mesh.tp and mesh.tp % mesh.ep == 0 else 1
        block = mesh.tp // ep                       # TP ranks sharing each expert
        ep_rank = mesh.tp_rank // block
        self.e0, self.e1 = experts_for_rank(cfg.num_experts, ep, ep_rank)
        inter = cfg.moe_intermediate_size
        self.i0, self.i1 = even_range(inter, mesh.tp_rank % block, block)
        n_local, il, h = self.e1 - self.e0, self.i1 - self.i0, cfg.hidden_size
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, h, dtype=dtype), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(n_local, 2 * il, h, dtype=dtype), requires_grad=False)  # gate | up
        self.w2 = nn.Parameter(torch.empty(n_local, h, il, dtype=dtype), requires_grad=False)
        self.shared = None
        if cfg.shared_expert_intermediate_size:
            from .llama import MLP
            self.shared = MLP(self.names["shared_prefix"], ("gate_proj", "up_proj", "down_proj"), h,
                              cfg.shared_expert_intermediate_size, mesh, dtype, reduce=False)
            self.shared_gate = nn.Parameter(torch.empty(1, h, dtype=dtype), requires_grad=False)

    def load(self, src):
        cfg, h, inter = self.cfg, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        il = self.i1 - self.i0
        self.gate.copy_(src.read(self.names["router"] + ".weight", (cfg.num_experts, h)))
        for j, e in enumerate(range(self.e0, self.e1)):
            g, u, d = (self.names["expert"].format(e=e, w=w) + ".weight" for w in self.names["w"])
            self.w13[j, :il].copy_(src.read(g, (inter, h), Slice(0, self.i0, self.i1)))
            self.w13[j, il:].copy_(src.read(u, (inter, h), Slice(0, self.i0, self.i1)))
            self.w2[j].copy_(src.read(d, (h, inter), Slice(1, self.i0, self.i1)))
        if self.shared is not None:
            self.shared.load(src)
            self.shared_gate.copy_(src.read(self.names["shared_gate"] + ".weight", (1, h)))

    def route(self, x: torch.Tensor):
        """Top-k expert ids (T, k) and their weights (T, k) exactly as Hugging Face computes them."""
        logits = linear(x, self.gate)                               # (T, E)
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, w.to(x.dtype)

    def experts(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Partial output of this rank's experts for tokens routed to them (zeros elsewhere)."""
        out = torch.zeros_like(x)
        il = self.i1 - self.i0
        local = (idx >= self.e0) & (idx < self.e1)
        if not bool(local.any()):
            return out
        tok, slot = torch.nonzero(local, as_tuple=True)
        eid = idx[tok, slot] - self.e0
        order = torch.argsort(eid, stable=True)
        tok, slot, eid = tok[order], slot[order], eid[order]
        counts = torch.bincount(eid, minlength=self.e1 - self.e0).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            t = tok[start:start + n]
            xe = x[t]                                                # (n, hidden)
            gu = linear(xe, self.w13[e])                             # (n, 2 * il)
            ye = linear(F.silu(gu[:, :il]) * gu[:, il:], self.w2[e])  # (n, hidden)
            ye = ye * w[t, slot[start:start + n], None]
            out.index_add_(0, t, ye)
            start += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.route(x)
        y = self.experts(x, idx, w)
        if self.shared is not None:
            y = y + torch.sigmoid(linear(x, self.shared_gate)) * self.shared(x)
        return all_reduce(y, self.mesh.tp_comm)
