"""Architecture registry: checkpoint tensor names and shapes per family.

Owns: the full list of tensors a checkpoint of a given ``ModelConfig`` must hold
(``expected_tensors``), used to refuse a bad checkpoint before anything is read,
the MoE naming differences between families, and which layouts a model can be
split by (``validate_layout``).  Pure: no torch, no MPI.
"""
from __future__ import annotations

from ..config import ConfigError, ModelConfig

# tensors some exporters add that carry no weights we need
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def mlp_prefix(cfg: ModelConfig, layer: int) -> str:
    """The checkpoint prefix of ``layer``'s dense MLP (or MoE block)."""
    return f"model.layers.{layer}." + ("feed_forward." if cfg.family == "llama4" else "mlp.")


def moe_names(cfg: ModelConfig, layer: int) -> dict:
    """The checkpoint names of ``layer``'s MoE block.  ``fused`` (Llama 4): all experts in two 3-d tensors,
    ``gate_up_proj`` (E, hidden, 2 x inter) and ``down_proj`` (E, inter, hidden), no ``.weight`` suffix."""
    p = f"model.layers.{layer}."
    if cfg.family in ("deepseek_v3", "deepseek_v2"):      # (V3's choice bias: e_score_correction_bias)
        return {"router": p + "mlp.gate", "expert": p + "mlp.experts.{e}.{w}", "w": ("gate_proj", "up_proj", "down_proj"),
                "router_bias": p + "mlp.gate.e_score_correction_bias" if cfg.family == "deepseek_v3" else None,
                "shared_prefix": p + "mlp.shared_experts.", "shared_gate": None}
    if cfg.family == "gpt_oss":
        # gate and up columns interleaved (gate 0::2, up 1::2); biases "<name>_bias"; MXFP4: "<name>_blocks" /
        # "<name>_scales", (E, out, in / 32, 16) and (E, out, in / 32)
        m = p + "mlp."
        return {"router": m + "router", "fused": (m + "experts.gate_up_proj", m + "experts.down_proj"),
                "interleaved": True, "shared_prefix": None, "shared_gate": None}
    if cfg.family == "llama4":
        f = p + "feed_forward."
        return {"router": f + "router", "fused": (f + "experts.gate_up_proj", f + "experts.down_proj"),
                "shared_prefix": f + "shared_expert.", "shared_gate": None}
    if cfg.family == "mixtral":
        return {"router": p + "block_sparse_moe.gate", "expert": p + "block_sparse_moe.experts.{e}.{w}",
                "w": ("w1", "w3", "w2")}
    return {"router": p + "mlp.gate", "expert": p + "mlp.experts.{e}.{w}",
            "w": ("gate_proj", "up_proj", "down_proj"),
            "shared_prefix": p + "mlp.shared_expert.", "shared_gate": p + "mlp.shared_expert_gate"}


def mla_tensors(cfg: ModelConfig, a: str) -> dict:
    """DeepSeek-V3's multi-head latent attention tensors under ``a`` ("model.layers.N.self_attn.")."""
    qr, kvr, nope, rope, v = cfg.mla
    h, H = cfg.hidden_size, cfg.num_heads
    t = {}
    if qr:
        t[a + "q_a_proj.weight"] = (qr, h)
        t[a + "q_a_layernorm.weight"] = (qr,)
        t[a + "q_b_proj.weight"] = (H * (nope + rope), qr)
    else:
        t[a + "q_proj.weight"] = (H * (nope + rope), h)
    t[a + "kv_a_proj_with_mqa.weight"] = (kvr + rope, h)
    t[a + "kv_a_layernorm.weight"] = (kvr,)
    t[a + "kv_b_proj.weight"] = (H * (nope + v), kvr)
    t[a + "o_proj.weight"] = (h, H * v)
    if cfg.attention_bias:
        if qr:
            t[a + "q_a_proj.bias"] = (qr,)
        t[a + "kv_a_proj_with_mqa.bias"] = (kvr + rope,)
        t[a + "o_proj.bias"] = (h,)
    return t


def expected_tensors(cfg: ModelConfig) -> dict:
    """Every tensor name of the full checkpoint -> its shape (HF layout, (out, in) for linears)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    t = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings and cfg.lm_head:
        t["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        t[p + "input_layernorm.weight"] = (h,)
        t[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.family == "gemma3":
            t[p + "pre_feedforward_layernorm.weight"] = (h,)
            t[p + "post_feedforward_layernorm.weight"] = (h,)
        if cfg.mla:
            t.update(mla_tensors(cfg, a))
        else:
            t[a + "q_proj.weight"] = (cfg.num_heads * hd, h)
            t[a + "k_proj.weight"] = (cfg.num_kv_heads * hd, h)
            t[a + "v_proj.weight"] = (cfg.num_kv_heads * hd, h)
            t[a + "o_proj.weight"] = (h, cfg.num_heads * hd)
        if cfg.attention_bias and not cfg.mla:
            t[a + "q_proj.bias"] = (cfg.num_heads * hd,)
            t[a + "k_proj.bias"] = (cfg.num_kv_heads * hd,)
            t[a + "v_proj.bias"] = (cfg.num_kv_heads * hd,)
        if cfg.o_bias and not cfg.mla:
            t[a + "o_proj.bias"] = (h,)
        if cfg.qk_norm:
            t[a + "q_norm.weight"] = (hd,)
            t[a + "k_norm.weight"] = (hd,)
        if cfg.attention_sinks:
            t[a + "sinks"] = (cfg.num_heads,)
        if cfg.is_moe_layer(i):
            n = moe_names(cfg, i)
            E, inter = cfg.num_experts, cfg.moe_intermediate_size
            t[n["router"] + ".weight"] = (E, h)
            if n.get("router_bias"):
                t[n["router_bias"]] = (E,)
            if cfg.expert_bias:
                t[n["router"] + ".bias"] = (E,)
                t[n["fused"][0] + "_bias"] = (E, 2 * inter)
                t[n["fused"][1] + "_bias"] = (E, h)
            if cfg.mxfp4_experts:
                for name, (rows, cols) in zip(n["fused"], ((2 * inter, h), (h, inter))):
                    t[name + "_blocks"] = (E, rows, cols // 32, 16)
                    t[name + "_scales"] = (E, rows, cols // 32)
            elif "fused" in n:
                t[n["fused"][0]] = (E, h, 2 * inter)
                t[n["fused"][1]] = (E, inter, h)
            else:
                g, u, d = n["w"]
                for e in range(E):
                    t[n["expert"].format(e=e, w=g) + ".weight"] = (inter, h)
                    t[n["expert"].format(e=e, w=u) + ".weight"] = (inter, h)
                    t[n["expert"].format(e=e, w=d) + ".weight"] = (h, inter)
            if cfg.shared_expert_intermediate_size:
                s, si = n["shared_prefix"], cfg.shared_expert_intermediate_size
                t[s + "gate_proj.weight"] = (si, h)
                t[s + "up_proj.weight"] = (si, h)
                t[s + "down_proj.weight"] = (h, si)
                if n["shared_gate"]:
                    t[n["shared_gate"] + ".weight"] = (1, h)
        else:
            m = mlp_prefix(cfg, i)
            for name, shape in (("gate_proj", (cfg.intermediate_size, h)), ("up_proj", (cfg.intermediate_size, h)),
                                ("down_proj", (h, cfg.intermediate_size))):
                t[m + name + ".weight"] = shape
                if cfg.mlp_bias:
                    t[m + name + ".bias"] = (shape[0],)
    return t


def _is_mtp(cfg: ModelConfig, name: str) -> bool:
    """A tensor of a multi-token-prediction layer (model.layers.L.. for L = num_hidden_layers)."""
    if not cfg.mtp_layers or not name.startswith("model.layers."):
        return False
    layer = name.split(".")[2]
    return layer.isdigit() and cfg.num_layers <= int(layer) < cfg.num_layers + cfg.mtp_layers


def check_checkpoint(cfg: ModelConfig, index) -> None:
    """Refuse a checkpoint whose tensors do not match the config: missing, unexpected, mis-shaped."""
    expected = expected_tensors(cfg)
    have = index.names()
    missing = sorted(set(expected) - have)
    extra = sorted(n for n in have - set(expected) if not n.endswith(IGNORED_SUFFIXES)
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight")
                   # FP8: a weight's block scales (checked where the weight is read)
                   and not (cfg.fp8_block and n.endswith(".weight_scale_inv")
                            and n[:-len("_scale_inv")] in expected)
                   # DeepSeek-V3's multi-token-prediction layers (after the last layer): not run
                   and not _is_mtp(cfg, n))
    bad = [(n, index[n].shape, expected[n]) for n in sorted(set(expected) & have)
           if tuple(index[n].shape) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    for n, got, want in bad[:5]:
        problems.append(f"tensor {n} has shape {list(got)}, config.json implies {list(want)}")
    if problems:
        raise ConfigError(f"checkpoint {index.model_dir} does not match its config.json ({cfg.arch}): "
                          + "; ".join(problems))


def validate_layout(cfg: ModelConfig, mesh_layout) -> None:
    """Refuse a layout the model cannot be split by (same message on every rank)."""
    tp, ep = mesh_layout.tp, mesh_layout.ep
    # tp <= KV heads: each rank takes whole GQA groups, as evenly as they go (3 KV heads at tp=2: 2 + 1);
    # tp > KV heads: each KV head is replicated on tp / KV ranks, which split its group's query heads evenly
    if tp > cfg.num_kv_heads and tp % cfg.num_kv_heads:
        raise ConfigError(f"--tp {tp} is larger than num_key_value_heads={cfg.num_kv_heads} and not a multiple of it")
    if tp > cfg.num_kv_heads and cfg.num_heads % tp:
        raise ConfigError(f"--tp {tp} is larger than num_key_value_heads={cfg.num_kv_heads} and does not divide "
                          f"num_attention_heads={cfg.num_heads}")
    inner = [("intermediate_size", cfg.intermediate_size)] if cfg.intermediate_size and not all(
        cfg.is_moe_layer(i) for i in range(cfg.num_layers)) else []
    if cfg.shared_expert_intermediate_size:
        inner.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size))
    for name, v in inner:
        if v < tp:
            raise ConfigError(f"--tp {tp} is larger than {name}={v}")
    if ep > 1 and not cfg.is_moe:
        raise ConfigError(f"--ep {ep} was given but {cfg.arch} has no experts")
    if cfg.is_moe:
        if cfg.num_experts < ep:
            raise ConfigError(f"--ep {ep} is larger than the number of experts ({cfg.num_experts}): every EP rank "
                              f"needs at least one")
        if cfg.moe_intermediate_size < mesh_layout.etp:
            raise ConfigError(f"tp/ep = {mesh_layout.etp} is larger than moe_intermediate_size="
                              f"{cfg.moe_intermediate_size}")
