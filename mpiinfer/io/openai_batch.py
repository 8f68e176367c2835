"""OpenAI Batch API records: input lines -> ``Request``, ``Result`` -> output lines.

Owns the OpenAI batch contract (the files ``vllm run-batch`` and the OpenAI
Batch API read and write).  Nothing here opens files: ``readers.iter_openai``
and ``writers.OpenAIBatchWriter`` call these per record.

Input line::

    {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
     "body": {"model", "messages" | "prompt", "max_tokens" | "max_completion_tokens",
              "temperature", "top_p", "seed", "stop", "logprobs", "n", ...}}

Rules:

* ``custom_id`` (string) and ``url`` are required, ``method`` when present must
  be ``"POST"``; other top-level keys are ignored.
* Chat bodies need ``messages`` (string content, or a list of ``{"type": "text"}``
  parts, joined); the ``developer`` role is read as ``system``.  Completion bodies
  need ``prompt``: a string, a token-id list, or a one-element list of either.
* Sampling: ``max_completion_tokens`` (wins over ``max_tokens``), ``temperature``,
  ``top_p``, ``seed``, ``stop``, ``logprobs`` and the vLLM extensions ``top_k``,
  ``stop_token_ids``, ``ignore_eos``.  Absent fields take the *run* defaults
  (``--temperature`` etc.), not OpenAI's (temperature 1).  Type and range errors
  are errors, as in JSONL.
* ``n`` samples (1-128, seeds ``seed + i``) come back as ``choices[i]`` with ``index`` i.
* ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` and vLLM's
  ``repetition_penalty`` are applied (``engine.sampling``).
* ``model``, when given, must be one of the job's names (``--served-model-name``,
  else the model directory's name or path), else the record is a 404 error record.
* ``top_logprobs`` k (chat, with ``logprobs: true``) and completion ``logprobs`` k (0-20) add
  the k most likely tokens at each position, in OpenAI's shapes.
* Structured output (``engine.structured``), at most one per body: ``response_format``
  (``json_object``, ``json_schema``), vLLM's ``guided_json`` / ``guided_regex`` /
  ``guided_choice`` / ``guided_grammar`` and its newer ``structured_outputs``
  (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``).
* ``echo: true`` (completions): the prompt before the completion, with logprobs k the prompt
  tokens' logprobs and alternatives first (``null`` for the first token).
* ``/v1/embeddings`` bodies (``input``: one or a list of strings / token-id lists,
  ``encoding_format``, ``normalize``) become embedding requests (``Request.inputs``); vLLM's
  ``/v1/score`` (``text_1``, ``text_2``) too, each pair scored by the cosine similarity of its
  two embeddings (``extra["score_pairs"]``).
* Unsupported features are errors, not silently dropped: ``best_of`` other than 1 or ``n``,
  ``stream: true``, ``echo`` in chat, ``suffix``, several prompts in one
  completion request, non-text content parts, and every body field not listed in
  ``BODY_FIELDS``: a few that change nothing are accepted (``HARMLESS_FIELDS``:
  ``user``, ``metadata``, ``guided_decoding_backend``...; ``DEFAULT_ONLY``: ``tools: []``...),
  any other is refused (``tools``, ``guided_whitespace_pattern``, ``reasoning_effort``...), since it
  would change the result.

``Request.extra`` / ``Result.extra`` carry ``custom_id``, ``url`` and ``model``
(body.model) so the writer can echo them.  A bad record becomes an error
``Result`` whose ``id`` is the custom_id when valid, else the line number, and
whose ``extra["custom_id"]`` is the custom_id or ``None`` (written as ``null``).

Output lines (``batch_output_record``) follow OpenAI's batch output file::

    {"id": "batch_req_<hex>", "custom_id": ..., "error": null,
     "response": {"status_code": 200, "request_id": "req_<hex>",
                  "body": <chat.completion | text_completion object>}}

and a failed request is written as both readers of such files expect it: OpenAI's
(a 4xx ``response`` whose body is the error) and vLLM's run-batch (``error`` holds
an ``ErrorResponse``)::

    {"id": "batch_req_<hex>", "custom_id": ...,
     "response": {"status_code": 400 | 404, "request_id": "req_<hex>", "body": {"error": E}},
     "error": {"error": E}}
    E = {"message": ..., "type": <error type>, "param": "model" | null, "code": 400 | 404}

404 (``param: "model"``) for a body naming a model this job does not serve
(``--served-model-name``), 400 for every other request error.  Every id is a hash
of (index, custom_id), never random, so a resumed run writes the same bytes as an
uninterrupted one (vLLM's run-batch writes random ``vllm-<uuid>`` ids).
"""
from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import MAX_EMBEDDING_INPUTS, MAX_TOP_LOGPROBS, SamplingParams
from ..messages import Choice, ErrorInfo, Request, Result
from .records import (
    CHAT_URL,
    COMPLETIONS_URL,
    CONSTRAINT_PARSERS,
    EMBEDDINGS_URL,
    INVALID_REQUEST,
    MODEL_NOT_FOUND,
    SCORE_URL,
    RecordError,
    _bool_value,
    _check_text,
    _got,
    _int_value,
    _is_int,
    _parse_token_list,
    check_unknown_fields,
    decode_line,
    embedding_input,
    embedding_sampling,
    one_constraint,
    parse_messages,
    parse_sampling,
    response_format_constraint,
)

URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL, SCORE_URL)
# /v1/embeddings body fields: used, and accepted as they change nothing (everything else is refused)
EMBEDDING_BODY_FIELDS = frozenset(("model", "input", "encoding_format", "normalize", "dimensions"))
EMBEDDING_HARMLESS = frozenset(("user",))


def _refuse_other_fields(body: dict, used: tuple, what: str) -> None:
    """An embeddings / score body: every non-null field besides ``used`` and the harmless ones is refused."""
    for k, v in body.items():
        if v is not None and k not in used and k not in EMBEDDING_HARMLESS:
            raise _unsupported(f"body.{k} in {what} (it would change the result; see the README)")


def _score_request(body: dict, index: int, cid: str, extra: dict) -> Request:
    """vLLM's /v1/score for an embedding model: ``text_1`` and ``text_2`` (a string or a list of them: one to
    one, one to many, or pairwise), each pair scored by the cosine similarity of the two texts' embeddings."""
    _refuse_other_fields(body, ("model", "text_1", "text_2"), "a score request")
    texts = []
    for k in ("text_1", "text_2"):
        v = body.get(k)
        if v is None:
            raise _bad(f"score body has no {k}")
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not v:
            raise _bad(f"body.{k} must be a string or a non-empty array of strings, {_got(body.get(k))}")
        items = []
        for i, x in enumerate(v):
            if not isinstance(x, str):
                raise _bad(f"body.{k}[{i}] must be a string, {_got(x)}")
            items.append(embedding_input(f"body.{k}[{i}]", x))
        texts.append(items)
    t1, t2 = texts
    if len(t1) != 1 and len(t1) != len(t2):
        raise _bad(f"body.text_1 has {len(t1)} texts and body.text_2 {len(t2)}: give one text_1, or as many as "
                   "text_2 (pairs)")
    if len(t1) + len(t2) > MAX_EMBEDDING_INPUTS:
        raise _bad(f"a score request takes at most {MAX_EMBEDDING_INPUTS} texts in all")
    # inputs: text_1 then text_2; pair k compares text_1[k or 0] with text_2[k]
    extra["score_pairs"] = [[0 if len(t1) == 1 else k, len(t1) + k] for k in range(len(t2))]
    return Request(index=index, id=cid, sampling=embedding_sampling(), extra=extra, inputs=t1 + t2)


def _embedding_request(body: dict, index: int, cid: str, extra: dict) -> Request:
    """A /v1/embeddings body: ``input`` a string, a token-id list, or a list of either (one vector each)."""
    _refuse_other_fields(body, EMBEDDING_BODY_FIELDS, "an embeddings request")
    inp = body.get("input")
    if inp is None:
        raise _bad("embeddings body has no input")
    if isinstance(inp, list) and inp and all(isinstance(x, (str, list)) for x in inp):
        inputs = [embedding_input(f"body.input[{i}]", x) for i, x in enumerate(inp)]
    else:
        inputs = [embedding_input("body.input", inp)]
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise _bad(f"body.input has {len(inputs)} inputs; at most {MAX_EMBEDDING_INPUTS} per request")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad(f'body.encoding_format must be "float" or "base64", {_got(fmt)}')
    extra["encoding_format"] = fmt or "float"
    try:
        sp = embedding_sampling(None, body.get("normalize"), body.get("dimensions"))
    except RecordError as e:
        e.message = "body." + e.message
        raise
    return Request(index=index, id=cid, sampling=sp, extra=extra, inputs=inputs)


def looks_like_openai(obj: Any) -> bool:
    """Whether a parsed first record is an OpenAI batch request (has custom_id and body or url)."""
    return isinstance(obj, dict) and "custom_id" in obj and ("body" in obj or "url" in obj)


def _bad(message: str) -> RecordError:
    return RecordError(INVALID_REQUEST, message)


def _unsupported(message: str) -> RecordError:
    return RecordError(INVALID_REQUEST, message + " is not supported by mpiinfer")


# ----------------------------------------------------------------- input

def _messages(msgs: Any) -> list:
    if not isinstance(msgs, list):
        raise _bad(f"body.messages must be an array of message objects, {_got(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object, {_got(m)}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else None
                    raise _unsupported(f"{where}.content[{j}]: content part of type {kind!r} "
                                       f"(only text parts)")
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad(f"{where}.content[{j}].text must be a string, {_got(text)}")
                parts.append(text)
            content = "".join(parts)
        elif content is None and "content" in m:
            raise _unsupported(f"{where}: a message without content (tool calls)")
        role = m.get("role")
        if role == "developer":
            role = "system"
        norm = {}
        if "role" in m:
            norm["role"] = role
        if "content" in m:
            norm["content"] = content
        out.append(norm)
    try:
        return parse_messages(out)
    except RecordError as e:
        e.message = "body." + e.message
        raise


def _completion_prompt(p: Any) -> dict:
    if isinstance(p, list) and p and not _is_int(p[0]):
        if len(p) != 1:
            raise _unsupported(f"body.prompt with {len(p)} prompts (one prompt per request)")
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise _bad("body.prompt must not be an empty string")
        _check_text("body.prompt", p)
        return {"prompt": p}
    if isinstance(p, list):
        return {"prompt_token_ids": _parse_token_list("body.prompt", p, allow_empty=False)}
    raise _bad(f"body.prompt must be a string or an array of token ids, {_got(p)}")


def _sampling(body: dict, chat: bool, defaults: SamplingParams) -> SamplingParams:
    s = {k: body.get(k) for k in ("temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                                  "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                                  "min_tokens")}
    s["max_tokens"] = body.get("max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        s["max_tokens"] = _int_value("body.max_completion_tokens", body["max_completion_tokens"])
    lp = body.get("logprobs")
    if chat:
        s["logprobs"] = lp
        s["top_logprobs"] = body.get("top_logprobs")
    elif lp is not None:
        if _int_value("body.logprobs", lp) < 0:
            raise _bad(f"body.logprobs must be >= 0, got {lp}")
        s["logprobs"] = True
        s["top_logprobs"] = lp                    # completions: logprobs k = the k most likely tokens too
    try:
        echo = not chat and body.get("echo") is not None and _bool_value("echo", body["echo"])
        if echo and s.get("logprobs"):
            # the prompt comes back before the completion, with logprobs the prompt tokens' logprobs (and top
            # alternatives) before the completion's
            s["prompt_logprobs"] = True
        vk = body.get("prompt_logprobs")            # vLLM's: the prompt's logprobs, ranks and k alternatives
        if vk is not None:
            if not 0 <= _int_value("prompt_logprobs", vk) <= MAX_TOP_LOGPROBS:
                raise _bad(f"prompt_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {vk}")
            if echo and s.get("logprobs"):
                raise _bad("prompt_logprobs with echo and logprobs: give one of them (both report the prompt)")
            s["prompt_logprobs"] = True
        sp = parse_sampling(s, defaults, _structured(body))
        if vk is not None:
            sp = sp.replace(vllm_prompt_logprobs=vk)
        return sp.replace(echo=True) if echo else sp
    except RecordError as e:
        if not e.message.startswith("body."):
            e.message = "body." + e.message
        raise


# vLLM's structured-output fields: the older guided_* ones and the newer ``structured_outputs`` object
GUIDED = {f"guided_{kind}": parse for kind, parse in CONSTRAINT_PARSERS.items()}
STRUCTURED_OUTPUTS = {**CONSTRAINT_PARSERS,
                      "json_object": lambda f, v: ("json_object", "") if _bool_value(f, v) else ()}


def _structured(body: dict) -> tuple:
    """The body's structured-output constraint (at most one of response_format, guided_*, structured_outputs)."""
    found = [(f"body.{k}", parse(f"body.{k}", body[k])) for k, parse in GUIDED.items() if body.get(k) is not None]
    if body.get("response_format") is not None:
        found.append(("body.response_format", response_format_constraint("body.response_format",
                                                                         body["response_format"])))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad(f"body.structured_outputs must be an object, {_got(so)}")
        check_unknown_fields(so, (*STRUCTURED_OUTPUTS, "disable_any_whitespace"), where="body.structured_outputs")
        if so.get("disable_any_whitespace") is not None and \
                not _bool_value("body.structured_outputs.disable_any_whitespace", so["disable_any_whitespace"]):
            raise _unsupported("body.structured_outputs.disable_any_whitespace = false (JSON is always generated "
                               "without free whitespace)")
        found += [(f"body.structured_outputs.{k}", parse(f"body.structured_outputs.{k}", so[k]))
                  for k, parse in STRUCTURED_OUTPUTS.items() if so.get(k) is not None]
    return one_constraint(found)


# Body fields by what mpiinfer does with them.  Every other field is refused (an error record), since a field that
# changes the result must never be dropped silently.
BODY_FIELDS = frozenset((
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
    "stop", "stop_token_ids", "ignore_eos", "n", "best_of", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "prompt_logprobs", "stream", "echo",
    "suffix",
    "response_format",
    "structured_outputs", *GUIDED))
# accepted and ignored: they do not change the completion (bookkeeping, or options of features never used here)
HARMLESS_FIELDS = frozenset(("user", "metadata", "store", "service_tier", "stream_options", "prompt_cache_key",
                             "safety_identifier", "parallel_tool_calls",
                             "guided_decoding_backend"))   # the grammar engine is always llguidance
# accepted at these values only: the defaults, which ask for nothing
DEFAULT_ONLY = {"tools": ([],), "tool_choice": ("none",),
                "functions": ([],), "modalities": (["text"],)}


def _check_body_fields(body: dict) -> None:
    for k, v in body.items():
        if v is None or k in BODY_FIELDS or k in HARMLESS_FIELDS:
            continue
        if k in DEFAULT_ONLY and v in DEFAULT_ONLY[k]:
            continue
        raise _unsupported(f"body.{k}" + (f" = {v!r}" if k in DEFAULT_ONLY else "") +
                           " (it would change the result; see the README's table of OpenAI body fields)")


def _request(obj: Any, line_no: int, index: int, defaults: SamplingParams, extra: dict,
             served: frozenset | None = None) -> Request:
    if not isinstance(obj, dict):
        raise _bad(f"record must be a JSON object, {_got(obj)}")
    cid = obj.get("custom_id")
    if cid is None:
        raise _bad("record has no custom_id")
    if not isinstance(cid, str):
        raise _bad(f"custom_id must be a string, {_got(cid)}")
    extra["custom_id"] = cid
    url = obj.get("url")
    if url is not None:
        extra["url"] = url
    method = obj.get("method")
    if method is not None and method != "POST":
        raise _bad(f"method must be \"POST\", {_got(method)}")
    if url is None:
        raise _bad("record has no url")
    if url not in URLS:
        raise _unsupported(f"url {url!r} (supported: {', '.join(URLS)})")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _bad(f"body must be an object, {_got(body)}" if "body" in obj else "record has no body")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad(f"body.model must be a string, {_got(model)}")
        extra["model"] = model
        if served is not None and model and model not in served:
            raise RecordError(MODEL_NOT_FOUND, f"The model `{model}` does not exist. Valid names: "
                                               f"{', '.join(sorted(served))} (the model directory's name, or "
                                               f"--served-model-name)")
    if url == EMBEDDINGS_URL:
        return _embedding_request(body, index, cid, extra)
    if url == SCORE_URL:
        return _score_request(body, index, cid, extra)
    _check_body_fields(body)
    best_of = body.get("best_of")
    if best_of is not None and _int_value("body.best_of", best_of) not in (1, body.get("n") or 1):
        raise _unsupported(f"body.best_of={best_of} (choices are not ranked: n samples are returned)")
    if body.get("stream") is not None and body["stream"] is not False:
        raise _unsupported("body.stream")
    chat = url == CHAT_URL
    if chat:
        if body.get("echo") not in (None, False):
            raise _unsupported("body.echo in a chat completion (completions echo their prompt)")
        if body.get("messages") is None:
            raise _bad("chat completion body has no messages")
        src = {"messages": _messages(body["messages"])}
    else:
        if body.get("prompt") is None:
            raise _bad("completion body has no prompt")
        if body.get("suffix") is not None:
            raise _unsupported("body.suffix")
        src = _completion_prompt(body["prompt"])
    sampling = _sampling(body, chat, defaults)
    return Request(index=index, id=cid, sampling=sampling, extra=extra, **src)


def parse_openai_record(obj_or_line: Any, line_no: int, index: int,
                        defaults: SamplingParams, served: frozenset | None = None) -> Request | Result:
    """Raw line bytes/str or a parsed value -> Request, or an error Result. Never raises.  ``served``: the names
    a body's ``model`` may have (None: any)."""
    extra: dict = {"custom_id": None}
    try:
        if isinstance(obj_or_line, (bytes, bytearray, memoryview, str)):
            obj = decode_line(obj_or_line)
        else:
            obj = obj_or_line
        return _request(obj, line_no, index, defaults, extra, served)
    except RecordError as e:
        err = ErrorInfo(e.type, e.message)
    except Exception as e:  # a record must never take the job down
        err = ErrorInfo(INVALID_REQUEST, f"record could not be parsed: {type(e).__name__}: {e}")
    cid = extra["custom_id"]
    return Result(index=index, id=line_no if cid is None else cid, error=err, extra=extra)


# ----------------------------------------------------------------- output

def _hex(*parts: Any, n: int = 32) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:n]


def token_id_str(token_id: int) -> str:
    """Default token string in logprobs when no tokenizer is given (vLLM's ``token_id:N`` form)."""
    return f"token_id:{token_id}"


def _token_bytes(s: str) -> list:
    return list(s.encode("utf-8", "surrogatepass"))


def _chat_logprobs(ids: list, lps: list, token_str: Callable[[int], str], top: list | None = None) -> dict:
    content = []
    for i, (t, lp) in enumerate(zip(ids, lps)):
        s = token_str(t)
        alts = [] if top is None else [{"token": token_str(a), "logprob": v, "bytes": _token_bytes(token_str(a))}
                                      for a, v in top[i]]
        content.append({"token": s, "logprob": lp, "bytes": _token_bytes(s), "top_logprobs": alts})
    return {"content": content}


def _completion_logprobs(ids: list, lps: list, token_str: Callable[[int], str], top: list | None = None) -> dict:
    tokens, offsets, pos = [], [], 0
    for t in ids:
        s = token_str(t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
    alts = None if top is None else [None if p is None else {token_str(a): v for a, v in reversed(p)}
                                     for p in top]                          # first wins a tie; None: first echo

    return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": alts, "text_offset": offsets}


def embedding_body(result: Result, created: int, model: str, encoding_format: str) -> dict:
    """An embeddings response (OpenAI's ``CreateEmbeddingResponse``, with vLLM's id and created): one
    ``{"object": "embedding", "index", "embedding"}`` per input, floats or base64 of little-endian float32."""
    def enc(v):
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
        return v
    data = [{"object": "embedding", "index": i, "embedding": enc(v)} for i, v in enumerate(result.embeddings)]
    return _list_body("embd-", result, created, model, data)


def score_body(result: Result, created: int, model: str) -> dict:
    """vLLM's score response: ``{"object": "score", "index", "score"}`` per pair, the cosine similarity of the
    pair's embeddings."""
    vecs = [np.asarray(v, dtype=np.float64) for v in result.embeddings]
    data = []
    for k, (a, b) in enumerate(result.extra["score_pairs"]):
        x, y = vecs[a], vecs[b]
        data.append({"index": k, "object": "score",
                     "score": float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-12))})
    return _list_body("score-", result, created, model, data)


def _list_body(prefix: str, result: Result, created: int, model: str, data: list) -> dict:
    """vLLM's list response around ``data`` (embeddings, scores): prompt tokens are all its usage."""
    n = result.prompt_tokens
    return {"id": prefix + _hex("body", result.index, result.extra.get("custom_id", str(result.id))),
            "object": "list", "created": int(created), "model": model, "data": data,
            "usage": {"prompt_tokens": n, "total_tokens": n}}


def vllm_prompt_logprobs(result: Result, token_str: Callable[[int], str]) -> list:
    """vLLM's ``prompt_logprobs``: None for the first token, then per prompt token ``{token id: {"logprob",
    "rank", "decoded_token"}}`` for the token itself and its top alternatives (rank 1 = most likely)."""
    out = [None]
    tops = result.prompt_top_logprobs or [None] * len(result.prompt_token_ids)
    for j in range(1, len(result.prompt_token_ids)):
        t = result.prompt_token_ids[j]
        pos = {str(t): {"logprob": result.prompt_logprobs[j], "rank": result.prompt_ranks[j],
                        "decoded_token": token_str(t)}}
        for r, (a, v) in enumerate(tops[j] or [], start=1):
            pos.setdefault(str(a), {"logprob": v, "rank": r, "decoded_token": token_str(a)})
        out.append(pos)
    return out


def error_status(error_type: str) -> int:
    """The HTTP status of an error record: 404 for a model this job does not serve, else 400 (the request)."""
    return 404 if error_type == MODEL_NOT_FOUND else 400


def batch_output_record(result: Result, created: int, model: str = "",
                        token_str: Callable[[int], str] | None = None,
                        default_url: str = COMPLETIONS_URL) -> dict:
    """One OpenAI batch output record for ``result`` (see the module docstring).

    ``extra`` supplies custom_id (else ``str(result.id)``), url (else
    ``default_url``) and model (else ``model``).  ``token_str`` names tokens in
    logprobs (default ``token_id:N``).
    """
    ex = result.extra or {}
    cid = ex["custom_id"] if "custom_id" in ex else str(result.id)
    rid = "batch_req_" + _hex("batch_req", result.index, cid)
    if result.error is not None:
        status = error_status(result.error.type)
        err = {"message": result.error.message, "type": result.error.type,
               "param": "model" if result.error.type == MODEL_NOT_FOUND else None, "code": status}
        return {"id": rid, "custom_id": cid,
                "response": {"status_code": status, "request_id": "req_" + _hex("req", result.index, cid),
                             "body": {"error": err}},
                "error": {"error": err}}
    url = ex.get("url") or default_url
    if result.embeddings is not None:
        body = score_body(result, created, ex.get("model") or model) if "score_pairs" in ex else \
            embedding_body(result, created, ex.get("model") or model, ex.get("encoding_format", "float"))
        return _ok_record(rid, cid, result.index, body)
    chat = url == CHAT_URL
    samples = result.choices or [Choice(result.text, result.token_ids, result.finish_reason, result.logprobs,
                                        result.top_logprobs)]
    choices = []
    echo = not chat and result.prompt_text is not None
    for i, c in enumerate(samples):
        lp = None
        if c.logprobs is not None:
            fn = token_str or token_id_str
            ids, lps, top = list(c.token_ids), list(c.logprobs), c.top_logprobs
            if echo and result.prompt_logprobs is not None:     # the prompt's tokens first (the first has none)
                ids, lps = list(result.prompt_token_ids) + ids, list(result.prompt_logprobs) + lps
                if top is not None:
                    top = list(result.prompt_top_logprobs or [None] * len(result.prompt_token_ids)) + list(top)
            lp = (_chat_logprobs if chat else _completion_logprobs)(ids, lps, fn, top)
        choice: dict = {"index": i}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = (result.prompt_text or "") + c.text if echo else c.text
        choice["logprobs"] = lp
        choice["finish_reason"] = c.finish_reason
        choices.append(choice)
    ntok = result.completion_tokens
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + _hex("body", result.index, cid),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(created),
        "model": ex.get("model") or model,
        "choices": choices,
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": ntok,
                  "total_tokens": result.prompt_tokens + ntok},
    }
    if result.prompt_ranks is not None:            # vLLM's prompt_logprobs
        body["prompt_logprobs"] = vllm_prompt_logprobs(result, token_str or token_id_str)
    return _ok_record(rid, cid, result.index, body)


def _ok_record(rid: str, cid: str, index: int, body: dict) -> dict:
    return {"id": rid, "custom_id": cid,
            "response": {"status_code": 200, "request_id": "req_" + _hex("req", index, cid), "body": body},
            "error": None}


def result_from_batch_output(rec: dict, index: int) -> Result:
    """Read back an output record (tests and tools): the fields a Result can hold."""
    cid = rec.get("custom_id")
    extra = {"custom_id": cid}
    if rec.get("error") is not None:
        e = rec["error"]
        if isinstance(e.get("error"), dict):           # vLLM's ErrorResponse shape (written since 0.2)
            e = e["error"]
            return Result(index=index, id=cid, error=ErrorInfo(e.get("type"), e.get("message")), extra=extra)
        return Result(index=index, id=cid, error=ErrorInfo(e.get("code"), e.get("message")), extra=extra)
    body = rec["response"]["body"]
    ch = body["choices"][0]
    chat = body["object"] == "chat.completion"
    extra["url"] = CHAT_URL if chat else COMPLETIONS_URL
    extra["model"] = body.get("model")
    lp = ch.get("logprobs")
    if lp is not None:
        lp = [c["logprob"] for c in lp["content"]] if chat else list(lp["token_logprobs"])
    return Result(index=index, id=cid, text=ch["message"]["content"] if chat else ch["text"],
                  finish_reason=ch["finish_reason"], prompt_tokens=body["usage"]["prompt_tokens"],
                  logprobs=lp, extra=extra)

