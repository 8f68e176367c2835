"""DeepSeek-V3's multi-head latent attention (MLA), with the queries absorbed into the latent space.

The cache holds, per token and layer, ONE row: the normalised compressed K/V ``c`` (kv_lora_rank) and the rotated
shared key ``k_pe`` (qk_rope_head_dim): 576 values for DeepSeek-V3 against 2 x 128 heads x 128 for the same model
with ordinary MHA.  Each query head h scores it as one vector: ``[q_nope_h W_uk_h, q_pe_h] . [c, k_pe]`` equals
transformers' ``q_nope_h . (W_uk_h c) + q_pe_h . k_pe`` (W_uk_h: head h's key rows of kv_b_proj), so MLA runs
through every path of ``Attention.attend`` as multi-query attention (1 KV head, all local query heads in its
group) with head_dim = kv_lora_rank + qk_rope_head_dim.  The values are the same rows (``KVCache(v_is_k=True)``:
no second cache): the first kv_lora_rank values of the attention output are sum_j p_j c_j, and head h's output is
that times its value rows W_uv_h of kv_b_proj, then o_proj.

Tensor parallelism: query heads (q_b_proj / q_proj rows, kv_b_proj rows, o_proj columns) are split over the TP
group; the latent projections (q_a_proj, kv_a_proj_with_mqa, their norms) and the latent cache are replicated on
every TP rank, as a single KV head is.  Communication: the allreduce of ``o`` over ``mesh.tp_reduce``, nothing else
(CP: ``Attention.attend``'s ring / merge over ``mesh.cp_comm``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..comm.mesh import Mesh
from ..config import ModelConfig
from ..parallel.linear import ColumnParallelLinear, Part, RowParallelLinear
from ..parallel.shard import Slice, q_heads_for_rank
from .attention import Attention, AttentionPlan, Span
from .layers import RMSNorm, RopeTables, Rotary

# the latent norms' epsilon: transformers (and DeepSeek's own code) build them with the default, not rms_norm_eps
LATENT_EPS = 1e-6


class LatentAttention(Attention):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype: torch.dtype):
        nn.Module.__init__(self)
        p = f"model.layers.{layer}.self_attn."
        qr, kvr, nope, rope, v = cfg.mla
        H, h, qk = cfg.num_heads, cfg.hidden_size, nope + rope
        q0, q1 = q_heads_for_rank(H, 1, mesh.tp, mesh.tp_rank)
        self.q0, self.q1, self.num_heads = q0, q1, H
        # as Attention: multi-query attention over the latent row
        self.n_q, self.n_kv, self.head_dim, self.group = q1 - q0, 1, kvr + rope, q1 - q0
        self.scale, self.span, self.window = cfg.attn_scale, Span(), None
        self.rope = cfg.layer_rope(layer)
        self.cp_comm = mesh.cp_comm
        self.q_norm = self.k_norm = self.sinks = self.sink = None
        self.temperature = ()
        self.kvr, self.nope, self.rope_dim, self.v_dim = kvr, nope, rope, v
        pairs = rope if cfg.rope_interleaved else 0                 # DeepSeek's RoPE pairs adjacent dims
        if qr:                                                      # q: LoRA-compressed, then this rank's heads
            self.q_a = ColumnParallelLinear(h, [Part(p + "q_a_proj", qr, 0, qr)], bias=cfg.attention_bias,
                                            dtype=dtype)
            self.q_a_norm = RMSNorm(p + "q_a_layernorm", qr, LATENT_EPS, dtype)
            self.q_b = ColumnParallelLinear(qr, [Part(p + "q_b_proj", H * qk, q0 * qk, q1 * qk, pairs, qk)],
                                            bias=False, dtype=dtype)
        else:
            self.q_a = self.q_a_norm = None
            self.q_b = ColumnParallelLinear(h, [Part(p + "q_proj", H * qk, q0 * qk, q1 * qk, pairs, qk)],
                                            bias=False, dtype=dtype)
        self.kv_a = ColumnParallelLinear(h, [Part(p + "kv_a_proj_with_mqa", kvr + rope, 0, kvr + rope, pairs,
                                                  kvr + rope)], bias=cfg.attention_bias, dtype=dtype)
        self.kv_a_norm = RMSNorm(p + "kv_a_layernorm", kvr, LATENT_EPS, dtype)
        # kv_b_proj's rows of this rank's heads: per head nope key rows then v value rows, (n_q, nope + v, kvr)
        self.kv_b_name = p + "kv_b_proj.weight"
        self.kv_b = nn.Parameter(torch.empty(self.n_q, nope + v, kvr, dtype=dtype), requires_grad=False)
        self.o = RowParallelLinear(p + "o_proj", H * v, h, q0 * v, q1 * v, bias=cfg.attention_bias, dtype=dtype,
                                   comm=mesh.tp_reduce)

    def load(self, src):
        for m in (self.q_a, self.q_a_norm, self.q_b, self.kv_a, self.kv_a_norm, self.o):
            if m is not None:
                m.load(src)
        rows = self.nope + self.v_dim
        w = src.read(self.kv_b_name, (self.num_heads * rows, self.kvr), Slice(0, self.q0 * rows, self.q1 * rows))
        self.kv_b.copy_(w.view(self.n_q, rows, self.kvr))

    def pack(self):
        for m in (self.q_a, self.q_b, self.kv_a, self.o):
            if m is not None:
                m.pack()

    def forward(self, x, plan: AttentionPlan, rope: RopeTables, k_cache, v_cache, write_index):
        T, kvr, nope = x.shape[0], self.kvr, self.nope
        q = self.q_b(self.q_a_norm(self.q_a(x)) if self.q_a is not None else x)        # (T, n_q * (nope + rope))
        q = q.view(T, self.n_q, nope + self.rope_dim)
        kv = self.kv_a(x)                                                                # (T, kvr + rope)
        k_pe = Rotary.apply(kv[:, None, kvr:], rope.cos, rope.sin)                       # (T, 1, rope)
        row = torch.cat((self.kv_a_norm(kv[:, :kvr]), k_pe[:, 0]), dim=-1)               # (T, kvr + rope)
        # the latent cache (1, pool, kvr + rope) = V, in its own dtype (``--kv-dtype``)
        k_cache.index_copy_(1, write_index, row.unsqueeze(0).to(k_cache.dtype))
        # absorbed queries: head h's nope part times its key rows of kv_b_proj, into the latent space
        q_lat = torch.bmm(q[..., :nope].transpose(0, 1), self.kv_b[:, :nope])          # (n_q, T, kvr)
        qa = torch.cat((q_lat.transpose(0, 1), Rotary.apply(q[..., nope:], rope.cos, rope.sin)), dim=-1)
        out = self.attend(qa.contiguous(), plan, k_cache, v_cache)                       # (T, n_q, kvr + rope)
        # the value: the latent part of the output times head h's value rows
        o = torch.bmm(out[..., :kvr].transpose(0, 1), self.kv_b[:, nope:].transpose(1, 2))   # (n_q, T, v)
        return self.o(o.transpose(0, 1).reshape(T, self.n_q * self.v_dim))
