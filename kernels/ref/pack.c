/* pack.c - reference quantizers into the block layouts of quants.h. See pack.h.
 *
 * Written from the layouts in quants.h / reference/formats.md and the maths named
 * in pack.h; no code taken from ggml. Everything here is scalar and simple: these
 * run once when a model file is made, never per token. */
#include "pack.h"

#include "base/status.h"

#include <math.h>
#include <string.h>

/* Every value a trit? Checked once up front, so the packing loops can use
 * u = w + 1 without a branch. */
static int check_trits(const int8_t *w, size_t n)
{
    int bad = 0;
    for (size_t i = 0; i < n; i++)
        bad |= (uint8_t)(w[i] + 1) > 2;
    return !bad;
}

static inline unsigned trit_u(int8_t w)
{
    return (unsigned)(w + 1);
}

int bn_pack_i2_s(const int8_t *w, size_t n, float scale, uint8_t *dst)
{
    if (n % BN_QK_I2S != 0 || !check_trits(w, n))
        return BN_EINVAL;
    /* Weight 128b + 32g + j sits in byte 32b + j, bits 6-2g..7-2g: group 0 on top. */
    for (size_t b = 0; b < n / BN_QK_I2S; b++) {
        const int8_t *src = w + b * BN_QK_I2S;
        uint8_t *out = dst + b * 32;
        for (int j = 0; j < 32; j++) {
            uint8_t v = 0;
            for (int g = 0; g < 4; g++)
                v |= (uint8_t)(trit_u(src[32 * g + j]) << (6 - 2 * g));
            out[j] = v;
        }
    }
    /* The tail: the tensor's one f32 scale, then zeros up to 32 bytes. */
    uint8_t *tail = dst + n / 4;
    memset(tail, 0, 32);
    memcpy(tail, &scale, sizeof scale);
    return BN_OK;
}

int bn_pack_tq2_0(const int8_t *w, size_t n, float scale, bn_block_tq2_0 *dst)
{
    if (n % BN_QK_K != 0 || !check_trits(w, n))
        return BN_EINVAL;
    bn_fp16_t d = bn_f32_to_fp16(scale);
    for (size_t b = 0; b < n / BN_QK_K; b++) {
        const int8_t *src = w + b * BN_QK_K;
        bn_block_tq2_0 *blk = &dst[b];
        /* Element 128h + 32k + m is bits 2k..2k+1 of qs[32h + m]: group 0 at the bottom. */
        for (int h = 0; h < 2; h++)
            for (int m = 0; m < 32; m++) {
                uint8_t v = 0;
                for (int k = 0; k < 4; k++)
                    v |= (uint8_t)(trit_u(src[128 * h + 32 * k + m]) << (2 * k));
                blk->qs[32 * h + m] = v;
            }
        blk->d = d;
    }
    return BN_OK;
}

/* Five (or fewer) trits as one byte: the base-3 number u0 u1 u2 u3 u4 (u0 most
 * significant) scaled from [0, 243) to [0, 256) rounding up, so that the decoder
 * ((uint8_t)(b * 3^k) * 3) >> 8 reads digit k back with a multiply and a shift. */
static uint8_t tq1_byte(const int8_t *w, size_t stride, int count)
{
    unsigned v = 0;
    for (int k = 0; k < 5; k++)
        v = v * 3 + (k < count ? trit_u(w[k * stride]) : 0);
    return (uint8_t)((v * 256 + 242) / 243);
}

int bn_pack_tq1_0(const int8_t *w, size_t n, float scale, bn_block_tq1_0 *dst)
{
    if (n % BN_QK_K != 0 || !check_trits(w, n))
        return BN_EINVAL;
    bn_fp16_t d = bn_f32_to_fp16(scale);
    for (size_t b = 0; b < n / BN_QK_K; b++) {
        const int8_t *src = w + b * BN_QK_K;
        bn_block_tq1_0 *blk = &dst[b];
        /* qs[0..31]: elements 32k + m (k = 0..4); qs[32..47]: 160 + 16k + m;
         * qh[0..3]: 240 + 4k + j for k = 0..3, the fifth digit zero (i.e. times 3). */
        for (int m = 0; m < 32; m++)
            blk->qs[m] = tq1_byte(src + m, 32, 5);
        for (int m = 0; m < 16; m++)
            blk->qs[32 + m] = tq1_byte(src + 160 + m, 16, 5);
        for (int j = 0; j < 4; j++)
            blk->qh[j] = tq1_byte(src + 240 + j, 4, 4);
        blk->d = d;
    }
    return BN_OK;
}

int bn_pack_f16(const float *x, size_t n, bn_fp16_t *dst)
{
    for (size_t i = 0; i < n; i++)
        dst[i] = bn_f32_to_fp16(x[i]);
    return BN_OK;
}

int bn_pack_q8_0(const float *x, size_t n, bn_block_q8_0 *dst)
{
    if (n % BN_QK8_0 != 0)
        return BN_EINVAL;
    for (size_t b = 0; b < n / BN_QK8_0; b++) {
        const float *v = x + b * BN_QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < BN_QK8_0; j++)
            amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        dst[b].d = bn_f32_to_fp16(d);
        for (int j = 0; j < BN_QK8_0; j++)
            dst[b].qs[j] = (int8_t)roundf(v[j] * id);
    }
    return BN_OK;
}

int bn_pack_q4_0(const float *x, size_t n, bn_block_q4_0 *dst)
{
    if (n % BN_QK4_0 != 0)
        return BN_EINVAL;
    for (size_t b = 0; b < n / BN_QK4_0; b++) {
        const float *v = x + b * BN_QK4_0;
        /* The signed extreme maps to -8 exactly, which uses the whole 16-level range
         * on the side where the largest value lies. */
        float amax = 0.0f, m = 0.0f;
        for (int j = 0; j < BN_QK4_0; j++)
            if (fabsf(v[j]) > amax) {
                amax = fabsf(v[j]);
                m = v[j];
            }
        float d = m / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        dst[b].d = bn_f32_to_fp16(d);
        for (int j = 0; j < BN_QK4_0 / 2; j++) {
            int lo = (int)(int8_t)(v[j] * id + 8.5f), hi = (int)(int8_t)(v[j + 16] * id + 8.5f);
            lo = lo > 15 ? 15 : lo;
            hi = hi > 15 ? 15 : hi;
            dst[b].qs[j] = (uint8_t)(lo | (hi << 4));
        }
    }
    return BN_OK;
}

/* Round to nearest (ties to even), clamped to [lo, hi]; NaN gives lo. rintf, not
 * nearbyintf: the compiler inlines it, and the inexact flag is of no interest here. */
static inline int qround(float v, int lo, int hi)
{
    float r = rintf(v);
    if (!(r >= (float)lo))
        return lo;
    return r > (float)hi ? hi : (int)r;
}

/* Best float scale for 16 values with 6-bit signed levels -32..31 (pack.h). */
static float q6_sub_scale(const float *x)
{
    float amax = 0.0f, m = 0.0f;
    for (int i = 0; i < 16; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            m = x[i];
        }
    if (amax < 1e-30f)
        return 0.0f;
    float best = m / -32.0f, best_err = INFINITY;
    for (int k = -4; k <= 4; k++) {
        float is = -(32.0f + 0.5f * (float)k) / m;
        float sxq = 0.0f, sqq = 0.0f;
        int q[16];
        for (int i = 0; i < 16; i++) {
            q[i] = qround(x[i] * is, -32, 31);
            sxq += x[i] * (float)q[i];
            sqq += (float)(q[i] * q[i]);
        }
        if (sqq == 0.0f)
            continue;
        /* Least squares for fixed q: s = <x,q>/<q,q>; error = <x,x> - s<x,q>, and
         * <x,x> is common to all candidates. */
        float s = sxq / sqq, err = -s * sxq;
        if (err < best_err) {
            best_err = err;
            best = s;
        }
    }
    return best;
}

int bn_pack_q6_k(const float *x, size_t n, bn_block_q6_k *dst)
{
    if (n % BN_QK_K != 0)
        return BN_EINVAL;
    for (size_t b = 0; b < n / BN_QK_K; b++) {
        const float *v = x + b * BN_QK_K;
        bn_block_q6_k *blk = &dst[b];
        float sub[16], mmax = 0.0f, m = 0.0f;
        for (int j = 0; j < 16; j++) {
            sub[j] = q6_sub_scale(v + 16 * j);
            if (fabsf(sub[j]) > mmax) {
                mmax = fabsf(sub[j]);
                m = sub[j];
            }
        }
        memset(blk, 0, sizeof *blk);
        if (mmax == 0.0f) {
            /* All zeros: d = 0 (from the memset), and q = 32 (top bits 2 in every
             * field) so that the values are 0 even for a reader that ignores d. */
            memset(blk->qh, 0xaa, sizeof blk->qh);
            continue;
        }
        /* d is stored as fp16, and for typical embeddings (|x| < 0.25) it is an fp16
         * subnormal with only a few significant bits. So round |d| up, never down
         * (every sub-scale then fits in [-128, 128]), and express the sub-scales in
         * the d actually stored. */
        float d = m / -128.0f;
        blk->d = bn_f32_to_fp16(d);
        if (fabsf(bn_fp16_to_f32(blk->d)) < fabsf(d) && (blk->d & 0x7fff) < 0x7bff)
            blk->d++; /* sign-magnitude: the next half away from zero (not past the largest) */
        float d16 = bn_fp16_to_f32(blk->d);
        uint8_t q[BN_QK_K];
        for (int j = 0; j < 16; j++) {
            int sc = qround(sub[j] / d16, -128, 127);
            blk->scales[j] = (int8_t)sc;
            /* Requantize with the scale as stored, so the error is that of the
             * rounded scale, not of the ideal one. */
            float step = d16 * (float)sc;
            float is = step != 0.0f ? 1.0f / step : 0.0f;
            for (int i = 0; i < 16; i++)
                q[16 * j + i] = (uint8_t)(qround(v[16 * j + i] * is, -32, 31) + 32);
        }
        /* Pack: in half h, element 128h + 32k + l (k = 0..3, l = 0..31) keeps its low
         * nibble in ql[64h + l + 32(k&1)] (low nibble for k < 2, high for k >= 2) and
         * its top two bits in qh[32h + l] at bits 2k..2k+1. */
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const uint8_t *e = q + 128 * h + l;
                uint8_t q1 = e[0], q2 = e[32], q3 = e[64], q4 = e[96];
                blk->ql[64 * h + l] = (uint8_t)((q1 & 15) | ((q3 & 15) << 4));
                blk->ql[64 * h + l + 32] = (uint8_t)((q2 & 15) | ((q4 & 15) << 4));
                blk->qh[32 * h + l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
            }
    }
    return BN_OK;
}

int bn_pack_q6_h(const float *x, size_t n, bn_block_q6_h *dst)
{
    if (n % 32 != 0)
        return BN_EINVAL;
    for (size_t b = 0; b < n / 32; b++) {
        const float *v = x + b * 32;
        /* as Q4_0: the signed extreme maps to -32 exactly */
        float amax = 0.0f, m = 0.0f;
        for (int j = 0; j < 32; j++)
            if (fabsf(v[j]) > amax) {
                amax = fabsf(v[j]);
                m = v[j];
            }
        bn_block_q6_h *o = &dst[b];
        o->d = bn_f32_to_fp16(m / -32.0f);
        float d16 = bn_fp16_to_f32(o->d), id = d16 != 0.0f ? 1.0f / d16 : 0.0f;
        uint8_t q[32]; /* the codes first, then the bits: no read-modify-write of o */
        for (int j = 0; j < 32; j++)
            q[j] = (uint8_t)(qround(v[j] * id, -32, 31) + 32);
        for (int j = 0; j < 16; j++)
            o->ql[j] = (uint8_t)((q[j] & 15) | (q[16 + j] & 15) << 4);
        for (int j = 0; j < 8; j++)
            o->qh[j] = (uint8_t)(q[j] >> 4 | (q[8 + j] >> 4) << 2 | (q[16 + j] >> 4) << 4 | (q[24 + j] >> 4) << 6);
    }
    return BN_OK;
}
