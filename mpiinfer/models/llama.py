"""The decoder-only transformer of the Llama family: Llama (incl. llama3 RoPE
scaling, tied embeddings, GQA), Mistral (sliding window), Qwen2 (qkv bias), Qwen3
(q/k RMSNorm), and the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) whose MLP is
``moe.SparseMoeBlock`` (Llama 4's too: chunked RoPE layers and NoPE layers are
``Attention``'s per-layer settings); ``CausalLM`` also runs Gemma 3 with
``gemma3.Gemma3DecoderLayer`` (its scaled embedding, per-layer windows and RoPE bases,
and soft-capped logits).

Every layer is built at shard size from a ``Mesh``: attention heads and MLP
columns are split over the TP group; the two allreduces per layer (over
``mesh.tp_reduce``) are the ``RowParallelLinear`` calls in ``Attention.forward``
and ``MLP.forward``.  ``CausalLM.forward`` builds the step's ``AttentionPlan``
once per distinct attention span of its layers (the CP ring plans are a collective
over ``mesh.cp_comm``) and gathers the
vocab-parallel logits on TP rank 0 (``Gather`` over ``mesh.tp_comm``).
Activations are packed: ``(T, hidden)`` for all tokens of a ``StepBatch``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels, native
from ..comm.collectives import gather_to_root
from ..comm.mesh import Mesh
from ..config import ModelConfig
from ..kernels import linear
from ..parallel.linear import ColumnParallelLinear, Part, VocabParallelEmbedding
from ..parallel.shard import vocab_part, vocab_range
from . import registry
from .attention import Attention, AttentionPlan
from .deepseek import LatentAttention
from .gemma3 import Gemma3DecoderLayer
from .layers import MLP, RMSNorm, Rotary, norm
from .moe import SparseMoeBlock
from .step import StepBatch


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype):
        super().__init__()
        p = f"model.layers.{layer}."
        self.input_norm = norm(cfg, p + "input_layernorm", cfg.hidden_size, dtype)
        self.attn = (LatentAttention if cfg.mla else Attention)(cfg, mesh, layer, dtype)
        self.post_norm = norm(cfg, p + "post_attention_layernorm", cfg.hidden_size, dtype)
        if cfg.is_moe_layer(layer):
            self.mlp = SparseMoeBlock(cfg, mesh, layer, dtype)
        else:
            self.mlp = MLP(registry.mlp_prefix(cfg, layer), ("gate_proj", "up_proj", "down_proj"), cfg.hidden_size,
                           cfg.intermediate_size, mesh, dtype, bias=cfg.mlp_bias)

    def load(self, src):
        for m in (self.input_norm, self.attn, self.post_norm, self.mlp):
            m.load(src)

    def forward(self, x, plan: AttentionPlan, rope, k_cache, v_cache, write_index):
        x, h = self.post_norm.add_forward(x, self.attn(self.input_norm(x), plan, rope, k_cache, v_cache,
                                                       write_index))
        return x + self.mlp(h)


# the decoder layer of each family that does not use ``DecoderLayer``
DECODER_LAYERS = {"gemma3": Gemma3DecoderLayer}
HEAD_BLOCKS = 8   # a packed LM head is built (and applied) in this many row blocks
# the LM head's output (and a bfloat16 model's float32 logits) go into buffers kept across steps while these stay
# under this size; a larger step (prompt logprobs over a long chunk) allocates its own, so that one such request
# does not hold hundreds of MB for the rest of the job
HEAD_BUFFER_BYTES = 256 << 20


class CausalLM(nn.Module):
    """Embedding -> layers -> final norm -> vocab-parallel LM head (logits gathered on tp rank 0)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, dtype: torch.dtype, device=torch.device("cpu"),
                 kv_dtype: torch.dtype | None = None):
        """``kv_dtype``: the KV cache's dtype (default ``dtype``), for choosing the CPU kernels."""
        super().__init__()
        self.cfg, self.mesh, self.dtype, self.device = cfg, mesh, dtype, device
        v0, v1 = vocab_range(cfg.vocab_size, mesh.tp, mesh.tp_rank)
        self.vocab_start, self.vocab_stop = v0, v1
        self.embed = VocabParallelEmbedding("model.embed_tokens", cfg.vocab_size, cfg.hidden_size, v0, v1,
                                            dtype, mesh.tp_reduce)
        layer_cls = DECODER_LAYERS.get(cfg.family, DecoderLayer)
        self.layers = nn.ModuleList(layer_cls(cfg, mesh, i, dtype) for i in range(cfg.num_layers))
        self.norm = norm(cfg, "model.norm", cfg.hidden_size, dtype)
        if cfg.tie_word_embeddings or not cfg.lm_head:
            self.lm_head = None
        else:
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, [Part("lm_head", cfg.vocab_size, v0, v1)],
                                                bias=False, dtype=dtype)
        # one rotary table per RoPE configuration of the layers (Gemma 3: the sliding layers' and the others')
        self.rotary = {r: Rotary(r, cfg.rope_dim, device) for r in dict.fromkeys(l.attn.rope for l in self.layers)}
        # the distinct attention spans of the layers (window, chunk or all), in layer order: one plan each per step
        self.spans = list(dict.fromkeys(layer.attn.span for layer in self.layers))
        # Gemma: the embedding scale rounded to the model dtype, as transformers applies it
        self.embed_scale = None if cfg.embed_scale == 1.0 else torch.tensor(cfg.embed_scale, dtype=dtype, device="cpu").item()
        # the CPU kernels for RoPE + cache write and decode attention (models.attention), where they are built
        self.use_native = native.usable(torch.device(device), dtype, kv_dtype) and \
            self.layers[0].attn.group <= native.MAX_GROUP
        # the C kernels for the norms (with the residual add before one) and SiLU * up, on any CPU model they take
        elementwise = native.usable(torch.device(device), dtype)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.use_native = elementwise
            elif isinstance(m, MLP):
                m.use_native = elementwise and m.silu
        self.head_blocks = None      # the LM head (or tied embedding) packed in row blocks (``pack``)
        self._head_out = None        # their output side by side, reused step to step
        self._logits = None          # the logits as float32 (a model of another dtype), reused step to step
        self.hidden = None           # the last step's final hidden states of ``batch.hidden_rows`` (embeddings)

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
            w, n = self.lm_head.weight, self.lm_head.weight.shape[0]
            self.lm_head.weight = None
            step = -(-n // HEAD_BLOCKS)
            self.head_blocks = [kernels.pack(w[a:a + step]) for a in range(0, n, step)]
        elif embedding_rows is not None:
            # drop the table first, then pack it back from the file block by block: the peak stays at the
            # loaded weights plus one block (one packed copy of the whole table would need both at once)
            self.embed.read_from_file(embedding_rows)
            n = embedding_rows.rows
            step = -(-n // HEAD_BLOCKS)
            self.head_blocks = [kernels.pack(embedding_rows.block(a, min(n, a + step))) for a in range(0, n, step)]

    def head_weights(self) -> list:
        """The LM head's weight(s) as ``linear`` takes them: its packed row blocks, else the one (lm_head or tied
        embedding) matrix; their outputs side by side are this rank's vocab columns."""
        if self.head_blocks is not None:
            return self.head_blocks
        return [self.embed.weight if self.lm_head is None else self.lm_head.weight]

    def _buffer(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, cols) tensor from the buffer kept across steps in attribute ``name`` (grown as needed while it
        stays under HEAD_BUFFER_BYTES), else a fresh one.  Its contents are used before the next step."""
        buf = getattr(self, name)
        if buf is not None and buf.shape[0] >= rows:
            return buf[:rows]
        out = torch.empty(rows, cols, dtype=dtype, device=self.device)
        if rows * cols * dtype.itemsize <= HEAD_BUFFER_BYTES:
            setattr(self, name, out)
        return out

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv) -> torch.Tensor | None:
        """Logits (S, vocab) in float32 for ``batch.logits_rows`` on tp rank 0; None elsewhere."""
        dev = self.device
        ids = batch.input_ids.to(dev, non_blocking=True)
        pos = batch.positions.to(dev, non_blocking=True)
        write_index = batch.write_index.to(dev, non_blocking=True)
        ropes = {r: rotary.tables(pos, self.dtype) for r, rotary in self.rotary.items()}
        attn = self.layers[0].attn
        # the same spans in the same order on every rank: the CP ring plans inside are collectives
        # the decode group gathers the rows in the cache's dtype and, a cache of another (--kv-dtype), converts them
        k0 = kv.k[0]
        row = (k0.element_size() + (self.dtype.itemsize if k0.dtype != self.dtype else 0)) * attn.n_kv * attn.head_dim
        cache_row = k0.shape[0] * k0.shape[2] * k0.element_size() * (1 if kv.v is kv.k else 2)
        plans = {s: AttentionPlan.build(batch, self.mesh.cp_comm, s, row_bytes=row,
                                        group_decodes=k0.device.type != "cpu" or self.dtype != torch.float32,
                                        device=dev, use_native=self.use_native, cache_row_bytes=cache_row)
                 for s in self.spans}
        x = self.embed(ids)                                              # (T, hidden)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for i, layer in enumerate(self.layers):
            a = layer.attn
            x = layer(x, plans[a.span], ropes[a.rope], kv.k[i], kv.v[i], write_index)
        # embeddings: the final hidden states of the rows asked for (E, hidden), float32
        self.hidden = None if batch.hidden_rows is None else self.norm(x[batch.hidden_rows.to(dev)]).float()
        if not self.cfg.lm_head:                                          # a base model: hidden states only
            return torch.empty(0, self.cfg.vocab_size, device=dev) if self.mesh.tp_rank == 0 else None
        x = self.norm(x[batch.logits_rows.to(dev)])                     # (S, hidden)
        ws = self.head_weights()
        if len(ws) == 1:
            y = linear(x, ws[0])
        else:
            # the blocks side by side in a buffer kept across steps: a fresh (S, vocab) tensor each step is tens of
            # MB of new pages (measured 56 ms of a 240 ms step at S = 256 on the CI CPU); used before the next step
            y = torch.cat([linear(x, w) for w in ws], dim=1,
                          out=self._buffer("_head_out", x.shape[0], self.vocab_stop - self.vocab_start, x.dtype))
        if y.dtype == torch.float32:
            logits = y                                                   # (S, vocab_local)
        else:                                                            # into a buffer kept across steps, as above
            logits = self._buffer("_logits", y.shape[0], y.shape[1], torch.float32).copy_(y)
        if self.cfg.final_logit_softcapping is not None:                # Gemma: cap * tanh(logits / cap)
            logits.div_(self.cfg.final_logit_softcapping).tanh_().mul_(self.cfg.final_logit_softcapping)
        if self.mesh.tp == 1:
            return logits
        per = vocab_part(self.cfg.vocab_size, self.mesh.tp)             # equal parts for the gather
        if logits.shape[1] < per:
            logits = F.pad(logits, (0, per - logits.shape[1]))
        full = gather_to_root(logits, self.mesh.tp_comm, dim=-1)
        return None if full is None else full[:, :self.cfg.vocab_size]
