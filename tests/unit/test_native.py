"""The C kernels (``mpiinfer.native``) against the torch paths they replace, and the engine on them against
transformers (with shared-prefix groups, sliding windows, q/k norms and bfloat16), and without them."""
import pytest
import torch
import torch.nn.functional as F

from mpiinfer import native
from mpiinfer.comm.mesh import Mesh
from mpiinfer.config import EngineConfig, SamplingParams
from mpiinfer.device import Device
from mpiinfer.engine.generate import Engine
from mpiinfer.engine.runner import ModelRunner
from mpiinfer.messages import Request
from mpiinfer.models import attention
from mpiinfer.models.attention import Attention
from mpiinfer.models.layers import MLP, RMSNorm, Rotary
from mpiinfer.tokenizer import Tokenizer

from ..reference import hf_greedy
from .test_prefix_cache import shared_prefix_prompts

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native kernels are off")


def _runs(g, pool, count):
    out = []
    for _ in range(count):
        runs = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            n = int(torch.randint(1, 40, (1,), generator=g))
            runs.append((int(torch.randint(0, pool - n, (1,), generator=g)), n))
        out.append(runs)
    return out


def _reference(q, kc, vc, rows, scale):
    """Attention of one decode's query heads (n_q, hd) over the cache rows ``rows``, in float64."""
    n_kv, _, hd = kc.shape
    K, V = kc[:, rows].double(), vc[:, rows].double()
    qg = q.double().view(n_kv, -1, hd)
    p = torch.softmax(qg @ K.transpose(1, 2) * scale, dim=-1)
    return (p @ V).reshape(-1, hd)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("grp", [1, 3, 8])
@pytest.mark.parametrize("hd", [16, 32, 64, 128, 256, 24])  # the tiled kernel's sizes, and one it does not take
def test_decode_attention_over_paged_runs(dtype, tol, grp, hd, kv_dtype=None):
    """``kv_dtype``: a cache of another dtype than q and out (``--kv-dtype``)."""
    g = torch.Generator().manual_seed(grp * 1000 + hd)
    n_kv, pool, T = 2, 300, 14
    n_q = n_kv * grp
    kc = torch.randn(n_kv, pool, hd, generator=g).to(kv_dtype or dtype)
    vc = torch.randn(n_kv, pool, hd, generator=g).to(kv_dtype or dtype)
    qkv = torch.randn(T, (n_q + 2 * n_kv) * hd, generator=g).to(dtype)   # q as a strided slice of it
    q = qkv[:, :n_q * hd]
    runs = _runs(g, pool, 9)
    q_rows = [1, 2, 3, 5, 6, 8, 9, 11, 13]
    rows = [torch.cat([torch.arange(a, a + n) for a, n in r]) for r in runs]
    skip = [0, 0, max(0, len(rows[2]) - 7), 0, len(rows[4]) - 1, 0, 0, 3 if len(rows[7]) > 3 else 0, 0]  # windows
    out = torch.full((T, n_q * hd), float("nan"), dtype=dtype)
    native.decode_attention(q, kc, vc, native.DecodeRuns(q_rows, runs, skip), 0.3, out, n_q)
    if hd > 128 and dtype == torch.float32:
        # scores of 256 products at this scale reach ~15: float32's rounding of them, through the exponentials,
        # differs from float64 by up to 1.3e-6 (AVX-512 tiles) and 2.4e-6 (AVX2 tiles), measured
        tol *= 2
    for i, r in enumerate(q_rows):
        want = _reference(q[r], kc, vc, rows[i][skip[i]:], 0.3)
        got = out[r].view(n_q, hd).double()
        assert torch.allclose(got, want, atol=tol, rtol=tol), i
    untouched = sorted(set(range(T)) - set(q_rows))
    assert torch.isnan(out[untouched].float()).all()          # only the decodes' rows are written


@pytest.mark.parametrize("span", [attention.Span(), attention.Span(window=6), attention.Span(chunk=8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
def test_prompt_chunks_attend_through_the_kernel(span, dtype, tol):
    """``attention.native_items``: prompt chunks (one in 3 runs after a cached prefix, one whole prompt in one
    run) and decodes in one kernel call, each query row over the rows up to its own position less what the window
    or chunk leaves out; against the torch path (``_attend`` over the gathered rows, masked) in float64."""
    from mpiinfer.models.step import StepBatch
    g = torch.Generator().manual_seed(5)
    n_kv, grp, hd, pool = 2, 3, 32, 200
    n_q = n_kv * grp
    kc = torch.randn(n_kv, pool, hd, generator=g).to(dtype)
    vc = torch.randn(n_kv, pool, hd, generator=g).to(dtype)
    ext = [[(40, 7), (100, 16), (10, 3)], [(150, 9)], [(60, 1), (120, 12)]]     # 26, 9 and 13 rows
    q_len = [5, 9, 1]
    kl = [sum(n for _, n in e) for e in ext]
    q_start = [0, 5, 14]
    T = 15
    b = StepBatch(torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long), q_start, q_len,
                  [e[0][0] for e in ext], kl, torch.arange(3), kv_ext=ext)
    d = attention.native_items(b, [0, 1, 2], span)
    assert d.n == T
    q = torch.randn(T, n_q * hd, generator=g).to(dtype)
    out = torch.full((T, n_q * hd), float("nan"), dtype=dtype)
    native.decode_attention(q, kc, vc, d, 0.3, out, n_q)
    for i in range(3):
        rows = torch.from_numpy(b.rows(i))
        for j in range(q_len[i]):
            p = kl[i] - q_len[i] + j                                      # this query's position
            first = int(span.first(p))
            want = _reference(q[q_start[i] + j], kc, vc, rows[first:p + 1], 0.3)
            got = out[q_start[i] + j].view(n_q, hd).double()
            assert torch.allclose(got, want, atol=tol, rtol=tol), (i, j)


def test_long_prompt_chunks_keep_torchs_attention(monkeypatch):
    """Prompt chunks whose attended K/V exceed NATIVE_PREFILL_BYTES stay on torch's attention; a window or chunk
    bounds the rows counted (``Span.rows_read``), decodes always take the kernel."""
    from mpiinfer.models.attention import AttentionPlan, Span
    from mpiinfer.models.step import StepBatch
    assert [Span().rows_read(8, 100), Span(window=10).rows_read(8, 100), Span(chunk=16).rows_read(8, 100),
            Span(window=10).rows_read(8, 12)] == [100, 17, 23, 12]
    monkeypatch.setattr(attention, "NATIVE_PREFILL_BYTES", 50 * 64)       # 50 rows of 64 bytes
    q_len, kv_len = [8, 8, 1], [100, 40, 300]
    q_start = [0, 8, 16]
    b = StepBatch(torch.zeros(17, dtype=torch.long), torch.zeros(17, dtype=torch.long), q_start, q_len,
                  [0, 1000, 2000], kv_len, torch.arange(3))
    for span, torch_prompts in ((Span(), [0]), (Span(window=10), [])):
        plan = AttentionPlan.build(b, None, span, row_bytes=32, group_decodes=False, use_native=True,
                                   cache_row_bytes=64)
        assert plan.local == torch_prompts
        assert plan.native.n == 17 - 8 * len(torch_prompts)


@pytest.mark.parametrize("dtype,kv_dtype,tol", [
    (torch.float32, torch.bfloat16, 2e-6),     # float32 arithmetic over the cache's exact bfloat16 values
    (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize("grp,hd", [(3, 64), (8, 128), (1, 24)])
def test_decode_attention_over_a_cache_of_another_dtype(dtype, kv_dtype, tol, grp, hd):
    test_decode_attention_over_paged_runs(dtype, tol, grp, hd, kv_dtype)


@pytest.fixture(scope="module")
def isa_builds(tmp_path_factory):
    """{isa: the kernels' library built for it}, built once per module as asked for."""
    built = {}

    def get(isa):
        if isa not in built:                 # a failed build is kept too: one error, not one build per test
            so = tmp_path_factory.mktemp(isa) / "k.so"
            try:
                native.build_library(so, native.ISA_FLAGS[isa])
                built[isa] = so
            except RuntimeError as e:
                built[isa] = e
        if isinstance(built[isa], Exception):
            raise built[isa]
        return built[isa]
    return get


TILE_WIDTH = {"avx512": 16, "avx2": 8, "rows": 0}          # rows per tile of each build's decode attention


@pytest.fixture(params=["avx512", "avx2", "rows"])
def other_isa(request, isa_builds, monkeypatch):
    """The kernels built as on a CPU with fewer vector extensions than this one, loaded in place of this
    machine's build for the test."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the other builds take x86 extensions away")
    flags = native._cpu_key().split()
    if request.param == "avx512" and "avx512_bf16" not in flags:
        pytest.skip("this CPU has no AVX512-BF16: the default build is the plain AVX-512 (or a narrower) one")
    if request.param == "avx2" and "avx512f" not in flags:
        pytest.skip("this CPU has no AVX-512: the default build is the AVX2 one already")
    if request.param == "rows" and "avx2" not in flags:
        pytest.skip("this CPU has no AVX2: the default build is the row-at-a-time one already")
    lib = native.load_library(isa_builds(request.param))
    # the build runs the kernel meant for such a CPU (not a silent fallback to another one)
    assert lib.decode_tile_width() == TILE_WIDTH[request.param] and lib.decode_bf16_dot() == 0
    monkeypatch.setattr(native, "_LIB", [lib])
    return request.param


def test_this_cpu_runs_the_widest_tiles_it_has():
    flags = native._cpu_key().split()
    # bfloat16 dot products where the CPU has them (the pass-1 path of bfloat16 queries over a bfloat16 cache)
    assert native._lib().decode_bf16_dot() == ("avx512_bf16" in flags and "avx512f" in flags)
    want = 16 if "avx512f" in flags else 8 if "avx2" in flags and "fma" in flags else 0
    if not any(f in flags for f in ("avx2", "avx512f", "sse2")):
        pytest.skip("not an x86 CPU: the row-at-a-time kernel")
    assert native.tile_width() == want


@pytest.mark.parametrize("dtype,tol,kv_dtype", [(torch.float32, 2e-6, None), (torch.bfloat16, 1e-2, None),
                                                (torch.float32, 2e-6, torch.bfloat16)])
@pytest.mark.parametrize("grp", [1, 3, 8])
@pytest.mark.parametrize("hd", [16, 32, 64, 128, 256, 24])
def test_decode_attention_on_other_cpus(dtype, tol, kv_dtype, grp, hd, other_isa):
    test_decode_attention_over_paged_runs(dtype, tol, grp, hd, kv_dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("hd", [16, 128])
def test_decode_attention_continues_a_shared_prefix_state_on_other_cpus(dtype, tol, hd, other_isa):
    test_decode_attention_continues_a_shared_prefix_state(dtype, tol, hd)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("hd", [16, 128])
def test_decode_attention_continues_a_shared_prefix_state(dtype, tol, hd):
    """init = (max, sum, weighted values) of rows attended elsewhere: the result is attention over those rows
    and the sequence's own ones together (a sequence with no rows of its own included)."""
    g = torch.Generator().manual_seed(7)
    n_kv, grp, pool = 2, 4, 200
    n_q = n_kv * grp
    kc = torch.randn(n_kv, pool, hd, generator=g).to(dtype)
    vc = torch.randn(n_kv, pool, hd, generator=g).to(dtype)
    q = torch.randn(3, n_q * hd, generator=g).to(dtype)
    prefix = torch.arange(100, 140)
    tails = [[(10, 5), (60, 9)], [], [(150, 30)]]
    s = (q.view(3, n_kv, grp, hd).float() @ kc[:, prefix].float().transpose(1, 2).unsqueeze(0)) * 0.25
    m = s.amax(-1)                                            # (3, n_kv, grp)
    p = torch.exp(s - m[..., None])
    init = (m.reshape(3, n_q), p.sum(-1).reshape(3, n_q), (p @ vc[:, prefix].float().unsqueeze(0)).reshape(3, n_q, hd))
    out = torch.zeros(3, n_q * hd, dtype=dtype)
    native.decode_attention(q, kc, vc, native.DecodeRuns([0, 1, 2], tails, None), 0.25, out, n_q, init=init)
    for i, t in enumerate(tails):
        rows = torch.cat([prefix] + [torch.arange(a, a + n) for a, n in t])
        assert torch.allclose(out[i].view(n_q, hd).double(), _reference(q[i], kc, vc, rows, 0.25), atol=tol), i


def _ulps(got: torch.Tensor, want: torch.Tensor) -> int:
    """The largest relative distance between two tensors in units of ``want``'s dtype's eps (1 to 2 ulp each;
    NaNs and infinities where both have them)."""
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    g, w = got.float()[~torch.isnan(want)], want.float()[~torch.isnan(want)]
    eps = torch.finfo(want.dtype).eps
    scale = torch.maximum(w.abs(), torch.full_like(w, torch.finfo(want.dtype).tiny)) * eps
    d = torch.where(g == w, torch.zeros_like(w), (g - w).abs())     # equal infinities: 0 apart
    return int((d / scale).max().ceil()) if g.numel() else 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["weight", "f32_scale", "none"])
@pytest.mark.parametrize("T,H,n", [(1, 1, 576), (7, 1, 100), (40, 1, 2048), (5, 4, 64), (3, 2, 24)])
def test_rms_norm_matches_the_torch_path(dtype, mode, T, H, n):
    """``native.rms_norm`` against ``RMSNorm``'s torch ops (the weight in the model dtype, Gemma's / gpt-oss's
    float32 scale, none), on rows with a stride (a slice of a wider tensor) and per-head rows (q/k norms); the
    residual add before it, in place, bit for bit as ``x + a``.  The norm itself within rounding: the sum of
    squares is added in another order than torch's (float32: a few ulp; bfloat16: at most one)."""
    g = torch.Generator().manual_seed(T * 100 + n)
    norm = RMSNorm(None if mode == "none" else "w", n, 1e-6, dtype, f32_weight=mode == "f32_scale")
    if norm.weight is not None:
        norm.weight.copy_(torch.randn(n, generator=g))
        norm.scale = norm.weight.float() if norm.f32 else None
    for with_add in (False, True):
        wide = (torch.randn(T, H * n + 8, generator=g) * 3).to(dtype)
        beside = wide[:, H * n:].clone()
        x = wide[:, :H * n] if H == 1 else wide[:, :H * n].view(T, H, n)
        a = (torch.randn(T, H * n, generator=g) * 2).to(dtype).view(x.shape)
        summed = x + a
        want = norm(summed if with_add else x)                 # use_native off: the torch ops
        got = native.rms_norm(x, norm.mode, norm.weight, norm.scale, norm.eps, add=a if with_add else None)
        assert got.shape == want.shape and got.dtype == dtype
        if with_add:
            assert torch.equal(x, summed)                         # x's rows are x + a now, exactly
        assert _ulps(got, want) <= (4 if dtype == torch.float32 else 1), with_add
        assert torch.equal(wide[:, H * n:], beside)               # the slice's neighbours are not written


def test_elementwise_kernels_decline_what_they_do_not_take():
    """Layouts, dtypes and weights the kernels cannot read give None (the caller runs the torch ops)."""
    x = torch.randn(6, 8)
    assert native.rms_norm(x.t(), native.NORM_NONE, None, None, 1e-6) is None          # columns, not rows
    assert native.rms_norm(x, native.NORM_NONE, None, None, 1e-6, add=torch.randn(6, 4)) is None
    assert native.rms_norm(x.half(), native.NORM_NONE, None, None, 1e-6) is None
    assert native.rms_norm(x, native.NORM_WEIGHT, torch.randn(8).bfloat16(), None, 1e-6) is None
    assert native.rms_norm(x, native.NORM_WEIGHT, torch.randn(7), None, 1e-6) is None
    assert native.rms_norm(x, native.NORM_F32_SCALE, None, torch.randn(8).double(), 1e-6) is None
    shared = torch.randn(1, 8).expand(6, 8)                       # rows in place that overlap
    assert native.rms_norm(shared, native.NORM_NONE, None, None, 1e-6, add=torch.randn(6, 8)) is None
    assert native.silu_mul(torch.randn(4, 10).t(), 2) is None
    assert native.silu_mul(torch.randn(4, 10).half(), 5) is None


def test_silu_of_large_negative_gates_underflows_as_torch():
    """exp(-g) near float32's overflow (88.4-88.7: 2^z with z = 128) is finite, as in torch."""
    gu = torch.tensor([[-88.0, -88.5, -88.7, -89.0, 1.0, 1.0, 1.0, 1.0] * 2 + [1.0] * 16])
    want = F.silu(gu[:, :16]) * gu[:, 16:]
    got = native.silu_mul(gu, 16)
    assert _ulps(got, want) <= 4 and (got[0, :3] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,n", [(1, 1536), (33, 1536), (9, 100)])
def test_silu_mul_matches_torch(dtype, T, n):
    """``silu(gate) * up`` of a fused gate/up output in one pass: float32 within 4 eps relative (another exp than
    torch's: Cephes' within 2 ulp, where silu(g) of a negative g carries it whole), bfloat16 within 1 (each op
    rounded as torch rounds it); 0, +-100, inf and NaN gates included."""
    g = torch.Generator().manual_seed(T + n)
    gu = (torch.randn(T, 2 * n + 4, generator=g) * 4).to(dtype)[:, :2 * n]
    gu[0, :6] = torch.tensor([0.0, -100.0, 100.0, float("nan"), float("inf"), -float("inf")]).to(dtype)
    want = F.silu(gu[:, :n]) * gu[:, n:]
    got = native.silu_mul(gu, n)
    assert _ulps(got, want) <= (4 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_kernels_on_other_cpus(dtype, other_isa):
    for mode in ("weight", "f32_scale", "none"):
        test_rms_norm_matches_the_torch_path(dtype, mode, 7, 1, 100)
        test_rms_norm_matches_the_torch_path(dtype, mode, 5, 4, 64)
    test_silu_mul_matches_torch(dtype, 33, 1536)
    test_silu_mul_matches_torch(dtype, 9, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_stats_match_torchs_argmax_and_log_softmax(dtype):
    """Greedy tokens exactly as torch.argmax (first maximum, ties across the kernel's 8,192-value chunks, a NaN
    as the maximum, an all -inf row), the log-softmax normaliser within rounding, and a row's results the same
    whatever rows it is batched with."""
    g = torch.Generator().manual_seed(3)
    for S, V in ((1, 49152), (7, 100), (33, 3 * 8192 + 5), (4, 15)):
        x = (torch.randn(S, V, generator=g) * 6).to(dtype)
        m = x[0].max()
        x[0, V - 1], x[0, V // 2] = m, m                          # ties: the first one wins
        if S > 3:
            x[1, V // 3], x[1, V - 2] = float("nan"), float("nan")
            x[2] = float("-inf")
            x[3, 1], x[3, V - 1] = float("inf"), float("inf")
        if V > 8192:                                               # a masked stretch: whole chunks of -inf
            x[S - 1, :8192] = float("-inf")
            x[S - 2, 8192:2 * 8192] = float("-inf")
        st = native.logit_stats(x, norms=True)
        assert torch.equal(st.tokens, torch.argmax(x, dim=-1))
        ok = ~torch.isnan(x.float()).any(dim=1) & torch.isfinite(x.float().amax(dim=1))   # finite normalisers
        assert ok[-1] or V <= 8192
        lp = (x.float() - st.mx[:, None]) - st.ls[:, None]
        torch.testing.assert_close(lp[ok], torch.log_softmax(x.float(), dim=-1)[ok], atol=2e-5, rtol=1e-6,
                                   equal_nan=True)
        assert torch.equal(native.logit_stats(x).tokens, st.tokens)
        for r in range(min(S, 3)):                                 # alone, and in a batch: the same bits
            one = native.logit_stats(x[r:r + 1], norms=True)
            assert torch.equal(one.tokens, st.tokens[r:r + 1])
            assert torch.equal(one.mx, st.mx[r:r + 1]) or torch.isnan(one.mx).all()
            assert torch.equal(one.ls, st.ls[r:r + 1]) or torch.isnan(one.ls).all()
    cols = (torch.randn(5, 300, generator=g)).to(dtype)[:, 10:290]   # a view: rows at a stride
    assert torch.equal(native.logit_stats(cols).tokens, torch.argmax(cols, dim=-1))
    assert native.logit_stats(cols.t()) is None                       # columns not contiguous: torch's path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_stats_on_other_cpus(dtype, other_isa):
    test_logit_stats_match_torchs_argmax_and_log_softmax(dtype)


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_rope_store_is_bit_identical_to_the_torch_path(dtype, kv_dtype):
    """The cache rows are the rotated k and v as stored, converted to the cache's dtype by ``Tensor.to`` (a
    ``--kv-dtype`` other than the model's)."""
    kv_dtype = kv_dtype or dtype
    g = torch.Generator().manual_seed(3)
    n_q, n_kv, hd, pool, T = 6, 2, 64, 50, 9
    qkv = torch.randn(T, (n_q + 2 * n_kv) * hd, generator=g).to(dtype)
    pos = torch.tensor([0, 1, 2, 3, 40, 41, 1000, 7, 7])
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.arange(1024).float()[:, None] * inv[None, :]
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    widx = torch.tensor([3, 4, 5, 6, 7, 8, 49, 49, 49])      # the last three: a scratch row, written thrice
    kc = torch.randn(n_kv, pool, hd, generator=g).to(kv_dtype)
    vc = torch.randn(n_kv, pool, hd, generator=g).to(kv_dtype)
    a, kc_a, vc_a = qkv.clone(), kc.clone(), vc.clone()
    native.rope_store(a[:, :n_q * hd], a[:, n_q * hd:(n_q + n_kv) * hd], a[:, (n_q + n_kv) * hd:], pos, cos, sin,
                      kc_a, vc_a, widx)
    c, s = cos[pos].to(dtype)[:, None], sin[pos].to(dtype)[:, None]
    q = Rotary.apply(qkv[:, :n_q * hd].view(T, n_q, hd), c, s)
    k = Rotary.apply(qkv[:, n_q * hd:(n_q + n_kv) * hd].view(T, n_kv, hd), c, s)
    v = qkv[:, (n_q + n_kv) * hd:].view(T, n_kv, hd)
    assert torch.equal(a[:, :n_q * hd].view(T, n_q, hd), q)
    assert torch.equal(a[:, n_q * hd:(n_q + n_kv) * hd].view(T, n_kv, hd), k)
    assert torch.equal(a[:, (n_q + n_kv) * hd:], qkv[:, (n_q + n_kv) * hd:])         # v read, not changed
    kc_b, vc_b = kc.clone(), vc.clone()
    kc_b[:, widx[:6]], vc_b[:, widx[:6]] = k[:6].transpose(0, 1).to(kv_dtype), v[:6].transpose(0, 1).to(kv_dtype)
    assert torch.equal(kc_a[:, :49], kc_b[:, :49]) and torch.equal(vc_a[:, :49], vc_b[:, :49])


def test_without_a_compiler_the_torch_paths_run(monkeypatch, tmp_path, model_dirs):
    """No C compiler: available() is False, the model takes its torch paths, and the engine still runs."""
    monkeypatch.setattr(native, "_LIB", [])
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MPIINFER_CACHE", str(tmp_path / "cache"))
    assert not native.available()
    d = model_dirs("llama")
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 22), Mesh.single(), Device("cpu"))
    assert runner.model.use_native is False
    res = list(Engine(runner, Tokenizer(d)).generate([Request(0, 0, SamplingParams(max_tokens=4),
                                                              prompt_token_ids=[5, 6, 7])]))
    assert res[0].error is None and len(res[0].token_ids) == 4


def _engine_run(d, prompts, dtype="float32", new=24):
    runner = ModelRunner(d, EngineConfig(kv_budget_bytes=1 << 24, prefix_min_blocks=1, dtype=dtype), Mesh.single(),
                         Device("cpu"))
    eng = Engine(runner, Tokenizer(d), max_batch=len(prompts), step_tokens=48)
    sp = SamplingParams(max_tokens=new, logprobs=True, ignore_eos=True)
    res = sorted(eng.generate([Request(i, i, sp, prompt_token_ids=p) for i, p in enumerate(prompts)]),
                 key=lambda r: r.index)
    # the attention kernels and the elementwise ones (norms, SiLU * up) on or off together
    model = runner.model
    elementwise = [m.use_native for m in model.modules() if isinstance(m, RMSNorm) or
                   (isinstance(m, MLP) and m.silu)]
    assert elementwise and all(e == native.usable(torch.device("cpu"), model.dtype) for e in elementwise)
    return res, model.use_native


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("qwen3", {}), ("mistral", {"sliding_window": 40}),
                                            ("gemma3", {"sliding_window": 40}), ("llama4", {"attention_chunk_size": 40}),
                                            ("gpt_oss", {"sliding_window": 40}), ("deepseek_v3", {})])
def test_engine_on_the_kernels_matches_transformers(arch, overrides, model_dirs, monkeypatch):
    """Shared-prefix groups formed (their threshold lowered to 16 rows), paged runs, windows, prompt chunks in the
    kernel; then with prompt chunks on torch's attention (as beyond NATIVE_PREFILL_BYTES); then with the kernels
    off (the torch paths CUDA takes): each exactly transformers' tokens, logprobs within 1e-4."""
    d = model_dirs(arch, **overrides)
    prompts = shared_prefix_prompts(Tokenizer(d).vocab_size, seed=5)
    ref = hf_greedy(d, prompts, 24)
    monkeypatch.setattr(attention, "SHARED_MIN_ROWS", 16)
    groups, torch_prompts = [], []
    real, real_attend = Attention._attend_shared, Attention._attend
    monkeypatch.setattr(Attention, "_attend_shared", lambda self, *a: groups.append(a[4]) or real(self, *a))
    monkeypatch.setattr(Attention, "_attend", lambda self, q, *a: torch_prompts.append(q.shape[0] > 1) or
                        real_attend(self, q, *a))
    for mode in ("kernels", "torch prompts", "off"):
        if mode == "torch prompts":
            monkeypatch.setattr(attention, "NATIVE_PREFILL_BYTES", 0)
        if mode == "off":
            monkeypatch.setattr(native, "usable", lambda *a: False)
        groups.clear()
        torch_prompts.clear()
        res, used = _engine_run(d, prompts)
        assert used is (mode != "off") and groups, (mode, groups)
        assert any(torch_prompts) is (mode != "kernels"), mode
        for i, ((toks, lps), r) in enumerate(zip(ref, res)):
            assert r.token_ids == toks, (mode, i)
            assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4, (mode, i)


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"head_dim": 128}),
                                            ("mistral", {"sliding_window": 40})])
def test_engine_on_other_cpus_matches_transformers(arch, overrides, model_dirs, monkeypatch, other_isa):
    """The engine on the kernels as an AVX2-only CPU, or one without AVX2, builds them: transformers' tokens
    exactly, logprobs within 1e-4."""
    d = model_dirs(arch, **overrides)
    prompts = shared_prefix_prompts(Tokenizer(d).vocab_size, seed=5)
    ref = hf_greedy(d, prompts, 24)
    res, used = _engine_run(d, prompts)
    assert used
    for i, ((toks, lps), r) in enumerate(zip(ref, res)):
        assert r.token_ids == toks, i
        assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-4, i


def _agreement(res, ref):
    """Tokens before each sequence's first token unlike the reference's, and the largest logprob difference over
    them (their contexts are the same)."""
    common, worst = 0, 0.0
    for r, (toks, lps) in zip(res, ref):
        n = next((i for i, (x, y) in enumerate(zip(r.token_ids, toks)) if x != y), len(toks))
        common += n
        worst = max([worst] + [abs(x - y) for x, y in zip(r.logprobs[:n], lps[:n])])
    return common, worst


# gpt-oss: the sinks as the kernel's start state.  Its tiny random model is further from float32 in bfloat16 at its
# worst position (measured: max 0.579 on both paths, mean 0.050 / 0.048; transformers' own bfloat16 run: max 0.255,
# mean 0.043), so its bound is looser; the kernels-vs-torch comparison is the point.  DeepSeek-V3: the latent
# attention's rows as K and V, its router in float32 under a bfloat16 model
@pytest.mark.parametrize("arch,tol", [("qwen2", 0.15), ("gpt_oss", 0.6), ("deepseek_v3", 0.15)])
def test_bfloat16_on_the_kernels_is_as_close_to_transformers_as_the_torch_paths(arch, tol, model_dirs, monkeypatch):
    """bfloat16 against transformers in float32: near ties of a random tiny model flip in either path, so the
    logprobs are compared where the contexts are still the same (up to each sequence's first differing token):
    the kernels (float32 accumulation) are within bfloat16's tolerance (0.15, as jobs/gpu_check.py) and no
    further than torch's bfloat16 path (measured 0.122 vs 0.121)."""
    d = model_dirs(arch)
    prompts = shared_prefix_prompts(Tokenizer(d).vocab_size, seed=6)
    ref = hf_greedy(d, prompts, 16)
    on, used = _engine_run(d, prompts, dtype="bfloat16", new=16)
    assert used
    monkeypatch.setattr(native, "usable", lambda *a: False)
    off, used = _engine_run(d, prompts, dtype="bfloat16", new=16)
    assert not used
    (c_on, w_on), (c_off, w_off) = _agreement(on, ref), _agreement(off, ref)
    assert c_on >= 4 * len(prompts) and c_off >= 4 * len(prompts), (c_on, c_off)    # not a vacuous comparison
    assert w_on < tol and w_off < tol and w_on < w_off + 0.02, (w_on, w_off)
