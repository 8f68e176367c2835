/* CPU kernels for the per-token work between the matmuls: one call each instead of a Python loop of torch calls.
 *
 * Built on first use by mpiinfer/native/__init__.py (cc -O3 -march=native -fopenmp, this file with
 * -ffp-contract=fast, rope.c with -ffp-contract=off), loaded with ctypes; every function takes raw pointers into
 * contiguous torch tensors and a thread count.  OpenMP here is the libgomp torch already loaded (same soname), so
 * these kernels share torch's thread pool.
 *
 * Element types: float32 (dtype 0) or bfloat16 (dtype 1, raw uint16); arithmetic is float32.
 */
#include "common.h"

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

/* one (sequence, KV head) item over its attended pool rows `idx` (rows of them); always inlined with hd a
 * constant where the caller knows it */
static inline __attribute__((always_inline)) void attend_item(
    const cache_t *c, int h, int grp, const int hd, const int64_t *idx, int64_t rows, int64_t stride,
    const float *qf, float *sc, float *acc, float *tmp, float *l, const float *im, const float *il,
    const float *ia) {
    const int64_t base = (int64_t)h * c->pool;
    /* pass 1: scores, (grp, stride) */
    for (int64_t j = 0; j < rows; j++) {
        const float *kr = row_f32(c->kc, (base + idx[j]) * hd, hd, c->bf16, tmp);
        for (int g = 0; g < grp; g++) {
            const float *qg = qf + g * hd;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int d = 0; d < hd; d++) dot += qg[d] * kr[d];
            sc[g * stride + j] = dot;
        }
    }
    /* softmax numerators, continuing the initial state when given */
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
    /* pass 2: weighted values */
    for (int64_t j = 0; j < rows; j++) {
        const float *vr = row_f32(c->vc, (base + idx[j]) * hd, hd, c->bf16, tmp);
        for (int g = 0; g < grp; g++) {
            const float p = sc[g * stride + j];
            float *ag = acc + g * hd;
#pragma omp simd
            for (int d = 0; d < hd; d++) ag[d] += p * vr[d];
        }
    }
}

void decode_attention(const void *q, int64_t q_stride, const void *kc, const void *vc, int64_t pool, int n_kv,
                      int grp, int hd, int64_t nseq, const int64_t *q_rows, const int64_t *run_off,
                      const int64_t *runs, const int64_t *skip, int64_t max_rows, float scale, void *out,
                      int64_t out_stride, const float *init_m, const float *init_l, const float *init_acc,
                      int bf16, int nthreads) {
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
        int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)(max_rows + 1));   /* attended pool rows */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t s = it / n_kv;
            const int h = (int)(it % n_kv);
            const int64_t qoff = q_rows[s] * q_stride + (int64_t)h * grp * hd;
            for (int g = 0; g < grp; g++) {
                const float *qr = row_f32(q, qoff + (int64_t)g * hd, hd, bf16, tmp);
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
                store_row(out, ooff + (int64_t)g * hd, ag, hd, bf16);
            }
        }
        free(idx);
        free(buf);
    }
}
