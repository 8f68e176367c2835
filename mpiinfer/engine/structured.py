"""Structured outputs: a request's constraint (JSON schema, any JSON object, regex, choice, grammar) compiled for
this model's tokenizer, and the per-sequence matchers that say which tokens may come next.

Owns: ``Constraint`` kinds and their compilation with llguidance (chosen by measurement against xgrammar and
outlines-core: ``benchmarks/bench_grammar.py``), a cache of compiled grammars (a bulk job repeats one schema
thousands of times: it is compiled once, each sequence gets a copy of a ready matcher), the allowed-token
bitmasks of a step (computed on a background thread while the model step runs: llguidance releases the GIL) and
turning a bitmask into a boolean mask over the logits.  The leader of a replica does all of it; the other ranks
never see a constraint (sampling happens on the leader).

A constraint is the pair ``SamplingParams.structured = (kind, text)``:

* ``("json", schema as JSON text)``: output is one JSON value valid against the schema;
* ``("json_object", "")``: any JSON object;
* ``("regex", pattern)``: the whole output matches the regex (Rust ``regex`` syntax, anchored);
* ``("choice", JSON array of strings)``: the output is exactly one of them;
* ``("grammar", text)``: a Lark grammar (llguidance's dialect, ``start:`` rule) or a GBNF one (``root ::=``).

JSON is generated compact (``{"a":1,"b":[2,3]}``: no free whitespace, which a small model can fill forever); a
schema's own ``"x-guidance"`` options (llguidance's, e.g. ``{"whitespace_flexible": true}``) override that.
Once the constraint is complete only an end-of-sequence token is allowed: the sequence finishes with
``finish_reason`` "stop" (even with ``ignore_eos``).  ``max_tokens`` still applies: an answer cut by it is
incomplete (``finish_reason`` "length").
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..config import STRUCTURED_KINDS as KINDS

# JSON without free whitespace unless the schema's x-guidance asks for it
JSON_DEFAULTS = {"whitespace_flexible": False}
CACHE_SIZE = 256
NEG_INF_BITS = np.array(-np.inf, dtype=np.float32).view(np.int32)     # 0xFF800000


class ConstraintError(ValueError):
    """A constraint that does not compile (bad schema, regex or grammar, or an unsupported JSON-schema keyword)."""


def lark_choice(choices: list) -> str:
    """A Lark grammar whose language is exactly the given strings."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices) + "\n"


class Grammars:
    """Compiles constraints for one tokenizer and gives each constrained sequence its matcher.

    ``tokenizer_json``: the model's ``tokenizer.json`` text; ``vocab_size``: the width of the logits (the model's
    vocabulary, which may be larger or smaller than the tokenizer's ``tokenizer_vocab``: masks are that wide);
    ``eos_ids``: the tokens that end a sequence."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids, tokenizer_vocab: int = 0):
        import llguidance
        self.ll = llguidance
        self.vocab_size = vocab_size
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=max(vocab_size, tokenizer_vocab),
                                          eos_token=list(eos_ids))
        self.words = (self.tok.vocab_size + 31) // 32          # int32 words per bitmask row
        self._ready: OrderedDict = OrderedDict()                # constraint -> a fresh matcher, or the error text
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mpiinfer-masks")

    def grammar(self, kind: str, text: str) -> str:
        """The llguidance grammar of a constraint (not yet checked against the tokenizer)."""
        M = self.ll.LLMatcher
        try:
            if kind == "json":
                return M.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
            if kind == "json_object":
                return M.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)
            if kind == "regex":
                return M.grammar_from_regex(text)
            if kind == "choice":
                return M.grammar_from_lark(lark_choice(json.loads(text)))
            if kind == "grammar":
                from llguidance.gbnf_to_lark import any_to_lark
                return M.grammar_from_lark(any_to_lark(text))
        except Exception as e:       # ValueError for bad JSON, GbnfToLarkError for a bad GBNF grammar
            raise ConstraintError(f"{type(e).__name__}: {e}") from None
        raise ConstraintError(f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")

    def matcher(self, constraint: tuple):
        """A new matcher at the start of the constraint; ``ConstraintError`` when it does not compile.  Compiled
        constraints are kept (LRU): a matcher is then a copy of a ready one."""
        ready = self._ready.get(constraint)
        if ready is None:
            try:
                g = self.grammar(*constraint)
                m = self.ll.LLMatcher(self.tok, g)
                ready = m.get_error() if m.is_error() else m
            except ConstraintError as e:
                ready = str(e)
            self._ready[constraint] = ready
            if len(self._ready) > CACHE_SIZE:
                self._ready.popitem(last=False)
        else:
            self._ready.move_to_end(constraint)
        if isinstance(ready, str):
            raise ConstraintError(ready.strip())
        return ready.deep_copy()

    # ------------------------------------------------------------------ masks of a step
    def start_masks(self, matchers: list):
        """Start computing the allowed tokens of each matcher, on the background thread (the caller runs the model
        step meanwhile).  Returns a handle for ``masks``."""
        bits = torch.empty((len(matchers), self.words), dtype=torch.int32)
        return self._pool.submit(self._fill, matchers, bits)

    def _fill(self, matchers: list, bits: torch.Tensor) -> tuple:
        row = self.words * 4
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bits.data_ptr() + i * row, row)
        return self.bias(bits)

    def masks(self, handle, device=None) -> tuple:
        """Waits for ``start_masks``'s work: ``bias`` of the step's bitmasks."""
        bias, stuck = handle.result()
        return (bias if device is None else bias.to(device)), stuck

    def bias(self, bits: torch.Tensor) -> tuple:
        """((R, vocab_size) float32 to add to the logits: 0 where a token is allowed, -inf where not; and for each
        row whether it allows nothing at all) from (R, words) int32 bitmasks.  Additive and built with integer
        ops: on this CPU ``masked_fill`` with a bool mask took 2.1 ms for 32 x 49,152 and ``log`` of a 0/1 float
        mask 3 ms, against 0.07 ms for the add.  NumPy, single-threaded: it runs on the mask thread, where torch
        ops would start a second OpenMP team beside the model step's (a 256-prompt job ran 11% slower so)."""
        b = bits.numpy()
        if sys.byteorder == "little":      # bit i of word w is token 32 w + i: the bytes in order, low bit first
            ones = np.unpackbits(b.view(np.uint8), axis=1, bitorder="little")
        else:
            ones = ((b[:, :, None] >> np.arange(32, dtype=np.int32)) & 1).reshape(b.shape[0], -1)
        # 1 -> 0x00000000 (0.0), 0 -> 0xFF800000 (-inf): (ones - 1) & the bits of -inf, seen as float32
        ones = ones[:, :self.vocab_size]          # (tokens the tokenizer has beyond the logits never come)
        stuck = (~ones.any(axis=1)).tolist()
        bias = ((ones.astype(np.int32) - 1) & NEG_INF_BITS).view(np.float32)
        return torch.from_numpy(bias), stuck

    def close(self) -> None:
        self._pool.shutdown(wait=True)
