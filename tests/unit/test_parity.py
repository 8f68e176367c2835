"""Single-process engine vs transformers: greedy tokens identical, logprobs within 1e-4 (float32)."""
import math
import statistics

import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.messages import Request
from mpiinfer.tokenizer import Tokenizer

from ..conftest import ARCHS
from ..reference import dequantized_twin, hf_greedy

NEW = 32
LENGTHS = (3, 17, 9, 41, 1, 25)


def prompts_for(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def run_engine(model_dir, prompts, max_batch, step_tokens, new=NEW, pack_weights=None, kv_dtype=None):
    runner = ModelRunner(model_dir, EngineConfig(kv_budget_bytes=1 << 24, pack_weights=pack_weights, kv_dtype=kv_dtype),
                         Mesh.single(), Device("cpu"))
    engine = Engine(runner, Tokenizer(model_dir), max_batch=max_batch, step_tokens=step_tokens)
    sp = SamplingParams(max_tokens=new, logprobs=True, ignore_eos=True)
    reqs = [Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]
    res = sorted(engine.generate(reqs), key=lambda r: r.index)
    assert [r.error for r in res] == [None] * len(prompts)
    return res, engine


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_with_transformers(arch, model_dirs):
    d = model_dirs(arch)
    vocab = Tokenizer(d).vocab_size
    prompts = prompts_for(vocab)
    ref = hf_greedy(d, prompts, NEW)
    # all prompts in one batch, whole prompts per step
    res, _ = run_engine(d, prompts, max_batch=len(prompts), step_tokens=4096)
    # continuous batching: 2 slots refilled mid-run, prompts chunked across steps next to decodes
    res_cb, eng = run_engine(d, prompts, max_batch=2, step_tokens=7)
    assert eng.steps > NEW * 3   # slots really were refilled
    for (toks, lps), r, rc in zip(ref, res, res_cb):
        assert len(set(toks)) >= 4, "degenerate reference output: the test model is too weak to catch errors"
        assert r.token_ids == toks
        assert rc.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4
        assert max(abs(a - b) for a, b in zip(rc.logprobs, lps)) < 1e-4
        assert r.finish_reason == "length" and len(r.token_ids) == NEW


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_kv_cache_under_a_float32_model(arch, model_dirs, monkeypatch):
    """``--kv-dtype bfloat16`` with float32 weights: the engine computes in float32 over a cache rounded to bfloat16,
    so it matches transformers with every key and value row rounded to bfloat16 as it enters its cache (MLA: the
    latent rows, which transformers 5 caches too): tokens identical; logprobs equal to float32 noise at the median,
    within 2e-3 at most (a K/V value within float32 noise of a bfloat16 rounding boundary may round the other way
    than transformers', one bfloat16 ulp: seen up to 4e-4).  Rounding the reference moves its logprobs by 1e-2 or
    more, so a float32 cache fails here.  Llama runs the torch paths as well as the C kernels."""
    from mpiinfer import native
    d = model_dirs(arch)
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=5)
    ref = hf_greedy(d, prompts, NEW, kv_dtype=torch.bfloat16)
    plain = hf_greedy(d, prompts, NEW)
    assert max(abs(a - b) for (_, la), (_, lb) in zip(ref, plain) for a, b in zip(la, lb)) > 1e-2
    for torch_paths in ([False, True] if arch == "llama" else [False]):
        if torch_paths:
            monkeypatch.setattr(native, "usable", lambda *a: False)
        res, eng = run_engine(d, prompts, max_batch=len(prompts), step_tokens=4096, kv_dtype="bfloat16")
        res_cb, _ = run_engine(d, prompts, max_batch=2, step_tokens=7, kv_dtype="bfloat16")
        assert eng.runner.kv.k[0].dtype == torch.bfloat16 and eng.runner.model.dtype == torch.float32
        if arch == "llama":                     # the C kernels with a bfloat16 cache, then the torch paths
            assert eng.runner.model.use_native is (not torch_paths and native.available())
        diffs = []
        for (toks, lps), r, rc in zip(ref, res, res_cb):
            assert r.token_ids == toks and rc.token_ids == toks
            diffs += [abs(a - b) for x in (r, rc) for a, b in zip(x.logprobs, lps)]
        assert max(diffs) < 2e-3 and statistics.median(diffs) < 1e-5, (max(diffs), statistics.median(diffs))


def test_packed_untied_head_runs_in_row_blocks(model_dirs):
    """An untied LM head packed for oneDNN is split into row blocks like a tied one (their outputs in a buffer
    kept across steps): same tokens and logprobs as transformers, and as the unpacked head."""
    d = model_dirs("llama", tie_word_embeddings=False)
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=2)
    ref = hf_greedy(d, prompts, NEW)
    res, eng = run_engine(d, prompts, max_batch=3, step_tokens=16, pack_weights=True)
    model = eng.runner.model
    assert model.lm_head.weight is None and len(model.head_blocks) > 1 and all(b.is_mkldnn for b in model.head_blocks)
    res_plain, eng = run_engine(d, prompts, max_batch=3, step_tokens=16, pack_weights=False)
    assert eng.runner.model.head_blocks is None and eng.runner.model.lm_head.weight is not None
    for (toks, lps), r, rp in zip(ref, res, res_plain):
        assert r.token_ids == toks and rp.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


def test_head_buffers_are_kept_only_while_small(monkeypatch):
    """The LM head's output buffers are reused step to step, grown as needed, but not past HEAD_BUFFER_BYTES: a
    larger step (prompt logprobs over a long chunk) gets a tensor of its own, and the buffer kept stays small."""
    from types import SimpleNamespace

    from mpiinfer.models import llama
    monkeypatch.setattr(llama, "HEAD_BUFFER_BYTES", 100 * 10 * 4)
    m = SimpleNamespace(_logits=None, device=torch.device("cpu"))
    a = llama.CausalLM._buffer(m, "_logits", 50, 10, torch.float32)
    assert m._logits is a and a.shape == (50, 10)
    b = llama.CausalLM._buffer(m, "_logits", 20, 10, torch.float32)
    assert b.data_ptr() == a.data_ptr() and b.shape == (20, 10)          # reused
    c = llama.CausalLM._buffer(m, "_logits", 100, 10, torch.float32)
    assert m._logits is c                                                 # grown, still within the bound
    d = llama.CausalLM._buffer(m, "_logits", 101, 10, torch.float32)
    assert d.shape == (101, 10) and m._logits is c                        # past it: its own tensor, not kept


def test_llama3_rope_scaling_and_tied_embeddings(model_dirs):
    d = model_dirs("llama", tie_word_embeddings=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   rope_theta=500000.0)
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=1)
    ref = hf_greedy(d, prompts, NEW)
    res, eng = run_engine(d, prompts, max_batch=3, step_tokens=16, pack_weights=True)
    model = eng.runner.model
    # packed: the tied head is a packed copy, the embedding reads its rows from the checkpoint file
    assert all(b.is_mkldnn for b in model.head_blocks) and model.embed.weight is None and model.embed.rows is not None
    res_plain, eng = run_engine(d, prompts, max_batch=3, step_tokens=16, pack_weights=False)
    assert eng.runner.model.embed.weight is not None and eng.runner.model.head_blocks is None
    for (toks, lps), r, rp in zip(ref, res, res_plain):
        assert rp.token_ids == toks
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


def test_mistral_sliding_window(model_dirs):
    d = model_dirs("mistral", sliding_window=8)
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=2)
    ref = hf_greedy(d, prompts, NEW)
    res, _ = run_engine(d, prompts, max_batch=6, step_tokens=5)
    for (toks, lps), r in zip(ref, res):
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen2_moe", {}), ("llama4", {}),
                                            # as published, tied: the packed head and the scaled embedding rows
                                            # read from the file (a small init keeps the random model from
                                            # predicting its own input token)
                                            ("gemma3", {"tie_word_embeddings": True, "init_std": 0.02})])
@pytest.mark.parametrize("pack", [False, True])
def test_parity_plain_and_packed_weights(arch, overrides, pack, model_dirs):
    """Both CPU weight layouts (plain, and oneDNN-packed incl. MoE experts) match transformers."""
    d = model_dirs(arch, **overrides)
    prompts = prompts_for(Tokenizer(d).vocab_size)
    ref = hf_greedy(d, prompts, NEW)
    res, eng = run_engine(d, prompts, max_batch=3, step_tokens=9, pack_weights=pack)
    assert eng.runner.packed is pack
    assert eng.runner.model.layers[0].attn.qkv.weight.is_mkldnn is pack
    for (toks, lps), r in zip(ref, res):
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


def assert_whole_and_chunked_prompts_match(d, seed):
    """Whole prompts in one batch, then 2 slots with prompts chunked next to decodes: transformers' tokens."""
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=seed)
    ref = hf_greedy(d, prompts, NEW)
    for max_batch, step_tokens in ((6, 4096), (2, 7)):
        res, _ = run_engine(d, prompts, max_batch=max_batch, step_tokens=step_tokens)
        for (toks, lps), r in zip(ref, res):
            assert len(set(toks)) >= 4
            assert r.token_ids == toks
            assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


# gemma-3-1b's config.json as published (transformers 4.50 keys), shapes aside
GEMMA3_1B = {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
             "bos_token_id": 2, "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
             "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
             "num_hidden_layers": 26, "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
             "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
             "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144}


def test_gemma3_config_formats_and_refusals():
    from mpiinfer.config import ConfigError, ModelConfig
    mc = ModelConfig.from_hf(GEMMA3_1B)
    full = [i for i in range(26) if mc.layer_window(i) is None]
    assert full == [5, 11, 17, 23] and mc.layer_window(0) == 512
    assert (mc.layer_rope(0).theta, mc.layer_rope(5).theta) == (1e4, 1e6)
    assert mc.tie_word_embeddings and mc.eos_token_ids == (1, 106) and mc.attn_scale == 256 ** -0.5
    # transformers 5 keys: one RoPE dict per layer kind (gemma-3-4b's linear scaling on the full layers)
    v5 = {k: v for k, v in GEMMA3_1B.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                                          "sliding_window_pattern")}
    v5["num_hidden_layers"] = 3
    v5["layer_types"] = ["sliding_attention", "full_attention", "full_attention"]
    v5["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    mc5 = ModelConfig.from_hf(v5)
    assert [mc5.layer_window(i) for i in range(3)] == [512, None, None]
    assert mc5.layer_rope(2).type == "linear" and mc5.layer_rope(2).factor == 8.0 and mc5.layer_rope(0).theta == 1e4
    # keys left out take transformers' defaults; rope_scaling joins the full layers' dict of transformers 5's keys
    bare = {k: v for k, v in GEMMA3_1B.items() if k not in ("query_pre_attn_scalar", "head_dim")}
    assert ModelConfig.from_hf({**bare, "hidden_size": 512, "num_attention_heads": 4}).attn_scale == 256 ** -0.5
    mixed = ModelConfig.from_hf({**v5, "rope_parameters": {"full_attention": {"rope_theta": 2e6}},
                                 "rope_local_base_freq": 5e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert (mixed.layer_rope(1).theta, mixed.layer_rope(1).factor, mixed.layer_rope(0).theta) == (2e6, 2.0, 5e4)
    for bad, message in [({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
                         ({"sliding_window": None}, "sliding_window is null"),
                         ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
                         ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
                         ({"hidden_activation": "relu"}, "unsupported hidden activation")]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf({**GEMMA3_1B, **bad})


def test_gemma3_knobs_match_transformers(model_dirs):
    """Gemma 3 with every knob away from its default: attention scale from query_pre_attn_scalar, soft-capped
    logits, one KV head, a window of 8 on layers 0 and 2 (RoPE base 1e4), full attention on layer 1 with linear
    RoPE scaling (base 1e6), all in transformers 5's keys; whole prompts and chunked prompts next to decodes."""
    d = model_dirs("gemma3", num_hidden_layers=3, num_key_value_heads=1, query_pre_attn_scalar=24,
                   final_logit_softcapping=3.0, sliding_window=8, sliding_window_pattern=None, rope_theta=None,
                   rope_local_base_freq=None, rope_scaling=None,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    assert_whole_and_chunked_prompts_match(d, seed=4)


# Llama 4 Scout's text config as published (its text_config), shapes aside
LLAMA4_SCOUT = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "attention_bias": False,
                "attention_chunk_size": 8192, "attn_scale": 0.1, "attn_temperature_tuning": 4, "bos_token_id": 200000,
                "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192, "head_dim": 128, "hidden_act": "silu",
                "hidden_size": 5120, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
                "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "no_rope_layers": [],
                "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
                "num_key_value_heads": 8, "num_local_experts": 16, "rms_norm_eps": 1e-05,
                "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "rope_theta": 500000.0, "tie_word_embeddings": False, "use_qk_norm": True, "vocab_size": 202048}


def test_llama4_config_and_refusals():
    from mpiinfer.comm.mesh import Layout
    from mpiinfer.config import ConfigError, ModelConfig
    from mpiinfer.models.registry import validate_layout
    mc = ModelConfig.from_hf(LLAMA4_SCOUT)
    assert mc.family == "llama4" and mc.num_experts == 16 and mc.num_experts_per_tok == 1
    assert mc.intermediate_size == 16384 and mc.moe_intermediate_size == mc.shared_expert_intermediate_size == 8192
    assert all(mc.is_moe_layer(i) for i in range(48))                     # interleave_moe_layer_step 1
    nope = [i for i in range(48) if not mc.layer_uses_rope(i)]
    assert nope == list(range(3, 48, 4)) and all(mc.layer_chunk(i) is None for i in nope)
    assert mc.layer_chunk(0) == 8192 and mc.layer_rope(0).type == "llama3" and mc.layer_rope(3).type == "none"
    assert mc.temperature_tuning == (8192.0, 0.1) and mc.qk_l2_norm and mc.eos_token_ids == (200001, 200007, 200008)
    # Maverick: MoE on every other layer, from interleave_moe_layer_step or an explicit moe_layers list
    assert [i for i in range(48) if ModelConfig.from_hf({**LLAMA4_SCOUT, "interleave_moe_layer_step": 2})
            .is_moe_layer(i)] == list(range(1, 48, 2))
    assert [i for i in range(48) if ModelConfig.from_hf({**LLAMA4_SCOUT, "moe_layers": [0, 5]}).is_moe_layer(i)] \
        == [0, 5]
    validate_layout(mc, Layout(world=2, cp=2))                            # chunked attention under CP
    validate_layout(ModelConfig.from_hf({**LLAMA4_SCOUT, "attention_chunk_size": None}), Layout(world=2, cp=2))
    with pytest.raises(ConfigError, match="one value per layer"):
        ModelConfig.from_hf({**LLAMA4_SCOUT, "no_rope_layers": [1, 0]})
    with pytest.raises(ConfigError, match="attention_chunk_size is null"):
        ModelConfig.from_hf({**LLAMA4_SCOUT, "attention_chunk_size": None,
                             "layer_types": ["chunked_attention"] * 48})
    with pytest.raises(ConfigError, match="intermediate_size_mlp"):
        ModelConfig.from_hf({k: v for k, v in LLAMA4_SCOUT.items() if k != "intermediate_size_mlp"})
    # transformers' defaults for keys left out, and a no_rope_layers longer than the layers (its first 48 count)
    bare = ModelConfig.from_hf({k: v for k, v in LLAMA4_SCOUT.items() if k not in ("rope_theta", "rms_norm_eps",
                                                                                    "rope_scaling")}
                               | {"no_rope_layers": [1, 1, 1, 0] * 13})
    assert (bare.rope.theta, bare.rms_norm_eps, len(bare.no_rope_layers)) == (5e5, 1e-5, 48)


@pytest.mark.parametrize("overrides", [
    # top-2 sigmoid routing (each token's input scaled by two weights), every layer MoE, llama3 RoPE scaling,
    # chunks of 8, NoPE on the last of 3 layers with temperature tuning from position 1, one KV head
    dict(num_hidden_layers=3, num_key_value_heads=1, num_experts_per_tok=2, interleave_moe_layer_step=1,
         attention_chunk_size=8, no_rope_layers=[1, 1, 0], floor_scale=2,
         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}),
    # Maverick's: no q/k norm, an explicit moe_layers list; no chunking (the layout CP takes)
    dict(num_hidden_layers=3, use_qk_norm=False, moe_layers=[0, 2], attention_chunk_size=None,
         no_rope_layers=[0, 1, 1], floor_scale=3),
], ids=["top2-chunk8", "maverick-unchunked"])
def test_llama4_knobs_match_transformers(overrides, model_dirs):
    """Llama 4 with its knobs moved; whole prompts and chunked prompts next to decodes."""
    d = model_dirs("llama4", **overrides)
    assert_whole_and_chunked_prompts_match(d, seed=6)


@pytest.mark.parametrize("rope", [
    # gpt-oss's, DeepSeek-V3's (mscale pair), Qwen's long-context recipe
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
    {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
     "original_max_position_embeddings": 4096, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6},
])
def test_yarn_rope_equals_transformers(rope):
    """YaRN's inverse frequencies bit for bit and its cos/sin scale, as transformers computes them."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mpiinfer.config import _rope_config
    from mpiinfer.models.layers import rope_inv_freq
    c = LlamaConfig(hidden_size=512, num_attention_heads=8, head_dim=64, rope_parameters=dict(rope),
                    max_position_embeddings=131072)
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](c, "cpu")
    mine = _rope_config(rope, 131072)
    assert torch.equal(rope_inv_freq(mine, 64), inv) and mine.attention_factor == factor


# gpt-oss-20b's config.json as published, shapes aside
GPT_OSS_20B = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
               "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
               "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
               "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
               "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
               "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
               "output_router_logits": False, "pad_token_id": 199999,
               "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn",
                                                                  "model.layers.*.mlp.router", "model.embed_tokens",
                                                                  "lm_head"], "quant_method": "mxfp4"},
               "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                       "original_max_position_embeddings": 4096,
                                                       "rope_type": "yarn", "truncate": False},
               "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 201088}


def test_gpt_oss_config_and_refusals():
    from mpiinfer.config import ConfigError, ModelConfig
    from mpiinfer.models.registry import expected_tensors
    mc = ModelConfig.from_hf(GPT_OSS_20B)
    assert mc.family == "gpt_oss" and mc.num_experts == 32 and mc.num_experts_per_tok == 4 and mc.mxfp4_experts
    assert [mc.layer_window(i) for i in range(3)] == [128, None, 128] and mc.rope.type == "yarn"
    assert mc.rope.attention_factor == pytest.approx(0.1 * math.log(32) + 1) and mc.attention_bias and mc.o_bias
    t = expected_tensors(mc)
    assert t["model.layers.0.mlp.experts.gate_up_proj_blocks"] == (32, 5760, 90, 16)
    assert t["model.layers.0.mlp.experts.down_proj_scales"] == (32, 2880, 90)
    assert t["model.layers.0.self_attn.sinks"] == (64,) and "model.layers.0.mlp.experts.gate_up_proj" not in t
    # gpt-oss-20b's parameter count as published (20.9B), its experts counted at full precision
    assert round(mc.num_params / 1e9, 1) == 20.9
    for bad, message in [({"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoint"),
                         ({"sliding_window": None}, "sliding_window is null"),
                         ({"intermediate_size": 2890}, "divisible by 32")]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf({**GPT_OSS_20B, **bad})
    # transformers' defaults where keys are left out: YaRN, eps 1e-5, head_dim 64, top-4, width 2880; it never
    # reads experts_per_token; rope_scaling wins over rope_parameters
    bare = {k: v for k, v in GPT_OSS_20B.items() if k not in ("rope_scaling", "rms_norm_eps", "head_dim",
                                                              "num_experts_per_tok", "experts_per_token",
                                                              "intermediate_size", "quantization_config")}
    mb = ModelConfig.from_hf({**bare, "experts_per_token": 2})
    assert (mb.rope.type, mb.rope.factor, mb.rope.original_max_position_embeddings, mb.rope.truncate) == \
        ("yarn", 32.0, 4096, False)
    assert (mb.rms_norm_eps, mb.head_dim, mb.num_experts_per_tok, mb.moe_intermediate_size) == (1e-5, 64, 4, 2880)
    both = ModelConfig.from_hf({**GPT_OSS_20B, "rope_parameters": {"rope_type": "yarn", "factor": 8.0}})
    assert both.rope.factor == 32.0
    # a yarn dict without original_max_position_embeddings: transformers takes max_position_embeddings
    no_orig = {k: v for k, v in GPT_OSS_20B["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert ModelConfig.from_hf({**GPT_OSS_20B, "rope_scaling": no_orig}).rope.original_max_position_embeddings \
        == 131072
    with pytest.raises(ConfigError, match="swiglu_limit is null"):
        ModelConfig.from_hf({**GPT_OSS_20B, "swiglu_limit": None})
    llama_gptq = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                  "num_hidden_layers": 2, "vocab_size": 512, "quantization_config": {"quant_method": "gptq"}}
    with pytest.raises(ConfigError, match="quantized checkpoint"):
        ModelConfig.from_hf(llama_gptq)


def test_gpt_oss_mxfp4_and_knobs_match_transformers(model_dirs, tmp_path):
    """gpt-oss with its experts as MXFP4 blocks (dequantized at load) against transformers on a float32 copy of the
    same values; a swiglu_limit of 0.5 so the clamps bind, 3 layers (banded, full, banded: window 16), one KV
    head, top-3 of 4 experts."""
    d = model_dirs("gpt_oss", mxfp4=True, swiglu_limit=0.5, num_hidden_layers=3, num_key_value_heads=1,
                   num_experts_per_tok=3, experts_per_token=3)
    twin = dequantized_twin(d, tmp_path / "float32")
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=7)
    ref = hf_greedy(twin, prompts, NEW)
    for max_batch, step_tokens in ((6, 4096), (2, 7)):
        res, eng = run_engine(d, prompts, max_batch=max_batch, step_tokens=step_tokens)
        assert eng.runner.cfg.mxfp4_experts
        for (toks, lps), r in zip(ref, res):
            assert len(set(toks)) >= 4
            assert r.token_ids == toks
            assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


# DeepSeek-V3's config.json as published (without its FP8 quantization_config), shapes aside
DEEPSEEK_V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
               "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
               "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
               "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
               "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
               "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
               "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
               "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                                "original_max_position_embeddings": 4096, "type": "yarn"},
               "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4,
               "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280}


def test_deepseek_v3_config_kv_bytes_and_refusals():
    from mpiinfer.config import ConfigError, ModelConfig
    from mpiinfer.engine.kv_cache import kv_bytes_per_token
    mc = ModelConfig.from_hf(DEEPSEEK_V3)
    assert mc.mla == (1536, 512, 128, 64, 128) and (mc.num_kv_heads, mc.head_dim, mc.rope_dim) == (1, 576, 64)
    assert [mc.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert (mc.n_group, mc.topk_group, mc.routed_scaling_factor, mc.norm_topk_prob) == (8, 4, 2.5, True)
    # transformers' yarn_apply_mscale: qk_head_dim ** -0.5 times mscale(40, 1) ** 2
    assert mc.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert round(mc.num_params / 1e9) == 671                       # as published, without the MTP layer
    # MLA's point: 576 cached values per token and layer, on every TP rank; the same width as MHA: 2 x 128 x 128 at
    # tp=1, 2 x 16 x 128 at tp=8 (heads split)
    assert kv_bytes_per_token(mc, 2) == 61 * 576 * 2 and kv_bytes_per_token(mc, 2, tp=8) == 61 * 576 * 2
    for bad, message in [({"n_group": 3}, "n_group=3"), ({"qk_rope_head_dim": 63}, "must be even"),
                         ({"topk_group": 9}, "topk_group=9")]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig.from_hf({**DEEPSEEK_V3, **bad})


def test_deepseek_v3_fp8_weights_match_transformers(model_dirs, tmp_path):
    """DeepSeek-V3's published form: every projection as FP8 e4m3 with a float32 scale per block (24 x 40 here, so
    blocks end mid-head), dequantized at load; transformers on a float32 copy of the same values."""
    d = model_dirs("deepseek_v3", fp8=[24, 40])
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=9)
    ref = hf_greedy(dequantized_twin(d, tmp_path / "float32"), prompts, NEW)
    res, eng = run_engine(d, prompts, max_batch=3, step_tokens=7)
    assert eng.runner.cfg.fp8_block == (24, 40)
    for (toks, lps), r in zip(ref, res):
        assert len(set(toks)) >= 4 and r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4


@pytest.mark.parametrize("overrides", [
    # no q LoRA (q_proj), YaRN with mscale (the softmax scale times mscale_all_dim's mscale squared, cos/sin by
    # mscale / mscale_all_dim), 8 experts in 4 groups (2 kept), top-3, non-interleaved RoPE, 3 layers (1 dense),
    # rms_norm_eps 1e-5 (the latent norms keep 1e-6), biases on q_a / kv_a / o
    dict(num_hidden_layers=3, q_lora_rank=None, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
         rope_interleave=False, rms_norm_eps=1e-5, attention_bias=True,
         rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 0.9, "mscale_all_dim": 1.0, "beta_fast": 32,
                       "beta_slow": 1, "original_max_position_embeddings": 256}),
    # as published: q LoRA, interleaved RoPE, one multi-token-prediction layer's tensors in the checkpoint (not read)
    dict(num_nextn_predict_layers=1, attention_bias=True),
], ids=["knobs", "mtp"])
def test_deepseek_v3_knobs_match_transformers(overrides, model_dirs):
    d = model_dirs("deepseek_v3", **overrides)
    if overrides.get("num_nextn_predict_layers"):
        from safetensors.torch import load_file, save_file
        path = d + "/model.safetensors"
        t = load_file(path)
        t.update({"model.layers.2.eh_proj.weight": torch.zeros(64, 128), "model.layers.2.enorm.weight": torch.ones(64),
                  "model.layers.2.self_attn.kv_b_proj.weight": torch.zeros(4, 4)})
        save_file(t, path)
    assert_whole_and_chunked_prompts_match(d, seed=8)


# DeepSeek-V2-Lite's config.json as published, shapes aside
DEEPSEEK_V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
                    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
                    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408,
                    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
                    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
                    "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
                    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                                     "type": "yarn"},
                    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_group": 1,
                    "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400}


@pytest.mark.parametrize("overrides", [
    # V2-Lite's kind: greedy top-3 of 8 (the groups ignored), no q LoRA, YaRN with mscale 0.707, x2, no dense layer
    dict(topk_method="greedy", n_routed_experts=8, num_experts_per_tok=3, topk_group=None,
         q_lora_rank=None, routed_scaling_factor=2.0, first_k_dense_replace=0,
         rope_scaling={"type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32,
                       "beta_slow": 1, "original_max_position_embeddings": 256}),
    # V2's: group-limited, 8 experts in 2 groups of 4 (1 kept), top-3 inside it
    dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3),
], ids=["greedy-lite", "group-limited"])
def test_deepseek_v2_knobs_match_transformers(overrides, model_dirs):
    d = model_dirs("deepseek_v2", **overrides)
    assert_whole_and_chunked_prompts_match(d, seed=10)


def test_deepseek_v2_config():
    from mpiinfer.config import ConfigError, ModelConfig
    mc = ModelConfig.from_hf(DEEPSEEK_V2_LITE)
    assert mc.mla == (0, 512, 128, 64, 128) and mc.topk_method == "greedy" and mc.router == "deepseek_v2"
    assert (mc.num_experts, mc.num_experts_per_tok, mc.shared_expert_intermediate_size) == (64, 6, 2816)
    assert [mc.is_moe_layer(i) for i in (0, 1, 26)] == [False, True, True] and mc.rope_interleaved
    assert round(mc.num_params / 1e9, 1) == 15.7                  # as published
    assert mc.attn_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)
    # transformers' defaults for keys left out or null; greedy routing ignores the groups
    bare = {k: v for k, v in DEEPSEEK_V2_LITE.items() if k not in ("intermediate_size", "moe_intermediate_size")}
    mb = ModelConfig.from_hf({**bare, "moe_intermediate_size": None, "n_group": 7, "topk_group": 9})
    assert (mb.intermediate_size, mb.moe_intermediate_size, mb.shared_expert_intermediate_size) == (11008, 1407, 2814)
    with pytest.raises(ConfigError, match="topk_method"):
        ModelConfig.from_hf({**DEEPSEEK_V2_LITE, "topk_method": "noaux_tc"})


@pytest.mark.parametrize("arch,layout", [("llama4", "published"), ("gemma3", "transformers5")])
def test_multimodal_checkpoints_run_their_language_model(arch, layout, model_dirs, tmp_path):
    """Llama 4 Scout / Maverick and Gemma 3 4B+ are published as ...ForConditionalGeneration: text_config nested,
    the language model's tensors under "language_model.model." (as published) or "model.language_model." (as
    transformers 5 saves), a vision tower beside them.  The language model runs (the vision tensors are not read)
    and gives the text checkpoint's tokens, which equal transformers'."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    d = model_dirs(arch)
    mm = tmp_path / "mm"
    shutil.copytree(d, mm)
    with open(mm / "config.json") as f:
        text = json.load(f)
    cfg = {"architectures": [{"llama4": "Llama4ForConditionalGeneration",
                              "gemma3": "Gemma3ForConditionalGeneration"}[arch]],
           "model_type": arch, "text_config": text, "vision_config": {"hidden_size": 8},
           "eos_token_id": text["eos_token_id"]}
    (mm / "config.json").write_text(json.dumps(cfg))
    t = load_file(str(mm / "model.safetensors"))
    lm, head = ("language_model.model.", "language_model.lm_head.") if layout == "published" else \
        ("model.language_model.", "lm_head.")
    t = {(lm + n[len("model."):] if n.startswith("model.") else head + n[len("lm_head."):]): v for n, v in t.items()}
    t["vision_model.patch_embedding.weight"] = torch.zeros(8, 3)
    t["multi_modal_projector.linear_1.weight"] = torch.zeros(8, 8)
    save_file(t, str(mm / "model.safetensors"))
    prompts = prompts_for(Tokenizer(d).vocab_size, seed=11)
    ref = hf_greedy(d, prompts, NEW)
    res, _ = run_engine(str(mm), prompts, max_batch=3, step_tokens=9)
    for (toks, lps), r in zip(ref, res):
        assert r.token_ids == toks
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4
