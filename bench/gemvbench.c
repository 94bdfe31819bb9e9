/* gemvbench.c - the ternary decode GEMV alone, and the AVX2 formulations it was
 * chosen from (issue 14). bench/run.sh runs it; by hand:
 *
 *   bitnet-gemvbench [--kernels avx2] [--variants all|v0,shift1,...] [--passes 7] [--layers 30]
 *                    [--l2]
 *
 * What it measures: one decode token's ternary matrices of the 2B4T shape (per
 * layer q, k, v, o 2560 wide, gate and up 2560 -> 6912, down 6912 -> 2560; 30
 * layers, 521 MB at 2 bits a weight, so from memory), each as one single-token
 * product (the table's tgemm with nt = 1, or a candidate below), one thread.
 * Best and median GB/s over --passes passes, weight bytes read per second. With
 * --l2 the same product runs over one 256 KB matrix again and again: the
 * kernel's speed from cache, its compute bound.
 * Every candidate's outputs are checked bit for bit against the table's before
 * it is timed; a mismatch is an error (exit 1).
 *
 * The candidates (AVX2, kept so the choice can be measured again). "table" is
 * the chosen one, in kernels/x86/avx2.c (s1c2m when it was measured here): one
 * 16-bit shift, (w & 3, w & 12, w>>4 & 3, w>>4 & 12) are u3, 4*u2, u1, 4*u0; a
 * 4-row half of a group at a time, each row's class-1 and class-4 products summed
 * apart in int16 over 7 blocks, joined exactly (the class-4 sum shifted back by
 * 2) at the chunk's end: 1 + 4 + 4 + 4 adds = 13 ops. Ops are vector ALU ops
 * per 32 weight bytes (128 weights) of one row; loads not counted:
 *   v0       (the kernel before issue 14) 8-row group, 3 shifts + 4 ands to unpack the
 *            four 2-bit fields, 4 vpmaddubsw, 3 adds, vpmaddwd, add: 16 ops.
 *   acc16    v0 with a row's block sums kept in int16 over 15 blocks (no
 *            vpmaddwd per block): 3 + 4 + 4 + 4 adds = 15.
 *   shift1r  the table's unpacking, classes joined every block into one int32
 *            accumulator a row, 8 rows at once: 15.
 *   s1acc16r shift1r with int16 sums over 15 blocks: 14.
 *   s1c2f    the table with each half-group run over the whole row in turn: 13.
 *   lut      TL1-style lookup: weights re-laid as one 4-bit index 3*u_a + u_b per
 *            pair of activations for 32 rows side by side; per pair a 16-entry
 *            table of u_a*q_a + u_b*q_b (built per token) split into low and high
 *            bytes; vpshufb looks 32 rows up at once. Per 32 rows x 2 pairs: 3 ops
 *            to get the indices, 4 vpshufb, 4 unpacks to int16, 4 adds: 15 per
 *            row and 128 weights, 8 of them shuffles (2 ports on Zen). */
#include "kernels/kernels.h"

#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>

#define TGT __attribute__((target("avx2,fma")))

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ull;
static uint32_t next_u32(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}

/* ---- candidates ---- */

typedef void gemv_fn(const bn_tmat_t *w, const void *lay, const int8_t *q, float s, int32_t qsum, float *y);

TGT static inline int32_t hsum32(__m256i v)
{
    __m128i a = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
    a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
    return _mm_cvtsi128_si32(a);
}

#define QV(qb, g) _mm256_loadu_si256((const __m256i *)((qb) + 32 * (g)))

TGT static void v0(const bn_tmat_t *w, const void *lay, const int8_t *q, float s, int32_t qsum, float *y)
{
    const int nb = (int)(w->n_in / 128);
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    for (uint32_t r = 0; r < w->n_out; r += BN_TGROUP) {
        const uint8_t *g = bn_tmat_row(w, (int)r);
        __m256i acc[BN_TGROUP];
        for (int i = 0; i < BN_TGROUP; i++)
            acc[i] = _mm256_setzero_si256();
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = q + 128 * b;
            const __m256i q0 = QV(qb, 0), q1 = QV(qb, 1), q2 = QV(qb, 2), q3 = QV(qb, 3);
#pragma GCC unroll 8
            for (int i = 0; i < BN_TGROUP; i++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(g + BN_TBLOCK_STRIDE * b + 32 * i));
                __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), m3), u1 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m3),
                        u2 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), m3), u3 = _mm256_and_si256(wv, m3);
                __m256i s16 = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, q0), _mm256_maddubs_epi16(u1, q1)),
                                               _mm256_add_epi16(_mm256_maddubs_epi16(u2, q2), _mm256_maddubs_epi16(u3, q3)));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(s16, ones));
            }
        }
        for (int i = 0; i < BN_TGROUP && r + i < w->n_out; i++)
            y[r + i] = (float)(hsum32(acc[i]) - qsum) * w->scale / s;
    }
}

TGT static void acc16(const bn_tmat_t *w, const void *lay, const int8_t *q, float s, int32_t qsum, float *y)
{
    const int nb = (int)(w->n_in / 128);
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    for (uint32_t r = 0; r < w->n_out; r += BN_TGROUP) {
        const uint8_t *g = bn_tmat_row(w, (int)r);
        int32_t tot[BN_TGROUP] = { 0 };
        for (int b0 = 0; b0 < nb; b0 += 15) {
            const int b1 = nb - b0 < 15 ? nb : b0 + 15;
            __m256i a16[BN_TGROUP];
            for (int i = 0; i < BN_TGROUP; i++)
                a16[i] = _mm256_setzero_si256();
            for (int b = b0; b < b1; b++) {
                const int8_t *qb = q + 128 * b;
#pragma GCC unroll 8
                for (int i = 0; i < BN_TGROUP; i++) {
                    __m256i wv = _mm256_loadu_si256((const __m256i *)(g + BN_TBLOCK_STRIDE * b + 32 * i));
                    __m256i u0 = _mm256_and_si256(_mm256_srli_epi16(wv, 6), m3), u1 = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m3),
                            u2 = _mm256_and_si256(_mm256_srli_epi16(wv, 2), m3), u3 = _mm256_and_si256(wv, m3);
                    a16[i] = _mm256_add_epi16(a16[i], _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, QV(qb, 0)),
                                                                                        _mm256_maddubs_epi16(u1, QV(qb, 1))),
                                                                       _mm256_add_epi16(_mm256_maddubs_epi16(u2, QV(qb, 2)),
                                                                                        _mm256_maddubs_epi16(u3, QV(qb, 3)))));
                }
            }
            for (int i = 0; i < BN_TGROUP; i++)
                tot[i] += hsum32(_mm256_madd_epi16(a16[i], ones));
        }
        for (int i = 0; i < BN_TGROUP && r + i < w->n_out; i++)
            y[r + i] = (float)(tot[i] - qsum) * w->scale / s;
    }
}

/* lut: 32 rows side by side; pair k of a 32-row band is 16 bytes of nibbles (row
 * j's index in byte j % 16, low nibble for j < 16, high for j >= 16), and two
 * pairs share a 32-byte vector: bytes 0-15 pair 2m, 16-31 pair 2m+1. Split:
 * v & 15 is rows 0-15 of pair 2m in lane 0 and rows 0-15 of 2m+1 in lane 1;
 * v >> 4 & 15 is rows 16-31 of the same pairs. */
#define LUT_ROWS 32
typedef struct {
    uint8_t *idx;      /* bands of n_in/2 * 16 bytes */
    const uint8_t *tab; /* per pair 32 bytes: 16 low bytes, 16 high bytes, built once per
                           activation vector (outside the timing: flatters the lookup) */
} lut_t;

static int mat_u(const bn_tmat_t *w, int r, int i)
{
    const uint8_t *row = bn_tmat_row(w, r);
    return (row[BN_TBLOCK_STRIDE * (i >> 7) + (i & 31)] >> (6 - 2 * ((i >> 5) & 3))) & 3;
}

static void lut_pack(const bn_tmat_t *w, lut_t *L)
{
    const int np = (int)w->n_in / 2, bands = ((int)w->n_out + LUT_ROWS - 1) / LUT_ROWS;
    L->idx = calloc((size_t)bands * np * 16, 1);
    for (int bd = 0; bd < bands; bd++)
        for (int k = 0; k < np; k++)
            for (int j = 0; j < LUT_ROWS; j++) {
                const int r = bd * LUT_ROWS + j;
                if (r >= (int)w->n_out)
                    continue;
                const int c = 3 * mat_u(w, r, 2 * k) + mat_u(w, r, 2 * k + 1);
                uint8_t *p = L->idx + ((size_t)bd * np + (size_t)(k & ~1)) * 16 + 16 * (k & 1) + (j & 15);
                *p |= (uint8_t)(j < 16 ? c : c << 4);
            }
}

static void lut_tables(const int8_t *q, int n, uint8_t *tab)
{
    for (int k = 0; k < n / 2; k++) {
        for (int c = 0; c < 16; c++) {
            const int v = c < 9 ? (c / 3) * q[2 * k] + (c % 3) * q[2 * k + 1] : 0;
            tab[32 * k + c] = (uint8_t)(v & 255);
            tab[32 * k + 16 + c] = (uint8_t)((v >> 8) & 255);
        }
    }
}

/* int16 lanes of x widened and added to lo (lanes 0-3 and 8-11's rows) and hi */
TGT static inline void widen_add(__m256i x, __m256i *even, __m256i *odd)
{
    *even = _mm256_add_epi32(*even, _mm256_srai_epi32(_mm256_slli_epi32(x, 16), 16));
    *odd = _mm256_add_epi32(*odd, _mm256_srai_epi32(x, 16));
}

TGT static void lut(const bn_tmat_t *w, const void *lay, const int8_t *q, float s, int32_t qsum, float *y)
{
    const lut_t *L = lay;
    const int np = (int)w->n_in / 2, bands = ((int)w->n_out + LUT_ROWS - 1) / LUT_ROWS;
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int bd = 0; bd < bands; bd++) {
        const uint8_t *ix = L->idx + (size_t)bd * np * 16;
        /* a[0]: rows 0-15 (lo nibbles), a[1]: rows 16-31; each as unpacklo / unpackhi halves */
        __m256i e[4], o[4];
        for (int i = 0; i < 4; i++)
            e[i] = o[i] = _mm256_setzero_si256();
        for (int k0 = 0; k0 < np; k0 += 120) { /* a lane adds 60 entries: |sum| <= 60 * 512 */
            __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00;
            const int k1 = np - k0 < 120 ? np : k0 + 120;
            for (int k = k0; k < k1; k += 2) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(ix + (size_t)k * 16));
                const __m256i i0 = _mm256_and_si256(v, m15), i1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
                /* lane 0 of each table is pair k's, lane 1 pair k+1's */
                const __m256i tl = _mm256_setr_m128i(_mm_load_si128((const __m128i *)(L->tab + 32 * k)),
                                                     _mm_load_si128((const __m128i *)(L->tab + 32 * k + 32)));
                const __m256i th = _mm256_setr_m128i(_mm_load_si128((const __m128i *)(L->tab + 32 * k + 16)),
                                                     _mm_load_si128((const __m128i *)(L->tab + 32 * k + 48)));
                const __m256i l0 = _mm256_shuffle_epi8(tl, i0), h0 = _mm256_shuffle_epi8(th, i0);
                const __m256i l1 = _mm256_shuffle_epi8(tl, i1), h1 = _mm256_shuffle_epi8(th, i1);
                a00 = _mm256_add_epi16(a00, _mm256_unpacklo_epi8(l0, h0));
                a01 = _mm256_add_epi16(a01, _mm256_unpackhi_epi8(l0, h0));
                a10 = _mm256_add_epi16(a10, _mm256_unpacklo_epi8(l1, h1));
                a11 = _mm256_add_epi16(a11, _mm256_unpackhi_epi8(l1, h1));
            }
            widen_add(a00, &e[0], &o[0]);
            widen_add(a01, &e[1], &o[1]);
            widen_add(a10, &e[2], &o[2]);
            widen_add(a11, &e[3], &o[3]);
        }
        /* a0x: lane 0 = pair k (rows 0-15), lane 1 = pair k+1 (rows 0-15): add the lanes.
         * unpacklo holds bytes 0-7 of a lane (rows 0-7), unpackhi bytes 8-15; int16 lane
         * 2m is row 2m's (even), 2m+1 row 2m+1's (odd). */
        int32_t dot[LUT_ROWS];
        for (int h = 0; h < 2; h++)
            for (int half = 0; half < 2; half++) {
                int32_t ev[8], od[8];
                _mm256_storeu_si256((__m256i *)ev, e[2 * h + half]);
                _mm256_storeu_si256((__m256i *)od, o[2 * h + half]);
                for (int m = 0; m < 4; m++) {
                    dot[16 * h + 8 * half + 2 * m] = ev[m] + ev[4 + m];
                    dot[16 * h + 8 * half + 2 * m + 1] = od[m] + od[4 + m];
                }
            }
        for (int j = 0; j < LUT_ROWS && bd * LUT_ROWS + j < (int)w->n_out; j++)
            y[bd * LUT_ROWS + j] = (float)(dot[j] - qsum) * w->scale / s;
    }
}

static int pf_dist; /* BN_PF: bytes of software prefetch ahead (shift1r, s1acc16r, s1c2f) */

/* For s1c2f: the table's step (kernels/x86/avx2.c, s1c2m when measured here):
 * shift-once unpacking, a 4-row half of a group, the two scale classes apart in
 * int16 over chunks of 7 blocks (a class-4 lane gains <= 4096 a block). */
#define S1C2_CHUNK 7
#define ROW_STEPM(wp, a1, a4)                                                                          \
    do {                                                                                               \
        const __m256i wv_ = _mm256_loadu_si256((const __m256i *)(wp)), h_ = _mm256_srli_epi16(wv_, 4); \
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_and_si256(wv_, m03), QV(qb, 3)));       \
        a4 = _mm256_add_epi16(a4, _mm256_maddubs_epi16(_mm256_and_si256(wv_, m0c), QV(qb, 2)));       \
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_and_si256(h_, m03), QV(qb, 1)));        \
        a4 = _mm256_add_epi16(a4, _mm256_maddubs_epi16(_mm256_and_si256(h_, m0c), QV(qb, 0)));        \
    } while (0)

/* shift1r (the table from the morning of 2026-12-05 until s1c2m replaced it):
 * shift-once unpacking, the two classes joined every block (p1 + p4 >> 2) into
 * one int32 accumulator per row, 8 rows in named registers: 15 ops */
#define ROW_S1(wp, acc)                                                                                   \
    do {                                                                                                  \
        const __m256i wv_ = _mm256_loadu_si256((const __m256i *)(wp)), h_ = _mm256_srli_epi16(wv_, 4);    \
        const __m256i p1_ = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(wv_, m03), QV(qb, 3)), \
                                             _mm256_maddubs_epi16(_mm256_and_si256(h_, m03), QV(qb, 1))); \
        const __m256i p4_ = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(wv_, m0c), QV(qb, 2)), \
                                             _mm256_maddubs_epi16(_mm256_and_si256(h_, m0c), QV(qb, 0))); \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(p1_, _mm256_srai_epi16(p4_, 2)), ones)); \
    } while (0)

TGT static void shift1r(const bn_tmat_t *w, const void *lay, const int8_t *q, float s, int32_t qsum, float *y)
{
    const int nb = (int)(w->n_in / 128);
    const __m256i m03 = _mm256_set1_epi8(3), m0c = _mm256_set1_epi8(12), ones = _mm256_set1_epi16(1);
    for (uint32_t r = 0; r < w->n_out; r += BN_TGROUP) {
        const uint8_t *g = bn_tmat_row(w, (int)r);
        __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = q + 128 * b;
            const uint8_t *gb = g + BN_TBLOCK_STRIDE * b;
            if (pf_dist)
                for (int l = 0; l < 4; l++)
                    _mm_prefetch((const char *)gb + pf_dist + 64 * l, _MM_HINT_T0);
            ROW_S1(gb, c0);
            ROW_S1(gb + 32, c1);
            ROW_S1(gb + 64, c2);
            ROW_S1(gb + 96, c3);
            ROW_S1(gb + 128, c4);
            ROW_S1(gb + 160, c5);
            ROW_S1(gb + 192, c6);
            ROW_S1(gb + 224, c7);
        }
        const __m256i tot[BN_TGROUP] = { c0, c1, c2, c3, c4, c5, c6, c7 };
        for (int i = 0; i < BN_TGROUP && r + i < w->n_out; i++)
            y[r + i] = (float)(hsum32(tot[i]) - qsum) * w->scale / s;
    }
}

/* the table (s1c2m) with each half-group run over the whole row before the other half (the
 * second from L1/L2); software prefetch (BN_PF) in the first half's pass */
TGT static void s1c2f(const bn_tmat_t *w, const void *lay, const int8_t *q, float s, int32_t qsum, float *y)
{
    const int nb = (int)(w->n_in / 128);
    const __m256i m03 = _mm256_set1_epi8(3), m0c = _mm256_set1_epi8(12), ones = _mm256_set1_epi16(1);
    for (uint32_t r = 0; r < w->n_out; r += BN_TGROUP) {
        const uint8_t *g = bn_tmat_row(w, (int)r);
        __m256i tot[BN_TGROUP];
        for (int i = 0; i < BN_TGROUP; i++)
            tot[i] = _mm256_setzero_si256();
        for (int hf = 0; hf < 2; hf++)
            for (int b0 = 0; b0 < nb; b0 += S1C2_CHUNK) {
                const int b1 = nb - b0 < S1C2_CHUNK ? nb : b0 + S1C2_CHUNK;
                __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0, z0 = x0, z1 = x0, z2 = x0, z3 = x0;
                for (int b = b0; b < b1; b++) {
                    const int8_t *qb = q + 128 * b;
                    const uint8_t *gb = g + BN_TBLOCK_STRIDE * b + 128 * hf;
                    if (pf_dist && !hf) {
                        _mm_prefetch((const char *)gb + pf_dist, _MM_HINT_T0);
                        _mm_prefetch((const char *)gb + pf_dist + 64, _MM_HINT_T0);
                        _mm_prefetch((const char *)gb + pf_dist + 128, _MM_HINT_T0);
                        _mm_prefetch((const char *)gb + pf_dist + 192, _MM_HINT_T0);
                    }
                    ROW_STEPM(gb, x0, z0);
                    ROW_STEPM(gb + 32, x1, z1);
                    ROW_STEPM(gb + 64, x2, z2);
                    ROW_STEPM(gb + 96, x3, z3);
                }
                tot[4 * hf + 0] = _mm256_add_epi32(tot[4 * hf + 0], _mm256_madd_epi16(_mm256_add_epi16(x0, _mm256_srai_epi16(z0, 2)), ones));
                tot[4 * hf + 1] = _mm256_add_epi32(tot[4 * hf + 1], _mm256_madd_epi16(_mm256_add_epi16(x1, _mm256_srai_epi16(z1, 2)), ones));
                tot[4 * hf + 2] = _mm256_add_epi32(tot[4 * hf + 2], _mm256_madd_epi16(_mm256_add_epi16(x2, _mm256_srai_epi16(z2, 2)), ones));
                tot[4 * hf + 3] = _mm256_add_epi32(tot[4 * hf + 3], _mm256_madd_epi16(_mm256_add_epi16(x3, _mm256_srai_epi16(z3, 2)), ones));
            }
        for (int i = 0; i < BN_TGROUP && r + i < w->n_out; i++)
            y[r + i] = (float)(hsum32(tot[i]) - qsum) * w->scale / s;
    }
}

/* the table's shift-once kernel (kernels/x86/avx2.c) with each row's block sums
 * kept in int16 over 15 blocks: 14 ops a row-block */
#define ROW_S1A(wp, acc)                                                                                   \
    do {                                                                                                   \
        const __m256i wv_ = _mm256_loadu_si256((const __m256i *)(wp)), h_ = _mm256_srli_epi16(wv_, 4);     \
        const __m256i p1_ = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(wv_, m03), QV(qb, 3)),  \
                                             _mm256_maddubs_epi16(_mm256_and_si256(h_, m03), QV(qb, 1)));  \
        const __m256i p4_ = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(wv_, m0c), QV(qb, 2)),  \
                                             _mm256_maddubs_epi16(_mm256_and_si256(h_, m0c), QV(qb, 0)));  \
        acc = _mm256_add_epi16(acc, _mm256_add_epi16(p1_, _mm256_srai_epi16(p4_, 2)));                    \
    } while (0)

TGT static void s1acc16r(const bn_tmat_t *w, const void *lay, const int8_t *q, float s, int32_t qsum, float *y)
{
    const int nb = (int)(w->n_in / 128);
    const __m256i m03 = _mm256_set1_epi8(3), m0c = _mm256_set1_epi8(12), ones = _mm256_set1_epi16(1);
    for (uint32_t r = 0; r < w->n_out; r += BN_TGROUP) {
        const uint8_t *g = bn_tmat_row(w, (int)r);
        __m256i tot[BN_TGROUP];
        for (int i = 0; i < BN_TGROUP; i++)
            tot[i] = _mm256_setzero_si256();
        for (int b0 = 0; b0 < nb; b0 += 15) {
            const int b1 = nb - b0 < 15 ? nb : b0 + 15;
            __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
            for (int b = b0; b < b1; b++) {
                const int8_t *qb = q + 128 * b;
                const uint8_t *gb = g + BN_TBLOCK_STRIDE * b;
                if (pf_dist) {
                    _mm_prefetch((const char *)gb + pf_dist, _MM_HINT_T0);
                    _mm_prefetch((const char *)gb + pf_dist + 64, _MM_HINT_T0);
                    _mm_prefetch((const char *)gb + pf_dist + 128, _MM_HINT_T0);
                    _mm_prefetch((const char *)gb + pf_dist + 192, _MM_HINT_T0);
                }
                ROW_S1A(gb, c0);
                ROW_S1A(gb + 32, c1);
                ROW_S1A(gb + 64, c2);
                ROW_S1A(gb + 96, c3);
                ROW_S1A(gb + 128, c4);
                ROW_S1A(gb + 160, c5);
                ROW_S1A(gb + 192, c6);
                ROW_S1A(gb + 224, c7);
            }
            const __m256i c[8] = { c0, c1, c2, c3, c4, c5, c6, c7 };
            for (int i = 0; i < BN_TGROUP; i++)
                tot[i] = _mm256_add_epi32(tot[i], _mm256_madd_epi16(c[i], ones));
        }
        for (int i = 0; i < BN_TGROUP && r + i < w->n_out; i++)
            y[r + i] = (float)(hsum32(tot[i]) - qsum) * w->scale / s;
    }
}

static const struct {
    const char *name;
    gemv_fn *fn;
} variants[] = {
    { "v0", v0 }, { "acc16", acc16 }, { "shift1r", shift1r }, { "s1acc16r", s1acc16r }, { "s1c2f", s1c2f }, { "lut", lut },
};
#define N_VARIANTS (int)(sizeof variants / sizeof variants[0])

/* ---- driver ---- */

typedef struct {
    bn_tmat_t w;
    uint8_t *data;
    lut_t lut;
} mat_t;

/* The matrices one after another in 2 MB aligned chunks with transparent huge
 * pages asked before they are touched, as bitnet-worker keeps its weights
 * (worker/model.c): with 4 KB pages (an aligned_alloc'd block cannot take them)
 * the hardware prefetchers stop at every page and the GEMV measures otherwise. */
#define HUGE_PAGE ((size_t)2 << 20)
static uint8_t *arena_alloc(size_t bytes)
{
    static uint8_t *base;
    static size_t used, size;
    bytes = (bytes + 63) / 64 * 64;
    if (!base || size - used < bytes) {
        size_t want = ((bytes > ((size_t)64 << 20) ? bytes : ((size_t)64 << 20)) + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
        uint8_t *p = mmap(NULL, want + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return NULL;
        base = (uint8_t *)(((uintptr_t)p + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
        madvise(base, want, MADV_HUGEPAGE);
        used = 0;
        size = want;
    }
    used += bytes;
    return base + used - bytes;
}

static int mat_new(mat_t *m, uint32_t n_in, uint32_t n_out)
{
    m->w.n_in = n_in;
    m->w.n_out = n_out;
    m->w.row_bytes = n_in / 4;
    m->w.scale = 0.75f;
    m->w.bscale = NULL;
    const size_t bytes = bn_tmat_bytes(n_out, m->w.row_bytes);
    m->data = arena_alloc(bytes);
    if (!m->data)
        return -1;
    for (size_t i = 0; i < bytes; i++) { /* four codes in {0,1,2}: u of valid ternary weights */
        uint32_t x = next_u32();
        m->data[i] = (uint8_t)((x % 3) | (x / 3 % 3) << 2 | (x / 9 % 3) << 4 | (x / 27 % 3) << 6);
    }
    m->w.data = m->data;
    memset(&m->lut, 0, sizeof m->lut);
    return 0;
}

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    const char *kern = "avx2", *want = "all";
    int passes = 7, layers = 30, l2 = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--l2")) {
            l2 = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "usage: bitnet-gemvbench [--kernels avx2] [--variants all|v0,shift1,...] [--passes N] "
                            "[--layers N] [--l2]\n");
            return 2;
        }
        if (!strcmp(a, "--kernels")) kern = v;
        else if (!strcmp(a, "--variants")) want = v;
        else if (!strcmp(a, "--passes")) passes = atoi(v);
        else if (!strcmp(a, "--layers")) layers = atoi(v);
        else {
            fprintf(stderr, "bitnet-gemvbench: unknown option %s\n", a);
            return 2;
        }
        i++;
    }
    const bn_kernels_t *K = bn_kernels_by_name(kern);
    if (!K) {
        fprintf(stderr, "bitnet-gemvbench: kernels %s: unknown or not supported by this CPU\n", kern);
        return 2;
    }
    if (passes < 1 || passes > 100 || layers < 1 || layers > 200) {
        fprintf(stderr, "bitnet-gemvbench: --passes 1..100, --layers 1..200\n");
        return 2;
    }
    const int x86 = bn_kernels_by_name("avx2") != NULL;
    if (getenv("BN_PF"))
        pf_dist = atoi(getenv("BN_PF"));
    static const uint32_t shape[7][2] = { { 2560, 2560 }, { 2560, 640 }, { 2560, 640 }, { 2560, 2560 },
                                          { 2560, 6912 }, { 2560, 6912 }, { 6912, 2560 } };
    const int n_mats = l2 ? 1 : 7 * layers;
    mat_t *mats = calloc((size_t)n_mats, sizeof *mats);
    size_t bytes = 0;
    for (int i = 0; i < n_mats; i++) {
        if (l2 ? mat_new(&mats[i], 2560, 384) /* 240 KB */
               : mat_new(&mats[i], shape[i % 7][0], shape[i % 7][1])) {
            fprintf(stderr, "gemvbench: out of memory for the matrices\n");
            return 1;
        }
        bytes += (size_t)mats[i].w.n_out * mats[i].w.row_bytes;
    }
    const int reps = l2 ? 2000 : 1;
    int8_t *q[2];
    float s = 0.37f, *y = aligned_alloc(64, 6912 * sizeof(float)), *yt = aligned_alloc(64, 6912 * sizeof(float));
    int32_t qsum[2] = { 0, 0 };
    for (int k = 0; k < 2; k++) {
        q[k] = aligned_alloc(64, 6912);
        for (int i = 0; i < 6912; i++) {
            q[k][i] = (int8_t)(next_u32() % 255 - 127);
            if (i < (k ? 6912 : 2560))
                qsum[k] += q[k][i];
        }
    }
    uint8_t *tabs[2];
    for (int k = 0; k < 2; k++) {
        tabs[k] = aligned_alloc(32, 6912 / 2 * 32);
        lut_tables(q[k], k ? 6912 : 2560, tabs[k]);
    }
    printf("gemvbench: %s, %s, %.0f MB of ternary weights a pass%s, 1 thread, %d passes\n", kern,
           l2 ? "one 2560 x 384 matrix from cache" : "2B4T shape", (double)bytes * reps / 1e6,
           l2 ? " (2000 times the matrix)" : "", passes);
    for (int v = -1; v < (x86 ? N_VARIANTS : 0); v++) {
        const char *name = v < 0 ? "table" : variants[v].name;
        if (v >= 0 && strcmp(want, "all") && !strstr(want, name))
            continue;
        /* check against the table, bit for bit */
        for (int i = 0; i < n_mats && v >= 0; i++) {
            mat_t *m = &mats[i];
            if (variants[v].fn == lut && !m->lut.idx)
                for (int j = 0; j < n_mats; j++) {
                    lut_pack(&mats[j].w, &mats[j].lut);
                    mats[j].lut.tab = tabs[mats[j].w.n_in == 6912];
                }
            const int k = m->w.n_in == 6912;
            K->tgemm(&m->w, q[k], &s, &qsum[k], 1, yt, 0, 0, (int)m->w.n_out);
            variants[v].fn(&m->w, &m->lut, q[k], s, qsum[k], y);
            if (memcmp(y, yt, m->w.n_out * sizeof *y)) {
                fprintf(stderr, "bitnet-gemvbench: %s differs from the %s table on matrix %d\n", name, kern, i);
                return 1;
            }
            if (l2 || i >= 6)
                break; /* one of each shape is enough */
        }
        double t[100];
        for (int p = 0; p < passes; p++) {
            const double t0 = now_s();
            for (int rep = 0; rep < reps; rep++)
                for (int i = 0; i < n_mats; i++) {
                    const mat_t *m = &mats[i];
                    const int k = m->w.n_in == 6912;
                    if (v < 0)
                        K->tgemm(&m->w, q[k], &s, &qsum[k], 1, y, 0, 0, (int)m->w.n_out);
                    else
                        variants[v].fn(&m->w, &m->lut, q[k], s, qsum[k], y);
                }
            t[p] = now_s() - t0;
        }
        qsort(t, (size_t)passes, sizeof t[0], cmp_d);
        printf("gemv: kernels=%s variant=%s best_gbps=%.2f median_gbps=%.2f ms=%.2f\n", kern, name,
               (double)bytes * reps / t[0] / 1e9, (double)bytes * reps / t[passes / 2] / 1e9, t[0] * 1e3);
    }
    return 0;
}
