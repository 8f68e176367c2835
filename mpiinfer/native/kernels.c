/* CPU kernels for the per-token work between the matmuls: one call each instead of a Python loop of torch calls.
 *
 * Built on first use by mpiinfer/native/__init__.py (cc -O3 -march=native -fopenmp -ffp-contract=off), loaded
 * with ctypes; every function takes raw pointers into contiguous torch tensors and a thread count.  OpenMP here
 * is the libgomp torch already loaded (same soname), so these kernels share torch's thread pool.
 *
 * -ffp-contract=off: no fused multiply-add, so the rotary embedding rounds exactly as torch's elementwise ops do
 * (x * cos + rotate_half(x) * sin, each product and the sum rounded): its results are bit-identical to
 * models.layers.Rotary.apply, in float32 and in bfloat16.
 *
 * Element types: float32 (dtype 0) or bfloat16 (dtype 1, raw uint16); arithmetic is float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {        /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* row `hd` elements at element offset `off` of `base`, as float32: the row itself (float32) or `tmp` */
static inline const float *row_f32(const void *base, int64_t off, int hd, int bf16, float *tmp) {
    if (!bf16) return (const float *)base + off;
    const uint16_t *s = (const uint16_t *)base + off;
    for (int d = 0; d < hd; d++) tmp[d] = bf2f(s[d]);
    return tmp;
}

static inline void store_row(void *base, int64_t off, const float *x, int hd, int bf16) {
    if (!bf16) {
        memcpy((float *)base + off, x, (size_t)hd * 4);
    } else {
        uint16_t *d = (uint16_t *)base + off;
        for (int i = 0; i < hd; i++) d[i] = f2bf(x[i]);
    }
}

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
 * Work: one item per (sequence, KV head); the grp query heads of a KV head read each K/V row once. */
void decode_attention(const void *q, int64_t q_stride, const void *kc, const void *vc, int64_t pool, int n_kv,
                      int grp, int hd, int64_t nseq, const int64_t *q_rows, const int64_t *run_off,
                      const int64_t *runs, const int64_t *skip, int64_t max_rows, float scale, void *out,
                      int64_t out_stride, const float *init_m, const float *init_l, const float *init_acc,
                      int bf16, int nthreads) {
    const int64_t items = nseq * n_kv;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc(sizeof(float) * ((size_t)grp * (max_rows + 1) + (size_t)grp * hd * 2 + hd));
        float *sc = buf;                                    /* (grp, max_rows) scores, then weights */
        float *qf = sc + (size_t)grp * (max_rows + 1);      /* (grp, hd) scaled queries */
        float *acc = qf + (size_t)grp * hd;                 /* (grp, hd) */
        float *tmp = acc + (size_t)grp * hd;                /* one bfloat16 row as float32 */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t s = it / n_kv;
            const int h = (int)(it % n_kv);
            const int64_t qoff = q_rows[s] * q_stride + (int64_t)h * grp * hd;
            for (int g = 0; g < grp; g++) {
                const float *qr = row_f32(q, qoff + (int64_t)g * hd, hd, bf16, tmp);
                for (int d = 0; d < hd; d++) qf[g * hd + d] = qr[d] * scale;
            }
            int64_t n = 0;
            for (int64_t r = run_off[s]; r < run_off[s + 1]; r++) n += runs[2 * r + 1];
            const int64_t first = skip ? skip[s] : 0;
            const int64_t rows = n - first;
            /* scores */
            int64_t j = 0, t = 0;
            for (int64_t r = run_off[s]; r < run_off[s + 1]; r++) {
                const int64_t a = runs[2 * r], len = runs[2 * r + 1];
                for (int64_t i = 0; i < len; i++, t++) {
                    if (t < first) continue;
                    const float *kr = row_f32(kc, ((int64_t)h * pool + a + i) * hd, hd, bf16, tmp);
                    for (int g = 0; g < grp; g++) {
                        const float *qg = qf + g * hd;
                        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                        for (int d = 0; d < hd; d++) dot += qg[d] * kr[d];
                        sc[g * max_rows + j] = dot;
                    }
                    j++;
                }
            }
            /* softmax numerators, continuing the initial state when given */
            float l[64];             /* grp <= 64 (checked by the caller) */
            for (int g = 0; g < grp; g++) {
                const int64_t hq = s * (int64_t)n_kv * grp + (int64_t)h * grp + g;
                float mx = init_m ? init_m[hq] : -INFINITY;
                float *sg = sc + g * max_rows;
                for (int64_t i = 0; i < rows; i++) mx = sg[i] > mx ? sg[i] : mx;
                float sum = 0.f;
                float c = 0.f;
                if (init_m) {
                    c = expf(init_m[hq] - mx);
                    sum = init_l[hq] * c;
                }
                for (int64_t i = 0; i < rows; i++) {
                    sg[i] = expf(sg[i] - mx);
                    sum += sg[i];
                }
                l[g] = sum;
                float *ag = acc + g * hd;
                if (init_m) {
                    const float *ia = init_acc + hq * hd;
                    for (int d = 0; d < hd; d++) ag[d] = ia[d] * c;
                } else {
                    for (int d = 0; d < hd; d++) ag[d] = 0.f;
                }
            }
            /* weighted values */
            j = 0;
            t = 0;
            for (int64_t r = run_off[s]; r < run_off[s + 1]; r++) {
                const int64_t a = runs[2 * r], len = runs[2 * r + 1];
                for (int64_t i = 0; i < len; i++, t++) {
                    if (t < first) continue;
                    const float *vr = row_f32(vc, ((int64_t)h * pool + a + i) * hd, hd, bf16, tmp);
                    for (int g = 0; g < grp; g++) {
                        const float p = sc[g * max_rows + j];
                        float *ag = acc + g * hd;
#pragma omp simd
                        for (int d = 0; d < hd; d++) ag[d] += p * vr[d];
                    }
                    j++;
                }
            }
            const int64_t ooff = q_rows[s] * out_stride + (int64_t)h * grp * hd;
            for (int g = 0; g < grp; g++) {
                float *ag = acc + g * hd;
                const float inv = 1.f / l[g];
                for (int d = 0; d < hd; d++) ag[d] *= inv;
                store_row(out, ooff + (int64_t)g * hd, ag, hd, bf16);
            }
        }
        free(buf);
    }
}

/* Rotary embedding of q and k in place, then k and v written into one layer's cache.
 *
 * q: (T, q_stride) with n_q heads of hd at the start of each row; k, v: (T, k_stride / v_stride) with n_kv heads
 * cos_t/sin_t: float32 tables (positions, hd) (Hugging Face's cat(freqs, freqs)); pos: (T,) positions
 * kc/vc: (n_kv, pool, hd) contiguous; token t's K/V go to row widx[t]
 * Per element, exactly as torch computes x * cos + rotate_half(x) * sin in the element type (the tables rounded
 * to it first, each product and the sum rounded to it). */
void rope_store(void *q, int64_t q_stride, int n_q, void *k, int64_t k_stride, const void *v, int64_t v_stride,
                int n_kv, int hd, int64_t T, const int64_t *pos, const float *cos_t, const float *sin_t, void *kc,
                void *vc, int64_t pool, const int64_t *widx, int bf16, int nthreads) {
    const int heads = n_q + n_kv;
    const int half = hd / 2;
#pragma omp parallel num_threads(nthreads)
    {
        float *x = (float *)malloc(sizeof(float) * (size_t)hd * 4);
        float *y = x + hd, *c = y + hd, *sn = c + hd;
#pragma omp for schedule(static)
        for (int64_t it = 0; it < T * heads; it++) {
            const int64_t t = it / heads;
            const int hh = (int)(it % heads);
            const float *ct = cos_t + pos[t] * hd, *st = sin_t + pos[t] * hd;
            for (int d = 0; d < hd; d++) {
                c[d] = bf16 ? bf2f(f2bf(ct[d])) : ct[d];
                sn[d] = bf16 ? bf2f(f2bf(st[d])) : st[d];
            }
            void *base;
            int64_t off;
            if (hh < n_q) {
                base = q;
                off = t * q_stride + (int64_t)hh * hd;
            } else {
                base = k;
                off = t * k_stride + (int64_t)(hh - n_q) * hd;
            }
            const float *src = row_f32(base, off, hd, bf16, y);
            memcpy(x, src, sizeof(float) * (size_t)hd);
            for (int d = 0; d < hd; d++) {
                const float rot = d < half ? -x[d + half] : x[d - half];
                float a = x[d] * c[d], b = rot * sn[d];
                if (bf16) {
                    a = bf2f(f2bf(a));
                    b = bf2f(f2bf(b));
                }
                y[d] = a + b;
            }
            store_row(base, off, y, hd, bf16);
            if (hh >= n_q) {
                const int h = hh - n_q;
                store_row(kc, ((int64_t)h * pool + widx[t]) * hd, y, hd, bf16);
                const int64_t esz = bf16 ? 2 : 4;
                memcpy((char *)vc + ((int64_t)h * pool + widx[t]) * hd * esz,
                       (const char *)v + (t * v_stride + (int64_t)h * hd) * esz, (size_t)(hd * esz));
            }
        }
        free(x);
    }
}
