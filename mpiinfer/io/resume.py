"""What a re-run may trust about the output it continues: the manifest, the completion journal, the plan.

Owns two files beside ``OUTPUT`` and the decision made from them, on world rank 0, before any rank reads
weights (``plan_resume``):

* ``OUTPUT.manifest.json`` (written by every run before the model loads): every input's absolute path, size and a
  content fingerprint (sha256 over its size, first and last 16 MiB; a directory: every file's relative
  path, size and fingerprint), the options that change results (model directory, dtype, sampling
  defaults, max tokens, seed, input and output formats, prompt template, dataset), and the job's start
  time (the ``created`` of OpenAI output records, so a resumed output is byte-identical).  A re-run whose
  inputs or options differ is refused with the differences named; ``--overwrite`` starts over.
* ``OUTPUT.journal.jsonl``: every finished result, in completion order, as one JSON line written to the OS
  as soon as the coordinator has it (so killing any process loses nothing that finished) and fsynced with
  the output.  The ordered output is written from the results as their gaps close; after an output flush
  the journal is rewritten to the results still waiting for a gap (when none waits or it has doubled since
  its last rewrite).  A re-run writes the journaled results instead of recomputing them; a finished job
  removes the journal.

The records already in the output are also checked against the input: the id of each of them must be the
id the input gives at that position (stdin cannot be read twice: its ids are not checked).
"""
from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from ..config import ConfigError, RunConfig
from ..messages import Choice, ErrorInfo, Result

log = logging.getLogger("mpiinfer")

MANIFEST_VERSION = 1
_FP_BYTES = 16 << 20


def manifest_path(output: str) -> str:
    return output + ".manifest.json"


def journal_path(output: str) -> str:
    return output + ".journal.jsonl"


# ------------------------------------------------------------------ fingerprints

def _file_fingerprint(path: str, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_FP_BYTES))
        if size > 2 * _FP_BYTES:
            f.seek(size - _FP_BYTES)
        h.update(f.read(_FP_BYTES))
    return h.hexdigest()


def describe_input(path: str) -> dict:
    """{path, size, fingerprint} of one input (``-``: stdin, not fingerprinted)."""
    if path == "-":
        return {"path": "-"}
    ap = os.path.abspath(path)
    if os.path.isdir(ap):
        h, total = hashlib.sha256(), 0
        for root, dirs, files in os.walk(ap):
            dirs.sort()
            for name in sorted(files):
                p = os.path.join(root, name)
                size = os.path.getsize(p)
                total += size
                h.update(f"{os.path.relpath(p, ap)}\0{size}\0{_file_fingerprint(p, size)}\0".encode("utf-8",
                                                                                                   "surrogatepass"))
        return {"path": ap, "size": total, "fingerprint": h.hexdigest()}
    size = os.path.getsize(ap)
    return {"path": ap, "size": size, "fingerprint": _file_fingerprint(ap, size)}


def result_options(cfg: RunConfig, out_fmt: str) -> dict:
    """The options that change what a record's result is (a resumed job must use the same)."""
    d = cfg.defaults
    names = {"served_model_names": sorted(cfg.served_model_names)} if cfg.served_model_names else {}
    # only when given: manifests from before --kv-dtype (and jobs without it) resume as they did
    kv = {"kv_dtype": cfg.engine.kv_dtype} if cfg.engine.kv_dtype else {}
    return names | kv | {
        "model": os.path.abspath(cfg.model) if cfg.engine.kind == "model" else f"<{cfg.engine.kind} engine>",
        "dtype": cfg.engine.dtype or "auto",
        "max_tokens": d.max_tokens, "temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
        "seed": cfg.seed,
        "max_seq_len": cfg.engine.max_seq_len,
        "input_format": cfg.input_format, "output_format": out_fmt,
        "prompt_template": cfg.prompt_template, "dataset": cfg.dataset,
    }


def make_manifest(cfg: RunConfig, out_fmt: str) -> dict:
    return {"version": MANIFEST_VERSION, "inputs": [describe_input(p) for p in cfg.inputs],
            "options": result_options(cfg, out_fmt), "created": int(time.time())}


# what --retry-errors may change: the inputs' content (a fixed record; every kept record's id is checked) and
# the context limit (a record that was too long); never what decides a kept record's result
RETRY_MAY_CHANGE = ("max_seq_len",)


def manifest_differences(old: dict, new: dict, retry: bool = False) -> list:
    """Human-readable differences between a stored manifest and this run's (empty: the same job).  ``retry``:
    those that --retry-errors does not allow (see ``RETRY_MAY_CHANGE``)."""
    diffs = []
    oi, ni = old.get("inputs", []), new["inputs"]
    if [i.get("path") for i in oi] != [i.get("path") for i in ni]:
        diffs.append(f"inputs were {[i.get('path') for i in oi]}, now {[i.get('path') for i in ni]}")
    elif not retry:
        for a, b in zip(oi, ni):
            if a.get("size") != b.get("size"):
                diffs.append(f"input {b['path']} was {a.get('size')} bytes, now {b.get('size')}")
            elif a.get("fingerprint") != b.get("fingerprint"):
                diffs.append(f"input {b['path']} has the same size but other content")
    oo, no = old.get("options", {}), new["options"]
    for k in sorted(set(oo) | set(no)):
        if oo.get(k) != no.get(k) and not (retry and k in RETRY_MAY_CHANGE):
            diffs.append(f"{k} was {oo.get(k)!r}, now {no.get(k)!r}")
    return diffs


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------ results <-> journal lines

def result_to_json(r: Result) -> dict:
    return {"index": r.index, "id": r.id, "text": r.text, "token_ids": list(r.token_ids),
            "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens, "logprobs": r.logprobs, "top_logprobs": r.top_logprobs, "prompt_logprobs": r.prompt_logprobs,
            "prompt_token_ids": r.prompt_token_ids, "prompt_text": r.prompt_text,
            "prompt_top_logprobs": r.prompt_top_logprobs, "embeddings": r.embeddings, "prompt_ranks": r.prompt_ranks,
            "error": None if r.error is None else [r.error.type, r.error.message], "extra": r.extra,
            "ttft": r.ttft, "latency": r.latency, "max_tokens_clipped_to": r.max_tokens_clipped_to,
            "preemptions": r.preemptions, "cached_tokens": r.cached_tokens,
            "choices": None if r.choices is None else [dataclasses.asdict(c) for c in r.choices]}


def result_from_json(d: dict) -> Result:
    err = d.get("error")
    return Result(index=int(d["index"]), id=d["id"], text=d["text"], token_ids=list(d["token_ids"]),
                  finish_reason=d["finish_reason"], prompt_tokens=int(d["prompt_tokens"]), logprobs=d["logprobs"], top_logprobs=d.get("top_logprobs"), prompt_logprobs=d.get("prompt_logprobs"),
                  prompt_token_ids=d.get("prompt_token_ids"), prompt_text=d.get("prompt_text"),
                  prompt_top_logprobs=d.get("prompt_top_logprobs"), embeddings=d.get("embeddings"),
                  prompt_ranks=d.get("prompt_ranks"),
                  error=None if err is None else ErrorInfo(err[0], err[1]), extra=dict(d.get("extra") or {}),
                  ttft=d.get("ttft"), latency=d.get("latency"), max_tokens_clipped_to=d.get("max_tokens_clipped_to"),
                  preemptions=int(d.get("preemptions") or 0), cached_tokens=int(d.get("cached_tokens") or 0),
                  choices=None if d.get("choices") is None else [Choice(**c) for c in d["choices"]])


def _line(r: Result) -> bytes:
    # ASCII escapes: ids and texts may hold unpaired surrogates, which UTF-8 cannot encode
    return (json.dumps(result_to_json(r), ensure_ascii=True) + "\n").encode("ascii")


def read_journal(path: str) -> dict:
    """index -> Result of every complete line of a journal (a torn last line is ignored; the first of two
    results for one index wins)."""
    out: dict = {}
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                r = result_from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError, IndexError):
                break
            out.setdefault(r.index, r)
    return out


@dataclass(frozen=True)
class Spilled:
    """A result kept in the journal instead of memory while it waits for a gap in the output."""
    index: int
    offset: int
    length: int


class Journal:
    """Append-only journal of finished results: each line reaches the OS at once (``os.write``), so no process
    kill loses it; ``sync()`` fsyncs (against node loss); ``rewrite(results)`` replaces the file atomically by
    just those results; ``read(spilled)`` reads one back."""

    def __init__(self, path: str, results=()):
        self.path = path
        self.fd = None
        self.rewrite(results)

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        self.size = os.fstat(self.fd).st_size

    def append(self, r: Result) -> Spilled:
        return self.append_many([r])[0]

    def append_many(self, results: list) -> list:
        """Journal ``results`` with one write (a step's or a message's results: one system call, not one per
        result); their ``Spilled`` places, in order."""
        lines = [_line(r) for r in results]
        places, at = [], self.size
        for r, line in zip(results, lines):
            places.append(Spilled(r.index, at, len(line)))
            at += len(line)
        data = memoryview(b"".join(lines))
        while data:
            n = os.write(self.fd, data)
            data = data[n:]
        self.size = at
        return places

    def read(self, s: Spilled) -> Result:
        return result_from_json(json.loads(os.pread(self.fd, s.length, s.offset)))

    def sync(self) -> None:
        os.fsync(self.fd)

    def rewrite(self, results) -> None:
        """The journal becomes exactly ``results`` (durably), e.g. those still waiting for a gap in the output."""
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"".join(_line(r) for r in results))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if self.fd is not None:
            os.close(self.fd)
        self._open()
        self.rewritten_size = self.size

    def close(self, remove: bool = False) -> None:
        if self.fd is None:
            return
        if not remove:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        if remove:
            os.remove(self.path)


# ------------------------------------------------------------------ the plan

@dataclass
class ResumePlan:
    """What this run does with the output: ``done`` records are already in it, ``restored`` results (index ->
    Result) were journaled and are written without being recomputed; ``manifest`` is this job's."""
    out_fmt: str
    done: int = 0
    restored: dict = field(default_factory=dict)
    manifest: dict | None = None
    todo: bool = True                  # some input record is neither in the output nor journaled
    # --retry-errors: the indices below ``done`` whose record in the output is an error, computed again; the
    # output is rewritten (the good records copied as they are, in input order) under ``retry_path``
    retry: set | None = None
    # hashes of the ids of the output's records (not with --retry-errors, which reads the whole input again): the
    # coordinator goes on from them to notice ids that repeat (``coordinator.DuplicateIds``)
    seen_ids: array.array = field(default_factory=lambda: array.array("q"))

    @property
    def retrying(self) -> bool:
        return self.retry is not None

    @property
    def kept(self) -> int:
        """Records of the output this run keeps as they are."""
        return self.done - len(self.retry or ())

    def computes(self, index: int) -> bool:
        """Whether input record ``index`` is computed (or restored from the journal) by this run."""
        return index >= self.done or (self.retry is not None and index in self.retry)


def retry_path(output: str) -> str:
    """Where ``--retry-errors`` writes the new output before it replaces ``output``."""
    return output + ".retry.tmp"


def id_hash(key) -> int:
    """64 bits standing for an id (a set of them notices repeated ids in ~60 bytes per record; a collision only
    reports a repeat that is not one)."""
    try:
        return hash(key)
    except TypeError:
        return hash(repr(key))


def written_key(item, out_fmt: str):
    """What the output holds to identify the record of ``item`` (a Request or an error Result)."""
    ex = item.extra or {}
    if out_fmt == "openai":
        return ex["custom_id"] if "custom_id" in ex else str(item.id)
    if out_fmt == "hdf5":
        from .hdf5 import _no_nul
        return _no_nul(str(item.id))             # as the HDF5 writer stores it
    return item.id


def iter_output(path: str, out_fmt: str, count: int):
    """The first ``count`` records of an output, streamed: ``(key, is_error, entry)`` per record, where ``key``
    is its ``written_key`` and ``entry`` what ``--retry-errors`` copies into the new output: the raw line of a
    JSONL / OpenAI output, a ``Result`` read back from an HDF5 one."""
    if count <= 0:
        return
    if out_fmt == "hdf5":
        from .hdf5 import iter_hdf5_results
        for r in iter_hdf5_results(path, count):
            yield r.id, r.error is not None, r
        return
    openai = out_fmt == "openai"
    with open(path, "rb") as f:
        for n, raw in enumerate(f):
            if n >= count:
                break
            rec = json.loads(raw)
            if openai:
                yield rec.get("custom_id"), rec.get("error") is not None, raw
            else:
                yield rec.get("id"), "error" in rec, raw


def _refuse(cfg: RunConfig, why: str) -> ConfigError:
    return ConfigError(f"{cfg.output} cannot be resumed: {why}; pass --overwrite to start over "
                       "(or write to another --output)")


def plan_resume(cfg: RunConfig, out_fmt: str, read_inputs) -> ResumePlan:
    """Decide, before any weights are read, what this run continues (world rank 0), and write the manifest
    (which also proves the output's directory writable).

    ``read_inputs(skip)``: the stream of input items from index ``skip`` (the coordinator's reader).  Raises
    ``ConfigError`` for an output that belongs to other inputs or options, an empty input, or an output that
    cannot be written."""
    try:
        plan = _plan(cfg, out_fmt, read_inputs)
        if cfg.output != "-":
            write_json_atomic(manifest_path(cfg.output), plan.manifest)
            if os.path.exists(cfg.output) and not os.access(cfg.output, os.W_OK):
                raise PermissionError(f"{cfg.output} is not writable")
        return plan
    except OSError as e:
        raise ConfigError(f"cannot write the output {cfg.output}: {e.strerror or e}"
                          + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from None


def _plan(cfg: RunConfig, out_fmt: str, read_inputs) -> ResumePlan:
    from .writers import recover_output
    out = cfg.output
    if out == "-":
        if cfg.retry_errors:
            raise ConfigError("--retry-errors rewrites an output file: it cannot be used with --output -")
        return ResumePlan(out_fmt)
    mpath, jpath = manifest_path(out), journal_path(out)
    if cfg.overwrite:
        for p in (out, mpath, jpath, retry_path(out)):
            if os.path.exists(p):
                os.remove(p)
    manifest = make_manifest(cfg, out_fmt)
    old = None
    if os.path.exists(mpath):
        try:
            with open(mpath) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise _refuse(cfg, f"its manifest {mpath} cannot be read ({e})") from None
        diffs = manifest_differences(old, manifest, retry=cfg.retry_errors)
        if diffs:
            what = ("--retry-errors keeps its good records, so only the inputs' content and --max-seq-len may "
                    "change, not: " if cfg.retry_errors else "it was written by a job with other inputs or options: ")
            raise _refuse(cfg, what + "; ".join(diffs))
        manifest["created"] = old.get("created", manifest["created"])
    elif os.path.exists(out) and os.path.getsize(out) > 0:
        if cfg.retry_errors:
            raise _refuse(cfg, "it has no manifest (written by an older mpiinfer?), so --retry-errors cannot "
                               "check that it was written with these options")
        log.warning("%s has no manifest (written by an older mpiinfer?): only its records' ids are checked "
                    "against the input", out)
    if cfg.retry_errors and cfg.inputs == ("-",):
        raise ConfigError("--retry-errors reads the input alongside the output: it cannot read stdin")
    try:
        done = recover_output(out, out_fmt)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    journal = read_journal(jpath)
    plan = ResumePlan(out_fmt, done, {}, manifest, retry=set() if cfg.retry_errors and done else None)
    if os.path.exists(retry_path(out)):
        os.remove(retry_path(out))      # a retry's new output that never replaced the output: its results are journaled
    if cfg.inputs == ("-",):
        plan.restored = {i: r for i, r in journal.items() if i >= done}
        return plan                     # stdin: read once, by the job itself
    _check_against_input(cfg, plan, journal, read_inputs)
    return plan


def _check_against_input(cfg: RunConfig, plan: ResumePlan, journal: dict, read_inputs) -> None:
    """The ids of the records already in the output, and of the journaled results, are the input's ids at
    those positions; the input has at least one record; ``plan.todo`` says whether any record is left.  Fills
    ``plan.restored`` (the journaled results this run writes instead of computing) and, with --retry-errors,
    ``plan.retry`` (the error records of the output).  Output and input are read side by side (flat memory)."""
    output = iter_output(cfg.output, plan.out_fmt, plan.done)
    last = max(journal, default=-1)
    seen = 0
    plan.todo = False
    for item in read_inputs(0):
        i = item.index
        seen = i + 1
        if i < plan.done:
            key, is_error, _ = next(output)
            if is_error and plan.retry is not None:
                plan.retry.add(i)           # replaced: its id may change (a malformed line's is its line number)
            else:
                want = written_key(item, plan.out_fmt)
                if key != want:
                    raise _refuse(cfg, f"its record {i + 1} has id {key!r} but input record {i + 1} has id "
                                       f"{want!r}: it was written for another input")
                if plan.retry is None and not isinstance(item, Result):
                    plan.seen_ids.append(id_hash(key))
                continue
        if i in journal and not (plan.retry is not None and journal[i].error is not None):
            # (--retry-errors computes an error again even when an interrupted retry journaled it)
            if journal[i].id != item.id:
                raise _refuse(cfg, f"its journal holds a result for record {i + 1} with id "
                                   f"{journal[i].id!r} but that input record has id {item.id!r}")
            plan.restored[i] = journal[i]
        else:
            plan.todo = True
            if i > last and i >= plan.done:
                break
    if seen == 0:
        raise ConfigError(f"the input ({', '.join(cfg.inputs)}) has no records")
    if seen < plan.done:
        raise _refuse(cfg, f"it already has {plan.done} records but the input has only {seen}")
