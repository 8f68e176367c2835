"""HDF5 input (pre-tokenized prompts) and output (results as datasets).

Owns: ``iter_hdf5`` (stream rows of a variable-length token-id dataset in
chunks), ``Hdf5Writer`` (append results as rows of resizable datasets, readable
by SWMR readers up to the last flush) and ``recover_hdf5`` (make an existing
output resumable).  ``h5py`` is imported lazily, so JSONL-only jobs never need it.

Input: dataset ``input_ids`` (``dataset=``) of ``vlen`` int arrays (or a 2-D
int array, one row per prompt); optional ``ids`` (``ids_dataset=``) of strings
or ints, at least as long (``ids_dataset=""`` ignores it).  Without ids a
record's id is its 0-based row.  An empty row or a negative token id becomes
an error record; a missing or mis-typed dataset raises ``ValueError`` when the
input is opened.

Output datasets, all 1-D, chunked, ``maxshape=(None,)``, one row per result in
input order: ``ids``, ``text``, ``finish_reason``, ``error_type``,
``error_message`` (vlen str; ``""`` where not applicable), ``token_ids`` (vlen
int32), ``logprobs`` (vlen float32; empty when not requested), ``embedding``
(vlen float32: an embedding record's vector, empty for the others),
``prompt_logprobs`` (vlen float32: prompt scoring, NaN for the first token, empty
when not requested), ``prompt_logprob_sum``, ``prompt_perplexity`` (float64, NaN
when not requested or undefined),
``prompt_tokens``, ``completion_tokens`` (int32).  Ids are stored as strings
(an int id ``7`` reads back as ``"7"``).  The file is created complete under a
temporary name and renamed, then reopened in SWMR-write mode
(``libver="latest"``); rows are buffered and appended, then ``file.flush()``ed,
every ``flush_every_records`` records / ``flush_every_seconds`` seconds.  A
reader opening the file with ``h5py.File(path, "r", swmr=True)`` sees every row
up to the last flush (call ``dataset.refresh()`` to see later flushes).

Recovery: complete rows = the minimum length over the datasets (a crash can
land between two datasets' appends).  A cleanly closed file is truncated in
place (``resize``).  A file whose SWMR writer died keeps HDF5's "open for write"
superblock flag, which HDF5 refuses to open for writing without ``h5clear``; such
a file is opened with a SWMR reader, its complete rows are copied in chunks into
a new file, and that file is renamed over it (costs one pass over the output;
only after a crash).  Do not run recovery while a writer is still alive.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np

from ..config import SamplingParams
from ..messages import ErrorInfo, Request, Result, prompt_scores
from .records import INVALID_REQUEST


def _no_nul(s: str) -> str:
    """HDF5 variable-length strings cannot hold NUL: it is stored as U+FFFD (token_ids stay exact)."""
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


STR_FIELDS = ("ids", "text", "finish_reason", "error_type", "error_message")
INT_FIELDS = ("prompt_tokens", "completion_tokens")
OUTPUT_DATASETS = ("ids", "token_ids", "logprobs", "finish_reason", "prompt_tokens",
                   "completion_tokens", "error_type", "error_message", "text", "embedding", "prompt_logprobs",
                   "prompt_logprob_sum", "prompt_perplexity")
FLOAT_ARRAYS = ("logprobs", "embedding", "prompt_logprobs")
FLOAT_FIELDS = ("prompt_logprob_sum", "prompt_perplexity")      # float64, NaN where not applicable
# datasets added after the first format: an older output gets them (empty / NaN rows) when it is resumed
ADDED_DATASETS = ("embedding", "prompt_logprobs", "prompt_logprob_sum", "prompt_perplexity")
_CHUNK_ROWS = 1024


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover
        raise ImportError("HDF5 input/output needs h5py: pip install h5py") from e
    return h5py


def _dtypes(h5py) -> dict:
    s = h5py.string_dtype("utf-8")
    d = {k: s for k in STR_FIELDS}
    d.update({k: np.dtype(np.int32) for k in INT_FIELDS})
    d["token_ids"] = h5py.vlen_dtype(np.dtype(np.int32))
    for k in FLOAT_ARRAYS:
        d[k] = h5py.vlen_dtype(np.dtype(np.float32))
    for k in FLOAT_FIELDS:
        d[k] = np.dtype(np.float64)
    return d


# ----------------------------------------------------------------- input

def iter_hdf5(path, defaults: SamplingParams = SamplingParams(), start_index: int = 0, *,
              skip: int = 0, dataset: str = "input_ids", ids_dataset: str | None = "ids",
              chunk_rows: int = _CHUNK_ROWS) -> Iterator:
    """Stream one item per row of ``dataset``; rows are read ``chunk_rows`` at a time.

    ``skip`` rows are passed over without reading them (their indices still
    count).  The file is opened and checked when this is called.
    """
    defaults.validate()
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    h5py = _h5py()
    path = os.fspath(path)
    f = h5py.File(path, "r")
    try:
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            names = sorted(k for k in f if isinstance(f[k], h5py.Dataset))
            raise ValueError(f"{path}: no dataset {dataset!r} (datasets: {', '.join(names) or 'none'}); "
                             f"pass the token dataset's name")
        ds = f[dataset]
        base = h5py.check_vlen_dtype(ds.dtype)
        if base is not None:
            ok = ds.ndim == 1 and base.kind in "iu"
        else:
            ok = ds.ndim == 2 and ds.dtype.kind in "iu"
        if not ok:
            raise ValueError(f"{path}:{dataset} must be a 1-D dataset of variable-length integer arrays "
                             f"(h5py.vlen_dtype(np.int32)) or a 2-D integer array; got shape "
                             f"{ds.shape} dtype {base if base is not None else ds.dtype}")
        ids = None
        if ids_dataset and ids_dataset in f:
            ids = f[ids_dataset]
            if ids.ndim != 1 or ids.shape[0] < ds.shape[0]:
                raise ValueError(f"{path}:{ids_dataset} must be 1-D with at least {ds.shape[0]} rows "
                                 f"(one id per {dataset} row); got shape {ids.shape}")
            if h5py.check_string_dtype(ids.dtype) is None and ids.dtype.kind not in "iu":
                raise ValueError(f"{path}:{ids_dataset} must hold strings or integers, got {ids.dtype}")
    except BaseException:
        f.close()
        raise
    return _hdf5_items(f, ds, ids, start_index, skip, defaults, max(1, chunk_rows))


def _id_value(v, row: int):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, str):
        return v
    return row


def _hdf5_items(f, ds, ids, start_index, skip, defaults, chunk_rows):
    try:
        n = ds.shape[0]
        row = skip
        while row < n:
            hi = min(n, row + chunk_rows)
            toks = ds[row:hi]
            idv = ids[row:hi] if ids is not None else None
            for k in range(hi - row):
                r = row + k
                index = start_index + r
                rid = _id_value(idv[k], r) if idv is not None else r
                arr = np.asarray(toks[k])
                if arr.size == 0:
                    yield Result(index=index, id=rid, error=ErrorInfo(
                        INVALID_REQUEST, f"row {r} of the token dataset is empty"))
                    continue
                if arr.dtype.kind == "i" and int(arr.min()) < 0:
                    yield Result(index=index, id=rid, error=ErrorInfo(
                        INVALID_REQUEST, f"row {r} has a negative token id ({int(arr.min())})"))
                    continue
                yield Request(index=index, id=rid, sampling=defaults, prompt_token_ids=arr.tolist())
            row = hi
    finally:
        f.close()


# ----------------------------------------------------------------- output

def _put(d, start: int, values) -> None:
    """``d[start:start + len(values)] = values``, also for vlen int/float datasets.

    h5py's ``__setitem__`` converts vlen blocks with ``numpy.asarray``, which
    fails when every row has the same length (e.g. all empty); ``write_direct``
    from an object array of the dataset's own dtype skips that conversion.
    """
    base = _h5py().check_vlen_dtype(d.dtype)
    if base is None or base in (str, bytes):
        d[start:start + len(values)] = values
        return
    a = np.empty(len(values), dtype=d.dtype)
    for i, x in enumerate(values):
        a[i] = np.asarray(x, dtype=base)
    d.write_direct(a, dest_sel=np.s_[start:start + len(values)])


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_dataset(f, name: str, dt, rows: int) -> None:
    f.create_dataset(name, shape=(rows,), maxshape=(None,), chunks=(_CHUNK_ROWS,), dtype=dt,
                     **({"fillvalue": np.nan} if name in FLOAT_FIELDS else {}))


def _create_file(path: str) -> None:
    """Create an empty output (all datasets, zero rows) atomically: temp file, fsync, rename."""
    h5py = _h5py()
    tmp = path + ".tmp"
    with h5py.File(tmp, "w", libver="latest") as f:
        for name, dt in _dtypes(h5py).items():
            _new_dataset(f, name, dt, 0)
        f.attrs["format"] = "mpiinfer-results-1"
    _fsync_path(tmp)
    os.replace(tmp, path)
    try:
        _fsync_path(os.path.dirname(os.path.abspath(path)))
    except OSError:
        pass


class Hdf5Writer:
    """Append results to an HDF5 output as rows (see the module docstring).

    An existing file must have been made resumable by ``recover_hdf5`` first
    (its datasets must all have the same length).
    """

    def __init__(self, path, flush_every_records: int = 100, flush_every_seconds: float = 5.0):
        if flush_every_records < 1:
            raise ValueError(f"flush_every_records must be >= 1, got {flush_every_records}")
        if not flush_every_seconds > 0:
            raise ValueError(f"flush_every_seconds must be > 0, got {flush_every_seconds}")
        h5py = _h5py()
        self.path = os.fspath(path)
        if self.path == "-":
            raise ValueError("HDF5 output cannot go to stdout ('-')")
        self.flush_every_records = flush_every_records
        self.flush_every_seconds = flush_every_seconds
        if not os.path.exists(self.path):
            _create_file(self.path)
        self._f = h5py.File(self.path, "r+", libver="latest")
        try:
            missing = [k for k in OUTPUT_DATASETS if k not in self._f]
            if missing:
                raise ValueError(f"{self.path} is not an mpiinfer HDF5 output (missing datasets "
                                 f"{', '.join(missing)})")
            self._ds = {k: self._f[k] for k in OUTPUT_DATASETS}
            lengths = {d.shape[0] for d in self._ds.values()}
            if len(lengths) != 1:
                raise ValueError(f"{self.path}: datasets have different lengths {sorted(lengths)}; "
                                 f"run recover_hdf5 on it before appending")
            self._f.swmr_mode = True
        except BaseException:
            self._f.close()
            raise
        self.rows = lengths.pop()         # rows on disk
        self._buf: list = []
        self.records_written = 0
        self.closed = False
        self.flushes = 0
        self._last_flush = time.monotonic()

    def write(self, result: Result) -> None:
        if self.closed:
            raise ValueError(f"write to closed Hdf5Writer({self.path!r})")
        self._buf.append(result)
        self.records_written += 1
        if (len(self._buf) >= self.flush_every_records
                or time.monotonic() - self._last_flush >= self.flush_every_seconds):
            self.flush()

    def write_kept(self, result: Result) -> None:
        """A record of an earlier output, read back as a Result (``--retry-errors`` keeps good records)."""
        self.write(result)

    def _columns(self, rs: list) -> dict:
        cols = {k: [] for k in OUTPUT_DATASETS}
        for r in rs:
            err = r.error
            cols["ids"].append(_no_nul(str(r.id)))
            cols["text"].append(_no_nul(r.text) if err is None else "")
            cols["finish_reason"].append((r.finish_reason or "") if err is None else "")
            cols["error_type"].append(err.type if err is not None else "")
            cols["error_message"].append(_no_nul(err.message) if err is not None else "")
            cols["token_ids"].append(np.asarray(r.token_ids if err is None else [], dtype=np.int32))
            cols["logprobs"].append(np.asarray(r.logprobs if (err is None and r.logprobs) else [],
                                               dtype=np.float32))
            cols["embedding"].append(np.asarray(r.embeddings[0] if (err is None and r.embeddings) else [],
                                                dtype=np.float32))
            pl = r.prompt_logprobs if err is None else None
            cols["prompt_logprobs"].append(np.asarray([] if pl is None else [np.nan if v is None else v for v in pl],
                                                      dtype=np.float32))
            sc = prompt_scores(pl) if pl is not None else {}
            cols["prompt_logprob_sum"].append(sc.get("prompt_logprob_sum", np.nan))
            perp = sc.get("prompt_perplexity")
            cols["prompt_perplexity"].append(np.nan if perp is None else perp)
            cols["prompt_tokens"].append(r.prompt_tokens if err is None else 0)
            cols["completion_tokens"].append(len(r.token_ids) if err is None else 0)
        out = {}
        for k, v in cols.items():
            if k in ("token_ids",) + FLOAT_ARRAYS:
                out[k] = v                  # a list of arrays; _put makes the vlen block
            elif k in INT_FIELDS:
                out[k] = np.asarray(v, dtype=np.int32)
            elif k in FLOAT_FIELDS:
                out[k] = np.asarray(v, dtype=np.float64)
            else:
                out[k] = np.array([s.encode("utf-8", "surrogatepass") for s in v], dtype=object)
        return out

    def flush(self) -> None:
        """Append buffered rows to every dataset, then ``file.flush()`` (SWMR readers see them)."""
        if self.closed:
            return
        if self._buf:
            cols = self._columns(self._buf)
            n, k = self.rows, len(self._buf)
            for name in OUTPUT_DATASETS:
                d = self._ds[name]
                d.resize((n + k,))
                _put(d, n, cols[name])
            self.rows = n + k
            self._buf.clear()
        self._f.flush()
        self._last_flush = time.monotonic()
        self.flushes += 1

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            self.closed = True
            self._f.close()

    def __enter__(self) -> Hdf5Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rebuild(path: str, count: int) -> None:
    """Copy the first ``count`` rows of a crashed SWMR output into a fresh file and rename it over."""
    h5py = _h5py()
    tmp = path + ".tmp"
    _create_file(tmp)   # creates tmp atomically (tmp + ".tmp" -> tmp)
    with h5py.File(path, "r", swmr=True, libver="latest") as src, \
            h5py.File(tmp, "r+", libver="latest") as dst:
        for name in OUTPUT_DATASETS:
            d = dst[name]
            d.resize((count,))                  # (a dataset added since the file was made stays empty / NaN)
            if name not in src:
                continue
            s = src[name]
            for a in range(0, count, 8 * _CHUNK_ROWS):
                b = min(count, a + 8 * _CHUNK_ROWS)
                _put(d, a, s[a:b])
    _fsync_path(tmp)
    os.replace(tmp, path)
    try:
        _fsync_path(os.path.dirname(os.path.abspath(path)))
    except OSError:
        pass


def recover_hdf5(path) -> int:
    """Make an existing HDF5 output resumable -> number of complete rows (0 when missing)."""
    h5py = _h5py()
    path = os.fspath(path)
    for leftover in (path + ".tmp", path + ".tmp.tmp"):
        if os.path.exists(leftover):
            os.remove(leftover)
    if not os.path.exists(path):
        return 0
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path} exists but is not an HDF5 file; pass --overwrite to replace it")
    try:
        f = h5py.File(path, "r+", libver="latest")
    except OSError as e:
        if "already open for write" not in str(e):
            raise
        f = None   # a crashed SWMR writer left the write flag set
    if f is not None:
        with f:
            have = [k for k in OUTPUT_DATASETS if k in f and k not in ADDED_DATASETS]
            if len(have) == len(OUTPUT_DATASETS) - len(ADDED_DATASETS):   # an older output: add the new ones
                n = min(f[k].shape[0] for k in have)
                dts = _dtypes(h5py)
                for k in ADDED_DATASETS:
                    if k not in f:
                        _new_dataset(f, k, dts[k], n)
            missing = [k for k in OUTPUT_DATASETS if k not in f]
            if missing:
                raise ValueError(f"{path} is not an mpiinfer HDF5 output (missing datasets "
                                 f"{', '.join(missing)}); pass --overwrite to replace it")
            count = min(f[k].shape[0] for k in OUTPUT_DATASETS)
            for k in OUTPUT_DATASETS:
                if f[k].shape[0] != count:
                    f[k].resize((count,))
        return count
    with h5py.File(path, "r", swmr=True, libver="latest") as f:
        missing = [k for k in OUTPUT_DATASETS if k not in f and k not in ADDED_DATASETS]
        if missing:
            raise ValueError(f"{path} is not an mpiinfer HDF5 output (missing datasets "
                             f"{', '.join(missing)}); pass --overwrite to replace it")
        count = min(f[k].shape[0] for k in OUTPUT_DATASETS if k in f)
    _rebuild(path, count)
    return count


def iter_hdf5_results(path, count: int | None = None, start_index: int = 0, chunk_rows: int = 4096):
    """The rows of an HDF5 output as Results, read ``chunk_rows`` at a time (the first ``count`` rows, or all
    complete ones)."""
    h5py = _h5py()
    dec = lambda b: b.decode("utf-8", "surrogatepass") if isinstance(b, bytes) else b
    with h5py.File(os.fspath(path), "r", swmr=True, libver="latest") as f:
        n = min(f[k].shape[0] for k in OUTPUT_DATASETS)
        n = n if count is None else min(n, count)
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            c = {k: f[k][lo:hi] for k in OUTPUT_DATASETS}
            for j in range(hi - lo):
                i = start_index + lo + j
                et = dec(c["error_type"][j])
                if et:
                    yield Result(index=i, id=dec(c["ids"][j]), error=ErrorInfo(et, dec(c["error_message"][j])))
                    continue
                lp, emb, pl = c["logprobs"][j], c["embedding"][j], c["prompt_logprobs"][j]
                yield Result(index=i, id=dec(c["ids"][j]), text=dec(c["text"][j]),
                             token_ids=c["token_ids"][j].tolist(), finish_reason=dec(c["finish_reason"][j]) or None,
                             prompt_tokens=int(c["prompt_tokens"][j]), logprobs=lp.tolist() if len(lp) else None,
                             embeddings=[emb.tolist()] if len(emb) else None,
                             prompt_logprobs=[None if np.isnan(v) else v for v in pl.tolist()] if len(pl) else None)


def read_hdf5_results(path, start_index: int = 0) -> list:
    """Read an HDF5 output back into Results (tests and tools; the whole file)."""
    return list(iter_hdf5_results(path, start_index=start_index))
