/* kvq.c - the block-quantized KV cache (--kv-type q8, q4): a row stored, a row
 * widened, and attention over such rows, the plain way (kernels.h has the
 * layout). One quantizer for every ISA: a row's stored bytes never depend on
 * the CPU, and the cost (one row per KV head per token and layer) is small. */
#include "kernels/kernels.h"

#include <math.h>

/* x*id as an integer in [lo, hi], rounded half away from zero (a NaN gives lo,
 * never an undefined conversion) */
static int to_level(float x, float id, int lo, int hi)
{
    float v = roundf(x * id);
    v = v >= (float)lo ? v : (float)lo;
    return v <= (float)hi ? (int)v : hi;
}

void bn_ref_kvq_quantize(const float *x, int n, int bits, uint8_t *row)
{
    for (int b = 0; b < n / BN_KVQ_BLOCK; b++, x += BN_KVQ_BLOCK) {
        /* Q8_0: d = max|x| / 127. Q4_0: d = m / -8 with m the value of largest
         * magnitude, so m itself is level -8 and the 16 levels are all used.
         * The quants are found with the scale as stored (fp16), so x is
         * d * q to half a level of the scale that will multiply it back. */
        float amax = 0.0f, m = 0.0f;
        for (int i = 0; i < BN_KVQ_BLOCK; i++)
            if (fabsf(x[i]) > amax) {
                amax = fabsf(x[i]);
                m = x[i];
            }
        const bn_fp16_t dh = bn_f32_to_fp16(bits == 8 ? amax / 127.0f : m / -8.0f);
        const float d = bn_fp16_to_f32(dh), id = d != 0.0f && isfinite(d) ? 1.0f / d : 0.0f;
        memcpy(row, &dh, sizeof dh);
        if (bits == 8) {
            for (int i = 0; i < BN_KVQ_BLOCK; i++)
                row[2 + i] = (uint8_t)(int8_t)to_level(x[i], id, -127, 127);
            row += 34;
        } else {
            for (int i = 0; i < BN_KVQ_BLOCK / 2; i++)
                row[2 + i] = (uint8_t)(to_level(x[i], id, -8, 7) + 8) | (uint8_t)((to_level(x[16 + i], id, -8, 7) + 8) << 4);
            row += 18;
        }
    }
}

void bn_ref_kvq_dequant(const uint8_t *row, int n, int bits, float *out)
{
    for (int b = 0; b < n / BN_KVQ_BLOCK; b++, out += BN_KVQ_BLOCK) {
        bn_fp16_t dh;
        memcpy(&dh, row, sizeof dh);
        const float d = bn_fp16_to_f32(dh);
        if (bits == 8) {
            for (int i = 0; i < BN_KVQ_BLOCK; i++)
                out[i] = d * (float)(int8_t)row[2 + i];
            row += 34;
        } else {
            for (int i = 0; i < BN_KVQ_BLOCK / 2; i++) {
                out[i] = d * (float)((row[2 + i] & 15) - 8);
                out[16 + i] = d * (float)((row[2 + i] >> 4) - 8);
            }
            row += 18;
        }
    }
}

typedef struct {
    size_t row_stride;
    int bits;
} rows_t;

/* element i of row t of a block-quantized cache */
static float at_q(const void *base, int t, int i, const void *how)
{
    const rows_t *r = how;
    const uint8_t *b = (const uint8_t *)base + (size_t)t * r->row_stride +
                       (size_t)(i / BN_KVQ_BLOCK) * (r->bits == 8 ? sizeof(bn_block_q8_0) : sizeof(bn_block_q4_0));
    bn_fp16_t dh;
    memcpy(&dh, b, sizeof dh);
    const int j = i % BN_KVQ_BLOCK;
    const int q = r->bits == 8 ? (int8_t)b[2 + j] : j < 16 ? (b[2 + j] & 15) - 8 : (b[2 + j - 16] >> 4) - 8;
    return bn_fp16_to_f32(dh) * (float)q;
}

/* bn_ref_attention per head, each cached value widened as it is read */
void bn_ref_attention_heads_q(const float *q, int nq, size_t q_stride, const uint8_t *k, const uint8_t *v,
                              size_t row_stride, int bits, int n_pos, int head_dim, float *out, size_t out_stride,
                              float *ml)
{
    const rows_t how = { row_stride, bits };
    bn_ref_attention_heads_at(q, nq, q_stride, k, v, n_pos, head_dim, out, out_stride, ml, at_q, &how);
}
