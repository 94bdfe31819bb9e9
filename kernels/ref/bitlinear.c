/* bitlinear.c - scalar reference of the BitLinear product: per-token int8
 * activation quantization and the ternary matrix-vector product for each weight
 * layout (I2_S, TQ2_0, TQ1_0, and float matrices holding w*scale).
 *
 * The plainest readable form of the maths; SIMD variants must give the same
 * integers. Accumulators are int32: |sum| <= 2 * 128 * K, far from overflow for
 * any K below 8 million. */
#include "kernels/kernels.h"
#include "kernels/quants.h"
#include "worker/gguf.h"

#include <math.h>

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

/* u in {0,1,2} of element i of an I2_S row (blocks of 128 in 32 bytes). */
static inline int i2s_u(const uint8_t *row, int i)
{
    int b = i >> 7, g = (i >> 5) & 3, j = i & 31;
    return (row[32 * b + j] >> (6 - 2 * g)) & 3;
}

/* Trit n (0..4) of a base-3 byte of TQ1_0: the top digit of b * 3^n in the byte's
 * fixed-point [0, 1) scale. Multiplication wraps mod 256 on purpose. */
static inline int tq1_trit(uint8_t b, int n)
{
    static const uint8_t pow3[5] = { 1, 3, 9, 27, 81 };
    uint8_t m = (uint8_t)(b * pow3[n]);
    return ((uint16_t)m * 3) >> 8;
}

/* sum(u * q) over one 256-weight TQ2_0 block. */
static int32_t tq2_dot(const bn_block_tq2_0 *blk, const int8_t *q)
{
    int32_t acc = 0;
    for (int h = 0; h < 2; h++)
        for (int n = 0; n < 4; n++)
            for (int m = 0; m < 32; m++)
                acc += ((blk->qs[32 * h + m] >> (2 * n)) & 3) * q[128 * h + 32 * n + m];
    return acc;
}

/* sum(u * q) over one 256-weight TQ1_0 block. */
static int32_t tq1_dot(const bn_block_tq1_0 *blk, const int8_t *q)
{
    int32_t acc = 0;
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 32; m++)
            acc += tq1_trit(blk->qs[m], n) * q[32 * n + m];
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 16; m++)
            acc += tq1_trit(blk->qs[32 + m], n) * q[160 + 16 * n + m];
    for (int n = 0; n < 4; n++)
        for (int j = 0; j < 4; j++)
            acc += tq1_trit(blk->qh[j], n) * q[240 + 4 * n + j];
    return acc;
}

static int32_t block_qsum(const int8_t *q, int n)
{
    int32_t s = 0;
    for (int i = 0; i < n; i++)
        s += q[i];
    return s;
}

void bn_ref_bitlinear(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum,
                      float *y, int r0, int r1)
{
    const int n = (int)w->n_in;
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w->data + (size_t)r * w->row_bytes;
        float out = 0.0f;
        switch (w->type) {
        case BN_TYPE_I2_S: {
            int32_t acc = 0;
            for (int i = 0; i < n; i++)
                acc += i2s_u(row, i) * q[i];
            out = (float)(acc - qsum) * w->scale / s; /* same rounding steps as TQ below */
            break;
        }
        case BN_TYPE_TQ2_0:
        case BN_TYPE_TQ1_0: {
            /* Each block has its own d. Files made by llama.cpp fold the tensor scale
             * into every d, so runs of blocks share d: sum those in integers, which
             * makes a folded TQ tensor give exactly the I2_S result. */
            int64_t run = 0;
            float run_d = 0.0f;
            for (int b = 0; b < n / BN_QK_K; b++) {
                const int8_t *qb = q + b * BN_QK_K;
                int32_t acc;
                float d;
                if (w->type == BN_TYPE_TQ2_0) {
                    const bn_block_tq2_0 *blk = (const bn_block_tq2_0 *)row + b;
                    acc = tq2_dot(blk, qb);
                    d = bn_fp16_to_f32(blk->d);
                } else {
                    const bn_block_tq1_0 *blk = (const bn_block_tq1_0 *)row + b;
                    acc = tq1_dot(blk, qb);
                    d = bn_fp16_to_f32(blk->d);
                }
                if (b > 0 && d != run_d) {
                    out += (float)run * run_d;
                    run = 0;
                }
                run_d = d;
                run += acc - block_qsum(qb, BN_QK_K);
            }
            out += (float)run * run_d;
            out = out * w->scale / s;
            break;
        }
        case BN_TYPE_F16: {
            const bn_fp16_t *h = (const bn_fp16_t *)row;
            for (int i = 0; i < n; i++)
                out += bn_fp16_to_f32(h[i]) * (float)q[i];
            out = out * w->scale / s;
            break;
        }
        case BN_TYPE_F32: {
            const float *f = (const float *)row;
            for (int i = 0; i < n; i++)
                out += f[i] * (float)q[i];
            out = out * w->scale / s;
            break;
        }
        default:
            out = NAN; /* the loader admits no other type */
        }
        y[r] = out;
    }
}
