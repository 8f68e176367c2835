"""Write small random Hugging Face-format checkpoints with a real tokenizer.

Owns: the synthetic checkpoints used by tests and benchmarks.  Everything is
written offline and without ``transformers``: ``config.json`` and
``generation_config.json`` with the field names real checkpoints of each family
use, ``model.safetensors`` (or HF-style shards plus
``model.safetensors.index.json``) with the real tensor names, and a byte-level
BPE ``tokenizer.json`` trained with ``tokenizers`` on ``data/corpus.txt``
together with a ``tokenizer_config.json`` (ChatML chat template) that
``AutoTokenizer`` loads as ``PreTrainedTokenizerFast``.

Determinism: the same (arch, preset, overrides, seed, dtype, tokenizer_vocab)
gives byte-identical files.  Each tensor is drawn from its own
``torch.Generator`` seeded from ``seed`` and the tensor's name, so a tensor's
values do not depend on sharding or on which other tensors exist (and tensors of
the same name are equal across archs: tiny llama and tiny mistral with the same
seed are the same model).

Memory: the safetensors files are written by hand (header first, then data),
tensor by tensor and in chunks of at most ``_CHUNK_ELEMS`` elements, so writing
the ~1.2B-parameter "1b" preset needs well under a GiB of RAM.

Tokenizer vs. model vocabulary: the tokenizer has the trained size (about
``tokenizer_vocab``, 512 by default; at most ~1.8k with the built-in corpus),
while ``config.json``'s ``vocab_size`` is that request rounded up to a multiple
of 64 ("tiny") or the preset's own value (128256 for "1b").  Ids at or above the
tokenizer size have no text: ``Tokenizer.decode`` skips them (no crash).
Special tokens take the first ids: ``<|begin_of_text|>``=0 (bos),
``<|end_of_text|>``=1 (eos), ``<|im_start|>``=2, ``<|im_end|>``=3;
``generation_config.json`` lists eos ids [1, 3] so chats stop at ``<|im_end|>``.

Usage::

    from mpiinfer.tools.init_model import init_model
    init_model("/tmp/tiny-llama", arch="llama", preset="tiny", seed=0)

    mpiinfer init-model /tmp/tiny-mixtral --arch mixtral --set num_local_experts=8
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator

import torch

from .. import dtypes
from ..config import ModelConfig
from ..io.files import user_mode
from ..models.registry import expected_tensors
from ..weights.mxfp4 import quantize

__all__ = [
    "ARCHS",
    "BOS_ID",
    "CHAT_TEMPLATE",
    "EOS_ID",
    "IM_END_ID",
    "IM_START_ID",
    "PRESETS",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "init_model",
    "make_config",
    "weight_specs",
]

# Short name -> architectures[0] of config.json.  The short name is also the model_type.
ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "llama4": "Llama4ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
}
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "llama4", "gpt_oss", "deepseek_v3", "deepseek_v2")

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = 0, 1, 2, 3
_MIN_TOKENIZER_VOCAB = len(SPECIAL_TOKENS) + 256 + 1  # specials + byte alphabet + one merge

# ChatML.  Starts with bos_token like Llama 3's template: render with the template
# and then tokenize with add_special_tokens=False (what apply_chat_template does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Named size presets.  Keys are generator knobs, not config.json fields: make_config
# maps them to each family's field names (e.g. Mixtral's experts are
# ``num_local_experts`` and their width is ``intermediate_size``).
#   init_std:  std of linear / embedding weights (tiny uses a large one so random
#              models give varied, non-degenerate logits).
#   tokenizer_vocab: requested BPE vocabulary (specials + 256 bytes + merges).
#   vocab_size: None -> tokenizer_vocab rounded up to a multiple of 64.
#   rms_norm_eps: None -> the family's usual value (1e-5 Llama/Mistral/Mixtral, 1e-6 Qwen).
PRESETS = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=128, vocab_size=None, tokenizer_vocab=512,
        max_position_embeddings=2048, rope_theta=10000.0, rope_scaling=None,
        tie_word_embeddings=False, rms_norm_eps=None,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, init_std=0.2,
        window=16, window_pattern=2,    # Gemma 3 only: sliding window, layers per full-attention layer
        chunk=16, nope_interval=2, moe_step=2, floor_scale=4,   # Llama 4 only: attention chunk, layers per NoPE
                                                                # layer, per MoE layer, temperature floor scale
        mxfp4=False,                    # gpt-oss only: experts as MXFP4 blocks and scales
        fp8=None,                       # [rows, cols]: linear weights as FP8 e4m3 with a float32 scale per block
        mla=(32, 24, 16, 8, 12), dense_layers=1, n_group=2,   # DeepSeek-V3 / V2 only: q_lora_rank, kv_lora_rank,
                                                              # qk_nope / qk_rope / v head dims; first dense layers
    ),
    # Llama-3.2-1B shapes (1,235,814,400 parameters for the dense families).  For the
    # MoE families: 8 experts of width 1024 (top-2), i.e. the same total expert width.
    "1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, tokenizer_vocab=512,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        tie_word_embeddings=True, rms_norm_eps=1e-5,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024, init_std=0.02,
        window=512, window_pattern=6,   # as gemma-3-1b
        chunk=8192, nope_interval=4, moe_step=2, floor_scale=8192,   # as Llama 4 Maverick
        mxfp4=False, fp8=None,
        mla=(768, 256, 64, 32, 64), dense_layers=1, n_group=4,   # DeepSeek-V3's proportions at 2048 wide
    ),
}
# A family's own shapes at a preset, over the preset's: gemma3 "1b" is gemma-3-1b (999,885,952 parameters).
FAMILY_PRESETS = {
    ("gemma3", "1b"): dict(hidden_size=1152, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=256, intermediate_size=6912, vocab_size=262144, max_position_embeddings=32768,
                           rms_norm_eps=1e-6),
}
# Knobs that are never config.json fields.
_GEN_KNOBS = ("init_std", "tokenizer_vocab", "mxfp4", "mla", "dense_layers", "n_group", "fp8")

_CHUNK_ELEMS = 1 << 24        # at most 16M elements (64 MiB of float32) generated at once
_NORM_NOISE = 0.05            # RMSNorm weights: 1 + N(0, 0.05)
_BIAS_STD = 0.05              # biases: small but nonzero
_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.txt")


def _canon_dtype(dtype) -> str:
    return dtypes.compute_name(dtype)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _knobs(arch: str, preset, overrides: dict | None) -> tuple[dict, dict]:
    """(preset knobs with generator-knob overrides applied, remaining overrides)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    if isinstance(preset, dict):
        knobs = {**PRESETS["tiny"], **copy.deepcopy(preset)}
    elif preset in PRESETS:
        knobs = {**copy.deepcopy(PRESETS[preset]), **FAMILY_PRESETS.get((arch, preset), {})}
    else:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    rest = dict(overrides or {})
    for k, v in rest.items():
        # a size or count must be a positive integer (a typo would otherwise surface as a torch error)
        known_int = isinstance(knobs.get(k), int) and not isinstance(knobs.get(k), bool)
        if known_int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"--set {k}={v!r}: {k} must be a positive integer")
    for k in _GEN_KNOBS:
        if k in rest:
            knobs[k] = rest.pop(k)
    return knobs, rest


def make_config(arch: str = "llama", preset="tiny", overrides: dict | None = None,
                dtype="float32", tokenizer_vocab: int | None = None) -> dict:
    """The ``config.json`` dict for ``arch`` at ``preset`` size, without writing anything.

    ``overrides`` maps config.json field names (as the family spells them, e.g.
    ``num_local_experts`` for Mixtral, ``num_experts`` for Qwen MoE) to values and is
    applied last; a value of ``None`` writes JSON null.  If ``hidden_size`` or
    ``num_attention_heads`` is overridden without ``head_dim``, head_dim follows
    hidden_size // num_attention_heads.  ``init_std`` and ``tokenizer_vocab`` in
    ``overrides`` set the generator knobs of the same names.
    """
    knobs, rest = _knobs(arch, preset, overrides)
    if tokenizer_vocab is not None:
        knobs["tokenizer_vocab"] = tokenizer_vocab
    tok_vocab = int(knobs["tokenizer_vocab"])
    vocab = knobs["vocab_size"] or _round_up(tok_vocab, 64)
    family = arch
    h = knobs["hidden_size"]
    llama_like = family in ("llama", "mistral", "mixtral", "llama4", "gpt_oss")

    cfg: dict = {"architectures": [ARCHS[arch]],
                 "model_type": {"gemma3": "gemma3_text", "llama4": "llama4_text"}.get(family, family)}
    if family in ("llama", "qwen3", "qwen3_moe", "gemma3", "llama4"):
        cfg["attention_bias"] = False
    elif family == "gpt_oss":
        cfg["attention_bias"] = True
    cfg["attention_dropout"] = 0.0
    cfg["bos_token_id"] = BOS_ID
    cfg["eos_token_id"] = EOS_ID
    cfg["head_dim"] = knobs["head_dim"]
    cfg["hidden_act"] = "silu"
    cfg["hidden_size"] = h
    cfg["initializer_range"] = 0.02
    if family == "mixtral":
        cfg["intermediate_size"] = knobs["moe_intermediate_size"]  # Mixtral's experts are "the" MLP
    else:
        cfg["intermediate_size"] = knobs["intermediate_size"]
    cfg["max_position_embeddings"] = knobs["max_position_embeddings"]
    if family == "llama":
        cfg["mlp_bias"] = False
    cfg["num_attention_heads"] = knobs["num_attention_heads"]
    cfg["num_hidden_layers"] = knobs["num_hidden_layers"]
    cfg["num_key_value_heads"] = knobs["num_key_value_heads"]
    if family == "llama":
        cfg["pretraining_tp"] = 1
    eps = knobs["rms_norm_eps"]
    cfg["rms_norm_eps"] = float(eps if eps is not None else (1e-5 if llama_like else 1e-6))
    if knobs["rope_scaling"] is not None:
        cfg["rope_scaling"] = copy.deepcopy(knobs["rope_scaling"])
    elif family in ("qwen3", "qwen3_moe"):
        cfg["rope_scaling"] = None  # Qwen3 checkpoints write an explicit null
    cfg["rope_theta"] = float(knobs["rope_theta"])
    if family in ("mistral", "mixtral"):
        cfg["sliding_window"] = None  # full attention unless overridden
    elif family.startswith("qwen"):
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = knobs["num_hidden_layers"]
    cfg["tie_word_embeddings"] = bool(knobs["tie_word_embeddings"])
    cfg["torch_dtype"] = _canon_dtype(dtype)
    cfg["use_cache"] = True
    cfg["vocab_size"] = int(vocab)
    if family == "gemma3":
        # as gemma-3-1b's config.json: GeGLU, 1 + w norms (eps 1e-6), a window on 5 of 6 layers with RoPE base 1e4,
        # base 1e6 on the others, no soft-capping.  Embeddings tied as the preset says (gemma-3-1b ties them; the tiny
        # preset does not: a tied random model's sqrt(hidden)-scaled embedding makes every token predict itself)
        del cfg["hidden_act"]
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["query_pre_attn_scalar"] = knobs["head_dim"]
        cfg["sliding_window"] = knobs["window"]
        cfg["sliding_window_pattern"] = knobs["window_pattern"]
        cfg["rope_theta"] = 1e6
        cfg["rope_local_base_freq"] = 1e4
        cfg["rope_scaling"] = None
        cfg["attn_logit_softcapping"] = None
        cfg["final_logit_softcapping"] = None

    if family in ("deepseek_v3", "deepseek_v2"):
        # as DeepSeek-V3's config.json: MLA (q LoRA, a latent KV of kv_lora_rank + qk_rope_head_dim), sigmoid routing
        # in n_group groups with a choice bias, a shared expert, the first dense_layers layers dense, YaRN-ready;
        # DeepSeek-V2's: the same MLA, softmax routing limited to topk_group groups (group_limited_greedy), not
        # normalised, x routed_scaling_factor, two shared experts
        v3 = family == "deepseek_v3"
        qr, kvr, nope, rope, v = knobs["mla"]
        cfg.update(q_lora_rank=qr, kv_lora_rank=kvr, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
                   head_dim=rope, n_routed_experts=knobs["num_experts"],
                   num_experts_per_tok=knobs["num_experts_per_tok"], moe_intermediate_size=knobs["moe_intermediate_size"],
                   n_shared_experts=1 if v3 else 2, first_k_dense_replace=knobs["dense_layers"],
                   n_group=knobs["n_group"], topk_group=max(1, knobs["n_group"] // 2),
                   routed_scaling_factor=2.5 if v3 else 16.0, norm_topk_prob=v3,
                   num_key_value_heads=knobs["num_attention_heads"])     # (as published: the latent is shared)
        cfg.update(rope_interleave=True, num_nextn_predict_layers=0) if v3 else \
            cfg.update(topk_method="group_limited_greedy")
    elif family == "gpt_oss":
        # as gpt-oss-20b's config.json: banded (sliding) and full layers alternating, YaRN RoPE, sinks, biased
        # router and experts with the clamped SwiGLU; experts are intermediate_size wide (moe_intermediate_size)
        cfg["intermediate_size"] = knobs["moe_intermediate_size"]
        cfg["num_local_experts"] = knobs["num_experts"]
        cfg["num_experts_per_tok"] = knobs["num_experts_per_tok"]
        cfg["experts_per_token"] = knobs["num_experts_per_tok"]
        cfg["sliding_window"] = knobs["window"]
        cfg["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                              for i in range(knobs["num_hidden_layers"])]
        cfg["rope_theta"] = 150000.0
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                               "truncate": False,
                               "original_max_position_embeddings": knobs["max_position_embeddings"] // 32}
        cfg["swiglu_limit"] = 7.0
        cfg["initial_context_length"] = knobs["max_position_embeddings"] // 32
        cfg["output_router_logits"] = False
        cfg["router_aux_loss_coef"] = 0.9
        if knobs["mxfp4"]:
            cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    if knobs["fp8"]:
        # as DeepSeek-V3's published checkpoints: e4m3 weights, one float32 scale per block
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": list(knobs["fp8"])}
    if family == "llama4":
        # as Llama 4 Maverick's text config: top-1 sigmoid routing, a shared expert as wide as the routed ones
        # (intermediate_size), dense layers of intermediate_size_mlp between MoE layers, chunked attention on the
        # RoPE layers, every nope_interval-th layer NoPE with temperature tuning, L2-normed q/k
        cfg["intermediate_size"] = knobs["moe_intermediate_size"]
        cfg["intermediate_size_mlp"] = knobs["intermediate_size"]
        cfg["num_local_experts"] = knobs["num_experts"]
        cfg["num_experts_per_tok"] = 1
        cfg["interleave_moe_layer_step"] = knobs["moe_step"]
        cfg["no_rope_layer_interval"] = knobs["nope_interval"]
        cfg["attention_chunk_size"] = knobs["chunk"]
        cfg["use_qk_norm"] = True
        cfg["attn_temperature_tuning"] = True
        cfg["floor_scale"] = knobs["floor_scale"]
        cfg["attn_scale"] = 0.1
        cfg["output_router_logits"] = False
        cfg["router_aux_loss_coef"] = 0.001
    elif family == "mixtral":
        cfg["num_local_experts"] = knobs["num_experts"]
        cfg["num_experts_per_tok"] = knobs["num_experts_per_tok"]
        cfg["output_router_logits"] = False
        cfg["router_aux_loss_coef"] = 0.02
    elif family in ("qwen2_moe", "qwen3_moe"):
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = []
        cfg["moe_intermediate_size"] = knobs["moe_intermediate_size"]
        cfg["norm_topk_prob"] = family == "qwen3_moe"  # as in Qwen1.5-MoE (false) / Qwen3-MoE (true)
        cfg["num_experts"] = knobs["num_experts"]
        cfg["num_experts_per_tok"] = knobs["num_experts_per_tok"]
        cfg["output_router_logits"] = False
        cfg["router_aux_loss_coef"] = 0.001
        if family == "qwen2_moe":
            cfg["shared_expert_intermediate_size"] = knobs["shared_expert_intermediate_size"]

    for k, v in rest.items():
        cfg[k] = copy.deepcopy(v)
    if family == "gpt_oss" and "layer_types" not in rest:
        cfg["layer_types"] = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                              for i in range(cfg["num_hidden_layers"])]
    if ("hidden_size" in rest or "num_attention_heads" in rest) and "head_dim" not in rest:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and "max_window_layers" not in rest:
        cfg["max_window_layers"] = cfg["num_hidden_layers"]

    ModelConfig.from_hf(cfg)  # raises ConfigError on an inconsistent result
    return cfg


def _kind(name: str, norm_kind: str) -> str:
    """How the tensor ``name`` is drawn (``_tensor_chunks``): "embed", "head", "linear" and "router" with the
    preset's std, norms near 1 ("norm") or 0 ("norm0": Gemma's, which scale by 1 + w), small "bias", unit "sink",
    and gpt-oss's MXFP4 pairs ("mxfp4-blocks:<base>" / "mxfp4-scales:<base>", one draw for both)."""
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "lm_head.weight":
        return "head"
    if name.endswith("norm.weight"):
        return norm_kind
    if name.endswith(("gate.weight", "router.weight", "e_score_correction_bias")):
        return "router"
    if name.endswith("bias"):
        return "bias"
    if name.endswith(".sinks"):
        return "sink"
    for suffix in ("_blocks", "_scales"):
        if name.endswith(suffix):
            return f"mxfp4{suffix.replace('_', '-')}:{name[:-len(suffix)]}"
    return "linear"


def weight_specs(config: dict) -> list[tuple[str, tuple, str]]:
    """``(name, shape, kind)`` for every tensor of a checkpoint with this config.json: the tensors
    ``registry.expected_tensors`` checks a checkpoint for (the names of the real HF checkpoints), each with how it is
    drawn (``_kind``); with FP8 (``fp8`` knob), every projection matrix as e4m3 values plus block scales."""
    mc = ModelConfig.from_hf(config)
    nk = "norm0" if mc.norm_plus_one else "norm"
    specs = [(name, shape, _kind(name, nk)) for name, shape in expected_tensors(mc).items()]
    if mc.fp8_block:           # every projection matrix as FP8 blocks + scales (embedding, head, routers stay)
        br, bc = mc.fp8_block
        fp8 = []
        for name, shape, kind in specs:
            if kind == "linear" and len(shape) == 2:
                fp8 += [(name, shape, "fp8:" + name),
                        (name + "_scale_inv", (-(-shape[0] // br), -(-shape[1] // bc)), "fp8-scale:" + name)]
            else:
                fp8.append((name, shape, kind))
        specs = fp8
    return specs


def _tensor_seed(seed: int, name: str) -> int:
    d = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


def _mxfp4(base: str, shape: tuple, kind: str, seed: int, std: float) -> bytes:
    """The blocks or the scales (by ``kind``) of random weights (E, rows, cols) drawn for ``base``, quantized."""
    E, rows, groups = shape[:3]
    g = torch.Generator().manual_seed(_tensor_seed(seed, base))
    blocks, scales = quantize(torch.randn(E, rows, groups * 32, generator=g) * std)
    blocks = blocks.view(E, rows, groups, 16)
    return (blocks if kind.startswith("mxfp4-blocks") else scales).contiguous().numpy().tobytes()


def _fp8_quantize(w: torch.Tensor, block: tuple) -> tuple:
    """(e4m3 weights, float32 scales per block): w ~= e4m3 * scale, the block's largest value at e4m3's 448."""
    br, bc = block
    rows, cols = w.shape
    gr, gc = -(-rows // br), -(-cols // bc)
    pad = torch.zeros(gr * br, gc * bc)
    pad[:rows, :cols] = w
    amax = pad.view(gr, br, gc, bc).abs().amax(dim=(1, 3)).clamp(min=1e-12)      # (gr, gc)
    scale = amax / 448.0
    full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return (w / full).to(torch.float8_e4m3fn), scale.contiguous()


def _tensor_chunks(name: str, shape: tuple, kind: str, seed: int, std: float,
                   tdtype: torch.dtype, fp8: tuple = ()) -> Iterator[bytes]:
    """The tensor's bytes (row-major, little-endian), generated a few rows at a time.  ``fp8``: (block, the shapes
    of the specs by name) for FP8 weights and their scales."""
    if kind.startswith("mxfp4-"):
        yield _mxfp4(kind.split(":", 1)[1], shape, kind, seed, std)
        return
    if kind.startswith("fp8"):              # one draw for the weight and its scales (seeded by the weight's name)
        base = kind.split(":", 1)[1]
        block, shapes = fp8
        g = torch.Generator().manual_seed(_tensor_seed(seed, base))
        q, s = _fp8_quantize(torch.randn(*shapes[base], generator=g) * std, block)
        yield (q.view(torch.uint8) if kind.startswith("fp8:") else s).numpy().tobytes()
        return
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    rows = shape[0]
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, _CHUNK_ELEMS // max(1, row))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        t = torch.randn((n,) + tuple(shape[1:]), generator=g, dtype=torch.float32)
        if kind == "norm":
            t.mul_(_NORM_NOISE).add_(1.0)
        elif kind == "norm0":
            t.mul_(_NORM_NOISE)
        elif kind == "bias":
            t.mul_(_BIAS_STD)
        elif kind == "sink":                        # attention sinks: logits of the order of the scores
            pass
        else:
            t.mul_(std)
        t = t.to(tdtype).contiguous()
        yield t.view(torch.uint8).numpy().tobytes()


def _nbytes(shape: tuple, tdtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=tdtype).element_size()


def _spec_dtype(kind: str, tdtype: torch.dtype, st_dtype: str) -> tuple:
    """(torch dtype, safetensors code) a spec is written in: MXFP4 bytes, FP8 e4m3 values and float32 scales, or
    the checkpoint's dtype."""
    if kind.startswith("mxfp4-"):
        return torch.uint8, "U8"
    if kind.startswith("fp8:"):
        return torch.uint8, "F8_E4M3"
    if kind.startswith("fp8-scale:"):
        return torch.float32, "F32"
    return tdtype, st_dtype


def _write_safetensors(path: str, specs, seed: int, std: float, tdtype: torch.dtype, st_dtype: str,
                       fp8: tuple = ()) -> int:
    """Write one safetensors file tensor by tensor; returns the data size in bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, kind in specs:
        t, code = _spec_dtype(kind, tdtype, st_dtype)
        n = _nbytes(shape, t)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, kind in specs:
            f.writelines(_tensor_chunks(name, shape, kind, seed, std, tdtype, fp8))
    return off


def _write_weights(d: str, specs, seed: int, std: float, dtype: str, shard_max_bytes: int | None,
                   fp8_block: tuple = ()) -> None:
    tdtype, st_dtype = dtypes.torch_dtype(dtype), dtypes.code_of(dtype)
    fp8 = (fp8_block, {name: shape for name, shape, _ in specs}) if fp8_block else ()
    shards: list[list] = [[]]
    if shard_max_bytes is not None:
        if shard_max_bytes <= 0:
            raise ValueError("shard_max_bytes must be positive")
        size = 0
        for spec in specs:
            n = _nbytes(spec[1], _spec_dtype(spec[2], tdtype, st_dtype)[0])
            if shards[-1] and size + n > shard_max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += n
    else:
        shards = [list(specs)]
    if len(shards) == 1:  # like save_pretrained: a single shard is plain model.safetensors
        _write_safetensors(os.path.join(d, "model.safetensors"), shards[0], seed, std, tdtype, st_dtype, fp8)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(os.path.join(d, fname), shard, seed, std, tdtype, st_dtype, fp8)
        for name, _, _ in shard:
            weight_map[name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(os.path.join(d, "model.safetensors.index.json"), index)


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the built-in corpus.

    Deterministic and fast (~10 ms).  The result may be smaller than ``vocab_size``
    when the corpus runs out of merges (about 1.8k tokens at most).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    if vocab_size < _MIN_TOKENIZER_VOCAB:
        raise ValueError(f"tokenizer vocab must be >= {_MIN_TOKENIZER_VOCAB}, got {vocab_size}")
    with open(_CORPUS, encoding="utf-8") as f:
        text = f.read()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=1, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    tok.train_from_iterator(paragraphs, trainer=trainer, length=len(paragraphs))
    bos = SPECIAL_TOKENS[BOS_ID]
    assert tok.token_to_id(bos) == BOS_ID and tok.token_to_id(SPECIAL_TOKENS[IM_END_ID]) == IM_END_ID
    # Llama-3 style: prepend bos when encoding with special tokens.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)])
    return tok


def _tokenizer_config(max_len: int) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(max_len),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def init_model(out_dir: str, arch: str = "llama", preset="tiny", overrides: dict | None = None,
               seed: int = 0, dtype="float32", tokenizer_vocab: int | None = None,
               shard_max_bytes: int | None = None, overwrite: bool = False) -> str:
    """Write a random checkpoint of ``arch`` at ``preset`` size into ``out_dir``.

    Returns the absolute path of ``out_dir``.  The directory is built in a temporary
    directory beside it and renamed into place; an existing non-empty ``out_dir``
    is refused (FileExistsError) unless ``overwrite=True``.  ``shard_max_bytes``
    splits the weights into ``model-0000k-of-0000N.safetensors`` + index (a single
    shard stays ``model.safetensors``).  ``dtype`` is float32, bfloat16 or float16.
    See :func:`make_config` for ``overrides``.
    """
    dtype = _canon_dtype(dtype)
    knobs, _ = _knobs(arch, preset, overrides)
    tok_vocab = int(tokenizer_vocab if tokenizer_vocab is not None else knobs["tokenizer_vocab"])
    cfg = make_config(arch, preset, overrides, dtype=dtype, tokenizer_vocab=tok_vocab)
    tok = build_tokenizer(tok_vocab)
    if tok.get_vocab_size() > cfg["vocab_size"]:
        raise ValueError(f"vocab_size={cfg['vocab_size']} is smaller than the tokenizer "
                         f"({tok.get_vocab_size()} tokens)")
    specs = weight_specs(cfg)
    std = float(knobs["init_std"])

    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")

    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, user_mode(is_dir=True))
        _write_json(os.path.join(tmp, "config.json"), cfg)
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID]})
        tok.save(os.path.join(tmp, "tokenizer.json"))
        _write_json(os.path.join(tmp, "tokenizer_config.json"), _tokenizer_config(cfg["max_position_embeddings"]))
        _write_json(os.path.join(tmp, "special_tokens_map.json"),
                    {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID]})
        _write_weights(tmp, specs, seed, std, dtype, shard_max_bytes, ModelConfig.from_hf(cfg).fp8_block)

        if os.path.isdir(out_dir):
            if os.listdir(out_dir):
                old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
                os.rename(out_dir, os.path.join(old, base))
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rmdir(out_dir)
                os.rename(tmp, out_dir)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
