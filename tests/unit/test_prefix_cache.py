"""The paged KV cache: the block pool's invariants, attention over paged rows, and the engine with prefix
caching and preemption against transformers (greedy tokens identical, logprobs within 1e-4 in float32)."""
import random

import pytest
import torch

from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.kv_cache import MIN_SHARED_BLOCKS, BlockPool, FreeRuns, block_hashes, extents
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.messages import Request
from mpiinfer.models.attention import Attention, AttentionPlan, Span, decode_group
from mpiinfer.models.step import StepBatch
from mpiinfer.tokenizer import Tokenizer

from ..reference import hf_greedy

NEW = 12


# ------------------------------------------------------------------ the block pool

def test_free_runs_take_and_give_coalesce():
    f = FreeRuns(10)
    assert f.take(3) and not f.take(3) and f.count == 9
    assert f.runs() == [(0, 3), (4, 6)]
    assert all(f.take(b) for b in range(4, 8)) and f.runs() == [(0, 3), (8, 2)]
    assert f.take_spaced(2) == [0, 1]                  # the largest run starts the pool: placed at its start
    for b in (3, 0, 5, 1, 4, 7, 6):
        f.give(b)
    assert f.runs() == [(0, 10)] and f.count == 10
    with pytest.raises(AssertionError):
        f.give(2)
    g = FreeRuns(100)
    g.take(0)
    assert g.take_spaced(10) == list(range(45, 55))    # the middle of the largest run: room to grow on both sides


def test_block_pool_random_workload_keeps_its_invariants():
    """Random admissions (prefix lookups), growth, registration, releases and evictions: every block is always
    in exactly one state, references never go negative, an evicted block was never in use, and at the end
    every block is free or cached."""
    rng = random.Random(7)
    pool = BlockPool(64, block_size=4)
    live = []                                         # (blocks, keys) of running sequences
    prefixes = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    for step in range(3000):
        op = rng.random()
        if op < 0.35 and len(live) < 12:
            toks = rng.choice(prefixes)[:rng.randrange(1, 40)] + [rng.randrange(50) for _ in range(rng.randrange(8))]
            keys = block_hashes(toks, 4)
            hits = pool.lookup(keys[:(len(toks) - 1) // 4])
            new = pool.allocate(-(-len(toks) // 4) - len(hits), after=hits[-1] if hits else None)
            if new is None:
                pool.release(hits)
            else:
                blocks = hits + new
                for j in range(len(hits), len(keys)):
                    pool.register(blocks[j], keys[j])
                live.append(blocks)
        elif op < 0.7 and live:
            blocks = rng.choice(live)
            got = pool.allocate(1, after=blocks[-1])
            if got is not None:
                blocks += got
        elif live:
            pool.release(live.pop(rng.randrange(len(live))))
        in_use = {b for blocks in live for b in blocks}
        assert not in_use & set(pool.lru), "a block in use is in the eviction list"
        if step % 50 == 0:
            pool.check()
    for blocks in live:
        pool.release(blocks)
    pool.check()
    assert pool.available == 64 and not any(pool.ref) and pool.hits > 0


def test_a_shared_prefix_is_found_and_kept_until_evicted():
    pool = BlockPool(8, block_size=4)
    a = list(range(12))
    keys = block_hashes(a, 4)
    assert keys == block_hashes(a + [99], 4)[:3] and block_hashes([1] + a[1:], 4)[0] != keys[0]
    blocks = pool.allocate(3)
    for b, k in zip(blocks, keys):
        pool.register(b, k)
    pool.release(blocks)                               # cached, unused
    assert pool.available == 8 and len(pool.lru) == 3
    again = pool.lookup(keys[:2])
    assert again == blocks[:2] and pool.ref[blocks[0]] == 1 and blocks[2] in pool.lru
    pool.allocate(6)                                   # needs 6 of the 5 free + 1 cached: evicts the unused one
    assert blocks[2] not in pool.lru and keys[2] not in pool.block_of and keys[0] in pool.block_of
    assert pool.allocate(1) is None                    # 2 in use by the lookup, 6 just allocated
    pool.check()


def test_a_cached_prompt_is_evicted_from_its_tail():
    """A released sequence's blocks enter the LRU last block first: pressure evicts the tail of a cached prompt,
    and its head (which every lookup starts from) stays found."""
    pool = BlockPool(8, block_size=4)
    keys = block_hashes(list(range(16)), 4)
    blocks = pool.allocate(4)
    for b, k in zip(blocks, keys):
        pool.register(b, k)
    pool.release(blocks)
    pool.allocate(5)                                   # the 4 free blocks and one cached
    assert keys[3] not in pool.block_of and all(k in pool.block_of for k in keys[:3])
    assert pool.lookup(keys) == blocks[:3]
    pool.check()


@pytest.mark.parametrize("grow_evicts", [True, False])
def test_growing_into_a_cached_block(grow_evicts):
    """A sequence growing into the block after its last one when that block is cached and unused: the torch
    paths' pool evicts it (one run); the CPU kernels' keeps it cached and takes a free block elsewhere, and
    evicts only when free blocks run out (least recently used first)."""
    pool = BlockPool(10, block_size=4, grow_evicts=grow_evicts)
    seq = pool.allocate(2)                             # blocks 0, 1
    other = pool.allocate(2, after=1)                  # blocks 2, 3: a prompt, cached once released
    assert seq == [0, 1] and other == [2, 3]
    keys = block_hashes(list(range(8)), 4)
    for b, k in zip(other, keys):
        pool.register(b, k)
    pool.release(other)
    got = pool.allocate(1, after=1)
    if grow_evicts:
        assert got == [2] and keys[0] not in pool.block_of
    else:
        assert got[0] not in (2, 3) and all(k in pool.block_of for k in keys)
        pool.allocate(5)                                # the last 5 free blocks: no eviction yet
        assert all(k in pool.block_of for k in keys)
        pool.allocate(1)                                # now one cached block goes, the prompt's tail
        assert keys[1] not in pool.block_of and keys[0] in pool.block_of
    pool.check()


def test_cached_tokens_count_the_first_admission_only():
    """A preempted sequence re-admitted finds its own prompt blocks in the prefix cache: this request computed
    them, so its ``cached_tokens`` stay what its first admission found."""
    from mpiinfer.engine.scheduler import Scheduler, Sequence
    sched = Scheduler(1, 64 * 16, 4, 256, min_shared_blocks=1)
    prompt = list(range(40))
    first = Sequence(Request(0, "a", SamplingParams(), prompt_token_ids=prompt), prompt, 8, frozenset(), None)
    sched.waiting.append(first)
    sched.admit()
    assert first in sched.running and first.cached_tokens == 0
    sched.advance([(first, len(prompt))])              # its prompt computed: two full blocks registered
    sched.preempt(first)
    sched.admit()
    assert first.n_cached == 32 and first.cached_tokens == 0 and first.preemptions == 1
    second = Sequence(Request(1, "b", SamplingParams(), prompt_token_ids=prompt), prompt, 8, frozenset(), None)
    sched.waiting.append(second)
    sched.admit()
    assert second.cached_tokens == 32                  # another request's blocks: cached for this one


def test_extents_join_consecutive_blocks():
    assert extents([3, 4, 9, 10, 11, 2], 4, 21) == [(12, 8), (36, 12), (8, 1)]
    assert extents([5], 4, 3) == [(20, 3)]


# ------------------------------------------------------------------ attention over paged rows

class _Heads:
    n_kv, group, head_dim, n_q, scale, window, span, sink = 2, 3, 16, 6, 0.25, None, Span(), None
    _softmax = Attention._softmax
    _attend = Attention._attend


@pytest.mark.parametrize("ql", [1, 5])
def test_paged_attention_equals_contiguous(ql):
    g = torch.Generator().manual_seed(1)
    a = _Heads()
    kc = torch.randn(a.n_kv, 64, a.head_dim, generator=g)
    vc = torch.randn(a.n_kv, 64, a.head_dim, generator=g)
    runs = [(40, 7), (8, 16), (60, 3)]                 # 26 rows in token order
    rows = torch.cat([torch.arange(s, s + n) for s, n in runs])
    q = torch.randn(ql, a.n_q, a.head_dim, generator=g)
    got = Attention._attend_paged(a, q, kc, vc, 26, runs, rows)
    want = Attention._attend(a, q, kc[:, rows], vc[:, rows], 26)
    assert torch.allclose(got, want, atol=1e-6)


def test_grouped_decodes_read_paged_rows():
    g = torch.Generator().manual_seed(2)
    a = _Heads()
    kc = torch.randn(a.n_kv, 80, a.head_dim, generator=g)
    vc = torch.randn(a.n_kv, 80, a.head_dim, generator=g)
    ext = [[(0, 4), (20, 3)], [(40, 9)], [(8, 2), (30, 5), (60, 1)], [(70, 6)]]
    kl = [sum(n for _, n in e) for e in ext]
    b = StepBatch(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), [0, 1, 2, 3], [1] * 4,
                  [e[0][0] for e in ext], kl, torch.arange(4), kv_ext=ext)
    group = decode_group(b, None, 64)
    q = torch.randn(4, a.n_q, a.head_dim, generator=g)
    got = torch.empty_like(q)
    Attention._attend_decodes(a, q, kc, vc, got, *group[1:])
    for i in range(4):
        r = torch.from_numpy(b.rows(i))
        want = Attention._attend(a, q[i:i + 1], kc[:, r], vc[:, r], kl[i])
        assert torch.allclose(got[i:i + 1], want, atol=1e-6), i
    again = StepBatch.from_arrays(b.to_arrays())     # what followers receive
    assert again.kv_ext == ext and again.write_index.tolist() == [b.rows(i)[-1] for i in range(4)]


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_decodes_read_the_common_rows_once(kv_dtype):
    """Decodes whose caches start with the same run are one SharedGroup (the shortest first run is the common
    part; a sequence whose own rows continue it gets the rest as its tail, one whose cache is all common rows
    none); attended together they equal each one attended alone.  A lone or too short start is no group.
    ``kv_dtype`` bfloat16: a cache of another dtype than the float32 queries (``--kv-dtype``)."""
    from mpiinfer.models.attention import SHARED_MIN_ROWS, shared_groups
    g = torch.Generator().manual_seed(3)
    a = _Heads()
    kc = torch.randn(a.n_kv, 500, a.head_dim, generator=g).to(kv_dtype)
    vc = torch.randn(a.n_kv, 500, a.head_dim, generator=g).to(kv_dtype)
    ext = [[(0, 300), (400, 5)], [(0, 305)], [(0, 300), (420, 16), (450, 2)], [(0, 300)], [(310, 30)],
           [(340, 8), (470, 1)], [(340, 8), (480, 3)], [(0, 250), (490, 2)]]
    kl = [sum(n for _, n in e) for e in ext]
    B = len(ext)
    b = StepBatch(torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), list(range(B)), [1] * B,
                  [e[0][0] for e in ext], kl, torch.arange(B), kv_ext=ext)
    assert shared_groups(b, None) == []                             # with the last one, 250 rows are common
    ext, B = ext[:-1], B - 1
    kl = kl[:-1]
    b = StepBatch(torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), list(range(B)), [1] * B,
                  [e[0][0] for e in ext], kl, torch.arange(B), kv_ext=ext)
    groups = shared_groups(b, None)
    assert 250 < SHARED_MIN_ROWS <= 300 and len(groups) == 1         # (340, 8) is far too short
    [sg] = groups
    assert sg.seqs == [0, 1, 2, 3] and (sg.start, sg.length) == (0, 300)
    assert sg.tails == [[(400, 5)], [(300, 5)], [(420, 16), (450, 2)], []]
    q = torch.randn(B, a.n_q, a.head_dim, generator=g)
    got = torch.zeros_like(q)
    Attention._attend_shared(a, q, kc, vc, got, sg)
    for i in sg.seqs:
        r = torch.from_numpy(b.rows(i))
        want = Attention._attend(a, q[i:i + 1], kc[:, r].float(), vc[:, r].float(), kl[i])
        assert torch.allclose(got[i:i + 1], want, atol=1e-5), i
    plan = AttentionPlan.build(b, None, None, 64, group_decodes=False)
    assert [x.seqs for x in plan.shared] == [[0, 1, 2, 3]] and plan.local == []
    assert [r for r, _ in plan.decodes] == [4, 5, 6] and plan.decodes[0][1] == ext[4]
    assert [w.tolist() for _, w in plan.decodes[1:]] == [b.rows(i).tolist() for i in (5, 6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_loop_equals_attention_over_gathered_rows(dtype):
    """The per-sequence decode loop (one run or several) gives what attention over the sequence's rows gives."""
    g = torch.Generator().manual_seed(4)
    a = _Heads()
    a.n_q, a.group = 6, 3
    kc = torch.randn(a.n_kv, 120, a.head_dim, generator=g).to(dtype)
    vc = torch.randn(a.n_kv, 120, a.head_dim, generator=g).to(dtype)
    runs = [[(10, 30)], [(50, 16), (0, 5), (100, 2)], [(70, 1)]]
    items = [(r, e if len(e) == 1 else torch.cat([torch.arange(s, s + n) for s, n in e])) for r, e in enumerate(runs)]
    q = torch.randn(3, a.n_q, a.head_dim, generator=g).to(dtype)
    got = torch.zeros_like(q)
    Attention._attend_decode_loop(a, q, kc, vc, got, items)
    for r, e in enumerate(runs):
        rows = torch.cat([torch.arange(s, s + n) for s, n in e])
        want = Attention._attend(a, q[r:r + 1], kc[:, rows], vc[:, rows], len(rows))
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got[r:r + 1].float(), want.float(), atol=tol), r


# ------------------------------------------------------------------ the engine against transformers

def shared_prefix_prompts(vocab, seed=0):
    """Prompts sharing prefixes of many lengths with a block size of 16: inside the first block, exactly at a
    block edge, a prompt equal to a block-aligned prefix of others, two equal prompts, one prompt a prefix of
    another, and one unrelated."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()
    p = rnd(70)
    return [p[:5] + rnd(6), p[:16] + rnd(9), p[:32], p[:33] + rnd(4), p, p, p[:40], p + rnd(11), rnd(23),
            p[:16] + rnd(9)]


def run(model_dir, prompts, prefix_cache=True, kv_budget=1 << 24, max_batch=3, step_tokens=24, new=NEW,
        min_blocks=1, kv_dtype=None):
    # min_blocks=1: every hit is taken, so that prefixes of every length are shared (the default takes 4+)
    ec = EngineConfig(kv_budget_bytes=kv_budget, prefix_cache=prefix_cache, prefix_min_blocks=min_blocks,
                      kv_dtype=kv_dtype)
    runner = ModelRunner(model_dir, ec, Mesh.single(), Device("cpu"))
    engine = Engine(runner, Tokenizer(model_dir), max_batch=max_batch, step_tokens=step_tokens)
    sp = SamplingParams(max_tokens=new, logprobs=True, ignore_eos=True)
    reqs = [Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]
    res = sorted(engine.generate(reqs), key=lambda r: r.index)
    assert [r.error for r in res] == [None] * len(prompts)
    for pool in engine.sched.pools:                   # no leak: every block free or in the prefix cache
        pool.check()
        assert pool.available == pool.num_blocks and not any(pool.ref)
    return res, engine


def assert_matches(ref, res):
    for i, ((toks, lps), r) in enumerate(zip(ref, res)):
        assert r.token_ids == toks, i
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4, i


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {}), ("mixtral", {}),
                                            ("mistral", {"sliding_window": 20}), ("gemma3", {}),
                                            ("llama4", {}), ("gpt_oss", {}), ("deepseek_v3", {})])
def test_prefix_caching_matches_transformers(arch, overrides, model_dirs):
    d = model_dirs(arch, **overrides)
    prompts = shared_prefix_prompts(Tokenizer(d).vocab_size)
    ref = hf_greedy(d, prompts, NEW)
    on, eng = run(d, prompts)
    assert_matches(ref, on)
    cached = [r.cached_tokens for r in on]
    assert sum(cached) >= 100 and cached[8] == 0, cached     # the unrelated prompt shares nothing
    assert eng.sched.pools[0].hits > 0
    torch_default, _ = run(d, prompts, min_blocks=MIN_SHARED_BLOCKS)           # the torch paths' minimum
    assert_matches(ref, torch_default)
    dc = [r.cached_tokens for r in torch_default]
    assert sum(dc) >= 128 and all(c == 0 or c >= 64 for c in dc), dc          # hits of 4+ blocks only
    off, eng_off = run(d, prompts, prefix_cache=False)
    assert_matches(ref, off)
    assert sum(r.cached_tokens for r in off) == 0 and eng_off.sched.pools[0].hits == 0


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("mistral", {"sliding_window": 20})])
def test_bfloat16_kv_cache_shares_prefixes_and_survives_preemption(arch, overrides, model_dirs):
    """``--kv-dtype bfloat16`` under float32 weights with prefixes of every length shared and with preemption
    forced by a cache of 8 blocks: every run matches transformers with its cache rounded to bfloat16, as in
    test_parity.py::test_bfloat16_kv_cache_under_a_float32_model (tokens identical; logprobs at float32 noise at
    the median, within 2e-3 at most)."""
    import statistics
    d = model_dirs(arch, **overrides)
    prompts = shared_prefix_prompts(Tokenizer(d).vocab_size, seed=7)[:6]
    ref = hf_greedy(d, prompts, 30, kv_dtype=torch.bfloat16)
    probe = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 20, kv_dtype="bfloat16"), Mesh.single(), Device("cpu"))
    tiny = 8 * 16 * probe.kv_bytes_per_token
    for prefix_cache, budget in ((True, 1 << 24), (False, 1 << 24), (True, tiny), (False, tiny)):
        res, eng = run(d, prompts, prefix_cache=prefix_cache, kv_budget=budget, max_batch=5, new=30,
                       kv_dtype="bfloat16")
        assert eng.runner.kv.k[0].dtype == torch.bfloat16
        assert (sum(r.cached_tokens for r in res) > 50) == prefix_cache
        assert (eng.sched.preemptions > 0) == (budget == tiny)
        diffs = []
        for i, ((toks, lps), r) in enumerate(zip(ref, res)):
            assert r.token_ids == toks, (prefix_cache, budget, i)
            diffs += [abs(a - b) for a, b in zip(r.logprobs, lps)]
        assert max(diffs) < 2e-3 and statistics.median(diffs) < 1e-5, (max(diffs), statistics.median(diffs))


def test_preemption_under_a_tiny_kv_budget_matches_transformers(model_dirs):
    """A cache of 8 blocks of 16 rows for 5 sequences at once: decodes run out of blocks, the newest sequence
    is preempted and recomputed later; every result is still exactly transformers' (sampled ones too: a
    preempted sequence starts over with its seed)."""
    d = model_dirs("llama")
    prompts = shared_prefix_prompts(Tokenizer(d).vocab_size, seed=3)[:6]
    ref = hf_greedy(d, prompts, 30)
    probe = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 20), Mesh.single(), Device("cpu"))
    budget = 8 * 16 * probe.kv_bytes_per_token
    for prefix_cache in (True, False):
        res, eng = run(d, prompts, prefix_cache=prefix_cache, kv_budget=budget, max_batch=5, new=30)
        assert eng.sched.preemptions > 0 and sum(r.preemptions for r in res) == eng.sched.preemptions
        assert_matches(ref, res)
    # sampled: the same samples with and without preemption
    sp = SamplingParams(max_tokens=30, temperature=0.9, seed=11, ignore_eos=True)
    outs = []
    for budget_ in (1 << 24, budget):
        runner = ModelRunner(d, EngineConfig(kv_budget_bytes=budget_), Mesh.single(), Device("cpu"))
        engine = Engine(runner, Tokenizer(d), max_batch=5, step_tokens=24)
        outs.append([r.token_ids for r in sorted(engine.generate(
            [Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]), key=lambda r: r.index)])
    assert engine.sched.preemptions > 0 and outs[0] == outs[1]


@pytest.mark.parametrize("window", [None, 20])
def test_cp_decode_over_several_runs_equals_one_run(window):
    """A CP decode whose shard is in several runs of blocks (the longest in the middle): the longest read where it
    is, the others gathered, the partials merged; equal to the same rows in one run (a window reaching into the
    gathered rows included)."""
    from mpiinfer.models.step import MODE_CP_DECODE
    from mpiinfer.parallel.shard import cp_local_count
    g = torch.Generator().manual_seed(4)
    a = _Heads()
    a.window, a.cp_comm = window, None
    a._sunk = lambda o, lse: o
    kc = torch.randn(a.n_kv, 400, a.head_dim, generator=g)
    vc = torch.randn(a.n_kv, 400, a.head_dim, generator=g)
    L, glen = 90, 97
    kl = cp_local_count(L, glen, 2, 0)
    ext = [(100, 5), (10, kl - 8), (200, 3)]
    rows = torch.cat([torch.arange(s, s + n) for s, n in ext])
    kc[:, 300:300 + kl], vc[:, 300:300 + kl] = kc[:, rows], vc[:, rows]      # the same rows in one run
    q = torch.randn(1, a.n_q, a.head_dim, generator=g)
    outs = []
    for kv_ext, base in ((None, 300), ([ext], 100)):
        b = StepBatch(torch.zeros(1, dtype=torch.long), torch.tensor([glen - 1]), [0], [1], [base], [kl],
                      torch.arange(1), kv_ext=kv_ext)
        b.mode, b.prompt_len, b.glen, b.write, b.cp, b.cp_rank = [MODE_CP_DECODE], [L], [glen], [0], 2, 0
        plan = AttentionPlan.build(b, None, window, 64, group_decodes=False)
        (i, start, n, main, tail), = plan.cp_decode
        assert main.window == window and main.rects
        assert i == 0 and (tail is not None) == (kv_ext is not None)
        out = torch.zeros_like(q)
        Attention._attend_cp_decodes(a, q, kc, vc, out, b, plan.cp_decode)
        outs.append(out)
    assert (start, n, len(tail[0])) == (10, kl - 8, 8)
    # the plan carries the span's window (planned once for every layer): the result is that of the window
    from mpiinfer.parallel.ring import decode_attention_partial
    want, _ = decode_attention_partial(q, kc[:, 300:300 + kl].transpose(0, 1), vc[:, 300:300 + kl].transpose(0, 1),
                                       a.scale, torch.tensor([glen - 1]), b.kv_positions(0), window)
    assert torch.allclose(outs[0], want, atol=1e-6)
    assert tail[1].kv_pos.tolist() == b.kv_positions(0)[list(range(5)) + list(range(kl - 3, kl))].tolist()
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
