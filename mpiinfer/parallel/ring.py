"""Context parallelism: exact attention over a sequence whose tokens are spread over the CP ranks.

Owns the attention math of CP and its one communicator, ``mesh.cp_comm`` (which positions each
rank holds is ``parallel.shard``'s: ``shard_positions``, ``cp_local_positions``):

* prefill, pass-KV ring attention: ``ring_attention`` (K/V blocks travel around the CP ring
  with ``Isend``/``Irecv`` while the block already held is attended; partial results are
  merged exactly with their log-sum-exp in float32); ``RingPlan`` is what every layer of one
  forward step shares (block sizes, global positions and the per-step work list);
* decode over a KV cache sharded across CP ranks: ``decode_attention_partial`` (one rank's
  shard) and ``combine_across_ranks`` (one ``Allgather`` of small tensors, merged in fixed rank
  order so every rank gets bitwise the same result);
* ``merge_partials`` (the exact LSE merge) and ``causal_attention_reference`` (float64, one
  process, for tests).

Layouts follow ``models/llama.py``: queries ``(T, n_q, hd)``, keys/values ``(T, n_kv, hd)``
for packed tokens of ONE sequence, GQA with ``group = n_q // n_kv`` (query head ``h`` reads KV
head ``h // group``), causal mask ``kv_pos <= q_pos`` and, with a sliding window ``W``,
``kv_pos > q_pos - W`` (as Mistral in HF).  All positions are GLOBAL positions in the sequence.

Internally queries are regrouped to ``(n_kv, T * group, hd)`` (row ``t * group + g`` is token
``t``, head ``kv * group + g``), as ``Attention._attend``'s decode path does, so K/V are never
repeated for GQA.  Scores, softmax, partial outputs and LSEs are float32 whatever the input
dtype; outputs are returned in the input dtype (or float32 for the partial/merge helpers).
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..comm.collectives import as_buffer, mpi_module

# Scores of one (query chunk x KV block) matmul are at most this many float32 elements
# (n_q * rows * kv_len), i.e. 32 MiB; queries are chunked to respect it.
MAX_SCORE_ELEMS = 1 << 23
# A run is a stretch of consecutive positions; positions split into more runs than this
# are treated as one irregular run (classified by min/max, masked when it straddles).
MAX_RUNS = 96               # a CP shard (shard.CP_UNIT): up to 2 x 19 + 2 runs of its own groups, more when shared
# CP decode on the CPU over a cache in another dtype than float32 (bfloat16) converts this many rows at a time
# instead of copying the whole shard to float32 (~200 MB per layer and step for a 100K-token document at cp=4 with
# 8 KV heads of 128).  Measured, one 25,000-row bfloat16 shard of 8 KV heads x 128, 32 query heads, 2 threads,
# whole copy vs pieces alternating 3 times, one query with positions as the engine's CP decode calls it:
# 67.6-68.1 -> 14.1-17.4 ms; 1,024 rows was as fast as 512 and steadier than 4,096.
# On CUDA the shard is converted whole (one kernel instead of one per piece).
DECODE_ROWS = 1024
# Diagonal blocks are cut into masked tiles no longer than this many rows (see default_tile).
MIN_TILE = 32
_TAG = 7117


# --------------------------------------------------------------------------- block planning (pure)

@dataclass(frozen=True)
class Rect:
    """One matmul of the plan: query rows [qa, qb) against block rows [ka, kb)."""
    qa: int
    qb: int
    ka: int
    kb: int
    masked: bool

    @property
    def elems(self) -> int:
        return (self.qb - self.qa) * (self.kb - self.ka)


def _runs(pos: np.ndarray):
    """[(row_start, row_stop, regular)] of runs of consecutive ascending positions; more than
    ``MAX_RUNS`` of them collapse into one irregular run (classified by min/max)."""
    n = len(pos)
    if n == 0:
        return []
    cuts = np.flatnonzero(np.diff(pos) != 1) + 1
    if len(cuts) + 1 > MAX_RUNS:
        return [(0, n, False)]
    edges = [0, *cuts.tolist(), n]
    return [(a, b, True) for a, b in itertools.pairwise(edges)]


def _minmax(pos, a, b, regular):
    return (int(pos[a]), int(pos[b - 1])) if regular else (int(pos[a:b].min()), int(pos[a:b].max()))


def _classify(qmin, qmax, kmin, kmax, window, chunk=None) -> int:
    """0: no pair can attend (future, or all outside the window, or every key in an earlier chunk than every
    query); 1: every pair attends (no mask); 2: some do (masked).  ``chunk``: a query attends only the keys of
    its own chunk of positions (``pos // chunk`` equal; Llama 4)."""
    if kmin > qmax or (window is not None and kmax <= qmin - window):
        return 0
    if chunk is not None and kmax // chunk < qmin // chunk:
        return 0
    if kmax <= qmin and (window is None or kmin > qmax - window) and \
            (chunk is None or kmin // chunk == qmax // chunk):
        return 1
    return 2


def default_tile(*positions) -> int:
    """Side of the masked diagonal tiles: 1/16 of a rank's share of the causal triangle's diagonal (1/32 of the
    average block, as long as one zigzag chunk of ``shard.shard_positions``' tail), at least ``MIN_TILE``, but at
    most half the blocks' typical run (the shortest run at least half as long as the longest: a long prompt's
    unit, see ``shard.CP_UNIT``) so that two adjacent units or chunks of one rank are always cut apart, as the
    other ranks' are.  Tiles the size of a unit's 1/16 would multiply the matmuls by the number of groups for
    ~1% less masked work."""
    runs = [b - a for p in positions for a, b, reg in _runs(_np_pos(p)) if reg]
    if not runs:
        return 1
    longest = max(runs)
    typical = min(n for n in runs if 2 * n >= longest)
    avg = sum(len(p) for p in positions) // max(1, len(positions))
    return max(1, min(max(MIN_TILE, avg // 32), typical // 2))


def plan_block(q_pos: np.ndarray, kv_pos: np.ndarray, window: int | None = None,
               tile: int | None = None, chunk: int | None = None):
    """The matmuls attending queries at ``q_pos`` to one K/V block at ``kv_pos``.

    Both are split into runs of consecutive positions; each (q run, kv run) pair is skipped
    (entirely in the future / out of the window: never computed), full (entirely in the past:
    no mask) or straddling the diagonal, which is halved recursively (a quadtree: full
    squares plus masked tiles of side <= ``tile``) so that little work is masked away.
    Adjacent rectangles of the same kind are then fused.  Returns ``(rects, skipped)``, the
    number of sub-blocks skipped."""
    q_pos, kv_pos = _np_pos(q_pos), _np_pos(kv_pos)
    if tile is None:
        tile = default_tile(q_pos, kv_pos)
    rects, skipped = [], 0

    def visit(qa, qb, qreg, ka, kb, kreg):
        nonlocal skipped
        c = _classify(*_minmax(q_pos, qa, qb, qreg), *_minmax(kv_pos, ka, kb, kreg), window, chunk)
        if c == 0:
            skipped += 1
            return
        if c == 1 or (qb - qa <= tile and kb - ka <= tile):
            rects.append(Rect(qa, qb, ka, kb, c == 2))
            return
        qs = [(qa, qb)] if qb - qa <= tile else [(qa, (qa + qb) // 2), ((qa + qb) // 2, qb)]
        ks = [(ka, kb)] if kb - ka <= tile else [(ka, (ka + kb) // 2), ((ka + kb) // 2, kb)]
        for a, b in qs:
            for c_, d in ks:
                visit(a, b, qreg, c_, d, kreg)

    for qa, qb, qreg in _runs(q_pos):
        for ka, kb, kreg in _runs(kv_pos):
            visit(qa, qb, qreg, ka, kb, kreg)
    return _fuse(rects), skipped


def _fuse(rects):
    """Fuse rectangles of the same kind that share a q range and touch along kv, then those that
    share a kv range and touch along q."""
    def one_pass(rs, key, same, touch, join):
        out = []
        for r in sorted(rs, key=key):
            if out and same(out[-1], r) and touch(out[-1], r):
                out[-1] = join(out[-1], r)
            else:
                out.append(r)
        return out
    rs = one_pass(rects, lambda r: (r.qa, r.qb, r.masked, r.ka),
                  lambda x, y: (x.qa, x.qb, x.masked) == (y.qa, y.qb, y.masked),
                  lambda x, y: x.kb == y.ka, lambda x, y: Rect(x.qa, x.qb, x.ka, y.kb, x.masked))
    rs = one_pass(rs, lambda r: (r.ka, r.kb, r.masked, r.qa),
                  lambda x, y: (x.ka, x.kb, x.masked) == (y.ka, y.kb, y.masked),
                  lambda x, y: x.qb == y.qa, lambda x, y: Rect(x.qa, y.qb, x.ka, x.kb, x.masked))
    return sorted(rs, key=lambda r: (r.qa, r.ka))


@dataclass
class RingPlan:
    """Everything about one ring pass that does not depend on the layer: the sizes and global
    positions of every rank's K/V block and, per ring step, the matmuls to do.

    Build it once per forward step (``RingPlan.build``: one ``Allgather`` and one
    ``Allgatherv`` on ``comm``) and pass it to every layer's ``ring_attention``."""
    cp: int
    rank: int
    sizes: list                      # K/V rows of each cp rank's block
    kv_pos: list                     # np.int64 global positions of each rank's block
    q_pos: np.ndarray
    window: int | None
    steps: list                      # steps[t] = (source rank, [Rect]); step 0 is this rank's own block
    skipped: int = 0                 # sub-blocks skipped as future / out of window / in earlier chunks
    chunk: int | None = None         # attention within chunks of positions (Llama 4), or None

    @classmethod
    def build(cls, q_pos, kv_pos, comm, window=None, tile: int | None = None, chunk: int | None = None) -> RingPlan:
        qp = _np_pos(q_pos)
        kp = _np_pos(kv_pos)
        if comm is None or comm.Get_size() == 1:
            cp, rank, sizes, allpos = 1, 0, [len(kp)], [kp]
        else:
            cp, rank = comm.Get_size(), comm.Get_rank()
            n = np.zeros(cp, dtype=np.int64)
            comm.Allgather(np.array([len(kp)], dtype=np.int64), n)
            sizes = n.tolist()
            flat = np.empty(int(n.sum()), dtype=np.int64)
            comm.Allgatherv(kp, [flat, n])
            offs = np.concatenate(([0], np.cumsum(n)))
            allpos = [flat[offs[i]:offs[i + 1]] for i in range(cp)]
        steps, skipped = [], 0
        tile = default_tile(*allpos) if tile is None else tile
        for t in range(cp):
            src = (rank - t) % cp
            rects, s = plan_block(qp, allpos[src], window, tile, chunk)
            steps.append((src, rects))
            skipped += s
        return cls(cp, rank, sizes, allpos, qp, window, steps, skipped, chunk)

    @property
    def blocks(self) -> int:
        """Ring steps whose K/V block is attended at all (the others are entirely in the future)."""
        return sum(1 for _, r in self.steps if r)

    @property
    def pairs(self) -> int:
        """Matmul rectangles this rank computes over the whole ring pass."""
        return sum(len(r) for _, r in self.steps)

    @property
    def elems(self) -> int:
        """(query, key) pairs this rank computes scores for, per head."""
        return sum(x.elems for _, r in self.steps for x in r)


def _np_pos(p) -> np.ndarray:
    if isinstance(p, torch.Tensor):
        p = p.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(p, dtype=np.int64).reshape(-1))


# --------------------------------------------------------------------------- block attention (float32)

def _group_q(q: torch.Tensor, n_kv: int, scale: float) -> torch.Tensor:
    """(T, n_q, hd) -> (n_kv, T * group, hd) float32, pre-scaled."""
    T, n_q, hd = q.shape
    g = n_q // n_kv
    qg = q.float().view(T, n_kv, g, hd).permute(1, 0, 2, 3).reshape(n_kv, T * g, hd)
    return qg * scale


def _ungroup(o: torch.Tensor, lse: torch.Tensor, T: int, g: int):
    """(n_kv, T*g, hd), (n_kv, T*g) -> (T, n_q, hd), (T, n_q)."""
    n_kv, _, hd = o.shape
    o = o.view(n_kv, T, g, hd).permute(1, 0, 2, 3).reshape(T, n_kv * g, hd)
    lse = lse.view(n_kv, T, g).permute(1, 0, 2).reshape(T, n_kv * g)
    return o, lse


def _softmax_av(s: torch.Tensor, V: torch.Tensor):
    """Scores s (n_kv, R, w) (masked entries -inf, consumed in place), V (n_kv, w, hd) ->
    normalised output (n_kv, R, hd) and lse (n_kv, R); a row with no valid key gives 0 / -inf."""
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m == -math.inf, 0.0)
    p = s.sub_(m).exp_()
    l = p.sum(dim=-1, keepdim=True)                                    # (n_kv, R, 1)
    o = torch.bmm(p, V)
    o = o.div_(l.clamp_min(torch.finfo(torch.float32).tiny))          # l == 0 -> o == 0
    lse = (l.log_() + m).squeeze(-1)                                   # log 0 = -inf
    return o, lse


def _merge_into(acc_o, acc_lse, o, lse):
    """acc <- exact LSE merge of acc and (o, lse), in place (views allowed)."""
    new = torch.logaddexp(acc_lse, lse)
    safe = new.masked_fill(new == -math.inf, 0.0)
    acc_o.mul_(torch.exp(acc_lse - safe).unsqueeze(-1)).add_(o * torch.exp(lse - safe).unsqueeze(-1))
    acc_lse.copy_(new)


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_ok(qg: torch.Tensor) -> bool:
    return _FLASH is not None and qg.device.type == "cpu" and qg.dtype == torch.float32


def _attend_rects(qg, qpos_t, K, V, kpos_t, rects, group, window, acc_o, acc_lse,
                  max_elems=MAX_SCORE_ELEMS, poll=None, chunk=None):
    """Attend grouped queries ``qg`` (n_kv, Tq*g, hd) to K/V (n_kv, Tk, hd) over ``rects``,
    merging into the accumulators; ``poll()`` is called after every matmul chunk (to let MPI
    progress the transfers in flight)."""
    n_kv = qg.shape[0]
    n_q = n_kv * group
    for r in rects:
        w = r.kb - r.ka
        # K/V in another dtype (a bfloat16 cache) are converted a rectangle at a time: float32 math without a
        # float32 copy of the whole shard
        Kr, Vs = K[:, r.ka:r.kb].float(), V[:, r.ka:r.kb].float()       # (n_kv, w, hd)
        Kt = Kr.transpose(1, 2)                                        # (n_kv, hd, w)
        if not r.masked and _flash_ok(qg):
            # a fully visible rectangle: the fused CPU flash kernel returns the lse we need to merge and runs
            # ~2x faster than matmul + softmax; grouped queries need no K/V expansion (each KV head is a batch)
            step = max(1, 4 * max_elems // max(1, n_q * w))
            Ks = Kr.unsqueeze(0)                                       # (1, n_kv, w, hd)
            for a in range(r.qa, r.qb, step):
                b = min(r.qb, a + step)
                o, lse = _FLASH(qg[:, a * group:b * group].unsqueeze(0), Ks, Vs.unsqueeze(0), 0.0, False, scale=1.0)
                _merge_into(acc_o[:, a * group:b * group], acc_lse[:, a * group:b * group], o[0], lse[0])
                if poll is not None:
                    poll()
            continue
        step = max(1, max_elems // max(1, n_q * w))
        for a in range(r.qa, r.qb, step):
            b = min(r.qb, a + step)
            R = b - a
            s = torch.bmm(qg[:, a * group:b * group], Kt)              # (n_kv, R*g, w)
            if r.masked:
                qp = qpos_t[a:b, None]
                kp = kpos_t[None, r.ka:r.kb]
                bad = kp > qp
                if window is not None:
                    bad |= kp <= qp - window
                if chunk is not None:
                    bad |= (kp // chunk) != (qp // chunk)
                s.view(n_kv, R, group, w).masked_fill_(bad[None, :, None, :], -math.inf)
            o, lse = _softmax_av(s, Vs)
            _merge_into(acc_o[:, a * group:b * group], acc_lse[:, a * group:b * group], o, lse)
            if poll is not None:
                poll()


# --------------------------------------------------------------------------- prefill: ring attention

def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos, kv_pos, comm, scale: float,
                   window: int | None = None, *, plan: RingPlan | None = None, chunk: int | None = None,
                   stats: dict | None = None, return_lse: bool = False,
                   max_score_elems: int = MAX_SCORE_ELEMS, progress: bool = True):
    """Exact causal attention of this rank's queries to the K/V of ALL ranks of ``comm``.

    q (Tq, n_q, hd) and k, v (Tk, n_kv, hd) are this rank's tokens of one sequence (any of
    Tq, Tk may be 0), with GLOBAL positions ``q_pos`` (Tq,), ``kv_pos`` (Tk,) (int64 tensors
    or arrays).  K/V may be strided views (e.g. ``cache[:, a:b].transpose(0, 1)``).

    Ring: step t attends the block of rank ``(rank - t) % cp``; before computing on it the
    rank starts ``Isend`` of that block to ``rank + 1`` and ``Irecv`` of the next one from
    ``rank - 1`` into the other of two buffers (K and V travel packed in one message in the
    input dtype; bf16 as int16).  Pairs of runs entirely in the future are never computed;
    those entirely in the past are computed without a mask.  Every rank of ``comm`` must call
    this collectively (same n_kv, hd, dtype), even with no tokens.

    ``plan``: a ``RingPlan.build(q_pos, kv_pos, comm, window, chunk=chunk)`` reused across layers (saves two
    small collectives per call; its window and chunk win over ``window`` and ``chunk``).  ``progress``: call
    ``Testall`` on the transfers in flight after every matmul chunk, so that MPI libraries
    without an asynchronous progress thread (MPICH's default) move the block while we compute
    rather than inside ``Waitall``.  ``stats``: a dict that gets accumulated ``wait_s`` (in
    ``Waitall``), ``poll_s``, ``compute_s``, ``total_s``, ``blocks``, ``pairs``, ``elems``,
    ``skipped``, ``bytes_sent``.
    Returns out (Tq, n_q, hd) in q's dtype, and with ``return_lse`` also lse (Tq, n_q) float32.
    """
    Tq, n_q, hd = q.shape
    Tk, n_kv = k.shape[0], k.shape[1]
    group = n_q // n_kv
    if plan is None:
        plan = RingPlan.build(q_pos, kv_pos, comm, window, chunk=chunk)
    cp, rank = plan.cp, plan.rank
    if Tk != plan.sizes[rank] or Tq != len(plan.q_pos) or n_q % n_kv:
        raise ValueError(f"ring_attention: q {tuple(q.shape)} / k {tuple(k.shape)} do not match the plan "
                         f"({len(plan.q_pos)} queries, {plan.sizes[rank]} keys) or n_q % n_kv != 0")
    t_start = time.perf_counter()

    dev = q.device
    qg = _group_q(q, n_kv, scale)                                      # (n_kv, Tq*g, hd)
    acc_o = torch.zeros(n_kv, Tq * group, hd, dtype=torch.float32, device=dev)
    acc_lse = torch.full((n_kv, Tq * group), -math.inf, dtype=torch.float32, device=dev)
    qpos_t = torch.from_numpy(plan.q_pos).to(dev)

    # two flat buffers of the largest block; block of s rows = first 2*n_kv*s*hd elements.  They are host
    # memory (what MPI sends; pinned on CUDA), and a CUDA rank computes on a device copy of each block.
    cap = 2 * n_kv * max(plan.sizes) * hd
    pin = dev.type == "cuda"
    bufs = [torch.empty(cap, dtype=k.dtype, pin_memory=pin),
            torch.empty(cap if cp > 1 else 0, dtype=k.dtype, pin_memory=pin)]
    own = bufs[0][:2 * n_kv * Tk * hd].view(2, n_kv, Tk, hd)
    own[0].copy_(k.transpose(0, 1))
    own[1].copy_(v.transpose(0, 1))

    MPI = mpi_module() if cp > 1 else None
    nxt, prv = (rank + 1) % cp, (rank - 1) % cp
    wait_s = poll_s = 0.0
    sent = 0
    cur = 0
    for t, (src, rects) in enumerate(plan.steps):
        n_src = plan.sizes[src]
        reqs = []
        if t < cp - 1:
            n_in = 2 * n_kv * plan.sizes[(rank - t - 1) % cp] * hd
            n_out = 2 * n_kv * n_src * hd
            reqs = [comm.Irecv(as_buffer(bufs[1 - cur][:n_in]), source=prv, tag=_TAG),
                    comm.Isend(as_buffer(bufs[cur][:n_out]), dest=nxt, tag=_TAG)]
            sent += n_out * bufs[cur].element_size()

        poll = None
        if reqs and progress:
            def poll(reqs=reqs):
                nonlocal poll_s
                t0 = time.perf_counter()
                MPI.Request.Testall(reqs)
                poll_s += time.perf_counter() - t0

        if rects:
            block = bufs[cur][:2 * n_kv * n_src * hd].view(2, n_kv, n_src, hd)
            if dev.type != "cpu":
                block = block.to(dev)      # a blocking copy: done before this buffer is received into again
            block = block.float() if block.dtype != torch.float32 else block   # reads only: safe while sending
            kpos_t = torch.from_numpy(plan.kv_pos[src]).to(dev)
            _attend_rects(qg, qpos_t, block[0], block[1], kpos_t, rects, group, plan.window,
                          acc_o, acc_lse, max_score_elems, poll, plan.chunk)
        if reqs:
            t0 = time.perf_counter()
            MPI.Request.Waitall(reqs)
            wait_s += time.perf_counter() - t0
        cur = 1 - cur

    out, lse = _ungroup(acc_o, acc_lse, Tq, group)
    if stats is not None:
        total = time.perf_counter() - t_start
        for key, val in (("wait_s", wait_s), ("poll_s", poll_s), ("total_s", total),
                         ("compute_s", total - wait_s - poll_s), ("blocks", plan.blocks), ("pairs", plan.pairs),
                         ("elems", plan.elems), ("skipped", plan.skipped), ("bytes_sent", sent)):
            stats[key] = stats.get(key, 0) + val
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- decode: sharded KV

class DecodePlan(NamedTuple):
    """What ``decode_attention_partial`` computes from the positions, made once per step and span
    (``decode_plan``) rather than once per layer: the rectangles, the positions as tensors, and the
    window and chunk that mask the rectangles on the diagonal."""
    rects: list
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    window: int | None
    chunk: int | None


def decode_plan(q_pos, kv_pos, window: int | None = None, chunk: int | None = None, device=None) -> DecodePlan:
    qp, kp = _np_pos(q_pos), _np_pos(kv_pos)
    rects = plan_block(qp, kp, window, chunk=chunk)[0]
    return DecodePlan(rects, torch.from_numpy(qp).to(device), torch.from_numpy(kp).to(device), window, chunk)


def decode_attention_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             q_pos=None, kv_pos=None, window: int | None = None, chunk: int | None = None,
                             plan: DecodePlan | None = None):
    """Attention of queries q (Tq, n_q, hd) to one rank's local K/V shard k, v (Tk, n_kv, hd).

    Without positions every key is visible (decode: the shard is all in the past).  With
    ``q_pos``/``kv_pos`` the causal (and window) mask is applied, so several new tokens can be
    attended at once; ``plan`` (``decode_plan`` of those positions, window and chunk) in place of
    all four saves planning them again.  Returns the partial (out (Tq, n_q, hd), lse (Tq, n_q)),
    both float32; an empty shard gives (0, -inf), which merges as a no-op."""
    Tq, n_q, hd = q.shape
    Tk, n_kv = k.shape[0], k.shape[1]
    if q_pos is None and plan is None and (window is not None or chunk is not None):
        raise ValueError("decode_attention_partial: a window or chunk needs q_pos and kv_pos")
    group = n_q // n_kv
    acc_o = torch.zeros(n_kv, Tq * group, hd, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((n_kv, Tq * group), -math.inf, dtype=torch.float32, device=q.device)
    if Tq and Tk:
        qg = _group_q(q, n_kv, scale)
        K, V = k.transpose(0, 1), v.transpose(0, 1)                     # (n_kv, Tk, hd), converted per rectangle
        if q_pos is not None or plan is not None:
            if plan is None:
                plan = decode_plan(q_pos, kv_pos, window, chunk, q.device)
            rects, qp, kp, window, chunk = plan
        else:
            qp = kp = None
            rects = [Rect(0, Tq, 0, Tk, False)]
        if k.dtype != torch.float32 and k.device.type == "cpu":
            # another dtype on the CPU: DECODE_ROWS rows at a time (float32 or CUDA: the rectangles as planned)
            rects = [Rect(r.qa, r.qb, a, min(r.kb, a + DECODE_ROWS), r.masked)
                     for r in rects for a in range(r.ka, r.kb, DECODE_ROWS)]
        _attend_rects(qg, qp, K, V, kp, rects, group, window, acc_o, acc_lse, chunk=chunk)
    return _ungroup(acc_o, acc_lse, Tq, group)


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]):
    """Exact merge of partial attentions over disjoint key sets, in list order:
    ``lse = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - lse) * out_i`` (float32).
    outs: (..., hd) each, lses: (...) each.  Rows where every lse is -inf give 0 / -inf."""
    L = torch.stack([x.float() for x in lses])                         # (n, ...)
    lse = torch.logsumexp(L, dim=0)
    safe = lse.masked_fill(lse == -math.inf, 0.0)
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for o, l in zip(outs, L):
        out += o.float() * torch.exp(l - safe).unsqueeze(-1)
    return out, lse


def combine_across_ranks(out: torch.Tensor, lse: torch.Tensor, comm, return_lse: bool = False):
    """Merge every rank's partial (out (T, n_q, hd), lse (T, n_q)) over ``comm`` (the CP group):
    one ``Allgather`` of the packed float32 (T, n_q, hd + 1) rows, then ``merge_partials`` in
    rank order, so all ranks hold bitwise the same float32 result.  Batch all sequences of a
    decode step into the rows of one call (one collective per layer)."""
    out, lse = out.float(), lse.float()
    if comm is None or comm.Get_size() == 1:
        return (out, lse) if return_lse else out
    n = comm.Get_size()
    packed = torch.cat((out, lse.unsqueeze(-1)), dim=-1).contiguous().cpu()  # (T, n_q, hd+1), host for MPI
    allp = torch.empty((n,) + tuple(packed.shape), dtype=torch.float32)
    comm.Allgather(packed.numpy(), allp.numpy())
    allp = allp.to(out.device)
    merged, mlse = merge_partials([allp[i, ..., :-1] for i in range(n)], [allp[i, ..., -1] for i in range(n)])
    return (merged, mlse) if return_lse else merged


# --------------------------------------------------------------------------- reference

def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                               window: int | None = None, q_pos=None, kv_pos=None,
                               return_lse: bool = False, chunk: int | None = None):
    """Full causal (optionally sliding-window or chunked) attention in float64 on one process.
    q (Tq, n_q, hd), k/v (Tk, n_kv, hd); positions default to ``arange``.  Returns out in q's
    dtype (and lse float64 with ``return_lse``); rows with no visible key give 0."""
    Tq, n_q, _hd = q.shape
    Tk, n_kv = k.shape[0], k.shape[1]
    g = n_q // n_kv
    qp = torch.arange(Tq) if q_pos is None else torch.as_tensor(np.asarray(_np_pos(q_pos)))
    kp = torch.arange(Tk) if kv_pos is None else torch.as_tensor(np.asarray(_np_pos(kv_pos)))
    K = k.double().repeat_interleave(g, dim=1)                         # (Tk, n_q, hd)
    V = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), K) * scale           # (n_q, Tq, Tk)
    bad = kp[None, :] > qp[:, None]
    if window is not None:
        bad |= kp[None, :] <= qp[:, None] - window
    if chunk is not None:
        bad |= kp[None, :] // chunk != qp[:, None] // chunk
    s = s.masked_fill(bad[None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)                                   # (n_q, Tq)
    p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0.0)[..., None])
    out = torch.einsum("hqk,khd->qhd", p, V)
    out = out.to(q.dtype)
    return (out, lse.transpose(0, 1)) if return_lse else out
