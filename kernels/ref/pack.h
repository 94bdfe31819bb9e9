/* pack.h - quantizers from float (or ternary) values to the block layouts of
 * kernels/quants.h: the writing side of the formats the kernels read.
 *
 * What it is: plain scalar reference packers, used by tools (bitnet-mkmodel) and
 * tests to produce valid tensor data. What it is not: a fast path; nothing here
 * runs at inference time, and nothing here does I/O.
 *
 * Ternary packers take trits w in {-1, 0, +1} as int8 (any other value is a
 * caller bug and is rejected) and one scale for the tensor:
 *   I2_S   n/4 packed bytes, then the scale as f32, then 28 zero bytes
 *          (bn_pack_i2_s writes exactly n/4 + 32 bytes; n a multiple of 128).
 *   TQ2_0, TQ1_0: one block per 256 trits; every block's d = fp16(scale)
 *          (the per-tensor scale "folded" into the blocks, as llama.cpp's tools do).
 * Float quantizers work on n values (a row or several rows back to back; blocks
 * never straddle rows because row lengths are multiples of the block):
 *   F16    round to nearest even.
 *   Q8_0   d = amax/127, q = round(x/d) (half away from zero); d stored as fp16.
 *   Q4_0   d = m/-8 with m the signed value of largest magnitude,
 *          q = min(15, (int)(x/d + 8.5)); d stored as fp16.
 *   Q6_K   see bn_pack_q6_k below.
 *
 * All functions return BN_OK, or BN_EINVAL when n is not a multiple of the
 * type's block or a trit is out of range (nothing useful is written then).
 * Thread safety: pure functions of their arguments; safe to call concurrently on
 * disjoint outputs. */
#ifndef BN_PACK_H
#define BN_PACK_H

#include "kernels/kernels.h"
#include "kernels/quants.h"

#include <stddef.h>
#include <stdint.h>

/* Ternary: w[n] in {-1,0,1}, one scale for all of them. */
int bn_pack_i2_s(const int8_t *w, size_t n, float scale, uint8_t *dst);          /* n/4 + 32 bytes */
int bn_pack_tq2_0(const int8_t *w, size_t n, float scale, bn_block_tq2_0 *dst);  /* n/256 blocks */
int bn_pack_tq1_0(const int8_t *w, size_t n, float scale, bn_block_tq1_0 *dst);  /* n/256 blocks */

/* Floats. */
int bn_pack_f16(const float *x, size_t n, bn_fp16_t *dst);                        /* n halves */
int bn_pack_q8_0(const float *x, size_t n, bn_block_q8_0 *dst);                   /* n/32 blocks */
int bn_pack_q4_0(const float *x, size_t n, bn_block_q4_0 *dst);                   /* n/32 blocks */
/* Q6_K, n/256 blocks. Our own scheme, in the spirit of ggml's make_qx_quants but
 * unweighted and simpler:
 * 1. Each 16-value sub-block gets a float scale s: for the candidates
 *    s = m/-(32 + k/2), k = -4..4 (m = the signed value of largest magnitude, so
 *    k = 0 maps m to q = -32 exactly), take q = clamp(round(x/s), -32, 31), refit s by
 *    least squares for those q, and keep the candidate with the smallest squared error.
 * 2. The block's d = M/-128 (M = the sub-scale of largest magnitude), stored as fp16
 *    rounded away from zero so that every sub-scale fits; sc = round(s/d) as int8,
 *    computed against the d actually stored.
 * 3. q is recomputed with the stored step d*sc, so only that step's rounding counts.
 * Error: about half a step (amax/64 of the block's largest sub-block); never more
 * than one step (amax/32) plus the fp16 floor of d for values below ~1e-4. */
int bn_pack_q6_k(const float *x, size_t n, bn_block_q6_k *dst);
/* The LM head's Q6 format (kernels.h), n/32 blocks: d = m/-32 with m the signed
 * value of largest magnitude (stored as fp16), q = clamp(round(x/d), -32, 31). */
int bn_pack_q6_h(const float *x, size_t n, bn_block_q6_h *dst);

#endif
