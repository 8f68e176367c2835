"""Sparse mixture-of-experts MLP: Mixtral, Qwen2-MoE (shared expert with a sigmoid
gate), Qwen3-MoE (``norm_topk_prob``), Llama 4 (sigmoid of the top-k router logits
scaling each expert's input, an ungated shared expert, all experts in two fused
checkpoint tensors).

Which experts, and which slice of each, a rank holds is ``comm.mesh.Layout``'s
arithmetic (``ep_rank``, ``etp``, ``etp_rank``).

Expert parallelism inside a replica: the EP group is the TP group split in ``ep``
blocks; the rank block ``tp_rank // etp`` owns experts
``experts_for_rank(E, ep, ep_rank)`` (blocks as even as they go: the first ``E % ep``
hold one more) and shards each of them tensor-parallel over
the ``etp = tp / ep`` ranks of its block.  Every rank routes all tokens (the router is
replicated), computes only the tokens routed to its own experts, and the partial
outputs of all ranks are summed by one allreduce over ``mesh.tp_reduce`` (the shared
expert's row-parallel output joins the same allreduce).

Wide EP (``ep == dp x tp``, dp > 1: data-parallel attention, experts over every rank):
each rank owns whole experts ``experts_for_rank(E, ep, ep_rank)``.  A replica's
tokens are split over its TP ranks, so each token leaves its replica once; each
rank sends its (token, expert) rows to the experts' owners with one
``Alltoallv`` over ``mesh.ep_comm`` (counts first, then rows and expert ids),
the owners run their experts, a second ``Alltoallv`` brings the rows back, the
rank combines them with the routing weights, and an all-gather over
``mesh.tp_comm`` (``Allgatherv``) rebuilds the replica's full activations.  All replicas step
together (a replica with no work joins with zero tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..comm.collectives import all_gather_rows, all_reduce, alltoallv
from ..comm.mesh import Mesh
from ..config import ModelConfig
from ..kernels import linear
from ..parallel.linear import pack_weight
from ..parallel.shard import Slice, balanced_range, expert_owners, experts_for_rank
from . import registry
from .layers import MLP


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype):
        super().__init__()
        self.cfg, self.mesh = cfg, mesh
        self.names = registry.moe_names(cfg, layer)
        self.wide = mesh.wide_ep
        self.ep = mesh.ep
        self.e0, self.e1 = experts_for_rank(cfg.num_experts, mesh.ep, mesh.ep_rank)
        # wide EP: the EP rank each expert's rows go to (blocks as even as they go: E need not divide by ep)
        self.owner = torch.tensor(expert_owners(cfg.num_experts, mesh.ep), dtype=torch.int64)
        inter = cfg.moe_intermediate_size
        self.i0, self.i1 = balanced_range(inter, mesh.etp_rank, mesh.layout.etp)   # this rank's slice of each
        n_local, il, h = self.e1 - self.e0, self.i1 - self.i0, cfg.hidden_size
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.scale_input = cfg.moe_scale_input
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, h, dtype=dtype), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(n_local, 2 * il, h, dtype=dtype), requires_grad=False)  # gate | up
        self.w2 = nn.Parameter(torch.empty(n_local, h, il, dtype=dtype), requires_grad=False)
        self.shared = self.shared_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared = MLP(self.names["shared_prefix"], ("gate_proj", "up_proj", "down_proj"), h,
                              cfg.shared_expert_intermediate_size, mesh, dtype, reduce=False)
            if self.names["shared_gate"]:
                self.shared_gate = nn.Parameter(torch.empty(1, h, dtype=dtype), requires_grad=False)

    def load(self, src):
        cfg, h, inter = self.cfg, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        il = self.i1 - self.i0
        self.gate.copy_(src.read(self.names["router"] + ".weight", (cfg.num_experts, h)))
        if "fused" in self.names:
            # only this rank's experts and intermediate columns of the two 3-d tensors (input-major: transposed
            # into (out, in) here); gate columns are [0, I) of gate_up_proj's last dim, up columns [I, 2I)
            gu_name, d_name = self.names["fused"]
            shape, experts = (cfg.num_experts, h, 2 * inter), Slice(0, self.e0, self.e1)
            if il == inter:                 # whole experts (etp = 1): one read of the block, split here
                gu = src.read(gu_name, shape, experts)                                            # (n, h, 2I)
                g, u = gu[..., :inter], gu[..., inter:]
            else:                           # one read per (expert, hidden row) of this rank's columns
                g = src.read(gu_name, shape, experts, Slice(2, self.i0, self.i1))                  # (n, h, il)
                u = src.read(gu_name, shape, experts, Slice(2, inter + self.i0, inter + self.i1))
            d = src.read(d_name, (cfg.num_experts, inter, h), experts, Slice(1, self.i0, self.i1))  # (n, il, h)
            self.w13[:, :il].copy_(g.transpose(1, 2))
            self.w13[:, il:].copy_(u.transpose(1, 2))
            self.w2.copy_(d.transpose(1, 2))
            self._load_shared(src)
            return
        for j, e in enumerate(range(self.e0, self.e1)):
            g, u, d = (self.names["expert"].format(e=e, w=w) + ".weight" for w in self.names["w"])
            self.w13[j, :il].copy_(src.read(g, (inter, h), Slice(0, self.i0, self.i1)))
            self.w13[j, il:].copy_(src.read(u, (inter, h), Slice(0, self.i0, self.i1)))
            self.w2[j].copy_(src.read(d, (h, inter), Slice(1, self.i0, self.i1)))
        self._load_shared(src)

    def _load_shared(self, src):
        if self.shared is not None:
            self.shared.load(src)
        if self.shared_gate is not None:
            self.shared_gate.copy_(src.read(self.names["shared_gate"] + ".weight", (1, self.cfg.hidden_size)))

    def pack(self) -> None:
        """Pack the router and each local expert's weights for ``kernels.linear`` (see ``CausalLM.pack``)."""
        self.w13 = [kernels.pack(w) for w in self._parameters.pop("w13")]
        self.w2 = [kernels.pack(w) for w in self._parameters.pop("w2")]
        pack_weight(self, "gate")
        if self.shared is not None:
            self.shared.pack()

    def route(self, x: torch.Tensor):
        """Top-k expert ids (T, k) and their weights (T, k) exactly as Hugging Face computes them."""
        logits = linear(x, self.gate)                               # (T, E)
        if self.cfg.router == "sigmoid":                            # Llama 4: top-k logits, then their sigmoid
            top, idx = torch.topk(logits, self.top_k, dim=-1)
            return idx, torch.sigmoid(top.float()).to(x.dtype)
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
        if not x.is_cuda and not bool(local.any()):     # (on CUDA the test would cost a host sync)
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
            we = w[t, slot[start:start + n], None]                   # (n, 1) routing weights
            xe = x[t] * we if self.scale_input else x[t]             # (n, hidden)
            gu = linear(xe, self.w13[e])                             # (n, 2 * il)
            ye = linear(F.silu(gu[:, :il]) * gu[:, il:], self.w2[e])  # (n, hidden)
            out.index_add_(0, t, ye if self.scale_input else ye * we)
            start += n
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, w = self.route(x)
        if self.wide:
            return self._forward_wide(x, idx, w)
        y = self.experts(x, idx, w)
        if self.shared is not None:
            y = y + self._shared(x)
        return all_reduce(y, self.mesh.tp_reduce)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's partial (row-parallel, unreduced) output, gated where the family gates it."""
        y = self.shared(x)
        return y if self.shared_gate is None else torch.sigmoid(linear(x, self.shared_gate)) * y

    def _forward_wide(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        mesh = self.mesh
        T, _h = x.shape
        # this TP rank's share of the replica's tokens
        t0, t1 = balanced_range(T, mesh.tp_rank, mesh.tp, allow_empty=True)
        xs, idx_s, w_s = x[t0:t1], idx[t0:t1], w[t0:t1]
        tok, slot = torch.nonzero(torch.ones_like(idx_s, dtype=torch.bool), as_tuple=True)
        eid = idx_s[tok, slot]
        dest = self.owner.to(eid.device)[eid]
        order = torch.argsort(dest, stable=True)
        tok, slot, eid, dest = tok[order], slot[order], eid[order], dest[order]
        send_counts = torch.bincount(dest, minlength=self.ep).tolist()
        # (n_send, hidden); Llama 4 sends each row already scaled by its routing weight
        rows = (xs[tok] * w_s[tok, slot, None] if self.scale_input else xs[tok]).contiguous()
        recv_rows, recv_counts = alltoallv(rows, send_counts, mesh.ep_comm)
        recv_eid, _ = alltoallv(eid.contiguous(), send_counts, mesh.ep_comm, recv_counts=recv_counts)
        # run this rank's experts on the rows it received
        out = torch.empty_like(recv_rows)
        if recv_rows.shape[0]:
            local = recv_eid - self.e0
            o2 = torch.argsort(local, stable=True)
            counts = torch.bincount(local, minlength=self.e1 - self.e0).tolist()
            il, start = self.i1 - self.i0, 0
            for e, n in enumerate(counts):
                if n:
                    sel = o2[start:start + n]
                    gu = linear(recv_rows[sel], self.w13[e])
                    out[sel] = linear(F.silu(gu[:, :il]) * gu[:, il:], self.w2[e])
                    start += n
        back, _ = alltoallv(out, recv_counts, mesh.ep_comm, recv_counts=send_counts)   # rows return in send order
        y_s = torch.zeros_like(xs)
        y_s.index_add_(0, tok, back if self.scale_input else back * w_s[tok, slot, None])
        y = all_gather_rows(y_s, [balanced_range(T, r, mesh.tp, allow_empty=True) for r in range(mesh.tp)],
                            mesh.tp_comm)
        if self.shared is not None:
            y = y + all_reduce(self._shared(x), mesh.tp_reduce)
        return y
