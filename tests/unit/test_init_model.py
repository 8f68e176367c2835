"""mpiinfer.tools.init_model: random HF checkpoints that parse here and load in transformers.

transformers is used only here, as the reference loader; the module never imports it.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from mpiinfer.config import ModelConfig
from mpiinfer.tools import init_model as im
from mpiinfer.tools.init_model import (
    ARCHS,
    init_model,
    make_config,
    weight_specs,
)

ARCH_NAMES = sorted(ARCHS)
SENTENCE = "The lighthouse keeper wrote in his log: 112 steps, fair weather, two ships."
PROMPT = "The old library stood at the corner of"


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    return tf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> directory of the tiny checkpoint (seed 0), written once for the module."""
    base = tmp_path_factory.mktemp("tiny")
    return {arch: init_model(str(base / arch), arch=arch, preset="tiny", seed=0) for arch in ARCH_NAMES}


_models = {}


def _load(transformers, path):
    if path not in _models:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        _models[path] = (model.eval(), info)
    return _models[path]


def _read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _file_tensors(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(path, "model.safetensors"))
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(load_file(os.path.join(path, name)))
    return out


def _assert_clean_load(info):
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading info not clean: {bad}"


def _assert_weights_match(model, cfg, tensors):
    """Every checkpoint tensor reached the transformers model unchanged.

    transformers 5 fuses per-expert tensors into ``experts.gate_up_proj`` [E, 2I, h]
    (gate rows first) and ``experts.down_proj`` [E, h, I] through its conversion
    mapping, and renames Mixtral's ``block_sparse_moe`` to ``mlp``.
    """
    sd = model.state_dict()
    checked = 0
    for name, t in tensors.items():
        hf = name.replace(".block_sparse_moe.", ".mlp.")
        fused = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")     # Llama 4, gpt-oss
        if ".experts." in hf and hf.split(".experts.")[1] not in fused:
            prefix, rest = hf.split(".experts.")
            e, proj = rest.split(".")[:2]
            e = int(e)
            inter = t.shape[0] if proj in ("w1", "w3", "gate_proj", "up_proj") else t.shape[1]
            if proj in ("w1", "gate_proj"):
                ref = sd[prefix + ".experts.gate_up_proj"][e, :inter]
            elif proj in ("w3", "up_proj"):
                ref = sd[prefix + ".experts.gate_up_proj"][e, inter:]
            else:
                ref = sd[prefix + ".experts.down_proj"][e]
        else:
            ref = sd[hf]
        assert ref.shape == t.shape, name
        assert torch.equal(ref, t), name
        checked += 1
    assert checked == len(weight_specs(cfg))


# --------------------------------------------------------------------------- (a) config


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_config_parses_and_matches(tiny, arch):
    path = tiny[arch]
    raw = _read_config(path)
    mc = ModelConfig.from_dir(path)
    assert raw["architectures"] == [ARCHS[arch]]
    assert raw["model_type"] == {"gemma3": "gemma3_text", "llama4": "llama4_text"}.get(arch, arch)
    assert mc.arch == ARCHS[arch] and mc.family == arch
    assert mc.hidden_size == raw["hidden_size"] == 64
    assert mc.num_layers == raw["num_hidden_layers"] == 2
    assert mc.num_heads == raw["num_attention_heads"] == 4
    if arch in ("deepseek_v3", "deepseek_v2"):   # MLA: one latent "KV head" of kv_lora_rank + qk_rope_head_dim
        assert (mc.num_kv_heads, mc.head_dim) == (1, raw["kv_lora_rank"] + raw["qk_rope_head_dim"]) == (1, 32)
    else:
        assert mc.num_kv_heads == raw["num_key_value_heads"] == 2
        assert mc.head_dim == raw["head_dim"] == 16
    assert mc.vocab_size == raw["vocab_size"] == 512
    assert mc.vocab_size >= Tokenizer.from_file(os.path.join(path, "tokenizer.json")).get_vocab_size()
    assert mc.intermediate_size == raw["intermediate_size_mlp" if arch == "llama4" else "intermediate_size"]
    assert mc.rms_norm_eps == raw["rms_norm_eps"]
    assert mc.max_position_embeddings == raw["max_position_embeddings"]
    assert mc.rope.theta == raw["rope_theta"] and mc.rope.type == ("yarn" if arch == "gpt_oss" else "default")
    assert mc.tie_word_embeddings is raw["tie_word_embeddings"] is False
    assert mc.torch_dtype == raw["torch_dtype"] == "float32"
    assert mc.bos_token_id == raw["bos_token_id"] == im.BOS_ID
    assert mc.eos_token_ids == (im.EOS_ID, im.IM_END_ID)  # generation_config.json wins
    assert mc.sliding_window == (16 if arch in ("gemma3", "gpt_oss") else None)
    assert mc.qk_norm == (arch in ("qwen3", "qwen3_moe", "gemma3"))
    assert mc.attention_bias == (arch in ("qwen2", "qwen2_moe", "gpt_oss")) and mc.o_bias == (arch == "gpt_oss")
    with open(os.path.join(path, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": im.BOS_ID, "eos_token_id": [im.EOS_ID, im.IM_END_ID]}

    if arch == "gemma3":   # as gemma-3-1b: one full-attention layer per sliding_window_pattern, two RoPE bases
        assert mc.layer_types == ("sliding_attention", "full_attention") and raw["sliding_window_pattern"] == 2
        assert [mc.layer_window(i) for i in range(2)] == [16, None]
        assert (mc.layer_rope(0).theta, mc.layer_rope(1).theta) == (raw["rope_local_base_freq"], 1e6) == (1e4, 1e6)
        assert mc.hidden_act == raw["hidden_activation"] == "gelu_pytorch_tanh" and mc.norm_plus_one
        assert mc.attn_scale == raw["query_pre_attn_scalar"] ** -0.5 and mc.embed_scale == 8.0
    else:
        assert (mc.layer_types == ()) == (arch not in ("llama4", "gpt_oss")) and mc.layer_window(1) is None
        assert not mc.norm_plus_one
    if arch == "llama4":   # as Llama 4 Maverick: MoE every other layer, NoPE every other (tiny), chunks of 16
        assert mc.num_experts == raw["num_local_experts"] == 4 and mc.num_experts_per_tok == 1
        assert mc.moe_intermediate_size == mc.shared_expert_intermediate_size == raw["intermediate_size"] == 32
        assert [mc.is_moe_layer(i) for i in range(2)] == [False, True] and mc.router == "sigmoid"
        assert mc.layer_types == ("chunked_attention", "full_attention") and mc.no_rope_layers == (1, 0)
        assert [mc.layer_chunk(i) for i in range(2)] == [16, None] and mc.layer_rope(1).type == "none"
        assert mc.qk_l2_norm and mc.temperature_tuning == (4.0, 0.1) and mc.rope_interleaved and mc.moe_scale_input
    elif arch == "deepseek_v3":   # as DeepSeek-V3: the first layer dense, grouped sigmoid routing, a shared expert
        assert mc.num_experts == raw["n_routed_experts"] == 4 and mc.router == "deepseek_v3"
        assert [mc.is_moe_layer(i) for i in range(2)] == [False, True] and (mc.n_group, mc.topk_group) == (2, 1)
        assert mc.mla == (32, 24, 16, 8, 12) and mc.rope_dim == 8 and mc.rope_interleaved
        assert mc.attn_scale == 24 ** -0.5 and mc.shared_expert_intermediate_size == 32
    elif arch == "deepseek_v2":   # as DeepSeek-V2: softmax routing limited to groups, two shared experts
        assert mc.num_experts == raw["n_routed_experts"] == 4 and mc.router == "deepseek_v2"
        assert mc.topk_method == "group_limited_greedy" and (mc.n_group, mc.topk_group) == (2, 1)
        assert mc.routed_scaling_factor == 16.0 and mc.shared_expert_intermediate_size == 64
    elif arch == "gpt_oss":   # as gpt-oss-20b: banded and full layers alternating, YaRN, sinks, biased experts
        assert mc.num_experts == raw["num_local_experts"] == 4 and mc.num_experts_per_tok == 2
        assert mc.moe_intermediate_size == raw["intermediate_size"] == 32 and mc.router == "softmax_topk"
        assert mc.layer_types == ("sliding_attention", "full_attention") and mc.rope.type == "yarn"
        assert mc.attention_sinks and mc.expert_bias and mc.swiglu_limit == 7.0 and not mc.mxfp4_experts
        assert all(mc.is_moe_layer(i) for i in range(2))
    elif arch == "mixtral":
        assert "num_experts" not in raw and "moe_intermediate_size" not in raw
        assert (mc.num_experts, mc.num_experts_per_tok) == (raw["num_local_experts"], raw["num_experts_per_tok"]) == (4, 2)
        assert mc.moe_intermediate_size == raw["intermediate_size"] == 32
    elif arch in ("qwen2_moe", "qwen3_moe"):
        assert (mc.num_experts, mc.num_experts_per_tok) == (raw["num_experts"], raw["num_experts_per_tok"]) == (4, 2)
        assert mc.moe_intermediate_size == raw["moe_intermediate_size"] == 32
        assert mc.norm_topk_prob == raw["norm_topk_prob"]
        assert mc.decoder_sparse_step == raw["decoder_sparse_step"] == 1
        assert list(mc.mlp_only_layers) == raw["mlp_only_layers"] == []
        if arch == "qwen2_moe":
            assert mc.shared_expert_intermediate_size == raw["shared_expert_intermediate_size"] == 64
        else:
            assert "shared_expert_intermediate_size" not in raw and mc.shared_expert_intermediate_size == 0
    else:
        assert not mc.is_moe and "num_experts" not in raw and "num_local_experts" not in raw
    if arch == "mistral":
        assert "sliding_window" in raw and raw["sliding_window"] is None

    # The file holds exactly the tensors weight_specs names, with their shapes.
    specs = {n: s for n, s, _ in weight_specs(raw)}
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(specs)
        for n in f.keys():
            assert tuple(f.get_slice(n).get_shape()) == specs[n]
    expected = {
        "llama": "model.layers.1.mlp.down_proj.weight",
        "mistral": "model.layers.0.self_attn.o_proj.weight",
        "qwen2": "model.layers.0.self_attn.k_proj.bias",
        "qwen3": "model.layers.1.self_attn.q_norm.weight",
        "mixtral": "model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "qwen2_moe": "model.layers.0.mlp.shared_expert_gate.weight",
        "qwen3_moe": "model.layers.0.mlp.experts.3.up_proj.weight",
        "gemma3": "model.layers.1.post_feedforward_layernorm.weight",
        "llama4": "model.layers.1.feed_forward.experts.gate_up_proj",
        "gpt_oss": "model.layers.1.self_attn.sinks",
        "deepseek_v3": "model.layers.1.mlp.gate.e_score_correction_bias",
        "deepseek_v2": "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
    }[arch]
    assert expected in specs and "lm_head.weight" in specs


def test_gemma3_1b_shapes_count_as_the_published_model():
    """The gemma3 1b preset is gemma-3-1b's shapes: its published 999,885,952 parameters."""
    cfg = make_config("gemma3", "1b")
    mc = ModelConfig.from_hf(cfg)
    assert mc.num_params == sum(math.prod(s) for _, s, _ in weight_specs(cfg)) == 999_885_952
    assert mc.tie_word_embeddings and mc.layer_types.count("full_attention") == 4 and mc.sliding_window == 512


def test_param_counts_without_writing():
    cfg = make_config("llama", "1b")
    mc = ModelConfig.from_hf(cfg)
    assert mc.num_params == 1_235_814_400  # Llama-3.2-1B
    assert sum(math.prod(s) for _, s, _ in weight_specs(cfg)) == mc.num_params
    assert "lm_head.weight" not in {n for n, _, _ in weight_specs(cfg)}
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 128256
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (2048, 16, 8192)
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert (mc.rope.factor, mc.rope.low_freq_factor, mc.rope.high_freq_factor,
            mc.rope.original_max_position_embeddings) == (32.0, 1.0, 4.0, 8192)
    for arch in ("llama", "mistral", "mixtral"):  # no biases / qk-norms, so exact
        c = make_config(arch, "tiny")
        assert sum(math.prod(s) for _, s, _ in weight_specs(c)) == ModelConfig.from_hf(c).num_params


def test_overrides_and_errors():
    cfg = make_config("mixtral", "tiny", {"num_local_experts": 8, "init_std": 0.1})
    assert cfg["num_local_experts"] == 8 and "init_std" not in cfg
    assert sum(".experts." in n and n.endswith("w1.weight") for n, _, _ in weight_specs(cfg)) == 8 * 2
    assert ModelConfig.from_hf(make_config("mistral", "tiny", {"sliding_window": 64})).sliding_window == 64
    cfg = make_config("llama", "tiny", {"hidden_size": 128})
    assert cfg["head_dim"] == 32
    assert make_config("qwen2", "tiny", tokenizer_vocab=1000)["vocab_size"] == 1024
    with pytest.raises(ValueError):
        make_config("gpt2")
    with pytest.raises(ValueError):
        make_config("llama", "huge")
    with pytest.raises(ValueError):
        make_config("llama", dtype="int8")


# --------------------------------------------------------------------------- (b) + (e) transformers


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_transformers_loads_without_missing_keys(tiny, transformers, arch):
    path = tiny[arch]
    model, info = _load(transformers, path)
    _assert_clean_load(info)
    assert type(model).__name__ == ARCHS[arch]
    _assert_weights_match(model, _read_config(path), _file_tensors(path))
    ids = torch.tensor([[im.BOS_ID, 43, 414, 82, 427, 322, 15, 263]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 512)
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0.5  # not flat


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_greedy_generation_is_not_degenerate(tiny, transformers, arch):
    path = tiny[arch]
    model, _ = _load(transformers, path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=im.EOS_ID)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 20
    assert len(set(new)) >= 4, new
    tok.decode(new)  # random ids decode without error


# --------------------------------------------------------------------------- (c) tokenizer


def test_tokenizer_roundtrip_and_chat_template(tiny, transformers):
    path = tiny["llama"]
    raw = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert 400 <= raw.get_vocab_size() <= 512 and len(tok) == raw.get_vocab_size()
    for i, t in enumerate(im.SPECIAL_TOKENS):
        assert raw.token_to_id(t) == i
    assert (tok.bos_token, tok.eos_token) == (im.SPECIAL_TOKENS[0], im.SPECIAL_TOKENS[1])

    ids = tok(SENTENCE).input_ids
    assert ids == raw.encode(SENTENCE).ids
    assert ids[0] == im.BOS_ID and ids.count(im.BOS_ID) == 1
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE
    assert raw.decode(ids) == SENTENCE
    assert len(ids) < len(SENTENCE) * 0.6  # merges were learned
    text = "naïve café — ünïcödé ✓"  # bytes outside the corpus still round-trip
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    # ids the model may emit beyond the tokenizer's size decode without raising
    raw.decode([5, 600, 128000])
    tok.decode([5, 600, 128000])

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n")
    chat_ids = tok(rendered, add_special_tokens=False).input_ids
    assert chat_ids[:2] == [im.BOS_ID, im.IM_START_ID] and chat_ids.count(im.IM_END_ID) == 2
    assert raw.encode(rendered, add_special_tokens=False).ids == chat_ids
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tc = json.load(f)
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["add_bos_token"] is True


def test_tokenizer_identical_across_archs(tiny):
    blobs = {open(os.path.join(p, "tokenizer.json"), "rb").read() for p in tiny.values()}
    assert len(blobs) == 1


# --------------------------------------------------------------------------- (d) determinism


def _all_bytes(path):
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


def test_deterministic_per_seed(tiny, tmp_path):
    again = init_model(str(tmp_path / "again"), arch="qwen2_moe", seed=0)
    assert _all_bytes(again) == _all_bytes(tiny["qwen2_moe"])
    other = init_model(str(tmp_path / "other"), arch="qwen2_moe", seed=1)
    a, b = _all_bytes(again), _all_bytes(other)
    assert a["model.safetensors"] != b["model.safetensors"]
    assert a["tokenizer.json"] == b["tokenizer.json"] and a["config.json"] == b["config.json"]
    ta, tb = load_file(os.path.join(again, "model.safetensors")), load_file(os.path.join(other, "model.safetensors"))
    assert all(not torch.equal(ta[k], tb[k]) for k in ta)


def test_deterministic_across_processes(tiny, tmp_path):
    """The CLI in a fresh interpreter (another hash seed) writes the same bytes."""
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    subprocess.run([sys.executable, "-m", "mpiinfer", "init-model", str(out), "--arch", "qwen3", "--seed", "0"],
                   check=True, env=env, capture_output=True)
    assert _all_bytes(str(out)) == _all_bytes(tiny["qwen3"])


# --------------------------------------------------------------------------- (f) sharding, dtype


def test_sharded_checkpoint_loads(tiny, transformers, tmp_path):
    path = init_model(str(tmp_path / "sharded"), arch="mixtral", seed=0, shard_max_bytes=150_000)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(os.listdir(path)) == sorted(files + [
        "config.json", "generation_config.json", "model.safetensors.index.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    total = 0
    for name in files:
        with safe_open(os.path.join(path, name), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == name
                total += f.get_tensor(k).numel() * 4
    assert total == index["metadata"]["total_size"]
    assert set(index["weight_map"]) == {n for n, _, _ in weight_specs(_read_config(path))}
    # same tensors as the unsharded file: sharding does not change values
    tensors = _file_tensors(path)
    ref = load_file(os.path.join(tiny["mixtral"], "model.safetensors"))
    assert tensors.keys() == ref.keys() and all(torch.equal(tensors[k], ref[k]) for k in ref)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    _assert_clean_load(info)
    _assert_weights_match(model, _read_config(path), tensors)


def test_bf16_tied_and_dense_layers(transformers, tmp_path):
    """bf16 cast, tied embeddings and a dense layer inside a MoE model (mlp_only_layers)."""
    path = init_model(str(tmp_path / "bf16"), arch="qwen3_moe", dtype="bf16",
                      overrides={"tie_word_embeddings": True, "mlp_only_layers": [0]})
    cfg = _read_config(path)
    assert cfg["torch_dtype"] == "bfloat16"
    names = {n for n, _, _ in weight_specs(cfg)}
    assert "lm_head.weight" not in names and "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    _assert_clean_load(info)
    assert model.dtype == torch.bfloat16
    _assert_weights_match(model, cfg, _file_tensors(path))
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[0, 50, 60, 70]])).logits).all()


# --------------------------------------------------------------------------- atomic writes


def test_refuses_overwrite_and_writes_atomically(tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    init_model(str(out), arch="llama")  # an existing empty directory is fine
    before = _all_bytes(str(out))
    with pytest.raises(FileExistsError):
        init_model(str(out), arch="llama", seed=1)
    assert _all_bytes(str(out)) == before
    init_model(str(out), arch="llama", seed=1, overwrite=True)
    assert _all_bytes(str(out))["model.safetensors"] != before["model.safetensors"]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(im, "_write_weights", boom)
    with pytest.raises(RuntimeError):
        init_model(str(tmp_path / "fails"), arch="llama")
    with pytest.raises(RuntimeError):
        init_model(str(out), arch="llama", seed=2, overwrite=True)
    assert _all_bytes(str(out))["model.safetensors"] != before["model.safetensors"]  # seed-1 model intact
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp dirs, no partial output
