"""Input files -> a lazy stream of ``Request`` / error ``Result`` items.

Owns opening inputs (paths, ``-`` for stdin, binary streams), choosing the
reader by format (``open_input``), streaming JSONL line by line without loading
the file (``iter_jsonl``) and cheap line counts for progress (``count_lines``).
Record validation lives in ``records``.

Indexing: items get consecutive ``index`` values from ``start_index``; blank
(whitespace-only) lines are skipped and do not consume an index; every other
line yields exactly one item (a Request, or a Result carrying an error).
"""
from __future__ import annotations

import io
import os
import sys
from typing import BinaryIO, Callable, Dict, Iterator, Optional, Union

from ..config import SamplingParams
from ..messages import Request, Result
from .records import parse_record

Item = Union[Request, Result]
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
    return _jsonl_items(f, owned, defaults, start_index, skip)


def _jsonl_items(f, owned: bool, defaults: SamplingParams, index: int, skip: int) -> Iterator[Item]:
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
            yield parse_record(raw, line_no, index, defaults)
            index += 1
    finally:
        if owned:
            f.close()


def count_lines(path: Union[str, "os.PathLike[str]"]) -> Optional[int]:
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


# Format name -> reader(path_or_stream, defaults, start_index, **kw).
READERS: Dict[str, Callable[..., Iterator[Item]]] = {
    "jsonl": iter_jsonl,
}
# File extension (lower case) -> format name.
EXTENSIONS: Dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}


def detect_format(path: Union[str, "os.PathLike[str]"]) -> str:
    """The format name for a path by its extension (``-`` is JSONL). Raises ValueError."""
    path = os.fspath(path)
    if path == "-":
        return "jsonl"
    ext = os.path.splitext(path)[1].lower()
    fmt = EXTENSIONS.get(ext)
    if fmt is None:
        raise ValueError(
            f"cannot read {path!r}: input extension {ext or '(none)'!r} is not supported for now "
            f"(supported: {', '.join(sorted(EXTENSIONS))}); pass the format explicitly if the "
            f"file is JSONL under another name")
    return fmt


def open_input(path: Union[str, "os.PathLike[str]"], fmt: Optional[str] = None,
               defaults: SamplingParams = SamplingParams(), start_index: int = 0,
               **kw) -> Iterator[Item]:
    """Open an input by format (given, or from the extension) and return its item iterator."""
    fmt = detect_format(path) if fmt is None else fmt.lower()
    reader = READERS.get(fmt)
    if reader is None:
        raise ValueError(f"input format {fmt!r} is not supported for now (supported: {', '.join(sorted(READERS))})")
    return reader(path, defaults, start_index, **kw)
