/* dequant.c - scalar reference dequantization of embedding-type rows (F32, F16,
 * BF16, Q8_0, Q4_0, Q6_K) and the LM head built on it. Block layouts: quants.h. */
#include "kernels/kernels.h"
#include "kernels/quants.h"
#include "worker/gguf.h"

#include <math.h>
#include <string.h>

static void dq_q8_0(const bn_block_q8_0 *b, float *out, int nb)
{
    for (int i = 0; i < nb; i++) {
        float d = bn_fp16_to_f32(b[i].d);
        for (int j = 0; j < BN_QK8_0; j++)
            out[i * BN_QK8_0 + j] = d * b[i].qs[j];
    }
}

static void dq_q4_0(const bn_block_q4_0 *b, float *out, int nb)
{
    for (int i = 0; i < nb; i++) {
        float d = bn_fp16_to_f32(b[i].d);
        for (int j = 0; j < BN_QK4_0 / 2; j++) {
            out[i * BN_QK4_0 + j] = d * ((b[i].qs[j] & 15) - 8);
            out[i * BN_QK4_0 + j + 16] = d * ((b[i].qs[j] >> 4) - 8);
        }
    }
}

static void dq_q6_k(const bn_block_q6_k *b, float *out, int nb)
{
    for (int i = 0; i < nb; i++) {
        float d = bn_fp16_to_f32(b[i].d);
        float *y = out + i * BN_QK_K;
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b[i].ql + 64 * h, *qh = b[i].qh + 32 * h;
            const int8_t *sc = b[i].scales + 8 * h;
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[128 * h + l] = d * sc[is + 0] * q1;
                y[128 * h + l + 32] = d * sc[is + 2] * q2;
                y[128 * h + l + 64] = d * sc[is + 4] * q3;
                y[128 * h + l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

void bn_ref_dequant_row(uint32_t type, const void *row, float *out, int n)
{
    switch (type) {
    case BN_TYPE_F32:
        memcpy(out, row, (size_t)n * sizeof(float));
        break;
    case BN_TYPE_F16:
        for (int i = 0; i < n; i++)
            out[i] = bn_fp16_to_f32(((const bn_fp16_t *)row)[i]);
        break;
    case BN_TYPE_BF16:
        for (int i = 0; i < n; i++)
            out[i] = bn_bf16_to_f32(((const uint16_t *)row)[i]);
        break;
    case BN_TYPE_Q8_0: dq_q8_0(row, out, n / BN_QK8_0); break;
    case BN_TYPE_Q4_0: dq_q4_0(row, out, n / BN_QK4_0); break;
    case BN_TYPE_Q6_K: dq_q6_k(row, out, n / BN_QK_K); break;
    default:
        for (int i = 0; i < n; i++)
            out[i] = NAN;
    }
}

void bn_ref_lm_head(uint32_t type, const uint8_t *e, size_t row_bytes, const float *x, int n,
                    float *logits, int r0, int r1)
{
    /* Dequantize in chunks that are whole blocks: the largest power of two <= 256
     * dividing n (a valid row of a block type is a multiple of its block). */
    int chunk = 256;
    while (n % chunk)
        chunk /= 2;
    uint64_t chunk_bytes = bn_type_nbytes(type, (uint64_t)chunk, 0);
    float buf[256];
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = e + (size_t)r * row_bytes;
        float acc = 0.0f;
        for (int c = 0; c < n; c += chunk) {
            bn_ref_dequant_row(type, row + (size_t)(c / chunk) * chunk_bytes, buf, chunk);
            for (int i = 0; i < chunk; i++)
                acc += buf[i] * x[c + i];
        }
        logits[r] = acc;
    }
}
