"""Results -> the output file, in input order, crash-safely.

Owns the output side: ``JsonlWriter`` (append-only, buffered, ``os.fsync`` every
N records / S seconds and on close), ``OpenAIBatchWriter`` (the same, writing
OpenAI batch output records), ``hdf5.Hdf5Writer`` (rows of HDF5 datasets),
``OrderedWriter`` (a bounded reorder buffer so results arriving in any order are
written in ``index`` order), ``recover_jsonl`` (make an existing output
resumable: drop a torn last line and count the complete records), and the
per-format dispatch ``open_output`` / ``recover_output`` /
``detect_output_format`` / ``default_output_format``.  Each JSONL output line is
exactly ``json.dumps(result.to_record(), ensure_ascii=False)``.

Output formats: ``jsonl`` (``.jsonl``/``.json``/``.ndjson``, ``-``), ``openai``
(JSONL too: chosen by flag, or by ``default_output_format`` for OpenAI batch
inputs) and ``hdf5`` (``.h5``/``.hdf5``).

Because output is written strictly in input order and only whole lines are
counted, ``recover_jsonl``'s count is the number of leading input items a
resumed job can skip.  Open outputs for appending only after running
``recover_jsonl`` on them (or removing them): appending after a torn line would
glue two records together.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from ..messages import Result
from .openai_batch import COMPLETIONS_URL, batch_output_record


class ReorderOverflow(RuntimeError):
    """More results pending in an OrderedWriter than it allows (a caller bug)."""


def _encode(rec: dict) -> bytes:
    try:
        return (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        # A string with an unpaired surrogate (e.g. an id from a "\ud800" escape)
        # cannot be UTF-8; escaped ASCII JSON round-trips it exactly.
        return (json.dumps(rec, ensure_ascii=True) + "\n").encode("ascii")


class JsonlWriter:
    """Append results to a JSONL file; ``-`` writes to stdout (no fsync).

    Lines are buffered in memory and written + flushed + fsynced when
    ``flush_every_records`` are buffered, when a write finds the last flush
    ``flush_every_seconds`` old, on ``flush()`` and on ``close()``.  A crash loses at
    most the unflushed lines and leaves at worst one torn last line.
    """

    def __init__(self, path, flush_every_records: int = 100, flush_every_seconds: float = 5.0):
        if flush_every_records < 1:
            raise ValueError(f"flush_every_records must be >= 1, got {flush_every_records}")
        if not flush_every_seconds > 0:
            raise ValueError(f"flush_every_seconds must be > 0, got {flush_every_seconds}")
        self.path = os.fspath(path)
        self.flush_every_records = flush_every_records
        self.flush_every_seconds = flush_every_seconds
        self._buf: list = []
        self._dirty = False
        self.records_written = 0  # accepted by write() (buffered or on disk)
        self.flushes = 0          # completed flush() calls: everything written before one is durable
        self.closed = False
        if self.path == "-":
            self._f = sys.stdout.buffer
            self._owned = False
            self._sync = False
        else:
            existed = os.path.exists(self.path)
            self._f = open(self.path, "ab")   # noqa: SIM115 - held open for the writer's lifetime, closed by close()
            self._owned = True
            self._sync = True
            if not existed:
                self._fsync_dir()
        self._last_flush = time.monotonic()

    def _fsync_dir(self) -> None:
        """Make a newly created file's directory entry durable (best effort)."""
        d = os.path.dirname(os.path.abspath(self.path))
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def write(self, result: Result) -> None:
        if self.closed:
            raise ValueError(f"write to closed JsonlWriter({self.path!r})")
        self._buf.append(_encode(self.record(result)))
        self.records_written += 1
        if (len(self._buf) >= self.flush_every_records
                or time.monotonic() - self._last_flush >= self.flush_every_seconds):
            self.flush()

    def write_kept(self, line: bytes) -> None:
        """Write a record of an earlier output exactly as it was (``--retry-errors`` keeps good records)."""
        if self.closed:
            raise ValueError(f"write to closed JsonlWriter({self.path!r})")
        self._buf.append(line if line.endswith(b"\n") else line + b"\n")
        self.records_written += 1
        if len(self._buf) >= self.flush_every_records:
            self.flush()

    def record(self, result: Result) -> dict:
        """The JSON object written for ``result`` (subclasses change the record format)."""
        return result.to_record()

    def flush(self) -> None:
        """Write buffered lines, flush and fsync them."""
        if self.closed:
            return
        if self._buf:
            self._f.write(b"".join(self._buf))
            self._buf.clear()
            self._dirty = True
        self._f.flush()
        if self._dirty and self._sync:
            os.fsync(self._f.fileno())
        self._dirty = False
        self._last_flush = time.monotonic()
        self.flushes += 1

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            if self._owned:
                self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OpenAIBatchWriter(JsonlWriter):
    """``JsonlWriter`` writing OpenAI batch output records (``openai_batch.batch_output_record``).

    ``model``: the model name echoed when a request had no ``body.model``;
    ``created``: the ``created`` timestamp of every response (default: when the
    writer was opened; pass a stable value, e.g. the input file's mtime, to make
    a resumed output byte-identical to an uninterrupted one); ``token_str``:
    token id -> string for logprobs (default ``token_id:N``); ``default_url``:
    the endpoint assumed for results that did not come from an OpenAI input.
    """

    def __init__(self, path, flush_every_records: int = 100, flush_every_seconds: float = 5.0, *,
                 model: str = "", created: int | None = None,
                 token_str: Callable[[int], str] | None = None,
                 default_url: str = COMPLETIONS_URL):
        super().__init__(path, flush_every_records, flush_every_seconds)
        self.model = model or ""
        self.created = int(time.time()) if created is None else int(created)
        self.token_str = token_str
        self.default_url = default_url

    def record(self, result: Result) -> dict:
        return batch_output_record(result, self.created, self.model, self.token_str, self.default_url)


class OrderedWriter:
    """Accept results in any order; pass them to ``inner`` in ``index`` order.

    Results wait in a reorder buffer until every lower index has been written.
    More than ``max_pending`` waiting results raises ``ReorderOverflow`` (the
    caller bounds its in-flight window, so this is a bug guard); a duplicate or
    already-written index raises ValueError.  ``close()`` closes ``inner`` and
    raises if results are still waiting on a missing index (those are not
    written, so the output stays an exact prefix of the input).
    """

    def __init__(self, inner, start_index: int = 0, max_pending: int = 10000, resolve=None, kept=None):
        if max_pending < 0:
            raise ValueError(f"max_pending must be >= 0, got {max_pending}")
        self.inner = inner
        self.resolve = resolve    # waiting entries may be stand-ins with an ``index``: resolve(entry) -> Result
        self.next_index = start_index
        self.max_pending = max_pending
        self._pending: dict[int, Result] = {}
        self.closed = False
        # kept: (index, entry) in index order, records of an earlier output that take their place as they are
        # (``inner.write_kept(entry)``); the results given to ``write`` fill the other indices
        self._kept = iter(kept) if kept is not None else None
        self._next_kept = None
        self.kept_written = 0
        self._take_kept()
        self._advance()

    def _take_kept(self) -> None:
        self._next_kept = next(self._kept, None) if self._kept is not None else None

    def _advance(self) -> None:
        """Write whatever continues the output in order: waiting results and kept records."""
        resolve, pending = self.resolve, self._pending
        while True:
            if self._next_kept is not None and self._next_kept[0] == self.next_index:
                self.inner.write_kept(self._next_kept[1])
                self.kept_written += 1
                self._take_kept()
            else:
                nxt = pending.pop(self.next_index, None) if pending else None
                if nxt is None:
                    return
                self.inner.write(resolve(nxt) if resolve else nxt)
            self.next_index += 1

    @property
    def pending(self) -> int:
        return len(self._pending)

    def waiting(self) -> list:
        """The entries waiting for a lower index, in index order."""
        return [self._pending[i] for i in sorted(self._pending)]

    def write(self, result: Result) -> None:
        if self.closed:
            raise ValueError("write to closed OrderedWriter")
        i = result.index
        if i < self.next_index or i in self._pending or (self._next_kept is not None and i == self._next_kept[0]):
            raise ValueError(f"OrderedWriter: duplicate result for index {i} (id {result.id!r})")
        if i != self.next_index:
            if len(self._pending) >= self.max_pending:
                raise ReorderOverflow(
                    f"OrderedWriter: {len(self._pending) + 1} results would be pending "
                    f"(max_pending={self.max_pending}) while waiting for index {self.next_index}; "
                    f"got index {i}. The caller's in-flight window is not bounded (bug).")
            self._pending[i] = result
            return
        resolve = self.resolve
        self.inner.write(resolve(result) if resolve else result)
        self.next_index += 1
        self._advance()

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.inner.close()
        if self._pending:
            lo = min(self._pending)
            raise RuntimeError(
                f"OrderedWriter closed with {len(self._pending)} results pending: index "
                f"{self.next_index} never arrived (pending from {lo} to {max(self._pending)}); "
                f"they were not written")

    def __enter__(self) -> OrderedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except RuntimeError:
                pass  # don't mask the original error


def _complete_record(line: bytes) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return isinstance(rec, dict) and "id" in rec


def recover_jsonl(path) -> tuple[int, int]:
    """Make an existing output resumable -> ``(complete_records, last_good_offset)``.

    Every line is checked: a complete record ends with ``\\n`` and is a JSON
    object with an ``id``.  A bad *last* line (torn write: no ``\\n``, or not
    valid JSON) is truncated away and fsynced.  A bad line followed by more lines
    is corruption this cannot explain, so it raises ValueError (nothing is
    truncated).  A missing file is ``(0, 0)``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0, 0
    count = 0
    offset = 0
    bad_line: int | None = None
    with open(path, "r+b") as f:
        for line_no, line in enumerate(f, 1):
            if bad_line is not None:
                raise ValueError(
                    f"{path}: line {bad_line} (byte offset {offset}) is not a complete JSON record "
                    f"but more lines follow it; the output is corrupt, not just torn. Inspect it "
                    f"and truncate it by hand (e.g. `truncate -s {offset} {path}`) to resume.")
            if _complete_record(line):
                count += 1
                offset += len(line)
            else:
                bad_line = line_no
        if bad_line is not None:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
    return count, offset


# ----------------------------------------------------------------- format dispatch

OUTPUT_EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
}
OUTPUT_FORMATS = ("jsonl", "openai", "hdf5")
# Writer options only some formats take; open_output drops them for the others.
_FORMAT_OPTIONS = {"openai": ("model", "created", "token_str", "default_url")}
_ALL_FORMAT_OPTIONS = frozenset(o for opts in _FORMAT_OPTIONS.values() for o in opts)


def detect_output_format(path) -> str:
    """``hdf5`` for ``.h5``/``.hdf5``, ``jsonl`` for ``.jsonl``/``.json``/``.ndjson`` and ``-``."""
    path = os.fspath(path)
    if path == "-":
        return "jsonl"
    ext = os.path.splitext(path)[1].lower()
    fmt = OUTPUT_EXTENSIONS.get(ext)
    if fmt is None:
        raise ValueError(f"cannot write {path!r}: output extension {ext or '(none)'!r} is not supported "
                         f"(supported: {', '.join(sorted(OUTPUT_EXTENSIONS))}); pass the output format "
                         f"explicitly ({', '.join(OUTPUT_FORMATS)})")
    return fmt


def default_output_format(input_format: str | None, path=None) -> str:
    """The output format when none is given: HDF5 for a ``.h5``/``.hdf5`` path, else
    ``openai`` when the input is an OpenAI batch file, else by the path's extension
    (``jsonl`` when there is no path)."""
    by_ext = detect_output_format(path) if path is not None else "jsonl"
    if by_ext == "hdf5":
        return "hdf5"
    if input_format == "openai":
        return "openai"
    return by_ext


def open_output(path, fmt: str | None = None, **kw):
    """A writer for ``path`` with ``write(Result)``, ``flush()``, ``close()`` (and a context manager).

    ``fmt``: ``jsonl``, ``openai``, ``hdf5`` or None (``detect_output_format``).
    ``kw``: ``flush_every_records``, ``flush_every_seconds`` for all; ``model``,
    ``created``, ``token_str``, ``default_url`` for ``openai`` (dropped for the
    other formats, so one set can be passed).  Appends to an existing output:
    run ``recover_output`` on it first.  Wrap it in ``OrderedWriter`` for order.
    """
    fmt = detect_output_format(path) if fmt is None else fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not supported (supported: {', '.join(OUTPUT_FORMATS)})")
    own = _FORMAT_OPTIONS.get(fmt, ())
    kw = {k: v for k, v in kw.items() if k in own or k not in _ALL_FORMAT_OPTIONS}
    if fmt == "jsonl":
        return JsonlWriter(path, **kw)
    if fmt == "openai":
        return OpenAIBatchWriter(path, **kw)
    from .hdf5 import Hdf5Writer
    return Hdf5Writer(path, **kw)


def _recover_hdf5(path) -> int:
    from .hdf5 import recover_hdf5
    return recover_hdf5(path)


# Format -> recover(path) -> number of complete records (0 for a missing file); the
# output is left ready for appending (torn tail removed).
RECOVERY: dict[str, Callable[..., int]] = {
    "jsonl": lambda path: recover_jsonl(path)[0],
    "openai": lambda path: recover_jsonl(path)[0],
    "hdf5": _recover_hdf5,
}


def recover_output(path, fmt: str | None = None) -> int:
    """Make an existing output resumable -> its count of complete records (see ``RECOVERY``).

    ``-`` (stdout) is 0.  Raises ValueError on corruption recovery cannot explain.
    """
    if os.fspath(path) == "-":
        return 0
    fmt = detect_output_format(path) if fmt is None else fmt.lower()
    if fmt not in RECOVERY:
        raise ValueError(f"output format {fmt!r} is not supported (supported: {', '.join(OUTPUT_FORMATS)})")
    return RECOVERY[fmt](path)
