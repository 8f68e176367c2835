"""One model step's packed input: the tokens of several sequences, no padding.

``StepBatch`` is what every rank of a replica needs to run ``forward`` (the leader
builds it, followers receive its arrays).  Tokens of all sequences are packed in
one ``(T,)`` array; sequence ``i`` owns rows ``q_start[i] : q_start[i] + q_len[i]``
and its KV cache lives at pool rows ``kv_base[i] : kv_base[i] + kv_len[i]``
(``kv_len`` counts the tokens cached on this rank after this step, these included), or, when
``kv_ext`` is given and its entry has several runs, in the runs ``kv_ext[i] = [(start, rows), ...]``
in token order (paged blocks: a shared prefix, a sequence that grew into blocks elsewhere).

Context parallelism (cp > 1) gives each CP rank its own batch.  ``mode[i]``:
``MODE_LOCAL`` = an ordinary sequence (on one CP rank, its home: the engine spreads them),
``MODE_CP_PREFILL`` = prefill of a CP sequence (each rank holds its load-balanced shard of the
prompt; ring attention), ``MODE_CP_DECODE`` = decode of a CP sequence (every rank holds the new
token; only the owner of its position, ``position % cp``, writes its K/V; partial attentions are
merged across ranks).  The cache rows of a CP sequence on rank r are at the positions
``parallel.shard.cp_local_positions(prompt_len, glen, cp, r, units)``, so every rank derives them from
``prompt_len``, the sequence's global length ``glen`` and its layout ``units`` (the groups it shares with an earlier
prompt through the prefix cache, then its own).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..parallel.shard import cp_local_positions

# how a sequence of the batch is attended (``StepBatch.mode``)
MODE_LOCAL = 0        # an ordinary sequence, whole on one CP rank
MODE_CP_PREFILL = 1   # a CP prompt: each rank holds its load-balanced shard (ring attention)
MODE_CP_DECODE = 2    # a CP sequence's new token, on every CP rank (partials merged across them)


@dataclass
class StepBatch:
    input_ids: torch.Tensor      # (T,) int64
    positions: torch.Tensor      # (T,) int64, absolute positions in each sequence
    q_start: list                # per sequence
    q_len: list
    kv_base: list
    kv_len: list
    logits_rows: torch.Tensor    # (S,) rows of the packed tokens whose logits are wanted
    # context parallelism (empty lists / defaults when cp == 1)
    mode: list = field(default_factory=list)
    prompt_len: list = field(default_factory=list)
    glen: list = field(default_factory=list)
    write: list = field(default_factory=list)
    cp: int = 1
    cp_rank: int = 0
    scratch_row: int = -1
    gather_logits: int = 0       # cp > 1: every CP rank's logits rows go to the leader after the step
    kv_ext: list | None = None   # per sequence: its cache rows as runs [(start, rows)]; None: all one run
    # rows whose final hidden states (after the last norm) are kept for embeddings; with ``gather_hidden`` (cp > 1)
    # every CP rank's go to the leader after the step, in CP rank order
    hidden_rows: torch.Tensor | None = None
    gather_hidden: int = 0
    # CP sequences: the unit of each group of its layout (``parallel.shard.cp_groups``; None: the default for
    # its prompt length)
    units: list | None = None
    _kv_pos: dict = field(default_factory=dict, repr=False, compare=False)   # kv_positions, once per step

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def seq_mode(self, i: int) -> int:
        return self.mode[i] if self.mode else MODE_LOCAL

    def extents(self, i: int) -> list:
        """Sequence i's cache rows as runs of consecutive pool rows, in token order."""
        return self.kv_ext[i] if self.kv_ext is not None else [(self.kv_base[i], self.kv_len[i])]

    def contiguous(self, i: int) -> bool:
        return self.kv_ext is None or len(self.kv_ext[i]) == 1

    def rows(self, i: int) -> np.ndarray:
        """Pool row of each of sequence i's cached tokens, in token order."""
        return np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in self.extents(i)])

    @property
    def write_index(self) -> torch.Tensor:
        """Pool row of every packed token (where its K/V are written; a scratch row when not written)."""
        idx = np.empty(self.num_tokens, dtype=np.int64)
        for i, (qs, ql, base, kl) in enumerate(zip(self.q_start, self.q_len, self.kv_base, self.kv_len)):
            if self.write and not self.write[i]:
                idx[qs:qs + ql] = self.scratch_row
            elif self.contiguous(i):
                idx[qs:qs + ql] = np.arange(base + kl - ql, base + kl)
            else:
                idx[qs:qs + ql] = self.rows(i)[kl - ql:kl]
        return torch.from_numpy(idx)

    def kv_positions(self, i: int) -> torch.Tensor:
        """Global positions of sequence i's cache rows on this rank (CP sequences); computed once per step (every
        layer asks: ~0.3 ms for a 100K-token document), not to be modified."""
        pos = self._kv_pos.get(i)
        if pos is None:
            pos = self._kv_pos[i] = torch.from_numpy(cp_local_positions(
                self.prompt_len[i], self.glen[i], self.cp, self.cp_rank, self.units[i] if self.units else None))
        return pos

    def to_arrays(self) -> dict:
        """Plain numpy arrays, for sending the plan to the other ranks of a replica."""
        return {
            "input_ids": self.input_ids.numpy(), "positions": self.positions.numpy(),
            "seq": np.array([self.q_start, self.q_len, self.kv_base, self.kv_len], dtype=np.int64).reshape(4, -1),
            "logits_rows": self.logits_rows.numpy(),
            "cp": np.array([self.mode, self.prompt_len, self.glen, self.write], dtype=np.int64).reshape(4, -1)
            if self.mode else None,
            "cp_meta": (self.cp, self.cp_rank, self.scratch_row, self.gather_logits, self.gather_hidden),
            "hidden_rows": None if self.hidden_rows is None else self.hidden_rows.numpy(),
            "units": None if not self.units else (
                np.array([-1 if u is None else len(u) for u in self.units], dtype=np.int64),
                np.array([x for u in self.units if u for x in u], dtype=np.int64)),
            "ext": None if self.kv_ext is None else (
                np.array([len(e) for e in self.kv_ext], dtype=np.int64),
                np.array([x for e in self.kv_ext for run in e for x in run], dtype=np.int64)),
        }

    @staticmethod
    def from_arrays(a: dict) -> StepBatch:
        seq = a["seq"]
        b = StepBatch(torch.from_numpy(a["input_ids"]), torch.from_numpy(a["positions"]),
                      seq[0].tolist(), seq[1].tolist(), seq[2].tolist(), seq[3].tolist(),
                      torch.from_numpy(a["logits_rows"]))
        if a.get("cp") is not None:
            c = a["cp"]
            b.mode, b.prompt_len, b.glen, b.write = c[0].tolist(), c[1].tolist(), c[2].tolist(), c[3].tolist()
        b.cp, b.cp_rank, b.scratch_row, b.gather_logits, b.gather_hidden = a.get("cp_meta", (1, 0, -1, 0, 0))
        if a.get("hidden_rows") is not None:
            b.hidden_rows = torch.from_numpy(a["hidden_rows"])
        if a.get("units") is not None:
            counts, flat = a["units"]
            b.units, at = [], 0
            for c in counts.tolist():
                b.units.append(None if c < 0 else flat[at:at + c].tolist())
                at += max(c, 0)
        if a.get("ext") is not None:
            counts, flat = a["ext"]
            runs = flat.reshape(-1, 2).tolist()
            b.kv_ext, at = [], 0
            for c in counts.tolist():
                b.kv_ext.append([tuple(r) for r in runs[at:at + c]])
                at += c
        return b
