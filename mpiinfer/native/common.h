/* Helpers shared by kernels.c and rope.c: bfloat16 <-> float32 as torch rounds, rows as float32. */
#ifndef MPIINFER_NATIVE_COMMON_H
#define MPIINFER_NATIVE_COMMON_H
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

#endif
