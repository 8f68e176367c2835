"""The decoder-only transformer of the Llama family: Llama (incl. llama3 RoPE
scaling, tied embeddings, GQA), Mistral (sliding window), Qwen2 (qkv bias), Qwen3
(q/k RMSNorm), and the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) whose MLP is
``moe.SparseMoeBlock``.

Every layer is built at shard size from a ``Mesh``: attention heads and MLP
columns are split over ``mesh.tp_comm``; the two allreduces per layer are the
``RowParallelLinear`` calls in ``Attention.forward`` and ``MLP.forward``.
Activations are packed: ``(T, hidden)`` for all tokens of a ``StepBatch``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..dist.collectives import gather_to_root
from ..dist.mesh import Mesh
from ..engine.batch import StepBatch
from .. import kernels
from ..kernels import linear
from ..parallel.linear import (ColumnParallelLinear, Part, RMSNorm, RowParallelLinear,
                               VocabParallelEmbedding)
from ..parallel.ring import RingPlan, combine_across_ranks, decode_attention_partial, ring_attention
from ..weights.shard import balanced_range, kv_heads_for_rank, q_heads_for_rank
from . import registry


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), float32, with llama3 / linear scaling as in HF."""
    r = cfg.rope
    dim = cfg.head_dim
    inv = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if r.type == "linear":
        inv = inv / r.factor
    elif r.type == "llama3":
        low_wl = r.original_max_position_embeddings / r.low_freq_factor
        high_wl = r.original_max_position_embeddings / r.high_freq_factor
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / r.factor, inv)
        smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
        smoothed = (1 - smooth) * inv_l / r.factor + smooth * inv_l
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        inv = torch.where(medium, smoothed, inv_l)
    return inv


class Rotary:
    """cos/sin tables grown on demand; ``apply`` rotates (T, heads, head_dim) by true positions."""

    def __init__(self, cfg: ModelConfig, device):
        self.inv_freq = rope_inv_freq(cfg).to(device)
        self.cos = self.sin = None
        self.device = device

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self.cos is None or self.cos.shape[0] < need:
            n = max(need, 2 * (self.cos.shape[0] if self.cos is not None else 2048))
            t = torch.arange(n, device=self.device, dtype=torch.float32)
            freqs = t[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)     # (n, head_dim)
            self.cos, self.sin = emb.cos(), emb.sin()
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin


def batch_plan(batch: StepBatch, i: int, attn) -> RingPlan:
    """The ring plan of CP sequence i, built once per step (a small collective) and reused by every layer."""
    plans = batch.__dict__.setdefault("_ring_plans", {})
    if i not in plans:
        qs, ql = batch.q_start[i], batch.q_len[i]
        plans[i] = RingPlan.build(batch.positions[qs:qs + ql], batch.kv_positions(i), attn.cp_comm, attn.window)
    return plans[i]


# One-token decodes are attended together (``Attention._attend_decodes``) when there are at least
# DECODE_GROUP_MIN of them, except float32 on CPU.  Measured on the 2-core CI CPU (16 sequences, 32 query /
# 8 KV heads of 64): bfloat16 per-sequence loop 2.1 ms per layer at 144 cached tokens, together 0.65 ms
# (2.6 ms vs 1.1 ms at 250); float32 loop 0.92 ms, together 1.17 ms (1.4 vs 2.9 ms at 250): float32's
# small matmuls are cheap, and the gather of padded rows is not.  On GPUs the loop's launches dominate.
# The gather moves 2 x B x L x row_bytes, so the padded length L is capped at DECODE_GATHER_BYTES per sequence.
DECODE_GROUP_MIN = 4
DECODE_GATHER_BYTES = 1 << 20


def decode_group(batch: StepBatch, window, row_bytes: int):
    """(sequence indices, packed rows, pool-row index (B, L), padding mask (1, B, 1, L)) of the one-token
    decodes of ordinary sequences in ``batch``, or None when the per-sequence loop is cheaper.  Built once
    per step and reused by every layer."""
    cache = batch.__dict__.setdefault("_decode_group", {})
    key = (window, row_bytes)
    if key not in cache:
        sel = [i for i, (ql, kl) in enumerate(zip(batch.q_len, batch.kv_len))
               if ql == 1 and batch.seq_mode(i) == 0 and (window is None or kl <= window)]
        group = None
        if len(sel) >= DECODE_GROUP_MIN:
            kl = torch.tensor([batch.kv_len[i] for i in sel])
            L = int(kl.max())
            if 2 * L * row_bytes <= DECODE_GATHER_BYTES:
                base = torch.tensor([batch.kv_base[i] for i in sel])
                ar = torch.arange(L)
                idx = base[:, None] + torch.minimum(ar[None, :], kl[:, None] - 1)
                invalid = (ar[None, :] >= kl[:, None])[None, :, None, :]
                rows = torch.tensor([batch.q_start[i] for i in sel])
                group = (set(sel), rows, idx, invalid)
        cache[key] = group
    return cache[key]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype: torch.dtype):
        super().__init__()
        p = f"model.layers.{layer}.self_attn."
        hd, tp, r = cfg.head_dim, mesh.tp, mesh.tp_rank
        q0, q1 = q_heads_for_rank(cfg.num_heads, cfg.num_kv_heads, tp, r)
        k0, k1 = kv_heads_for_rank(cfg.num_kv_heads, tp, r)
        self.n_q, self.n_kv, self.head_dim = q1 - q0, k1 - k0, hd
        self.group = self.n_q // self.n_kv
        self.scale = hd ** -0.5
        self.window = cfg.sliding_window
        self.cp_comm = mesh.cp_comm
        self.qkv = ColumnParallelLinear(cfg.hidden_size, [
            Part(p + "q_proj", cfg.num_heads * hd, q0 * hd, q1 * hd),
            Part(p + "k_proj", cfg.num_kv_heads * hd, k0 * hd, k1 * hd),
            Part(p + "v_proj", cfg.num_kv_heads * hd, k0 * hd, k1 * hd),
        ], bias=cfg.attention_bias, dtype=dtype)
        self.o = RowParallelLinear(p + "o_proj", cfg.num_heads * hd, cfg.hidden_size, q0 * hd, q1 * hd,
                                   bias=cfg.o_bias, dtype=dtype, comm=mesh.tp_comm)
        self.q_norm = RMSNorm(p + "q_norm", hd, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(p + "k_norm", hd, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None

    def load(self, src):
        for m in (self.qkv, self.o, self.q_norm, self.k_norm):
            if m is not None:
                m.load(src)

    def pack(self):
        self.qkv.pack()
        self.o.pack()

    def forward(self, x, batch: StepBatch, rope, k_cache, v_cache, write_index):
        T, hd = x.shape[0], self.head_dim
        qkv = self.qkv(x)                                            # (T, (n_q + 2 n_kv) * hd)
        q = qkv[:, :self.n_q * hd].view(T, self.n_q, hd)
        k = qkv[:, self.n_q * hd:(self.n_q + self.n_kv) * hd].view(T, self.n_kv, hd)
        v = qkv[:, (self.n_q + self.n_kv) * hd:].view(T, self.n_kv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)   # (T, heads, hd)
        k_cache.index_copy_(1, write_index, k.transpose(0, 1))          # cache: (n_kv, pool, hd)
        v_cache.index_copy_(1, write_index, v.transpose(0, 1))
        out = torch.empty(T, self.n_q, hd, dtype=x.dtype, device=x.device)
        cp_decode = []                                                  # (rows, partial out, partial lse)
        together = None
        if k_cache.device.type != "cpu" or k_cache.dtype != torch.float32:
            together = decode_group(batch, self.window, k_cache.element_size() * self.n_kv * hd)
        done = ()
        if together is not None:
            done = together[0]
            self._attend_decodes(q, k_cache, v_cache, out, *together[1:])
        for i, (qs, ql, base, kl) in enumerate(zip(batch.q_start, batch.q_len, batch.kv_base, batch.kv_len)):
            if i in done:
                continue
            K = k_cache[:, base:base + kl]                              # (n_kv, kl, hd)
            V = v_cache[:, base:base + kl]
            mode = batch.seq_mode(i)
            if mode == 0:
                out[qs:qs + ql] = self._attend(q[qs:qs + ql], K, V, kl)
            elif mode == 1:   # CP prefill: K/V blocks travel the ring of CP ranks
                out[qs:qs + ql] = ring_attention(
                    q[qs:qs + ql], K.transpose(0, 1), V.transpose(0, 1), batch.positions[qs:qs + ql],
                    batch.kv_positions(i), self.cp_comm, self.scale, self.window, plan=batch_plan(batch, i, self))
            else:             # CP decode: attend to the local shard, merge partials across CP ranks below
                o, lse = decode_attention_partial(q[qs:qs + ql], K.transpose(0, 1), V.transpose(0, 1), self.scale,
                                                  batch.positions[qs:qs + ql], batch.kv_positions(i), self.window)
                cp_decode.append((qs, ql, o, lse))
        if cp_decode:
            merged = combine_across_ranks(torch.cat([c[2] for c in cp_decode]), torch.cat([c[3] for c in cp_decode]),
                                          self.cp_comm)
            r = 0
            for qs, ql, _, _ in cp_decode:
                out[qs:qs + ql] = merged[r:r + ql].to(out.dtype)
                r += ql
        return self.o(out.view(T, self.n_q * hd))

    def _attend_decodes(self, q, k_cache, v_cache, out, rows, idx, invalid):
        """One-token decode attention of B sequences at once: their cache rows gathered into (n_kv, B, L, hd)
        (L = the longest, shorter ones padded with a repeated row and masked out)."""
        B, L = idx.shape
        flat = idx.view(-1)
        K = k_cache.index_select(1, flat).view(self.n_kv, B, L, self.head_dim)   # (n_kv, B, L, hd)
        V = v_cache.index_select(1, flat).view(self.n_kv, B, L, self.head_dim)
        qg = q[rows].view(B, self.n_kv, self.group, self.head_dim).transpose(0, 1)   # (n_kv, B, group, hd)
        s = torch.matmul(qg, K.transpose(-1, -2)).float() * self.scale    # (n_kv, B, group, L)
        s.masked_fill_(invalid, float("-inf"))
        p = torch.softmax(s, dim=-1).to(V.dtype)
        o = torch.matmul(p, V)                                           # (n_kv, B, group, hd)
        out[rows] = o.transpose(0, 1).reshape(B, self.n_q, self.head_dim)

    def _attend(self, q, K, V, kl):
        """Causal attention of ql queries (the last ql positions of kl) on one sequence's cache."""
        ql = q.shape[0]
        if ql == 1 and (self.window is None or kl <= self.window):
            # decode: group query heads by their KV head, no KV copy
            qg = q.view(self.n_kv, self.group, self.head_dim)           # (n_kv, group, hd)
            s = torch.matmul(qg, K.transpose(1, 2)).float() * self.scale  # (n_kv, group, kl)
            p = torch.softmax(s, dim=-1).to(V.dtype)
            return torch.matmul(p, V).reshape(1, self.n_q, self.head_dim)
        qt = q.transpose(0, 1).unsqueeze(0)                             # (1, n_q, ql, hd)
        if ql == kl and (self.window is None or kl <= self.window):
            o = F.scaled_dot_product_attention(qt, K.unsqueeze(0), V.unsqueeze(0), is_causal=True,
                                               enable_gqa=True, scale=self.scale)
        else:
            qpos = torch.arange(kl - ql, kl, device=q.device)[:, None]
            kpos = torch.arange(kl, device=q.device)[None, :]
            mask = kpos <= qpos
            if self.window is not None:
                mask &= kpos > qpos - self.window
            o = F.scaled_dot_product_attention(qt, K.unsqueeze(0), V.unsqueeze(0), attn_mask=mask,
                                               enable_gqa=True, scale=self.scale)
        return o[0].transpose(0, 1)                                     # (ql, n_q, hd)


class MLP(nn.Module):
    """SwiGLU MLP: fused column-parallel gate/up, row-parallel down (one allreduce unless reduce=False)."""

    def __init__(self, prefix: str, names: tuple, hidden: int, inter: int, mesh: Mesh, dtype, bias=False,
                 reduce=True, tp=None, tp_rank=None):
        super().__init__()
        gate, up, down = names
        tp = mesh.tp if tp is None else tp
        tp_rank = mesh.tp_rank if tp_rank is None else tp_rank
        a, b = balanced_range(inter, tp_rank, tp)
        self.inter_local = b - a
        self.gate_up = ColumnParallelLinear(hidden, [Part(prefix + gate, inter, a, b), Part(prefix + up, inter, a, b)],
                                            bias=bias, dtype=dtype)
        self.down = RowParallelLinear(prefix + down, inter, hidden, a, b, bias=bias, dtype=dtype,
                                      comm=mesh.tp_comm, reduce=reduce)

    def load(self, src):
        self.gate_up.load(src)
        self.down.load(src)

    def pack(self):
        self.gate_up.pack()
        self.down.pack()

    def forward(self, x):
        gu = self.gate_up(x)                                        # (T, 2 * inter_local)
        g, u = gu[:, :self.inter_local], gu[:, self.inter_local:]
        return self.down(F.silu(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype):
        super().__init__()
        p = f"model.layers.{layer}."
        self.input_norm = RMSNorm(p + "input_layernorm", cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, mesh, layer, dtype)
        self.post_norm = RMSNorm(p + "post_attention_layernorm", cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.is_moe_layer(layer):
            from .moe import SparseMoeBlock
            self.mlp = SparseMoeBlock(cfg, mesh, layer, dtype)
        else:
            self.mlp = MLP(p + "mlp.", ("gate_proj", "up_proj", "down_proj"), cfg.hidden_size,
                           cfg.intermediate_size, mesh, dtype, bias=cfg.mlp_bias)

    def load(self, src):
        for m in (self.input_norm, self.attn, self.post_norm, self.mlp):
            m.load(src)

    def forward(self, x, batch, rope, k_cache, v_cache, write_index):
        x = x + self.attn(self.input_norm(x), batch, rope, k_cache, v_cache, write_index)
        return x + self.mlp(self.post_norm(x))


TIED_HEAD_BLOCKS = 8   # a packed tied LM head is built (and applied) in this many row blocks


class CausalLM(nn.Module):
    """Embedding -> layers -> final norm -> vocab-parallel LM head (logits gathered on tp rank 0)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, dtype: torch.dtype, device=torch.device("cpu")):
        super().__init__()
        self.cfg, self.mesh, self.dtype, self.device = cfg, mesh, dtype, device
        v0, v1 = registry.vocab_range(cfg.vocab_size, mesh.tp, mesh.tp_rank)
        self.vocab_start, self.vocab_stop = v0, v1
        self.embed = VocabParallelEmbedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size, v0, v1,
                                            dtype, mesh.tp_comm)
        self.layers = nn.ModuleList(DecoderLayer(cfg, mesh, i, dtype) for i in range(cfg.num_layers))
        self.norm = RMSNorm("model.norm", cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, [Part("lm_head", cfg.vocab_size, v0, v1)],
                                                bias=False, dtype=dtype)
        self.rotary = Rotary(cfg, device)
        self.tied_head = None        # the tied embedding packed in row blocks (``pack``)

    def load(self, src):
        self.embed.load(src)
        for layer in self.layers:
            layer.load(src)
        self.norm.load(src)
        if self.lm_head is not None:
            self.lm_head.load(src)

    def pack(self, embedding_rows=None):
        """Reorder every linear weight for the CPU kernels (``kernels.pack``), after ``load``.  A tied LM head
        is packed too when ``embedding_rows`` (a ``FileRows`` of this rank's embedding rows) is given: the
        embedding then reads its rows from the checkpoint file, so the table is not kept twice."""
        for layer in self.layers:
            layer.attn.pack()
            layer.mlp.pack()
        if self.lm_head is not None:
            self.lm_head.pack()
        elif embedding_rows is not None:
            # drop the table first, then pack it back from the file block by block: the peak stays at the
            # loaded weights plus one block (one packed copy of the whole table would need both at once)
            self.embed.read_from_file(embedding_rows)
            n = embedding_rows.rows
            step = -(-n // TIED_HEAD_BLOCKS)
            self.tied_head = [kernels.pack(embedding_rows.block(a, min(n, a + step))) for a in range(0, n, step)]

    def head_weights(self) -> list:
        """The LM head's weight(s) as ``linear`` takes them: the packed row blocks of a tied head, else the one
        (lm_head or tied embedding) matrix; their outputs side by side are this rank's vocab columns."""
        if self.tied_head is not None:
            return self.tied_head
        return [self.embed.weight if self.lm_head is None else self.lm_head.weight]

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv) -> torch.Tensor | None:
        """Logits (S, vocab) in float32 for ``batch.logits_rows`` on tp rank 0; None elsewhere."""
        dev = self.device
        ids = batch.input_ids.to(dev, non_blocking=True)
        pos = batch.positions.to(dev, non_blocking=True)
        write_index = batch.write_index.to(dev, non_blocking=True)
        rope = self.rotary.tables(pos, self.dtype)
        x = self.embed(ids)                                              # (T, hidden)
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, rope, kv.k[i], kv.v[i], write_index)
        x = self.norm(x[batch.logits_rows.to(dev)])                     # (S, hidden)
        ws = self.head_weights()
        y = linear(x, ws[0]) if len(ws) == 1 else torch.cat([linear(x, w) for w in ws], dim=1)
        logits = y.float()                                               # (S, vocab_local)
        if self.mesh.tp == 1:
            return logits
        per = -(-self.cfg.vocab_size // self.mesh.tp)                   # equal parts for the gather
        if logits.shape[1] < per:
            logits = F.pad(logits, (0, per - logits.shape[1]))
        full = gather_to_root(logits, self.mesh.tp_comm, dim=-1)
        return None if full is None else full[:, :self.cfg.vocab_size]
