"""A directory of ``.txt`` / ``.md`` documents -> one request per file.

Owns the text-directory input.  Files are taken in sorted name order (byte
order of the names, per directory; with ``recursive=True`` a sub-directory's
files come where its name sorts), so the order, and therefore resuming, is
deterministic.  Names starting with ``.`` are skipped, as are files with other
extensions.  The id of a record is its path relative to the directory, with
``/`` separators.

The prompt is the file's text (UTF-8, a leading BOM dropped), optionally
wrapped by ``prompt_template``: every ``{document}`` is replaced by the text
and every ``{filename}`` by the relative path (plain replacement, so other
braces in the template are kept as written).  A file that is not valid UTF-8
becomes an ``invalid_encoding`` error record, an empty (or whitespace-only)
file an ``invalid_request`` one, and an unreadable file an ``invalid_request``
one naming the OS error.  Files are read one at a time, only when their item
is requested; ``skip`` passes over files without reading them.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator

from ..config import SamplingParams
from ..messages import ErrorInfo, Request, Result
from .records import INVALID_ENCODING, INVALID_REQUEST

TEXT_EXTENSIONS = (".txt", ".md")
_FIELDS = re.compile(r"\{(document|filename)\}")  # one pass: a document containing "{filename}" stays as is


def _walk(root: str, rel: str, recursive: bool) -> Iterator[str]:
    """Relative paths of the text files under ``root/rel``, in sorted order, lazily per directory."""
    d = os.path.join(root, rel) if rel else root
    with os.scandir(d) as it:
        entries = sorted((e.name, e.is_dir()) for e in it if not e.name.startswith("."))
    for name, is_dir in entries:
        r = f"{rel}/{name}" if rel else name
        if is_dir:
            if recursive:
                yield from _walk(root, r, recursive)
        elif os.path.splitext(name)[1].lower() in TEXT_EXTENSIONS:
            yield r


def iter_textdir(path, defaults: SamplingParams = SamplingParams(), start_index: int = 0, *,
                 skip: int = 0, prompt_template: str | None = None,
                 recursive: bool = False) -> Iterator:
    """Stream one item per text file of directory ``path`` (see the module docstring)."""
    defaults.validate()
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"text input {root!r} is not a directory")
    if prompt_template is not None and "{document}" not in prompt_template:
        raise ValueError("prompt_template must contain {document} (where the file's text goes)")
    return _items(root, defaults, start_index, skip, prompt_template, recursive)


def _items(root, defaults, index, skip, template, recursive):
    for rel in _walk(root, "", recursive):
        if skip:
            skip -= 1
            index += 1
            continue
        yield _one(root, rel, index, defaults, template)
        index += 1


def _one(root: str, rel: str, index: int, defaults: SamplingParams, template: str | None):
    try:
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            data = f.read()
    except OSError as e:
        return Result(index=index, id=rel,
                      error=ErrorInfo(INVALID_REQUEST, f"cannot read {rel}: {e.strerror or e}"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return Result(index=index, id=rel, error=ErrorInfo(
            INVALID_ENCODING, f"{rel} is not valid UTF-8: {e.reason} at byte {e.start + 1} "
                              f"(0x{data[e.start]:02x})"))
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return Result(index=index, id=rel, error=ErrorInfo(INVALID_REQUEST, f"{rel} is empty"))
    prompt = text if template is None else \
        _FIELDS.sub(lambda m: text if m.group(1) == "document" else rel, template)
    return Request(index=index, id=rel, sampling=defaults, prompt=prompt)
