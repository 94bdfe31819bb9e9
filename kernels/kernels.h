/* kernels.h - the compute kernels: one table of function pointers per CPU, with
 * the plain scalar references in kernels/ref/ and one file per ISA beside them.
 *
 * What it is: pure compute on caller-owned buffers. No I/O, no MPI, no ZeroMQ, no
 * allocation. Matrix kernels take a row range [r0, r1) so a thread pool can split
 * work by output rows; none of them synchronises.
 * Maths (DESIGN.md section 1): a BitLinear input row is quantized per token with
 * absmax, s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x*s), -128, 127);
 * the output is y = (sum(u*q) - sum(q)) * scale / s with u = w + 1 in {0,1,2}.
 * Contract for every ISA: integer results (q, qsum, the int32 dot) are exactly
 * those of the reference, and the float epilogue uses the same operations in the
 * same order, so BitLinear outputs are bit-identical across ISAs; the float
 * kernels (norms, RoPE, attention, LM head) agree to float rounding.
 */
#ifndef BN_KERNELS_H
#define BN_KERNELS_H

#include "kernels/quants.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* A ternary weight matrix in the kernels' layout. Each row is I2_S's (formats.md):
 * n_in/128 blocks of 32 bytes; weight 128b + 32g + j of a row is in byte j of its
 * block b, bits 6-2g..7-2g, as u = w + 1. The rows are stored in groups of
 * BN_TGROUP: a group holds block 0 of its rows in order, then block 1, and so on,
 * so block b of row r is at bn_tmat_row(w, r) + BN_TBLOCK_STRIDE * b. A decode
 * GEMV then reads one sequential stream and loads each activation block once for
 * the group's rows. The last group is padded with zero bytes (bn_tmat_bytes).
 * Matrices are repacked into this layout once at load (worker/repack.c writes
 * row-major I2_S rows, bn_tmat_interleave groups them); the file stays as it is. */
#define BN_TGROUP 8
#define BN_TBLOCK_STRIDE (32 * BN_TGROUP)
typedef struct {
    uint32_t n_in, n_out;   /* n_in a multiple of 128 */
    const uint8_t *data;    /* bn_tmat_bytes(n_out, row_bytes) bytes, grouped as above */
    size_t row_bytes;       /* n_in / 4 */
    float scale;            /* per-tensor scale (I2_S tail, or the TQ blocks' common d) */
    const float *bscale;    /* NULL; or (n_out, n_in/256) factors of TQ files whose
                               blocks do not share one d (reference kernel only) */
} bn_tmat_t;

/* block 0 of row r; block b is BN_TBLOCK_STRIDE * b bytes further */
static inline const uint8_t *bn_tmat_row(const bn_tmat_t *w, int r)
{
    return w->data + (size_t)(r / BN_TGROUP) * BN_TGROUP * w->row_bytes + (size_t)(r % BN_TGROUP) * 32;
}

/* bytes of an n_out-row matrix in the grouped layout (the last group padded) */
static inline size_t bn_tmat_bytes(uint32_t n_out, size_t row_bytes)
{
    return ((size_t)n_out + BN_TGROUP - 1) / BN_TGROUP * BN_TGROUP * row_bytes;
}

/* Decode GEMV over rows [r0, r1) by whole row groups (group(r, n): rows r..r+7,
 * the first n stored), the rows outside them one at a time (row(r)); the matrix's
 * last group may be short, its padding read but not stored. For SIMD tables. */
typedef void bn_gemv_row_fn(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r);
typedef void bn_gemv_group_fn(const bn_tmat_t *w, const int8_t *q, float s, int32_t qsum, float *y, int r, int n);
static inline void bn_gemv_by_groups(bn_gemv_row_fn *row, bn_gemv_group_fn *group, const bn_tmat_t *w,
                                     const int8_t *q, float s, int32_t qsum, float *y, int r0, int r1)
{
    int r = r0;
    for (; r < r1 && r % BN_TGROUP; r++)
        row(w, q, s, qsum, y, r);
    for (; r + BN_TGROUP <= r1 || (r < r1 && r1 == (int)w->n_out); r += BN_TGROUP)
        group(w, q, s, qsum, y, r, r1 - r < BN_TGROUP ? r1 - r : BN_TGROUP);
    for (; r < r1; r++)
        row(w, q, s, qsum, y, r);
}

/* n_rows row-major rows of row_bytes (src) into the grouped layout at dst
 * (bn_tmat_bytes(n_rows, row_bytes) bytes, the padding rows zero); src and dst
 * may start at any group of a larger matrix (kernels/ref/bitlinear.c) */
void bn_tmat_interleave(uint8_t *dst, const uint8_t *src, size_t row_bytes, uint32_t n_rows);

/* LM head formats (--lm-head). Rows of n_in values; blocks of 32 for the
 * quantized ones: Q8 = bn_block_q8_0, Q4 = bn_block_q4_0, Q6 = bn_block_q6_h. */
typedef enum { BN_HEAD_F16 = 0, BN_HEAD_Q8 = 1, BN_HEAD_Q6 = 2, BN_HEAD_Q4 = 3 } bn_head_type_t;

/* Q6 head block (26 B / 32 values, 6.5 bits): value j = d * (q_j - 32) with
 * q_j = lo | hi << 4, lo = (ql[j % 16] >> (4 * (j / 16))) & 15,
 * hi = (qh[j % 8] >> (2 * (j / 8))) & 3. Our own layout: simpler than Q6_K, the
 * same bits per value. */
typedef struct { bn_fp16_t d; uint8_t ql[16]; uint8_t qh[8]; } bn_block_q6_h;
_Static_assert(sizeof(bn_block_q6_h) == 26, "q6_h block is 26 bytes");

/* The LM head: rows of n_in/32 blocks of the type (f16: 32 halves, 64 bytes;
 * q8: bn_block_q8_0; q6: bn_block_q6_h; q4: bn_block_q4_0), stored like the
 * ternary matrices in groups of BN_HGROUP rows: each row is cut into units of
 * bn_head_unit_blocks(type) blocks (the last unit may be shorter), and a group
 * holds unit 0 of its rows in order, then unit 1, and so on, so a GEMV reads a
 * group's rows side by side in memory order. Within an f16 or q8 unit the blocks
 * are as in the row; a q4 or q6 unit of m blocks holds them field by field: the
 * m blocks' qs (q4) or ql (q6), 16 bytes each, then (q6) their qh, 8 bytes each,
 * then their d (bn_hunit_*). The last group is padded with zero rows
 * (bn_hmat_bytes). Rows are packed block by block (kernels/ref/pack.c) and put
 * in place by bn_hmat_place_row. */
#define BN_HGROUP 4
typedef struct {
    bn_head_type_t type;
    uint32_t n_in, n_out;   /* n_in a multiple of 32 */
    const uint8_t *data;    /* bn_hmat_bytes(n_out, row_bytes) bytes, grouped as above */
    size_t row_bytes;       /* n_in / 32 blocks */
} bn_hmat_t;

static inline size_t bn_head_block_bytes(bn_head_type_t type)
{
    return type == BN_HEAD_F16 ? 64 : type == BN_HEAD_Q8 ? sizeof(bn_block_q8_0)
         : type == BN_HEAD_Q6 ? sizeof(bn_block_q6_h) : sizeof(bn_block_q4_0);
}

/* blocks per unit: f16 one (a group's rows are read side by side), q4 and q6
 * four (one 128-bit lane each in the AVX-512 kernel), q8 the whole row (its
 * kernel gathers the scales of 16 consecutive blocks and reads rows one by one) */
static inline int bn_head_unit_blocks(bn_head_type_t type, uint32_t n_in)
{
    return type == BN_HEAD_Q8 ? (int)(n_in / 32) : type == BN_HEAD_F16 ? 1 : 4;
}

/* unit u of row r: min(unit blocks, blocks left) consecutive blocks */
static inline const uint8_t *bn_hmat_unit(const bn_hmat_t *h, int r, int u)
{
    const size_t bb = bn_head_block_bytes(h->type);
    const int ub = bn_head_unit_blocks(h->type, h->n_in), left = (int)(h->n_in / 32) - u * ub;
    return h->data + (size_t)(r / BN_HGROUP) * BN_HGROUP * h->row_bytes + (size_t)u * BN_HGROUP * ub * bb +
           (size_t)(r % BN_HGROUP) * (size_t)(left < ub ? left : ub) * bb;
}

/* fields of block k of a q4/q6 unit of m blocks at p */
static inline const uint8_t *bn_hunit_qs(const uint8_t *p, int k)
{
    return p + 16 * k;
}

static inline const uint8_t *bn_hunit_qh(const uint8_t *p, int m, int k)
{
    return p + 16 * m + 8 * k;
}

static inline bn_fp16_t bn_hunit_d(const uint8_t *p, bn_head_type_t type, int m, int k)
{
    bn_fp16_t d;
    memcpy(&d, p + (type == BN_HEAD_Q6 ? 24 : 16) * m + 2 * k, sizeof d);
    return d;
}

static inline size_t bn_hmat_bytes(uint32_t n_out, size_t row_bytes)
{
    return ((size_t)n_out + BN_HGROUP - 1) / BN_HGROUP * BN_HGROUP * row_bytes;
}

/* Head rows [r0, r1) by whole row groups, the rows outside them one at a time:
 * ROWS(r, R) with R = BN_HGROUP from a group's first row, or 1. For SIMD tables. */
#define BN_HEAD_BY_GROUPS(r0, r1, ROWS)                             \
    do {                                                            \
        int r_ = (r0);                                              \
        for (; r_ < (r1) && r_ % BN_HGROUP; r_++)                   \
            ROWS(r_, 1);                                            \
        for (; r_ + BN_HGROUP <= (r1); r_ += BN_HGROUP)             \
            ROWS(r_, BN_HGROUP);                                    \
        for (; r_ < (r1); r_++)                                     \
            ROWS(r_, 1);                                            \
    } while (0)

/* row r of h's layout (at data, which h->data may not point to yet) from a
 * row-major row of h->row_bytes (kernels/ref/dequant.c) */
void bn_hmat_place_row(const bn_hmat_t *h, uint8_t *data, int r, const uint8_t *row);

/* The LM head's input: x for F16 heads; for quantized heads q8 blocks of 32 values
 * (q, and one scale d per block, q = round(x / d), d = max|x| / 127). */
typedef struct {
    const float *x;         /* (n) */
    const int8_t *q;        /* (n) */
    const float *d;         /* (n / 32) */
} bn_hact_t;

typedef struct {
    const char *name;       /* "ref", "avx2", "avx512", "neon" (logged at start) */
    /* per-token int8 quantization of one BitLinear input row (n a multiple of 32) */
    void (*quantize_act)(const float *x, int n, int8_t *q, float *s, int32_t *qsum);
    /* y[t * ldy + r] for tokens t < nt and rows r in [r0, r1): BitLinear of the
     * quantized tokens q (nt, n_in) with scales s (nt) and sums qsum (nt) */
    void (*tgemm)(const bn_tmat_t *w, const int8_t *q, const float *s, const int32_t *qsum, int nt,
                  float *y, size_t ldy, int r0, int r1);
    /* q8 blocks of 32 for a quantized LM head (n a multiple of 32) */
    void (*head_quantize)(const float *x, int n, int8_t *q, float *d);
    /* logits[r] = row r of the head . x, for r in [r0, r1) */
    void (*head_gemv)(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1);
    /* out = x / sqrt(mean(x^2) + eps) * w   (out may equal x) */
    void (*rmsnorm)(const float *x, const float *w, int n, float eps, float *out);
    /* NEOX RoPE in place on n_heads heads of head_dim: pairs (i, i + rope_dim/2) for
     * i < rope_dim/2 rotated by the angle whose cosine is cs[i], sine cs[rope_dim/2 + i] */
    void (*rope_neox)(float *x, int n_heads, int head_dim, int rope_dim, const float *cs);
    /* one query head against n_pos cached positions (k_t = k + t*stride, v alike):
     * out (head_dim) = softmax(q . k_t / sqrt(head_dim)) . v_t, in one pass with an
     * online softmax (no score buffer) */
    void (*attention)(const float *q, const float *k, const float *v, size_t stride, int n_pos,
                      int head_dim, float *out);
    /* the heads of a GQA group at once: query head h at q + h*q_stride, its output
     * at out + h*out_stride, each bit-identical to `attention` on that head alone
     * (the keys and values are read once for the group). NULL: call `attention`
     * per head. */
    void (*attention_heads)(const float *q, int nq, size_t q_stride, const float *k, const float *v,
                            size_t stride, int n_pos, int head_dim, float *out, size_t out_stride);
    /* `attention_heads` with the cache in fp16 (--kv-type f16): k_t = k + t*stride
     * halves, v alike, each value widened to float exactly; the same maths, and
     * each head's result independent of nq. Required in every table. ml (may
     * be NULL): each head's softmax state, ml[2h] the largest scaled score and
     * ml[2h + 1] the sum of exp(score - that), so that the results of several
     * runs of positions can be merged (worker/forward.c, long contexts). */
    void (*attention_heads_f16)(const float *q, int nq, size_t q_stride, const bn_fp16_t *k, const bn_fp16_t *v,
                                size_t stride, int n_pos, int head_dim, float *out, size_t out_stride, float *ml);
    /* `attention_heads_f16` with a block-quantized cache (--kv-type q8, q4;
     * bits 8 or 4): row t of k at k + t*row_stride bytes, v alike, in the
     * layout of BN_KVQ_BLOCK below, each value widened exactly; the same maths,
     * each head's result independent of nq. Required in every table. */
    void (*attention_heads_q)(const float *q, int nq, size_t q_stride, const uint8_t *k, const uint8_t *v,
                              size_t row_stride, int bits, int n_pos, int head_dim, float *out, size_t out_stride,
                              float *ml);
    /* out[i] = act(g[i]) * u[i], act = relu(x)^2 (relu2 != 0) or silu (out may equal g) */
    void (*ffn_act)(const float *g, const float *u, int n, int relu2, float *out);
    /* q[i] = x[i] * r * g[i] * s (multiplied in that order), rounded half to even
     * and clamped to [-128, 127] (a NaN gives -128), *qsum = the sum of q: a norm
     * applied and quantized in one pass with scales found over a wider row (the
     * sub-norms, whose rows may be split over ranks) */
    void (*quantize_scaled)(const float *x, const float *g, float r, float s, int n, int8_t *q, int32_t *qsum);
    /* out[i] = x[i] as fp16 exactly as bn_f32_to_fp16 (quants.h) rounds it: to
     * nearest even, a NaN as the quiet NaN 0x7e00 with its sign (the KV cache) */
    void (*to_f16)(const float *x, int n, bn_fp16_t *out);
} bn_kernels_t;

/* The block-quantized KV cache (--kv-type q8, q4). A cached row of head_dim
 * values (a multiple of BN_KVQ_BLOCK, at most BN_KVQ_MAX_DIM) is head_dim/32
 * blocks one after another, each as quants.h draws Q8_0 (34 B: fp16 d, int8
 * q[32]; x = d * q) or Q4_0 (18 B: fp16 d, then element j of the block in the
 * low nibble of byte j and element 16 + j in its high nibble; x = d * (nib - 8)).
 * d * q is exact in float (an 11-bit significand times an integer of at most 8
 * bits), so every ISA widens a row to the same floats. Rows are stored by the
 * reference quantizer on every ISA (bn_ref_kvq_quantize). */
#define BN_KVQ_BLOCK 32
#define BN_KVQ_MAX_DIM 512
static inline size_t bn_kvq_row_bytes(int bits, int head_dim)
{
    return (size_t)(head_dim / BN_KVQ_BLOCK) * (bits == 8 ? sizeof(bn_block_q8_0) : sizeof(bn_block_q4_0));
}
/* x (n values, a multiple of 32) into a row: Q8_0 d = max|x|/127; Q4_0 d = m/-8
 * with m the value of largest magnitude; d rounded to fp16 first, then each
 * quant round(x/d) (half away from zero), clamped to the type's range */
void bn_ref_kvq_quantize(const float *x, int n, int bits, uint8_t *row);
void bn_ref_kvq_dequant(const uint8_t *row, int n, int bits, float *out);
void bn_ref_attention_heads_q(const float *q, int nq, size_t q_stride, const uint8_t *k, const uint8_t *v,
                              size_t row_stride, int bits, int n_pos, int head_dim, float *out, size_t out_stride,
                              float *ml);
/* bn_ref_attention per head (ml as attention_heads_f16 gives it), the cached
 * values read through at(): element i of row t of k or v, widened (ref/ops.c) */
void bn_ref_attention_heads_at(const float *q, int nq, size_t q_stride, const void *k, const void *v, int n_pos,
                               int head_dim, float *out, size_t out_stride, float *ml,
                               float (*at)(const void *base, int t, int i, const void *how), const void *how);
/* one score d of the online softmax (ref/ops.c): on a new maximum *m, out (n
 * values) and the sum of weights *l are rescaled; returns d's weight */
float bn_ref_online_weight(float d, float *m, float *l, float *out, int n);

/* --- the reference (kernels/ref/), also the fallback of every table --- */
void bn_ref_quantize_act(const float *x, int n, int8_t *q, float *s, int32_t *qsum);
void bn_ref_tgemm(const bn_tmat_t *w, const int8_t *q, const float *s, const int32_t *qsum, int nt,
                  float *y, size_t ldy, int r0, int r1);
void bn_ref_head_quantize(const float *x, int n, int8_t *q, float *d);
void bn_ref_head_gemv(const bn_hmat_t *h, const bn_hact_t *a, float *logits, int r0, int r1);
void bn_ref_rmsnorm(const float *x, const float *w, int n, float eps, float *out);
void bn_ref_rope_neox(float *x, int n_heads, int head_dim, int rope_dim, const float *cs);
void bn_ref_attention(const float *q, const float *k, const float *v, size_t stride, int n_pos,
                      int head_dim, float *out);
void bn_ref_attention_heads_f16(const float *q, int nq, size_t q_stride, const bn_fp16_t *k, const bn_fp16_t *v,
                                size_t stride, int n_pos, int head_dim, float *out, size_t out_stride, float *ml);
void bn_ref_ffn_act(const float *g, const float *u, int n, int relu2, float *out);
void bn_ref_quantize_scaled(const float *x, const float *g, float r, float s, int n, int8_t *q, int32_t *qsum);
void bn_ref_to_f16(const float *x, int n, bn_fp16_t *out);
/* cs (rope_dim) for position pos: cos then sin of pos * base^(-2i/rope_dim), in double */
void bn_ref_rope_table(int pos, int rope_dim, float base, float *cs);
/* Dequantize n elements of one row of a file tensor type (F32, F16, BF16, Q8_0,
 * Q4_0, Q6_K) into out; n a multiple of the type's block. */
void bn_ref_dequant_row(uint32_t type, const void *row, float *out, int n);

/* --- tables --- */
/* The kernels for this CPU, chosen once from CPUID; BN_KERNELS=ref|avx2|avx512|neon
 * forces one (an unknown or unsupported name falls back to the best, with a note
 * in bn_kernels_choice()). Thread safe after the first call; call it at start-up. */
const bn_kernels_t *bn_kernels_get(void);
/* One line saying what was chosen and why (for the log). */
const char *bn_kernels_choice(void);
/* The table named `name` if it is compiled in and this CPU runs it, else NULL
 * (tests use this to check every variant against the reference). */
const bn_kernels_t *bn_kernels_by_name(const char *name);

#endif
