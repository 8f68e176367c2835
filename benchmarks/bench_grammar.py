"""Grammar engines for structured outputs, compared on this machine: llguidance, xgrammar, outlines-core.

    python benchmarks/bench_grammar.py [--model DIR]

With the model's own tokenizer (SmolLM2: 49,152 tokens), per engine:
1. **set-up**: building the engine's tokenizer / vocabulary (once per job).
2. **compile**: a realistic extraction schema (nested objects, enums, arrays, string patterns, formats,
   number ranges, optional fields; ``EXTRACTION_SCHEMA``), cold.
3. **mask time per token**: walking that schema's valid answer token by token, the time to compute the
   allowed-token bitmask at each position (mean, p50, p99, max; microseconds).
4. **coverage**: ``FEATURES``, one schema per JSON-schema feature with a valid and an invalid instance: a
   feature counts when the schema compiles, the valid instance's tokens are all allowed and end in an accepting
   state, and the invalid one is refused somewhere (enforced, not just parsed).

outlines-core is given the vocabulary as decoded strings (tokens whose bytes are not whole UTF-8 are left out,
so it sees ~all of the ASCII part of the vocabulary); it turns a schema into one regular expression first
(``build_regex_from_schema``).  JSON: ``benchmarks/results/grammar.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "company": {"type": "string", "minLength": 1, "maxLength": 80},
        "ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"},
        "sector": {"enum": ["technology", "energy", "finance", "health", "retail", "other"]},
        "founded": {"type": "integer", "minimum": 1800, "maximum": 2026},
        "headquarters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                           "postcode": {"type": ["string", "null"]}},
            "required": ["city", "country"], "additionalProperties": False,
        },
        "people": {
            "type": "array", "maxItems": 10,
            "items": {"type": "object",
                      "properties": {"name": {"type": "string"},
                                     "role": {"enum": ["ceo", "cfo", "cto", "chair", "director", "other"]},
                                     "since": {"type": "string", "format": "date"}},
                      "required": ["name", "role"], "additionalProperties": False},
        },
        "revenue_musd": {"type": "number", "minimum": 0},
        "public": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "summary": {"type": "string", "maxLength": 300},
    },
    "required": ["company", "sector", "headquarters", "people", "public"],
    "additionalProperties": False,
}
EXTRACTION_ANSWER = {
    "company": "Northwind Energy Systems", "ticker": "NWES", "sector": "energy", "founded": 1987,
    "headquarters": {"city": "Aberdeen", "country": "United Kingdom", "postcode": None},
    "people": [{"name": "Ada Moreau", "role": "ceo", "since": "2019-04-01"},
               {"name": "Tomas Lind", "role": "cfo"}],
    "revenue_musd": 412.5, "public": True, "tags": ["wind", "offshore", "grid"],
    "summary": "Builds and operates offshore wind farms in the North Sea and sells grid storage.",
}

# name -> (schema, valid instance, invalid instance)
FEATURES = {
    "types+required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                        "required": ["a", "b"]}, {"a": 1, "b": "x"}, {"a": "1", "b": "x"}),
    "enum": ({"enum": ["red", "green", 3]}, "green", "blue"),
    "const": ({"type": "object", "properties": {"k": {"const": "v1"}}, "required": ["k"]}, {"k": "v1"},
              {"k": "v2"}),
    "nested array of objects": ({"type": "array", "items": {"type": "object", "properties": {
        "x": {"type": "number"}}, "required": ["x"]}}, [{"x": 1.5}, {"x": -2}], [{"y": 1}]),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
                          [1, 2], [1, 2, 3, 4]),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    "pattern": ({"type": "string", "pattern": "^[a-z]+-[0-9]{3}$"}, "abc-123", "abc-12x"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-05-01T10:20:30Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "ada@example.com", "not an email"),
    "format uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    "integer min/max": ({"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0.5, 0),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, "ab", "abc"),
    "oneOf": ({"oneOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                          "additionalProperties": False},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"],
                          "additionalProperties": False}]}, {"b": "x"}, {"c": 1}),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
              {"a": 1, "b": True}, {"a": 1}),
    "$ref/$defs": ({"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}},
                                     "required": ["x"], "additionalProperties": False}},
                    "type": "array", "items": {"$ref": "#/$defs/pt"}}, [{"x": 1}], [{"x": "1"}]),
    "recursive $ref": ({"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
        {"v": 1, "kids": [{"v": 2, "kids": []}]}, {"v": 1, "kids": [{"w": 2}]}),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, {"a": 1}, {"a": 1, "z": 2}),
    "additionalProperties schema": ({"type": "object", "additionalProperties": {"type": "integer"}},
                                    {"p": 1, "q": 2}, {"p": "x"}),
    "type list with null": ({"type": ["integer", "null"]}, None, "x"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    [1, "a"], ["a", 1]),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
}


def token_walks(tok, value):
    """Token ids of ``value`` as JSON, in the compact and the default ``json.dumps`` spacing."""
    texts = [json.dumps(value, separators=(",", ":")), json.dumps(value)]
    return [tok.encode(t, add_special_tokens=False).ids for t in dict.fromkeys(texts)]


# ------------------------------------------------------------------ engines: setup, compile, walk
class LLGuidance:
    name = "llguidance"

    def __init__(self, tok_json, vocab, eos):
        import llguidance
        self.ll = llguidance
        self.tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
        self.vocab = vocab

    def compile(self, schema):
        g = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        err = self.ll.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        return g

    def walk(self, grammar, ids, masks=None):
        import torch
        m = self.ll.LLMatcher(self.tok, grammar)
        bm = torch.full((1, (self.vocab + 31) // 32), -1, dtype=torch.int32)
        for t in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(bm.data_ptr(), bm.numel() * 4)
            if masks is not None:
                masks.append(time.perf_counter() - t0)
            if not (int(bm[0, t // 32]) >> (t % 32)) & 1:
                return False
            if not m.consume_token(t):
                return False
        return m.is_accepting()


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok_json, vocab, eos, model):
        import xgrammar
        from transformers import PreTrainedTokenizerFast
        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model, "tokenizer.json"))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.vocab, self.eos = vocab, eos

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=True)

    def walk(self, grammar, ids, masks=None):
        m = self.xgr.GrammarMatcher(grammar)
        bm = self.xgr.allocate_token_bitmask(1, self.vocab)
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bm)
            if masks is not None:
                masks.append(time.perf_counter() - t0)
            if not (int(bm[0, t // 32]) >> (t % 32)) & 1:
                return False
            if not m.accept_token(t):
                return False
        return m.accept_token(self.eos) and m.is_terminated()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok_json, vocab, eos):
        import outlines_core
        from tokenizers import Tokenizer
        self.oc = outlines_core
        tok = Tokenizer.from_str(tok_json)
        words = {}
        for i in range(vocab):
            if i == eos:
                continue
            s = tok.decode([i], skip_special_tokens=False)
            if s and "\ufffd" not in s:
                words.setdefault(s, []).append(i)
        self.voc = outlines_core.Vocabulary(eos, words)
        self.vocab, self.eos = vocab, eos

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema
        return self.oc.Index(build_regex_from_schema(json.dumps(schema)), self.voc)

    def walk(self, index, ids, masks=None):
        import torch
        g = self.oc.Guide(index)
        bm = torch.zeros((self.vocab + 31) // 32, dtype=torch.int32)
        for t in ids:
            t0 = time.perf_counter()
            g.write_mask_into(bm.data_ptr(), bm.numel(), bm.element_size())
            if masks is not None:
                masks.append(time.perf_counter() - t0)
            if not (int(bm[t // 32]) >> (t % 32)) & 1:
                return False
            g.advance(t)
        return g.is_finished() or self.eos in g.get_tokens()


def measure(engine, tok):
    row = {"engine": engine.name}
    t0 = time.perf_counter()
    try:
        g = engine.compile(EXTRACTION_SCHEMA)
        row["compile_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        masks = []
        ok = engine.walk(g, token_walks(tok, EXTRACTION_ANSWER)[0], masks)
        us = sorted(m * 1e6 for m in masks)
        row.update(answer_accepted=ok, mask_tokens=len(us), mask_us_mean=round(statistics.fmean(us), 1),
                   mask_us_p50=round(us[len(us) // 2], 1), mask_us_p99=round(us[int(len(us) * 0.99)], 1),
                   mask_us_max=round(us[-1], 1))
    except Exception as e:
        row["compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    cov = {}
    for name, (schema, good, bad) in FEATURES.items():
        try:
            g = engine.compile(schema)
        except Exception as e:
            cov[name] = f"compile error: {type(e).__name__}: {str(e)[:120]}"
            continue
        try:
            accepts = any(engine.walk(g, ids) for ids in token_walks(tok, good))
            refuses = not any(engine.walk(g, ids) for ids in token_walks(tok, bad))
        except Exception as e:
            cov[name] = f"walk error: {type(e).__name__}: {str(e)[:120]}"
            continue
        cov[name] = "ok" if accepts and refuses else \
            ("valid instance refused" if not accepts else "invalid instance accepted (not enforced)")
    row["coverage"] = cov
    row["features_ok"] = sum(v == "ok" for v in cov.values())
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--engines", default="llguidance,xgrammar,outlines-core")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "grammar.json"))
    a = ap.parse_args(argv)
    from tokenizers import Tokenizer
    with open(os.path.join(a.model, "tokenizer.json")) as f:
        tok_json = f.read()
    tok = Tokenizer.from_str(tok_json)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    vocab, eos = cfg["vocab_size"], cfg["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    rows = []
    for name in a.engines.split(","):
        t0 = time.perf_counter()
        try:
            eng = {"llguidance": lambda: LLGuidance(tok_json, vocab, eos),
                   "xgrammar": lambda: XGrammar(tok_json, vocab, eos, a.model),
                   "outlines-core": lambda: OutlinesCore(tok_json, vocab, eos)}[name]()
        except ImportError as e:
            print(f"{name}: not installed ({e})", file=sys.stderr)
            continue
        setup = time.perf_counter() - t0
        row = measure(eng, tok)
        row["setup_s"] = round(setup, 3)
        rows.append(row)
    n_feat = len(FEATURES)
    print(f"\nGrammar engines, {os.path.basename(a.model)} tokenizer ({vocab} tokens), extraction schema answer "
          f"of {rows[0].get('mask_tokens', '?') if rows else '?'} tokens\n")
    print("| engine | set-up s | compile ms | mask us mean | p50 | p99 | max | features enforced |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "compile_error" in r:
            print(f"| {r['engine']} | {r['setup_s']} | error | | | | | {r['features_ok']}/{n_feat} |")
            continue
        print(f"| {r['engine']} | {r['setup_s']} | {r['compile_ms']} | {r['mask_us_mean']} | {r['mask_us_p50']} | "
              f"{r['mask_us_p99']} | {r['mask_us_max']} | {r['features_ok']}/{n_feat} |")
    print("\nFeatures not enforced:")
    for r in rows:
        bad = {k: v for k, v in r["coverage"].items() if v != "ok"}
        print(f"  {r['engine']}: " + ("none" if not bad else "; ".join(f"{k} ({v})" for k, v in bad.items())))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"model": a.model, "vocab": vocab, "engines": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
