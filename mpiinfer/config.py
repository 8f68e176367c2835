"""Frozen configuration dataclasses.

Owns: ``ModelConfig`` (parsed once from a Hugging Face ``config.json``),
``SamplingParams`` (per request), ``ParallelConfig`` and ``RunConfig`` (what the
CLI builds).  Nothing here touches MPI, torch devices or files other than the
checkpoint's JSON files.  The model config is never rewritten for sharding:
local sizes are derived by the layers from a ``Mesh``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A checkpoint, option or layout that cannot be used. Raised before any compute."""


# Architectures we implement, by the ``architectures[0]`` string of config.json.
DENSE_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
MOE_ARCHS = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Llama4ForCausalLM": "llama4",
    "GptOssForCausalLM": "gpt_oss",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DeepseekV2ForCausalLM": "deepseek_v2",
}
# The base models of the dense families (``AutoModel`` / sentence-transformers exports of embedding models): no
# LM head, so embedding records only (unless the embedding is tied, which is then the head)
BASE_ARCHS = {"LlamaModel": "llama", "MistralModel": "mistral", "Qwen2Model": "qwen2", "Qwen3Model": "qwen3"}
SUPPORTED_ARCHS = {**DENSE_ARCHS, **MOE_ARCHS, **BASE_ARCHS}
# Multimodal checkpoints whose language model we run (text in, text out; the vision tower is not read): the causal
# LM their text_config describes
MULTIMODAL_ARCHS = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM",
                    "Llama4ForConditionalGeneration": "Llama4ForCausalLM"}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default" | "llama3" | "linear" | "yarn" | "none" (no rotation: Llama 4's NoPE layers)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn (gpt-oss, DeepSeek): the ramp between interpolated and extrapolated frequencies, and cos/sin's scale
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


NO_ROPE = RopeConfig(type="none")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                    # e.g. "LlamaForCausalLM"
    family: str                  # e.g. "llama", "mixtral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    lm_head: bool = True              # False: a base model (BASE_ARCHS) without a tied embedding: no logits
    attention_bias: bool = False      # q/k/v bias (Qwen2, Qwen2-MoE; Llama's attention_bias also sets o bias)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False             # Qwen3, Qwen3-MoE
    sliding_window: int | None = None
    hidden_act: str = "silu"          # "silu" | "gelu_pytorch_tanh" (Gemma 3)
    # Gemma 3: per-layer attention kinds and the knobs of its decoder layer
    layer_types: tuple = ()           # per layer "sliding_attention" | "full_attention"; () = all alike
    rope_local: RopeConfig | None = None   # RoPE of the sliding-window layers, where it differs from ``rope``
    query_pre_attn_scalar: float | None = None   # attention scale = this ** -0.5 (None: head_dim ** -0.5)
    norm_plus_one: bool = False       # RMSNorm scales by (1 + w), all in float32 (Gemma)
    embed_scale: float = 1.0          # embeddings times this, rounded to the model dtype (Gemma: sqrt(hidden))
    final_logit_softcapping: float | None = None   # logits = cap * tanh(logits / cap)
    # Llama 4: chunked local attention on the RoPE layers, NoPE full-attention layers with temperature tuning
    attention_chunk_size: int | None = None   # "chunked_attention" layers attend within their chunk of positions
    no_rope_layers: tuple = ()        # per layer 1 = RoPE, 0 = no position embedding (NoPE); () = RoPE everywhere
    qk_l2_norm: bool = False          # weightless RMSNorm of q and k on the RoPE layers
    temperature_tuning: tuple = ()    # (floor_scale, attn_scale): NoPE layers scale q by position
    rope_interleaved: bool = False    # RoPE pairs adjacent dims (Meta's layout): q/k rows permuted at load
    router: str = "softmax"           # "softmax" top-k | "sigmoid" of the top-k logits (Llama 4) |
                                      # "softmax_topk": softmax of the top-k logits (gpt-oss)
    moe_scale_input: bool = False     # the routing weight scales the expert's input, not its output (Llama 4)
    moe_layer_ids: tuple = ()         # the MoE layers, where the config lists them (Llama 4's moe_layers)
    # gpt-oss: attention sinks, biased router and experts, clamped SwiGLU, MXFP4 experts
    attention_sinks: bool = False     # a learned logit per head joins every softmax (its value weight is 0)
    norm_f32_weight: bool = False     # RMSNorm weight applied in float32 before rounding (gpt-oss)
    swiglu_limit: float | None = None  # experts: gate clamped above, up to +-limit; (up + 1) * gate * sigmoid(a gate)
    swiglu_alpha: float = 1.702
    expert_bias: bool = False         # biases on the router and the experts' two projections
    mxfp4_experts: bool = False       # expert weights stored as MXFP4 blocks + scales (dequantized at load)
    # DeepSeek-V3: multi-head latent attention.  The cache holds one latent row per token (kv_lora_rank compressed
    # K/V + qk_rope_head_dim rotated key): num_kv_heads = 1 and head_dim = their sum; queries are absorbed into it
    mla: tuple = ()                   # (q_lora_rank or 0, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)
    softmax_scale: float | None = None   # attention scale where it is not head_dim ** -0.5 (MLA: qk dim, yarn mscale)
    n_group: int = 1                  # DeepSeek-V3 routing: experts in n_group groups, the best topk_group kept
    topk_group: int = 1
    topk_method: str = ""             # DeepSeek-V2: "greedy" | "group_limited_greedy"
    routed_scaling_factor: float = 1.0
    mtp_layers: int = 0               # DeepSeek-V3's multi-token-prediction layers after the last: not run, not read
    # FP8 block-scaled weights (DeepSeek-V3's published checkpoints, Qwen3 FP8...): (rows, cols) of one scale
    fp8_block: tuple = ()
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    # dtype the checkpoint declares ("float32", "bfloat16", ...)
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    # embeddings: Matryoshka training (vLLM's config keys): any ``dimensions`` (is_matryoshka), or these
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Which layers use the sparse MoE block (HF's rule for Qwen MoE; every layer for Mixtral)."""
        if not self.is_moe:
            return False
        if self.family in ("llama4", "deepseek_v3", "deepseek_v2"):
            return layer in self.moe_layer_ids
        if layer in self.mlp_only_layers:
            return False
        step = max(1, self.decoder_sparse_step)
        return (layer + 1) % step == 0

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention (None: full causal attention)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_chunk(self, layer: int) -> int | None:
        """The chunk size of ``layer``'s chunked attention (Llama 4; None: not chunked)."""
        if self.layer_types and self.layer_types[layer] == "chunked_attention":
            return self.attention_chunk_size
        return None

    def layer_uses_rope(self, layer: int) -> bool:
        return not self.no_rope_layers or bool(self.no_rope_layers[layer])

    def layer_rope(self, layer: int) -> RopeConfig:
        """The RoPE parameters of ``layer`` (Gemma 3's sliding layers have their own base; Llama 4's NoPE layers
        none)."""
        if not self.layer_uses_rope(layer):
            return NO_ROPE
        if self.rope_local is not None and self.layer_types[layer] == "sliding_attention":
            return self.rope_local
        return self.rope

    @property
    def attn_scale(self) -> float:
        if self.softmax_scale is not None:
            return self.softmax_scale
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim) ** -0.5

    @property
    def rope_dim(self) -> int:
        """The dims each head rotates: head_dim, or MLA's qk_rope_head_dim."""
        return self.mla[3] if self.mla else self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count derived from the shapes (used by `plan` and benchmarks)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        attn += (self.num_heads + 2 * self.num_kv_heads) * hd * self.attention_bias + h * self.o_bias
        if self.mla:
            qr, kvr, nope, rope, v = self.mla
            qk = self.num_heads * (nope + rope)
            attn = (h * qr + qr + qr * qk if qr else h * qk) + h * (kvr + rope) + kvr + \
                kvr * self.num_heads * (nope + v) + self.num_heads * v * h
        attn += self.num_heads * self.attention_sinks
        total = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        for layer in range(self.num_layers):
            total += attn + (4 if self.family == "gemma3" else 2) * h + (2 * hd if self.qk_norm else 0)
            if self.is_moe_layer(layer):
                total += self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
                total += self.expert_bias * self.num_experts * (1 + 2 * self.moe_intermediate_size + h)
                if self.shared_expert_intermediate_size:
                    total += 3 * h * self.shared_expert_intermediate_size + (h if self.family == "qwen2_moe" else 0)
            else:
                total += 3 * h * self.intermediate_size
        return total

    @staticmethod
    def from_dir(path: str) -> ModelConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise ConfigError(f"model directory not found: {path}")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        try:
            with open(cfg_path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {cfg_path}: {e}") from None
        gen = {}
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            try:
                with open(gen_path) as f:
                    gen = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"cannot read {gen_path}: {e}") from None
        return ModelConfig.from_hf(raw, gen)

    @staticmethod
    def from_hf(raw: dict, gen: dict | None = None) -> ModelConfig:
        gen = gen or {}
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch in MULTIMODAL_ARCHS:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{arch} config.json lacks a text_config")
            # the top level's token ids, tying and dtype where the text config has none (as transformers reads them)
            top = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings", "torch_dtype", "dtype")
                   if k in raw and k not in text}
            raw = {**text, **top, "architectures": [MULTIMODAL_ARCHS[arch]]}
            arch = MULTIMODAL_ARCHS[arch]
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}, and the language "
                f"models of {', '.join(sorted(MULTIMODAL_ARCHS))}")
        family = SUPPORTED_ARCHS[arch]

        def need(key):
            if key not in raw:
                raise ConfigError(f"config.json lacks required field {key!r} for {arch}")
            return raw[key]

        quant = raw.get("quantization_config") or {}
        fp8_block = ()
        if quant.get("quant_method") == "fp8" and quant.get("weight_block_size") and \
                quant.get("fmt", "e4m3") == "e4m3":
            try:
                fp8_block = tuple(int(b) for b in quant["weight_block_size"])
            except (TypeError, ValueError):
                fp8_block = ()
            if len(fp8_block) != 2 or min(fp8_block) < 1:
                raise ConfigError(f"quantization_config weight_block_size {quant['weight_block_size']} is not two "
                                  f"positive sizes")
        elif quant and (family, quant.get("quant_method")) != ("gpt_oss", "mxfp4"):
            raise ConfigError(f"quantized checkpoint (quantization_config quant_method "
                              f"{quant.get('quant_method')!r}) is not supported: only float weights, FP8 e4m3 with "
                              f"block scales, and gpt-oss's MXFP4 experts (dequantized at load)")
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = raw.get("head_dim") or (64 if family == "gpt_oss" else hidden // heads)   # transformers' defaults
        mla = ()
        if family in ("deepseek_v3", "deepseek_v2"):
            qr = raw.get("q_lora_rank", 1536)
            mla = (int(qr or 0), int(raw.get("kv_lora_rank") or 512), int(raw.get("qk_nope_head_dim") or 128),
                   int(raw.get("qk_rope_head_dim") or 64), int(raw.get("v_head_dim") or 128))
            kv_heads, head_dim = 1, mla[1] + mla[3]       # the latent row; every query head reads it
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        if mla and mla[3] % 2:
            raise ConfigError(f"qk_rope_head_dim={mla[3]} must be even")
        act = raw.get("hidden_activation", raw.get("hidden_act", "silu")) if family == "gemma3" else \
            raw.get("hidden_act", "silu")
        if act == "swish":
            act = "silu"
        if act not in (("gelu_pytorch_tanh",) if family == "gemma3" else ("silu",)):
            raise ConfigError(f"unsupported hidden activation {act!r} for {arch} "
                              f"(supported: {'gelu_pytorch_tanh' if family == 'gemma3' else 'silu'})")

        # RoPE: transformers 4.x writes rope_theta + rope_scaling, 5.x writes rope_parameters (Gemma 3: one dict
        # per layer kind, or rope_theta + rope_scaling for the full layers and rope_local_base_freq for the others)
        rp = dict(raw.get("rope_parameters") or {})
        rope_local = None
        if family == "gemma3":
            # as transformers' Gemma3TextConfig: rope_scaling joins the full layers' dict; missing thetas from
            # rope_theta / rope_local_base_freq, else 1e6 / 1e4
            full, local = dict(rp.get("full_attention") or {}), dict(rp.get("sliding_attention") or {})
            full.update(raw.get("rope_scaling") or {})
            full.setdefault("rope_theta", raw.get("rope_theta") or 1e6)
            local.setdefault("rope_theta", raw.get("rope_local_base_freq") or 1e4)
            rope, rope_local = _rope_config(full), _rope_config(local)
        else:
            default_theta = {"llama4": 5e5, "gpt_oss": 150000.0}.get(family, 10000.0)
            theta = rp.get("rope_theta", raw.get("rope_theta", default_theta))
            scaling = {**rp, **(raw.get("rope_scaling") or {})}       # rope_scaling wins, as in transformers
            if family == "gpt_oss" and not {k for k in scaling if k != "rope_theta"}:
                # transformers' GptOssConfig fills in its YaRN where config.json names none
                scaling = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                           "original_max_position_embeddings": 4096}
            rope = _rope_config({**scaling, "rope_theta": theta},
                                int(raw.get("max_position_embeddings", 2048 if family == "deepseek_v2" else 4096)))

        attention_bias = bool(raw.get("attention_bias", family == "gpt_oss"))
        o_bias = attention_bias  # Llama's attention_bias covers o_proj too
        if family in ("qwen2", "qwen2_moe"):
            attention_bias = bool(raw.get("qkv_bias", True))
            o_bias = False

        sliding = None
        layer_types, extra = (), {}
        if family == "gemma3":
            sliding = raw.get("sliding_window", 4096)
            layer_types = _sliding_layer_types(raw, int(need("num_hidden_layers")),
                                               int(raw.get("sliding_window_pattern") or 6), sliding)
            if raw.get("attn_logit_softcapping") is not None:
                raise ConfigError("attn_logit_softcapping is not supported (Gemma 3 checkpoints set it to null)")
            if raw.get("use_bidirectional_attention"):
                raise ConfigError("use_bidirectional_attention=true (an encoder such as EmbeddingGemma) is not "
                                  "supported")
            cap = raw.get("final_logit_softcapping")
            extra = dict(layer_types=layer_types, rope_local=rope_local, norm_plus_one=True,
                         query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or 256),   # HF's default
                         embed_scale=float(hidden) ** 0.5,
                         final_logit_softcapping=float(cap) if cap is not None else None)
        elif family == "llama4":
            L = int(need("num_hidden_layers"))
            # (transformers reads the first L of a longer no_rope_layers)
            no_rope = tuple(int(bool(v)) for v in (raw.get("no_rope_layers") or (
                int((i + 1) % int(raw.get("no_rope_layer_interval") or 4) != 0) for i in range(L))))[:L]
            chunk = raw.get("attention_chunk_size", 8192)
            layer_types = tuple(raw.get("layer_types") or (
                "chunked_attention" if r and chunk is not None else "full_attention" for r in no_rope))
            if len(no_rope) != L or len(layer_types) != L or \
                    set(layer_types) - {"chunked_attention", "full_attention"}:
                raise ConfigError(f"no_rope_layers and layer_types must give one value per layer ({L}); layer_types "
                                  f"may name chunked_attention or full_attention")
            if chunk is None and "chunked_attention" in layer_types:
                raise ConfigError("attention_chunk_size is null but layer_types has chunked_attention layers")
            for key in ("intermediate_size", "intermediate_size_mlp"):
                need(key)
            step = int(raw.get("interleave_moe_layer_step") or 1)
            moe_ids = raw.get("moe_layers")
            extra = dict(layer_types=layer_types, no_rope_layers=no_rope,
                         attention_chunk_size=int(chunk) if chunk is not None else None,
                         qk_l2_norm=bool(raw.get("use_qk_norm", True)),
                         temperature_tuning=(float(raw.get("floor_scale", 8192)), float(raw.get("attn_scale", 0.1)))
                         if raw.get("attn_temperature_tuning", True) else (),
                         rope_interleaved=True, router="sigmoid", moe_scale_input=True,
                         moe_layer_ids=tuple(int(i) for i in moe_ids) if moe_ids is not None
                         else tuple(range(step - 1, L, step)))
        elif family in ("deepseek_v3", "deepseek_v2"):
            L = int(need("num_hidden_layers"))
            v3 = family == "deepseek_v3"
            scale = (mla[2] + mla[3]) ** -0.5
            m_all = (raw.get("rope_scaling") or raw.get("rope_parameters") or {}).get("mscale_all_dim")
            if rope.type != "default" and m_all:      # transformers' yarn_apply_mscale: the scale times mscale ** 2
                scale *= _yarn_mscale(rope.factor, float(m_all)) ** 2
            # transformers' defaults where keys are left out (V3: 8 groups, 4 kept, x2.5, 3 dense layers; V2: no
            # groups, x1, none dense, greedy); null: none.  V2's RoPE always pairs adjacent dims (complex form).
            n_group = int(raw.get("n_group", 8 if v3 else None) or 1)
            dense = raw.get("first_k_dense_replace", 3 if v3 else 0)
            method = "" if v3 else str(raw.get("topk_method") or "greedy")
            if method not in ("", "greedy", "group_limited_greedy"):
                raise ConfigError(f"topk_method {method!r} is not supported (greedy, group_limited_greedy)")
            extra = dict(mla=mla, softmax_scale=scale,
                         rope_interleaved=bool(raw.get("rope_interleave", True)) if v3 else True,
                         router=family, topk_method=method, n_group=n_group,
                         topk_group=int(raw.get("topk_group", 4 if v3 else None) or 1),
                         routed_scaling_factor=float(raw.get("routed_scaling_factor", 2.5 if v3 else 1.0) or 1.0),
                         moe_layer_ids=tuple(range(int(dense or 0), L)),
                         mtp_layers=int(raw.get("num_nextn_predict_layers") or 0))
        elif family == "gpt_oss":
            L = int(need("num_hidden_layers"))
            sliding = raw.get("sliding_window", 128)
            layer_types = _sliding_layer_types(raw, L, 2, sliding)
            if quant.get("quant_method") == "mxfp4" and (hidden % 32 or int(raw.get("intermediate_size") or 2880) % 32):
                raise ConfigError("MXFP4 experts need hidden_size and intermediate_size divisible by 32")
            limit = raw.get("swiglu_limit", 7.0)
            if limit is None:
                raise ConfigError("swiglu_limit is null: gpt-oss's experts need their clamp")
            extra = dict(layer_types=layer_types, attention_sinks=True, norm_f32_weight=True,
                         swiglu_limit=float(limit),
                         swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)), expert_bias=True,
                         router="softmax_topk", mxfp4_experts=quant.get("quant_method") == "mxfp4")
        elif family in ("mistral", "mixtral") or raw.get("use_sliding_window"):
            sliding = raw.get("sliding_window") or None
        if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and raw.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported for Qwen models")

        eos = gen.get("eos_token_id", raw.get("eos_token_id"))
        if eos is None:
            eos = ()
        elif isinstance(eos, int):
            eos = (eos,)
        else:
            eos = tuple(int(e) for e in eos)

        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"

        moe = {}
        if family in MOE_ARCHS.values():
            n_exp = raw.get("num_local_experts") if family in ("mixtral", "llama4") else \
                raw.get("num_local_experts", raw.get("num_experts")) if family == "gpt_oss" else \
                raw.get("n_routed_experts", 256) if family == "deepseek_v3" else \
                raw.get("n_routed_experts", raw.get("num_experts", 64)) if family == "deepseek_v2" else \
                raw.get("num_experts", raw.get("num_local_experts"))
            if not n_exp:
                raise ConfigError(f"config.json lacks the number of experts for {arch}")
            moe = dict(
                num_experts=int(n_exp),
                # (gpt-oss: transformers' default 4; it never reads experts_per_token)
                num_experts_per_tok=int(raw.get("num_experts_per_tok") or 4) if family == "gpt_oss" else
                int(raw.get("num_experts_per_tok") or 8) if family == "deepseek_v3" else
                int(need("num_experts_per_tok")),
                moe_intermediate_size=int(raw.get("moe_intermediate_size") or
                                          {"deepseek_v3": 2048, "deepseek_v2": 1407}.get(family)
                                          or raw.get("intermediate_size")
                                          or (2880 if family == "gpt_oss" else need("intermediate_size"))),
                shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
                if family == "qwen2_moe" else int(raw.get("intermediate_size") or 0) if family == "llama4" else
                int(raw.get("moe_intermediate_size") or 2048) * int(raw.get("n_shared_experts", 1) or 0)
                if family == "deepseek_v3" else
                int(raw.get("moe_intermediate_size") or 1407) * int(raw.get("n_shared_experts", 2) or 0)
                if family == "deepseek_v2" else 0,
                norm_topk_prob=True if family == "mixtral" else bool(raw.get("norm_topk_prob",
                                                                             family == "deepseek_v3")),
                decoder_sparse_step=int(raw.get("decoder_sparse_step", 1) or 1),
                mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            )
            if moe["num_experts_per_tok"] > moe["num_experts"]:
                raise ConfigError("num_experts_per_tok exceeds the number of experts")
            # (V2 with greedy routing ignores the groups, as transformers does)
            if family == "deepseek_v3" or extra.get("topk_method") == "group_limited_greedy":
                g, kg = extra["n_group"], extra["topk_group"]
                if moe["num_experts"] % g or (family == "deepseek_v3" and moe["num_experts"] // g < 2) \
                        or not 1 <= kg <= g \
                        or moe["num_experts_per_tok"] > kg * (moe["num_experts"] // g):
                    raise ConfigError(f"n_group={g} / topk_group={kg} do not fit {moe['num_experts']} experts and "
                                      f"top-{moe['num_experts_per_tok']} routing")

        return ModelConfig(
            arch=arch, family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            # Llama 4: intermediate_size is the experts' (and shared expert's) width, intermediate_size_mlp the dense
            # layers'
            intermediate_size=int(raw.get("intermediate_size_mlp" if family == "llama4" else "intermediate_size")
                                  or {"deepseek_v3": 18432, "deepseek_v2": 11008}.get(family, 0)),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5 if family in ("llama4", "gpt_oss") else 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048 if family == "deepseek_v2" else 4096)),
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", family == "gemma3")),
            lm_head=arch not in BASE_ARCHS or bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias, o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"),
            hidden_act=act,
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=str(dtype),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
            is_matryoshka=bool(raw.get("is_matryoshka") or raw.get("matryoshka_dimensions")),
            matryoshka_dimensions=tuple(int(d) for d in raw.get("matryoshka_dimensions") or ()),
            fp8_block=fp8_block,
            **moe, **extra,
        )


def _sliding_layer_types(raw: dict, layers: int, pattern: int, window) -> tuple:
    """Gemma 3's / gpt-oss's per-layer attention kinds: config.json's layer_types, else every ``pattern``-th layer
    full attention and the others sliding; refused unless one sliding_attention / full_attention per layer, and
    sliding layers with a window."""
    kinds = tuple(raw.get("layer_types") or (
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)))
    if len(kinds) != layers or set(kinds) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"layer_types must name sliding_attention or full_attention for each of the {layers} "
                          f"layers")
    if window is None and "sliding_attention" in kinds:
        raise ConfigError("sliding_window is null but layer_types has sliding_attention layers")
    return kinds


def _yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's mscale, ``0.1 m log(factor) + 1`` (1 without scaling), as transformers' ``yarn_get_mscale``."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def _rope_config(d: dict, max_position_embeddings: int = 0) -> RopeConfig:
    """RopeConfig from a rope_scaling / rope_parameters dict (with its rope_theta), yarn's attention factor
    derived as transformers derives it (``_compute_yarn_parameters``)."""
    rtype = d.get("rope_type", d.get("type", "default")) or "default"
    if rtype not in ("default", "llama3", "linear", "yarn"):
        raise ConfigError(f"unsupported rope scaling type {rtype!r} (supported: default, llama3, linear, yarn)")
    # (yarn without one: transformers takes max_position_embeddings)
    original = int(d.get("original_max_position_embeddings")
                   or (max_position_embeddings if rtype == "yarn" and max_position_embeddings else 8192))
    factor = d.get("factor")
    if factor is None:
        factor = max_position_embeddings / original if rtype == "yarn" and max_position_embeddings else 1.0
    factor = float(factor)
    attention = 1.0
    if rtype == "yarn":
        attention = d.get("attention_factor")
        if attention is None:
            m, m_all = d.get("mscale"), d.get("mscale_all_dim")
            attention = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if m and m_all else _yarn_mscale(factor)
    return RopeConfig(
        theta=float(d.get("rope_theta", 10000.0)), type=rtype, factor=factor,
        low_freq_factor=float(d.get("low_freq_factor", 1.0)),
        high_freq_factor=float(d.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        beta_fast=float(d.get("beta_fast") or 32), beta_slow=float(d.get("beta_slow") or 1),
        truncate=bool(d.get("truncate", True)), attention_factor=float(attention),
    )


MAX_N = 128                   # most samples per request (OpenAI's limit)
MAX_EMBEDDING_INPUTS = 2048   # most inputs of one embeddings request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20         # most alternatives per position (OpenAI's limit)


# pooling of an embedding request's final hidden states (SamplingParams.pooling)
POOLINGS = ("auto", "last", "mean")
# structured-output constraint kinds (SamplingParams.structured; compiled in engine/structured.py)
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. Temperature 0 means greedy."""
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0            # 0 = disabled
    seed: int | None = None
    stop: tuple = ()          # stop strings
    stop_token_ids: tuple = ()
    logprobs: bool = False
    ignore_eos: bool = False
    n: int = 1                # samples per request (choices); MAX_N at most
    # OpenAI / vLLM logits processing, applied before choosing a token (logprobs stay the model's own):
    presence_penalty: float = 0.0     # minus this for every token already in the output
    frequency_penalty: float = 0.0    # minus this x how often the token is in the output
    repetition_penalty: float = 1.0   # tokens of prompt or output: logit / p if > 0, else logit * p (HF, vLLM)
    logit_bias: tuple = ()            # ((token id, bias), ...), added to the logits first
    top_logprobs: int = 0             # with logprobs: also the k most likely tokens at each position (k <= 20)
    min_tokens: int = 0               # vLLM's: no end-of-sequence / stop token or stop string before this many
    vllm_prompt_logprobs: int = -1    # vLLM's body field prompt_logprobs k (>= 0): per prompt token its logprob
                                      # and rank and the k most likely tokens, in vLLM's shape; -1: not asked
    prompt_logprobs: bool = False     # the logprob of every prompt token given the ones before it (scoring)
    echo: bool = False                # OpenAI completions' echo: the result carries the prompt (its ids, text and,
                                      # with prompt_logprobs, the top_logprobs alternatives at each prompt position)
    # structured output: (kind, text), kind one of STRUCTURED_KINDS (engine/structured.py); () = unconstrained
    structured: tuple = ()
    # embedding requests (Request.inputs): "auto" (the checkpoint's sentence-transformers pooling, else "last"),
    # "last" or "mean" over the final hidden states; "" = a generation request.  normalize None: the checkpoint's
    pooling: str = ""
    normalize: bool | None = None
    dimensions: int = 0               # embeddings: keep the first this many values (Matryoshka models); 0 = all

    @property
    def processes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.pooling:
            if self.pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
            return
        if self.max_tokens == 0 and not self.prompt_logprobs:
            raise ValueError("max_tokens 0 (scoring the prompt alone) needs prompt_logprobs: true")
        if self.prompt_logprobs and self.n > 1:
            raise ValueError("prompt_logprobs with n > 1 is not supported (the prompt is the same for every sample: "
                             "ask for it in a record of its own)")
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0 or self.seed >= 2**63):
            raise ValueError(f"seed must be a non-negative 64-bit integer, got {self.seed!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer from 1 to {MAX_N}, got {self.n!r}")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer from 0 to max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens!r}")
        if self.min_tokens and self.structured:
            raise ValueError("min_tokens with a structured-output constraint is not supported (the constraint "
                             "decides where the answer ends)")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (0.0 < self.repetition_penalty <= 2.0):
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if self.structured and (len(self.structured) != 2 or self.structured[0] not in STRUCTURED_KINDS
                                or not isinstance(self.structured[1], str)):
            raise ValueError(f"structured must be (kind, text) with kind one of {', '.join(STRUCTURED_KINDS)}, "
                             f"got {self.structured!r}")
        for t, b in self.logit_bias:
            if not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {t!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")

    def replace(self, **kw) -> SamplingParams:
        return dataclasses.replace(self, **kw)


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    ep: int = 1
    cp: int = 1


@dataclass(frozen=True)
class EngineConfig:
    """How one replica's engine runs: device, dtype and memory."""
    kind: str = "model"             # "null": no model, each result max_tokens made-up tokens (engine/null.py)
    device: str = "cpu"
    dtype: str | None = None        # None: float32 on CPU, the checkpoint's dtype on GPU
    kv_dtype: str | None = None     # the KV cache's dtype; None: the model's (dtype)
    max_batch: int = 64                # sequences decoding at once
    kv_budget_bytes: int | None = None  # None: a default fraction of free memory
    max_seq_len: int | None = None      # None: the model's max_position_embeddings, capped by the budget
    # token budget of one step: prompt chunks + decodes (bounds activation memory).  512 measured 4.5% faster
    # than 2048 on benchmarks/bench_engine.py's mixed workload (286-288 s vs 300 s, 1.24B float32, 2 threads):
    # with smaller chunks more steps carry decodes along with a prompt chunk.
    prefill_chunk_tokens: int = 512
    threads: int | None = None
    share_gpus: bool = False               # allow several ranks on one GPU
    cp_min_tokens: int = 1024              # with --cp > 1: prompts at least this long are split over CP ranks
    cp_short: str = "spread"               # with --cp > 1: shorter prompts spread over the CP ranks, or "first"
    pack_weights: bool | None = None    # CPU: reorder weights for oneDNN; None: by dtype and max_batch
    prefix_cache: bool = True           # share the KV blocks of equal prompt prefixes (engine/kv_cache.py)
    kv_block: int = 16                  # rows per KV block (kv_cache.KV_BLOCK)
    prefix_min_blocks: int | None = None  # shortest prefix-cache hit taken (None: kv_cache.MIN_SHARED_BLOCKS*)


@dataclass(frozen=True)
class RunConfig:
    model: str | None                 # None only with the null engine
    inputs: tuple
    output: str
    defaults: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    input_format: str | None = None
    allreduce: str = "auto"                 # TP allreduce: auto | dda | mpi
    output_format: str | None = None
    prompt_template: str | None = None   # text-dir inputs: "Summarize:\n{document}"
    dataset: str | None = None           # HDF5 inputs: dataset of token arrays
    seed: int = 0                      # base seed for sampled requests that give none
    overwrite: bool = False
    retry_errors: bool = False           # compute again the records whose result in the output is an error
    quiet: bool = False
    flush_every: int = 100
    max_errors: int | None = None
    drain_seconds: float = 0.0              # after SIGTERM / SIGUSR1: let running sequences finish this long
    routing: str = "prefix"                 # dp > 1: "prefix" (records sharing a prefix meet) | "round-robin"
    served_model_names: tuple = ()          # names an OpenAI body's "model" may give (default: the model dir's)
    log_every: float = 30.0

    def model_names(self) -> frozenset | None:
        """The names an OpenAI body's ``model`` may give (None: any, with the null engine): the
        ``--served-model-name`` values, else the model directory's name and the path as given."""
        if self.served_model_names:
            return frozenset(self.served_model_names)
        if self.model is None:
            return None
        return frozenset((os.path.basename(os.path.normpath(self.model)), self.model))

    @property
    def output_model_name(self) -> str:
        """``model`` of an OpenAI output body whose request named none."""
        if self.served_model_names:
            return self.served_model_names[0]
        return os.path.basename(os.path.normpath(self.model)) if self.model else "null"
