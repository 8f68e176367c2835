"""One input record -> a ``Request`` or an error ``Result``.

Owns the input record contract shared by every input format: which fields a
record may have, their types and ranges, and the error types/messages a bad
record turns into.  Nothing here reads files; readers call ``parse_record`` once
per record and never see an exception for bad input.

Rules (JSONL contract):

* exactly one of ``prompt`` (non-empty string), ``messages`` (non-empty list of
  ``{"role": str, "content": str}``), ``prompt_token_ids`` (non-empty list of
  non-negative ints) or ``input`` (an embedding: a string or token ids, with
  only ``pooling``, ``normalize`` and ``dimensions`` beside it);
* optional ``id`` (string or int; the 1-based line number when absent) and the
  sampling overrides ``SAMPLING_FIELDS`` (``max_tokens``, ``temperature``,
  ``top_p``, ``top_k``, ``seed``, ``stop``, ``stop_token_ids``, ``logprobs``,
  ``ignore_eos``, ``n`` (samples of this prompt, 1-128: the result then has
  ``choices``), penalties, ``logit_bias``, ``top_logprobs``, ``prompt_logprobs``,
  ``min_tokens``); a per-record value replaces the run default (``stop`` lists
  are not merged);
* at most one structured-output constraint: ``response_format`` (OpenAI's
  ``text`` / ``json_object`` / ``json_schema`` shapes), ``regex``, ``choice``
  (non-empty list of strings) or ``grammar`` (Lark or GBNF text); compiled on
  the replica leader (``engine.structured``), where one that does not compile
  becomes an error record;
* a JSON ``null`` for any known field means "absent" (default / line number);
* any other field is an error (typos are caught, with a did-you-mean hint).

Error types: ``invalid_encoding`` (bytes not UTF-8), ``invalid_json`` (not
parseable JSON) and ``invalid_request`` (everything else).  The id of an error
record is the record's id when it was valid, else the line number.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
from typing import Any

from ..config import SamplingParams
from ..messages import ErrorInfo, Request, Result

# the OpenAI endpoints a record's result is written for (``--output-format openai``)
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
SCORE_URL = "/v1/score"

INVALID_JSON = "invalid_json"
INVALID_ENCODING = "invalid_encoding"
INVALID_REQUEST = "invalid_request"
MODEL_NOT_FOUND = "model_not_found"

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids", "input")
# an embedding record (``input``): how its vector is made
EMBEDDING_FIELDS = ("pooling", "normalize", "dimensions")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed",
                   "stop", "stop_token_ids", "logprobs", "ignore_eos", "n",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "top_logprobs",
                   "prompt_logprobs", "min_tokens")
# structured output (at most one): OpenAI's response_format, or a regex, a list of choices, a Lark/GBNF grammar
STRUCTURED_FIELDS = ("response_format", "regex", "choice", "grammar")
ALLOWED_FIELDS = ("id",) + PROMPT_FIELDS + SAMPLING_FIELDS + STRUCTURED_FIELDS + EMBEDDING_FIELDS
_ALLOWED_SET = frozenset(ALLOWED_FIELDS)
MESSAGE_FIELDS = ("role", "content")


class RecordError(Exception):
    """A record that cannot become a Request.

    ``type`` is the ErrorInfo type; ``id`` is the record's own id once it has
    been validated (None before that: the caller uses the line number).
    """

    def __init__(self, type: str, message: str, id: Any = None):
        super().__init__(message)
        self.type = type
        self.message = message
        self.id = id


# ----------------------------------------------------------------- helpers

def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _show(v: Any, limit: int = 60) -> str:
    """A short JSON-ish rendering of a bad value for an error message."""
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        s = repr(v)
    if len(s) > limit:
        s = s[:limit] + "..."
    return s


def _got(v: Any) -> str:
    return f"got {_show(v)} ({_json_type(v)})"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(message: str) -> RecordError:
    return RecordError(INVALID_REQUEST, message)


def _check_text(field: str, s: str) -> None:
    """Reject strings the tokenizer cannot take (lone surrogates from \\udXXX escapes)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _bad(f"{field} contains an unpaired surrogate escape at character {e.start}; "
                       f"it is not valid Unicode text") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# One shared decoder: json.loads(..., parse_constant=...) would build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


# ----------------------------------------------------------------- decoding

def decode_line(raw: bytes | bytearray | memoryview | str) -> Any:
    """Bytes (or str) of one line -> the JSON value. Raises RecordError."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(
                INVALID_ENCODING,
                f"line is not valid UTF-8: {e.reason} at byte {e.start + 1} "
                f"(0x{raw[e.start]:02x})") from None
    else:
        text = raw
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise RecordError(INVALID_JSON, "empty record")
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise RecordError(INVALID_JSON, f"line is not valid JSON: {e.msg} at column {e.colno}") from None
    except ValueError as e:  # NaN / Infinity literals
        raise RecordError(INVALID_JSON, f"line is not valid JSON: {e}") from None
    except RecursionError:
        raise RecordError(INVALID_JSON, "line is not valid JSON: nested too deeply") from None


# ----------------------------------------------------------------- fields

def parse_id(obj: dict, line_no: int) -> Any:
    """The record's id (str or int) or ``line_no`` when absent/null. Raises RecordError."""
    rid = obj.get("id")
    if rid is None:
        return line_no
    if isinstance(rid, str) or _is_int(rid):
        return rid
    raise _bad(f"id must be a string or an integer, {_got(rid)}")


def check_unknown_fields(obj: dict, allowed: tuple = ALLOWED_FIELDS, where: str = "record") -> None:
    """Raise naming every key of ``obj`` not in ``allowed`` (with a did-you-mean hint)."""
    allowed_set = _ALLOWED_SET if allowed is ALLOWED_FIELDS else frozenset(allowed)
    unknown = [k for k in obj if k not in allowed_set]
    if not unknown:
        return
    parts = []
    for k in unknown[:10]:
        hint = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.7)
        name = repr(k) if len(repr(k)) <= 60 else repr(k)[:60] + "..."
        parts.append(f"{name} (did you mean {hint[0]!r}?)" if hint else name)
    if len(unknown) > 10:
        parts.append(f"and {len(unknown) - 10} more")
    noun = "field" if len(unknown) == 1 else "fields"
    raise _bad(f"{where} has unknown {noun} {', '.join(parts)}; allowed: {', '.join(allowed)}")


def parse_messages(msgs: Any) -> list:
    if not isinstance(msgs, list):
        raise _bad(f"messages must be an array of {{\"role\", \"content\"}} objects, {_got(msgs)}")
    if not msgs:
        raise _bad("messages must not be empty")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with string role and content, {_got(m)}")
        extra = [k for k in m if k not in MESSAGE_FIELDS]
        if extra:
            raise _bad(f"{where} has unknown field(s) {', '.join(repr(k) for k in extra)}; "
                       f"a message takes only 'role' and 'content'")
        if "role" not in m:
            raise _bad(f"{where} has no role")
        role = m["role"]
        if not isinstance(role, str) or not role:
            raise _bad(f"{where}.role must be a non-empty string, {_got(role)}")
        if "content" not in m:
            raise _bad(f"{where} has no content")
        content = m["content"]
        if not isinstance(content, str):
            raise _bad(f"{where}.content must be a string, {_got(content)}")
        _check_text(f"{where}.content", content)
        out.append({"role": role, "content": content})
    return out


def _parse_token_list(field: str, v: Any, allow_empty: bool) -> list:
    if not isinstance(v, list):
        raise _bad(f"{field} must be an array of non-negative integers, {_got(v)}")
    if not v and not allow_empty:
        raise _bad(f"{field} must not be empty")
    for i, t in enumerate(v):
        if not _is_int(t) or t < 0:
            raise _bad(f"{field}[{i}] must be a non-negative integer, {_got(t)}")
    return list(v)


def parse_prompt_source(obj: dict) -> dict:
    """Exactly one of prompt / messages / prompt_token_ids -> Request kwargs."""
    present = [k for k in PROMPT_FIELDS if obj.get(k) is not None]
    if not present:
        raise _bad("record has no prompt: give exactly one of 'prompt', 'messages', 'prompt_token_ids' or 'input' "
                   "(an embedding)")
    if len(present) > 1:
        raise _bad(f"record has more than one prompt field ({', '.join(present)}): "
                   f"give exactly one of 'prompt', 'messages', 'prompt_token_ids' or 'input' (an embedding)")
    key = present[0]
    v = obj[key]
    if key == "input":
        return {"inputs": [embedding_input("input", v)]}
    if key == "prompt":
        if not isinstance(v, str):
            raise _bad(f"prompt must be a string, {_got(v)}")
        if not v:
            raise _bad("prompt must not be an empty string")
        _check_text("prompt", v)
        return {"prompt": v}
    if key == "messages":
        return {"messages": parse_messages(v)}
    return {"prompt_token_ids": _parse_token_list("prompt_token_ids", v, allow_empty=False)}


def embedding_input(field: str, v: Any):
    """One text (non-empty string) or token-id list to embed."""
    if isinstance(v, str):
        if not v:
            raise _bad(f"{field} must not be an empty string")
        _check_text(field, v)
        return v
    if isinstance(v, list):
        return _parse_token_list(field, v, allow_empty=False)
    raise _bad(f"{field} must be a string or an array of token ids, {_got(v)}")


def embedding_sampling(pooling: Any = None, normalize: Any = None, dimensions: Any = None) -> SamplingParams:
    """An embedding request's options: ``pooling`` ("auto", "last", "mean"; default auto), ``normalize`` and
    ``dimensions`` (Matryoshka truncation; checked against the model by the engine)."""
    if pooling is not None and not isinstance(pooling, str):
        raise _bad(f"pooling must be a string, {_got(pooling)}")
    if dimensions is not None and _int_value("dimensions", dimensions) < 1:
        raise _bad(f"dimensions must be a positive integer, got {dimensions}")
    kw = (("max_tokens", 0), ("pooling", pooling or "auto"),
          ("normalize", None if normalize is None else _bool_value("normalize", normalize)),
          ("dimensions", dimensions or 0))
    return _apply_overrides(SamplingParams(), kw)


def _int_value(key: str, v: Any) -> int:
    if not _is_int(v):
        raise _bad(f"{key} must be an integer, {_got(v)}")
    return v


def _float_value(key: str, v: Any) -> float:
    if not _is_number(v):
        raise _bad(f"{key} must be a number, {_got(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise _bad(f"{key} must be a finite number, got {v!r}")
    return v


def _bool_value(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(f"{key} must be true or false, {_got(v)}")
    return v


def _stop_value(key: str, v: Any) -> tuple:
    if isinstance(v, str):
        items, single = [v], True
    elif isinstance(v, list):
        items, single = v, False
    else:
        raise _bad(f"{key} must be a string or an array of strings, {_got(v)}")
    for i, s in enumerate(items):
        w = key if single else f"{key}[{i}]"
        if not isinstance(s, str):
            raise _bad(f"{w} must be a string, {_got(s)}")
        if not s:
            raise _bad(f"{w} must not be an empty string")
        _check_text(w, s)
    return tuple(items)


def _token_ids_value(key: str, v: Any) -> tuple:
    return tuple(_parse_token_list(key, v, allow_empty=True))


def _logit_bias_value(key: str, v: Any) -> tuple:
    """OpenAI's map of token id (a decimal string, or an integer in JSONL) -> bias, as sorted pairs."""
    if not isinstance(v, dict):
        raise _bad(f"{key} must be an object mapping token ids to biases, {_got(v)}")
    out = []
    for k, b in v.items():
        t = k if _is_int(k) else int(k) if isinstance(k, str) and k.isdigit() and k.isascii() else None
        if t is None:
            raise _bad(f"{key} keys must be token ids, got {k!r}")
        out.append((t, _float_value(f"{key}[{k!r}]", b)))
    return tuple(sorted(out))


# Sampling field -> type check/conversion; ranges come from SamplingParams.validate.
_SAMPLING_CHECKS = {
    "max_tokens": _int_value,
    "temperature": _float_value,
    "top_p": _float_value,
    "top_k": _int_value,
    "seed": _int_value,
    "stop": _stop_value,
    "stop_token_ids": _token_ids_value,
    "logprobs": _bool_value,
    "ignore_eos": _bool_value,
    "n": _int_value,
    "presence_penalty": _float_value,
    "frequency_penalty": _float_value,
    "repetition_penalty": _float_value,
    "logit_bias": _logit_bias_value,
    "top_logprobs": _int_value,
    "prompt_logprobs": _bool_value,
    "min_tokens": _int_value,
}
assert tuple(_SAMPLING_CHECKS) == SAMPLING_FIELDS


# ----------------------------------------------------------------- structured output

def schema_constraint(field: str, v: Any) -> tuple:
    """A JSON schema (an object, or JSON text of one) -> ("json", canonical JSON text)."""
    if isinstance(v, str):
        try:
            v = _DECODER.decode(v)
        except ValueError as e:
            raise _bad(f"{field} must be a JSON schema (an object, or a string of JSON): {e}") from None
    if not isinstance(v, dict):
        raise _bad(f"{field} must be a JSON schema object, {_got(v)}")
    return ("json", json.dumps(v, ensure_ascii=False, separators=(",", ":")))


def text_constraint(kind: str, field: str, v: Any) -> tuple:
    """A regex or a grammar (non-empty text) -> (kind, text)."""
    if not isinstance(v, str) or not v.strip():
        raise _bad(f"{field} must be a non-empty string, {_got(v)}")
    _check_text(field, v)
    return (kind, v)


def choice_constraint(field: str, v: Any) -> tuple:
    """A non-empty list of strings -> ("choice", JSON text of the list)."""
    if not isinstance(v, list) or not v:
        raise _bad(f"{field} must be a non-empty array of strings, {_got(v)}")
    for i, c in enumerate(v):
        if not isinstance(c, str):
            raise _bad(f"{field}[{i}] must be a string, {_got(c)}")
        _check_text(f"{field}[{i}]", c)
    return ("choice", json.dumps(v, ensure_ascii=False))


def response_format_constraint(field: str, v: Any) -> tuple:
    """OpenAI's ``response_format``: {"type": "text"} (unconstrained: ``()``), {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}."""
    if not isinstance(v, dict):
        raise _bad(f"{field} must be an object with a type, {_got(v)}")
    typ = v.get("type")
    allowed = {"text": ("type",), "json_object": ("type",), "json_schema": ("type", "json_schema")}
    if typ not in allowed:
        raise _bad(f"{field}.type must be \"text\", \"json_object\" or \"json_schema\", {_got(typ)}")
    check_unknown_fields(v, allowed[typ], where=field)
    if typ == "text":
        return ()
    if typ == "json_object":
        return ("json_object", "")
    js = v.get("json_schema")
    if not isinstance(js, dict):
        raise _bad(f"{field}.json_schema must be an object with a schema, {_got(js)}")
    check_unknown_fields(js, ("name", "schema", "strict", "description"), where=f"{field}.json_schema")
    if js.get("schema") is None:
        raise _bad(f"{field}.json_schema has no schema")
    return schema_constraint(f"{field}.json_schema.schema", js["schema"])


def one_constraint(found: list) -> tuple:
    """At most one constraint: ``found`` holds (field, constraint) for each field given."""
    given = [(f, c) for f, c in found if c]
    if len(given) > 1:
        raise _bad(f"give at most one structured-output constraint, got {', '.join(f for f, _ in given)}")
    return given[0][1] if given else ()


# constraint kind -> its field's parser (field name, value) -> constraint, for every format's field names
CONSTRAINT_PARSERS = {"json": schema_constraint, "choice": choice_constraint,
                      "regex": functools.partial(text_constraint, "regex"),
                      "grammar": functools.partial(text_constraint, "grammar")}


def parse_structured(obj: dict) -> tuple:
    """A JSONL record's ``response_format`` / ``regex`` / ``choice`` / ``grammar`` -> the constraint or ``()``."""
    parse = {"response_format": response_format_constraint, **CONSTRAINT_PARSERS}
    return one_constraint([(k, parse[k](k, obj[k])) for k in STRUCTURED_FIELDS if obj.get(k) is not None])


def parse_sampling(obj: dict, defaults: SamplingParams, structured: tuple = ()) -> SamplingParams:
    """Per-record sampling overrides applied on ``defaults``. Raises RecordError.

    Only the keys in SAMPLING_FIELDS are looked at (null = use the default), so
    other formats (e.g. an OpenAI batch body) can reuse this; ``structured``: the record's constraint.
    """
    kw = [("structured", structured)] if structured else []
    for key, v in obj.items():
        check = _SAMPLING_CHECKS.get(key)
        if check is not None and v is not None:
            kw.append((key, check(key, v)))
    if not kw:
        return defaults
    return _apply_overrides(defaults, tuple(kw))


@functools.lru_cache(maxsize=4096)
def _apply_overrides(defaults: SamplingParams, items: tuple) -> SamplingParams:
    """defaults + overrides, validated; cached since most records repeat a few combinations."""
    sp = defaults.replace(**dict(items))
    try:
        sp.validate()
    except ValueError as e:
        raise _bad(str(e)) from None
    return sp


# ----------------------------------------------------------------- entry point

def request_from_obj(obj: Any, line_no: int, index: int, defaults: SamplingParams) -> Request:
    """A parsed JSON value -> Request. Raises RecordError (``.id`` set when known)."""
    if not isinstance(obj, dict):
        raise _bad(f"record must be a JSON object, {_got(obj)}")
    rid = parse_id(obj, line_no)
    try:
        check_unknown_fields(obj)
        src = parse_prompt_source(obj)
        if "inputs" in src:
            other = [k for k in obj if obj[k] is not None and k not in ("id", "input") + EMBEDDING_FIELDS]
            if other:
                raise _bad(f"an embedding record (input) takes only pooling, normalize and dimensions, not "
                           f"{', '.join(other)}")
            sampling = embedding_sampling(obj.get("pooling"), obj.get("normalize"), obj.get("dimensions"))
            return Request(index=index, id=rid, sampling=sampling, extra={"url": EMBEDDINGS_URL}, **src)
        bad = [k for k in EMBEDDING_FIELDS if obj.get(k) is not None]
        if bad:
            raise _bad(f"{', '.join(bad)}: only for embedding records (give 'input' instead of a prompt)")
        sampling = parse_sampling(obj, defaults, parse_structured(obj))
    except RecordError as e:
        e.id = rid
        raise
    # a chat record is written as a chat completion when the output is OpenAI's batch format
    extra = {"url": CHAT_URL} if src.get("messages") is not None else {}
    return Request(index=index, id=rid, sampling=sampling, extra=extra, **src)


def error_result(index: int, id: Any, type: str, message: str) -> Result:
    return Result(index=index, id=id, error=ErrorInfo(type, message))


def parse_record(obj_or_line: Any, line_no: int, index: int,
                 defaults: SamplingParams) -> Request | Result:
    """Raw line bytes/str or an already parsed JSON value -> Request, or an error Result.

    Never raises for bad input; ``index`` is the output position, ``line_no``
    the 1-based line number (the id when the record has none or it is unusable).
    """
    try:
        if isinstance(obj_or_line, (bytes, bytearray, memoryview, str)):
            obj = decode_line(obj_or_line)
        else:
            obj = obj_or_line
        return request_from_obj(obj, line_no, index, defaults)
    except RecordError as e:
        return error_result(index, line_no if e.id is None else e.id, e.type, e.message)
    except Exception as e:  # a record must never take the job down
        return error_result(index, line_no, INVALID_REQUEST,
                            f"record could not be parsed: {type(e).__name__}: {e}")
