/* The rotary embedding with the K/V cache write (see kernels.c for how it is built and called).
 *
 * Built with -ffp-contract=off: no fused multiply-add, so it rounds exactly as torch's elementwise ops do
 * (x * cos + rotate_half(x) * sin, each product and the sum rounded): its results are bit-identical to
 * models.layers.Rotary.apply, in float32 and in bfloat16.
 */
#include "common.h"

/* Rotary embedding of q and k in place, then k and v written into one layer's cache.
 *
 * q: (T, q_stride) with n_q heads of hd at the start of each row; k, v: (T, k_stride / v_stride) with n_kv heads
 * cos_t/sin_t: float32 tables (positions, hd) (Hugging Face's cat(freqs, freqs)); pos: (T,) positions
 * kc/vc: (n_kv, pool, hd) contiguous, float32 or bfloat16 (kv_bf16) whatever q, k, v are (bf16); token t's K/V
 *        go to row widx[t]
 * Per element, exactly as torch computes x * cos + rotate_half(x) * sin in the element type (the tables rounded
 * to it first, each product and the sum rounded to it). */
void rope_store(void *q, int64_t q_stride, int n_q, void *k, int64_t k_stride, const void *v, int64_t v_stride,
                int n_kv, int hd, int64_t T, const int64_t *pos, const float *cos_t, const float *sin_t, void *kc,
                void *vc, int64_t pool, const int64_t *widx, int bf16, int kv_bf16, int nthreads) {
    const int heads = n_q + n_kv;
    const int half = hd / 2;
    const int64_t esz = bf16 ? 2 : 4;
#pragma omp parallel num_threads(nthreads)
    {
        float *x = (float *)malloc(sizeof(float) * (size_t)hd * 4);
        float *y = x + hd, *c = y + hd, *sn = c + hd;
        /* one item per token: its tables once for all its heads; the two halves in separate loops (no per-element
         * branch: vectorisable) */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            const float *ct = cos_t + pos[t] * hd, *st = sin_t + pos[t] * hd;
            for (int d = 0; d < hd; d++) {
                c[d] = bf16 ? bf2f(f2bf(ct[d])) : ct[d];
                sn[d] = bf16 ? bf2f(f2bf(st[d])) : st[d];
            }
            for (int hh = 0; hh < heads; hh++) {
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
                if (bf16) {
                    for (int d = 0; d < half; d++)
                        y[d] = bf2f(f2bf(x[d] * c[d])) + bf2f(f2bf(-x[d + half] * sn[d]));
                    for (int d = half; d < hd; d++)
                        y[d] = bf2f(f2bf(x[d] * c[d])) + bf2f(f2bf(x[d - half] * sn[d]));
                } else {
                    for (int d = 0; d < half; d++) y[d] = x[d] * c[d] + -x[d + half] * sn[d];
                    for (int d = half; d < hd; d++) y[d] = x[d] * c[d] + x[d - half] * sn[d];
                }
                store_row(base, off, y, hd, bf16);
                if (hh >= n_q) {
                    const int h = hh - n_q;
                    const int64_t crow = ((int64_t)h * pool + widx[t]) * hd;
                    const int64_t voff = t * v_stride + (int64_t)h * hd;
                    /* the row as stored in k, in the cache's type: a float32 cache under bfloat16 k takes k's
                     * rounded values (same types: y, rounded by store_row as k was) */
                    store_row(kc, crow, bf16 && !kv_bf16 ? row_f32(base, off, hd, 1, x) : y, hd, kv_bf16);
                    if (kv_bf16 == bf16) {
                        memcpy((char *)vc + crow * esz, (const char *)v + voff * esz, (size_t)(hd * esz));
                    } else {                 /* a cache of another type: each value rounded as torch's .to() */
                        store_row(vc, crow, row_f32(v, voff, hd, bf16, x), hd, kv_bf16);
                    }
                }
            }
        }
        free(x);
    }
}
