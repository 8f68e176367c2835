"""The decoder layer of Gemma 3 text models (``Gemma3ForCausalLM``, e.g. gemma-3-1b).

What differs from ``llama.DecoderLayer``: four RMSNorms per layer that scale by ``1 + w`` (input, post-attention on
the attention output before the residual add, pre- and post-feed-forward around the MLP), a GeGLU MLP (tanh GELU),
q/k RMSNorms, and attention that alternates per layer between a sliding window with its own RoPE base
(``sliding_attention``) and full causal attention (``full_attention``).  The per-layer choices live in ``Attention``
(``window``, ``rope``) from ``ModelConfig.layer_window`` / ``layer_rope``; ``CausalLM.forward`` builds one
``AttentionPlan`` per window and one rotary table per RoPE configuration and hands each layer its own.  The
embedding scale (sqrt(hidden)) and the final logit soft-cap are ``CausalLM``'s, read from the config.

Communication is ``llama.DecoderLayer``'s: the allreduce of the attention output projection and of the MLP's
down projection (``mesh.tp_reduce``), each visible in the modules ``forward`` calls; nothing else.
"""
from __future__ import annotations

from torch import nn

from ..comm.mesh import Mesh
from ..config import ModelConfig
from .attention import Attention, AttentionPlan
from .layers import MLP, norm


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype):
        super().__init__()
        p = f"model.layers.{layer}."
        h = cfg.hidden_size
        self.input_norm = norm(cfg, p + "input_layernorm", h, dtype)
        self.attn = Attention(cfg, mesh, layer, dtype)
        self.post_attn_norm = norm(cfg, p + "post_attention_layernorm", h, dtype)
        self.pre_ff_norm = norm(cfg, p + "pre_feedforward_layernorm", h, dtype)
        self.mlp = MLP(p + "mlp.", ("gate_proj", "up_proj", "down_proj"), h, cfg.intermediate_size, mesh, dtype,
                       act=cfg.hidden_act)
        self.post_ff_norm = norm(cfg, p + "post_feedforward_layernorm", h, dtype)

    def load(self, src):
        for m in (self.input_norm, self.attn, self.post_attn_norm, self.pre_ff_norm, self.mlp, self.post_ff_norm):
            m.load(src)

    def forward(self, x, plan: AttentionPlan, rope, k_cache, v_cache, write_index):
        # x: (T, hidden); the norms after attention and MLP act on their (TP-reduced) outputs
        a = self.post_attn_norm(self.attn(self.input_norm(x), plan, rope, k_cache, v_cache, write_index))
        x, h = self.pre_ff_norm.add_forward(x, a)                  # x + a and its norm (one pass on CPU)
        return x + self.post_ff_norm(self.mlp(h))
