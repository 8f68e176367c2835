"""Sparse mixture-of-experts MLP: Mixtral, Qwen2-MoE (shared expert with a sigmoid
gate), Qwen3-MoE (``norm_topk_prob``), Llama 4 (sigmoid of the top-k router logits
scaling each expert's input, an ungated shared expert, all experts in two fused
checkpoint tensors), gpt-oss (softmax of the top-k logits of a biased router,
biased experts with a clamped SwiGLU, gate/up columns interleaved, MXFP4 weights).

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
from ..weights import mxfp4
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
        # (DeepSeek-V3 routes in float32, as transformers does, whatever the model dtype)
        self.f32_router = cfg.router in ("deepseek_v3", "deepseek_v2")
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, h, dtype=torch.float32 if self.f32_router
                                             else dtype), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(n_local, 2 * il, h, dtype=dtype), requires_grad=False)  # gate | up
        self.w2 = nn.Parameter(torch.empty(n_local, h, il, dtype=dtype), requires_grad=False)
        # gpt-oss: router and expert biases; the down bias joins the sum once, on the first rank of each expert's
        # TP block (the others' partial outputs are added to it by the allreduce)
        self.gate_bias = self.b13 = self.b2 = None
        # DeepSeek-V3: a per-expert bias added to the scores for choosing experts only (float32, as trained)
        self.choice_bias = nn.Parameter(torch.empty(cfg.num_experts), requires_grad=False) \
            if self.names.get("router_bias") else None
        if cfg.expert_bias:
            self.gate_bias = nn.Parameter(torch.empty(cfg.num_experts, dtype=dtype), requires_grad=False)
            self.b13 = nn.Parameter(torch.empty(n_local, 2 * il, dtype=dtype), requires_grad=False)
            if mesh.etp_rank == 0:
                self.b2 = nn.Parameter(torch.empty(n_local, h, dtype=dtype), requires_grad=False)
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
        if self.names.get("interleaved"):
            self._load_interleaved(src)
            return
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

    def _load_interleaved(self, src):
        """gpt-oss's experts: gate_up columns (or MXFP4 rows) interleaved gate, up, gate, up..., so this rank's
        intermediate slice [i0, i1) is the one contiguous run [2 i0, 2 i1); float weights input-major (E, h, 2I) /
        (E, I, h), MXFP4 blocks output-major (E, 2I, h / 32, 16) / (E, h, I / 32, 16), dequantized here."""
        cfg, h, inter, E = self.cfg, self.cfg.hidden_size, self.cfg.moe_intermediate_size, self.cfg.num_experts
        i0, i1, il = self.i0, self.i1, self.i1 - self.i0
        gu_name, d_name = self.names["fused"]
        experts, pair = Slice(0, self.e0, self.e1), Slice(1, 2 * i0, 2 * i1)
        if cfg.mxfp4_experts:
            # one expert at a time: its blocks, dequantized (a whole layer's at once would multiply the memory)
            g0, g1 = i0 // 32, -(-i1 // 32)                  # the blocks covering columns [i0, i1) of down
            for j, e in enumerate(range(self.e0, self.e1)):
                one = Slice(0, e, e + 1)
                gu = mxfp4.dequantize(src.read(gu_name + "_blocks", (E, 2 * inter, h // 32, 16), one, pair),
                                      src.read(gu_name + "_scales", (E, 2 * inter, h // 32), one, pair),
                                      self.w13.dtype)[0]                                   # (2il, h)
                self.w13[j, :il].copy_(gu[0::2])
                self.w13[j, il:].copy_(gu[1::2])
                cols = Slice(2, g0, g1)
                d = mxfp4.dequantize(src.read(d_name + "_blocks", (E, h, inter // 32, 16), one, cols),
                                     src.read(d_name + "_scales", (E, h, inter // 32), one, cols), self.w2.dtype)
                self.w2[j].copy_(d[0, :, i0 - g0 * 32:i1 - g0 * 32])                     # (h, il)
        else:
            gu = src.read(gu_name, (E, h, 2 * inter), experts, Slice(2, 2 * i0, 2 * i1)).transpose(1, 2)
            self.w13[:, :il].copy_(gu[:, 0::2])
            self.w13[:, il:].copy_(gu[:, 1::2])
            self.w2.copy_(src.read(d_name, (E, inter, h), experts, Slice(1, i0, i1)).transpose(1, 2))
        self.gate_bias.copy_(src.read(self.names["router"] + ".bias", (E,)))
        b = src.read(gu_name + "_bias", (E, 2 * inter), experts, pair)                       # (n, 2il)
        self.b13[:, :il].copy_(b[:, 0::2])
        self.b13[:, il:].copy_(b[:, 1::2])
        if self.b2 is not None:
            self.b2.copy_(src.read(d_name + "_bias", (E, h), experts))

    def _glu(self, gu: torch.Tensor) -> torch.Tensor:
        """(n, 2 il) [gate | up] -> (n, il): SiLU(gate) * up; gpt-oss's clamped form where the config has a limit."""
        il = self.i1 - self.i0
        g, u = gu[:, :il], gu[:, il:]
        limit = self.cfg.swiglu_limit
        if limit is None:
            return F.silu(g) * u
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * self.cfg.swiglu_alpha))

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert ``e`` on rows x (n, hidden) -> (n, hidden) (this rank's partial sum under expert TP)."""
        gu = linear(x, self.w13[e], None if self.b13 is None else self.b13[e])   # (n, 2 il)
        return linear(self._glu(gu), self.w2[e], None if self.b2 is None else self.b2[e])

    def _load_shared(self, src):
        if self.choice_bias is not None:
            self.choice_bias.copy_(src.read(self.names["router_bias"], (self.cfg.num_experts,)))
        if self.shared is not None:
            self.shared.load(src)
        if self.shared_gate is not None:
            self.shared_gate.copy_(src.read(self.names["shared_gate"] + ".weight", (1, self.cfg.hidden_size)))

    def pack(self) -> None:
        """Pack the router and each local expert's weights for ``kernels.linear`` (see ``CausalLM.pack``)."""
        self.w13 = [kernels.pack(w) for w in self._parameters.pop("w13")]
        self.w2 = [kernels.pack(w) for w in self._parameters.pop("w2")]
        if not self.f32_router:
            pack_weight(self, "gate")
        if self.shared is not None:
            self.shared.pack()

    def route(self, x: torch.Tensor):
        """Top-k expert ids (T, k) and their weights (T, k) exactly as Hugging Face computes them."""
        if self.cfg.router == "deepseek_v3":                        # (its float32 router, whatever the dtype)
            return self._route_grouped(x)
        if self.cfg.router == "deepseek_v2":
            return self._route_v2(x)
        logits = linear(x, self.gate, self.gate_bias)               # (T, E)
        if self.cfg.router == "sigmoid":                            # Llama 4: top-k logits, then their sigmoid
            top, idx = torch.topk(logits, self.top_k, dim=-1)
            return idx, torch.sigmoid(top.float()).to(x.dtype)
        if self.cfg.router == "softmax_topk":                       # gpt-oss: top-k logits, then their softmax
            top, idx = torch.topk(logits, self.top_k, dim=-1)
            return idx, torch.softmax(top, dim=-1)
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return idx, w.to(x.dtype)

    def _route_grouped(self, x: torch.Tensor):
        """DeepSeek-V3: sigmoid scores in float32; experts chosen by score + choice bias within the topk_group
        groups whose two best such scores sum highest; weighted by their plain scores, normalised
        (norm_topk_prob), times routed_scaling_factor."""
        cfg = self.cfg
        E, G = cfg.num_experts, cfg.n_group
        scores = torch.sigmoid(linear(x.float(), self.gate))                       # (T, E) float32
        choice = scores + self.choice_bias                                           # (T, E)
        mask = self._kept_groups(choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1))   # (T, E)
        idx = torch.topk(choice.masked_fill(~mask, float("-inf")), self.top_k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm_topk:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, (w * cfg.routed_scaling_factor).to(x.dtype)

    def _kept_groups(self, group_scores: torch.Tensor) -> torch.Tensor:
        """(T, n_group) scores of the expert groups -> (T, E) bool: the experts of each token's topk_group best
        groups (DeepSeek's group-limited routing)."""
        T, G = group_scores.shape
        keep = torch.zeros_like(group_scores).scatter_(
            1, torch.topk(group_scores, self.cfg.topk_group, dim=-1, sorted=False)[1], 1)
        E = self.cfg.num_experts
        return keep.unsqueeze(-1).expand(T, G, E // G).reshape(T, E).bool()

    def _route_v2(self, x: torch.Tensor):
        """DeepSeek-V2: softmax over all experts in float32; the top-k (greedy), or the top-k among the topk_group
        groups with the highest best score (group_limited_greedy, the others' scores zeroed); weighted by their
        scores times routed_scaling_factor (not normalised)."""
        cfg = self.cfg
        E, G = cfg.num_experts, cfg.n_group
        scores = torch.softmax(linear(x.float(), self.gate), dim=-1)                 # (T, E) float32
        if cfg.topk_method == "group_limited_greedy":
            scores = scores.masked_fill(~self._kept_groups(scores.view(-1, G, E // G).max(dim=-1).values), 0.0)
        w, idx = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        return idx, (w * cfg.routed_scaling_factor).to(x.dtype)

    def experts(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Partial output of this rank's experts for tokens routed to them (zeros elsewhere)."""
        out = torch.zeros_like(x)
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
            ye = self._expert(e, xe)                                 # (n, hidden)
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
            start = 0
            for e, n in enumerate(counts):
                if n:
                    sel = o2[start:start + n]
                    out[sel] = self._expert(e, recv_rows[sel])
                    start += n
        back, _ = alltoallv(out, recv_counts, mesh.ep_comm, recv_counts=send_counts)   # rows return in send order
        y_s = torch.zeros_like(xs)
        y_s.index_add_(0, tok, back if self.scale_input else back * w_s[tok, slot, None])
        y = all_gather_rows(y_s, [balanced_range(T, r, mesh.tp, allow_empty=True) for r in range(mesh.tp)],
                            mesh.tp_comm)
        if self.shared is not None:
            y = y + all_reduce(self._shared(x), mesh.tp_reduce)
        return y
