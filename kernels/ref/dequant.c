/* dequant.c - scalar references of the float-weight side: dequantization of
 * embedding rows (F32, F16, BF16, Q8_0, Q4_0, Q6_K; block layouts in quants.h) and
 * the LM head in its formats (kernels.h): q8 activation blocks and the row dots. */
#include "kernels/kernels.h"
#include "kernels/quants.h"

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

void bn_ref_head_quantize(const float *x, int n, int8_t *q, float *d)
{
    for (int b = 0; b < n / 32; b++) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++)
            amax = fmaxf(amax, fabsf(x[32 * b + i]));
        float db = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < 32; i++)
            q[32 * b + i] = (int8_t)nearbyintf(x[32 * b + i] * id);
        d[b] = db;
    }
}

/* q6_h value j of a block, in [-32, 31] */
static inline int q6h_value(const uint8_t *ql, const uint8_t *qh, int j)
{
    int lo = (ql[j % 16] >> (4 * (j / 16))) & 15, hi = (qh[j % 8] >> (2 * (j / 8))) & 3;
    return (lo | hi << 4) - 32;
}

void bn_hmat_place_row(const bn_hmat_t *h, uint8_t *data, int r, const uint8_t *row)
{
    const size_t bb = bn_head_block_bytes(h->type);
    const int nb = (int)(h->n_in / 32), ub = bn_head_unit_blocks(h->type, h->n_in);
    const bn_hmat_t at = { .type = h->type, .n_in = h->n_in, .data = data, .row_bytes = h->row_bytes };
    for (int u = 0; u * ub < nb; u++) {
        const int m = nb - u * ub < ub ? nb - u * ub : ub;
        const uint8_t *src = row + (size_t)u * ub * bb;
        uint8_t *p = (uint8_t *)bn_hmat_unit(&at, r, u);
        if (h->type == BN_HEAD_F16 || h->type == BN_HEAD_Q8) {
            memcpy(p, src, (size_t)m * bb);
            continue;
        }
        /* q4 / q6: field by field (kernels.h) */
        const int q6 = h->type == BN_HEAD_Q6;
        for (int k = 0; k < m; k++) {
            const uint8_t *blk = src + (size_t)k * bb;
            if (q6) {
                const bn_block_q6_h *b6 = (const bn_block_q6_h *)(const void *)blk;
                memcpy(p + 16 * k, b6->ql, 16);
                memcpy(p + 16 * m + 8 * k, b6->qh, 8);
                memcpy(p + 24 * m + 2 * k, &b6->d, 2);
            } else {
                const bn_block_q4_0 *b4 = (const bn_block_q4_0 *)(const void *)blk;
                memcpy(p + 16 * k, b4->qs, 16);
                memcpy(p + 16 * m + 2 * k, &b4->d, 2);
            }
        }
    }
}

void bn_ref_head_gemv(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1)
{
    const int nb = (int)h->n_in / 32, ub = bn_head_unit_blocks(h->type, h->n_in);
    const size_t bb = bn_head_block_bytes(h->type);
    for (int r = r0; r < r1; r++) {
        float acc = 0.0f;
        for (int b = 0; b < nb; b++) {
            const int u = b / ub, k = b % ub, m = nb - u * ub < ub ? nb - u * ub : ub;
            const uint8_t *p = bn_hmat_unit(h, r, u); /* the unit; block k of its m (kernels.h) */
            const int8_t *q = a->q + 32 * b;
            int32_t s = 0;
            switch (h->type) {
            case BN_HEAD_F16:
                for (int i = 0; i < 32; i++)
                    acc += bn_fp16_to_f32(((const bn_fp16_t *)(const void *)(p + k * bb))[i]) * a->x[32 * b + i];
                continue;
            case BN_HEAD_Q8: {
                const bn_block_q8_0 *blk = (const bn_block_q8_0 *)(const void *)(p + k * bb);
                for (int i = 0; i < 32; i++)
                    s += blk->qs[i] * q[i];
                acc += bn_fp16_to_f32(blk->d) * a->d[b] * (float)s;
                break;
            }
            case BN_HEAD_Q4: {
                const uint8_t *qs = bn_hunit_qs(p, k);
                for (int i = 0; i < 16; i++)
                    s += ((qs[i] & 15) - 8) * q[i] + ((qs[i] >> 4) - 8) * q[16 + i];
                acc += bn_fp16_to_f32(bn_hunit_d(p, h->type, m, k)) * a->d[b] * (float)s;
                break;
            }
            case BN_HEAD_Q6: {
                const uint8_t *ql = bn_hunit_qs(p, k), *qh = bn_hunit_qh(p, m, k);
                for (int i = 0; i < 32; i++)
                    s += q6h_value(ql, qh, i) * q[i];
                acc += bn_fp16_to_f32(bn_hunit_d(p, h->type, m, k)) * a->d[b] * (float)s;
                break;
            }
            }
        }
        logits[r] = acc;
    }
}

