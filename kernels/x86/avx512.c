/* avx512.c - the AVX-512 kernel table (F, BW, VL, DQ and VNNI: Ice Lake, Sapphire
 * Rapids, Zen 4 and later).
 *
 * What it is: the kernels of kernels.h with 512-bit vectors, compiled with only the
 * avx512 -m flags of the Makefile; dispatch.c calls them only when CPUID says so.
 * What it is not: new maths. Every kernel computes what its reference in
 * kernels/ref/ computes.
 * Invariants: the BitLinear integers (q, qsum, the dots) equal the reference's:
 * products go through vpdpbusd (u8 x s8, four products added straight into
 * int32, no int16 stage; rows over 2^22 inputs, where a lane could wrap, go to
 * the reference), and the float epilogue is the reference's expression in its
 * order: outputs are bit-identical. The LM head's per-block dots are exact int32
 * too; only float sums (their order) and the vector exp (about 2 ulp) differ
 * from the reference, by rounding.
 * No allocation and no global mutable state: the only buffers are bounded stack
 * arrays (at most 48 KB per call); inputs beyond their bounds go to the
 * reference or, for the aligned copies, are read in place.
 * Speeds quoted in comments were measured on a 2-core Zen 4 (EPYC) VM.
 */
#include "kernels/kernels.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

/* ---- BitLinear: activation quantization ---- */

/* mask of the first n (< 16) lanes, or all 16 */
INLINE __mmask16 lanes16(int n)
{
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

static void quantize_act(const float *x, int n, int8_t *q, float *s, int32_t *qsum)
{
    /* max(|x|, acc) keeps acc when x is NaN, as fmaxf does; masked-off lanes load 0 */
    __m512 vmax = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16)
        vmax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(n - i), x + i)), vmax);
    const float sc = 127.0f / fmaxf(_mm512_reduce_max_ps(vmax), 1e-5f);
    const __m512 vs = _mm512_set1_ps(sc);
    const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
    __m512i vsum = _mm512_setzero_si512();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = lanes16(n - i);
        /* cvtps rounds half to even under the default MXCSR mode, as nearbyintf; a
         * NaN product becomes INT_MIN and clamps to -128, as the reference's fmaxf */
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vs));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        vsum = _mm512_mask_add_epi32(vsum, m, vsum, v);
        _mm512_mask_cvtepi32_storeu_epi8(q + i, m, v);
    }
    *s = sc;
    *qsum = _mm512_reduce_add_epi32(vsum);
}

/* ---- BitLinear: the ternary product ----
 *
 * Prefill tiles (decode's GEMV, below them, uses the fields unshifted). One 32-byte block (128 weights) of a row, broadcast to both 256-bit halves,
 * gives two u8 vectors whose bytes line up with 64 consecutive activations each:
 *   lo = (w >> 4) & [0x0c x32 | 0x03 x32]   groups 0 | 1  as  4*u | u   against q[128b ..  +64)
 *   hi =  w       & [0x0c x32 | 0x03 x32]   groups 2 | 3  as  4*u | u   against q[128b+64 .. +64)
 * (the 16-bit shift drags bits of the next byte into bits 4-7, which the masks
 * drop). So a block costs one shift and two ands per row, shared by every token,
 * and the activations are read in place. The int32 lanes 0-7 of an accumulator
 * hold 4x their share (multiples of 4, so >> 2 is exact), lanes 8-15 1x. A lane
 * adds at most 8 * 4*2*128 per block, 64 n over a row of n inputs, and a 4x sum
 * of eight lanes is at most 512 n: int32 holds it for n up to 2^22. */
#define MAX_IN (1 << 22)

/* acc += u . q (vpdpbusd) in place. GCC 12 keeps the sixteen accumulators of a
 * tile in registers only when the accumulation is tied to its register like
 * this; with the intrinsic it copies and spills several of them on every block
 * (no spills and 2-7% faster). */
INLINE __m512i dpbusd_acc(__m512i acc, __m512i u, __m512i q)
{
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(q));
    return acc;
}

INLINE __m512i bcast_block(const uint8_t *p)
{
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
}

INLINE __m512i group_mask(void)
{
    return _mm512_inserti64x4(_mm512_set1_epi8(0x0c), _mm256_set1_epi8(0x03), 1);
}

/* Decode (one token): memory-bound. A row group (kernels.h) at a time, so the
 * matrix is read as one sequential stream and each activation block is loaded
 * once for the group's eight rows: activation loads from L1 between the stream's
 * fills slow the stream (one row at a time read 23-25 GB/s of 2560-wide rows
 * from DRAM, a group of eight 29). The fields are not shifted down either:
 *   hi = w & [0xc0 x32 | 0x30 x32]   groups 0 | 1  as  64*u | 16*u  against q[128b .. +64)
 *   lo = w & [0x0c x32 | 0x03 x32]   groups 2 | 3  as   4*u |    u  against q[128b+64 .. +64)
 * so a block costs one broadcast load, two ands and two vpdpbusd per row (31 GB/s
 * from DRAM, the probe's speed); each lane's sum is a multiple of its factor and
 * is shifted back exactly at the end. A 64x lane adds at most 4*128*128 per
 * block, 512 n over n inputs: within int32 for n <= 2^22. Rows outside whole
 * groups (a thread's range not on a group boundary) go one at a time. */
INLINE __m512i gemv_mask_hi(void)
{
    return _mm512_inserti64x4(_mm512_set1_epi8((char)0xc0), _mm256_set1_epi8(0x30), 1);
}

INLINE __m512i gemv_mask_lo(void)
{
    return _mm512_inserti64x4(_mm512_set1_epi8(0x0c), _mm256_set1_epi8(0x03), 1);
}

/* hi and lo accumulators as above -> one vector of exact dots */
INLINE __m512i gemv_unscale(__m512i hi, __m512i lo)
{
    const __m512i sh = _mm512_setr_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
    const __m512i sl = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_add_epi32(_mm512_srav_epi32(hi, sh), _mm512_srav_epi32(lo, sl));
}

static void gemv_row(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r)
{
    const int nb = (int)(w->n_in / 128);
    const __m512i mh = gemv_mask_hi(), ml = gemv_mask_lo();
    const uint8_t *row = bn_tmat_row(w, r);
    __m512i hi = _mm512_setzero_si512(), lo = hi;
    for (int b = 0; b < nb; b++) {
        __m512i wv = bcast_block(row + BN_TBLOCK_STRIDE * b);
        hi = dpbusd_acc(hi, _mm512_and_si512(wv, mh), _mm512_loadu_si512(q + 128 * b));
        lo = dpbusd_acc(lo, _mm512_and_si512(wv, ml), _mm512_loadu_si512(q + 128 * b + 64));
    }
    y[r] = (float)(_mm512_reduce_add_epi32(gemv_unscale(hi, lo)) - qsum) * w->scale / s; /* the reference's epilogue */
}

/* rows r .. r+7 of one group; only the first n (<= 8) are stored */
static void gemv_group(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r, int n)
{
    const int nb = (int)(w->n_in / 128);
    const __m512i mh = gemv_mask_hi(), ml = gemv_mask_lo();
    const uint8_t *g = bn_tmat_row(w, r);
    __m512i hi[BN_TGROUP], lo[BN_TGROUP];
#pragma GCC unroll 8
    for (int i = 0; i < BN_TGROUP; i++)
        hi[i] = lo[i] = _mm512_setzero_si512();
    for (int b = 0; b < nb; b++) {
        const __m512i qh = _mm512_loadu_si512(q + 128 * b), ql = _mm512_loadu_si512(q + 128 * b + 64);
        const uint8_t *blk = g + BN_TBLOCK_STRIDE * b;
#pragma GCC unroll 8
        for (int i = 0; i < BN_TGROUP; i++) {
            __m512i wv = bcast_block(blk + 32 * i);
            hi[i] = dpbusd_acc(hi[i], _mm512_and_si512(wv, mh), qh);
            lo[i] = dpbusd_acc(lo[i], _mm512_and_si512(wv, ml), ql);
        }
    }
    /* eight horizontal sums at once: pairs of 32-bit lanes, then 64-bit, then the
     * four 128-bit lanes; rows 0-7 end in lanes 0-7 */
    __m512i quad[2];
#pragma GCC unroll 2
    for (int k = 0; k < 2; k++) {
        __m512i v0 = gemv_unscale(hi[4 * k], lo[4 * k]), v1 = gemv_unscale(hi[4 * k + 1], lo[4 * k + 1]);
        __m512i v2 = gemv_unscale(hi[4 * k + 2], lo[4 * k + 2]), v3 = gemv_unscale(hi[4 * k + 3], lo[4 * k + 3]);
        __m512i p = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
        __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
        quad[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(p, t), _mm512_unpackhi_epi64(p, t));
    }
    __m512i h = _mm512_add_epi32(_mm512_shuffle_i32x4(quad[0], quad[1], 0x88), _mm512_shuffle_i32x4(quad[0], quad[1], 0xdd));
    h = _mm512_add_epi32(_mm512_shuffle_i32x4(h, h, 0x88), _mm512_shuffle_i32x4(h, h, 0xdd));
    __m256 out = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm512_castsi512_si256(h), _mm256_set1_epi32(qsum)));
    out = _mm256_div_ps(_mm256_mul_ps(out, _mm256_set1_ps(w->scale)), _mm256_set1_ps(s));
    _mm256_mask_storeu_ps(y + r, (__mmask8)((1u << n) - 1), out);
}

#define GEMV_COPY_MAX_IN 16384
static void gemv_rows(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r0, int r1)
{
    _Alignas(64) int8_t buf[GEMV_COPY_MAX_IN];
    if (((uintptr_t)q & 63) && w->n_in <= GEMV_COPY_MAX_IN) { /* see tgemm: no loads across lines */
        memcpy(buf, q, w->n_in);
        q = buf;
    }
    bn_gemv_by_groups(gemv_row, gemv_group, w, q, s, qsum, y, r0, r1);
}

/* Prefill / batches: a tile of R rows x T tokens (R, T compile-time constants
 * after inlining). Each block of the R rows is unpacked once and used for the T
 * tokens, each activation vector once for the R rows: per block 2*R*T vpdpbusd
 * against R shifts, 2R ands and 2T loads; R*T accumulators stay in registers. */
#define TILE_R 4
#define TILE_T 4

/* 16 accumulators -> one vector whose lane j is the exact dot of v[j]: pairs of
 * 32-bit, then 64-bit interleaves sum four accumulators per 128-bit lane, then two
 * 128-bit shuffles; the 4x lanes (the first two 128-bit lanes of each
 * accumulator) meet only each other until they are scaled, halfway. */
INLINE __m512i reduce16(const __m512i v[16])
{
    __m512i quad[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        const __m512i *a = v + 4 * k;
        __m512i p = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
        __m512i q = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
        quad[k] = _mm512_add_epi32(_mm512_unpacklo_epi64(p, q), _mm512_unpackhi_epi64(p, q));
    }
    /* quad[k]: 128-bit lane c holds v[4k..4k+3]'s sums over that lane */
    const __m512i shift = _mm512_setr_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0);
    __m512i h0 = _mm512_add_epi32(_mm512_shuffle_i32x4(quad[0], quad[1], 0x88), _mm512_shuffle_i32x4(quad[0], quad[1], 0xdd));
    __m512i h1 = _mm512_add_epi32(_mm512_shuffle_i32x4(quad[2], quad[3], 0x88), _mm512_shuffle_i32x4(quad[2], quad[3], 0xdd));
    h0 = _mm512_srav_epi32(h0, shift); /* [q0 lanes 0+1 (4x), q0 2+3, q1 0+1 (4x), q1 2+3] */
    h1 = _mm512_srav_epi32(h1, shift);
    return _mm512_add_epi32(_mm512_shuffle_i32x4(h0, h1, 0x88), _mm512_shuffle_i32x4(h0, h1, 0xdd));
}

INLINE void tile(const bn_tmat_t *w, const int8_t *q, size_t ldq, const float *s, const int32_t *qsum, float *y,
                 size_t ldy, int r, const int R, const int T)
{
    const int nb = (int)w->n_in / 128;
    const __m512i m = group_mask();
    const uint8_t *rows[TILE_R];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        rows[i] = bn_tmat_row(w, r + i);
    __m512i acc[16]; /* acc[4t + i]: token t, row r + i */
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++)
        acc[j] = _mm512_setzero_si512();
    for (int b = 0; b < nb; b++) {
        __m512i ulo[TILE_R], uhi[TILE_R];
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            __m512i wv = bcast_block(rows[i] + BN_TBLOCK_STRIDE * b);
            ulo[i] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m);
            uhi[i] = _mm512_and_si512(wv, m);
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; t++) {
            const int8_t *qt = q + (size_t)t * ldq + 128 * b;
            __m512i qlo = _mm512_loadu_si512(qt), qhi = _mm512_loadu_si512(qt + 64);
#pragma GCC unroll 4
            for (int i = 0; i < R; i++) {
                acc[4 * t + i] = dpbusd_acc(acc[4 * t + i], ulo[i], qlo);
                acc[4 * t + i] = dpbusd_acc(acc[4 * t + i], uhi[i], qhi);
            }
        }
    }
    /* the reference's epilogue, 16 lanes at once: (float)(dot - qsum) * scale / s */
    const __m512i tok = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __mmask16 mt = lanes16(T);
    __m512i qs = _mm512_permutexvar_epi32(tok, _mm512_maskz_loadu_epi32(mt, qsum));
    __m512 sv = _mm512_permutexvar_ps(tok, _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), mt, s));
    __m512 out = _mm512_cvtepi32_ps(_mm512_sub_epi32(reduce16(acc), qs));
    out = _mm512_div_ps(_mm512_mul_ps(out, _mm512_set1_ps(w->scale)), sv);
    float o[16];
    _mm512_storeu_ps(o, out);
#pragma GCC unroll 4
    for (int t = 0; t < T; t++)
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
            y[(size_t)t * ldy + r + i] = o[4 * t + i];
}

/* rows [r0, r1) for one tile of T tokens. On the first pass each tile prefetches
 * half of the row group PF_GROUPS ahead (up to rlim) into L2: a tile reads half
 * of each 256-byte block column, which the hardware prefetcher does not follow,
 * and one tile ahead (or into L1) is too close for a few tokens (measured: 4
 * tokens at half the speed of 64 without it). The whole group at once, at its
 * first tile, made 3-token steps 6% slower. */
#define PF_GROUPS 4
INLINE void tile_rows(const bn_tmat_t *w, const int8_t *q, size_t ldq, const float *s, const int32_t *qsum, float *y,
                      size_t ldy, int r0, int r1, int rlim, int first, const int T)
{
    int r = r0;
    for (; r + TILE_R <= r1; r += TILE_R) {
        if (first && r + (PF_GROUPS + 1) * BN_TGROUP <= rlim) { /* half of the group's bytes per tile */
            const uint8_t *next = w->data + (size_t)(r / BN_TGROUP + PF_GROUPS) * BN_TGROUP * w->row_bytes +
                                  (size_t)(r % BN_TGROUP) * w->row_bytes;
            for (size_t k = 0; k < TILE_R * w->row_bytes; k += 64)
                _mm_prefetch((const char *)(next + k), _MM_HINT_T1);
        }
        tile(w, q, ldq, s, qsum, y, ldy, r, TILE_R, T);
    }
    for (; r < r1; r++)
        tile(w, q, ldq, s, qsum, y, ldy, r, 1, T);
}

/* Prefill / batches. Rows in chunks whose weights stay in L2, and within a chunk
 * every tile of tokens: the matrix is read from memory once per call. A token
 * tile's activations are first copied to an aligned buffer: 64-byte loads across
 * cache lines (malloc aligns to 16) cost a fifth of the speed. */
#define CHUNK_ROWS 128
#define COPY_MAX_IN 8192
static void tgemm(const bn_tmat_t *w, const int8_t *q, const float *s, const int32_t *qsum, int nt, float *y,
                  size_t ldy, int r0, int r1)
{
    if (w->n_in > MAX_IN) {
        bn_ref_tgemm(w, q, s, qsum, nt, y, ldy, r0, r1);
        return;
    }
    if (nt == 1) {
        gemv_rows(w, q, s[0], qsum[0], y, r0, r1);
        return;
    }
    const int n = (int)w->n_in;
    _Alignas(64) int8_t buf[TILE_T * COPY_MAX_IN];
    for (int rc = r0; rc < r1; rc += CHUNK_ROWS) {
        const int re = r1 - rc < CHUNK_ROWS ? r1 : rc + CHUNK_ROWS;
        for (int t0 = 0; t0 < nt; t0 += TILE_T) {
            const int T = nt - t0 < TILE_T ? nt - t0 : TILE_T;
            const int8_t *qt = q + (size_t)t0 * n;
            if (((uintptr_t)qt & 63) && n <= COPY_MAX_IN) {
                memcpy(buf, qt, (size_t)T * n);
                qt = buf;
            }
            float *yt = y + (size_t)t0 * ldy;
            switch (T) {
            case 1: tile_rows(w, qt, n, s + t0, qsum + t0, yt, ldy, rc, re, r1, t0 == 0, 1); break;
            case 2: tile_rows(w, qt, n, s + t0, qsum + t0, yt, ldy, rc, re, r1, t0 == 0, 2); break;
            case 3: tile_rows(w, qt, n, s + t0, qsum + t0, yt, ldy, rc, re, r1, t0 == 0, 3); break;
            default: tile_rows(w, qt, n, s + t0, qsum + t0, yt, ldy, rc, re, r1, t0 == 0, TILE_T); break;
            }
        }
    }
}

/* ---- LM head ---- */

static void head_quantize(const float *x, int n, int8_t *q, float *d)
{
    for (int b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        d[b] = amax / 127.0f;
        const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* |x * id| <= 127 after rounding (half to even, as nearbyintf) */
        _mm_storeu_si128((__m128i *)(q + 32 * b), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id))));
        _mm_storeu_si128((__m128i *)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id))));
    }
}

/* Quantized rows. vpdpbusd wants one unsigned operand: each format's weights are
 * made unsigned by an offset o (Q8: w + 128 = w ^ 0x80; Q4: the nibble, w + 8; Q6:
 * the 6-bit code, w + 32), and the offset's share o * sum(a) is removed exactly in
 * int32 by starting each accumulator at -o * (sums of four activations), computed
 * once per call. The int32 lanes of one block are converted to float and take
 * their block's d_w * d_a.
 * Q8 blocks hold 32 bytes of values: two blocks per vector, as stored. Q4 and Q6
 * store their values as 16 low and 16 high nibbles: four blocks go in two
 * vectors, the low nibbles of block c in 128-bit lane c of one, the high in lane
 * c of the other, and the activations are rearranged once per call to match. */
#define HEAD_MAX_IN 16384

/* Q8 scales: the fp16 d of 16 consecutive blocks (struct size `bytes`, even, d at
 * offset 0) are words k * bytes/2 of the blocks' span: picked from each 128-byte
 * chunk of it by one two-table word permute (a gather ran at half the speed). */
typedef struct {
    __m512i idx[5];     /* per chunk: the word of block k in lane k */
    __mmask32 take[5];  /* per chunk: the blocks whose d lies in it */
} dpick_t;

static void dpick_init(dpick_t *pk, int bytes)
{
    for (int c = 0; c < (16 * bytes + 127) / 128; c++) { /* at most 5, for Q8's 34-byte blocks */
        int16_t idx[32] = { 0 };
        uint32_t take = 0;
        for (int k = 0; k < 16; k++) {
            int wi = k * bytes / 2 - 64 * c;
            if (wi >= 0 && wi < 64) {
                idx[k] = (int16_t)wi;
                take |= 1u << k;
            }
        }
        pk->idx[c] = _mm512_loadu_si512(idx);
        pk->take[c] = take;
    }
}

/* the 64 bytes at p + o, of which only those before p + span are read (the rest
 * are zero) */
INLINE __m512i load_within(const uint8_t *p, int o, int span)
{
    const int n = span - o;
    if (n <= 0)
        return _mm512_setzero_si512();
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << n) - 1, p + o);
}

/* d_w * d_a of the cnt (<= 16) blocks at p, whose activation scales are da;
 * lanes past cnt are 0, and the loads stay inside the cnt blocks */
INLINE __m512 block_scales(const uint8_t *p, const int bytes, const dpick_t *pk, const float *da, const int cnt)
{
    const int span = cnt * bytes;
    __m512i d = _mm512_setzero_si512();
#pragma GCC unroll 5
    for (int c = 0; c < (16 * bytes + 127) / 128; c++) {
        const int o = 128 * c;
        __m512i lo = load_within(p, o, span), hi = load_within(p, o + 64, span);
        d = _mm512_mask_mov_epi16(d, pk->take[c], _mm512_permutex2var_epi16(lo, pk->idx[c], hi));
    }
    return _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(d)), _mm512_maskz_loadu_ps(lanes16(cnt), da));
}

/* Q8 rows: pair j holds blocks 2j, 2j+1 as stored (int32 lanes 0-7 and 8-15) */
INLINE __m512 q8_pair(const uint8_t *b0, const uint8_t *b1, __m512i start, __m512i act, __m512 ds, const int k,
                      __m512 acc)
{
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2))),
                                   _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
    __m512i dot = _mm512_dpbusd_epi32(start, _mm512_xor_si512(w, _mm512_set1_epi8((char)0x80)), act);
    const __m512i sel = _mm512_setr_epi32(k, k, k, k, k, k, k, k, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1, k + 1);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_permutexvar_ps(sel, ds), acc);
}

static void head_rows_q8(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1)
{
    const int nb = (int)h->n_in / 32, np = (nb + 1) / 2, bytes = (int)sizeof(bn_block_q8_0);
    __m512i act[HEAD_MAX_IN / 64], start[HEAD_MAX_IN / 64];
    dpick_t pk;
    dpick_init(&pk, bytes);
    for (int j = 0; j < np; j++) {
        act[j] = _mm512_maskz_loadu_epi8(2 * j + 1 < nb ? ~(__mmask64)0 : (__mmask64)0xffffffff, a->q + 64 * j);
        start[j] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), act[j]));
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = bn_hmat_unit(h, r, 0); /* q8 rows are whole units (kernels.h) */
        __m512 acc = _mm512_setzero_ps();
        int b = 0;
        for (; b + 16 <= nb; b += 16) {
            const __m512 ds = block_scales(row + (size_t)b * bytes, bytes, &pk, a->d + b, 16);
            const uint8_t *blk = row + (size_t)b * bytes;
#pragma GCC unroll 8
            for (int k = 0; k < 16; k += 2)
                acc = q8_pair(blk + k * bytes, blk + (k + 1) * bytes, start[(b + k) / 2], act[(b + k) / 2], ds, k, acc);
        }
        if (b < nb) {
            const __m512 ds = block_scales(row + (size_t)b * bytes, bytes, &pk, a->d + b, nb - b);
            for (int k = 0; b + k < nb; k += 2) {
                const uint8_t *b0 = row + (size_t)(b + k) * bytes;
                const uint8_t *b1 = b + k + 1 < nb ? b0 + bytes : b0; /* an odd tail: its activations are 0 */
                acc = q8_pair(b0, b1, start[(b + k) / 2], act[(b + k) / 2], ds, k, acc);
            }
        }
        logits[r] = _mm512_reduce_add_ps(acc);
    }
}

/* Q4 and Q6 rows, a unit of four blocks (72 or 104 bytes, kernels.h) at a time:
 * its 64 bytes of nibbles in one load, block c's 16 bytes in 128-bit lane c; its
 * q6 qh words doubled into their lane by one qword permute; its four fp16 d
 * widened and spread four to a lane. (The blocks stored whole needed three
 * two-table word permutes per unit, and the 2B4T q6 head ran 10-15% slower.) */

/* acc + the dots of the m (1..4) blocks of the unit at p times their scales
 * d_w * d_a; the lanes of missing blocks read zero codes and scales, and no
 * load leaves the unit.
 * q6_h high bits: qh[i] holds bits 4-5 of values i, 8+i, 16+i, 24+i in its bit
 * pairs 0-1, 2-3, 4-5, 6-7; rotating the lane's two copies of qh left by (4, 2)
 * puts the pairs of values 0-15 at bits 4-5, by (0, -2) those of values 16-31. */
INLINE __m512 nib_group(const uint8_t *p, const int m, const int q6, __m512i start, __m512i alo, __m512i ahi,
                        __m512 da, __m512 acc)
{
    const __m512i m15 = _mm512_set1_epi8(15);
    const int full = m == 4;
    __m512i v = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(((__mmask64)1 << (16 * m)) - 1, p), lo, hi;
    if (q6) {
        const __m512i m30 = _mm512_set1_epi8(0x30);
        const __m256i qh = full ? _mm256_loadu_si256((const __m256i *)(p + 64))
                                : _mm256_maskz_loadu_epi64((__mmask8)((1u << m) - 1), p + 16 * m);
        __m512i h = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 1, 1, 2, 2, 3, 3), _mm512_castsi256_si512(qh));
        __m512i l2 = _mm512_and_si512(_mm512_rolv_epi64(h, _mm512_setr_epi64(4, 2, 4, 2, 4, 2, 4, 2)), m30);
        __m512i h2 = _mm512_and_si512(_mm512_rolv_epi64(h, _mm512_setr_epi64(0, 62, 0, 62, 0, 62, 0, 62)), m30);
        lo = _mm512_ternarylogic_epi32(v, m15, l2, 0xea); /* (v & 15) | l2 */
        hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), m15, h2, 0xea);
    } else {
        lo = _mm512_and_si512(v, m15);
        hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
    }
    __m512i dot = dpbusd_acc(dpbusd_acc(start, lo, alo), hi, ahi);
    const __m128i d = _mm_maskz_loadu_epi16((__mmask8)((1u << m) - 1), p + (q6 ? 24 : 16) * m);
    const __m512 dw = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                            _mm512_castps128_ps512(_mm_cvtph_ps(d)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, da), acc);
}

/* rows r .. r+R-1 (R = 1, or BN_HGROUP from a group's first row): unit g holds
 * blocks 4g .. 4g+3, one per 128-bit lane; a group's rows' units g lie one after
 * another (kernels.h) */
INLINE void nib_rows(const bn_hmat_t *h, const __m512i *alo, const __m512i *ahi,
                     const __m512i *start, const __m512 *da, float *logits, int r, const int R, const int q6)
{
    const int nb = (int)h->n_in / 32, ng = (nb + 3) / 4;
    const int bytes = q6 ? (int)sizeof(bn_block_q6_h) : (int)sizeof(bn_block_q4_0);
    __m512 acc[BN_HGROUP];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        acc[i] = _mm512_setzero_ps();
    int g = 0;
    for (; g < nb / 4; g++) {
        const uint8_t *u0 = bn_hmat_unit(h, r, g);
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
            acc[i] = nib_group(u0 + (size_t)i * 4 * bytes, 4, q6, start[g], alo[g], ahi[g], da[g], acc[i]);
    }
    if (g < ng) {
        const int span = (nb - 4 * g) * bytes;
        const uint8_t *u0 = bn_hmat_unit(h, r, g);
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
            acc[i] = nib_group(u0 + (size_t)i * span, nb - 4 * g, q6, start[g], alo[g], ahi[g], da[g], acc[i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        logits[r + i] = _mm512_reduce_add_ps(acc[i]);
}

INLINE void head_rows_nib(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1, const int q6)
{
    const int nb = (int)h->n_in / 32, ng = (nb + 3) / 4;
    /* per unit: values 0-15 (alo) and 16-31 (ahi) of block 4g + c in lane c, the
     * offset's share, and d_a of block 4g + c in the lane's four floats */
    __m512i alo[HEAD_MAX_IN / 128], ahi[HEAD_MAX_IN / 128], start[HEAD_MAX_IN / 128];
    __m512 da[HEAD_MAX_IN / 128];
    for (int g = 0; g < ng; g++) {
        int8_t tmp[2][4][16] = { { { 0 } } };
        float d4[16] = { 0 };
        for (int c = 0; c < 4 && 4 * g + c < nb; c++) {
            memcpy(tmp[0][c], a->q + 32 * (4 * g + c), 16);
            memcpy(tmp[1][c], a->q + 32 * (4 * g + c) + 16, 16);
            for (int j = 0; j < 4; j++)
                d4[4 * c + j] = a->d[4 * g + c];
        }
        alo[g] = _mm512_loadu_si512(tmp[0]);
        ahi[g] = _mm512_loadu_si512(tmp[1]);
        da[g] = _mm512_loadu_ps(d4);
        __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), alo[g]);
        sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1), ahi[g]);
        start[g] = _mm512_mullo_epi32(sum, _mm512_set1_epi32(q6 ? -32 : -8));
    }
#define NIB_ROWS(r, R) nib_rows(h, alo, ahi, start, da, logits, r, R, q6)
    BN_HEAD_BY_GROUPS(r0, r1, NIB_ROWS);
#undef NIB_ROWS
}

/* F16 rows r .. r+R-1 (R = 1, or BN_HGROUP from a group's first row): a group
 * stores block b of its rows together, so it is read in order (units of 128
 * halves, read a row at a time within the unit, ran no faster than rows one at a
 * time: 2B4T decode 21 tok/s, 24 this way) */
INLINE void f16_rows(const bn_hmat_t *h, const float *x, float *logits, int r, const int R)
{
    const int nb = (int)h->n_in / 32;
    __m512 acc[BN_HGROUP][2];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const bn_fp16_t *u0 = (const bn_fp16_t *)(const void *)bn_hmat_unit(h, r, 0);
    for (int b = 0; b < nb; b++, u0 += 32 * BN_HGROUP) { /* units of one block (kernels.h) */
        const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(u0 + 32 * i))), x0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(u0 + 32 * i + 16))), x1,
                                        acc[i][1]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        logits[r + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
}

static void head_gemv(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1)
{
    const int n = (int)h->n_in;
    switch (h->type) {
    case BN_HEAD_F16:
#define F16_ROWS(r, R) f16_rows(h, a->x, logits, r, R)
        BN_HEAD_BY_GROUPS(r0, r1, F16_ROWS);
#undef F16_ROWS
        return;
    case BN_HEAD_Q8: if (n <= HEAD_MAX_IN) { head_rows_q8(h, a, logits, r0, r1); return; } break;
    case BN_HEAD_Q4: if (n <= HEAD_MAX_IN) { head_rows_nib(h, a, logits, r0, r1, 0); return; } break;
    case BN_HEAD_Q6: if (n <= HEAD_MAX_IN) { head_rows_nib(h, a, logits, r0, r1, 1); return; } break;
    }
    bn_ref_head_gemv(h, a, logits, r0, r1);
}

/* ---- float ops ---- */

/* e^x for 16 lanes, within about 2 ulp: x = n ln2 + r with |r| <= ln2/2 (ln2 in two
 * parts, the first exact in n * ln2_hi), e^r by its Taylor series to r^7 (the
 * remainder is below 1e-8 relative), times 2^n by vscalefps, which gives inf and 0
 * at the ends of the range. Clamping x first keeps r finite for x = +-inf. */
INLINE __m512 exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out)
{
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
        a0 = _mm512_fmadd_ps(v0, v0, a0);
        a1 = _mm512_fmadd_ps(v1, v1, a1);
    }
    for (; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(lanes16(n - i), x + i);
        a0 = _mm512_fmadd_ps(v, v, a0);
    }
    const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) / (float)n + eps);
    const __m512 vr = _mm512_set1_ps(r);
    for (i = 0; i < n; i += 16) {
        __mmask16 m = lanes16(n - i);
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vr), _mm512_maskz_loadu_ps(m, w + i));
        _mm512_mask_storeu_ps(out + i, m, v);
    }
}

static void rope_neox(float *x, int n_heads, int head_dim, int rope_dim, const float *cs)
{
    const int half = rope_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i += 16) {
            __mmask16 m = lanes16(half - i);
            __m512 a = _mm512_maskz_loadu_ps(m, v + i), b = _mm512_maskz_loadu_ps(m, v + half + i);
            __m512 c = _mm512_maskz_loadu_ps(m, cs + i), s = _mm512_maskz_loadu_ps(m, cs + half + i);
            _mm512_mask_storeu_ps(v + i, m, _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s)));
            _mm512_mask_storeu_ps(v + half + i, m, _mm512_add_ps(_mm512_mul_ps(a, s), _mm512_mul_ps(b, c)));
        }
    }
}

/* Online softmax over chunks of 16 positions: the 16 scores, their maximum, one
 * rescale of the sums when it grows, the 16 weights by one vector exp. */
#define ATT_MAX_VEC 16 /* head_dim up to 256 */
/* Query heads [0, nq) (q_h = q + h * q_stride, out alike) against the same n_pos
 * cached positions: a GQA group. Positions go in blocks of 16; within a block
 * every head takes its turn, so the block's keys and values come from memory
 * once and from L1 for the other heads. Each head's arithmetic is the same, in
 * the same order, as for one head alone (nq = 1): results do not depend on how
 * heads are grouped (tensor ranks may hold part of a group). */
#define ATT_MAX_HEADS 16

/* 16 vectors -> one whose lane j is the sum of v[j]'s lanes (the float twin of
 * reduce16: pairs, then 64-bit interleaves, then two 128-bit shuffles) */
INLINE __m512 reduce16f(const __m512 v[16])
{
    __m512 quad[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        const __m512 *a = v + 4 * k;
        __m512 p = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
        __m512 q = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
        quad[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(p), _mm512_castps_pd(q))),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(p), _mm512_castps_pd(q))));
    }
    __m512 h0 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88), _mm512_shuffle_f32x4(quad[0], quad[1], 0xdd));
    __m512 h1 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88), _mm512_shuffle_f32x4(quad[2], quad[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(h0, h1, 0x88), _mm512_shuffle_f32x4(h0, h1, 0xdd));
}
/* 16 cached values at element e of a cache of floats, or of halves (f16), widened
 * exactly */
INLINE __m512 kv16(const void *base, size_t e, const int f16)
{
    if (f16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const bn_fp16_t *)base + e)));
    return _mm512_loadu_ps((const float *)base + e);
}

/* Vector i (values 16i..16i+15) of a row of a block-quantized cache, widened
 * exactly (kernels.h: the layout) */
INLINE __m512 kvq16(const uint8_t *row, int i, const int bits)
{
    const uint8_t *b = row + (size_t)(i >> 1) * (bits == 8 ? sizeof(bn_block_q8_0) : sizeof(bn_block_q4_0));
    uint16_t dh;
    memcpy(&dh, b, sizeof dh);
    const __m512 d = _mm512_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(dh))));
    if (bits == 8)
        return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2 + 16 * (i & 1))))));
    __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + 2)));
    n = (i & 1) ? _mm512_srli_epi32(n, 4) : _mm512_and_si512(n, _mm512_set1_epi32(15));
    return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(n, _mm512_set1_epi32(8))));
}

/* Vector i of cached row t of a cache of type ty (1: fp16, 8: Q8_0, 4: Q4_0;
 * stride in elements for fp16, in bytes for the quantized types), as floats */
INLINE __m512 kvrow16(const void *base, size_t stride, int t, int i, const int ty)
{
    if (ty == 1)
        return kv16(base, (size_t)t * stride + 16 * (size_t)i, 1);
    return kvq16((const uint8_t *)base + (size_t)t * stride, i, ty);
}

/* One whole block of 16 positions of an fp16 or block-quantized cache (ty, as
 * kvrow16 takes it), for nh heads at once (nh, nv and ty compile-time
 * constants): each key and value row is widened once into registers and used
 * by every head, rather than stored widened and read back per head. Per head, the same operations in the same order as the one-head path
 * below (the dot products as there, the same transpose-sum, exp and accumulation
 * order), so the same bits. */
INLINE void kv_block(const float *q, size_t q_stride, const void *k, const void *v, size_t stride,
                      int t0, float scale, float (*accs)[16 * ATT_MAX_VEC], float *ms, float *ls, const int nv,
                      const int nh, const int ty)
{
    _Alignas(64) float dots[4][16 * 16], p[4][16];
    for (int j = 0; j < 16; j++) {
        __m512 kc[ATT_MAX_VEC];
#pragma GCC unroll 16
        for (int i = 0; i < ATT_MAX_VEC; i++) /* (all set: quiets a false maybe-uninitialized) */
            kc[i] = i < nv ? kvrow16(k, stride, t0 + j, i, ty) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int h = 0; h < nh; h++) {
            const float *qh = q + h * q_stride;
            __m512 d = _mm512_mul_ps(_mm512_loadu_ps(qh), kc[0]);
#pragma GCC unroll 16
            for (int i = 1; i < nv; i++)
                d = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * i), kc[i], d);
            _mm512_store_ps(dots[h] + 16 * j, d);
        }
    }
#pragma GCC unroll 4
    for (int h = 0; h < nh; h++) {
        __m512 d[16];
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++)
            d[j] = _mm512_load_ps(dots[h] + 16 * j);
        const __m512 vs = _mm512_mul_ps(reduce16f(d), _mm512_set1_ps(scale));
        const float cmax = _mm512_reduce_max_ps(vs);
        if (cmax > ms[h]) { /* a new maximum: rescale what was summed so far */
            const float alpha = expf(ms[h] - cmax);
            const __m512 va = _mm512_set1_ps(alpha);
            for (int i = 0; i < nv; i++)
                _mm512_store_ps(accs[h] + 16 * i, _mm512_mul_ps(_mm512_load_ps(accs[h] + 16 * i), va));
            ls[h] *= alpha;
            ms[h] = cmax;
        }
        const __m512 vp = exp512(_mm512_sub_ps(vs, _mm512_set1_ps(ms[h])));
        ls[h] += _mm512_reduce_add_ps(vp);
        _mm512_store_ps(p[h], vp);
    }
    /* the values, four vectors of the head at a time: 4 x nh accumulators */
#pragma GCC unroll 4
    for (int c0 = 0; c0 < nv; c0 += 4) {
        const int nc = nv - c0 < 4 ? nv - c0 : 4;
        __m512 acc[4][4];
#pragma GCC unroll 4
        for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
                acc[h][c] = c < nc ? _mm512_load_ps(accs[h] + 16 * (c0 + c)) : _mm512_setzero_ps();
        for (int j = 0; j < 16; j++) {
            __m512 vc[4];
#pragma GCC unroll 4
            for (int c = 0; c < nc; c++)
                vc[c] = kvrow16(v, stride, t0 + j, c0 + c, ty);
#pragma GCC unroll 4
            for (int h = 0; h < nh; h++) {
                const __m512 pj = _mm512_set1_ps(p[h][j]);
#pragma GCC unroll 4
                for (int c = 0; c < nc; c++)
                    acc[h][c] = _mm512_fmadd_ps(pj, vc[c], acc[h][c]);
            }
        }
#pragma GCC unroll 4
        for (int h = 0; h < nh; h++)
#pragma GCC unroll 4
            for (int c = 0; c < nc; c++)
                _mm512_store_ps(accs[h] + 16 * (c0 + c), acc[h][c]);
    }
}

/* nv = head_dim / 16 and the cache's element type ty (0: f32, 1: fp16, 8:
 * Q8_0, 4: Q4_0; stride in bytes for the last two), compile-time constants
 * after inlining, so the accumulators stay in registers */
INLINE void attention_heads_nv(const float *q, int nq, size_t q_stride, const void *k, const void *v, size_t stride,
                               int n_pos, int head_dim, float *out, size_t out_stride, float *ml, const int nv,
                               const int ty)
{
    const float scale = 1.0f / sqrtf((float)head_dim);
    _Alignas(64) float accs[ATT_MAX_HEADS][16 * ATT_MAX_VEC];
    _Alignas(64) float kbuf[16 * 16 * ATT_MAX_VEC], vbuf[16 * 16 * ATT_MAX_VEC]; /* a block, widened (f16) */
    float ms[ATT_MAX_HEADS], ls[ATT_MAX_HEADS];
    for (int h = 0; h < nq; h++) {
        memset(accs[h], 0, (size_t)head_dim * sizeof(float));
        ms[h] = -INFINITY;
        ls[h] = 0.0f;
    }
    for (int t0 = 0; t0 < n_pos; t0 += 16) {
        const int cnt = n_pos - t0 < 16 ? n_pos - t0 : 16;
        const __mmask16 live = lanes16(cnt);
        /* the block's keys and values as floats, rows bst apart: in place, or
         * widened once for all the heads (exactly: the same values) */
        if (ty && cnt == 16) { /* a whole block: all heads at once, four at a time */
            for (int h = 0; h < nq; h += 4) {
                const float *qh = q + h * q_stride;
                switch (nq - h < 4 ? nq - h : 4) {
                case 4: kv_block(qh, q_stride, k, v, stride, t0, scale, accs + h, ms + h, ls + h, nv, 4, ty); break;
                case 3: kv_block(qh, q_stride, k, v, stride, t0, scale, accs + h, ms + h, ls + h, nv, 3, ty); break;
                case 2: kv_block(qh, q_stride, k, v, stride, t0, scale, accs + h, ms + h, ls + h, nv, 2, ty); break;
                default: kv_block(qh, q_stride, k, v, stride, t0, scale, accs + h, ms + h, ls + h, nv, 1, ty);
                }
            }
            continue;
        }
        const float *kb, *vb;
        size_t bst;
        if (ty) {
            for (int j = 0; j < cnt; j++)
#pragma GCC unroll 16
                for (int i = 0; i < nv; i++) {
                    _mm512_store_ps(kbuf + (size_t)j * 16 * nv + 16 * i, kvrow16(k, stride, t0 + j, i, ty));
                    _mm512_store_ps(vbuf + (size_t)j * 16 * nv + 16 * i, kvrow16(v, stride, t0 + j, i, ty));
                }
            kb = kbuf;
            vb = vbuf;
            bst = (size_t)16 * nv;
        } else {
            kb = (const float *)k + (size_t)t0 * stride;
            vb = (const float *)v + (size_t)t0 * stride;
            bst = stride;
        }
        for (int h = 0; h < nq; h++) {
            const float *qh = q + h * q_stride;
            __m512 acc[ATT_MAX_VEC];
#pragma GCC unroll 16
            for (int i = 0; i < ATT_MAX_VEC; i++) /* (all set: quiets a false maybe-uninitialized) */
                acc[i] = i < nv ? _mm512_load_ps(accs[h] + 16 * i) : _mm512_setzero_ps();
            float sc[16], p[16];
            if (cnt == 16) { /* a whole block: 16 dot products side by side, one transpose-sum */
                __m512 d[16];
#pragma GCC unroll 16
                for (int j = 0; j < 16; j++) {
                    const float *kt = kb + (size_t)j * bst;
                    d[j] = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_loadu_ps(kt));
#pragma GCC unroll 16
                    for (int i = 1; i < nv; i++)
                        d[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * i), _mm512_loadu_ps(kt + 16 * i), d[j]);
                }
                _mm512_storeu_ps(sc, _mm512_mul_ps(reduce16f(d), _mm512_set1_ps(scale)));
            }
            for (int j = 0; j < cnt && cnt < 16; j++) {
                const float *kt = kb + (size_t)j * bst;
                __m512 d0 = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_loadu_ps(kt)), d1 = _mm512_setzero_ps();
                int i = 1;
                for (; i + 2 <= nv; i += 2) {
                    d1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * i), _mm512_loadu_ps(kt + 16 * i), d1);
                    d0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * i + 16), _mm512_loadu_ps(kt + 16 * i + 16), d0);
                }
                if (i < nv)
                    d1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * i), _mm512_loadu_ps(kt + 16 * i), d1);
                sc[j] = _mm512_reduce_add_ps(_mm512_add_ps(d0, d1)) * scale;
            }
            __m512 vs = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, sc);
            const float cmax = _mm512_reduce_max_ps(vs);
            if (cmax > ms[h]) { /* a new maximum: rescale what was summed so far */
                const float alpha = expf(ms[h] - cmax);
                const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
                for (int i = 0; i < nv; i++)
                    acc[i] = _mm512_mul_ps(acc[i], va);
                ls[h] *= alpha;
                ms[h] = cmax;
            }
            const __m512 vp = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(vs, _mm512_set1_ps(ms[h]))));
            ls[h] += _mm512_reduce_add_ps(vp);
            _mm512_storeu_ps(p, vp);
            for (int j = 0; j < cnt; j++) {
                const float *vt = vb + (size_t)j * bst;
                const __m512 pj = _mm512_set1_ps(p[j]);
#pragma GCC unroll 16
                for (int i = 0; i < nv; i++)
                    acc[i] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vt + 16 * i), acc[i]);
            }
#pragma GCC unroll 16
            for (int i = 0; i < nv; i++)
                _mm512_store_ps(accs[h] + 16 * i, acc[i]);
        }
    }
    for (int h = 0; h < nq; h++) {
        if (ml) {
            ml[2 * h] = ms[h];
            ml[2 * h + 1] = ls[h];
        }
        const __m512 inv = _mm512_set1_ps(1.0f / ls[h]);
        for (int i = 0; i < nv; i++)
            _mm512_storeu_ps(out + h * out_stride + 16 * i, _mm512_mul_ps(_mm512_load_ps(accs[h] + 16 * i), inv));
    }
}

static void attention_heads(const float *q, int nq, size_t q_stride, const float *k, const float *v, size_t stride,
                            int n_pos, int head_dim, float *out, size_t out_stride)
{
    if (head_dim % 16 || head_dim > 16 * ATT_MAX_VEC) {
        for (int h = 0; h < nq; h++)
            bn_ref_attention(q + h * q_stride, k, v, stride, n_pos, head_dim, out + h * out_stride);
        return;
    }
    if (nq > ATT_MAX_HEADS) { /* in parts: each head's result does not depend on its part */
        for (int h = 0; h < nq; h += ATT_MAX_HEADS)
            attention_heads(q + h * q_stride, nq - h < ATT_MAX_HEADS ? nq - h : ATT_MAX_HEADS, q_stride, k, v, stride,
                            n_pos, head_dim, out + h * out_stride, out_stride);
        return;
    }
    switch (head_dim / 16) {
    case 2: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, NULL, 2, 0); break;
    case 4: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, NULL, 4, 0); break;
    case 8: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, NULL, 8, 0); break;
    default: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, NULL, head_dim / 16, 0);
    }
}

static void attention_heads_f16(const float *q, int nq, size_t q_stride, const bn_fp16_t *k, const bn_fp16_t *v,
                                size_t stride, int n_pos, int head_dim, float *out, size_t out_stride, float *ml)
{
    if (head_dim % 16 || head_dim > 16 * ATT_MAX_VEC) {
        bn_ref_attention_heads_f16(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, ml);
        return;
    }
    if (nq > ATT_MAX_HEADS) { /* in parts, as attention_heads */
        for (int h = 0; h < nq; h += ATT_MAX_HEADS)
            attention_heads_f16(q + h * q_stride, nq - h < ATT_MAX_HEADS ? nq - h : ATT_MAX_HEADS, q_stride, k, v,
                                stride, n_pos, head_dim, out + h * out_stride, out_stride, ml ? ml + 2 * h : NULL);
        return;
    }
    switch (head_dim / 16) {
    case 2: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, ml, 2, 1); break;
    case 4: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, ml, 4, 1); break;
    case 8: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, ml, 8, 1); break;
    default: attention_heads_nv(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, ml, head_dim / 16, 1);
    }
}

static void attention_heads_q(const float *q, int nq, size_t q_stride, const uint8_t *k, const uint8_t *v,
                              size_t row_stride, int bits, int n_pos, int head_dim, float *out, size_t out_stride,
                              float *ml)
{
    if (head_dim % BN_KVQ_BLOCK || head_dim > 16 * ATT_MAX_VEC) {
        bn_ref_attention_heads_q(q, nq, q_stride, k, v, row_stride, bits, n_pos, head_dim, out, out_stride, ml);
        return;
    }
    if (nq > ATT_MAX_HEADS) { /* in parts, as attention_heads */
        for (int h = 0; h < nq; h += ATT_MAX_HEADS)
            attention_heads_q(q + h * q_stride, nq - h < ATT_MAX_HEADS ? nq - h : ATT_MAX_HEADS, q_stride, k, v,
                              row_stride, bits, n_pos, head_dim, out + h * out_stride, out_stride,
                              ml ? ml + 2 * h : NULL);
        return;
    }
#define ATT_Q(NV)                                                                                                  \
    (bits == 8 ? attention_heads_nv(q, nq, q_stride, k, v, row_stride, n_pos, head_dim, out, out_stride, ml, NV, 8)    \
               : attention_heads_nv(q, nq, q_stride, k, v, row_stride, n_pos, head_dim, out, out_stride, ml, NV, 4))
    switch (head_dim / 16) {
    case 2: ATT_Q(2); break;
    case 4: ATT_Q(4); break;
    case 8: ATT_Q(8); break;
    default: ATT_Q(head_dim / 16);
    }
#undef ATT_Q
}

static void attention(const float *q, const float *k, const float *v, size_t stride, int n_pos, int head_dim,
                      float *out)
{
    attention_heads(q, 1, 0, k, v, stride, n_pos, head_dim, out, 0);
}

static void ffn_act(const float *g, const float *u, int n, int relu2, float *out)
{
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = lanes16(n - i);
        __m512 x = _mm512_maskz_loadu_ps(m, g + i), a;
        if (relu2) {
            __m512 r = _mm512_max_ps(x, zero); /* a NaN gives 0, as g > 0 ? g : 0 */
            a = _mm512_mul_ps(r, r);
        } else {
            a = _mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(zero, x))));
        }
        _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, u + i)));
    }
}

static void quantize_scaled(const float *x, const float *g, float r, float s, int n, int8_t *q, int32_t *qsum)
{
    const __m512 vr = _mm512_set1_ps(r), vs = _mm512_set1_ps(s);
    const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    __m512i vsum = _mm512_setzero_si512();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = lanes16(n - i);
        const __m512 y = _mm512_mul_ps(
            _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vr), _mm512_maskz_loadu_ps(m, g + i)), vs);
        /* rounded half to even, then clamped in float (max gives lo for a NaN), so
         * every value converts exactly */
        const __m512 v = _mm512_min_ps(
            _mm512_max_ps(_mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
        const __m512i vi = _mm512_cvtps_epi32(v);
        vsum = _mm512_mask_add_epi32(vsum, m, vsum, vi);
        _mm512_mask_cvtepi32_storeu_epi8(q + i, m, vi);
    }
    *qsum = _mm512_reduce_add_epi32(vsum);
}

static void to_f16(const float *x, int n, bn_fp16_t *out)
{
    const __m256i sign = _mm256_set1_epi16((short)0x8000), qnan = _mm256_set1_epi16(0x7e00);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = lanes16(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* the hardware keeps a NaN's payload; bn_f32_to_fp16 drops it */
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        h = _mm256_mask_blend_epi16(nan, h, _mm256_or_si256(_mm256_and_si256(h, sign), qnan));
        _mm256_mask_storeu_epi16(out + i, m, h);
    }
}

const bn_kernels_t bn_kernels_avx512 = {
    .name = "avx512",
    .quantize_act = quantize_act,
    .tgemm = tgemm,
    .head_quantize = head_quantize,
    .head_gemv = head_gemv,
    .rmsnorm = rmsnorm,
    .rope_neox = rope_neox,
    .attention = attention,
    .attention_heads_f16 = attention_heads_f16,
    .attention_heads_q = attention_heads_q,
    .attention_heads = attention_heads,
    .ffn_act = ffn_act,
    .quantize_scaled = quantize_scaled,
    .to_f16 = to_f16,
};
