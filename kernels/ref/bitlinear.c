/* bitlinear.c - scalar reference of the BitLinear product: per-token int8
 * activation quantization and the ternary matrix product in the kernels' layout
 * (I2_S rows in groups, kernels.h), and the grouping itself.
 *
 * The plainest readable form of the maths; SIMD variants must give the same
 * integers and the same float epilogue. Accumulators are int32: |sum(u*q)| <=
 * 2 * 128 * n_in, far from overflow for any n_in below 8 million. */
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

void bn_ref_quantize_act(const float *x, int n, int8_t *q, float *s, int32_t *qsum)
{
    float amax = 0.0f;
    for (int i = 0; i < n; i++)
        amax = fmaxf(amax, fabsf(x[i]));
    float sc = 127.0f / fmaxf(amax, 1e-5f);
    int32_t sum = 0;
    for (int i = 0; i < n; i++) {
        float v = nearbyintf(x[i] * sc); /* round half to even (default rounding mode) */
        v = fminf(fmaxf(v, -128.0f), 127.0f);
        q[i] = (int8_t)v;
        sum += q[i];
    }
    *s = sc;
    *qsum = sum;
}

void bn_tmat_interleave(uint8_t *dst, const uint8_t *src, size_t row_bytes, uint32_t n_rows)
{
    const size_t nb = row_bytes / 32;
    for (uint32_t g = 0; g < (n_rows + BN_TGROUP - 1) / BN_TGROUP; g++) {
        uint8_t *out = dst + (size_t)g * BN_TGROUP * row_bytes;
        for (uint32_t i = 0; i < BN_TGROUP; i++) {
            const uint32_t r = g * BN_TGROUP + i;
            for (size_t b = 0; b < nb; b++) {
                uint8_t *o = out + b * BN_TBLOCK_STRIDE + 32 * i;
                if (r < n_rows)
                    memcpy(o, src + (size_t)r * row_bytes + 32 * b, 32);
                else
                    memset(o, 0, 32);
            }
        }
    }
}

/* u in {0,1,2} of element i of a row (bn_tmat_row) in the kernels' layout */
static inline int row_u(const uint8_t *row, int i)
{
    int b = i >> 7, g = (i >> 5) & 3, j = i & 31;
    return (row[BN_TBLOCK_STRIDE * b + j] >> (6 - 2 * g)) & 3;
}

/* A row whose 256-blocks carry their own factors (TQ files with unequal d):
 * runs of equal factors are summed in integers, as for a single scale. */
static float row_blockscaled(const uint8_t *row, const float *bs, const int8_t *q, int n)
{
    float out = 0.0f;
    int64_t run = 0;
    for (int b = 0; b < n / 256; b++) {
        int32_t acc = 0, qs = 0;
        for (int i = 256 * b; i < 256 * b + 256; i++) {
            acc += row_u(row, i) * q[i];
            qs += q[i];
        }
        if (b > 0 && bs[b] != bs[b - 1]) {
            out += (float)run * bs[b - 1];
            run = 0;
        }
        run += acc - qs;
    }
    return out + (float)run * bs[n / 256 - 1];
}

void bn_ref_tgemm(const bn_tmat_t *w, const int8_t *q, const float *s, const int32_t *qsum, int nt,
                  float *y, size_t ldy, int r0, int r1)
{
    const int n = (int)w->n_in;
    for (int t = 0; t < nt; t++) {
        const int8_t *qt = q + (size_t)t * n;
        for (int r = r0; r < r1; r++) {
            const uint8_t *row = bn_tmat_row(w, r);
            float out;
            if (w->bscale) {
                out = row_blockscaled(row, w->bscale + (size_t)r * (n / 256), qt, n) * w->scale / s[t];
            } else {
                int32_t acc = 0;
                for (int i = 0; i < n; i++)
                    acc += row_u(row, i) * qt[i];
                out = (float)(acc - qsum[t]) * w->scale / s[t];
            }
            y[(size_t)t * ldy + r] = out;
        }
    }
}
