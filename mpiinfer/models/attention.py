"""Attention of one layer over the KV cache, for every kind of sequence a step can hold.

Owns: ``Attention`` (q/k/v projection, q/k norms, RoPE, the cache write, output projection) and the
four ways a sequence is attended, chosen per sequence by ``AttentionPlan``:

* local: an ordinary sequence's prompt chunk or decode on the rank that holds its whole cache
  (``Attention._attend``: SDPA for prompts, a grouped-head matmul for one-token decodes);
* shared-prefix group: one-token decodes whose caches begin with the same blocks (a shared system prompt,
  document or n samples' prompt, from the prefix cache): the shared rows are read once for all of them in one
  batched matmul and each one's own rows after, partial softmaxes merged (``Attention._attend_shared``);
* decode group: the one-token decodes of many ordinary sequences at once, their cache rows gathered
  into one padded batch (``Attention._attend_decodes``; where it measured faster, see below);
* CP ring: a context-parallel prompt whose K/V blocks travel the ring of CP ranks
  (``parallel.ring.ring_attention`` with the step's ``RingPlan``);
* CP decode: a context-parallel sequence's new token against this rank's cache shard, partial
  results merged across the CP ranks (``decode_attention_partial`` + ``combine_across_ranks``:
  one ``Allgather`` over ``cp_comm`` per layer for all such sequences together).

``AttentionPlan.build`` decides the mode of each sequence once per forward step and builds the ring
plans there (a small ``Allgather`` / ``Allgatherv`` on ``cp_comm`` per CP prompt, in plain sight in
``CausalLM.forward``); every layer reuses it.  Communicators: ``mesh.cp_comm`` (ring, CP decode) and
``mesh.tp_reduce`` (the output projection's allreduce).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import native as native_kernels
from ..comm.mesh import Mesh
from ..config import ModelConfig
from ..parallel.linear import ColumnParallelLinear, Part, RowParallelLinear
from ..parallel.ring import (
    RingPlan,
    combine_across_ranks,
    decode_attention_partial,
    decode_plan,
    merge_partials,
    ring_attention,
)
from ..parallel.shard import Slice, kv_heads_for_rank, q_heads_for_rank
from .layers import RMSNorm, RopeTables, Rotary, norm
from .step import MODE_CP_DECODE, MODE_CP_PREFILL, MODE_LOCAL, StepBatch

# One-token decodes are attended together (``Attention._attend_decodes``) when there are at least
# DECODE_GROUP_MIN of them, except float32 on CPU.  Measured on the 2-core CI CPU (16 sequences, 32 query /
# 8 KV heads of 64): bfloat16 per-sequence loop 2.1 ms per layer at 144 cached tokens, together 0.65 ms
# (2.6 ms vs 1.1 ms at 250); float32 loop 0.92 ms, together 1.17 ms (1.4 vs 2.9 ms at 250): float32's
# small matmuls are cheap, and the gather of padded rows is not.  On GPUs the loop's launches dominate.
# The gather moves 2 x B x L x row_bytes, so the padded length L is capped at DECODE_GATHER_BYTES per sequence.
DECODE_GROUP_MIN = 4
DECODE_GATHER_BYTES = 1 << 20
# A prompt chunk goes to the CPU kernel (``native_items``: each query row reads every row before it) while the K
# and V its rows attend (all its cache, or a window's or chunk's worth: ``Span.rows_read``) take at most this many
# bytes; beyond, torch's attention (blocked matmuls) reads them fewer times.  Measured on a 2-core CPU with 32 MiB
# of L3, float32, 2 threads, torch's time over the kernel's: below the bound the kernel wins (SmolLM2-135M's 3 KV
# heads of 64: 70 x 100 rows 2.5x, 512 x 1,024 1.3x, 2,048 x 2,048 1.17x; 8 heads of 128: 2.3x, 1.6x, 1.15x);
# past it torch does (512-row chunks: 8 KV heads of 128, 8 KiB of K+V a row, 1.17x at 2,048 rows, 0.66x at
# 4,096; 3 heads of 64, 1.5 KiB, 1.03x at 16,384 rows, 0.62x at 32,768).
NATIVE_PREFILL_BYTES = 16 << 20


# The sinks' prompt path computes scores explicitly, this many at most at once (256 MiB of float32).
SINK_SCORE_ELEMS = 1 << 26

# A shared-prefix group needs at least this many common rows.  Measured on the 2-core CI CPU (float32, 3 KV heads
# of 64): 32 decodes sharing 1,488 rows 3.5 ms per layer against 4.9 ms one by one; 62 sharing 16 rows 4.9 ms
# against 4.4 ms (the per-sequence tails then cost more than the shared rows save).
SHARED_MIN_ROWS = 256


def _as(kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cache rows ``kv`` in the queries' dtype: themselves, or (a cache of another ``--kv-dtype``) converted.  The
    CP paths (``parallel.ring``) take any cache dtype and compute in float32 on their own."""
    return kv if kv.dtype == q.dtype else kv.to(q.dtype)


class Span(NamedTuple):
    """Which of its earlier positions a query attends, beyond causality: the last ``window`` (its own included;
    Mistral, Gemma 3's sliding layers), or those of its own ``chunk`` of positions (Llama 4's chunked layers:
    ``pos // chunk`` equal); neither: all.  A local sequence's cache rows are its positions 0..kv_len-1."""
    window: int | None = None
    chunk: int | None = None

    @staticmethod
    def of(span) -> Span:
        """``span`` as a Span: None (all), a window size, or a Span."""
        return span if isinstance(span, Span) else Span(window=span)

    @property
    def limited(self) -> bool:
        return self.window is not None or self.chunk is not None

    def first(self, pos):
        """The first position a query at ``pos`` attends (an int, or a tensor of them)."""
        if self.window is not None:
            return (pos - self.window + 1).clamp(min=0) if torch.is_tensor(pos) else max(0, pos - self.window + 1)
        if self.chunk is not None:
            return pos // self.chunk * self.chunk
        return pos * 0

    def rows_read(self, q_len: int, kv_len: int) -> int:
        """Most cache rows the last ``q_len`` queries of ``kv_len`` attend together (a window or chunk bounds them)."""
        if self.window is not None:
            return min(kv_len, self.window + q_len - 1)
        if self.chunk is not None:
            return min(kv_len, self.chunk + q_len - 1)
        return kv_len

    def whole(self, kv_len: int) -> bool:
        """A one-token decode at ``kv_len`` rows attends all of them."""
        return self.first(kv_len - 1) == 0

    def mask(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Which keys at ``kpos`` (1, K) queries at ``qpos`` (Q, 1) attend: causal, within the span. (Q, K) bool."""
        mask = kpos <= qpos
        if self.limited:
            mask &= kpos >= self.first(qpos)
        return mask


class SharedGroup(NamedTuple):
    """One-token decodes whose cache rows start with the same run ``start : start + length``: their sequence
    indices, packed rows (G,), and each one's remaining rows as runs [(start, rows)]."""
    seqs: list
    rows: torch.Tensor
    start: int
    length: int
    tails: list
    tails_native: native_kernels.DecodeRuns | None = None    # the tails for ``native.decode_attention``


def shared_groups(batch: StepBatch, span, taken=frozenset()) -> list:
    """Groups of at least two one-token decodes of ordinary sequences whose first cache run starts at the same
    row, sharing at least SHARED_MIN_ROWS rows (the shortest first run of the group)."""
    span = Span.of(span)
    by_start: dict = {}
    for i, (ql, kl) in enumerate(zip(batch.q_len, batch.kv_len)):
        if ql == 1 and i not in taken and batch.seq_mode(i) == MODE_LOCAL and span.whole(kl):
            ext = batch.extents(i)
            by_start.setdefault(ext[0][0], []).append((i, ext))
    groups = []
    for start, members in by_start.items():
        if len(members) < 2:
            continue
        n = min(ext[0][1] for _, ext in members)
        if n < SHARED_MIN_ROWS:
            continue
        tails = []
        for _, ext in members:
            first = ext[0][1] - n
            tails.append(([(start + n, first)] if first else []) + list(ext[1:]))
        groups.append(SharedGroup([i for i, _ in members], torch.tensor([batch.q_start[i] for i, _ in members]),
                                  start, n, tails))
    return groups


class DecodeGroup(NamedTuple):
    """One-token decodes attended together: their sequence indices, packed rows (B,), pool-row index (B, L)
    and padding mask (1, B, 1, L)."""
    seqs: set
    rows: torch.Tensor
    idx: torch.Tensor
    invalid: torch.Tensor


def decode_group(batch: StepBatch, span, row_bytes: int, taken=frozenset()) -> DecodeGroup | None:
    """The one-token decodes of ordinary sequences in ``batch`` (not in ``taken``) to attend together, or None
    when the per-sequence loop is cheaper (too few of them, or a gather of more than DECODE_GATHER_BYTES each).
    ``span``: the layers' ``Span`` (or window size, or None)."""
    span = Span.of(span)
    sel = [i for i, (ql, kl) in enumerate(zip(batch.q_len, batch.kv_len))
           if ql == 1 and i not in taken and batch.seq_mode(i) == MODE_LOCAL and span.whole(kl)]
    if len(sel) < DECODE_GROUP_MIN:
        return None
    kl = torch.tensor([batch.kv_len[i] for i in sel])
    L = int(kl.max())
    if 2 * L * row_bytes > DECODE_GATHER_BYTES:
        return None
    ar = torch.arange(L)
    if all(batch.contiguous(i) for i in sel):
        base = torch.tensor([batch.kv_base[i] for i in sel])
        idx = base[:, None] + torch.minimum(ar[None, :], kl[:, None] - 1)
    else:                                   # paged rows: each sequence's, padded with its last row
        idx = torch.empty(len(sel), L, dtype=torch.int64)
        for j, i in enumerate(sel):
            r = torch.from_numpy(batch.rows(i))
            idx[j, :len(r)] = r
            idx[j, len(r):] = r[-1]
    invalid = (ar[None, :] >= kl[:, None])[None, :, None, :]
    rows = torch.tensor([batch.q_start[i] for i in sel])
    return DecodeGroup(set(sel), rows, idx, invalid)


def native_items(batch: StepBatch, seqs: list, span: Span) -> native_kernels.DecodeRuns:
    """Every query row of the local sequences ``seqs`` as one item of ``native.decode_attention``: a decode's row
    over its cache runs, each prompt-chunk row over the runs of the rows up to its own position (the causal mask
    by construction), less what ``span`` leaves out.  Prompt chunks go to the kernel while they are small enough
    (``NATIVE_PREFILL_BYTES``, where the measurements are)."""
    q_rows, counts, last, runs = [], [], [], []          # decodes: ints and their runs; prompt rows: arrays
    p_rows, p_counts, p_last, p_runs = [], [], [], []
    for i in seqs:
        qs, ql, kl = batch.q_start[i], batch.q_len[i], batch.kv_len[i]
        ext = batch.extents(i)
        if ql == 1:
            q_rows.append(qs)
            counts.append(len(ext))
            last.append(kl - 1)
            runs += ext
            continue
        ext = np.asarray(ext, dtype=np.int64).reshape(-1, 2)
        upto = np.arange(kl - ql + 1, kl + 1)                        # rows each query attends: up to its own
        begins = np.cumsum(ext[:, 1]) - ext[:, 1]                    # each run's first row in token order
        used = upto[:, None] > begins[None, :]                       # (ql, runs): the runs each query reads
        lens = np.minimum(ext[None, :, 1], upto[:, None] - begins[None, :])
        p_rows.append(np.arange(qs, qs + ql))
        p_counts.append(used.sum(1))
        p_runs.append(np.stack((np.broadcast_to(ext[None, :, 0], lens.shape), lens), axis=-1)[used])
        p_last.append(upto - 1)

    def cat(ints, arrays, shape=(-1,)):                          # the decodes' then the prompt rows'
        return np.concatenate([np.asarray(ints, dtype=np.int64).reshape(shape), *arrays])
    pos = cat(last, p_last)
    skip = span.first(torch.from_numpy(pos)).numpy() if span.limited else None
    return native_kernels.DecodeRuns.from_arrays(cat(q_rows, p_rows), cat(counts, p_counts),
                                                 cat(runs, p_runs, (-1, 2)), skip)


@dataclass
class AttentionPlan:
    """How every sequence of one step is attended; the same for every layer of the step."""
    batch: StepBatch
    group: DecodeGroup | None = None              # decodes attended together
    shared: list = field(default_factory=list)       # SharedGroups: decodes that share their first cache rows
    local: list = field(default_factory=list)        # sequence indices attended one by one on this rank
    paged: dict = field(default_factory=dict)        # of those, the ones in several runs: index -> (runs, rows)
    decodes: list = field(default_factory=list)      # other one-token decodes: (packed row, [(start, rows)] if
                                                     # its cache is one run, else its rows' index tensor)
    ring: list = field(default_factory=list)         # (sequence index, RingPlan, its rows' index tensor when its
                                                     # cache is in several runs, else None) of CP prompts
    cp_decode: list = field(default_factory=list)    # CP decodes: (sequence index, its shard's longest run of
                                                     # pool rows (start, rows) and its DecodePlan, and for the
                                                     # other rows when it has several runs (their pool rows
                                                     # (tensor), their DecodePlan), else None)
    native: native_kernels.DecodeRuns | None = None  # CPU: the other local query rows, in one C kernel call
    use_native: bool = False                         # CPU kernels for RoPE + cache write and decodes

    @staticmethod
    def build(batch: StepBatch, cp_comm, span, row_bytes: int,
              group_decodes: bool, device=None, use_native: bool = False,
              cache_row_bytes: int | None = None) -> AttentionPlan:
        """Collective over ``cp_comm`` when the batch holds CP prompts (each one's ``RingPlan.build``).
        ``use_native``: the CPU kernels (``mpiinfer.native``) rotate and store K/V and attend every local query row
        (one-token decodes not in a shared-prefix group, and every row of a prompt chunk whose cache is at most
        NATIVE_PREFILL_BYTES: ``native_items``; sliding windows and chunks included), in place of the decode group
        and loop and of ``_attend`` per prompt.  ``cache_row_bytes``: the bytes of K and V one cached token takes
        in this layer (default 2 x ``row_bytes``).  ``span``: the ``Span`` of the layers this plan serves (or a
        window size, or None)."""
        span = Span.of(span)
        shared = shared_groups(batch, span) if batch.kv_ext is not None else []
        taken = frozenset(i for g in shared for i in g.seqs)
        if use_native:
            kv_row = cache_row_bytes if cache_row_bytes is not None else 2 * row_bytes
            local = [i for i in range(len(batch.q_len)) if batch.seq_mode(i) == MODE_LOCAL and
                     (batch.q_len[i] == 1 or span.rows_read(batch.q_len[i], batch.kv_len[i]) * kv_row <=
                      NATIVE_PREFILL_BYTES)]
            native = native_items(batch, [i for i in local if i not in taken], span)
            taken = taken | frozenset(local)
            group_decodes = False
        plan = AttentionPlan(batch, decode_group(batch, span, row_bytes, taken) if group_decodes else None,
                             shared=[g._replace(rows=g.rows.to(device)) if device is not None else g for g in shared])
        if use_native:
            plan.use_native = True
            plan.native = native
            plan.shared = [g._replace(tails_native=native_kernels.DecodeRuns(
                [batch.q_start[i] for i in g.seqs], g.tails, None)) for g in plan.shared]
        if plan.group is not None and device is not None:
            plan.group = DecodeGroup(plan.group.seqs, plan.group.rows.to(device), plan.group.idx.to(device),
                                     plan.group.invalid.to(device))
        grouped = (plan.group.seqs if plan.group is not None else frozenset()) | taken
        for i in range(len(batch.q_start)):
            mode = batch.seq_mode(i)
            if mode == MODE_LOCAL and i not in grouped and batch.q_len[i] == 1 and span.whole(batch.kv_len[i]):
                ext = batch.extents(i)
                # several runs: their rows, gathered once per layer (fewer torch calls than a matmul per run)
                plan.decodes.append((batch.q_start[i], ext if len(ext) == 1 else
                                     torch.from_numpy(batch.rows(i)).to(device)))
            elif mode == MODE_LOCAL and i not in grouped:
                plan.local.append(i)
                if not batch.contiguous(i):
                    plan.paged[i] = (batch.extents(i), torch.from_numpy(batch.rows(i)).to(device))
            elif mode == MODE_CP_PREFILL:
                qs, ql = batch.q_start[i], batch.q_len[i]
                plan.ring.append((i, RingPlan.build(batch.positions[qs:qs + ql], batch.kv_positions(i), cp_comm,
                                                    span.window, chunk=span.chunk),
                                  None if batch.contiguous(i) else torch.from_numpy(batch.rows(i)).to(device)))
            elif mode == MODE_CP_DECODE:
                # planned here once for every layer of the span (rectangles and masks from the positions)
                qs, ql = batch.q_start[i], batch.q_len[i]
                qpos, kv_pos = batch.positions[qs:qs + ql], batch.kv_positions(i)
                ext = batch.extents(i)
                m = max(range(len(ext)), key=lambda j: ext[j][1])
                off = sum(n for _, n in ext[:m])
                main = decode_plan(qpos, kv_pos[off:off + ext[m][1]], span.window, span.chunk, device)
                tail = None
                if len(ext) > 1:
                    allrows = batch.rows(i)
                    rest = np.r_[0:off, off + ext[m][1]:len(allrows)]
                    tail = (torch.from_numpy(allrows[rest]).to(device),
                            decode_plan(qpos, kv_pos[torch.from_numpy(rest)], span.window, span.chunk, device))
                plan.cp_decode.append((i, ext[m][0], ext[m][1], main, tail))
        return plan


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, mesh: Mesh, layer: int, dtype: torch.dtype):
        super().__init__()
        p = f"model.layers.{layer}.self_attn."
        hd, tp, r = cfg.head_dim, mesh.tp, mesh.tp_rank
        q0, q1 = q_heads_for_rank(cfg.num_heads, cfg.num_kv_heads, tp, r)
        k0, k1 = kv_heads_for_rank(cfg.num_kv_heads, tp, r)
        self.n_q, self.n_kv, self.head_dim = q1 - q0, k1 - k0, hd
        self.q0, self.q1 = q0, q1
        self.group = self.n_q // self.n_kv
        self.scale = cfg.attn_scale
        # the positions each query attends (Gemma 3 alternates windows, Llama 4 chunks, per layer): one plan per span
        self.span = Span(cfg.layer_window(layer), cfg.layer_chunk(layer))
        self.window = self.span.window
        self.rope = cfg.layer_rope(layer)           # which of the model's rotary tables this layer takes
        self.cp_comm = mesh.cp_comm
        pairs = hd if cfg.rope_interleaved else 0
        self.qkv = ColumnParallelLinear(cfg.hidden_size, [
            Part(p + "q_proj", cfg.num_heads * hd, q0 * hd, q1 * hd, rope_pairs=pairs),
            Part(p + "k_proj", cfg.num_kv_heads * hd, k0 * hd, k1 * hd, rope_pairs=pairs),
            Part(p + "v_proj", cfg.num_kv_heads * hd, k0 * hd, k1 * hd),
        ], bias=cfg.attention_bias, dtype=dtype)
        self.o = RowParallelLinear(p + "o_proj", cfg.num_heads * hd, cfg.hidden_size, q0 * hd, q1 * hd,
                                   bias=cfg.o_bias, dtype=dtype, comm=mesh.tp_reduce)
        self.q_norm = norm(cfg, p + "q_norm", hd, dtype) if cfg.qk_norm else None
        self.k_norm = norm(cfg, p + "k_norm", hd, dtype) if cfg.qk_norm else None
        if cfg.qk_l2_norm and cfg.layer_uses_rope(layer):
            # Llama 4: weightless, after RoPE in transformers; RoPE keeps each vector's norm, so before it is the same
            self.q_norm = self.k_norm = RMSNorm(None, hd, cfg.rms_norm_eps, dtype)
        # Llama 4's NoPE layers: q scaled by 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))
        self.temperature = cfg.temperature_tuning if not cfg.layer_uses_rope(layer) else ()
        # gpt-oss: one learned logit per query head joins every softmax with a zero value: out * sigmoid(lse - sink)
        self.sinks = nn.Parameter(torch.empty(self.n_q, dtype=dtype), requires_grad=False) \
            if cfg.attention_sinks else None
        self.sink = None                            # float32 (n_kv, group) copy, made by ``load``
        self.sinks_name = p + "sinks"
        self.num_heads = cfg.num_heads

    def load(self, src):
        for m in (self.qkv, self.o, self.q_norm, self.k_norm):
            if m is not None:
                m.load(src)
        if self.sinks is not None:
            self.sinks.copy_(src.read(self.sinks_name, (self.num_heads,), Slice(0, self.q0, self.q1)))
            self.sink = self.sinks.float().view(self.n_kv, self.group)

    def pack(self):
        self.qkv.pack()
        self.o.pack()

    def forward(self, x, plan: AttentionPlan, rope: RopeTables, k_cache, v_cache, write_index):
        T, hd = x.shape[0], self.head_dim
        nq, nkv = self.n_q * hd, self.n_kv * hd
        qkv = self.qkv(x)                                            # (T, (n_q + 2 n_kv) * hd)
        q2, k2, v2 = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
        if self.q_norm is not None:
            q2 = self.q_norm(q2.view(T, self.n_q, hd)).view(T, nq)
            k2 = self.k_norm(k2.view(T, self.n_kv, hd)).view(T, nkv)
        if plan.use_native:
            # RoPE on q and k in place, then k and v into the cache (n_kv, pool, hd): one C call
            native_kernels.rope_store(q2, k2, v2, rope.positions, rope.table_cos, rope.table_sin, k_cache, v_cache,
                                      write_index)
            q = q2.view(T, self.n_q, hd)
        else:
            q = Rotary.apply(q2.view(T, self.n_q, hd), rope.cos, rope.sin)    # (T, heads, hd)
            k = Rotary.apply(k2.view(T, self.n_kv, hd), rope.cos, rope.sin)
            # cache: (n_kv, pool, hd), in its own dtype (``--kv-dtype``)
            k_cache.index_copy_(1, write_index, k.transpose(0, 1).to(k_cache.dtype))
            v_cache.index_copy_(1, write_index, v2.view(T, self.n_kv, hd).transpose(0, 1).to(v_cache.dtype))
        if self.temperature:
            floor_scale, attn_scale = self.temperature
            t = torch.log1p(torch.floor((rope.positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0   # (T,)
            q = (q * t[:, None, None]).to(q.dtype)
        return self.o(self.attend(q, plan, k_cache, v_cache).view(T, self.n_q * hd))

    def attend(self, q, plan: AttentionPlan, k_cache, v_cache) -> torch.Tensor:
        """Every sequence's attention of this step's queries q (T, n_q, hd), by the path the plan chose for it,
        over the caches (n_kv, pool, hd) already holding this step's K/V: (T, n_q, hd)."""
        T, hd = q.shape[0], self.head_dim
        nq = self.n_q * hd
        out = torch.empty(T, self.n_q, hd, dtype=q.dtype, device=q.device)
        b = plan.batch
        if plan.native is not None:
            native_kernels.decode_attention(q.view(T, nq), k_cache, v_cache, plan.native, self.scale,
                                            out.view(T, nq), self.n_q, init=self._sink_state(plan.native.n))
        for g in plan.shared:
            self._attend_shared(q, k_cache, v_cache, out, g)
        if plan.group is not None:
            self._attend_decodes(q, k_cache, v_cache, out, *plan.group[1:])
        if plan.decodes:
            self._attend_decode_loop(q, k_cache, v_cache, out, plan.decodes)
        for i in plan.local:
            qs, ql, base, kl = b.q_start[i], b.q_len[i], b.kv_base[i], b.kv_len[i]
            if i in plan.paged:
                out[qs:qs + ql] = self._attend_paged(q[qs:qs + ql], k_cache, v_cache, kl, *plan.paged[i])
            else:
                out[qs:qs + ql] = self._attend(q[qs:qs + ql], _as(k_cache[:, base:base + kl], q),
                                               _as(v_cache[:, base:base + kl], q), kl)
        for i, ring_plan, rows in plan.ring:
            qs, ql, base, kl = b.q_start[i], b.q_len[i], b.kv_base[i], b.kv_len[i]
            if rows is None:
                K, V = k_cache[:, base:base + kl], v_cache[:, base:base + kl]
            else:                                   # its shard's blocks in several runs: gathered once per layer
                K, V = k_cache.index_select(1, rows), v_cache.index_select(1, rows)
            o, lse = ring_attention(
                q[qs:qs + ql], K.transpose(0, 1), V.transpose(0, 1),
                b.positions[qs:qs + ql], b.kv_positions(i), self.cp_comm, self.scale, self.window, plan=ring_plan,
                return_lse=True)
            out[qs:qs + ql] = self._sunk(o, lse)
        if plan.cp_decode:
            self._attend_cp_decodes(q, k_cache, v_cache, out, b, plan.cp_decode)
        return out

    def _sink_state(self, n: int):
        """The sinks as the running softmax state every native item starts from: max = sink, sum = 1 (its
        exp(sink - max)), values 0 (None: the kernel starts from zeros); (n, n_q) float32.  None without sinks."""
        if self.sink is None or n == 0:
            return None
        m = self.sink.reshape(1, self.n_q).expand(n, self.n_q)
        return m, torch.ones_like(m), None

    def _sunk(self, o, lse):
        """An attention output (T, n_q, hd) and its log-sum-exp (T, n_q) with the sinks joined:
        o * sigmoid(lse - sink) (the sink's share of the softmax has no value)."""
        if self.sink is None:
            return o
        return o.float() * torch.sigmoid(lse.float() - self.sink.reshape(1, self.n_q))[..., None]

    def _softmax(self, s):
        """softmax over the last dim of float32 scores (n_kv, ..., group, L) with the sinks as one more column."""
        if self.sink is None:
            return torch.softmax(s, dim=-1)
        shape = (self.n_kv,) + (1,) * (s.dim() - 3) + (self.group, 1)
        sink = self.sink.view(shape).expand(*s.shape[:-1], 1)
        return torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]

    def _attend_explicit(self, q, K, V, kl):
        """``_attend`` by explicit scores (the sinks' path: SDPA has no extra column), in query blocks of at most
        SINK_SCORE_ELEMS scores; a block scores only the keys its span reaches (a banded layer: about window keys
        per query, not all kl)."""
        ql, hd, grp = q.shape[0], self.head_dim, self.group
        qg = q.view(ql, self.n_kv, grp, hd).transpose(0, 1)                    # (n_kv, ql, grp, hd)
        out = torch.empty(self.n_kv, ql, grp, hd, dtype=q.dtype, device=q.device)
        reach = self.span.window or self.span.chunk or kl                       # keys one query can see, at most
        step = max(1, SINK_SCORE_ELEMS // max(1, self.n_q * min(kl, reach + 1)))
        for a in range(0, ql, step):
            b = min(ql, a + step)
            p0, p1 = kl - ql + a, kl - ql + b                                   # the block's query positions
            lo = int(self.span.first(p0)) if self.span.limited else 0           # the first key any of them sees
            Kt = K[:, lo:p1].transpose(1, 2).unsqueeze(1)                       # (n_kv, 1, hd, n_keys)
            s = torch.matmul(qg[:, a:b], Kt).float() * self.scale                # (n_kv, n, grp, n_keys)
            mask = self.span.mask(torch.arange(p0, p1, device=q.device)[:, None],
                                  torch.arange(lo, p1, device=q.device)[None, :])
            s.masked_fill_(~mask[None, :, None, :], float("-inf"))
            out[:, a:b] = torch.matmul(self._softmax(s).to(V.dtype), V[:, lo:p1].unsqueeze(1))
        return out.transpose(0, 1).reshape(ql, self.n_q, hd)

    def _attend(self, q, K, V, kl):
        """Causal attention of ql queries (the last ql positions of kl) on one sequence's cache."""
        ql = q.shape[0]
        if ql == 1 and self.span.whole(kl):
            # decode: group query heads by their KV head, no KV copy
            qg = q.view(self.n_kv, self.group, self.head_dim)           # (n_kv, group, hd)
            s = torch.matmul(qg, K.transpose(1, 2)).float() * self.scale  # (n_kv, group, kl)
            p = self._softmax(s).to(V.dtype)
            return torch.matmul(p, V).reshape(1, self.n_q, self.head_dim)
        if self.sink is not None:
            return self._attend_explicit(q, K, V, kl)
        qt = q.transpose(0, 1).unsqueeze(0)                             # (1, n_q, ql, hd)
        if ql == kl and self.span.whole(kl):
            o = F.scaled_dot_product_attention(qt, K.unsqueeze(0), V.unsqueeze(0), is_causal=True,
                                               enable_gqa=True, scale=self.scale)
        else:
            mask = self.span.mask(torch.arange(kl - ql, kl, device=q.device)[:, None],
                                  torch.arange(kl, device=q.device)[None, :])
            o = F.scaled_dot_product_attention(qt, K.unsqueeze(0), V.unsqueeze(0), attn_mask=mask,
                                               enable_gqa=True, scale=self.scale)
        return o[0].transpose(0, 1)                                     # (ql, n_q, hd)

    def _attend_paged(self, q, k_cache, v_cache, kl, runs, rows):
        """``_attend`` of a prompt chunk (or a windowed decode) whose cache rows are in several runs: over a
        gathered copy of its rows (``runs`` kept for the plan's bookkeeping)."""
        return self._attend(q, _as(k_cache.index_select(1, rows), q), _as(v_cache.index_select(1, rows), q), kl)

    def _attend_decode_loop(self, q, k_cache, v_cache, out, items):
        """One-token decodes one sequence at a time, query heads grouped by their KV head, reading each cache run
        where it is (no K/V copy).  Lean on purpose (this loop is the float32 CPU decode path, where each torch
        call costs microseconds): the scale is applied to all queries at once and the result is written in place.
        Several runs: the rows are gathered first (two index_selects: with a matmul per run, a sequence that grew
        into many blocks apart cost many more calls; on the CI CPU a 96-prompt chat job ran 38 s that way, against
        32 s with every sequence in one run)."""
        T, hd, grp, n_kv = q.shape[0], self.head_dim, self.group, self.n_kv
        f32 = q.dtype == torch.float32
        qa = (q * self.scale if f32 else q).view(T, n_kv, grp, hd)
        o4 = out.view(T, n_kv, grp, hd)
        for r, where in items:
            qg = qa[r]                                                     # (n_kv, group, hd)
            if isinstance(where, list):
                a, n = where[0]
                K, V = _as(k_cache[:, a:a + n], q), _as(v_cache[:, a:a + n], q)
            else:
                K, V = _as(k_cache.index_select(1, where), q), _as(v_cache.index_select(1, where), q)
            s = torch.matmul(qg, K.transpose(1, 2))                        # (n_kv, group, kl)
            if f32:
                torch.matmul(self._softmax(s), V, out=o4[r])
            else:
                p = self._softmax(s.float() * self.scale).to(V.dtype)
                o4[r] = torch.matmul(p, V)

    def _attend_shared(self, q, k_cache, v_cache, out, g: SharedGroup):
        """One-token decodes of G sequences whose caches begin with the same ``g.length`` rows: those rows are
        scored and summed once for all G x group query heads (one matmul each, no copy), each sequence's own
        rows after them one by one (with ``g.tails_native``: all in one ``native.decode_attention`` call
        continuing from the shared part's state); the two partial softmaxes (max, sum, weighted values) merge
        exactly."""
        G, hd, grp = len(g.seqs), self.head_dim, self.group
        a, n = g.start, g.length
        qg = q[g.rows].view(G, self.n_kv, grp, hd).transpose(0, 1).reshape(self.n_kv, G * grp, hd)
        Vs = _as(v_cache[:, a:a + n], q)
        s = torch.matmul(qg, _as(k_cache[:, a:a + n], q).transpose(1, 2)).float() * self.scale   # (n_kv, G*grp, n)
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        num = torch.matmul(p.to(Vs.dtype), Vs).float()                                 # (n_kv, G*grp, hd)
        if self.sink is not None:                       # the sinks join the shared part's state: one more term
            sink = self.sink.view(self.n_kv, 1, grp).expand(self.n_kv, G, grp).reshape(self.n_kv, G * grp, 1)
            m2 = torch.maximum(m, sink)
            c = torch.exp(m - m2)
            m, den, num = m2, den * c + torch.exp(sink - m2), num * c
        if g.tails_native is not None:
            # state per decode and query head, KV head by KV head: (G, n_q) and (G, n_q, hd)
            per = lambda t: t.view(self.n_kv, G, grp, -1).transpose(0, 1).reshape(G, self.n_q, -1)
            T = q.shape[0]
            native_kernels.decode_attention(q.view(T, self.n_q * hd), k_cache, v_cache, g.tails_native, self.scale,
                                            out.view(T, self.n_q * hd), self.n_q,
                                            init=(per(m), per(den), per(num)))
            return
        for j, runs in enumerate(g.tails):
            if not runs:
                continue
            sl = slice(j * grp, (j + 1) * grp)
            qj = qg[:, sl]                                                              # (n_kv, grp, hd)
            st = torch.cat([torch.matmul(qj, _as(k_cache[:, b:b + r], q).transpose(1, 2)) for b, r in runs],
                           dim=-1).float() * self.scale                                 # (n_kv, grp, t)
            mt = torch.maximum(m[:, sl], st.amax(-1, keepdim=True))
            c = torch.exp(m[:, sl] - mt)                                                # rescales the shared part
            pt = torch.exp(st - mt)
            ot, at = num[:, sl] * c, 0
            for b, r in runs:
                ot = ot + torch.matmul(pt[..., at:at + r].to(q.dtype), _as(v_cache[:, b:b + r], q)).float()
                at += r
            num[:, sl], den[:, sl] = ot, den[:, sl] * c + pt.sum(-1, keepdim=True)
        o = (num / den).view(self.n_kv, G, grp, hd).transpose(0, 1).reshape(G, self.n_q, hd)
        out[g.rows] = o.to(out.dtype)

    def _attend_decodes(self, q, k_cache, v_cache, out, rows, idx, invalid):
        """One-token decode attention of B sequences at once: their cache rows gathered into (n_kv, B, L, hd)
        (L = the longest, shorter ones padded with a repeated row and masked out)."""
        B, L = idx.shape
        flat = idx.view(-1)
        K = _as(k_cache.index_select(1, flat), q).view(self.n_kv, B, L, self.head_dim)   # (n_kv, B, L, hd)
        V = _as(v_cache.index_select(1, flat), q).view(self.n_kv, B, L, self.head_dim)
        qg = q[rows].view(B, self.n_kv, self.group, self.head_dim).transpose(0, 1)   # (n_kv, B, group, hd)
        s = torch.matmul(qg, K.transpose(-1, -2)).float() * self.scale    # (n_kv, B, group, L)
        s.masked_fill_(invalid, float("-inf"))
        p = self._softmax(s).to(V.dtype)
        o = torch.matmul(p, V)                                           # (n_kv, B, group, hd)
        out[rows] = o.transpose(0, 1).reshape(B, self.n_q, self.head_dim)

    def _attend_cp_decodes(self, q, k_cache, v_cache, out, b: StepBatch, seqs: list):
        """CP decodes: each sequence's new token against this rank's cache shard, then one merge of every
        sequence's partials across the CP ranks (one ``Allgather`` over ``cp_comm``).  A shard in several runs of
        blocks: its longest run (usually the prompt's rows) read where it is, the other rows gathered, the two
        partials merged: two calls whatever the number of runs.  ``seqs``: the plan's ``cp_decode``."""
        parts = []                                                      # (rows, partial out, partial lse)
        for i, start, n, main, tail in seqs:
            qs, ql = b.q_start[i], b.q_len[i]
            o, lse = decode_attention_partial(q[qs:qs + ql], k_cache[:, start:start + n].transpose(0, 1),
                                              v_cache[:, start:start + n].transpose(0, 1), self.scale, plan=main)
            if tail is not None:
                rows, tail_plan = tail
                o2, lse2 = decode_attention_partial(q[qs:qs + ql], k_cache.index_select(1, rows).transpose(0, 1),
                                                    v_cache.index_select(1, rows).transpose(0, 1), self.scale,
                                                    plan=tail_plan)
                o, lse = merge_partials([o, o2], [lse, lse2])
            parts.append((qs, ql, o, lse))
        merged, lse = combine_across_ranks(torch.cat([c[2] for c in parts]), torch.cat([c[3] for c in parts]),
                                           self.cp_comm, return_lse=True)
        merged = self._sunk(merged, lse)
        r = 0
        for qs, ql, _, _ in parts:
            out[qs:qs + ql] = merged[r:r + ql].to(out.dtype)
            r += ql
