/* CPU kernels for the per-token work between the matmuls: one call each instead of a Python loop of torch calls.
 *
 * Built on first use by mpiinfer/native/__init__.py (cc -O3 -march=native -fopenmp, this file with
 * -ffp-contract=fast, rope.c with -ffp-contract=off), loaded with ctypes; every function takes raw pointers into
 * contiguous torch tensors and a thread count.  OpenMP here is the libgomp torch already loaded (same soname), so
 * these kernels share torch's thread pool.
 *
 * Element types: float32 (dtype 0) or bfloat16 (dtype 1, raw uint16); arithmetic is float32.  The cache's type
 * (`bf16`) and the queries' and outputs' (`q_bf16`) are separate: a bfloat16 cache under a float32 model.
 */
#include "common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* One-token decode attention over a paged KV cache.
 *
 * q:     (T, q_stride) elements; sequence s's query heads are the n_kv * grp rows of hd at q + q_rows[s] * q_stride
 * kc/vc: one layer's cache, (n_kv, pool, hd) contiguous
 * the cache rows of sequence s, in token order, are the runs runs[2 r] .. runs[2 r] + runs[2 r + 1] for r in
 *        run_off[s] .. run_off[s + 1]; the first skip[s] of those rows are left out (a sliding window)
 * out:   (T, out_stride); sequence s's result is written at out + q_rows[s] * out_stride
 * init:  optional (may be NULL) running state to continue from, for a prefix attended elsewhere: per sequence and
 *        query head (nseq, n_kv * grp): init_m (its scores' max), init_l (sum of exp(score - max)) and
 *        init_acc (nseq, n_kv * grp, hd) (sum of exp(score - max) * v), all float32
 * Work: one item per (sequence, KV head); the grp query heads of a KV head read each K/V row once: scores of all
 * rows (pass 1), their exponentials (vectorised), then the weighted sum of the V rows (pass 2). */

/* exp(x) for x <= 0 (a score minus its row's maximum), vectorisable (no libm call): Cephes' expf (range reduction
 * by ln 2, degree-6 polynomial, exponent by bit arithmetic), within 2 ulp; exp of x below -87.3 (under 1e-38) is 0. */
static inline float exp_nonpos(float x) {
    const float lo = -87.3f;
    const float z = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - z * 0.693359375f;
    r = r - z * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = (int32_t)z + 127;
    e = e < 1 ? 1 : e;
    uint32_t bits = (uint32_t)e << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < lo ? 0.0f : p * scale;
}

typedef struct {
    const void *kc, *vc;
    int64_t pool;
    int bf16;
} cache_t;

/* query head g's running state after its scores' max mx and exponentials' sum: acc (its hd values) starts as
 * the initial state's weighted values rescaled to mx (or 0), l[g] = sum plus the initial state's rescaled sum */
static inline __attribute__((always_inline)) void start_state(
    int g, const int hd, float mx, float sum, float *acc, float *l, const float *im, const float *il,
    const float *ia) {
    float *ag = acc + g * hd;
    if (im) {
        const float cs = expf(im[g] - mx);
        sum += il[g] * cs;
        for (int d = 0; d < hd; d++) ag[d] = ia[(int64_t)g * hd + d] * cs;
    } else {
        for (int d = 0; d < hd; d++) ag[d] = 0.f;
    }
    l[g] = sum;
}

/* softmax numerators of the scores sc (grp, stride) in place, continuing the initial state when given (im/il/ia);
 * acc (grp, hd) starts as the initial state's weighted values (or 0), l (grp,) gets the denominators */
static inline __attribute__((always_inline)) void softmax_start(
    int grp, const int hd, int64_t rows, int64_t stride, float *sc, float *acc, float *l, const float *im,
    const float *il, const float *ia) {
    for (int g = 0; g < grp; g++) {
        float *sg = sc + g * stride;
        float mx = im ? im[g] : -INFINITY;
#pragma omp simd reduction(max : mx)
        for (int64_t i = 0; i < rows; i++) mx = sg[i] > mx ? sg[i] : mx;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < rows; i++) {
            const float e = exp_nonpos(sg[i] - mx);
            sg[i] = e;
            sum += e;
        }
        start_state(g, hd, mx, sum, acc, l, im, il, ia);
    }
}

/* one (sequence, KV head) item over its attended pool rows `idx` (rows of them); always inlined with hd a
 * constant where the caller knows it */
static inline __attribute__((always_inline)) void attend_item(
    const cache_t *c, int h, int grp, const int hd, const int64_t *idx, int64_t rows, int64_t stride,
    const float *qf, float *sc, float *acc, float *tmp, float *l, const float *im, const float *il,
    const float *ia) {
    const int64_t base = (int64_t)h * c->pool;
    const int esz = c->bf16 ? 2 : 4;
    /* pass 1: scores, (grp, stride); the K row 16 ahead and this V row prefetched (see prefetch_rows) */
    for (int64_t j = 0; j < rows; j++) {
        for (int b = 0; b < hd * esz; b += 64) {
            if (j + 16 < rows) __builtin_prefetch((const char *)c->kc + (base + idx[j + 16]) * hd * esz + b, 0, 3);
            __builtin_prefetch((const char *)c->vc + (base + idx[j]) * hd * esz + b, 0, 2);
        }
        const float *kr = row_f32(c->kc, (base + idx[j]) * hd, hd, c->bf16, tmp);
        for (int g = 0; g < grp; g++) {
            const float *qg = qf + g * hd;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < hd; d++) dot += qg[d] * kr[d];
            sc[g * stride + j] = dot;
        }
    }
    softmax_start(grp, hd, rows, stride, sc, acc, l, im, il, ia);
    /* pass 2: weighted values */
    for (int64_t j = 0; j < rows; j++) {
        if (j + 16 < rows)
            for (int b = 0; b < hd * esz; b += 64)
                __builtin_prefetch((const char *)c->vc + (base + idx[j + 16]) * hd * esz + b, 0, 3);
        const float *vr = row_f32(c->vc, (base + idx[j]) * hd, hd, c->bf16, tmp);
        for (int g = 0; g < grp; g++) {
            const float p = sc[g * stride + j];
            float *ag = acc + g * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) ag[d] += p * vr[d];
        }
    }
}

#if defined(__AVX512F__)
/* The same item with AVX-512, for hd 16, 32, 64 or 128 (the caller's dispatch), in tiles of TILE rows.  Pass 1: each row's
 * q.k as one vector of partial sums, the tile's TILE vectors reduced together into one vector of TILE scores
 * (15 adds and 30 shuffles per tile, where a reduction per row costs ~8 operations per row: the scalar kernel
 * spent most of its time there).  Pass 2: the weighted sums of GV query heads at a time held in registers across
 * a tile's rows.  bfloat16 rows are widened once per tile into `tile`. */
#define TILE 16

static inline __m512 hsum16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++)          /* per 128-bit lane: v[2i], v[2i+1] partial sums, interleaved */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {        /* per 128-bit lane: v[4i] .. v[4i+3] partial sums */
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
    const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xDD));
}

/* exp_nonpos on 16 lanes (the same steps; gcc leaves the scalar loop unvectorised) */
static inline __m512 exp_nonpos16(__m512 x) {
    const __m512 z = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                          _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(z, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(z, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(z), _mm512_set1_epi32(127));
    e = _mm512_max_epi32(e, _mm512_set1_epi32(1));
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
    /* not below the cutoff: a NaN stays NaN, as in the scalar path */
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
    return _mm512_maskz_mul_ps(keep, p, scale);
}

/* softmax_start with AVX-512: the max, the exponentials and their sum 16 scores at a time */
static inline __attribute__((always_inline)) void softmax_start16(
    int grp, const int hd, int64_t rows, int64_t stride, float *sc, float *acc, float *l, const float *im,
    const float *il, const float *ia) {
    for (int g = 0; g < grp; g++) {
        float *sg = sc + g * stride;
        __m512 vmx = _mm512_set1_ps(im ? im[g] : -INFINITY);
        for (int64_t i = 0; i < rows; i += 16) {
            const __mmask16 m = rows - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (rows - i)) - 1u);
            vmx = _mm512_mask_max_ps(vmx, m, vmx, _mm512_maskz_loadu_ps(m, sg + i));
        }
        const float mx = _mm512_reduce_max_ps(vmx);
        const __m512 vm = _mm512_set1_ps(mx);
        __m512 vs = _mm512_setzero_ps();
        for (int64_t i = 0; i < rows; i += 16) {
            const __mmask16 m = rows - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (rows - i)) - 1u);
            const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpos16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + i), vm)));
            _mm512_mask_storeu_ps(sg + i, m, e);
            vs = _mm512_add_ps(vs, e);
        }
        float sum = _mm512_reduce_add_ps(vs);
        start_state(g, hd, mx, sum, acc, l, im, il, ia);
    }
}

/* pointers to n rows of hd float32 values: the cache rows themselves (float32) or widened into `tile` */
static inline __attribute__((always_inline)) void tile_rows(
    const void *cache, int64_t base, const int64_t *idx, int n, const int hd, int bf16, float *tile,
    const float **out) {
    for (int jj = 0; jj < n; jj++) {
        const int64_t off = (base + idx[jj]) * hd;
        if (!bf16) {
            out[jj] = (const float *)cache + off;
        } else {
            const uint16_t *src = (const uint16_t *)cache + off;
            float *dst = tile + (int64_t)jj * hd;
            for (int d = 0; d < hd; d += 16) {
                const __m256i hv = _mm256_loadu_si256((const __m256i *)(src + d));
                _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hv), 16)));
            }
            out[jj] = dst;
        }
    }
}

/* software prefetch of n cache rows (each hd elements of esz bytes) into L1 (hint T0) or L2 (T1): the rows of a
 * sequence are in runs, but only ~40 KB per KV head, too short for the hardware prefetchers to run ahead */
static inline __attribute__((always_inline)) void prefetch_rows(
    const void *cache, int64_t base, const int64_t *idx, int n, const int hd, int esz, int l2) {
    for (int jj = 0; jj < n; jj++) {
        const char *r = (const char *)cache + (base + idx[jj]) * hd * esz;
        for (int b = 0; b < hd * esz; b += 64) {
            if (l2)
                _mm_prefetch(r + b, _MM_HINT_T1);
            else
                _mm_prefetch(r + b, _MM_HINT_T0);
        }
    }
}

/* acc[g] (hd) += sum over the tile's n rows of p[g][jj] * V[jj], for gv query heads g0 .. g0 + gv - 1 */
static inline __attribute__((always_inline)) void weigh_tile(
    const float **vr, int n, const int hd, const int gv, int g0, const float *sc, int64_t stride, int64_t j0,
    float *acc) {
    __m512 a[16];
    const int nc = hd / 16;
    for (int g = 0; g < gv; g++)
        for (int cc = 0; cc < nc; cc++) a[g * nc + cc] = _mm512_loadu_ps(acc + (int64_t)(g0 + g) * hd + cc * 16);
    for (int jj = 0; jj < n; jj++) {
        for (int g = 0; g < gv; g++) {
            const __m512 p = _mm512_set1_ps(sc[(int64_t)(g0 + g) * stride + j0 + jj]);
            for (int cc = 0; cc < nc; cc++)
                a[g * nc + cc] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr[jj] + cc * 16), a[g * nc + cc]);
        }
    }
    for (int g = 0; g < gv; g++)
        for (int cc = 0; cc < nc; cc++) _mm512_storeu_ps(acc + (int64_t)(g0 + g) * hd + cc * 16, a[g * nc + cc]);
}

static inline __attribute__((always_inline)) void attend_item_avx512(
    const cache_t *c, int h, int grp, const int hd, const int64_t *idx, int64_t rows, int64_t stride,
    const float *qf, float *sc, float *acc, float *tile, float *l, const float *im, const float *il,
    const float *ia) {
    const int64_t base = (int64_t)h * c->pool;
    const int nc = hd / 16;
    const float *kr[TILE];
    /* pass 1: scores, (grp, stride) */
    const int esz = c->bf16 ? 2 : 4;
    for (int64_t j0 = 0; j0 < rows; j0 += TILE) {
        const int n = rows - j0 < TILE ? (int)(rows - j0) : TILE;
        const int64_t j1 = j0 + TILE;
        prefetch_rows(c->kc, base, idx + j1, rows - j1 < TILE ? (int)(rows > j1 ? rows - j1 : 0) : TILE, hd, esz, 0);
        prefetch_rows(c->vc, base, idx + j0, n, hd, esz, 1);      /* for pass 2 */
        tile_rows(c->kc, base, idx + j0, n, hd, c->bf16, tile, kr);
        for (int g = 0; g < grp; g++) {
            __m512 qv[8], v[TILE];
            for (int cc = 0; cc < nc; cc++) qv[cc] = _mm512_loadu_ps(qf + g * hd + cc * 16);
            for (int jj = 0; jj < TILE; jj++) {
                if (jj < n) {
                    __m512 p = _mm512_mul_ps(_mm512_loadu_ps(kr[jj]), qv[0]);
                    for (int cc = 1; cc < nc; cc++) p = _mm512_fmadd_ps(_mm512_loadu_ps(kr[jj] + cc * 16), qv[cc], p);
                    v[jj] = p;
                } else {
                    v[jj] = _mm512_setzero_ps();
                }
            }
            _mm512_mask_storeu_ps(sc + g * stride + j0, (__mmask16)((1u << n) - 1u), hsum16(v));
        }
    }
    softmax_start16(grp, hd, rows, stride, sc, acc, l, im, il, ia);
    /* pass 2: weighted values, GV query heads at a time in 16 registers */
    const int GV = 16 / nc;
    for (int64_t j0 = 0; j0 < rows; j0 += TILE) {
        const int n = rows - j0 < TILE ? (int)(rows - j0) : TILE;
        const int64_t j1 = j0 + TILE;
        prefetch_rows(c->vc, base, idx + j1, rows - j1 < TILE ? (int)(rows > j1 ? rows - j1 : 0) : TILE, hd, esz, 0);
        tile_rows(c->vc, base, idx + j0, n, hd, c->bf16, tile, kr);
        int g0 = 0;
        for (; g0 + GV <= grp; g0 += GV) weigh_tile(kr, n, hd, GV, g0, sc, stride, j0, acc);
        /* the rest (fewer than GV) in one pass over the tile's rows, a constant count each */
#define WEIGH_REST(k)                                                                                            \
    case k:                                                                                                      \
        if ((k) < GV) weigh_tile(kr, n, hd, (k) < GV ? (k) : 1, g0, sc, stride, j0, acc);                        \
        break;
        switch (grp - g0) {
            WEIGH_REST(1) WEIGH_REST(2) WEIGH_REST(3) WEIGH_REST(4) WEIGH_REST(5) WEIGH_REST(6) WEIGH_REST(7)
            default:
                for (; g0 < grp; g0++) weigh_tile(kr, n, hd, 1, g0, sc, stride, j0, acc);
        }
#undef WEIGH_REST
    }
}
#define HAVE_AVX512_ITEM 1
#else
#define HAVE_AVX512_ITEM 0
#endif

void decode_attention(const void *q, int64_t q_stride, const void *kc, const void *vc, int64_t pool, int n_kv,
                      int grp, int hd, int64_t nseq, const int64_t *q_rows, const int64_t *run_off,
                      const int64_t *runs, const int64_t *skip, int64_t max_rows, float scale, void *out,
                      int64_t out_stride, const float *init_m, const float *init_l, const float *init_acc,
                      int bf16, int q_bf16, int nthreads) {
    const int64_t items = nseq * n_kv;
    const cache_t c = {kc, vc, pool, bf16};
    const int64_t stride = max_rows + 16;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)aligned_alloc(64, sizeof(float) * (((size_t)grp * stride + (size_t)grp * hd * 2 + hd +
                                                                  64 + 15) & ~(size_t)15));
        float *sc = buf;                                    /* (grp, stride) scores, then weights */
        float *qf = sc + (size_t)grp * stride;              /* (grp, hd) scaled queries */
        float *acc = qf + (size_t)grp * hd;                 /* (grp, hd) */
        float *tmp = acc + (size_t)grp * hd;                /* one bfloat16 row as float32 */
        float *l = tmp + hd;                                /* (grp,) softmax denominators, grp <= 64 */
        float *tile = (float *)aligned_alloc(64, sizeof(float) * 16 * (size_t)((hd + 15) & ~15));  /* widened rows */
        int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)(max_rows + 1));   /* attended pool rows */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t s = it / n_kv;
            const int h = (int)(it % n_kv);
            const int64_t qoff = q_rows[s] * q_stride + (int64_t)h * grp * hd;
            for (int g = 0; g < grp; g++) {
                const float *qr = row_f32(q, qoff + (int64_t)g * hd, hd, q_bf16, tmp);
                for (int d = 0; d < hd; d++) qf[g * hd + d] = qr[d] * scale;
            }
            /* the pool rows attended, in token order: the runs, less the first skip[s] rows (a window) */
            const int64_t first = skip ? skip[s] : 0;
            int64_t rows = 0, t = 0;
            for (int64_t r = run_off[s]; r < run_off[s + 1]; r++)
                for (int64_t i = 0; i < runs[2 * r + 1]; i++, t++)
                    if (t >= first) idx[rows++] = runs[2 * r] + i;
            const int64_t hq = s * (int64_t)n_kv * grp + (int64_t)h * grp;
            const float *im = init_m ? init_m + hq : NULL, *il = init_l ? init_l + hq : NULL;
            const float *ia = init_acc ? init_acc + hq * hd : NULL;
#if HAVE_AVX512_ITEM
            if (hd == 64)
                attend_item_avx512(&c, h, grp, 64, idx, rows, stride, qf, sc, acc, tile, l, im, il, ia);
            else if (hd == 128)
                attend_item_avx512(&c, h, grp, 128, idx, rows, stride, qf, sc, acc, tile, l, im, il, ia);
            else if (hd == 32)
                attend_item_avx512(&c, h, grp, 32, idx, rows, stride, qf, sc, acc, tile, l, im, il, ia);
            else if (hd == 16)
                attend_item_avx512(&c, h, grp, 16, idx, rows, stride, qf, sc, acc, tile, l, im, il, ia);
            else
#endif
            if (hd == 64)
                attend_item(&c, h, grp, 64, idx, rows, stride, qf, sc, acc, tmp, l, im, il, ia);
            else if (hd == 128)
                attend_item(&c, h, grp, 128, idx, rows, stride, qf, sc, acc, tmp, l, im, il, ia);
            else
                attend_item(&c, h, grp, hd, idx, rows, stride, qf, sc, acc, tmp, l, im, il, ia);
            const int64_t ooff = q_rows[s] * out_stride + (int64_t)h * grp * hd;
            for (int g = 0; g < grp; g++) {
                float *ag = acc + g * hd;
                const float inv = 1.f / l[g];
                for (int d = 0; d < hd; d++) ag[d] *= inv;
                store_row(out, ooff + (int64_t)g * hd, ag, hd, q_bf16);
            }
        }
        free(idx);
        free(tile);
        free(buf);
    }
}
