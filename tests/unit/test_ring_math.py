"""Context-parallel attention math without MPI: sharding helpers, block planning, the exact LSE
merge, the decode partial + merge, and a single-process simulation of the ring (every rank's
plan applied to every rank's block) against full causal attention."""
import math

import numpy as np
import pytest
import torch

from mpiinfer.parallel import ring
from mpiinfer.parallel.ring import (
    RingPlan,
    causal_attention_reference,
    combine_across_ranks,
    decode_attention_partial,
    default_tile,
    merge_partials,
    plan_block,
    ring_attention,
)
from mpiinfer.parallel.shard import (
    CP_MAX_GROUPS,
    CP_UNIT,
    chunk_bounds,
    cp_groups,
    cp_local_count,
    cp_local_positions,
    gather_order,
    shard_count,
    shard_order,
    shard_positions,
)

LENS = [0, 1, 2, 3, 5, 7, 8, 9, 16, 37, 64, 101, 1000, 1001, 4099, 70001]
CPS = [1, 2, 3, 4, 5, 8]


def qkv(T, n_q=8, n_kv=2, hd=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, n_q, hd, generator=g).to(dtype), torch.randn(T, n_kv, hd, generator=g).to(dtype),
            torch.randn(T, n_kv, hd, generator=g).to(dtype))


# --------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("L", LENS)
@pytest.mark.parametrize("cp", CPS)
def test_shards_cover_every_position_once(L, cp):
    shards = [shard_positions(L, cp, r) for r in range(cp)]
    allp = np.concatenate(shards)
    assert sorted(allp.tolist()) == list(range(L))
    assert all(s.dtype == np.int64 and np.all(np.diff(s) > 0) for s in shards)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [shard_count(L, cp, r) for r in range(cp)]
    units = cp_groups(L, cp)
    t0 = 2 * cp * sum(units)                          # where the tail starts
    b = chunk_bounds(L - t0, 2 * cp) + t0
    lens = np.diff(b)
    assert lens.max() - lens.min() <= 1 and b[-1] == L
    for r in range(cp):   # rank r owns units r and 2cp-1-r of every group, then tail chunks r and 2cp-1-r
        want, at = [], 0
        for u in units:
            want += list(range(at + r * u, at + (r + 1) * u)) + \
                list(range(at + (2 * cp - 1 - r) * u, at + (2 * cp - r) * u))
            at += 2 * cp * u
        want += list(range(b[r], b[r + 1])) + list(range(b[2 * cp - 1 - r], b[2 * cp - r]))
        assert shards[r].tolist() == want
    if L:
        assert L - 1 in shards[0]          # the logits row of a prefill is on cp rank 0


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_groups_runs_and_tail(cp):
    """The groups: as many of the top unit (CP_UNIT * 2**k, the smallest with at most CP_MAX_GROUPS of them) as
    fit, then at most one of each smaller unit down to CP_UNIT; the tail is under 2 * cp * CP_UNIT tokens, and no
    rank holds more than 2 * groups + 2 <= ring.MAX_RUNS runs of consecutive positions."""
    for L in list(range(0, 3000, 37)) + [2 * cp * CP_UNIT * 8 * 2 ** k + d for k in range(12) for d in (-1, 0, 1)] + \
            [10_000_000]:
        units = cp_groups(L, cp)
        top = units[0] if units else CP_UNIT
        assert top % CP_UNIT == 0 and (top // CP_UNIT) & (top // CP_UNIT - 1) == 0
        assert units.count(top) <= CP_MAX_GROUPS
        if top > CP_UNIT:
            assert L // (cp * top) > CP_MAX_GROUPS
        lower = units[units.count(top):]
        assert lower == sorted(set(lower), reverse=True) and all(u < top and u % CP_UNIT == 0 for u in lower)
        assert 0 <= L - 2 * cp * sum(units) < 2 * cp * CP_UNIT
        if L > 100_000:
            continue                                 # the run count below; positions of 10M tokens are slow to build
        for r in range(cp):
            pos = shard_positions(L, cp, r)
            runs = len(np.flatnonzero(np.diff(pos) != 1)) + 1
            assert runs <= 2 * len(units) + 2 <= ring.MAX_RUNS
    assert 2 * len(cp_groups(10_000_000, 2)) + 2 <= ring.MAX_RUNS


def test_shared_prefix_is_laid_out_alike():
    """A document followed by different questions: positions in the groups both prompts start with are stored
    alike (same rank, same cache row).  Those groups usually cover all but the last < 4 * cp * CP_UNIT tokens of
    the document (here always): they differ only where a question pushes the remaining length over a group size,
    which a question much shorter than that group rarely does."""
    for cp in (2, 3, 4):
        for doc in (1100, 4099, 6000, 70001):
            u_doc = cp_groups(doc, cp)
            for q in (5, 30, 41, 100):
                L = doc + q
                units = cp_groups(L, cp)
                k = 0
                while k < min(len(units), len(u_doc)) and units[k] == u_doc[k]:
                    k += 1
                shared = 2 * cp * sum(units[:k])
                if units[:1] == u_doc[:1]:             # the same top unit (a boundary between them is rare)
                    assert shared >= doc - 2 * 2 * cp * CP_UNIT, (cp, doc, q, units, u_doc)
                for r in range(cp):
                    a, b = shard_positions(doc, cp, r), shard_positions(L, cp, r)
                    n = 2 * sum(units[:k])
                    assert np.array_equal(a[:n], b[:n]) and a[:n].max(initial=-1) < shared <= a[n:].min(initial=doc)


@pytest.mark.parametrize("L,cp", [(4099, 2), (300, 3), (1000, 4), (5, 2)])
def test_local_positions_and_counts(L, cp):
    """A CP sequence's cache rows on a rank: its prompt shard, then the generated positions p with p % cp == r."""
    for glen in (L, L + 1, L + 7):
        for r in range(cp):
            pos = cp_local_positions(L, glen, cp, r)
            assert len(pos) == cp_local_count(L, glen, cp, r)
            assert pos[:shard_count(L, cp, r)].tolist() == shard_positions(L, cp, r).tolist()
            assert all(p % cp == r for p in pos[shard_count(L, cp, r):])
        assert sorted(np.concatenate([cp_local_positions(L, glen, cp, r) for r in range(cp)]).tolist()) == \
            list(range(glen))


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_any_layout_covers_the_prompt_with_the_same_row_counts(cp):
    """A prompt laid out after another prompt's groups (``cp_groups(L, cp, start)``): every position once, ascending
    on each rank, the last one on rank 0, and each rank's row count the same as with the default layout (the length
    check made when a request is queued holds whatever layout it gets)."""
    rng = np.random.default_rng(cp)
    for _ in range(300):
        L = int(rng.integers(2 * cp * CP_UNIT, 30000))
        prefix, at = [], 0
        while True:                                  # a random chain of groups ending before the last token
            u = CP_UNIT * 2 ** int(rng.integers(0, 6))
            if at + 2 * cp * u > L - 1 or rng.random() < 0.2:
                break
            prefix.append(u)
            at += 2 * cp * u
        units = prefix + cp_groups(L, cp, at)
        shards = [shard_positions(L, cp, r, units) for r in range(cp)]
        assert sorted(np.concatenate(shards).tolist()) == list(range(L))
        assert all(np.all(np.diff(s) > 0) for s in shards) and L - 1 in shards[0]
        assert [len(s) for s in shards] == [shard_count(L, cp, r, units) for r in range(cp)] == \
            [shard_count(L, cp, r) for r in range(cp)]


@pytest.mark.parametrize("L", LENS)
@pytest.mark.parametrize("cp", CPS)
def test_gather_order_restores_sequence(L, cp):
    x = torch.arange(L) * 10
    cat = torch.cat([x[torch.from_numpy(shard_positions(L, cp, r))] for r in range(cp)])
    assert torch.equal(cat[torch.from_numpy(gather_order(L, cp))], x)
    assert np.array_equal(shard_order(L, cp)[gather_order(L, cp)], np.arange(L))


def test_bad_shard_args():
    with pytest.raises(ValueError):
        shard_positions(10, 2, 2)
    with pytest.raises(ValueError):
        chunk_bounds(10, 0)


# --------------------------------------------------------------------------- planning

def _covered(q_pos, kv_pos, rects):
    m = np.zeros((len(q_pos), len(kv_pos)), dtype=np.int64)
    for r in rects:
        m[r.qa:r.qb, r.ka:r.kb] += 1
    return m


@pytest.mark.parametrize("window,chunk", [(None, None), (7, None), (64, None), (None, 13), (None, 300)])
@pytest.mark.parametrize("L,cp", [(37, 2), (101, 3), (1000, 4), (64, 8), (9, 4)])
def test_plan_covers_exactly_the_visible_pairs(L, cp, window, chunk):
    """Every visible (q, kv) pair is computed exactly once, no unmasked rectangle contains an
    invisible pair, and blocks entirely in the future (or in earlier chunks) produce no rectangle at all."""
    shards = [shard_positions(L, cp, r) for r in range(cp)]
    tile = default_tile(*shards)
    for qp in shards:
        for kp in shards:
            rects, _ = plan_block(qp, kp, window, tile, chunk)
            cov = _covered(qp, kp, rects)
            vis = kp[None, :] <= qp[:, None]
            if window is not None:
                vis &= kp[None, :] > qp[:, None] - window
            if chunk is not None:
                vis &= kp[None, :] // chunk == qp[:, None] // chunk
                if len(qp) and len(kp) and kp.max() // chunk < qp.min() // chunk:
                    assert rects == []
            assert cov.max(initial=0) <= 1
            assert np.all(cov[vis] == 1)
            for r in rects:
                if not r.masked:
                    assert vis[r.qa:r.qb, r.ka:r.kb].all()
            if len(qp) and len(kp) and kp.min() > qp.max():
                assert rects == []


def test_future_block_is_skipped_and_past_block_unmasked():
    rects, skipped = plan_block(np.arange(0, 10), np.arange(10, 20))
    assert rects == [] and skipped == 1
    rects, skipped = plan_block(np.arange(10, 20), np.arange(0, 10))
    assert [(r.qa, r.qb, r.ka, r.kb, r.masked) for r in rects] == [(0, 10, 0, 10, False)]


@pytest.mark.parametrize("L,cp", [(1000, 2), (1000, 3), (1000, 4), (4096, 4), (1001, 8), (32768, 2), (4099, 2),
                                  (100001, 2)])
def test_load_balance(L, cp):
    """Zigzag sharding: every rank attends every block, computes the same number of matmul
    rectangles (+-1 / +-2 when chunk lengths differ) and the same work within 2%, and the total is
    within 4% of the causal triangle; contiguous sharding would be badly unbalanced."""
    shards = [shard_positions(L, cp, r) for r in range(cp)]
    tile = default_tile(*shards)
    pairs, elems, blocks = [], [], []
    for qp in shards:
        plans = [plan_block(qp, kp, None, tile)[0] for kp in shards]
        blocks.append(sum(1 for p in plans if p))
        pairs.append(sum(len(p) for p in plans))
        elems.append(sum(r.elems for p in plans for r in p))
    assert blocks == [cp] * cp
    assert max(pairs) - min(pairs) <= (1 if L % (2 * cp) == 0 or L == 1000 else 2), pairs
    assert max(elems) / min(elems) < 1.02, elems
    assert sum(elems) < 1.04 * L * (L + 1) / 2
    contiguous = [np.arange(r * L // cp, (r + 1) * L // cp) for r in range(cp)]
    work = [sum(r.elems for kp in contiguous for r in plan_block(qp, kp)[0]) for qp in contiguous]
    assert max(work) / min(work) > 2


# --------------------------------------------------------------------------- merge and decode

@pytest.mark.parametrize("n_q,n_kv", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_arbitrary_kv_split_equals_full(n_q, n_kv, seed):
    T = 53
    q, k, v = qkv(T, n_q, n_kv, seed=seed)
    scale = 16 ** -0.5
    ref, ref_lse = causal_attention_reference(q, k, v, scale, return_lse=True)
    g = torch.Generator().manual_seed(100 + seed)
    owner = torch.randint(0, 4, (T,), generator=g)           # arbitrary, interleaved split of K/V
    pos = torch.arange(T)
    outs, lses = [], []
    for part in range(4):
        idx = torch.nonzero(owner == part).flatten()
        o, l = decode_attention_partial(q, k[idx], v[idx], scale, q_pos=pos, kv_pos=pos[idx])
        outs.append(o)
        lses.append(l)
    out, lse = merge_partials(outs, lses)
    assert (out - ref).abs().max() < 1e-5
    assert (lse - ref_lse.float()).abs().max() < 1e-5


def test_decode_partial_plus_merge_equals_full():
    """One new query per sequence against a KV cache spread round-robin over 3 'ranks'."""
    T, n_q, n_kv, hd = 200, 8, 2, 32
    q, k, v = qkv(T + 1, n_q, n_kv, hd, seed=3)
    scale = hd ** -0.5
    ref = causal_attention_reference(q, k, v, scale)[-1:]       # the last token's attention
    parts = [decode_attention_partial(q[-1:], k[r::3], v[r::3], scale) for r in range(3)]
    out, _ = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert (out - ref).abs().max() < 1e-5


def test_decode_partial_of_a_bfloat16_shard_in_pieces(monkeypatch):
    """A bfloat16 shard longer than DECODE_ROWS is attended a piece at a time in float32 (no float32 copy of the
    whole shard): the same result as attending its float32 copy at once, within float32 rounding of the merge."""
    T, n_q, n_kv, hd = 1000, 8, 2, 32
    q, k, v = qkv(T, n_q, n_kv, hd, seed=9, dtype=torch.bfloat16)
    scale = hd ** -0.5
    whole = decode_attention_partial(q[-2:], k.float(), v.float(), scale)
    monkeypatch.setattr(ring, "DECODE_ROWS", 96)              # 11 pieces, the last one short
    seen = []
    real = ring._attend_rects
    monkeypatch.setattr(ring, "_attend_rects", lambda *a, **kw: seen.append(a[5]) or real(*a, **kw))
    o, lse = decode_attention_partial(q[-2:], k, v, scale)
    assert len(seen[0]) == 11 and seen[0][-1].kb == T
    assert (o - whole[0]).abs().max() < 1e-5 and (lse - whole[1]).abs().max() < 1e-5
    # with positions, as the engine's CP decode calls it (every key in the past: one rectangle, then pieces)
    o2, lse2 = decode_attention_partial(q[-2:], k, v, scale, torch.full((2,), T), torch.arange(T))
    assert len(seen[1]) == 11 and not any(r.masked for r in seen[1])
    assert (o2 - whole[0]).abs().max() < 1e-5 and (lse2 - whole[1]).abs().max() < 1e-5
    # and with a window: the masked rectangles are cut the same way
    o3, _ = decode_attention_partial(q[-2:], k, v, scale, torch.tensor([T, T + 1]), torch.arange(T), window=500)
    ref3 = causal_attention_reference(q[-2:].double(), k.double(), v.double(), scale, window=500,
                                      q_pos=torch.tensor([T, T + 1]), kv_pos=torch.arange(T))
    assert all(r.kb - r.ka <= 96 for r in seen[2]) and (o3.double() - ref3).abs().max() < 1e-4
    ref = causal_attention_reference(q[-2:].double(), k.double(), v.double(), scale, q_pos=torch.full((2,), T),
                                     kv_pos=torch.arange(T))            # every key visible, in float64
    assert (o.double() - ref).abs().max() < 1e-4


def test_empty_shard_and_fully_masked_rows_merge_as_noop():
    q, k, v = qkv(4)
    o0, l0 = decode_attention_partial(q, k[:0], v[:0], 0.25)
    assert torch.all(o0 == 0) and torch.all(l0 == -math.inf)
    o1, l1 = decode_attention_partial(q, k, v, 0.25)
    out, lse = merge_partials([o0, o1, o0], [l0, l1, l0])
    assert torch.equal(out, o1) and torch.equal(lse, l1)
    out, lse = merge_partials([o0], [l0])
    assert torch.all(out == 0) and not torch.isnan(out).any()
    # every kv after every query: masked away entirely -> (0, -inf), no NaN
    o2, l2 = decode_attention_partial(q, k, v, 0.25, q_pos=torch.arange(4), kv_pos=torch.arange(10, 14))
    assert torch.all(o2 == 0) and torch.all(l2 == -math.inf)


def test_combine_without_comm_is_identity():
    q, k, v = qkv(3)
    o, l = decode_attention_partial(q, k, v, 0.25)
    assert torch.equal(combine_across_ranks(o, l, None), o)


# --------------------------------------------------------------------------- ring (single process)

@pytest.mark.parametrize("window", [None, 10])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_ring_without_comm_equals_reference(window, dtype, tol):
    T = 77
    q, k, v = qkv(T, seed=5, dtype=dtype)
    ref = causal_attention_reference(q.float(), k.float(), v.float(), 0.25, window=window)
    out = ring_attention(q, k, v, torch.arange(T), torch.arange(T), None, 0.25, window=window)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() < tol


@pytest.mark.parametrize("window,chunk", [(None, None), (13, None), (None, 29)])
@pytest.mark.parametrize("L,cp", [(37, 2), (101, 3), (300, 4), (5, 4), (1, 3), (1100, 2)])
def test_simulated_ring_equals_reference(L, cp, window, chunk):
    """Each rank's plan applied to each rank's block, merged in ring order, equals full attention
    restricted to the rank's positions (the MPI transport is tested in tests/mpi/test_ring.py); chunked
    attention (Llama 4) too."""
    n_q, n_kv, hd = 8, 2, 16
    q, k, v = qkv(L, n_q, n_kv, hd, seed=L)
    scale = hd ** -0.5
    ref = causal_attention_reference(q, k, v, scale, window=window, chunk=chunk)
    shards = [shard_positions(L, cp, r) for r in range(cp)]
    tile = default_tile(*shards)
    for r in range(cp):
        # tiny score chunks: exercise query chunking
        out = _simulated_rank(q, k, v, n_kv, scale, shards, r, shards[r], window, tile, chunk, max_elems=200)
        qp = torch.from_numpy(shards[r])
        assert (out - ref[qp]).abs().max().item() < 1e-5 if len(qp) else out.shape == (0, n_q, hd)


def _simulated_rank(q, k, v, n_kv, scale, shards, r, qpos, window, tile, chunk, **kw):
    """Rank r's queries at ``qpos`` (positions of its shard) attended to every rank's block of ``shards`` in ring
    order: each block's planned rectangles, merged into one accumulator as ``ring_attention`` does."""
    cp, group, hd = len(shards), q.shape[1] // n_kv, q.shape[2]
    qp = torch.from_numpy(qpos)
    acc_o = torch.zeros(n_kv, len(qp) * group, hd)
    acc_l = torch.full((n_kv, len(qp) * group), -math.inf)
    qg = ring._group_q(q[qp], n_kv, scale)
    for t in range(cp):
        s = (r - t) % cp
        kp = torch.from_numpy(shards[s])
        rects, _ = plan_block(qpos, shards[s], window, tile, chunk)
        ring._attend_rects(qg, qp, k[kp].transpose(0, 1), v[kp].transpose(0, 1), kp, rects, group, window,
                           acc_o, acc_l, chunk=chunk, **kw)
    return ring._ungroup(acc_o, acc_l, len(qp), group)[0]


@pytest.mark.parametrize("window,chunk", [(None, None), (50, None), (None, 300)])
@pytest.mark.parametrize("L,cp,cached", [(1100, 2, 1), (1100, 2, 3), (1300, 3, 2), (1050, 4, 1), (1024, 2, 3),
                                          (2900, 2, 5), (2900, 2, 6)])
def test_simulated_ring_with_cached_groups(L, cp, cached, window, chunk):
    """A CP prompt whose first ``cached`` full groups are in the cache (a prefix shared with an earlier prompt):
    each rank's queries are only its positions after them, its keys all its positions; merged over the ring it
    equals full attention at those positions (1024 = 4 full groups, no tail, at cp=2: the last group is computed;
    2900 at cp=2: 5 groups of 128-token units, one of 64, a 84-token tail)."""
    if L == 2900:
        assert cp_groups(L, cp) == [128] * 5 + [64]
    n_q, n_kv, hd = 4, 2, 16
    q, k, v = qkv(L, n_q, n_kv, hd, seed=L + cached)
    scale = hd ** -0.5
    ref = causal_attention_reference(q, k, v, scale, window=window, chunk=chunk)
    shards = [shard_positions(L, cp, r) for r in range(cp)]
    units = cp_groups(L, cp)
    first = 2 * cp * sum(units[:cached])
    assert first < L
    tile = default_tile(*shards)
    for r in range(cp):
        qpos = shards[r][2 * sum(units[:cached]):]
        assert qpos.min() >= first
        out = _simulated_rank(q, k, v, n_kv, scale, shards, r, qpos, window, tile, chunk)
        assert (out - ref[torch.from_numpy(qpos)]).abs().max().item() < 1e-5


def test_ring_plan_single_process():
    p = RingPlan.build(torch.arange(10), torch.arange(10), None)
    assert p.cp == 1 and p.blocks == 1 and p.sizes == [10]
    assert p.elems == 75 and p.pairs == 3      # 10 rows cut in two: 2 masked 5x5 tiles + 1 full 5x5
