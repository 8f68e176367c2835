"""Batched one-token decode attention (``Attention._attend_decodes``) equals the per-sequence path."""
import pytest
import torch

from mpiinfer.models import attention
from mpiinfer.models.attention import Attention, Span, decode_group
from mpiinfer.models.step import StepBatch


class _Heads:
    n_kv, group, head_dim, n_q, scale, window, span, sink = 2, 3, 16, 6, 0.25, None, Span(), None
    _softmax = Attention._softmax


def _batch(lengths, qlens=None, gap=5):
    qlens = qlens or [1] * len(lengths)
    q_start = [sum(qlens[:i]) for i in range(len(lengths))]
    bases = [sum(n + gap for n in lengths[:i]) for i in range(len(lengths))]
    T = sum(qlens)
    return StepBatch(torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long), q_start, qlens, bases,
                     list(lengths), torch.arange(len(lengths)))


@pytest.mark.parametrize("dtype,tol,kv_dtype", [(torch.float32, 1e-6, None), (torch.bfloat16, 1e-2, None),
                                                (torch.float32, 1e-6, torch.bfloat16),   # --kv-dtype
                                                (torch.bfloat16, 1e-2, torch.float32)])
def test_grouped_decodes_equal_per_sequence(dtype, tol, kv_dtype):
    """``kv_dtype``: a cache of another dtype than the queries, against the per-sequence path over the same rows
    in the queries' dtype."""
    g = torch.Generator().manual_seed(0)
    a = _Heads()
    lengths = [7, 1, 30, 12, 19]
    b = _batch(lengths)
    pool = sum(lengths) + 5 * len(lengths)
    kc = torch.randn(a.n_kv, pool, a.head_dim, generator=g).to(kv_dtype or dtype)
    vc = torch.randn(a.n_kv, pool, a.head_dim, generator=g).to(kv_dtype or dtype)
    q = torch.randn(len(lengths), a.n_q, a.head_dim, generator=g).to(dtype)
    group = decode_group(b, None, kc.element_size() * a.n_kv * a.head_dim)
    assert group is not None and group[0] == set(range(len(lengths)))
    got = torch.full((len(lengths), a.n_q, a.head_dim), float("nan"), dtype=dtype)
    Attention._attend_decodes(a, q, kc, vc, got, *group[1:])
    for i, (base, kl) in enumerate(zip(b.kv_base, b.kv_len)):
        want = Attention._attend(a, q[i:i + 1], kc[:, base:base + kl].to(dtype), vc[:, base:base + kl].to(dtype), kl)
        assert torch.allclose(got[i:i + 1].float(), want.float(), atol=tol, rtol=tol), i
    # the padding really is masked: poisoning rows outside every sequence changes nothing
    kc2, vc2 = kc.clone(), vc.clone()
    used = torch.zeros(pool, dtype=torch.bool)
    for base, kl in zip(b.kv_base, b.kv_len):
        used[base:base + kl] = True
    kc2[:, ~used], vc2[:, ~used] = 1e4, 1e4
    got2 = torch.empty_like(got)
    Attention._attend_decodes(a, q, kc2, vc2, got2, *group[1:])
    assert torch.equal(got, got2)


def test_group_selection():
    b = _batch([5, 6, 7, 8, 9], qlens=[1, 1, 3, 1, 1])    # the 3-token chunk is not a decode
    sel = decode_group(b, None, 64)
    assert sel[0] == {0, 1, 3, 4} and sel[1].tolist() == [0, 1, 5, 6]
    assert decode_group(_batch([5, 6, 7]), None, 64) is None                  # too few to pay off
    assert decode_group(_batch([3, 4, 5, 6, 7, 8]), span=6, row_bytes=64)[0] == {0, 1, 2, 3}  # beyond it: loop
    # a chunk of 7 (Llama 4): a decode at position 7 or later starts a new chunk, so attends part of its rows
    assert decode_group(_batch([3, 4, 5, 6, 7, 8]), Span(chunk=7), row_bytes=64)[0] == {0, 1, 2, 3, 4}
    assert [Span(chunk=4).first(p) for p in (0, 3, 4, 9)] == [0, 0, 4, 8]
    assert [Span(window=4).first(p) for p in (0, 3, 4, 9)] == [0, 0, 1, 6] and Span().whole(10**6)
    too_long = attention.DECODE_GATHER_BYTES // 64
    assert decode_group(_batch([5, 6, 7, too_long]), None, 64) is None        # gather would cost too much


def test_engine_bf16_grouped_equals_loop(model_dirs, monkeypatch):
    """End to end in bfloat16 on the torch paths (CUDA's; on CPU the native kernels replace both): grouped, the
    same tokens as with every decode attended alone."""
    from mpiinfer import native
    monkeypatch.setattr(native, "usable", lambda *a: False)
    from mpiinfer.comm.mesh import Mesh
    from mpiinfer.config import EngineConfig, SamplingParams
    from mpiinfer.device import Device
    from mpiinfer.engine.generate import Engine
    from mpiinfer.engine.runner import ModelRunner
    from mpiinfer.messages import Request
    from mpiinfer.tokenizer import Tokenizer
    d = model_dirs("qwen2")
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 22, dtype="bfloat16"), Mesh.single(), Device("cpu"))
    sp = SamplingParams(max_tokens=16, logprobs=True, ignore_eos=True)
    calls = []
    real = Attention._attend_decodes
    monkeypatch.setattr(Attention, "_attend_decodes", lambda self, *a: calls.append(1) or real(self, *a))

    def run():
        eng = Engine(runner, Tokenizer(d), max_batch=6, step_tokens=64)
        reqs = [Request(i, i, sp, prompt_token_ids=list(range(3, 3 + 2 * i + 1))) for i in range(6)]
        return sorted(eng.generate(reqs), key=lambda r: r.index)
    grouped = run()
    assert calls, "grouped decode attention never ran"
    monkeypatch.setattr(attention, "DECODE_GROUP_MIN", 10 ** 9)
    calls.clear()
    alone = run()
    assert not calls
    for g, a in zip(grouped, alone):
        assert g.token_ids == a.token_ids
        assert max(abs(x - y) for x, y in zip(g.logprobs, a.logprobs)) < 2e-2


def _sink_reference(q, K, V, sink, scale):
    """softmax over [scores, sink] per query head, the sink's column dropped (float64): (n_q, hd)."""
    n_q = q.shape[0]
    n_kv = K.shape[0]
    Kr = K.double().repeat_interleave(n_q // n_kv, 0)                       # (n_q, kl, hd)
    Vr = V.double().repeat_interleave(n_q // n_kv, 0)
    s = torch.einsum("hd,hkd->hk", q.double(), Kr) * scale
    p = torch.softmax(torch.cat((s, sink.double().reshape(n_q, 1)), -1), -1)[:, :-1]
    return torch.einsum("hk,hkd->hd", p, Vr)


def test_attention_sinks_on_every_torch_path():
    """gpt-oss's sinks: grouped decodes, the decode loop, one decode and a prompt chunk (explicit scores, in query
    blocks) against softmax over [scores, sink] computed directly."""
    g = torch.Generator().manual_seed(3)
    a = _Heads()
    a.sink = torch.randn(a.n_kv, a.group, generator=g) * 2
    a._attend_explicit = lambda *args: Attention._attend_explicit(a, *args)
    lengths = [7, 1, 30, 12, 19]
    b = _batch(lengths)
    pool = sum(lengths) + 5 * len(lengths)
    kc = torch.randn(a.n_kv, pool, a.head_dim, generator=g)
    vc = torch.randn(a.n_kv, pool, a.head_dim, generator=g)
    q = torch.randn(len(lengths), a.n_q, a.head_dim, generator=g)
    want = [_sink_reference(q[i], kc[:, base:base + kl], vc[:, base:base + kl], a.sink, a.scale)
            for i, (base, kl) in enumerate(zip(b.kv_base, b.kv_len))]
    grouped = torch.empty(len(lengths), a.n_q, a.head_dim)
    Attention._attend_decodes(a, q, kc, vc, grouped, *decode_group(b, None, 64)[1:])
    loop = torch.empty_like(grouped)
    Attention._attend_decode_loop(a, q, kc, vc, loop, [(i, [(base, kl)]) for i, (base, kl)
                                                         in enumerate(zip(b.kv_base, b.kv_len))])
    for i, (base, kl) in enumerate(zip(b.kv_base, b.kv_len)):
        one = Attention._attend(a, q[i:i + 1], kc[:, base:base + kl], vc[:, base:base + kl], kl)
        for got in (grouped[i], loop[i], one[0]):
            assert torch.allclose(got.double(), want[i], atol=1e-5), i
    # a prompt chunk: the last 5 of 30 positions, in query blocks of 2 (the block size forced small)
    base, kl = b.kv_base[2], 30
    qp = torch.randn(5, a.n_q, a.head_dim, generator=g)
    old = attention.SINK_SCORE_ELEMS
    attention.SINK_SCORE_ELEMS = 2 * a.n_q * kl
    try:
        got = Attention._attend(a, qp, kc[:, base:base + kl], vc[:, base:base + kl], kl)
    finally:
        attention.SINK_SCORE_ELEMS = old
    for j in range(5):
        n = kl - 5 + j + 1                                                    # causal: rows up to its position
        assert torch.allclose(got[j].double(), _sink_reference(qp[j], kc[:, base:base + n], vc[:, base:base + n],
                                                                a.sink, a.scale), atol=1e-5), j
    # a banded layer (window 8): each block scores only the keys its queries reach
    a.span = Span(window=8)
    attention.SINK_SCORE_ELEMS = 2 * a.n_q * 9
    try:
        got = Attention._attend(a, qp, kc[:, base:base + kl], vc[:, base:base + kl], kl)
    finally:
        attention.SINK_SCORE_ELEMS = old
    for j in range(5):
        n = kl - 5 + j + 1
        assert torch.allclose(got[j].double(), _sink_reference(qp[j], kc[:, base + n - 8:base + n],
                                                                vc[:, base + n - 8:base + n], a.sink, a.scale),
                              atol=1e-5), j
