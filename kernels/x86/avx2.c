/* avx2.c - the AVX2 kernel table (with FMA and F16C, as on every x86-64 node of
 * the last decade: Haswell, Zen 1-3).
 *
 * What it is: the kernels of kernels.h with 256-bit vectors, compiled with only
 * -mavx2 -mfma -mf16c; dispatch.c calls them only when CPUID says so.
 * Invariants: BitLinear integer results equal the reference exactly. The ternary
 * products use vpmaddubsw (u8 weights in {0,1,2} times s8 activations, pairs summed
 * in int16: |pair| <= 2 * 2 * 128 = 512) and add the four groups of a 128-weight
 * block in int16 (<= 2048) before widening to int32 with vpmaddwd: no int16 sum can
 * wrap, whatever the row length. The float epilogue is the reference's expression. */
#include "kernels/kernels.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

/* ---- helpers ---- */

static inline float hsum_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float hmax_ps(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* e^x for x <= 88.7 within a few float ulps (the AVX-512 file's polynomial):
 * 2^n * e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, 2^n built from its
 * exponent bits as 2^(n-1) * 2. x is clamped to [-87.3, 88.7], so n stays in
 * [-126, 128]: e^x below about 1e-38 comes out as 0 or as that, never as a
 * wrapped exponent. */
static inline __m256 exp256(__m256 x)
{
    x = _mm256_min_ps(_mm256_set1_ps(88.7f), _mm256_max_ps(_mm256_set1_ps(-87.3f), x));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
}

/* 32 floats -> 32 int8 in order, each already rounded and within [-128, 127] */
static inline __m256i pack32(__m256 a, __m256 b, __m256 c, __m256 d, __m256i *sum)
{
    __m256i ia = _mm256_cvtps_epi32(a), ib = _mm256_cvtps_epi32(b);
    __m256i ic = _mm256_cvtps_epi32(c), id = _mm256_cvtps_epi32(d);
    *sum = _mm256_add_epi32(*sum, _mm256_add_epi32(_mm256_add_epi32(ia, ib), _mm256_add_epi32(ic, id)));
    __m256i ab = _mm256_packs_epi32(ia, ib), cd = _mm256_packs_epi32(ic, id);
    __m256i abcd = _mm256_packs_epi16(ab, cd);
    /* packs work per 128-bit lane: dwords come out as a0 b0 c0 d0 a1 b1 c1 d1 */
    return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* ---- BitLinear ---- */

static void quantize_act(const float *x, int n, int8_t *q, float *s, int32_t *qsum)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8)
        vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
    float amax = hmax_ps(vmax);
    for (; i < n; i++)
        amax = fmaxf(amax, fabsf(x[i]));
    const float sc = 127.0f / fmaxf(amax, 1e-5f);
    const __m256 vs = _mm256_set1_ps(sc), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    __m256i vsum = _mm256_setzero_si256();
    i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 v[4];
        for (int k = 0; k < 4; k++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v[k] = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        }
        _mm256_storeu_si256((__m256i *)(q + i), pack32(v[0], v[1], v[2], v[3], &vsum));
    }
    int32_t sum = hsum_epi32(vsum);
    for (; i < n; i++) {
        float v = fminf(fmaxf(nearbyintf(x[i] * sc), -128.0f), 127.0f);
        q[i] = (int8_t)v;
        sum += q[i];
    }
    *s = sc;
    *qsum = sum;
}

/* The four u-vectors of a 32-byte chunk: group g (weights 32g..32g+31 of the block)
 * sits in bits 6-2g..7-2g of every byte. */
#define UNPACK(w, m3, u0, u1, u2, u3)                          \
    do {                                                       \
        u0 = _mm256_and_si256(_mm256_srli_epi16(w, 6), m3);    \
        u1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m3);    \
        u2 = _mm256_and_si256(_mm256_srli_epi16(w, 2), m3);    \
        u3 = _mm256_and_si256(w, m3);                          \
    } while (0)

/* One row's block in the group (wp) against the block's activations (qb),
 * unpacked with one shift: w & 3, w & 12, (w >> 4) & 3, (w >> 4) & 12 are u3,
 * 4*u2, u1, 4*u0; the two 4x products are summed and shifted back (exact: a
 * multiple of 4, |sum| <= 4096). 15 vector ALU ops per 32 weight bytes against
 * 16 with four shifts (bench/gemvbench.c measured the candidates). */
#define GEMV_ROW_BLOCK(wp, acc)                                                                             \
    do {                                                                                                    \
        const __m256i wv_ = _mm256_loadu_si256((const __m256i *)(wp)), h_ = _mm256_srli_epi16(wv_, 4);      \
        const __m256i p1_ = _mm256_add_epi16(                                                               \
            _mm256_maddubs_epi16(_mm256_and_si256(wv_, m03), _mm256_loadu_si256((const __m256i *)(qb + 96))), \
            _mm256_maddubs_epi16(_mm256_and_si256(h_, m03), _mm256_loadu_si256((const __m256i *)(qb + 32)))); \
        const __m256i p4_ = _mm256_add_epi16(                                                               \
            _mm256_maddubs_epi16(_mm256_and_si256(wv_, m0c), _mm256_loadu_si256((const __m256i *)(qb + 64))), \
            _mm256_maddubs_epi16(_mm256_and_si256(h_, m0c), _mm256_loadu_si256((const __m256i *)qb)));     \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(p1_, _mm256_srai_epi16(p4_, 2)), ones)); \
    } while (0)

/* Decode: a row group (kernels.h) at a time: one sequential stream, each
 * activation vector loaded once for the group's eight rows (gemv_group). Rows outside
 * whole groups (a thread's range not on a group boundary) go one at a time. */
static void gemv_row(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r)
{
    const int nb = (int)(w->n_in / 128);
    const __m256i m03 = _mm256_set1_epi8(3), m0c = _mm256_set1_epi8(12), ones = _mm256_set1_epi16(1);
    const uint8_t *row = bn_tmat_row(w, r);
    __m256i acc = _mm256_setzero_si256();
    for (int b = 0; b < nb; b++) {
        const int8_t *qb = q + 128 * b;
        GEMV_ROW_BLOCK(row + BN_TBLOCK_STRIDE * b, acc);
    }
    y[r] = (float)(hsum_epi32(acc) - qsum) * w->scale / s;
}

/* One row's block in a half-group (wp) with the two scale classes kept apart:
 * a1 gathers the class-1 products (u3, u1), a4 the class-4 ones (4*u2, 4*u0),
 * both in int16: 13 vector ALU ops per 32 weight bytes. */
#define GEMV_HALF_BLOCK(wp, a1, a4)                                                                    \
    do {                                                                                               \
        const __m256i wv_ = _mm256_loadu_si256((const __m256i *)(wp)), h_ = _mm256_srli_epi16(wv_, 4); \
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_and_si256(wv_, m03),                    \
                                                       _mm256_loadu_si256((const __m256i *)(qb + 96)))); \
        a4 = _mm256_add_epi16(a4, _mm256_maddubs_epi16(_mm256_and_si256(wv_, m0c),                    \
                                                       _mm256_loadu_si256((const __m256i *)(qb + 64)))); \
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_and_si256(h_, m03),                     \
                                                       _mm256_loadu_si256((const __m256i *)(qb + 32)))); \
        a4 = _mm256_add_epi16(a4, _mm256_maddubs_epi16(_mm256_and_si256(h_, m0c),                     \
                                                       _mm256_loadu_si256((const __m256i *)qb)));       \
    } while (0)

/* a class-4 int16 lane gains at most 2 * 2 * 8 * 128 = 4096 a block: 7 blocks fit */
#define GEMV_CHUNK 7

/* rows r .. r+7 of one group; only the first n (<= 8) are stored. Chunk by
 * chunk of 7 blocks (1792 bytes of the group), the group's first 4 rows and then
 * its last 4 (from L1) with each row's two classes in int16 (8 named registers:
 * arrays of them, or activations held in registers, stayed on the stack), joined
 * exactly (a4 is a multiple of 4) into int32 at the chunk's end. From memory this
 * beat the one-accumulator form (15 ops a row-block) by 4-5% and the kernel
 * before issue 14 (16 ops) by 10%, 1 thread on the Zen 4 host; no software
 * prefetch: on the weights' 2 MB pages the hardware prefetchers keep the stream
 * going, and one 8 KB ahead cost 5-7% (it helped only a bench that had put its
 * matrices on 4 KB pages). bench/gemvbench.c, bench/RESULTS.md, issue 14. */
static void gemv_group(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r, int n)
{
    const int nb = (int)(w->n_in / 128);
    const __m256i m03 = _mm256_set1_epi8(3), m0c = _mm256_set1_epi8(12), ones = _mm256_set1_epi16(1);
    const uint8_t *g = bn_tmat_row(w, r);
    __m256i tot[BN_TGROUP];
    for (int i = 0; i < BN_TGROUP; i++)
        tot[i] = _mm256_setzero_si256();
    for (int b0 = 0; b0 < nb; b0 += GEMV_CHUNK) {
        const int b1 = nb - b0 < GEMV_CHUNK ? nb : b0 + GEMV_CHUNK;
        for (int hf = 0; hf < 2; hf++) {
            __m256i x0 = _mm256_setzero_si256(), x1 = x0, x2 = x0, x3 = x0, z0 = x0, z1 = x0, z2 = x0, z3 = x0;
            for (int b = b0; b < b1; b++) {
                const int8_t *qb = q + 128 * b;
                const uint8_t *gb = g + BN_TBLOCK_STRIDE * b + 128 * hf;
                GEMV_HALF_BLOCK(gb, x0, z0);
                GEMV_HALF_BLOCK(gb + 32, x1, z1);
                GEMV_HALF_BLOCK(gb + 64, x2, z2);
                GEMV_HALF_BLOCK(gb + 96, x3, z3);
            }
            __m256i *t = tot + 4 * hf;
            t[0] = _mm256_add_epi32(t[0], _mm256_madd_epi16(_mm256_add_epi16(x0, _mm256_srai_epi16(z0, 2)), ones));
            t[1] = _mm256_add_epi32(t[1], _mm256_madd_epi16(_mm256_add_epi16(x1, _mm256_srai_epi16(z1, 2)), ones));
            t[2] = _mm256_add_epi32(t[2], _mm256_madd_epi16(_mm256_add_epi16(x2, _mm256_srai_epi16(z2, 2)), ones));
            t[3] = _mm256_add_epi32(t[3], _mm256_madd_epi16(_mm256_add_epi16(x3, _mm256_srai_epi16(z3, 2)), ones));
        }
    }
    for (int i = 0; i < n; i++)
        y[r + i] = (float)(hsum_epi32(tot[i]) - qsum) * w->scale / s;
}

static void gemv_rows(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r0, int r1)
{
    bn_gemv_by_groups(gemv_row, gemv_group, w, q, s, qsum, y, r0, r1);
}

/* Prefill / batches: each 32-byte weight chunk is unpacked once and used for a
 * tile of 4 tokens. The tile's token count is a compile-time constant,
 * so its accumulators stay in registers; with a run-time count they lived in
 * memory, a store and a load per block and token. (Tiles of 8 with a run-time
 * count were the best of 1-4 rows x 2-8 tokens on row-major rows; on row groups
 * they ran 8% slower, and tiles of 8 in registers spill: 16 ymm registers.
 * Tiles of 5, 6 and 8 tokens ran 1-7% slower in 2B4T's 128-token prefill, and
 * the decode GEMV's one-shift unpacking, its two scale classes summed apart per
 * token, 3-8% slower: the unpacking a tile shares is a quarter of a token's
 * cost, and the classes' 8 more registers spill. Issue 14, bench/RESULTS.md.) */
#define TILE_T 4
static inline __attribute__((always_inline)) void tile_row(const bn_tmat_t *w, const int8_t *q0, int n, int tn,
                                                           const float *s, const int32_t *qsum, float *y, size_t ldy,
                                                           int r)
{
    const int nb = n / 128;
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    const uint8_t *row = bn_tmat_row(w, r);
    __m256i acc[TILE_T];
#pragma GCC unroll 8
    for (int t = 0; t < TILE_T; t++)
        acc[t] = _mm256_setzero_si256();
    for (int b0 = 0; b0 < nb; b0 += 15) { /* 15 blocks' sums fit an int16 lane (2048 each) */
        const int b1 = nb - b0 < 15 ? nb : b0 + 15;
        __m256i s16[TILE_T];
#pragma GCC unroll 8
        for (int t = 0; t < TILE_T; t++)
            s16[t] = _mm256_setzero_si256();
        for (int b = b0; b < b1; b++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(row + BN_TBLOCK_STRIDE * b)), u0, u1, u2, u3;
            UNPACK(wv, m3, u0, u1, u2, u3);
#pragma GCC unroll 8
            for (int t = 0; t < tn; t++) {
                const int8_t *qb = q0 + (size_t)t * n + 128 * b;
                s16[t] = _mm256_add_epi16(
                    s16[t], _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, _mm256_loadu_si256((const __m256i *)qb)),
                                                              _mm256_maddubs_epi16(u1, _mm256_loadu_si256((const __m256i *)(qb + 32)))),
                                             _mm256_add_epi16(_mm256_maddubs_epi16(u2, _mm256_loadu_si256((const __m256i *)(qb + 64))),
                                                              _mm256_maddubs_epi16(u3, _mm256_loadu_si256((const __m256i *)(qb + 96))))));
            }
        }
#pragma GCC unroll 8
        for (int t = 0; t < tn; t++)
            acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(s16[t], ones));
    }
#pragma GCC unroll 8
    for (int t = 0; t < tn; t++)
        y[(size_t)t * ldy + r] = (float)(hsum_epi32(acc[t]) - qsum[t]) * w->scale / s[t];
}

/* Rows in chunks of CHUNK_ROWS, every token over a chunk before the next, so a
 * chunk's weights come from memory once. Tokens go in tiles of TILE_T, each
 * weight chunk unpacked once for the tile; the first tile over a chunk asks for
 * the next chunk into L2, a group at a time (a tile reads a group a row at a
 * time, which from memory stalls). The tokens left over (fewer than a tile) each
 * run the decode GEMV over the chunk, from cache: with AVX2's maddubs the
 * unpacking a tile shares is little of the work, and a part tile was slower.
 * Zen 4, 6912 x 2560 matrices, 296 MB from memory, ms for the whole batch: 2
 * tokens 48 -> 28, 3 47 -> 40, 4 55 -> 49, 8 102 -> 84, 16 175 -> 148. */
#define CHUNK_ROWS 64
static void tgemm(const bn_tmat_t *w, const int8_t *q, const float *s, const int32_t *qsum, int nt,
                  float *y, size_t ldy, int r0, int r1)
{
    if (nt == 1) {
        gemv_rows(w, q, s[0], qsum[0], y, r0, r1);
        return;
    }
    const int n = (int)w->n_in, full = nt / TILE_T * TILE_T;
    for (int rc = r0; rc < r1; rc += CHUNK_ROWS) {
        const int re = r1 - rc < CHUNK_ROWS ? r1 : rc + CHUNK_ROWS;
        for (int t0 = 0; t0 < full; t0 += TILE_T)
            for (int r = rc; r < re; r++) {
                if (t0 == 0 && r % BN_TGROUP == 0 && r + CHUNK_ROWS < r1) {
                    const char *g = (const char *)bn_tmat_row(w, r + CHUNK_ROWS);
                    for (size_t o = 0; o < BN_TGROUP * w->row_bytes; o += 64)
                        _mm_prefetch(g + o, _MM_HINT_T1);
                }
                tile_row(w, q + (size_t)t0 * n, n, TILE_T, s + t0, qsum + t0, y + (size_t)t0 * ldy, ldy, r);
            }
        for (int t = full; t < nt; t++)
            gemv_rows(w, q + (size_t)t * n, s[t], qsum[t], y + (size_t)t * ldy, rc, re);
    }
}

/* ---- LM head ---- */

static void head_quantize(const float *x, int n, int8_t *q, float *d)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256i unused = _mm256_setzero_si256();
    for (int b = 0; b < n / 32; b++) {
        const float *xb = x + 32 * b;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        float amax = hmax_ps(m);
        d[b] = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        _mm256_storeu_si256((__m256i *)(q + 32 * b),
                            pack32(_mm256_round_ps(_mm256_mul_ps(v0, id), rnd), _mm256_round_ps(_mm256_mul_ps(v1, id), rnd),
                                   _mm256_round_ps(_mm256_mul_ps(v2, id), rnd), _mm256_round_ps(_mm256_mul_ps(v3, id), rnd),
                                   &unused));
    }
}

/* s8 weights (32) . s8 activations (32) as 8 int32 lanes; both within [-127, 127]
 * so the sign trick (|w| times sign(w)*x) fits vpmaddubsw's int16 pairs */
static inline __m256i dot_s8(__m256i wq, __m256i xq, __m256i ones)
{
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq), _mm256_sign_epi8(xq, wq));
    return _mm256_madd_epi16(p, ones);
}

#define HEAD_MAX_IN 16384 /* the q6 path's rearranged activations live on the stack */

/* The activations as the q6 path reads them: for blocks 2i and 2i+1, lo[i] holds
 * values 0-15 of each (one block per 128-bit lane) and hi[i] values 16-31, the
 * lanes of the codes' low and high nibbles; start[b] = -32 * sum(x of block b)
 * in lane 0 of a block's (pair[i]: lane 0 and lane 4 of a pair's) int32 sums. */
typedef struct {
    __m256i lo[HEAD_MAX_IN / 64], hi[HEAD_MAX_IN / 64], pair[HEAD_MAX_IN / 64], start[HEAD_MAX_IN / 32];
} q6_act_t;

/* blocks k and k+1 of a q6 unit of cnt blocks at p (pair i of the row), scales s4.
 * Each high-bit pair goes to bits 4-5 with one variable shift (left or right) and
 * an and; with whole units called with k constant (no index vectors built at run
 * time), 2B4T's 267 MB q6 head at 1 thread went 13.2 -> 10.9 ms a token on the
 * Zen 4 host (20 -> 24.5 GB/s; bench/RESULTS.md, issue 14). */
static inline __attribute__((always_inline)) void q6_pair(const uint8_t *p, int cnt, int k, int i, __m256 s4,
                                                           const q6_act_t *qa, __m256 *acc)
{
    const __m256i ones = _mm256_set1_epi16(1), m15 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30);
    const __m256i v = _mm256_loadu_si256((const __m256i *)bn_hunit_qs(p, k));
    /* qh of block k in qwords 0-1, of block k+1 in qwords 2-3; byte j of a qh
     * holds values j, 8+j, 16+j, 24+j in bit pairs 0-1, 2-3, 4-5, 6-7, each moved
     * to bits 4-5 by one variable shift a qword */
    const __m256i h = _mm256_permute4x64_epi64(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)bn_hunit_qh(p, cnt, k))), 0x50);
    const __m256i hl = _mm256_and_si256(_mm256_sllv_epi64(h, _mm256_setr_epi64x(4, 2, 4, 2)), m30);
    const __m256i hh = _mm256_and_si256(_mm256_srlv_epi64(h, _mm256_setr_epi64x(0, 2, 0, 2)), m30);
    const __m256i ul = _mm256_or_si256(_mm256_and_si256(v, m15), hl);
    const __m256i uh = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m15), hh);
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(ul, qa->lo[i]), _mm256_maddubs_epi16(uh, qa->hi[i]));
    const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(s16, ones), qa->pair[i]);
    const __m256 sc = _mm256_permutevar8x32_ps(s4, _mm256_setr_epi32(k, k, k, k, k + 1, k + 1, k + 1, k + 1));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, *acc);
}

/* Q6 blocks b0 .. b0+cnt-1 (cnt <= 4) of a row, the unit at p, two blocks at a
 * time: one 32-byte load of their nibbles, their 16 bytes of high bits widened
 * by a qword permute and two variable shifts; the codes 0..63 as stored
 * (maddubs takes them unsigned: |pair| <= 2 * 63 * 127, two of them fit int16),
 * the -32 offset added back through start. The unit's scales d_w * d_a are one
 * vector, each block's spread by a lane permute. (One block at a time with
 * signed codes through two vpsignb and a scalar scale per block ran at 48% of
 * the read bandwidth, 2B4T's 267 MB q6 head.) */
static inline __attribute__((always_inline)) void q6_unit(const uint8_t *p, int b0, int cnt, const bn_hact_t *a,
                                                           const q6_act_t *qa, __m256 *acc)
{
    const __m256i ones = _mm256_set1_epi16(1), m3 = _mm256_set1_epi8(3);
    __m128i dh = _mm_setzero_si128();
    __m128 da = _mm_setzero_ps();
    memcpy(&dh, p + 24 * cnt, 2 * (size_t)cnt);
    memcpy(&da, a->d + b0, sizeof(float) * (size_t)cnt);
    const __m256 s4 = _mm256_castps128_ps256(_mm_mul_ps(_mm_cvtph_ps(dh), da));
    if (cnt == 4) { /* a whole unit: k constant, so are the scale permutes' indices */
        q6_pair(p, 4, 0, b0 / 2, s4, qa, acc);
        q6_pair(p, 4, 2, b0 / 2 + 1, s4, qa, acc);
        return;
    }
    int k = 0;
    for (; k + 2 <= cnt; k += 2)
        q6_pair(p, cnt, k, (b0 + k) / 2, s4, qa, acc);
    if (k < cnt) { /* an odd last block of a short unit, on its own */
        const int b = b0 + k;
        const __m128i l = _mm_loadu_si128((const __m128i *)bn_hunit_qs(p, k)), l15 = _mm_set1_epi8(15);
        const __m256i lo = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(l, 4), l15), _mm_and_si128(l, l15));
        int64_t qh;
        memcpy(&qh, bn_hunit_qh(p, cnt, k), 8);
        const __m256i hi = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(qh), _mm256_setr_epi64x(0, 2, 4, 6)), m3);
        const __m256i u = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        const __m256i dot = _mm256_add_epi32(
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(a->q + 32 * b))), ones),
            qa->start[b]);
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_permutevar8x32_ps(s4, _mm256_set1_epi32(k)), *acc);
    }
}

/* acc (acc1 for F16's odd halves) += blocks b0 .. b0+cnt-1 of a row: the unit at p */
static inline __attribute__((always_inline)) void head_unit(const bn_head_type_t type, const uint8_t *p, int b0,
                                                             int cnt, const bn_hact_t *a, const q6_act_t *qa,
                                                             __m256 *acc, __m256 *acc1)
{
    const __m256i ones = _mm256_set1_epi16(1);
    if (type == BN_HEAD_Q6) {
        q6_unit(p, b0, cnt, a, qa, acc);
        return;
    }
    if (type == BN_HEAD_F16) {
        const bn_fp16_t *e = (const bn_fp16_t *)(const void *)p;
        const float *x = a->x + 32 * b0;
        for (int i = 0; i < 32 * cnt; i += 16) {
            *acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(e + i))), _mm256_loadu_ps(x + i), *acc);
            *acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(e + i + 8))), _mm256_loadu_ps(x + i + 8),
                                    *acc1);
        }
        return;
    }
    for (int b = b0; b < b0 + cnt; b++) {
        const int k = b - b0; /* block k of the unit's cnt (kernels.h) */
        __m256i wq, xq = _mm256_loadu_si256((const __m256i *)(a->q + 32 * b));
        float dw;
        if (type == BN_HEAD_Q8) {
            const bn_block_q8_0 *blk = (const bn_block_q8_0 *)(const void *)(p + (size_t)k * sizeof(bn_block_q8_0));
            wq = _mm256_loadu_si256((const __m256i *)blk->qs);
            dw = _cvtsh_ss(blk->d);
        } else { /* BN_HEAD_Q4 */
            __m128i v = _mm_loadu_si128((const __m128i *)bn_hunit_qs(p, k)), m15 = _mm_set1_epi8(15);
            wq = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m15), _mm_and_si128(v, m15));
            wq = _mm256_sub_epi8(wq, _mm256_set1_epi8(8));
            dw = _cvtsh_ss(bn_hunit_d(p, type, cnt, k));
        }
        /* Q4 (-8..7) stays inside [-127, 127] as dot_s8 needs */
        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_s8(wq, xq, ones)), _mm256_set1_ps(dw * a->d[b]), *acc);
    }
}

/* rows r .. r+R-1 (R = 1, or BN_HGROUP from a group's first row) side by side,
 * unit by unit: a group is read in memory order (kernels.h) */
static inline __attribute__((always_inline)) void head_rows(const bn_hmat_t *h, const bn_hact_t *a, float *logits,
                                                            int r, const int R, const bn_head_type_t type,
                                                            const q6_act_t *qa)
{
    const int nb = (int)h->n_in / 32, ub = bn_head_unit_blocks(type, h->n_in);
    const size_t step = BN_HGROUP * (size_t)ub * bn_head_block_bytes(type); /* whole units lie this far apart */
    __m256 acc[BN_HGROUP][2];
    const uint8_t *p[BN_HGROUP];
#pragma GCC unroll 4
    for (int i = 0; i < R; i++) {
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        p[i] = bn_hmat_unit(h, r + i, 0);
    }
    int u = 0;
    if (type == BN_HEAD_F16 && R == BN_HGROUP) { /* units of one block: the group's rows' blocks side by side */
        for (; u < nb; u++) {
            const float *x = a->x + 32 * u;
            const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8), x2 = _mm256_loadu_ps(x + 16),
                         x3 = _mm256_loadu_ps(x + 24);
            const bn_fp16_t *e = (const bn_fp16_t *)(const void *)(p[0] + (size_t)u * step);
#pragma GCC unroll 4
            for (int i = 0; i < BN_HGROUP; i++, e += 32) {
                acc[i][0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)e)), x0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(e + 8))), x1, acc[i][1]);
                acc[i][0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(e + 16))), x2, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(e + 24))), x3, acc[i][1]);
            }
        }
    }
    for (; (u + 1) * ub <= nb; u++)
#pragma GCC unroll 4
        for (int i = 0; i < R; i++) {
            head_unit(type, p[i], u * ub, ub, a, qa, &acc[i][0], &acc[i][1]);
            p[i] += step;
        }
    if (u * ub < nb) /* the rows' short last unit */
#pragma GCC unroll 4
        for (int i = 0; i < R; i++)
            head_unit(type, bn_hmat_unit(h, r + i, u), u * ub, nb - u * ub, a, qa, &acc[i][0], &acc[i][1]);
#pragma GCC unroll 4
    for (int i = 0; i < R; i++)
        logits[r + i] = hsum_ps(_mm256_add_ps(acc[i][0], acc[i][1]));
}

static inline __attribute__((always_inline)) void head_rows_of(const bn_hmat_t *h, const bn_hact_t *a, float *logits,
                                                               int r0, int r1, const bn_head_type_t type,
                                                               const q6_act_t *qa)
{
#define HEAD_ROWS(r, R) head_rows(h, a, logits, r, R, type, qa)
    BN_HEAD_BY_GROUPS(r0, r1, HEAD_ROWS);
#undef HEAD_ROWS
}


static void head_gemv(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1)
{
    switch (h->type) { /* each type's loops compiled on their own (a type test per block cost 8%) */
    case BN_HEAD_F16: head_rows_of(h, a, logits, r0, r1, BN_HEAD_F16, NULL); break;
    case BN_HEAD_Q8: head_rows_of(h, a, logits, r0, r1, BN_HEAD_Q8, NULL); break;
    case BN_HEAD_Q6: {
        if (h->n_in > HEAD_MAX_IN) {
            bn_ref_head_gemv(h, a, logits, r0, r1);
            return;
        }
        static _Thread_local q6_act_t qa; /* 48 KB: off the stack */
        const int nb = (int)h->n_in / 32;
        for (int b = 0; b < nb; b++) { /* (once per call: job_head calls per chunk of rows) */
            const __m256i s = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i *)(a->q + 32 * b))),
                _mm256_set1_epi16(1));
            qa.start[b] = _mm256_setr_epi32(-32 * hsum_epi32(s), 0, 0, 0, 0, 0, 0, 0);
        }
        for (int i = 0; 2 * i + 1 < nb; i++) {
            const int8_t *x0 = a->q + 64 * i, *x1 = x0 + 32;
            qa.lo[i] = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)x1), _mm_loadu_si128((const __m128i *)x0));
            qa.hi[i] = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(x1 + 16)), _mm_loadu_si128((const __m128i *)(x0 + 16)));
            qa.pair[i] = _mm256_setr_epi32(_mm256_extract_epi32(qa.start[2 * i], 0), 0, 0, 0,
                                           _mm256_extract_epi32(qa.start[2 * i + 1], 0), 0, 0, 0);
        }
        head_rows_of(h, a, logits, r0, r1, BN_HEAD_Q6, &qa);
        break;
    }
    case BN_HEAD_Q4: head_rows_of(h, a, logits, r0, r1, BN_HEAD_Q4, NULL); break;
    }
}

/* ---- float ops ---- */

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    float ss = hsum_ps(_mm256_add_ps(a0, a1));
    for (; i < n; i++)
        ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    const __m256 vr = _mm256_set1_ps(r);
    i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vr), _mm256_loadu_ps(w + i)));
    for (; i < n; i++)
        out[i] = x[i] * r * w[i];
}

static void rope_neox(float *x, int n_heads, int head_dim, int rope_dim, const float *cs)
{
    const int half = rope_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        int i = 0;
        for (; i + 8 <= half; i += 8) {
            __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + i + half);
            __m256 c = _mm256_loadu_ps(cs + i), s = _mm256_loadu_ps(cs + half + i);
            _mm256_storeu_ps(v + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
            _mm256_storeu_ps(v + i + half, _mm256_add_ps(_mm256_mul_ps(a, s), _mm256_mul_ps(b, c)));
        }
        for (; i < half; i++) {
            float c = cs[i], s = cs[half + i], a = v[i], b = v[i + half];
            v[i] = a * c - b * s;
            v[i + half] = a * s + b * c;
        }
    }
}

static void attention(const float *q, const float *k, const float *v, size_t stride, int n_pos, int head_dim,
                      float *out)
{
    if (head_dim % 8 || head_dim > 256) {
        bn_ref_attention(q, k, v, stride, n_pos, head_dim, out);
        return;
    }
    const int nv = head_dim / 8;
    const float scale = 1.0f / sqrtf((float)head_dim);
    __m256 qv[32], acc[32];
    for (int i = 0; i < nv; i++) {
        qv[i] = _mm256_loadu_ps(q + 8 * i);
        acc[i] = _mm256_setzero_ps();
    }
    float m = -INFINITY, l = 0.0f;
    for (int t = 0; t < n_pos; t++) {
        const float *kt = k + (size_t)t * stride, *vt = v + (size_t)t * stride;
        __m256 d = _mm256_setzero_ps();
        for (int i = 0; i < nv; i++)
            d = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(kt + 8 * i), d);
        float sc = hsum_ps(d) * scale;
        if (sc > m) { /* a new maximum: rescale what was summed so far */
            float alpha = expf(m - sc);
            __m256 va = _mm256_set1_ps(alpha);
            for (int i = 0; i < nv; i++)
                acc[i] = _mm256_mul_ps(acc[i], va);
            l *= alpha;
            m = sc;
        }
        float p = expf(sc - m);
        l += p;
        __m256 vp = _mm256_set1_ps(p);
        for (int i = 0; i < nv; i++)
            acc[i] = _mm256_fmadd_ps(vp, _mm256_loadu_ps(vt + 8 * i), acc[i]);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / l);
    for (int i = 0; i < nv; i++)
        _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inv));
}

/* attention_heads_f16 keeps each head's state on the stack: wider heads go to
 * the reference, larger groups in parts */
#define ATT_MAX_DIM 256
#define ATT_MAX_HEADS 16

/* 8 halves widened to floats, exactly */
static inline __m256 load8_f16(const bn_fp16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* q . k over nv vectors of 8, as a vector of 8 partial sums; two chains halve the
 * FMA latency of a lone head */
static inline __m256 dot_vec(const float *q, const float *k, int nv)
{
    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 2 <= nv; i += 2) {
        d0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), _mm256_load_ps(k + 8 * i), d0);
        d1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i + 8), _mm256_load_ps(k + 8 * i + 8), d1);
    }
    if (i < nv)
        d0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * i), _mm256_load_ps(k + 8 * i), d0);
    return _mm256_add_ps(d0, d1);
}

static inline float dot_rows(const float *q, const float *k, int nv)
{
    return hsum_ps(dot_vec(q, k, nv));
}

/* One position for one head: the online-softmax update of `attention` on the
 * head's running max *m, sum *l and accumulators acc (head_dim); kt and vt are
 * the position's key and value, widened (32-byte aligned) */
static inline void head_step(const float *q, const float *kt, const float *vt, int nv, float scale, float *acc,
                             float *m, float *l)
{
    const float sc = dot_rows(q, kt, nv) * scale;
    float mh = *m, lh = *l;
    if (sc > mh) { /* a new maximum: rescale what was summed so far */
        const float alpha = expf(mh - sc);
        const __m256 va = _mm256_set1_ps(alpha);
        for (int i = 0; i < nv; i++)
            _mm256_store_ps(acc + 8 * i, _mm256_mul_ps(_mm256_load_ps(acc + 8 * i), va));
        lh *= alpha;
        mh = sc;
    }
    const float p = expf(sc - mh);
    const __m256 vp = _mm256_set1_ps(p);
    for (int i = 0; i < nv; i++)
        _mm256_store_ps(acc + 8 * i, _mm256_fmadd_ps(vp, _mm256_load_ps(vt + 8 * i), _mm256_load_ps(acc + 8 * i)));
    *m = mh;
    *l = lh + p;
}

/* 8 vectors -> one whose lane j is the sum of d[j]'s lanes */
static inline __m256 hsum8x8(const __m256 d[8])
{
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
    /* a: lanes 0-3 the low halves' sums of d0..d3, lanes 4-7 their high halves' */
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* Eight positions at once for one head, the block's keys and values already
 * widened (kb, vb: 8 rows of head_dim floats): the 8 scores side by side, their
 * maximum, one rescale when it grows, the 8 weights by one vector exp, then the
 * values. Its result depends only on the head and the positions. */
static inline void head_block8(const float *q, const float *kb, const float *vb, int nv, float scale, float *acc,
                               float *m, float *l)
{
    __m256 d[8];
    for (int j = 0; j < 8; j++)
        d[j] = dot_vec(q, kb + (size_t)j * 8 * nv, nv);
    const __m256 vs = _mm256_mul_ps(hsum8x8(d), _mm256_set1_ps(scale));
    const float cmax = hmax_ps(vs);
    float mh = *m;
    if (cmax > mh) { /* a new maximum: rescale what was summed so far */
        const float alpha = expf(mh - cmax);
        const __m256 va = _mm256_set1_ps(alpha);
        for (int i = 0; i < nv; i++)
            _mm256_store_ps(acc + 8 * i, _mm256_mul_ps(_mm256_load_ps(acc + 8 * i), va));
        *l *= alpha;
        *m = mh = cmax;
    }
    const __m256 vp = exp256(_mm256_sub_ps(vs, _mm256_set1_ps(mh)));
    *l += hsum_ps(vp);
    _Alignas(32) float p[8];
    _mm256_store_ps(p, vp);
    /* the values, eight accumulators at a time */
    int c0 = 0;
    for (; c0 + 8 <= nv; c0 += 8) {
        __m256 a[8];
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            a[c] = _mm256_load_ps(acc + 8 * (c0 + c));
        for (int j = 0; j < 8; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *vt = vb + (size_t)j * 8 * nv + 8 * c0;
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++)
                a[c] = _mm256_fmadd_ps(pj, _mm256_load_ps(vt + 8 * c), a[c]);
        }
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            _mm256_store_ps(acc + 8 * (c0 + c), a[c]);
    }
    for (; c0 < nv; c0++) /* a head_dim that is not a multiple of 64 */
        for (int j = 0; j < 8; j++)
            _mm256_store_ps(acc + 8 * c0, _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_load_ps(vb + (size_t)j * 8 * nv + 8 * c0),
                                                          _mm256_load_ps(acc + 8 * c0)));
}

/* Values 8i..8i+7 of a row of a block-quantized cache (bits 8: Q8_0, 4: Q4_0;
 * kernels.h has the layout), widened exactly */
static inline __attribute__((always_inline)) __m256 load8_q(const uint8_t *row, int i, const int bits)
{
    const uint8_t *b = row + (size_t)(i >> 2) * (bits == 8 ? sizeof(bn_block_q8_0) : sizeof(bn_block_q4_0));
    uint16_t dh;
    memcpy(&dh, b, sizeof dh);
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
    if (bits == 8)
        return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * (i & 3))))));
    /* elements 0-7 and 8-15 in the low nibbles of bytes 0-7 and 8-15, 16-31 in the high ones */
    __m256i n = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * (i & 1))));
    n = (i & 2) ? _mm256_srli_epi32(n, 4) : _mm256_and_si256(n, _mm256_set1_epi32(15));
    return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(n, _mm256_set1_epi32(8))));
}

/* A whole row of a block-quantized cache widened into dst (head_dim floats,
 * 32-byte aligned): each block's scale decoded and broadcast once for its 32
 * values (load8_q does it per 8) */
static inline __attribute__((always_inline)) void widen_row_q(const uint8_t *row, int head_dim, const int bits,
                                                              float *dst)
{
    const size_t bb = bits == 8 ? sizeof(bn_block_q8_0) : sizeof(bn_block_q4_0);
    for (int b = 0; b < head_dim / BN_KVQ_BLOCK; b++, row += bb, dst += BN_KVQ_BLOCK) {
        uint16_t dh;
        memcpy(&dh, row, sizeof dh);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
        __m128i lo, hi; /* the block's 32 int8 values: 0-15, 16-31 */
        if (bits == 8) {
            lo = _mm_loadu_si128((const __m128i *)(row + 2));
            hi = _mm_loadu_si128((const __m128i *)(row + 18));
        } else {
            const __m128i n = _mm_loadu_si128((const __m128i *)(row + 2)), m4 = _mm_set1_epi8(15), e = _mm_set1_epi8(8);
            lo = _mm_sub_epi8(_mm_and_si128(n, m4), e);
            hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(n, 4), m4), e);
        }
        _mm256_store_ps(dst, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
        _mm256_store_ps(dst + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
        _mm256_store_ps(dst + 16, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
        _mm256_store_ps(dst + 24, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
    }
}

/* Values 8i..8i+7 of cached row t of a cache of type ty (1: fp16, 8: Q8_0,
 * 4: Q4_0; stride in halves for fp16, in bytes for the others), as floats */
static inline __attribute__((always_inline)) __m256 load8_kv(const void *base, size_t stride, int t, int i, const int ty)
{
    if (ty == 1)
        return load8_f16((const bn_fp16_t *)base + (size_t)t * stride + 8 * (size_t)i);
    return load8_q((const uint8_t *)base + (size_t)t * stride, i, ty);
}

/* Up to ATT_MAX_HEADS heads: blocks of 8 positions outer, heads inner, so each
 * block's key and value rows come from memory and are widened once for all the
 * heads (exactly: the same values as widening per head); the last n_pos % 8
 * positions one by one. A head's state (running max, sum, accumulators) waits on
 * the stack between blocks. ty is the cache's type, as load8_kv takes it. */
static inline __attribute__((always_inline)) void heads_kv(const float *q, int nq, size_t q_stride, const void *k,
                                                           const void *v, size_t stride, int n_pos, int head_dim,
                                                           float *out, size_t out_stride, float *ml, const int ty)
{
    const int nv = head_dim / 8;
    const float scale = 1.0f / sqrtf((float)head_dim);
    _Alignas(32) float acc[ATT_MAX_HEADS][ATT_MAX_DIM]; /* (nq, head_dim) */
    float m[ATT_MAX_HEADS], l[ATT_MAX_HEADS];
    for (int h = 0; h < nq; h++) {
        memset(acc[h], 0, (size_t)head_dim * sizeof(float));
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    /* whole blocks of 8 positions: each widened once into kb, vb for all heads */
    _Alignas(32) float kb[8 * ATT_MAX_DIM], vb[8 * ATT_MAX_DIM];
    int t = 0;
    for (; t + 8 <= n_pos; t += 8) {
        for (int j = 0; j < 8; j++) {
            if (ty != 1) {
                widen_row_q((const uint8_t *)k + (size_t)(t + j) * stride, head_dim, ty, kb + (size_t)j * head_dim);
                widen_row_q((const uint8_t *)v + (size_t)(t + j) * stride, head_dim, ty, vb + (size_t)j * head_dim);
                continue;
            }
            for (int i = 0; i < nv; i++) {
                _mm256_store_ps(kb + (size_t)j * head_dim + 8 * i, load8_kv(k, stride, t + j, i, ty));
                _mm256_store_ps(vb + (size_t)j * head_dim + 8 * i, load8_kv(v, stride, t + j, i, ty));
            }
        }
        for (int h = 0; h < nq; h++)
            head_block8(q + (size_t)h * q_stride, kb, vb, nv, scale, acc[h], &m[h], &l[h]);
    }
    /* the last few positions one at a time */
    _Alignas(32) float kf[ATT_MAX_DIM], vf[ATT_MAX_DIM];
    for (; t < n_pos; t++) {
        for (int i = 0; i < nv; i++) {
            _mm256_store_ps(kf + 8 * i, load8_kv(k, stride, t, i, ty));
            _mm256_store_ps(vf + 8 * i, load8_kv(v, stride, t, i, ty));
        }
        for (int h = 0; h < nq; h++)
            head_step(q + (size_t)h * q_stride, kf, vf, nv, scale, acc[h], &m[h], &l[h]);
    }
    for (int h = 0; h < nq; h++) {
        if (ml) {
            ml[2 * h] = m[h];
            ml[2 * h + 1] = l[h];
        }
        const __m256 inv = _mm256_set1_ps(1.0f / l[h]);
        float *o = out + (size_t)h * out_stride;
        for (int i = 0; i < nv; i++)
            _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(_mm256_load_ps(acc[h] + 8 * i), inv));
    }
}

/* The heads of a GQA group with an fp16 cache. A head's arithmetic never looks at
 * nq or at the other heads (groups larger than the stack holds go in parts, not
 * to the reference): each head's result is bit-identical to a call with that
 * head alone. */
static void attention_heads_f16(const float *q, int nq, size_t q_stride, const bn_fp16_t *k, const bn_fp16_t *v,
                                size_t stride, int n_pos, int head_dim, float *out, size_t out_stride, float *ml)
{
    if (head_dim % 8 || head_dim > ATT_MAX_DIM) {
        bn_ref_attention_heads_f16(q, nq, q_stride, k, v, stride, n_pos, head_dim, out, out_stride, ml);
        return;
    }
    for (int h = 0; h < nq; h += ATT_MAX_HEADS)
        heads_kv(q + (size_t)h * q_stride, nq - h < ATT_MAX_HEADS ? nq - h : ATT_MAX_HEADS, q_stride, k, v, stride,
                 n_pos, head_dim, out + (size_t)h * out_stride, out_stride, ml ? ml + 2 * h : NULL, 1);
}

/* The heads of a GQA group with a block-quantized cache: as attention_heads_f16,
 * the rows widened from Q8_0 or Q4_0 blocks */
static void attention_heads_q(const float *q, int nq, size_t q_stride, const uint8_t *k, const uint8_t *v,
                              size_t row_stride, int bits, int n_pos, int head_dim, float *out, size_t out_stride,
                              float *ml)
{
    if (head_dim % BN_KVQ_BLOCK || head_dim > ATT_MAX_DIM) {
        bn_ref_attention_heads_q(q, nq, q_stride, k, v, row_stride, bits, n_pos, head_dim, out, out_stride, ml);
        return;
    }
    for (int h = 0; h < nq; h += ATT_MAX_HEADS) {
        const int n = nq - h < ATT_MAX_HEADS ? nq - h : ATT_MAX_HEADS;
        float *mh = ml ? ml + 2 * h : NULL;
        if (bits == 8)
            heads_kv(q + (size_t)h * q_stride, n, q_stride, k, v, row_stride, n_pos, head_dim, out + (size_t)h * out_stride,
                     out_stride, mh, 8);
        else
            heads_kv(q + (size_t)h * q_stride, n, q_stride, k, v, row_stride, n_pos, head_dim, out + (size_t)h * out_stride,
                     out_stride, mh, 4);
    }
}

static void ffn_act(const float *g, const float *u, int n, int relu2, float *out)
{
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        __m256 a;
        if (relu2) {
            const __m256 r = _mm256_max_ps(x, zero); /* a NaN gives 0, as g > 0 ? g : 0 */
            a = _mm256_mul_ps(r, r);
        } else {
            a = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, x))));
        }
        _mm256_storeu_ps(out + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
    }
    if (i < n) /* the tail: the reference's expression */
        bn_ref_ffn_act(g + i, u + i, n - i, relu2, out + i);
}

static void quantize_scaled(const float *x, const float *g, float r, float s, int n, int8_t *q, int32_t *qsum)
{
    const __m256 vr = _mm256_set1_ps(r), vs = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    __m256i vsum = _mm256_setzero_si256();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 v[4];
        for (int k = 0; k < 4; k++) {
            const int j = i + 8 * k;
            const __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), vr), _mm256_loadu_ps(g + j)), vs);
            /* max gives lo for a NaN, as the reference's fmaxf */
            v[k] = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
        }
        _mm256_storeu_si256((__m256i *)(q + i), pack32(v[0], v[1], v[2], v[3], &vsum));
    }
    int32_t tail;
    bn_ref_quantize_scaled(x + i, g + i, r, s, n - i, q + i, &tail);
    *qsum = hsum_epi32(vsum) + tail;
}

static void to_f16(const float *x, int n, bn_fp16_t *out)
{
    const __m128i sign = _mm_set1_epi16((short)0x8000), qnan = _mm_set1_epi16(0x7e00);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        /* the hardware keeps a NaN's payload; bn_f32_to_fp16 drops it */
        const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(nan)),
                                              _mm256_extractf128_si256(_mm256_castps_si256(nan), 1));
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm_blendv_epi8(h, _mm_or_si128(_mm_and_si128(h, sign), qnan), nan16));
    }
    bn_ref_to_f16(x + i, n - i, out + i);
}

const bn_kernels_t bn_kernels_avx2 = {
    .name = "avx2",
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
