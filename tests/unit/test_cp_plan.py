"""The leader's step plans with context parallelism, without MPI: a fake cp=2 replica whose "model" maps
(token, position) to the next token, so any mix-up of rows, ranks or KV regions changes the output."""
import types

import pytest
import torch

from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.engine.generate import Engine
from mpiinfer.messages import Request

V = 97


def next_token(tok: int, pos: int) -> int:
    return (tok * 7 + pos * 3 + 1) % V


class FakeCPRunner:
    """Stands in for a cp-rank replica: checks each rank's batch, returns logits of every rank's sampled rows
    in CP rank order when the plan asks for the gather (rank 0's alone otherwise)."""

    def __init__(self, cp, pool=4096):
        self.cfg = types.SimpleNamespace(vocab_size=V, max_position_embeddings=1 << 16, eos_token_ids=[], lm_head=True)
        self.engine_cfg = EngineConfig(max_batch=16)
        self.mesh = types.SimpleNamespace(cp=cp, wide_ep=False)
        self.device = types.SimpleNamespace(torch=torch.device("cpu"))
        self.pool_tokens = pool
        self.native = False                     # the torch paths' prefix-cache minimum
        self.tokens_per_rank = [0] * cp

    def execute(self, batches):
        assert isinstance(batches, list) and len(batches) == self.mesh.cp
        gather = {b.gather_logits for b in batches}
        assert len(gather) == 1, "every rank must agree on the logits gather"
        out = []
        for r, b in enumerate(batches):
            self.tokens_per_rank[r] += b.num_tokens
            for i in range(len(b.q_start)):
                if b.seq_mode(i) == 0:        # an ordinary sequence: its rows are all on this rank
                    for row in b.rows(i).tolist():
                        assert row != b.scratch_row
            rows = b.logits_rows.tolist()
            if r == 0 or b.gather_logits:
                lg = torch.full((len(rows), V), -10.0)
                for j, row in enumerate(rows):
                    lg[j, next_token(int(b.input_ids[row]), int(b.positions[row]))] = 10.0
                out.append(lg)
            else:
                assert not rows, "rank > 0 has sampled rows but no gather was planned"
        return torch.cat(out)


def expected(prompt, n):
    toks, t, p = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        t = next_token(t, p)
        toks.append(t)
        p += 1
    return toks


class _Tok:
    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("policy", ["spread", "first"])
def test_short_requests_spread_over_cp_ranks(policy):
    cp = 2
    runner = FakeCPRunner(cp)
    eng = Engine(runner, _Tok(), max_batch=8, step_tokens=64, cp_min_tokens=200, cp_short=policy)
    sp = SamplingParams(max_tokens=9, ignore_eos=True)
    lengths = [5, 300, 17, 3, 41, 250, 8, 90, 12, 33, 1, 60]       # two CP documents among short ones
    prompts = [[(i * 31 + j * 5) % V for j in range(n)] for i, n in enumerate(lengths)]
    reqs = [Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]
    homes = {}
    real_admit = eng.sched.admit

    def admit():
        real_admit()
        for s in eng.running:
            homes[s.req.index] = (s.cp, s.home)
    eng.sched.admit = admit
    res = sorted(eng.generate(reqs), key=lambda r: r.index)
    for r, p in zip(res, prompts):
        assert r.error is None
        assert r.token_ids == expected(p, 9), r.index
    short = [h for is_cp, h in homes.values() if not is_cp]
    assert sorted(i for i, (is_cp, _) in homes.items() if is_cp) == [1, 5]
    if policy == "spread":
        assert set(short) == {0, 1}
        assert min(runner.tokens_per_rank) > 0.6 * max(runner.tokens_per_rank)    # work balanced
    else:
        assert set(short) == {0}
    for pool in eng.sched.pools:                  # every block went back to its rank (free, or in the prefix cache)
        pool.check()
        assert pool.available == pool.num_blocks and not any(pool.ref)


def test_spread_balances_tokens_not_counts():
    """Short requests alternating long / very short: spreading by count would put every long one on the
    same CP rank; spreading by outstanding tokens keeps the ranks' work even."""
    cp = 2
    runner = FakeCPRunner(cp)
    eng = Engine(runner, _Tok(), max_batch=16, step_tokens=512, cp_min_tokens=1000, cp_short="spread")
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    lengths = [180, 2, 170, 3, 190, 2, 160, 4, 175, 1]
    prompts = [[(i * 13 + j * 7) % V for j in range(n)] for i, n in enumerate(lengths)]
    res = sorted(eng.generate([Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]),
                 key=lambda r: r.index)
    for r, p in zip(res, prompts):
        assert r.error is None and r.token_ids == expected(p, 4), r.index
    lo, hi = sorted(runner.tokens_per_rank)
    assert lo > 0.7 * hi, runner.tokens_per_rank


class CacheCheckingRunner(FakeCPRunner):
    """A fake replica with a real KV cache: each rank's pool rows store the (token, position) written to them,
    every sequence's rows must hold exactly its positions on that rank, and the next token is a function of all
    the tokens its rows hold (on every CP rank for a CP sequence), so a row read from the wrong block, a block
    shared by mistake or a write lost changes the output."""

    def __init__(self, cp, pool):
        super().__init__(cp, pool)
        self.tok = [[-1] * pool for _ in range(cp)]
        self.pos = [[-1] * pool for _ in range(cp)]

    def execute(self, batches):
        sums, cp_sums = [], []                     # per rank: {seq index: context value}; CP seqs by order
        for r, b in enumerate(batches):
            for j, row in enumerate(b.write_index.tolist()):
                if row != b.scratch_row:
                    self.tok[r][row], self.pos[r][row] = int(b.input_ids[j]), int(b.positions[j])
            mine, cps = {}, []
            for i in range(len(b.q_start)):
                rows = b.rows(i).tolist()
                want = b.kv_positions(i).tolist() if b.seq_mode(i) else list(range(b.kv_len[i]))
                assert [self.pos[r][x] for x in rows] == want, (r, i)
                mine[i] = sum(context_term(self.tok[r][x], self.pos[r][x]) for x in rows)
                if b.seq_mode(i):
                    cps.append(i)
            sums.append(mine)
            cp_sums.append(cps)
        out = []
        for r, b in enumerate(batches):
            rows = b.logits_rows.tolist()
            if not (r == 0 or b.gather_logits):
                continue
            lg = torch.full((len(rows), V), -10.0)
            for j, row in enumerate(rows):
                i = next(i for i in range(len(b.q_start)) if b.q_start[i] <= row < b.q_start[i] + b.q_len[i])
                if b.seq_mode(i):                  # its context is spread over every CP rank
                    k = cp_sums[r].index(i)
                    val = sum(sums[rr][cp_sums[rr][k]] for rr in range(len(batches)))
                else:
                    val = sums[r][i]
                lg[j, val % V] = 10.0
            out.append(lg)
        return torch.cat(out)


def context_term(tok: int, pos: int) -> int:
    return (tok * 7 + 1) * (pos * 3 + 5)


def expected_from_context(prompt, n):
    ctx, out = list(prompt), []
    for _ in range(n):
        t = sum(context_term(x, p) for p, x in enumerate(ctx)) % V
        out.append(t)
        ctx.append(t)
    return out


def _cp_run(lengths, new, pool_blocks, cp=2, prompts=None, prefix_cache=True, n=None, results=None):
    from mpiinfer.engine.kv_cache import KV_BLOCK
    from mpiinfer.parallel.shard import cp_local_count
    bs = KV_BLOCK
    runner = CacheCheckingRunner(cp, pool=pool_blocks * bs + 1)     # (+ the scratch row)
    eng = Engine(runner, _Tok(), max_batch=8, step_tokens=512, cp_min_tokens=200)
    if not prefix_cache:
        for pool in eng.sched.pools:
            pool.prefix_cache = False
    prompts = prompts or [[(i * 31 + j * 5) % V for j in range(n)] for i, n in enumerate(lengths)]
    n = n or [1] * len(prompts)
    # n > 1 samples (temperature 1 over the fake's one-hot logits: the argmax but for a ~1e-7 chance per token)
    reqs = [Request(i, i, SamplingParams(max_tokens=m, ignore_eos=True, n=k, temperature=1.0 if k > 1 else 0.0,
                                         seed=i), prompt_token_ids=p)
            for i, (p, m, k) in enumerate(zip(prompts, new, n))]
    admitted, preempted = [], []
    real_admit, real_victim = eng.sched.admit, eng.sched._victim

    def admit():
        real_admit()
        for s in eng.running:
            if s.cp and s.n_cached == 0:
                admitted.append([len(b) for b in s.rank_blocks] ==
                                [-(-cp_local_count(len(s.prompt), len(s.prompt), cp, r) // bs) for r in range(cp)])

    def victim(r):
        v = real_victim(r)
        # (victim is CP, an ordinary sequence held blocks on that rank)
        preempted.append((v.cp, any(not s.cp and s.holds(r) for s in eng.running)))
        return v
    eng.sched.admit, eng.sched._victim = admit, victim
    res = sorted(eng.generate(reqs), key=lambda r: r.index)
    for r, p, m in zip(res, prompts, new):
        assert r.error is None, r.error
        for c in r.choices or [r]:
            assert c.token_ids == expected_from_context(p, m), r.index
    if results is not None:
        results.extend(res)
    assert admitted and all(admitted)                      # the prompt shard's blocks only, nothing for max_tokens
    for pool in eng.sched.pools:
        pool.check()
        assert pool.available == pool.num_blocks and not any(pool.ref)
    return eng, preempted


def test_cp_sequences_take_blocks_as_they_grow_and_survive_preemption():
    """CP documents hold only their prompt shard's blocks when admitted, grow a block at a time on the rank that
    stores their next token, and restart identically when preempted; ordinary sequences are preempted before
    them; every row read is the right one (the cache-checking fake) and every block goes back to its pool."""
    # three CP documents and four short requests that grow by several blocks each: 12 blocks per rank
    eng, preempted = _cp_run([300, 9, 250, 40, 5, 330, 21], [40, 80, 50, 90, 70, 35, 100], 12)
    assert eng.sched.preemptions > 0 and preempted
    assert not any(was_cp and ordinary for was_cp, ordinary in preempted), "a CP document went before a short one"
    assert any(not was_cp for was_cp, _ in preempted)
    # CP documents alone, two at once (7 blocks each) in 16 blocks per rank: as they grow the newer one is preempted
    eng, preempted = _cp_run([200, 210, 205], [60, 60, 60], 16)
    assert preempted and all(was_cp for was_cp, _ in preempted)


def test_cp_documents_share_cached_groups():
    """CP documents that share a prefix share its full groups (``shard.cp_groups``) through the prefix cache on
    every CP rank: a document cut short and continued differently, one extending another, an identical one, two
    samples of one; those admitted while the first is computing wait for its groups instead of computing them
    too.  Every row read holds the right (token, position) (the cache-checking fake), every answer is the one
    computed without sharing, and every block goes back to its pool; under a tight cache too (preemptions)."""
    from mpiinfer.parallel.shard import cp_groups
    base = [(j * 7 + 3) % V for j in range(2400)]
    assert cp_groups(2400, 2) == [128] * 4 + [64]              # 4 groups of 512 tokens, one of 256, a 96-token tail
    prompts = [base,
               base[:1900] + [(j * 11) % V for j in range(200)],   # differs inside group 3: shares groups 0-2
               base + [5, 6, 7] * 10,                            # extends it: shares all 5 groups
               list(base),                                       # the same prompt: 5 groups, the tail computed
               [(j * 13 + 1) % V for j in range(2400)],          # nothing shared
               base[:2304] + [1] * 5]                            # the 5 groups and 5 more tokens
    n = [1, 1, 2, 1, 1, 1]                 # two samples (the result counts the first one's prompt, as prompt_tokens)
    want = [0, 1536, 2304, 2304, 0, 2304]
    for pool_blocks, new in ((400, [20, 15, 25, 10, 12, 8]), (100, [100] * 6)):
        res = []
        eng, _ = _cp_run(None, new, pool_blocks, prompts=prompts, n=n, results=res)
        got = [r.cached_tokens for r in res]
        if pool_blocks == 400:
            assert got == want, got
            assert eng.sched.preemptions == 0
        else:   # 100 blocks per rank (a document's shard takes 75): documents sharing groups run together and grow
            assert eng.sched.preemptions > 0 and sum(got) >= 2 * 2304, (eng.sched.preemptions, got)
        off = []
        _cp_run(None, new, pool_blocks, prompts=prompts, n=n, prefix_cache=False, results=off)
        assert [r.cached_tokens for r in off] == [0] * len(prompts)
        assert [[c.token_ids for c in r.choices or [r]] for r in res] == \
            [[c.token_ids for c in r.choices or [r]] for r in off]


def test_cp_documents_share_groups_across_layouts():
    """A document whose prompts fall on either side of a layout boundary (doc + 30 tokens: 4 groups of 512 tokens
    straddling the document's end; doc + 5: 7 groups of 256): a later prompt shares the longest chain of groups
    cached, in the layout they were stored in, and lays out only the rest (its own layout, not the default for its
    length), which later prompts share in turn.  The cache-checking fake checks every row against the layout the
    batch says; answers equal those with the cache off."""
    from mpiinfer.parallel.shard import cp_groups
    doc = [(j * 7 + 3) % V for j in range(2040)]
    qs = [[(j * 5 + k) % V for j in range(n)] for k, n in ((1, 30), (2, 5), (3, 100))]
    assert cp_groups(2070, 2) == [128] * 4 and cp_groups(2045, 2) == [64] * 7
    prompts = [doc + qs[0], doc + qs[1], doc + qs[2], doc + qs[1]]
    # doc + 5 takes doc + 30's first 3 groups (its 4th ends past the document) and lays out the rest as one group of
    # 256 and a tail; doc + 100 and doc + 5 again take those 3 and the group of 256
    want = [0, 1536, 1792, 1792]
    res, off = [], []
    _cp_run(None, [12] * 4, 400, prompts=prompts, results=res)
    assert [r.cached_tokens for r in res] == want
    _cp_run(None, [12] * 4, 400, prompts=prompts, prefix_cache=False, results=off)
    assert [r.token_ids for r in res] == [r.token_ids for r in off]
