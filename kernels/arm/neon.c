/* neon.c - the NEON (Advanced SIMD) kernel table for aarch64.
 *
 * What it is: the kernels of kernels.h with 128-bit vectors, compiled for the
 * aarch64 baseline (armv8-a, no -march flag), so it runs on every aarch64 CPU. One
 * optional extension is used when the CPU reports it at run time: the int8 dot
 * product (SDOT, HWCAP_ASIMDDP: Cortex-A55, A75 and later, Neoverse, Apple), in the
 * functions marked DOTPROD below, which only run after getauxval() says so.
 * What it is not: a faster LM head or float path for newer cores; the head and the
 * float kernels use baseline NEON only.
 * Invariants: BitLinear integer results equal the reference exactly and the float
 * epilogue is the reference's expression, so BitLinear outputs are bit-identical
 * to kernels/ref/. Without SDOT, u*q products (|u*q| <= 2 * 128 = 256) are summed
 * in int16 lanes 8 at a time (|sum| <= 2048, far below 32767) and widened to int32
 * after every 128-weight block, so no int16 sum can wrap whatever the row length.
 * Float kernels agree with the reference to float rounding (sums in other orders,
 * explicit FMAs); the BitLinear epilogue has no a*b+c a compiler could contract. */
#include "kernels/kernels.h"

#include <arm_neon.h>
#include <math.h>
#include <sys/auxv.h>

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20) /* Linux arm64 uapi value, for older headers */
#endif

/* Functions using SDOT. arm_neon.h declares vdotq_s32 for armv8.2-a+dotprod, so a
 * caller must target at least that for the intrinsic to inline. Nothing in these
 * functions uses another armv8.2 feature; they only run when the CPU has SDOT. */
#define DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#define ALWAYS_INLINE inline __attribute__((always_inline))

static int cpu_has_sdot(void)
{
    /* glibc answers AT_HWCAP from a cached copy: cheap enough to ask per call,
     * which keeps this file free of mutable global state */
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
}

/* ---- BitLinear ---- */

/* Same float operations as the reference: |x| max ignoring NaN (vmaxnm is fmaxf),
 * x * s, round half to even (vrndn), clamp with max then min (NaN -> -128 as
 * fmaxf/fminf do), then an exact conversion of an integral float. */
static void quantize_act(const float *x, int n, int8_t *q, float *s, int32_t *qsum)
{
    float32x4_t m0 = vdupq_n_f32(0.0f), m1 = m0, m2 = m0, m3 = m0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        m0 = vmaxnmq_f32(m0, vabsq_f32(vld1q_f32(x + i)));
        m1 = vmaxnmq_f32(m1, vabsq_f32(vld1q_f32(x + i + 4)));
        m2 = vmaxnmq_f32(m2, vabsq_f32(vld1q_f32(x + i + 8)));
        m3 = vmaxnmq_f32(m3, vabsq_f32(vld1q_f32(x + i + 12)));
    }
    float amax = vmaxnmvq_f32(vmaxnmq_f32(vmaxnmq_f32(m0, m1), vmaxnmq_f32(m2, m3)));
    for (; i < n; i++)
        amax = fmaxf(amax, fabsf(x[i]));
    const float sc = 127.0f / fmaxf(amax, 1e-5f);
    const float32x4_t vs = vdupq_n_f32(sc), lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
    int32x4_t vsum = vdupq_n_s32(0);
    for (i = 0; i + 16 <= n; i += 16) {
        int32x4_t v[4];
        for (int k = 0; k < 4; k++) {
            float32x4_t r = vrndnq_f32(vmulq_f32(vld1q_f32(x + i + 4 * k), vs));
            v[k] = vcvtq_s32_f32(vminnmq_f32(vmaxnmq_f32(r, lo), hi));
        }
        vsum = vaddq_s32(vsum, vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])));
        /* values are within [-128, 127]: the truncating narrows are exact */
        int16x8_t h0 = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
        int16x8_t h1 = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
        vst1q_s8(q + i, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
    }
    int32_t sum = vaddvq_s32(vsum);
    for (; i < n; i++) {
        float v = fminf(fmaxf(nearbyintf(x[i] * sc), -128.0f), 127.0f);
        q[i] = (int8_t)v;
        sum += q[i];
    }
    *s = sc;
    *qsum = sum;
}

/* The eight u-vectors (u = w + 1 in {0,1,2}) of one 128-weight block, 32 bytes at
 * p, in two scale classes (issue 14's idea from the AVX2 kernel). Group g sits in
 * bits 6-2g..7-2g of every byte (kernels.h) and meets activations q[32g..32g+31],
 * its first 16 weights in the low 16 bytes. Class 1, u exactly: group 0 is x >> 6
 * (no mask), group 3 x & 3. Class 4, 4u: group 2 is x & 12, group 1 (x >> 2) & 12.
 * 10 vector ops against 12 with every field moved to bits 0-1; the two classes'
 * sums are kept apart and joined exactly at the end (class_dot). u[j] meets the
 * 16 activations at q + UQ[j]. */
static const int UQ[8] = { 0, 16, 96, 112, 32, 48, 64, 80 };

static ALWAYS_INLINE void unpack_block(const uint8_t *p, int8x16_t u[8])
{
    const uint8x16_t m3 = vdupq_n_u8(3), m12 = vdupq_n_u8(12);
    const uint8x16_t lo = vld1q_u8(p), hi = vld1q_u8(p + 16);
    u[0] = vreinterpretq_s8_u8(vshrq_n_u8(lo, 6)); /* class 1 */
    u[1] = vreinterpretq_s8_u8(vshrq_n_u8(hi, 6));
    u[2] = vreinterpretq_s8_u8(vandq_u8(lo, m3));
    u[3] = vreinterpretq_s8_u8(vandq_u8(hi, m3));
    u[4] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(lo, 2), m12)); /* class 4 */
    u[5] = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(hi, 2), m12));
    u[6] = vreinterpretq_s8_u8(vandq_u8(lo, m12));
    u[7] = vreinterpretq_s8_u8(vandq_u8(hi, m12));
}

/* sum(u*q) from a row's (or token's) class-1 and class-4 accumulators: the
 * class-4 sum is a sum of multiples of 4, so the division is exact */
static ALWAYS_INLINE int32_t class_dot(int32x4_t acc1, int32x4_t acc4)
{
    return vaddvq_s32(acc1) + vaddvq_s32(acc4) / 4;
}

/* One block (u against q[0..127]) added to the class-1 and class-4 int32
 * accumulators, baseline NEON: widening multiply-adds into int16 lanes, each lane
 * summing 8 products of |u*q| <= 256 (class 4: 1024; |sum| <= 8192), then
 * pairwise-widened into int32. The two classes are two chains, so consecutive
 * multiply-adds do not wait on each other. */
static ALWAYS_INLINE void block_dot_mla(const int8x16_t u[8], const int8_t *q, int32x4_t *acc1, int32x4_t *acc4)
{
    int16x8_t s1 = vdupq_n_s16(0), s4 = vdupq_n_s16(0);
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        const int8x16_t qa = vld1q_s8(q + UQ[k]), qb = vld1q_s8(q + UQ[4 + k]);
        s1 = vmlal_s8(s1, vget_low_s8(u[k]), vget_low_s8(qa));
        s1 = vmlal_high_s8(s1, u[k], qa);
        s4 = vmlal_s8(s4, vget_low_s8(u[4 + k]), vget_low_s8(qb));
        s4 = vmlal_high_s8(s4, u[4 + k], qb);
    }
    *acc1 = vpadalq_s16(*acc1, s1);
    *acc4 = vpadalq_s16(*acc4, s4);
}

/* The same with SDOT: four u8*s8 products summed straight into each int32 lane. */
static DOTPROD ALWAYS_INLINE void block_dot_sdot(const int8x16_t u[8], const int8_t *q, int32x4_t *acc1,
                                                 int32x4_t *acc4)
{
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        *acc1 = vdotq_s32(*acc1, u[k], vld1q_s8(q + UQ[k]));
        *acc4 = vdotq_s32(*acc4, u[4 + k], vld1q_s8(q + UQ[4 + k]));
    }
}

/* Each row's blocks are unpacked once and used for a tile of up to TILE_T tokens;
 * with 2 accumulators a token, a full tile keeps 8 u-vectors and 8 accumulators
 * in registers (of 32). */
#define TILE_T 4

/* dot[t] = sum(u*q) of one row (nb blocks) against tokens q + t*ldq, t < tn.
 * tn is a compile-time constant at each call, so the token loops unroll and the
 * accumulators stay in registers. */
static ALWAYS_INLINE void row_dots_mla_n(const uint8_t *row, int nb, const int8_t *q, size_t ldq, int tn,
                                         int32_t *dot)
{
    int32x4_t acc[TILE_T][2];
#pragma GCC unroll 4
    for (int t = 0; t < tn; t++)
        acc[t][0] = acc[t][1] = vdupq_n_s32(0);
    for (int b = 0; b < nb; b++) {
        int8x16_t u[8];
        unpack_block(row + BN_TBLOCK_STRIDE * b, u);
#pragma GCC unroll 4
        for (int t = 0; t < tn; t++)
            block_dot_mla(u, q + (size_t)t * ldq + 128 * b, &acc[t][0], &acc[t][1]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < tn; t++)
        dot[t] = class_dot(acc[t][0], acc[t][1]);
}

static DOTPROD ALWAYS_INLINE void row_dots_sdot_n(const uint8_t *row, int nb, const int8_t *q, size_t ldq,
                                                  int tn, int32_t *dot)
{
    int32x4_t acc[TILE_T][2];
#pragma GCC unroll 4
    for (int t = 0; t < tn; t++)
        acc[t][0] = acc[t][1] = vdupq_n_s32(0);
    for (int b = 0; b < nb; b++) {
        int8x16_t u[8];
        unpack_block(row + BN_TBLOCK_STRIDE * b, u);
#pragma GCC unroll 4
        for (int t = 0; t < tn; t++)
            block_dot_sdot(u, q + (size_t)t * ldq + 128 * b, &acc[t][0], &acc[t][1]);
    }
#pragma GCC unroll 4
    for (int t = 0; t < tn; t++)
        dot[t] = class_dot(acc[t][0], acc[t][1]);
}

/* A full tile at once; a partial one (the batch's tail, or decode's single
 * token) one token at a time, the row then coming from L1. */
typedef void row_dots_fn(const uint8_t *row, int nb, const int8_t *q, size_t ldq, int tn, int32_t *dot);

static void row_dots_mla(const uint8_t *row, int nb, const int8_t *q, size_t ldq, int tn, int32_t *dot)
{
    if (tn == TILE_T)
        row_dots_mla_n(row, nb, q, ldq, TILE_T, dot);
    else
        for (int t = 0; t < tn; t++)
            row_dots_mla_n(row, nb, q + (size_t)t * ldq, ldq, 1, dot + t);
}

static DOTPROD void row_dots_sdot(const uint8_t *row, int nb, const int8_t *q, size_t ldq, int tn, int32_t *dot)
{
    if (tn == TILE_T)
        row_dots_sdot_n(row, nb, q, ldq, TILE_T, dot);
    else
        for (int t = 0; t < tn; t++)
            row_dots_sdot_n(row, nb, q + (size_t)t * ldq, ldq, 1, dot + t);
}

/* Decode: dot[i] = sum(u*q) of the eight rows of a row group (kernels.h) against
 * one token, block by block, so the group is read in memory order; 16
 * accumulators and one unpacked block stay in registers (of 32). */
#define GROUP_DOTS(name, attr, block_dot)                                           \
    static attr void name(const uint8_t *g, int nb, const int8_t *q, int32_t *dot)  \
    {                                                                               \
        int32x4_t acc[BN_TGROUP][2];                                                \
        _Pragma("GCC unroll 8") for (int i = 0; i < BN_TGROUP; i++)                 \
            acc[i][0] = acc[i][1] = vdupq_n_s32(0);                                 \
        for (int b = 0; b < nb; b++)                                                \
            _Pragma("GCC unroll 8") for (int i = 0; i < BN_TGROUP; i++) {           \
                int8x16_t u[8];                                                     \
                unpack_block(g + BN_TBLOCK_STRIDE * b + 32 * i, u);                 \
                block_dot(u, q + 128 * b, &acc[i][0], &acc[i][1]);                  \
            }                                                                       \
        _Pragma("GCC unroll 8") for (int i = 0; i < BN_TGROUP; i++)                 \
            dot[i] = class_dot(acc[i][0], acc[i][1]);                                  \
    }
GROUP_DOTS(group_dots_mla, , block_dot_mla)
GROUP_DOTS(group_dots_sdot, DOTPROD, block_dot_sdot)
#undef GROUP_DOTS

/* one row, or one group (the first n rows stored), with the reference's epilogue */
static void gemv_row(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r)
{
    int32_t dot;
    (cpu_has_sdot() ? row_dots_sdot : row_dots_mla)(bn_tmat_row(w, r), (int)w->n_in / 128, q, w->n_in, 1, &dot);
    y[r] = (float)(dot - qsum) * w->scale / s;
}

static void gemv_group(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r, int n)
{
    int32_t dot[BN_TGROUP];
    (cpu_has_sdot() ? group_dots_sdot : group_dots_mla)(bn_tmat_row(w, r), (int)w->n_in / 128, q, dot);
    for (int i = 0; i < n; i++)
        y[r + i] = (float)(dot[i] - qsum) * w->scale / s;
}

static void tgemm(const bn_tmat_t *w, const int8_t *q, const float *s, const int32_t *qsum, int nt,
                  float *y, size_t ldy, int r0, int r1)
{
    if (w->bscale) { /* per-block factors: the reference's job (kernels.h) */
        bn_ref_tgemm(w, q, s, qsum, nt, y, ldy, r0, r1);
        return;
    }
    if (nt == 1) {
        bn_gemv_by_groups(gemv_row, gemv_group, w, q, s[0], qsum[0], y, r0, r1);
        return;
    }
    row_dots_fn *row_dots = cpu_has_sdot() ? row_dots_sdot : row_dots_mla;
    const int n = (int)w->n_in, nb = n / 128;
    for (int t0 = 0; t0 < nt; t0 += TILE_T) {
        const int tn = nt - t0 < TILE_T ? nt - t0 : TILE_T;
        for (int r = r0; r < r1; r++) {
            int32_t dot[TILE_T];
            row_dots(bn_tmat_row(w, r), nb, q + (size_t)t0 * n, (size_t)n, tn, dot);
            for (int t = 0; t < tn; t++) /* the reference's epilogue, operation for operation */
                y[(size_t)(t0 + t) * ldy + r] = (float)(dot[t] - qsum[t0 + t]) * w->scale / s[t0 + t];
        }
    }
}

/* ---- LM head ---- */

static void head_quantize(const float *x, int n, int8_t *q, float *d)
{
    for (int b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        float32x4_t v[8];
        for (int k = 0; k < 8; k++)
            v[k] = vld1q_f32(xb + 4 * k);
        float32x4_t m = vabsq_f32(v[0]);
        for (int k = 1; k < 8; k++)
            m = vmaxnmq_f32(m, vabsq_f32(v[k]));
        const float amax = vmaxnmvq_f32(m);
        d[b] = amax / 127.0f;
        const float32x4_t id = vdupq_n_f32(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* vcvtn: round half to even, as nearbyintf; |x * id| rounds to <= 127 */
        int16x8_t h[4];
        for (int k = 0; k < 4; k++)
            h[k] = vcombine_s16(vmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[2 * k], id))),
                                vmovn_s32(vcvtnq_s32_f32(vmulq_f32(v[2 * k + 1], id))));
        vst1q_s8(q + 32 * b, vcombine_s8(vmovn_s16(h[0]), vmovn_s16(h[1])));
        vst1q_s8(q + 32 * b + 16, vcombine_s8(vmovn_s16(h[2]), vmovn_s16(h[3])));
    }
}

/* fp16 -> f32 in hardware (FCVTL is baseline on aarch64; exact for every half) */
static inline float h2f(bn_fp16_t h)
{
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0);
}

/* sum of w[i] * q[i] over one block of 32 (w0: 0..15, w1: 16..31), each int16
 * lane holding a single product (|w*q| <= 128 * 128 = 16384) before the pairwise
 * widening, so any s8 weights are safe. */
static inline int32_t dot32(int8x16_t w0, int8x16_t w1, const int8_t *q)
{
    const int8x16_t q0 = vld1q_s8(q), q1 = vld1q_s8(q + 16);
    int32x4_t acc = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(q0)));
    acc = vpadalq_s16(acc, vmull_high_s8(w0, q0));
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w1), vget_low_s8(q1)));
    acc = vpadalq_s16(acc, vmull_high_s8(w1, q1));
    return vaddvq_s32(acc);
}

/* A row's running sums: four vectors for F16; for quantized rows the block's exact
 * int32 dot, then the reference's float expression in the reference's order, so
 * these logits equal its own. */
typedef struct {
    float32x4_t v[4];
    float s;
} head_acc_t;

/* blocks b0 .. b0+cnt-1 of a row (the unit at p, kernels.h) into *acc */
static void head_unit(const bn_hmat_t *h, const uint8_t *p, int b0, int cnt, const bn_hact_t *a, head_acc_t *acc)
{
    if (h->type == BN_HEAD_F16) {
        const bn_fp16_t *e = (const bn_fp16_t *)(const void *)p;
        const float *x = a->x + 32 * b0;
        for (int i = 0; i < 32 * cnt; i += 16) {
            const float16x8_t h0 = vreinterpretq_f16_u16(vld1q_u16(e + i));
            const float16x8_t h1 = vreinterpretq_f16_u16(vld1q_u16(e + i + 8));
            acc->v[0] = vfmaq_f32(acc->v[0], vcvt_f32_f16(vget_low_f16(h0)), vld1q_f32(x + i));
            acc->v[1] = vfmaq_f32(acc->v[1], vcvt_high_f32_f16(h0), vld1q_f32(x + i + 4));
            acc->v[2] = vfmaq_f32(acc->v[2], vcvt_f32_f16(vget_low_f16(h1)), vld1q_f32(x + i + 8));
            acc->v[3] = vfmaq_f32(acc->v[3], vcvt_high_f32_f16(h1), vld1q_f32(x + i + 12));
        }
        return;
    }
    const uint8x16_t m15 = vdupq_n_u8(15), m3 = vdupq_n_u8(3);
    for (int b = b0; b < b0 + cnt; b++) {
        const int k = b - b0; /* block k of the unit's cnt (kernels.h) */
        int8x16_t w0, w1;
        bn_fp16_t d;
        if (h->type == BN_HEAD_Q8) {
            const bn_block_q8_0 *blk = (const bn_block_q8_0 *)(const void *)(p + (size_t)k * sizeof(bn_block_q8_0));
            w0 = vld1q_s8(blk->qs);
            w1 = vld1q_s8(blk->qs + 16);
            d = blk->d;
        } else if (h->type == BN_HEAD_Q4) { /* low nibbles 0..15, high 16..31, minus 8 */
            const uint8x16_t v = vld1q_u8(bn_hunit_qs(p, k));
            w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, m15)), vdupq_n_s8(8));
            w1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vdupq_n_s8(8));
            d = bn_hunit_d(p, h->type, cnt, k);
        } else { /* BN_HEAD_Q6: lo nibble from ql[j % 16], 2 high bits from qh[j % 8] */
            const uint8x16_t l = vld1q_u8(bn_hunit_qs(p, k));
            const uint8x8_t qh = vld1_u8(bn_hunit_qh(p, cnt, k));
            /* element j takes bits 2(j/8)..2(j/8)+1 of qh[j % 8] */
            const uint8x16_t h0 = vandq_u8(vcombine_u8(qh, vshr_n_u8(qh, 2)), m3);
            const uint8x16_t h1 = vcombine_u8(vand_u8(vshr_n_u8(qh, 4), vget_low_u8(m3)), vshr_n_u8(qh, 6));
            w0 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l, m15), vshlq_n_u8(h0, 4))), vdupq_n_s8(32));
            w1 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(l, 4), vshlq_n_u8(h1, 4))), vdupq_n_s8(32));
            d = bn_hunit_d(p, h->type, cnt, k);
        }
        acc->s += h2f(d) * a->d[b] * (float)dot32(w0, w1, a->q + 32 * b);
    }
}

/* a row group's rows side by side, unit by unit: the group is read in memory
 * order (kernels.h) */
static void head_gemv(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1)
{
    const int nb = (int)h->n_in / 32, ub = bn_head_unit_blocks(h->type, h->n_in);
    const size_t bb = bn_head_block_bytes(h->type);
    for (int g = r0 - r0 % BN_HGROUP; g < r1; g += BN_HGROUP) {
        const int lo = g > r0 ? g : r0, hi = g + BN_HGROUP < r1 ? g + BN_HGROUP : r1;
        head_acc_t acc[BN_HGROUP];
        for (int r = lo; r < hi; r++) {
            for (int k = 0; k < 4; k++)
                acc[r - g].v[k] = vdupq_n_f32(0.0f);
            acc[r - g].s = 0.0f;
        }
        const uint8_t *p[BN_HGROUP];
        for (int r = lo; r < hi; r++)
            p[r - g] = bn_hmat_unit(h, r, 0);
        int u = 0;
        for (; (u + 1) * ub <= nb; u++) /* whole units lie BN_HGROUP units apart */
            for (int r = lo; r < hi; r++) {
                head_unit(h, p[r - g], u * ub, ub, a, &acc[r - g]);
                p[r - g] += BN_HGROUP * ub * bb;
            }
        if (u * ub < nb) /* the row's short last unit */
            for (int r = lo; r < hi; r++)
                head_unit(h, bn_hmat_unit(h, r, u), u * ub, nb - u * ub, a, &acc[r - g]);
        for (int r = lo; r < hi; r++) {
            const float32x4_t *v = acc[r - g].v;
            logits[r] = h->type == BN_HEAD_F16 ? vaddvq_f32(vaddq_f32(vaddq_f32(v[0], v[1]), vaddq_f32(v[2], v[3])))
                                               : acc[r - g].s;
        }
    }
}

/* ---- float ops ---- */

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out)
{
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const float32x4_t v0 = vld1q_f32(x + i), v1 = vld1q_f32(x + i + 4);
        a0 = vfmaq_f32(a0, v0, v0);
        a1 = vfmaq_f32(a1, v1, v1);
    }
    float ss = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++)
        ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    const float32x4_t vr = vdupq_n_f32(r);
    for (i = 0; i + 4 <= n; i += 4)
        vst1q_f32(out + i, vmulq_f32(vmulq_f32(vld1q_f32(x + i), vr), vld1q_f32(w + i)));
    for (; i < n; i++)
        out[i] = x[i] * r * w[i];
}

/* The reference's products and sums, operation for operation (no FMA). */
static void rope_neox(float *x, int n_heads, int head_dim, int rope_dim, const float *cs)
{
    const int half = rope_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        int i = 0;
        for (; i + 4 <= half; i += 4) {
            const float32x4_t a = vld1q_f32(v + i), b = vld1q_f32(v + i + half);
            const float32x4_t c = vld1q_f32(cs + i), s = vld1q_f32(cs + half + i);
            vst1q_f32(v + i, vsubq_f32(vmulq_f32(a, c), vmulq_f32(b, s)));
            vst1q_f32(v + i + half, vaddq_f32(vmulq_f32(a, s), vmulq_f32(b, c)));
        }
        for (; i < half; i++) {
            const float c = cs[i], s = cs[half + i], a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = a * s + b * c;
        }
    }
}

/* Online softmax as in the reference, summing straight into out (a head of 128
 * floats is 32 vectors: too many to keep in registers beside q, and L1 is near). */
static void attention(const float *q, const float *k, const float *v, size_t stride, int n_pos, int head_dim,
                      float *out)
{
    const float scale = 1.0f / sqrtf((float)head_dim);
    const int hv = head_dim & ~3; /* the vector part; the rest element by element */
    float m = -INFINITY, l = 0.0f;
    for (int i = 0; i < head_dim; i++)
        out[i] = 0.0f;
    for (int t = 0; t < n_pos; t++) {
        const float *kt = k + (size_t)t * stride, *vt = v + (size_t)t * stride;
        float32x4_t d0 = vdupq_n_f32(0.0f), d1 = d0;
        int i = 0;
        for (; i + 8 <= hv; i += 8) {
            d0 = vfmaq_f32(d0, vld1q_f32(q + i), vld1q_f32(kt + i));
            d1 = vfmaq_f32(d1, vld1q_f32(q + i + 4), vld1q_f32(kt + i + 4));
        }
        for (; i < hv; i += 4)
            d0 = vfmaq_f32(d0, vld1q_f32(q + i), vld1q_f32(kt + i));
        float d = vaddvq_f32(vaddq_f32(d0, d1));
        for (; i < head_dim; i++)
            d += q[i] * kt[i];
        d *= scale;
        if (d > m) { /* a new maximum: rescale what was summed so far */
            const float alpha = expf(m - d);
            const float32x4_t va = vdupq_n_f32(alpha);
            for (i = 0; i < hv; i += 4)
                vst1q_f32(out + i, vmulq_f32(vld1q_f32(out + i), va));
            for (; i < head_dim; i++)
                out[i] *= alpha;
            l *= alpha;
            m = d;
        }
        const float p = expf(d - m);
        l += p;
        const float32x4_t vp = vdupq_n_f32(p);
        for (i = 0; i < hv; i += 4)
            vst1q_f32(out + i, vfmaq_f32(vld1q_f32(out + i), vp, vld1q_f32(vt + i)));
        for (; i < head_dim; i++)
            out[i] += p * vt[i];
    }
    const float inv = 1.0f / l;
    const float32x4_t vi = vdupq_n_f32(inv);
    int i = 0;
    for (; i < hv; i += 4)
        vst1q_f32(out + i, vmulq_f32(vld1q_f32(out + i), vi));
    for (; i < head_dim; i++)
        out[i] *= inv;
}

/* attention_heads_f16 keeps each head's state on the stack: wider heads go to
 * the reference, larger groups in parts */
#define ATT_MAX_DIM 256
#define ATT_MAX_HEADS 16

/* 4 halves widened to floats, exactly (FCVTL, baseline armv8-a) */
static inline float32x4_t load4_f16(const bn_fp16_t *p)
{
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

/* q . k over nv vectors of 4; two chains halve the FMA latency of a lone head */
static inline float dot_f16(const float *q, const bn_fp16_t *k, int nv)
{
    float32x4_t d0 = vdupq_n_f32(0.0f), d1 = d0;
    int i = 0;
    for (; i + 2 <= nv; i += 2) {
        d0 = vfmaq_f32(d0, vld1q_f32(q + 4 * i), load4_f16(k + 4 * i));
        d1 = vfmaq_f32(d1, vld1q_f32(q + 4 * i + 4), load4_f16(k + 4 * i + 4));
    }
    if (i < nv)
        d0 = vfmaq_f32(d0, vld1q_f32(q + 4 * i), load4_f16(k + 4 * i));
    return vaddvq_f32(vaddq_f32(d0, d1));
}

/* One position for one head: the online-softmax update of `attention` on the
 * head's running max *m, sum *l and accumulators acc (head_dim) */
static inline void head_step_f16(const float *q, const bn_fp16_t *kt, const bn_fp16_t *vt, int nv, float scale,
                                 float *acc, float *m, float *l)
{
    const float sc = dot_f16(q, kt, nv) * scale;
    float mh = *m, lh = *l;
    if (sc > mh) { /* a new maximum: rescale what was summed so far */
        const float alpha = expf(mh - sc);
        const float32x4_t va = vdupq_n_f32(alpha);
        for (int i = 0; i < nv; i++)
            vst1q_f32(acc + 4 * i, vmulq_f32(vld1q_f32(acc + 4 * i), va));
        lh *= alpha;
        mh = sc;
    }
    const float p = expf(sc - mh);
    const float32x4_t vp = vdupq_n_f32(p);
    for (int i = 0; i < nv; i++)
        vst1q_f32(acc + 4 * i, vfmaq_f32(vld1q_f32(acc + 4 * i), vp, load4_f16(vt + 4 * i)));
    *m = mh;
    *l = lh + p;
}


/* A row of a block-quantized cache (bits 8: Q8_0, 4: Q4_0; kernels.h has the
 * layout) widened exactly into out (head_dim floats) */
static inline void widen_q(const uint8_t *row, int head_dim, int bits, float *out)
{
    const size_t bb = bits == 8 ? sizeof(bn_block_q8_0) : sizeof(bn_block_q4_0);
    for (int b = 0; b < head_dim / BN_KVQ_BLOCK; b++, row += bb, out += BN_KVQ_BLOCK) {
        bn_fp16_t dh;
        memcpy(&dh, row, sizeof dh);
        const float d = vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(dh))), 0);
        int8x16_t lo, hi;
        if (bits == 8) {
            lo = vld1q_s8((const int8_t *)row + 2);
            hi = vld1q_s8((const int8_t *)row + 18);
        } else {
            const uint8x16_t n = vld1q_u8(row + 2), eight = vdupq_n_u8(8);
            lo = vreinterpretq_s8_u8(vsubq_u8(vandq_u8(n, vdupq_n_u8(15)), eight));
            hi = vreinterpretq_s8_u8(vsubq_u8(vshrq_n_u8(n, 4), eight));
        }
        const int8x16_t h[2] = { lo, hi };
        for (int j = 0; j < 2; j++) {
            const int16x8_t a = vmovl_s8(vget_low_s8(h[j])), c = vmovl_s8(vget_high_s8(h[j]));
            vst1q_f32(out + 16 * j, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(a))), d));
            vst1q_f32(out + 16 * j + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(a))), d));
            vst1q_f32(out + 16 * j + 8, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(c))), d));
            vst1q_f32(out + 16 * j + 12, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(c))), d));
        }
    }
}

/* One position for one head on widened rows: head_step_f16's update */
static inline void head_step_f32(const float *q, const float *kt, const float *vt, int nv, float scale, float *acc,
                                 float *m, float *l)
{
    float32x4_t d0 = vdupq_n_f32(0.0f), d1 = d0;
    int i = 0;
    for (; i + 2 <= nv; i += 2) {
        d0 = vfmaq_f32(d0, vld1q_f32(q + 4 * i), vld1q_f32(kt + 4 * i));
        d1 = vfmaq_f32(d1, vld1q_f32(q + 4 * i + 4), vld1q_f32(kt + 4 * i + 4));
    }
    if (i < nv)
        d0 = vfmaq_f32(d0, vld1q_f32(q + 4 * i), vld1q_f32(kt + 4 * i));
    const float sc = vaddvq_f32(vaddq_f32(d0, d1)) * scale;
    float mh = *m, lh = *l;
    if (sc > mh) { /* a new maximum: rescale what was summed so far */
        const float alpha = expf(mh - sc);
        const float32x4_t va = vdupq_n_f32(alpha);
        for (i = 0; i < nv; i++)
            vst1q_f32(acc + 4 * i, vmulq_f32(vld1q_f32(acc + 4 * i), va));
        lh *= alpha;
        mh = sc;
    }
    const float p = expf(sc - mh);
    const float32x4_t vp = vdupq_n_f32(p);
    for (i = 0; i < nv; i++)
        vst1q_f32(acc + 4 * i, vfmaq_f32(vld1q_f32(acc + 4 * i), vp, vld1q_f32(vt + 4 * i)));
    *m = mh;
    *l = lh + p;
}

/* Up to ATT_MAX_HEADS heads: positions outer, heads inner, so each position's
 * key and value rows come from memory once and from L1 for the other heads. A
 * head's state (running max, sum, accumulators) waits on the stack between
 * positions. ty: 1 for an fp16 cache (stride in halves, read as it is), 8 or 4
 * for a block-quantized one (stride in bytes, each row widened once, exactly). */
static void heads_kv(const float *q, int nq, size_t q_stride, const void *k, const void *v, size_t stride, int ty,
                     int n_pos, int head_dim, float *out, size_t out_stride, float *ml)
{
    const int nv = head_dim / 4;
    const float scale = 1.0f / sqrtf((float)head_dim);
    float acc[ATT_MAX_HEADS][ATT_MAX_DIM], kt[ATT_MAX_DIM], vt[ATT_MAX_DIM]; /* (nq, head_dim) */
    float m[ATT_MAX_HEADS], l[ATT_MAX_HEADS];
    for (int h = 0; h < nq; h++) {
        for (int i = 0; i < nv; i++)
            vst1q_f32(acc[h] + 4 * i, vdupq_n_f32(0.0f));
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    for (int t = 0; t < n_pos; t++) {
        if (ty == 1) {
            const bn_fp16_t *k16 = (const bn_fp16_t *)k + (size_t)t * stride, *v16 = (const bn_fp16_t *)v + (size_t)t * stride;
            for (int h = 0; h < nq; h++)
                head_step_f16(q + (size_t)h * q_stride, k16, v16, nv, scale, acc[h], &m[h], &l[h]);
            continue;
        }
        widen_q((const uint8_t *)k + (size_t)t * stride, head_dim, ty, kt);
        widen_q((const uint8_t *)v + (size_t)t * stride, head_dim, ty, vt);
        for (int h = 0; h < nq; h++)
            head_step_f32(q + (size_t)h * q_stride, kt, vt, nv, scale, acc[h], &m[h], &l[h]);
    }
    for (int h = 0; h < nq; h++) {
        if (ml) {
            ml[2 * h] = m[h];
            ml[2 * h + 1] = l[h];
        }
        const float32x4_t inv = vdupq_n_f32(1.0f / l[h]);
        float *o = out + (size_t)h * out_stride;
        for (int i = 0; i < nv; i++)
            vst1q_f32(o + 4 * i, vmulq_f32(vld1q_f32(acc[h] + 4 * i), inv));
    }
}

static void attention_heads_q(const float *q, int nq, size_t q_stride, const uint8_t *k, const uint8_t *v,
                              size_t row_stride, int bits, int n_pos, int head_dim, float *out, size_t out_stride,
                              float *ml)
{
    if (head_dim % BN_KVQ_BLOCK || head_dim > ATT_MAX_DIM) {
        bn_ref_attention_heads_q(q, nq, q_stride, k, v, row_stride, bits, n_pos, head_dim, out, out_stride, ml);
        return;
    }
    for (int h = 0; h < nq; h += ATT_MAX_HEADS)
        heads_kv(q + (size_t)h * q_stride, nq - h < ATT_MAX_HEADS ? nq - h : ATT_MAX_HEADS, q_stride, k, v, row_stride,
                 bits, n_pos, head_dim, out + (size_t)h * out_stride, out_stride, ml ? ml + 2 * h : NULL);
}

/* The heads of a GQA group with an fp16 cache. A head's arithmetic never looks at
 * nq or at the other heads (groups larger than the stack holds go in parts, not
 * to the reference): each head's result is bit-identical to a call with that
 * head alone. */
static void attention_heads_f16(const float *q, int nq, size_t q_stride, const bn_fp16_t *k, const bn_fp16_t *v,
                                size_t stride, int n_pos, int head_dim, float *out, size_t out_stride, float *ml)
{
    if (head_dim % 4 || head_dim > ATT_MAX_DIM) {
        bn_ref_attention_heads_f16(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, ml);
        return;
    }
    for (int h = 0; h < nq; h += ATT_MAX_HEADS)
        heads_kv(q + (size_t)h * q_stride, nq - h < ATT_MAX_HEADS ? nq - h : ATT_MAX_HEADS, q_stride, k, v, stride, 1,
                 n_pos, head_dim, out + (size_t)h * out_stride, out_stride, ml ? ml + 2 * h : NULL);
}

static void ffn_act(const float *g, const float *u, int n, int relu2, float *out)
{
    if (!relu2) { /* silu needs exp: the reference's per-element expf */
        bn_ref_ffn_act(g, u, n, relu2, out);
        return;
    }
    /* vmaxnm(g, 0) is 0 for NaN, as the reference's g > 0 ? g : 0 */
    const float32x4_t zero = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t r = vmaxnmq_f32(vld1q_f32(g + i), zero);
        vst1q_f32(out + i, vmulq_f32(vmulq_f32(r, r), vld1q_f32(u + i)));
    }
    for (; i < n; i++) {
        const float r = g[i] > 0.0f ? g[i] : 0.0f;
        out[i] = r * r * u[i];
    }
}

static void quantize_scaled(const float *x, const float *g, float r, float s, int n, int8_t *q, int32_t *qsum)
{
    const float32x4_t vr = vdupq_n_f32(r), vs = vdupq_n_f32(s);
    const float32x4_t lo = vdupq_n_f32(-128.0f), hi = vdupq_n_f32(127.0f);
    int32x4_t vsum = vdupq_n_s32(0);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        int32x4_t v[4];
        for (int k = 0; k < 4; k++) {
            const int j = i + 4 * k;
            const float32x4_t y = vmulq_f32(vmulq_f32(vmulq_f32(vld1q_f32(x + j), vr), vld1q_f32(g + j)), vs);
            /* maxnm gives lo for a NaN, as the reference's fmaxf */
            v[k] = vcvtq_s32_f32(vminnmq_f32(vmaxnmq_f32(vrndnq_f32(y), lo), hi));
        }
        vsum = vaddq_s32(vsum, vaddq_s32(vaddq_s32(v[0], v[1]), vaddq_s32(v[2], v[3])));
        /* values are within [-128, 127]: the truncating narrows are exact */
        int16x8_t h0 = vcombine_s16(vmovn_s32(v[0]), vmovn_s32(v[1]));
        int16x8_t h1 = vcombine_s16(vmovn_s32(v[2]), vmovn_s32(v[3]));
        vst1q_s8(q + i, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
    }
    int32_t tail;
    bn_ref_quantize_scaled(x + i, g + i, r, s, n - i, q + i, &tail);
    *qsum = vaddvq_s32(vsum) + tail;
}

static void to_f16(const float *x, int n, bn_fp16_t *out)
{
    const uint16x4_t sign = vdup_n_u16(0x8000), qnan = vdup_n_u16(0x7e00);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        /* FCVTN rounds to nearest even (the default FPCR) and keeps a NaN's
         * payload, which bn_f32_to_fp16 drops */
        const uint16x4_t h = vreinterpret_u16_f16(vcvt_f16_f32(v));
        const uint16x4_t num = vmovn_u32(vceqq_f32(v, v));
        vst1_u16(out + i, vbsl_u16(num, h, vorr_u16(vand_u16(h, sign), qnan)));
    }
    bn_ref_to_f16(x + i, n - i, out + i);
}

const bn_kernels_t bn_kernels_neon = {
    .name = "neon",
    .quantize_act = quantize_act,
    .tgemm = tgemm,
    .head_quantize = head_quantize,
    .head_gemv = head_gemv,
    .rmsnorm = rmsnorm,
    .rope_neox = rope_neox,
    .attention = attention,
    .attention_heads_f16 = attention_heads_f16,
    .attention_heads_q = attention_heads_q,
    .ffn_act = ffn_act,
    .quantize_scaled = quantize_scaled,
    .to_f16 = to_f16,
};
