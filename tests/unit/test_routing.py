"""Prefix-affine routing (``coordinator.Source``): records that start alike go to one replica, no replica idles
while records wait, nothing is lost or handed out twice, and the window still bounds what is in flight."""
import random

from mpiinfer.config import SamplingParams
from mpiinfer.coordinator import Source, prefix_key
from mpiinfer.messages import ErrorInfo, Request, Result

SP = SamplingParams()
DOCS = [f"document {k}: " + "lorem ipsum " * 40 for k in range(6)]


def _reqs(n, seed=0):
    rng = random.Random(seed)
    return [Request(i, i, SP, prompt=rng.choice(DOCS) + f"question {i}?") for i in range(n)]


def test_prefix_key_groups_by_the_start():
    a, b, c = (Request(0, 0, SP, prompt=DOCS[0] + "x"), Request(1, 1, SP, prompt=DOCS[0] + "y"),
               Request(2, 2, SP, prompt=DOCS[1] + "x"))
    assert prefix_key(a) == prefix_key(b) != prefix_key(c)
    m = [{"role": "system", "content": DOCS[2]}, {"role": "user", "content": "q"}]
    assert prefix_key(Request(0, 0, SP, messages=m)) == prefix_key(Request(1, 1, SP, messages=m[:1] + [m[1] | {"content": "z"}]))
    t = list(range(100))
    assert prefix_key(Request(0, 0, SP, prompt_token_ids=t)) == prefix_key(Request(1, 1, SP, prompt_token_ids=t[:64] + [7]))
    assert prefix_key(Result(0, 0, error=ErrorInfo("invalid_json", "x"))) is None
    # embedding requests by their first input (not all under one key)
    emb = lambda x: Request(0, 0, SP, inputs=x)
    assert prefix_key(emb(["a" * 300 + "x"])) == prefix_key(emb(["a" * 300 + "y", "z"])) != prefix_key(emb(["b"]))
    assert prefix_key(emb([t + [1]])) == prefix_key(emb([t + [2]])) != prefix_key(emb([[9]]))


def _serve(src, seed=1):
    """Three replicas asking for 1-8 records at random; each batch is written at once."""
    got = {0: [], 1: [], 2: []}
    rng = random.Random(seed)
    while not src.exhausted:
        r = rng.randrange(3)
        items = src.take(rng.randint(1, 8), replica=r)
        assert src.in_flight <= 64
        got[r] += items
        src.in_flight -= len(items)
        assert items or src.exhausted                   # no replica is refused while records wait
    return got


def test_affine_source_routes_by_prefix_and_never_idles():
    reqs = _reqs(600)
    got = _serve(Source(iter(reqs), window=64, affine=True, lookahead=64))
    assert sorted(x.index for v in got.values() for x in v) == list(range(600))     # each record once
    # a replica computes a document's prefix once per document it serves: (replica, document) pairs
    pairs = lambda g: len({(r, prefix_key(x)) for r, v in g.items() for x in v})
    rr = _serve(Source(iter(reqs), window=64))
    assert pairs(got) <= 0.7 * pairs(rr), (pairs(got), pairs(rr))
    assert all(len(v) > 100 for v in got.values())      # and the load still spreads
    # plain round-robin hands records out in input order
    assert [x.index for x in Source(iter(reqs), window=64).take(10, replica=1)] == list(range(10))


def test_affine_source_hands_out_a_replicas_own_records_first_and_errors_to_anyone():
    reqs = [Request(i, i, SP, prompt=DOCS[i % 2] + str(i)) for i in range(8)]
    reqs.insert(3, Result(99, 99, error=ErrorInfo("invalid_json", "x")))
    src = Source(iter(reqs), window=100, affine=True, lookahead=100)
    a = src.take(2, replica=0)                          # the error result (anyone's), then the oldest new key's
    assert [x.index for x in a] == [0, 99] and src.owner == {prefix_key(reqs[0]): {0}}
    b = src.take(3, replica=1)                          # document 1 is nobody's: it becomes replica 1's
    assert [x.index for x in b] == [1, 3, 5] and src.owner[prefix_key(reqs[1])] == {1}
    c = src.take(10, replica=1)                         # its own last one, then it joins document 0
    assert [x.index for x in c] == [2, 4, 6, 7]          # in input order
    assert src.owner[prefix_key(reqs[0])] == {0, 1}
    src.stopped = True
    assert src.take(5) == [] and src.exhausted


class _Held:
    """What ``replica.wanted`` reads of an engine."""

    def __init__(self, max_batch, running, waiting):
        self.max_batch, self.running, self.waiting = max_batch, [0] * running, [0] * waiting


def test_a_replica_queues_little_beyond_its_batch():
    """``replica.wanted``: free batch slots, but at most QUEUE_MIN sequences waiting (a batch, if smaller; twice
    the sequences the last step finished, if more: an engine that finishes its whole batch each step), less what
    was asked for already.  A
    replica queueing a whole batch took all of a job shorter than its batch, and ended the job still holding
    a batch of queued requests while the other replicas had finished."""
    from mpiinfer.replica import QUEUE_MIN, wanted
    assert wanted(_Held(256, 0, 0)) == QUEUE_MIN                        # a fresh replica: a queue, not a batch
    assert wanted(_Held(256, 0, 0), asked=10) == QUEUE_MIN - 10
    assert wanted(_Held(256, 250, 0)) == QUEUE_MIN                      # the free slots plus the queue, at most
    assert wanted(_Held(256, 256, 20)) == QUEUE_MIN - 20
    assert wanted(_Held(256, 256, QUEUE_MIN)) == wanted(_Held(256, 40, 50)) == 0
    assert wanted(_Held(8, 0, 0)) == 8 and wanted(_Held(8, 8, 3)) == 5   # a small batch: a queue of one batch
    # an engine that finishes 64 a step (the null engine's whole batch) keeps 128 queued
    assert wanted(_Held(64, 0, 0), last=64) == 128
    # the sequences behind a step's results: n samples, embedding inputs
    from mpiinfer.messages import Choice
    from mpiinfer.replica import finished
    one, four = Result(0, 0), Result(1, 1, choices=[Choice("", [], "length")] * 4)
    assert finished([one, four, Result(2, 2, embeddings=[[0.0], [1.0], [2.0]])]) == 1 + 4 + 3
    # a job shorter than two replicas' batches is split: each takes its queue in turn, never the whole job
    src, got = Source(iter(_reqs(300)), window=1024), {0: 0, 1: 0}
    held = {r: _Held(256, 0, 0) for r in got}
    while not src.exhausted:
        for r in got:
            n = len(src.take(wanted(held[r]), replica=r))
            got[r] += n
            held[r].running += [0] * n                                  # started at once, none finishes yet
    assert sum(got.values()) == 300 and abs(got[0] - got[1]) <= QUEUE_MIN, got      # 160 / 140


class _OneKeyAtATime(Source):
    """The affine ``take`` as first written (a scan of the records read ahead per key claimed: O(window) per
    record when every record has its own key), kept as the reference for the one-pass ``take``."""

    def take(self, n, replica=0):
        import collections
        n = min(n, self.window - self.in_flight)
        if n <= 0:
            return []
        while len(self.ahead) < self.lookahead and (item := self._next()) is not None:
            self.ahead.append((prefix_key(item), item))
        pick = self._mine(n, replica)
        while len(pick) < n:
            rest = [k for j, (k, _) in enumerate(self.ahead) if j not in pick]
            if not rest:
                break
            new = next((k for k in rest if k not in self.owner), None)
            if new is not None:
                self.owner[new] = {replica}
            else:
                self.owner[collections.Counter(rest).most_common(1)[0][0]].add(replica)
            pick |= self._mine(n - len(pick), replica, skip=pick)
        out = [self.ahead[j][1] for j in sorted(pick)]
        self.ahead = [x for j, x in enumerate(self.ahead) if j not in pick]
        self.in_flight += len(out)
        return out

    def _mine(self, n, replica, skip=frozenset()):
        pick = set()
        for j, (key, _) in enumerate(self.ahead):
            if len(pick) >= n:
                break
            if j not in skip and (key is None or replica in self.owner.get(key, ())):
                pick.add(j)
        return pick


def test_affine_take_hands_out_what_it_did_in_one_pass():
    """The one-pass affine ``take`` gives every replica the same records, in the same order, and leaves the same
    owners as the scan per claimed key it replaced, on random workloads: few keys, a key per record, error
    results among them, replicas asking for 1-40 at a time."""
    for seed in range(30):
        rng = random.Random(seed)
        n_keys = rng.choice([2, 6, 40, 10_000])
        items = []
        for i in range(rng.randint(50, 400)):
            if rng.random() < 0.05:
                items.append(Result(i, i, error=ErrorInfo("invalid_json", "x")))
            else:
                items.append(Request(i, i, SP, prompt=f"key {rng.randrange(n_keys)} " + "x" * 300 + f" q{i}"))
        window = rng.choice([16, 64, 256])
        a = Source(iter(items), window=window, affine=True, lookahead=window)
        b = _OneKeyAtATime(iter(items), window=window, affine=True, lookahead=window)
        while not (a.exhausted and b.exhausted):
            r, k = rng.randrange(3), rng.randint(1, 40)
            got, want = a.take(k, replica=r), b.take(k, replica=r)
            assert [x.index for x in got] == [x.index for x in want], seed
            assert a.owner == b.owner
            done = rng.randint(0, a.in_flight)
            a.in_flight -= done
            b.in_flight -= done
        assert a.in_flight == b.in_flight
