"""One model step's packed input: the tokens of several sequences, no padding.

``StepBatch`` is what every rank of a replica needs to run ``forward`` (the leader
builds it, followers receive its arrays).  Tokens of all sequences are packed in
one ``(T,)`` array; sequence ``i`` owns rows ``q_start[i] : q_start[i] + q_len[i]``
and its KV cache lives at pool rows ``kv_base[i] : kv_base[i] + kv_len[i]``
(``kv_len`` counts the tokens cached after this step, these included).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StepBatch:
    input_ids: torch.Tensor      # (T,) int64
    positions: torch.Tensor      # (T,) int64, absolute positions in each sequence
    q_start: list                # per sequence
    q_len: list
    kv_base: list
    kv_len: list
    logits_rows: torch.Tensor    # (S,) rows of the packed tokens whose logits are wanted

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def write_index(self) -> torch.Tensor:
        """Pool row of every packed token (where its K/V are written)."""
        idx = np.empty(self.num_tokens, dtype=np.int64)
        for qs, ql, base, kl in zip(self.q_start, self.q_len, self.kv_base, self.kv_len):
            idx[qs:qs + ql] = np.arange(base + kl - ql, base + kl)
        return torch.from_numpy(idx)

    def to_arrays(self) -> dict:
        """Plain numpy arrays, for broadcasting the plan to the other ranks of a replica."""
        return {
            "input_ids": self.input_ids.numpy(), "positions": self.positions.numpy(),
            "seq": np.array([self.q_start, self.q_len, self.kv_base, self.kv_len], dtype=np.int64).reshape(4, -1),
            "logits_rows": self.logits_rows.numpy(),
        }

    @staticmethod
    def from_arrays(a: dict) -> "StepBatch":
        seq = a["seq"]
        return StepBatch(torch.from_numpy(a["input_ids"]), torch.from_numpy(a["positions"]),
                         seq[0].tolist(), seq[1].tolist(), seq[2].tolist(), seq[3].tolist(),
                         torch.from_numpy(a["logits_rows"]))
