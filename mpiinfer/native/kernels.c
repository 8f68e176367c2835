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
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
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
 *        init_acc (nseq, n_kv * grp, hd) (sum of exp(score - max) * v; NULL: zeros), all float32
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
        if (ia)
            for (int d = 0; d < hd; d++) ag[d] = ia[(int64_t)g * hd + d] * cs;
        else                                                /* a state with no values (attention sinks) */
            for (int d = 0; d < hd; d++) ag[d] = 0.f;
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

/* The same item in tiles of VW rows with VW-float vectors: AVX-512 (VW 16) or AVX2 with FMA (VW 8), whichever the
 * build's -march=native gives; hd 16, 32, 64 or 128, and 256 with AVX-512 over a bfloat16 cache (the caller's
 * dispatch).  Pass 1: each row's q.k as one vector of partial sums, the tile's VW vectors reduced together into
 * one vector of VW scores (a reduction per row costs ~8 operations per row: the row-at-a-time kernel spent most of
 * its time there).  Pass 2: the weighted sums of several query heads at a time held in registers across a tile's
 * rows (ACC_REGS accumulators; a head wider than that, AVX2's 128, in column chunks).  bfloat16 rows are widened
 * once per tile into `tile`, but where registers allow: pass 2 widens each V row in registers for the heads it
 * serves (weigh_tile_bf16), and with AVX512-BF16 (Zen 4, Sapphire Rapids) pass 1 of bfloat16 queries over a
 * bfloat16 cache takes the rows as they are, q.k by pairs of products (vdpbf16ps; the scale applied to the sum).
 * Measured alone (bench_decode.py, 2 threads): SmolLM2's heads, 256 decodes x ~156 rows, 1.32 -> 1.14 ms;
 * Llama-8B-like heads, 64 x ~1,000 rows, 11.8 -> 9.7 ms.  The vector operations below are the only ISA-specific code. */
#if defined(__AVX512F__)
#define VW 16
#define ACC_REGS 16      /* accumulators of pass 2 (a power of 2: it splits a head's vectors evenly) */
#define VREGS 32         /* vector registers */
typedef __m512 vf;
static inline vf v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vf x) { _mm512_storeu_ps(p, x); }
static inline vf v_set1(float x) { return _mm512_set1_ps(x); }
static inline vf v_zero(void) { return _mm512_setzero_ps(); }
static inline vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf v_max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf v_min(vf a, vf b) { return _mm512_min_ps(a, b); }       /* b where either is NaN */
static inline vf v_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }        /* a * b + c */
static inline vf v_fnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }      /* c - a * b */
static inline float v_reduce_max(vf x) { return _mm512_reduce_max_ps(x); }
static inline float v_reduce_add(vf x) { return _mm512_reduce_add_ps(x); }
static inline vf v_widen_bf16(const uint16_t *s) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)s)), 16));
}
/* x rounded to bfloat16 as f2bf rounds (nearest even; a NaN stays a quiet NaN), as float32 */
static inline vf v_round_bf16(vf x) {
    const __m512i u = _mm512_castps_si512(x), hi = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), hi);
    const __m512i q = _mm512_or_si512(_mm512_and_si512(u, hi), _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), q));
}
static inline void v_store_bf16(uint16_t *d, vf x) {
    _mm256_storeu_si256((__m256i *)d,
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v_round_bf16(x)), 16)));
}
/* one vector of the sums of each of v[0] .. v[15] */
static inline vf v_hsum(const vf *v) {
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
static inline vf v_floor(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline vf v_pow2i(vf z) {     /* 2^z for whole z, clamped below at 2^-126 */
    __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(z), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(1)), 23));
}
static inline vf v_keep_nlt(vf x, float lo, vf y) {     /* y where x is not below lo (NaN kept), else 0 */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(lo), _CMP_NLT_UQ), y);
}
static inline vf v_keep_gt(vf x, float hi, vf y) {       /* y where x is above hi, else 0 */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(hi), _CMP_GT_OQ), y);
}
static inline unsigned v_mask_eq(vf a, vf b) { return (unsigned)_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
static inline unsigned v_mask_nan(vf a) { return (unsigned)_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define ACC_REGS 8
#define VREGS 16
typedef __m256 vf;
static inline vf v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, vf x) { _mm256_storeu_ps(p, x); }
static inline vf v_set1(float x) { return _mm256_set1_ps(x); }
static inline vf v_zero(void) { return _mm256_setzero_ps(); }
static inline vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf v_max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf v_min(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf v_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf v_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf v_fnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline float v_reduce_max(vf x) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}
static inline float v_reduce_add(vf x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
static inline vf v_widen_bf16(const uint16_t *s) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)s)), 16));
}
static inline vf v_round_bf16(vf x) {
    const __m256i u = _mm256_castps_si256(x), hi = _mm256_set1_epi32((int)0xffff0000u);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), hi);
    const __m256i q = _mm256_or_si256(_mm256_and_si256(u, hi), _mm256_set1_epi32(0x400000));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(r, q, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))));
}
static inline void v_store_bf16(uint16_t *d, vf x) {
    const __m256i r = _mm256_srli_epi32(_mm256_castps_si256(v_round_bf16(x)), 16);
    _mm_storeu_si128((__m128i *)d, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
/* one vector of the sums of each of v[0] .. v[7]: per 128-bit lane, hadd twice gives the lane's partial sums of
 * four vectors; the two lanes' halves then add across */
static inline vf v_hsum(const vf *v) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s, t, 0x20), _mm256_permute2f128_ps(s, t, 0x31));
}
static inline vf v_floor(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
static inline vf v_pow2i(vf z) {
    __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(z), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_max_epi32(e, _mm256_set1_epi32(1)), 23));
}
static inline vf v_keep_nlt(vf x, float lo, vf y) {
    return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(lo), _CMP_NLT_UQ), y);
}
static inline vf v_keep_gt(vf x, float hi, vf y) {
    return _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(hi), _CMP_GT_OQ), y);
}
static inline unsigned v_mask_eq(vf a, vf b) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
static inline unsigned v_mask_nan(vf a) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
#endif

#ifdef VW
/* exp_nonpos on VW lanes (the same steps; gcc leaves the scalar loop unvectorised) */
/* exp(x) = p * 2^z: z = round(x / ln 2) and p = exp(x - z ln 2) by Cephes' polynomial (the steps of exp_nonpos) */
static inline vf v_exp_parts(vf x, vf *z) {
    *z = v_floor(v_fma(x, v_set1(1.44269504088896341f), v_set1(0.5f)));
    vf r = v_fnma(*z, v_set1(0.693359375f), x);
    r = v_fnma(*z, v_set1(-2.12194440e-4f), r);
    vf p = v_set1(1.9875691500e-4f);
    p = v_fma(p, r, v_set1(1.3981999507e-3f));
    p = v_fma(p, r, v_set1(8.3334519073e-3f));
    p = v_fma(p, r, v_set1(4.1665795894e-2f));
    p = v_fma(p, r, v_set1(1.6666665459e-1f));
    p = v_fma(p, r, v_set1(5.0000001201e-1f));
    return v_fma(v_mul(p, r), r, v_add(r, v_set1(1.0f)));
}

static inline vf v_exp_nonpos(vf x) {
    vf z;
    const vf p = v_exp_parts(x, &z);
    /* not below the cutoff: a NaN stays NaN, as in the scalar path */
    return v_keep_nlt(x, -87.3f, v_mul(p, v_pow2i(z)));
}

/* softmax_start over whole vectors: the scores of each query head are padded with -inf up to a multiple of VW
 * (pass 1 wrote the last tile's lanes past `rows`; the row stride leaves room), so the max, the exponentials
 * and their sum run unmasked; a padded lane's exponential is 0 */
static inline __attribute__((always_inline)) void softmax_start_v(
    int grp, const int hd, int64_t rows, int64_t stride, float *sc, float *acc, float *l, const float *im,
    const float *il, const float *ia) {
    const int64_t padded = (rows + VW - 1) / VW * VW;
    for (int g = 0; g < grp; g++) {
        float *sg = sc + g * stride;
        for (int64_t i = rows; i < padded; i++) sg[i] = -INFINITY;
        vf vmx = v_set1(im ? im[g] : -INFINITY);
        for (int64_t i = 0; i < padded; i += VW) vmx = v_max(vmx, v_load(sg + i));
        const float mx = v_reduce_max(vmx);
        const vf vm = v_set1(mx);
        vf vs = v_zero();
        for (int64_t i = 0; i < padded; i += VW) {
            const vf e = v_exp_nonpos(v_sub(v_load(sg + i), vm));
            v_store(sg + i, e);
            vs = v_add(vs, e);
        }
        start_state(g, hd, mx, v_reduce_add(vs), acc, l, im, il, ia);
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
            for (int d = 0; d < hd; d += VW) v_store(dst + d, v_widen_bf16(src + d));
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

/* acc[g] (hd) += sum over the tile's n rows of p[g][jj] * V[jj], for gv query heads g0 .. g0 + gv - 1 and the
 * ncc vectors of columns from vector c0 */
static inline __attribute__((always_inline)) void weigh_tile(
    const float **vr, int n, const int hd, const int gv, int g0, const int c0, const int ncc, const float *sc,
    int64_t stride, int64_t j0, float *acc) {
    vf a[ACC_REGS];
    for (int g = 0; g < gv; g++)
        for (int cc = 0; cc < ncc; cc++) a[g * ncc + cc] = v_load(acc + (int64_t)(g0 + g) * hd + (c0 + cc) * VW);
    for (int jj = 0; jj < n; jj++) {
        for (int g = 0; g < gv; g++) {
            const vf p = v_set1(sc[(int64_t)(g0 + g) * stride + j0 + jj]);
            for (int cc = 0; cc < ncc; cc++) a[g * ncc + cc] = v_fma(p, v_load(vr[jj] + (c0 + cc) * VW), a[g * ncc + cc]);
        }
    }
    for (int g = 0; g < gv; g++)
        for (int cc = 0; cc < ncc; cc++) v_store(acc + (int64_t)(g0 + g) * hd + (c0 + cc) * VW, a[g * ncc + cc]);
}

/* weigh_tile over bfloat16 rows vr16, each row's vectors widened once in registers for the gv heads */
static inline __attribute__((always_inline)) void weigh_tile_bf16(
    const uint16_t **vr16, int n, const int hd, const int gv, int g0, const int c0, const int ncc, const float *sc,
    int64_t stride, int64_t j0, float *acc) {
    vf a[ACC_REGS];
    for (int g = 0; g < gv; g++)
        for (int cc = 0; cc < ncc; cc++) a[g * ncc + cc] = v_load(acc + (int64_t)(g0 + g) * hd + (c0 + cc) * VW);
    for (int jj = 0; jj < n; jj++) {
        vf w[ACC_REGS];
        for (int cc = 0; cc < ncc; cc++) w[cc] = v_widen_bf16(vr16[jj] + (c0 + cc) * VW);
        for (int g = 0; g < gv; g++) {
            const vf p = v_set1(sc[(int64_t)(g0 + g) * stride + j0 + jj]);
            for (int cc = 0; cc < ncc; cc++) a[g * ncc + cc] = v_fma(p, w[cc], a[g * ncc + cc]);
        }
    }
    for (int g = 0; g < gv; g++)
        for (int cc = 0; cc < ncc; cc++) v_store(acc + (int64_t)(g0 + g) * hd + (c0 + cc) * VW, a[g * ncc + cc]);
}

/* pass 2 over one tile's n rows ROWS by FN (weigh_tile, or weigh_tile_bf16 on bfloat16 rows): every query head's
 * weighted sum, GV heads x CH vectors of columns at a time (nc / CH column chunks: 1 but for AVX2's heads of 128),
 * the rest (fewer than GV heads) in one pass over the tile's rows, a constant count each.  A macro: each kind of
 * rows keeps its own loops, as measured (one function taking either kind changes the float32 code too) */
#define WEIGH_REST(FN, ROWS, k)                                                                                  \
    case k:                                                                                                      \
        if ((k) < GV) FN(ROWS, n, hd, (k) < GV ? (k) : 1, g0, c0, CH, sc, stride, j0, acc);                      \
        break;
#define WEIGH_HEADS(FN, ROWS)                                                                                    \
    for (int ci = 0; ci < nc / CH; ci++) {                                                                       \
        const int c0 = ci * CH;                                                                                  \
        int g0 = 0;                                                                                              \
        for (; g0 + GV <= grp; g0 += GV) FN(ROWS, n, hd, GV, g0, c0, CH, sc, stride, j0, acc);                  \
        switch (grp - g0) {                                                                                      \
            WEIGH_REST(FN, ROWS, 1) WEIGH_REST(FN, ROWS, 2) WEIGH_REST(FN, ROWS, 3) WEIGH_REST(FN, ROWS, 4)      \
            WEIGH_REST(FN, ROWS, 5) WEIGH_REST(FN, ROWS, 6) WEIGH_REST(FN, ROWS, 7)                              \
            default:                                                                                             \
                for (; g0 < grp; g0++) FN(ROWS, n, hd, 1, g0, c0, CH, sc, stride, j0, acc);                      \
        }                                                                                                        \
    }

static inline __attribute__((always_inline)) void attend_item_tiled(
    const cache_t *c, int h, int grp, const int hd, const int64_t *idx, int64_t rows, int64_t stride,
    const float *qf, const uint16_t *qb, float scale, float *sc, float *acc, float *tile, float *l,
    const float *im, const float *il, const float *ia) {
    const int64_t base = (int64_t)h * c->pool;
    const int nc = hd / VW;
    const float *kr[VW];
    /* pass 1: scores, (grp, stride) */
    const int esz = c->bf16 ? 2 : 4;
    for (int64_t j0 = 0; j0 < rows; j0 += VW) {
        const int n = rows - j0 < VW ? (int)(rows - j0) : VW;
        const int64_t j1 = j0 + VW;
        prefetch_rows(c->kc, base, idx + j1, rows - j1 < VW ? (int)(rows > j1 ? rows - j1 : 0) : VW, hd, esz, 0);
        prefetch_rows(c->vc, base, idx + j0, n, hd, esz, 1);      /* for pass 2 */
#if defined(__AVX512BF16__) && VW == 16
        if (qb) {                  /* bfloat16 queries and cache: q.k by pairs of bfloat16 products, unwidened */
            const vf vs = v_set1(scale);
            for (int g = 0; g < grp; g++) {
                __m512bh qv[256 / 32];
                vf v[VW];
                for (int cc = 0; cc < hd / 32; cc++)
                    qv[cc] = (__m512bh)_mm512_loadu_si512((const void *)(qb + g * hd + cc * 32));
                for (int jj = 0; jj < VW; jj++) {
                    if (jj < n) {
                        const uint16_t *kr16 = (const uint16_t *)c->kc + (base + idx[j0 + jj]) * hd;
                        vf p = _mm512_dpbf16_ps(v_zero(), (__m512bh)_mm512_loadu_si512((const void *)kr16), qv[0]);
                        for (int cc = 1; cc < hd / 32; cc++)
                            p = _mm512_dpbf16_ps(p, (__m512bh)_mm512_loadu_si512((const void *)(kr16 + cc * 32)),
                                                 qv[cc]);
                        v[jj] = p;
                    } else {
                        v[jj] = v_zero();
                    }
                }
                v_store(sc + g * stride + j0, v_mul(v_hsum(v), vs));
            }
            continue;
        }
#endif
        tile_rows(c->kc, base, idx + j0, n, hd, c->bf16, tile, kr);
        for (int g = 0; g < grp; g++) {
            vf qv[256 / VW], v[VW];
            for (int cc = 0; cc < nc; cc++) qv[cc] = v_load(qf + g * hd + cc * VW);
            for (int jj = 0; jj < VW; jj++) {
                if (jj < n) {
                    vf p = v_mul(v_load(kr[jj]), qv[0]);
                    for (int cc = 1; cc < nc; cc++) p = v_fma(v_load(kr[jj] + cc * VW), qv[cc], p);
                    v[jj] = p;
                } else {
                    v[jj] = v_zero();
                }
            }
            v_store(sc + g * stride + j0, v_hsum(v));      /* lanes past rows: 0, then -inf (softmax_start_v) */
        }
    }
    softmax_start_v(grp, hd, rows, stride, sc, acc, l, im, il, ia);
    /* pass 2: weighted values, GV query heads x CH vectors of columns at a time in ACC_REGS registers */
    const int CH = nc < ACC_REGS ? nc : ACC_REGS;
    const int GV = ACC_REGS / CH;
    for (int64_t j0 = 0; j0 < rows; j0 += VW) {
        const int n = rows - j0 < VW ? (int)(rows - j0) : VW;
        const int64_t j1 = j0 + VW;
        prefetch_rows(c->vc, base, idx + j1, rows - j1 < VW ? (int)(rows > j1 ? rows - j1 : 0) : VW, hd, esz, 0);
        if (c->bf16 && CH + ACC_REGS < VREGS) {   /* bfloat16 rows widened in registers, not through `tile` */
            const uint16_t *vr16[VW];
            for (int jj = 0; jj < n; jj++) vr16[jj] = (const uint16_t *)c->vc + (base + idx[j0 + jj]) * hd;
            WEIGH_HEADS(weigh_tile_bf16, vr16);
        } else {
            tile_rows(c->vc, base, idx + j0, n, hd, c->bf16, tile, kr);
            WEIGH_HEADS(weigh_tile, kr);
        }
    }
}
#undef WEIGH_HEADS
#undef WEIGH_REST
#define HAVE_TILED_ITEM 1
#if defined(__AVX512BF16__) && VW == 16
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif
#else
#define HAVE_DPBF16 0
#define HAVE_TILED_ITEM 0
#endif

/* 1 where this build's decode attention takes bfloat16 queries' dot products with AVX512-BF16 */
int decode_bf16_dot(void) { return HAVE_DPBF16; }

/* rows per tile of the decode attention in this build: 16 (AVX-512), 8 (AVX2 + FMA), 0 (a row at a time) */
int decode_tile_width(void) {
#if HAVE_TILED_ITEM
    return VW;
#else
    return 0;
#endif
}

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
            /* bfloat16 queries over a bfloat16 cache, heads of 64 or 128: pass 1 on the raw values (AVX512-BF16),
             * else on the scaled float32 queries qf */
            const uint16_t *qb = HAVE_DPBF16 && bf16 && q_bf16 && (hd == 64 || hd == 128)
                                     ? (const uint16_t *)q + qoff : NULL;
            for (int g = 0; !qb && g < grp; g++) {
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
#if HAVE_TILED_ITEM
            if (hd == 64)
                attend_item_tiled(&c, h, grp, 64, idx, rows, stride, qf, qb, scale, sc, acc, tile, l, im, il, ia);
            else if (hd == 128)
                attend_item_tiled(&c, h, grp, 128, idx, rows, stride, qf, qb, scale, sc, acc, tile, l, im, il, ia);
            else if (hd == 32)
                attend_item_tiled(&c, h, grp, 32, idx, rows, stride, qf, NULL, scale, sc, acc, tile, l, im, il, ia);
            else if (hd == 16)
                attend_item_tiled(&c, h, grp, 16, idx, rows, stride, qf, NULL, scale, sc, acc, tile, l, im, il, ia);
            else if (hd == 256 && VW == 16 && bf16)   /* float32 rows of 256, or AVX2: a row at a time is as */
                                                        /* fast or faster (measured) */
                attend_item_tiled(&c, h, grp, 256, idx, rows, stride, qf, NULL, scale, sc, acc, tile, l, im, il, ia);
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

/* ---- the elementwise steps between the matmuls: RMSNorm (with the residual add before it) and SiLU * up ----
 *
 * Each as torch computes it in the element type (bfloat16: every op in float32, its result rounded), in one pass
 * over the rows instead of 4-8 torch ops each allocating a (T, n) temporary; to torch's results within rounding
 * (the sum of squares and the exponential are not summed / computed in torch's exact order or formula). */

#ifdef VW
static inline vf v_load_any(const void *p, int64_t i, int bf16) {
    return bf16 ? v_widen_bf16((const uint16_t *)p + i) : v_load((const float *)p + i);
}
static inline void v_store_any(void *p, int64_t i, vf x, int bf16) {
    if (bf16)
        v_store_bf16((uint16_t *)p + i, x);
    else
        v_store((float *)p + i, x);
}
/* x rounded to the element type (bfloat16: to nearest even), as float32 */
static inline vf v_round_to(vf x, int bf16) { return bf16 ? v_round_bf16(x) : x; }
/* exp(x) for any x: exp_nonpos's steps on x clamped to 88.72, inf above ln(FLT_MAX) (as torch's exp); 2^z
 * applied as 2^min(z, 127) times 2^max(z - 127, 0), since z reaches 128 below that bound (exponent bits 255
 * would be inf) */
static inline vf v_exp(vf x0) {
    const vf x = v_min(v_set1(88.72f), x0);
    vf z;
    vf p = v_exp_parts(x, &z);
    const vf big = v_set1(127.0f);
    p = v_mul(v_mul(p, v_pow2i(v_min(z, big))), v_pow2i(v_max(v_sub(z, big), v_zero())));
    /* max's second operand is its result where either is NaN: a NaN x stays NaN */
    return v_max(v_keep_gt(x0, 88.7228394f, v_set1(INFINITY)), v_keep_nlt(x, -87.3f, p));
}
#endif

static inline float ld(const void *p, int64_t i, int bf16) {
    return bf16 ? bf2f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, int64_t i, float x, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f2bf(x);
    else
        ((float *)p)[i] = x;
}
static inline float rnd(float x, int bf16) { return bf16 ? bf2f(f2bf(x)) : x; }

/* RMSNorm of the rows of x, with the residual added first when `add` is given.
 *
 * x:    (T, H, n) elements: row (t, h) at x + t * x_stride + h * n (H > 1: per-head norms, e.g. q/k norms)
 * add:  NULL, or rows laid out as x's (add_stride): x's rows become round(x + add), in place, before the norm
 * out:  the norms, row (t, h) at out + t * out_stride + h * n
 * y = x * (1 / sqrt(mean(x^2) + eps)) in float32, then by mode as models.layers.RMSNorm does:
 *   0: round(w * round(y)), w (n,) of x's type;  1: round(y * scale), scale (n,) float32;  2: round(y) */
void rms_norm(void *x, int64_t x_stride, const void *add, int64_t add_stride, void *out, int64_t out_stride,
              int64_t T, int H, int n, const void *w, const float *scale, float eps, int mode, int bf16,
              int nthreads) {
    const int64_t rows = T * H;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * n >= 65536)
    for (int64_t it = 0; it < rows; it++) {
        const int64_t t = it / H, h = it % H;
        const int64_t xo = t * x_stride + h * n, ao = t * add_stride + h * n, oo = t * out_stride + h * n;
        float ss = 0.f;
        int i = 0;
#ifdef VW
        vf acc = v_zero();
        for (; i + VW <= n; i += VW) {
            vf v = v_load_any(x, xo + i, bf16);
            if (add) {
                v = v_round_to(v_add(v, v_load_any(add, ao + i, bf16)), bf16);
                v_store_any(x, xo + i, v, bf16);
            }
            acc = v_add(acc, v_mul(v, v));
        }
        ss = v_reduce_add(acc);
#endif
        for (; i < n; i++) {
            float v = ld(x, xo + i, bf16);
            if (add) {
                v = rnd(v + ld(add, ao + i, bf16), bf16);
                st(x, xo + i, v, bf16);
            }
            ss += v * v;
        }
        const float r = 1.0f / sqrtf(ss / (float)n + eps);
        i = 0;
#ifdef VW
        const vf vr = v_set1(r);
        for (; i + VW <= n; i += VW) {
            vf y = v_mul(v_load_any(x, xo + i, bf16), vr);
            if (mode == 0)
                y = v_mul(v_load_any(w, i, bf16), v_round_to(y, bf16));
            else if (mode == 1)
                y = v_mul(y, v_load(scale + i));
            v_store_any(out, oo + i, y, bf16);
        }
#endif
        for (; i < n; i++) {
            float y = ld(x, xo + i, bf16) * r;
            if (mode == 0)
                y = ld(w, i, bf16) * rnd(y, bf16);
            else if (mode == 1)
                y = y * scale[i];
            st(out, oo + i, y, bf16);
        }
    }
}

/* SwiGLU's activation: out (T, n) = round(round(silu(g)) * u), silu(g) = g / (1 + exp(-g)) in float32, for the
 * gate g and up u halves of each row of gu ((T, gu_stride) with g at 0 .. n and u at n .. 2 n) */
static inline __attribute__((always_inline)) void silu_mul_row(const void *gu, int64_t go, int n, void *out,
                                                                 int64_t oo, const int bf16) {
    int i = 0;
#ifdef VW
    const vf one = v_set1(1.0f);
    for (; i + VW <= n; i += VW) {
        const vf g = v_load_any(gu, go + i, bf16);
        const vf a = v_div(g, v_add(one, v_exp(v_sub(v_zero(), g))));
        v_store_any(out, oo + i, v_mul(v_round_to(a, bf16), v_load_any(gu, go + n + i, bf16)), bf16);
    }
#endif
    for (; i < n; i++) {
        const float g = ld(gu, go + i, bf16);
        st(out, oo + i, rnd(g / (1.0f + expf(-g)), bf16) * ld(gu, go + n + i, bf16), bf16);
    }
}

void silu_mul(const void *gu, int64_t gu_stride, int64_t T, int n, void *out, int64_t out_stride, int bf16,
              int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * n >= 32768)
    for (int64_t t = 0; t < T; t++) {
        if (bf16)                                   /* each element type's loop compiled apart */
            silu_mul_row(gu, t * gu_stride, n, out, t * out_stride, 1);
        else
            silu_mul_row(gu, t * gu_stride, n, out, t * out_stride, 0);
    }
}

/* ---- greedy tokens, and the log-softmax normaliser, of a step's logits ----
 *
 * x: (S, V) float32 or bfloat16, row s at x + s * stride.  arg[s]: the index of row s's first maximum, as
 * torch.argmax gives it (a NaN counts as above everything: the first NaN's index).  With mx and ls (may be NULL):
 * mx[s] = the row's maximum and ls[s] = log(sum(exp(x - mx))), so a token's logprob is (x - mx) - ls, torch's
 * log_softmax formula.  Each row is cut into chunks of LOGIT_CHUNK values, whatever S: one OpenMP item per (row,
 * chunk), the chunks then combined in order, so a row's results do not depend on the batch it is in.
 * Why: torch.argmax over (256, 49152) float32 took 7.4 ms on 2 threads (its reduction is not vectorised),
 * torch.amax 1.1 ms; log_softmax of the same 17.7 ms. */
#define LOGIT_CHUNK 8192

static void chunk_stats(const void *x, int64_t a, int64_t b, int bf16, float *m_out, int64_t *i_out,
                        float *s_out) {
    float m = -INFINITY;
    int64_t i = a, nan_at = -1;
#ifdef VW
    vf vm = v_set1(-INFINITY);
    unsigned nan = 0;
    for (; i + VW <= b; i += VW) {
        const vf v = v_load_any(x, i, bf16);
        nan |= v_mask_nan(v);
        vm = v_max(vm, v);
    }
    m = v_reduce_max(vm);
    if (nan) nan_at = a;              /* somewhere before i: found by the scan below */
#endif
    for (; i < b; i++) {
        const float v = ld(x, i, bf16);
        if (v != v) {
            if (nan_at < 0) nan_at = i;
        } else if (v > m) {
            m = v;
        }
    }
    if (nan_at >= 0) {                 /* the first NaN */
        int64_t j = a;
        while (!(ld(x, j, bf16) != ld(x, j, bf16))) j++;
        *m_out = NAN;
        *i_out = j;
        if (s_out) *s_out = NAN;
        return;
    }
    /* the first maximum */
    int64_t j = a, at = -1;
#ifdef VW
    const vf vmx = v_set1(m);
    for (; j + VW <= b; j += VW) {
        const unsigned k = v_mask_eq(v_load_any(x, j, bf16), vmx);
        if (k) {
            at = j + __builtin_ctz(k);
            break;
        }
    }
#endif
    if (at < 0)
        for (; j < b; j++)
            if (ld(x, j, bf16) == m) {
                at = j;
                break;
            }
    *m_out = m;
    *i_out = at < 0 ? a : at;          /* every value -inf... is still equal to m; a is only a guard */
    if (!s_out) return;
    if (m == -INFINITY) {              /* a chunk of -inf only adds nothing (exp(-inf - -inf) would be NaN) */
        *s_out = 0.f;
        return;
    }
    float sum = 0.f;
    j = a;
#ifdef VW
    vf vs = v_zero();
    for (; j + VW <= b; j += VW) vs = v_add(vs, v_exp_nonpos(v_sub(v_load_any(x, j, bf16), vmx)));
    sum = v_reduce_add(vs);
#endif
    for (; j < b; j++) sum += exp_nonpos(ld(x, j, bf16) - m);
    *s_out = sum;
}

void logit_stats(const void *x, int64_t stride, int64_t S, int64_t V, int bf16, int64_t *arg, float *mx, float *ls,
                 int nthreads) {
    const int64_t nch = (V + LOGIT_CHUNK - 1) / LOGIT_CHUNK, items = S * nch;
    if (items == 0) return;
    float *cm = (float *)malloc(sizeof(float) * (size_t)items * 2);
    int64_t *ci = (int64_t *)malloc(sizeof(int64_t) * (size_t)items);
    if (!cm || !ci) {                  /* the caller sees arg[0] = -1 and says so */
        free(cm);
        free(ci);
        arg[0] = -1;
        return;
    }
    float *cs = cm + items;
    const int esz = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (S * V >= 65536)
    for (int64_t it = 0; it < items; it++) {
        const int64_t s = it / nch, c = it % nch;
        const int64_t a = c * LOGIT_CHUNK, b = a + LOGIT_CHUNK < V ? a + LOGIT_CHUNK : V;
        const char *row = (const char *)x + s * stride * esz;
        chunk_stats(row, a, b, bf16, cm + it, ci + it, ls ? cs + it : NULL);
    }
    for (int64_t s = 0; s < S; s++) {
        const int64_t o = s * nch;
        float m = cm[o];
        int64_t at = ci[o];
        for (int64_t c = 1; c < nch && m == m; c++) {      /* the first chunk with a NaN, else the first max */
            if (cm[o + c] != cm[o + c] || cm[o + c] > m) {
                m = cm[o + c];
                at = ci[o + c];
            }
        }
        arg[s] = at;
        if (ls) {
            float sum = 0.f;
            for (int64_t c = 0; c < nch; c++)
                sum += cs[o + c] * (cm[o + c] == m ? 1.0f : expf(cm[o + c] - m));
            mx[s] = m;
            ls[s] = logf(sum);
        }
    }
    free(ci);
    free(cm);
}
