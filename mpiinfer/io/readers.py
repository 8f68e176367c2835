"""Input files -> a lazy stream of ``Request`` / error ``Result`` items.

Owns opening inputs (paths, ``-`` for stdin, binary streams), telling formats
apart (``detect_format``: directories, ``.h5``/``.hdf5``, and JSONL vs OpenAI
batch by peeking at the first non-blank line), choosing the reader
(``open_input``), streaming JSONL line by line without loading the file
(``iter_jsonl``, ``iter_openai``) and cheap line counts for progress
(``count_lines``).  Record validation lives in ``records`` / ``openai_batch``;
the HDF5 and text-directory readers live in ``hdf5`` / ``textdir``.

Formats: ``jsonl``, ``openai`` (OpenAI batch JSONL), ``hdf5``, ``text``.

Indexing: items get consecutive ``index`` values from ``start_index``; blank
(whitespace-only) lines are skipped and do not consume an index; every other
line (HDF5 row, text file) yields exactly one item (a Request, or a Result
carrying an error).  Every reader takes ``skip=n``: the first ``n`` items are
passed over cheaply (not parsed) but still consume their indices (resume).
"""
from __future__ import annotations

import functools
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO, Union

from ..config import SamplingParams
from ..messages import Request, Result
from .openai_batch import looks_like_openai, parse_openai_record
from .records import parse_record

Item = Request | Result
Source = Union[str, "os.PathLike[str]", BinaryIO]

_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20


def _open_binary(source: Source):
    """-> (binary stream, owned). ``-`` is stdin's binary buffer (not owned)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path == "-":
            return sys.stdin.buffer, False
        if os.path.isdir(path):
            raise IsADirectoryError(f"input {path!r} is a directory, not a JSONL file")
        return open(path, "rb"), True
    if isinstance(source, io.TextIOBase):
        buf = getattr(source, "buffer", None)
        if buf is None:
            raise TypeError("iter_jsonl needs a binary stream (or a text stream with .buffer)")
        return buf, False
    if not hasattr(source, "readline"):
        raise TypeError(f"cannot read input from {type(source).__name__}: give a path, '-' or a binary stream")
    return source, False


def iter_jsonl(path_or_stream: Source, defaults: SamplingParams = SamplingParams(),
               start_index: int = 0, *, skip: int = 0) -> Iterator[Item]:
    """Stream a JSONL input lazily, one item per non-blank line.

    ``path_or_stream``: a path, ``-`` (stdin) or a binary stream (not closed
    here).  ``skip``: the first ``skip`` non-blank lines are passed over without
    being parsed but still consume their indices (resume after
    ``writers.recover_jsonl``), so the first yielded index is
    ``start_index + skip``.  The file is opened (and ``defaults`` validated)
    when this is called, so a missing file raises here, not on first ``next``.
    """
    defaults.validate()
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    f, owned = _open_binary(path_or_stream)
    return _line_items(f, owned, parse_record, defaults, start_index, skip)


def iter_openai(path_or_stream: Source, defaults: SamplingParams = SamplingParams(),
                start_index: int = 0, *, skip: int = 0, served_model_names=None) -> Iterator[Item]:
    """Stream an OpenAI batch JSONL input lazily (as ``iter_jsonl``; records per ``openai_batch``).
    ``served_model_names``: the names a body's ``model`` may give (None: any)."""
    defaults.validate()
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    f, owned = _open_binary(path_or_stream)
    parse = functools.partial(parse_openai_record, served=served_model_names)
    return _line_items(f, owned, parse, defaults, start_index, skip)


def _line_items(f, owned: bool, parse, defaults: SamplingParams, index: int, skip: int) -> Iterator[Item]:
    try:
        readline = f.readline
        line_no = 0
        while True:
            raw = readline()
            if not raw:
                return
            line_no += 1
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                index += 1
                continue
            yield parse(raw, line_no, index, defaults)
            index += 1
    finally:
        if owned:
            f.close()


def count_lines(path: str | os.PathLike[str]) -> int | None:
    """Physical lines in a file (a final line without ``\\n`` counts), by chunked byte counting.

    Blank lines are counted too, so this is an upper bound on the number of
    items, good for a progress total.  ``None`` for ``-`` (stdin cannot be
    counted without consuming it).
    """
    path = os.fspath(path)
    if path == "-":
        return None
    n = 0
    last = b"\n"
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += buf.count(b"\n", 0, k)
            last = bytes(view[k - 1:k])
    if last != b"\n":
        n += 1
    return n


def _iter_hdf5(path, defaults=SamplingParams(), start_index=0, **kw):
    from .hdf5 import iter_hdf5
    return iter_hdf5(path, defaults, start_index, **kw)


def _iter_textdir(path, defaults=SamplingParams(), start_index=0, **kw):
    from .textdir import iter_textdir
    return iter_textdir(path, defaults, start_index, **kw)


# Format name -> reader(path_or_stream, defaults, start_index, *, skip=0, **options).
READERS: dict[str, Callable[..., Iterator[Item]]] = {
    "jsonl": iter_jsonl,
    "openai": iter_openai,
    "hdf5": _iter_hdf5,
    "text": _iter_textdir,
}
# Format-specific options open_input passes on; an option meant for another format is ignored.
OPTIONS: dict[str, tuple] = {
    "jsonl": (),
    "openai": ("served_model_names",),
    "hdf5": ("dataset", "ids_dataset", "chunk_rows"),
    "text": ("prompt_template", "recursive"),
}
_ALL_OPTIONS = frozenset(o for opts in OPTIONS.values() for o in opts)
# File extension (lower case) -> format name; JSONL extensions are sniffed for OpenAI batch records.
EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
}
_SNIFF_LINES = 1000   # blank lines looked through before giving up (then: plain JSONL)


def sniff_jsonl(first_line: bytes | None) -> str:
    """``openai`` when the first non-blank line is an OpenAI batch request, else ``jsonl``."""
    if not first_line:
        return "jsonl"
    first_line = first_line.removeprefix(_BOM)
    try:
        obj = json.loads(first_line)
    except ValueError:
        return "jsonl"
    return "openai" if looks_like_openai(obj) else "jsonl"


def _first_nonblank(readline) -> tuple:
    """-> (consumed lines, the first non-blank line or None)."""
    seen = []
    for _ in range(_SNIFF_LINES):
        raw = readline()
        if not raw:
            return seen, None
        seen.append(raw)
        if raw.strip():
            return seen, raw
    return seen, None


class _Prefixed:
    """A binary stream whose first lines were already read (stdin after sniffing)."""

    def __init__(self, lines: list, f):
        self._lines = lines
        self._f = f

    def readline(self, *a):
        if self._lines:
            return self._lines.pop(0)
        return self._f.readline(*a)


def detect_format(path: str | os.PathLike[str]) -> str:
    """The input format of a path: a directory is ``text``, ``.h5``/``.hdf5`` is ``hdf5``,
    ``.jsonl``/``.json``/``.ndjson`` is ``openai`` when its first non-blank line is an
    OpenAI batch request (``custom_id`` with ``body`` or ``url``) else ``jsonl``.
    ``-`` (stdin) is ``jsonl`` here; ``open_input`` sniffs stdin itself.  Raises ValueError.
    """
    path = os.fspath(path)
    if path == "-":
        return "jsonl"
    if os.path.isdir(path):
        return "text"
    ext = os.path.splitext(path)[1].lower()
    fmt = EXTENSIONS.get(ext)
    if fmt is None:
        raise ValueError(
            f"cannot read {path!r}: input extension {ext or '(none)'!r} is not supported "
            f"(supported: {', '.join(sorted(EXTENSIONS))}, or a directory of .txt/.md files); "
            f"pass the format explicitly (jsonl, openai, hdf5, text) if the file is one of them "
            f"under another name")
    if fmt == "jsonl" and os.path.isfile(path):
        with open(path, "rb") as f:
            fmt = sniff_jsonl(_first_nonblank(f.readline)[1])
    return fmt


def open_input(path: str | os.PathLike[str], fmt: str | None = None,
               defaults: SamplingParams = SamplingParams(), start_index: int = 0, *,
               skip: int = 0, **options) -> Iterator[Item]:
    """Open an input and return its lazy item iterator.

    ``fmt``: ``jsonl``, ``openai``, ``hdf5``, ``text`` or None (``detect_format``;
    for ``-`` the first non-blank stdin line is sniffed).  ``skip``: see the
    module docstring (first yielded index is ``start_index + skip`` when the
    input is long enough).  ``options``: ``prompt_template``, ``recursive``
    (text), ``dataset``, ``ids_dataset``, ``chunk_rows`` (hdf5); options of
    other formats are ignored (so one set can be passed for every input), a
    name no format knows raises TypeError.  The input is opened (and checked)
    here, so a missing file raises now, not on first ``next``.
    """
    unknown = set(options) - _ALL_OPTIONS
    if unknown:
        raise TypeError(f"open_input got unknown option(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_ALL_OPTIONS))}")
    source = path
    if fmt is None and not isinstance(path, (str, os.PathLike)):
        fmt = "jsonl"
    if fmt is None and os.fspath(path) == "-":
        f, _ = _open_binary("-")
        seen, first = _first_nonblank(f.readline)
        fmt = sniff_jsonl(first)
        source = _Prefixed(seen, f)
    fmt = detect_format(path) if fmt is None else fmt.lower()
    reader = READERS.get(fmt)
    if reader is None:
        raise ValueError(f"input format {fmt!r} is not supported (supported: {', '.join(sorted(READERS))})")
    kw = {k: v for k, v in options.items() if k in OPTIONS[fmt] and v is not None}
    return reader(source, defaults, start_index, skip=skip, **kw)
