/* quants.h - byte layouts of the tensor types we read, and half-float conversion.
 *
 * Pure data: no I/O. The structs match ggml's blocks byte for byte (checked by
 * _Static_assert); the ternary layouts are those of ../reference/formats.md:
 *
 *   Q8_0   (34 B / 32 w)   fp16 d; int8 qs[32];                 w = d * qs[j]
 *   Q4_0   (18 B / 32 w)   fp16 d; u8 qs[16];                   w = d * (nib - 8);
 *                          element j < 16 in the low nibble of qs[j], j >= 16 in the
 *                          high nibble of qs[j-16]
 *   Q6_K  (210 B / 256 w)  u8 ql[128]; u8 qh[64]; int8 scales[16]; fp16 d;
 *                          two halves of 128; in half h, for l = 0..31:
 *                            q1 = (ql[64h+l] & 15)      | ((qh[32h+l] >> 0 & 3) << 4)  -> y[128h+l]
 *                            q2 = (ql[64h+l+32] & 15)   | ((qh[32h+l] >> 2 & 3) << 4)  -> y[128h+l+32]
 *                            q3 = (ql[64h+l] >> 4)      | ((qh[32h+l] >> 4 & 3) << 4)  -> y[128h+l+64]
 *                            q4 = (ql[64h+l+32] >> 4)   | ((qh[32h+l] >> 6 & 3) << 4)  -> y[128h+l+96]
 *                          value = d * scales[8h + l/16 + 2k] * (q - 32), k = 0..3 for q1..q4
 *   TQ2_0  (66 B / 256 w)  u8 qs[64]; fp16 d; element 128h+32n+m is bits 2n..2n+1 of
 *                          qs[32h+m]; u = w + 1
 *   TQ1_0  (54 B / 256 w)  u8 qs[48]; u8 qh[4]; fp16 d; 5 trits a byte in qs, 4 in qh,
 *                          trit n of byte b = ((uint8_t)(b * 3^n) * 3) >> 8
 *   I2_S   (32 B / 128 w)  no struct: weight 128b+32g+j in byte 32b+j, bits 6-2g..7-2g;
 *                          one f32 scale for the whole tensor after the n/4 packed bytes
 *                          (tensor data = n/4 + 32 bytes).
 */
#ifndef BN_QUANTS_H
#define BN_QUANTS_H

#include <stdint.h>
#include <string.h>

/* Tensor types (ggml ids) we read. 37-39 are never BitNet types here: upstream
 * ggml reuses them (formats.md). */
enum {
    BN_TYPE_F32 = 0, BN_TYPE_F16 = 1, BN_TYPE_Q4_0 = 2, BN_TYPE_Q8_0 = 8,
    BN_TYPE_Q6_K = 14, BN_TYPE_BF16 = 30, BN_TYPE_TQ1_0 = 34, BN_TYPE_TQ2_0 = 35,
    BN_TYPE_I2_S = 36,
};

typedef uint16_t bn_fp16_t;

typedef struct { bn_fp16_t d; int8_t qs[32]; } bn_block_q8_0;
typedef struct { bn_fp16_t d; uint8_t qs[16]; } bn_block_q4_0;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; bn_fp16_t d; } bn_block_q6_k;
typedef struct { uint8_t qs[64]; bn_fp16_t d; } bn_block_tq2_0;
typedef struct { uint8_t qs[48]; uint8_t qh[4]; bn_fp16_t d; } bn_block_tq1_0;

_Static_assert(sizeof(bn_block_q8_0) == 34, "q8_0 block is 34 bytes");
_Static_assert(sizeof(bn_block_q4_0) == 18, "q4_0 block is 18 bytes");
_Static_assert(sizeof(bn_block_q6_k) == 210, "q6_k block is 210 bytes");
_Static_assert(sizeof(bn_block_tq2_0) == 66, "tq2_0 block is 66 bytes");
_Static_assert(sizeof(bn_block_tq1_0) == 54, "tq1_0 block is 54 bytes");

#define BN_QK8_0 32
#define BN_QK4_0 32
#define BN_QK_K 256
#define BN_QK_I2S 128

/* IEEE half -> float, exact for every value including subnormals, inf, nan. */
static inline float bn_fp16_to_f32(bn_fp16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* float -> IEEE half, round to nearest even, overflow to inf. */
static inline bn_fp16_t bn_f32_to_fp16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan */
        return (bn_fp16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) /* rounds to >= 65536: inf */
        return (bn_fp16_t)(sign | 0x7c00);
    if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u) /* below half the smallest subnormal: rounds to 0 */
            return (bn_fp16_t)sign;
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t h = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1)))
            h++;
        return (bn_fp16_t)(sign | h);
    }
    uint32_t h = ((ax >> 13) - (112u << 10));
    uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
        h++;
    return (bn_fp16_t)(sign | h);
}

static inline float bn_bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif
