/* test_kernels.c - every kernel table of this CPU against the scalar reference,
 * on random inputs (seed printed) and edge cases. Integer results (the int8
 * activations, their sums, BitLinear outputs) must be bit-identical; float kernels
 * agree within a relative tolerance. One test per table (kernels_avx2,
 * kernels_avx512, kernels_neon): a table this build or CPU cannot run is a
 * skip that says why, never a pass. */
#include "test.h"

#include "kernels/kernels.h"
#include "kernels/ref/pack.h"

#include <math.h>
#include <string.h>

static uint64_t rng_state;

static uint64_t rnd(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float frand(void) /* uniform in [-1, 1) */
{
    return (float)((double)(rnd() >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float gauss(void)
{
    double u = ((rnd() >> 11) + 1.0) / 9007199254740993.0, v = (rnd() >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* A random ternary matrix in the kernels' layout; mode: 0 random, 1 all -1,
 * 2 all 0, 3 all +1 */
static bn_tmat_t make_tmat(int n_in, int n_out, int mode, uint8_t **buf)
{
    bn_tmat_t w = { .n_in = (uint32_t)n_in, .n_out = (uint32_t)n_out, .row_bytes = (size_t)n_in / 4,
                    .scale = 0.5f + (float)(rnd() % 1000) / 1000.0f };
    uint8_t *rows = calloc((size_t)n_out, w.row_bytes);
    for (int r = 0; r < n_out; r++)
        for (int i = 0; i < n_in; i++) {
            int u = mode == 0 ? (int)(rnd() % 3) : mode == 1 ? 0 : mode == 2 ? 1 : 2;
            int b = i >> 7, g = (i >> 5) & 3, j = i & 31;
            rows[(size_t)r * w.row_bytes + 32 * b + j] |= (uint8_t)(u << (6 - 2 * g));
        }
    /* into row groups; the padding rows get random bytes, which may be read but
     * must never reach an output */
    *buf = malloc(bn_tmat_bytes((uint32_t)n_out, w.row_bytes));
    bn_tmat_interleave(*buf, rows, w.row_bytes, (uint32_t)n_out);
    w.data = *buf;
    for (int r = n_out; r % BN_TGROUP; r++)
        for (int b = 0; b < n_in / 128; b++)
            for (int j = 0; j < 32; j++)
                (*buf)[bn_tmat_row(&w, r) - w.data + BN_TBLOCK_STRIDE * b + j] = (uint8_t)rnd();
    free(rows);
    return w;
}

static void fill_x(float *x, int n, int mode)
{
    for (int i = 0; i < n; i++) {
        switch (mode) {
        case 0: x[i] = gauss(); break;
        case 1: x[i] = gauss() * ((rnd() % 50) == 0 ? 100.0f : 1.0f); break; /* outliers */
        case 2: x[i] = 0.0f; break;
        case 3: x[i] = 1e-7f * frand(); break;                               /* below the 1e-5 floor */
        case 4: x[i] = (i % 2) ? -1000.0f : 999.0f; break;                  /* saturate to -128 */
        case 5: x[i] = (float)((int)(rnd() % 255) - 127) / 127.0f * 3.0f; break; /* exact ties */
        }
    }
}

/* quantize_scaled, exactly as the reference: the real widths and odd tails; the
 * scale as the sub-norms set it (127 over the largest product) or larger, which
 * saturates; ties; zeros; NaN and infinities mixed in (mode 6) */
static void check_quantize_scaled(const bn_kernels_t *K)
{
    static const int sizes[] = { 1, 7, 31, 33, 100, 640, 2304, 2560, 6912, 6913 };
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
        for (int mode = 0; mode < 7; mode++) {
            const int n = sizes[si];
            float *x = malloc(n * sizeof(float)), *g = malloc(n * sizeof(float));
            int8_t *qa = malloc(n), *qb = malloc(n);
            fill_x(x, n, mode < 6 ? mode : 0);
            for (int i = 0; i < n; i++)
                g[i] = mode == 5 ? 1.0f : 1.0f + 0.2f * gauss();
            if (mode == 6)
                for (int i = 0; i < n; i += 5)
                    x[i] = (i / 5) % 3 == 0 ? NAN : (i / 5) % 3 == 1 ? INFINITY : -INFINITY;
            const float r = mode == 5 ? 1.0f : 0.5f + (float)(rnd() % 1000) / 500.0f;
            float am = 0.0f;
            for (int i = 0; i < n; i++)
                if (isfinite(x[i]))
                    am = fmaxf(am, fabsf(x[i] * r * g[i]));
            float s = 127.0f / fmaxf(am, 1e-5f) * (mode == 1 ? 3.0f : 1.0f);
            if (mode == 5)
                s = 127.0f / 6.0f; /* x * s lands on or near k / 2: ties to even */
            int32_t ca = 0, cb = 0;
            bn_ref_quantize_scaled(x, g, r, s, n, qa, &ca);
            K->quantize_scaled(x, g, r, s, n, qb, &cb);
            for (int i = 0; i < n; i++)
                if (qa[i] != qb[i])
                    BN_FAIL("%s quantize_scaled n=%d mode=%d: q[%d] = %d, reference %d (x %.9g g %.9g r %.9g s %.9g)",
                            K->name, n, mode, i, qb[i], qa[i], (double)x[i], (double)g[i], (double)r, (double)s);
            if (ca != cb)
                BN_FAIL("%s quantize_scaled n=%d mode=%d: qsum %d, reference %d", K->name, n, mode, cb, ca);
            free(x); free(g); free(qa); free(qb);
        }
}

/* to_f16, bit for bit as bn_f32_to_fp16: random bit patterns (every class of
 * float), then the edges: signed zeros, infinities, NaNs with payloads, the
 * largest half and the overflow boundary, subnormals and the halfway points
 * between halves (ties to even); odd lengths for the tails */
static void check_to_f16(const bn_kernels_t *K)
{
    static const uint32_t edges[] = {
        0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000, 0x7f800001, 0xffc12345,
        0x7fbfffff, 0x477fe000, 0x477fefff, 0x477ff000, 0xc77ff000, 0x47800000, 0x38800000, 0x387fffff,
        0x38000000, 0x33800000, 0x33000000, 0x33000001, 0xb3000001, 0x32ffffff, 0x3f801000, 0x3f803000,
        0x3f800fff, 0x3f801001, 0x00000001, 0x807fffff, 0x35c00000, 0x36200000, 0x3f7ff000, 0x3f7fefff,
    };
    const int nedge = (int)(sizeof edges / sizeof edges[0]);
    for (int round = 0; round < 2; round++) {
        const int n = round == 0 ? 4099 : nedge;
        float *x = malloc(n * sizeof(float));
        bn_fp16_t *a = malloc(n * sizeof(bn_fp16_t)), *b = malloc(n * sizeof(bn_fp16_t));
        for (int i = 0; i < n; i++) {
            uint32_t u = round == 0 ? (uint32_t)rnd() : edges[i];
            if (round == 0 && i % 2) /* half of them near the range of halves */
                u = (u & 0x80ffffffu) | ((uint32_t)(0x30 + rnd() % 0x20) << 24);
            memcpy(&x[i], &u, 4);
        }
        for (int len = n; len >= n - 16 && len > 0; len -= 5) { /* tails */
            bn_ref_to_f16(x, len, a);
            memset(b, 0xa5, n * sizeof(bn_fp16_t));
            K->to_f16(x, len, b);
            for (int i = 0; i < len; i++)
                if (a[i] != b[i]) {
                    uint32_t u;
                    memcpy(&u, &x[i], 4);
                    BN_FAIL("%s to_f16 n=%d: element %d (bits 0x%08x) gives 0x%04x, reference 0x%04x", K->name, len, i,
                            u, b[i], a[i]);
                }
            for (int i = len; i < n; i++)
                if (b[i] != 0xa5a5)
                    BN_FAIL("%s to_f16 n=%d: wrote element %d", K->name, len, i);
        }
        free(x); free(a); free(b);
    }
}

static void check_quantize(const bn_kernels_t *K)
{
    static const int sizes[] = { 32, 128, 256, 384, 2560, 6912, 8192 };
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
        for (int mode = 0; mode < 6; mode++) {
            int n = sizes[si];
            float *x = malloc(n * sizeof(float));
            int8_t *qa = malloc(n), *qb = malloc(n);
            fill_x(x, n, mode);
            float sa, sb;
            int32_t ca, cb;
            bn_ref_quantize_act(x, n, qa, &sa, &ca);
            K->quantize_act(x, n, qb, &sb, &cb);
            if (sa != sb || ca != cb || memcmp(qa, qb, n) != 0)
                BN_FAIL("%s quantize_act n=%d mode=%d: s %.9g vs %.9g, qsum %d vs %d, q %s", K->name, n, mode,
                        (double)sb, (double)sa, cb, ca, memcmp(qa, qb, n) ? "differ" : "equal");
            free(x); free(qa); free(qb);
        }
    check_quantize_scaled(K);
    check_to_f16(K);
}

static void check_tgemm_case(const bn_kernels_t *K, int n_in, int n_out, int nt, int wmode, int xmode)
{
    uint8_t *buf;
    bn_tmat_t w = make_tmat(n_in, n_out, wmode, &buf);
    float *x = malloc((size_t)nt * n_in * sizeof(float));
    int8_t *q = malloc((size_t)nt * n_in);
    float *s = malloc(nt * sizeof(float));
    int32_t *qs = malloc(nt * sizeof(int32_t));
    for (int t = 0; t < nt; t++) {
        fill_x(x + (size_t)t * n_in, n_in, xmode);
        bn_ref_quantize_act(x + (size_t)t * n_in, n_in, q + (size_t)t * n_in, &s[t], &qs[t]);
    }
    size_t ldy = (size_t)n_out + 3;
    float *ya = calloc((size_t)nt * ldy, sizeof(float)), *yb = calloc((size_t)nt * ldy, sizeof(float));
    bn_ref_tgemm(&w, q, s, qs, nt, ya, ldy, 0, n_out);
    /* in two row ranges, as two threads would call it; odd split point on purpose */
    int mid = n_out > 8 ? (n_out / 2) | 1 : n_out;
    K->tgemm(&w, q, s, qs, nt, yb, ldy, 0, mid);
    if (mid < n_out)
        K->tgemm(&w, q, s, qs, nt, yb, ldy, mid, n_out);
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < n_out; r++)
            if (memcmp(&ya[t * ldy + r], &yb[t * ldy + r], sizeof(float)) != 0)
                BN_FAIL("%s tgemm n_in=%d n_out=%d nt=%d wmode=%d xmode=%d: token %d row %d: %.9g vs ref %.9g",
                        K->name, n_in, n_out, nt, wmode, xmode, t, r, (double)yb[t * ldy + r], (double)ya[t * ldy + r]);
    free(buf); free(x); free(q); free(s); free(qs); free(ya); free(yb);
}

static void check_tgemm(const bn_kernels_t *K)
{
    /* shapes: one block, odd block counts (384 = 3 blocks), the 2B4T widths; tokens
     * 1 (decode), odd and larger batches; rows not multiples of any unroll, and
     * 300 rows: several of the kernels' row chunks (64, 128) and a part group */
    static const int shapes[][2] = { { 128, 1 }, { 128, 37 }, { 256, 16 }, { 384, 29 }, { 640, 64 },
                                     { 2560, 40 }, { 6912, 33 }, { 256, 300 } };
    static const int tokens[] = { 1, 2, 3, 5, 8, 13 };
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (size_t ti = 0; ti < sizeof tokens / sizeof tokens[0]; ti++)
            check_tgemm_case(K, shapes[si][0], shapes[si][1], tokens[ti], 0, (int)(rnd() % 2));
    /* edge cases: all -1, all 0, all +1 weights against every activation kind */
    for (int wmode = 1; wmode <= 3; wmode++)
        for (int xmode = 0; xmode < 6; xmode++)
            check_tgemm_case(K, 640, 24, 3, wmode, xmode);
}

/* The largest sums: every weight +1 (u = 2) against activations at +127 and at
 * -128 over K = 6912 (and 16384): any 16-bit accumulation that wraps shows here. */
static void check_no_overflow(const bn_kernels_t *K)
{
    static const int ks[] = { 6912, 16384 };
    for (int ki = 0; ki < 2; ki++)
        for (int sign = 0; sign < 2; sign++) {
            int n = ks[ki];
            uint8_t *buf;
            bn_tmat_t w = make_tmat(n, 16, 3, &buf);
            w.scale = 1.0f;
            int8_t *q = malloc(n);
            memset(q, sign ? -128 : 127, n);
            float s = 1.0f;
            int32_t qs = (sign ? -128 : 127) * n;
            float y[16];
            K->tgemm(&w, q, &s, &qs, 1, y, 16, 0, 16);
            double want = (double)(sign ? -128 : 127) * n; /* (2 - 1) * q summed */
            for (int r = 0; r < 16; r++)
                if ((double)y[r] != want)
                    BN_FAIL("%s overflow K=%d q=%d: row %d gives %.1f, want %.1f", K->name, n, sign ? -128 : 127, r,
                            (double)y[r], want);
            free(buf);
            free(q);
        }
}

/* b against the reference a: each element within rel * scale, scale at least
 * max|a| (min_scale: the terms' size, where a sum of them cancels) */
static void check_floats_at(const char *what, const char *name, const float *a, const float *b, int n, double rel,
                            double min_scale)
{
    double scale = min_scale;
    for (int i = 0; i < n; i++)
        scale = fmax(scale, fabs(a[i]));
    for (int i = 0; i < n; i++)
        if (!(fabs((double)a[i] - b[i]) <= rel * scale + 1e-30))
            BN_FAIL("%s %s: element %d of %d: %.9g vs ref %.9g (scale %.3g)", name, what, i, n, (double)b[i],
                    (double)a[i], scale);
}

static void check_floats(const char *what, const char *name, const float *a, const float *b, int n, double rel)
{
    check_floats_at(what, name, a, b, n, rel, 0);
}

/* a head's softmax state (largest scaled score, sum of weights) against the
 * reference's: the maximum to rounding of the score, the sum relatively */
static void check_ml(const char *what, const char *name, const float *a, const float *b)
{
    if (!(fabs((double)a[0] - b[0]) <= 1e-5 * (fabs(a[0]) + 1.0)) || !(fabs((double)a[1] - b[1]) <= 1e-4 * a[1]))
        BN_FAIL("%s %s: softmax state (max %.9g, sum %.9g) vs ref (%.9g, %.9g)", name, what, (double)b[0],
                (double)b[1], (double)a[0], (double)a[1]);
}

static void check_head(const bn_kernels_t *K)
{
    static const int dims[] = { 32, 64, 96, 160, 256, 384, 2560 };
    for (size_t di = 0; di < 7; di++)
        for (int type = 0; type < 4; type++) {
            int n = dims[di], rows = 45;
            float *e = malloc((size_t)rows * n * sizeof(float)), *x = malloc(n * sizeof(float));
            for (int i = 0; i < rows * n; i++)
                e[i] = gauss() * 0.02f;
            fill_x(x, n, di % 2);
            bn_hmat_t h = { .type = (bn_head_type_t)type, .n_in = (uint32_t)n, .n_out = (uint32_t)rows,
                            .row_bytes = (size_t)n / 32 * bn_head_block_bytes((bn_head_type_t)type) };
            /* rows into the head's row groups; the padding rows are all ones
             * (NaN scales and halves), which must never reach a logit */
            uint8_t *data = malloc(bn_hmat_bytes((uint32_t)rows, h.row_bytes)), *dst = malloc(h.row_bytes);
            memset(dst, 0xff, h.row_bytes);
            for (int r = rows; r % BN_HGROUP; r++)
                bn_hmat_place_row(&h, data, r, dst);
            for (int r = 0; r < rows; r++) {
                const float *src = e + (size_t)r * n;
                if (type == BN_HEAD_F16) bn_pack_f16(src, n, (bn_fp16_t *)dst);
                if (type == BN_HEAD_Q8) bn_pack_q8_0(src, n, (bn_block_q8_0 *)dst);
                if (type == BN_HEAD_Q6) bn_pack_q6_h(src, n, (bn_block_q6_h *)dst);
                if (type == BN_HEAD_Q4) bn_pack_q4_0(src, n, (bn_block_q4_0 *)dst);
                bn_hmat_place_row(&h, data, r, dst);
            }
            free(dst);
            h.data = data;
            int8_t *qa = malloc(n), *qb = malloc(n);
            float *da = malloc(n / 32 * sizeof(float)), *db = malloc(n / 32 * sizeof(float));
            bn_ref_head_quantize(x, n, qa, da);
            K->head_quantize(x, n, qb, db);
            if (memcmp(qa, qb, n) || memcmp(da, db, n / 32 * sizeof(float)))
                BN_FAIL("%s head_quantize n=%d differs from the reference", K->name, n);
            bn_hact_t a = { x, qa, da };
            float la[45], lb[45];
            bn_ref_head_gemv(&h, &a, la, 0, rows);
            K->head_gemv(&h, &a, lb, 0, 19);
            K->head_gemv(&h, &a, lb, 19, rows);
            char what[64];
            snprintf(what, sizeof what, "head_gemv type %d n %d", type, n);
            check_floats(what, K->name, la, lb, rows, 1e-5);
            free(e); free(x); free(data); free(qa); free(qb); free(da); free(db);
        }
}

/* One head's keys and values (n_pos rows `stride` halves apart, d of them used)
 * and nq queries q_stride apart, by mode: 0 random; 1 every key the same (all
 * scores equal); 2 small integers whose scores rise and fall by large steps, so
 * the running max changes at most positions (integer dot products are exact in
 * any order: large scores add no rounding differences); 3 values all fp16
 * subnormals (widened exactly, or the outputs show it). */
static void fill_att_f16(int mode, bn_fp16_t *k, bn_fp16_t *v, size_t stride, int n_pos, int d, float *q, int nq,
                         size_t q_stride)
{
    int b[128]; /* mode 2: the direction the keys grow along */
    for (int i = 0; i < d; i++)
        b[i] = (int)(rnd() % 3) - 1;
    for (int t = 0; t < n_pos; t++) {
        bn_fp16_t *kt = k + (size_t)t * stride, *vt = v + (size_t)t * stride;
        const int trend = t % 3 == 2 ? -t / 2 : t / 2;
        for (int i = 0; i < d; i++) {
            kt[i] = bn_f32_to_fp16(mode == 2 ? (float)(b[i] * trend + (int)(rnd() % 9) - 4) : gauss());
            vt[i] = mode == 3 ? (bn_fp16_t)((rnd() & 0x8000) | (rnd() % 0x400)) : bn_f32_to_fp16(gauss());
        }
        if (mode == 1)
            memcpy(kt, k, (size_t)d * sizeof *k);
    }
    for (int h = 0; h < nq; h++)
        for (int i = 0; i < d; i++)
            q[h * q_stride + i] = mode == 2 ? (float)(2 * b[i] + (int)(rnd() % 3) - 1)
                                            : gauss() * (n_pos >= 64 ? 4.0f : 1.0f); /* sharp softmax too */
}

/* attention_heads_f16 against the reference, and each head of a group against
 * the same table on that head alone (bit-identical). The head sits at an odd
 * offset (unaligned) in cache rows wider than a head whose other halves are NaN;
 * outputs are out_stride apart and the gaps between them must stay untouched. */
static void check_attention_f16_case(const bn_kernels_t *K, int mode, int d, int n_pos, int nq)
{
    const size_t stride = (size_t)d * 3 + 1, off = (size_t)d + 1, q_stride = (size_t)d + 3, o_stride = (size_t)d + 5;
    const float gap = -12345.0f;
    bn_fp16_t *k = malloc((size_t)n_pos * stride * sizeof *k), *v = malloc((size_t)n_pos * stride * sizeof *v);
    float *q = malloc(nq * q_stride * sizeof(float)), *o = malloc(nq * o_stride * sizeof(float));
    float a[128], b[128];
    for (size_t i = 0; i < (size_t)n_pos * stride; i++)
        k[i] = v[i] = 0x7e00; /* NaN */
    fill_att_f16(mode, k + off, v + off, stride, n_pos, d, q, nq, q_stride);
    for (size_t i = 0; i < nq * o_stride; i++)
        o[i] = gap;
    float *ml = malloc(2 * nq * sizeof(float)), mr[2];
    K->attention_heads_f16(q, nq, q_stride, k + off, v + off, stride, n_pos, d, o, o_stride, ml);
    for (int h = 0; h < nq; h++) {
        char what[96];
        snprintf(what, sizeof what, "attention_heads_f16 mode %d head_dim %d n_pos %d nq %d head %d", mode, d, n_pos,
                 nq, h);
        bn_ref_attention_heads_f16(q + h * q_stride, 1, 0, k + off, v + off, stride, n_pos, d, a, 0, mr);
        check_floats(what, K->name, a, o + h * o_stride, d, 1e-5);
        check_ml(what, K->name, mr, ml + 2 * h);
        K->attention_heads_f16(q + h * q_stride, 1, 0, k + off, v + off, stride, n_pos, d, b, 0, NULL);
        if (memcmp(b, o + h * o_stride, (size_t)d * sizeof(float)) != 0)
            BN_FAIL("%s %s: differs from the same head alone (nq = 1)", K->name, what);
        for (size_t i = (size_t)d; i < o_stride; i++)
            if (o[h * o_stride + i] != gap)
                BN_FAIL("%s %s: wrote element %zu of a row of head_dim %d", K->name, what, i, d);
    }
    free(k); free(v); free(q); free(o); free(ml);
}

/* Every mode, head_dim and n_pos, with groups of 1 to 5 heads in turn (not the
 * full cross product: slow under qemu). head_dim 36 and 40 leave an odd vector
 * tail, or are not whole 8-float vectors; 17 heads are more than a table keeps
 * on its stack. */
static void check_attention_f16(const bn_kernels_t *K)
{
    if (!K->attention_heads_f16)
        BN_FAIL("%s: attention_heads_f16 is NULL (kernels.h: required in every table)", K->name);
    static const int hd[] = { 32, 36, 40, 64, 128 };
    static const int npos[] = { 64, 255, 700 };
    for (int mode = 0; mode < 4; mode++)
        for (size_t i = 0; i < sizeof hd / sizeof hd[0]; i++) {
            for (int np = 1; np <= 17; np++)
                check_attention_f16_case(K, mode, hd[i], np, 1 + np % 5);
            for (int j = 0; j < 3; j++)
                check_attention_f16_case(K, mode, hd[i], npos[j], 3 + j);
        }
    check_attention_f16_case(K, 0, 128, 33, 17);
}

/* Cached rows of a block-quantized cache: random values (mode 0), a block of
 * zeros and a block with one outlier 1000x the rest (mode 1: a zero scale, and
 * levels crushed to 0 beside the outlier), keys growing along a direction
 * (mode 2: a sharp softmax that moves its maximum; scores stay below ~30, as
 * the keys are not exact integers here and a sum's rounding is multiplied by
 * the score), values at the largest and
 * smallest fp16 scales (mode 3). Rows are row_stride bytes apart, the head at
 * an odd byte offset, the bytes between filled with 0xff. */
static void fill_att_q(int mode, int bits, uint8_t *k, uint8_t *v, size_t row_stride, int n_pos, int d, float *q,
                       int nq, size_t q_stride)
{
    float x[BN_KVQ_MAX_DIM], y[BN_KVQ_MAX_DIM];
    int b[BN_KVQ_MAX_DIM];
    for (int i = 0; i < d; i++)
        b[i] = (int)(rnd() % 3) - 1;
    for (int t = 0; t < n_pos; t++) {
        const int trend = t % 3 == 2 ? -t / 2 : t / 2;
        for (int i = 0; i < d; i++) {
            x[i] = mode == 2 ? (float)(b[i] * trend) + frand() * 4.0f : gauss();
            y[i] = gauss();
        }
        if (mode == 1 && d >= 64) {
            memset(x, 0, 32 * sizeof(float));
            y[40] = 1000.0f; /* (one sign: a sum that cancels would be checked against the wrong scale) */
        }
        if (mode == 3)
            for (int i = 0; i < d; i++)
                y[i] *= i < 32 ? 60000.0f / 4.0f : 1e-6f;
        bn_ref_kvq_quantize(x, d, bits, k + (size_t)t * row_stride);
        bn_ref_kvq_quantize(y, d, bits, v + (size_t)t * row_stride);
    }
    for (int h = 0; h < nq; h++)
        for (int i = 0; i < d; i++)
            q[h * q_stride + i] = mode == 2 ? ((float)(2 * b[i]) + frand()) * 0.12f / sqrtf((float)d) /* scores to ~30 */
                                            : gauss() * (n_pos >= 64 ? 4.0f : 1.0f);
}

/* attention_heads_q against the reference, and each head of a group against
 * the same table on that head alone (bit-identical); outputs out_stride apart
 * with the gaps between them untouched */
static void check_attention_q_case(const bn_kernels_t *K, int bits, int mode, int d, int n_pos, int nq)
{
    const size_t rb = bn_kvq_row_bytes(bits, d), row_stride = rb * 2 + 7, off = rb + 3;
    const size_t q_stride = (size_t)d + 3, o_stride = (size_t)d + 5;
    const float gap = -12345.0f;
    uint8_t *k = malloc((size_t)n_pos * row_stride + off), *v = malloc((size_t)n_pos * row_stride + off);
    float *q = malloc(nq * q_stride * sizeof(float)), *o = malloc(nq * o_stride * sizeof(float));
    float a[BN_KVQ_MAX_DIM], c[BN_KVQ_MAX_DIM];
    memset(k, 0xff, (size_t)n_pos * row_stride + off);
    memset(v, 0xff, (size_t)n_pos * row_stride + off);
    fill_att_q(mode, bits, k + off, v + off, row_stride, n_pos, d, q, nq, q_stride);
    /* an output is a weighted mean of the values: where their signs cancel, the
     * weights' rounding is checked against the values' size, not the mean's */
    double vmax = 0;
    for (int t = 0; t < n_pos; t++) {
        bn_ref_kvq_dequant(v + off + (size_t)t * row_stride, d, bits, a);
        for (int i = 0; i < d; i++)
            vmax = fmax(vmax, fabs(a[i]));
    }
    for (size_t i = 0; i < nq * o_stride; i++)
        o[i] = gap;
    float *ml = malloc(2 * nq * sizeof(float)), mr[2];
    K->attention_heads_q(q, nq, q_stride, k + off, v + off, row_stride, bits, n_pos, d, o, o_stride, ml);
    for (int h = 0; h < nq; h++) {
        char what[112];
        snprintf(what, sizeof what, "attention_heads_q q%d mode %d head_dim %d n_pos %d nq %d head %d", bits, mode, d,
                 n_pos, nq, h);
        bn_ref_attention_heads_q(q + h * q_stride, 1, 0, k + off, v + off, row_stride, bits, n_pos, d, a, 0, mr);
        check_floats_at(what, K->name, a, o + h * o_stride, d, 1e-5, vmax);
        check_ml(what, K->name, mr, ml + 2 * h);
        K->attention_heads_q(q + h * q_stride, 1, 0, k + off, v + off, row_stride, bits, n_pos, d, c, 0, NULL);
        if (memcmp(c, o + h * o_stride, (size_t)d * sizeof(float)) != 0)
            BN_FAIL("%s %s: differs from the same head alone (nq = 1)", K->name, what);
        for (size_t i = (size_t)d; i < o_stride; i++)
            if (o[h * o_stride + i] != gap)
                BN_FAIL("%s %s: wrote element %zu of a row of head_dim %d", K->name, what, i, d);
    }
    free(k); free(v); free(q); free(o); free(ml);
}

static void check_attention_q(const bn_kernels_t *K)
{
    if (!K->attention_heads_q)
        BN_FAIL("%s: attention_heads_q is NULL (kernels.h: required in every table)", K->name);
    static const int hd[] = { 32, 64, 96, 128, 256 };
    static const int npos[] = { 64, 255, 700 };
    for (int bits = 4; bits <= 8; bits += 4)
        for (int mode = 0; mode < 4; mode++)
            for (size_t i = 0; i < sizeof hd / sizeof hd[0]; i++) {
                for (int np = 1; np <= 17; np += 4)
                    check_attention_q_case(K, bits, mode, hd[i], np, 1 + np % 5);
                for (int j = 0; j < 3; j++)
                    check_attention_q_case(K, bits, mode, hd[i], npos[j], 3 + j);
            }
    check_attention_q_case(K, 8, 0, 128, 33, 17);
    check_attention_q_case(K, 4, 0, 128, 33, 17);
}

static void check_float_ops(const bn_kernels_t *K)
{
    static const int ns[] = { 32, 256, 640, 2560, 6912 };
    for (size_t i = 0; i < 5; i++) {
        int n = ns[i];
        float *x = malloc(n * sizeof(float)), *w = malloc(n * sizeof(float)), *u = malloc(n * sizeof(float));
        float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
        fill_x(x, n, 1);
        for (int k = 0; k < n; k++) {
            w[k] = 1.0f + 0.1f * gauss();
            u[k] = gauss();
        }
        bn_ref_rmsnorm(x, w, n, 1e-5f, a);
        K->rmsnorm(x, w, n, 1e-5f, b);
        check_floats("rmsnorm", K->name, a, b, n, 1e-5);
        for (int relu2 = 0; relu2 < 2; relu2++) {
            bn_ref_ffn_act(x, u, n, relu2, a);
            K->ffn_act(x, u, n, relu2, b);
            check_floats(relu2 ? "ffn_act relu2" : "ffn_act silu", K->name, a, b, n, 1e-5);
        }
        free(x); free(w); free(u); free(a); free(b);
    }
    /* RoPE: head_dim 32/64/128, partial rotary */
    static const int hd[][2] = { { 32, 32 }, { 64, 64 }, { 128, 128 }, { 128, 64 } };
    for (int i = 0; i < 4; i++) {
        int n = 5 * hd[i][0];
        float *x = malloc(n * sizeof(float)), *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
        float cs[128];
        fill_x(x, n, 0);
        bn_ref_rope_table(1234, hd[i][1], 500000.0f, cs);
        memcpy(a, x, n * sizeof(float));
        memcpy(b, x, n * sizeof(float));
        bn_ref_rope_neox(a, 5, hd[i][0], hd[i][1], cs);
        K->rope_neox(b, 5, hd[i][0], hd[i][1], cs);
        check_floats("rope_neox", K->name, a, b, n, 1e-6);
        free(x); free(a); free(b);
    }
    /* attention: positions 1..700, head_dim 32/64/128, a KV stride wider than a head */
    static const int ahd[] = { 32, 64, 128 };
    static const int npos[] = { 1, 2, 7, 64, 700 };
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 5; j++) {
            int d = ahd[i], np = npos[j];
            size_t stride = (size_t)d * 3;
            float *k = malloc(np * stride * sizeof(float)), *v = malloc(np * stride * sizeof(float));
            float q[128], a[128], b[128];
            for (size_t t = 0; t < np * stride; t++) {
                k[t] = gauss();
                v[t] = gauss();
            }
            for (int t = 0; t < d; t++)
                q[t] = gauss() * (j == 4 ? 4.0f : 1.0f); /* sharp softmax too */
            bn_ref_attention(q, k + d, v + d, stride, np, d, a);
            K->attention(q, k + d, v + d, stride, np, d, b);
            check_floats("attention", K->name, a, b, d, 1e-5);
            /* a GQA group of 1 to 5 heads at once: each head bit-identical to
             * `attention` alone (results must not depend on the grouping) */
            if (K->attention_heads) {
                for (int nq = 1; nq <= 5; nq++) {
                    float qs[5 * 128], o1[5 * 128], o2[5 * 128];
                    for (int t = 0; t < nq * d; t++)
                        qs[t] = gauss() * (j == 4 ? 4.0f : 1.0f);
                    K->attention_heads(qs, nq, (size_t)d, k + d, v + d, stride, np, d, o2, (size_t)d);
                    for (int h = 0; h < nq; h++)
                        K->attention(qs + h * d, k + d, v + d, stride, np, d, o1 + h * d);
                    CHECK(memcmp(o1, o2, (size_t)nq * d * sizeof(float)) == 0);
                    for (int h = 0; h < nq; h++) {
                        bn_ref_attention(qs + h * d, k + d, v + d, stride, np, d, a);
                        check_floats("attention_heads", K->name, a, o2 + h * d, d, 1e-5);
                    }
                }
            }
            free(k);
            free(v);
        }
    check_attention_f16(K);
    check_attention_q(K);
}

/* One SIMD table's every check against the reference. A table this build or
 * this CPU cannot run is a skip (counted as skipped, never as passed), saying
 * why; the NEON table runs on x86 through kernels_neon_qemu (tests/test_cross.c). */
static void table_checks(const char *name, const char *arch, const char *features)
{
    const bn_kernels_t *K = bn_kernels_by_name(name);
    if (!K) {
#if defined(__x86_64__)
        const int built = strcmp(arch, "x86_64") == 0;
#elif defined(__aarch64__)
        const int built = strcmp(arch, "aarch64") == 0;
#else
        const int built = 0;
#endif
        if (built)
            BN_SKIP("the %s kernels need %s, which this CPU lacks", name, features);
        BN_SKIP("the %s kernels are built for %s only%s", name, arch,
                strcmp(name, "neon") == 0 ? " (kernels_neon_qemu runs them under qemu)" : "");
    }
    rng_state = bn_test_seed();
    fprintf(stderr, "  testing %s\n", K->name);
    check_quantize(K);
    check_tgemm(K);
    check_no_overflow(K);
    check_head(K);
    check_float_ops(K);
}

/* the reference's own int16 overflow check (every table is checked against it) */
BN_TEST(kernels_ref)
{
    rng_state = bn_test_seed();
    check_no_overflow(bn_kernels_by_name("ref"));
}

BN_TEST(kernels_avx2) { table_checks("avx2", "x86_64", "AVX2, FMA and F16C"); }
BN_TEST(kernels_avx512) { table_checks("avx512", "x86_64", "AVX-512 F, BW, VL and VNNI"); }
BN_TEST(kernels_neon) { table_checks("neon", "aarch64", "NEON"); }

/* The KV quantizer (one for every ISA): each value comes back within half a
 * level of its block's stored scale (a quarter of a level more for the fp16
 * rounding of the scale, on the largest level), the largest magnitude of a
 * block exactly at level 127 (Q8_0) or -8 (Q4_0), zeros as zeros, and a NaN
 * stored without an undefined conversion. */
BN_TEST(kernels_kv_quantize)
{
    rng_state = bn_test_seed();
    float x[256], y[256];
    uint8_t row[256 / 32 * 34];
    for (int bits = 4; bits <= 8; bits += 4)
        for (int iter = 0; iter < 2000; iter++) {
            const int n = 32 * (1 + (int)(rnd() % 8)), mode = iter % 5;
            for (int i = 0; i < n; i++)
                x[i] = mode == 0 ? gauss() : mode == 1 ? 0.0f : mode == 2 ? gauss() * 1e-6f
                     : mode == 3 ? (i % 32 == 5 ? 3000.0f : frand()) : gauss() * 100.0f;
            bn_ref_kvq_quantize(x, n, bits, row);
            CHECK(bn_kvq_row_bytes(bits, n) == (size_t)n / 32 * (bits == 8 ? 34 : 18));
            bn_ref_kvq_dequant(row, n, bits, y);
            for (int b = 0; b < n / 32; b++) {
                float amax = 0.0f;
                for (int i = 0; i < 32; i++)
                    amax = fmaxf(amax, fabsf(x[32 * b + i]));
                bn_fp16_t dh;
                memcpy(&dh, row + (size_t)b * (bits == 8 ? 34 : 18), 2);
                const float ds = bn_fp16_to_f32(dh), d = fabsf(ds);
                for (int i = 0; i < 32; i++) {
                    /* Q4_0 has one level fewer on the side away from the block's
                     * largest magnitude: a value there may clamp a level short */
                    const float e = fabsf(x[32 * b + i] - y[32 * b + i]);
                    const float lim = bits == 4 && y[32 * b + i] == 7.0f * ds ? d : 0.5f * d;
                    /* and the scale's own fp16 rounding, which is coarse for a
                     * subnormal scale (blocks of values near 1e-6) */
                    if (!(e <= lim + amax * 1e-3f + (bits == 8 ? 127.0f : 8.0f) * 0x1p-25f))
                        BN_FAIL("q%d n=%d mode=%d block %d element %d: %.9g stored as %.9g (d %.6g)", bits, n, mode, b,
                                i, (double)x[32 * b + i], (double)y[32 * b + i], (double)d);
                    if (x[32 * b + i] == 0.0f && amax == 0.0f && y[32 * b + i] != 0.0f)
                        BN_FAIL("q%d: a zero block does not come back as zeros", bits);
                }
            }
        }
    /* a NaN and an infinity: no undefined conversion (the sanitizer run checks),
     * and a NaN does not spoil its block's other values */
    for (int i = 0; i < 64; i++)
        x[i] = gauss();
    x[3] = NAN;
    x[40] = INFINITY;
    for (int bits = 4; bits <= 8; bits += 4) {
        bn_ref_kvq_quantize(x, 64, bits, row);
        bn_ref_kvq_dequant(row, 64, bits, y);
        float amax = 0.0f;
        for (int i = 0; i < 32; i++)
            amax = i == 3 ? amax : fmaxf(amax, fabsf(x[i]));
        for (int i = 0; i < 32; i++)
            if (i != 3 && !(fabsf(x[i] - y[i]) <= amax / (bits == 8 ? 127.0f : 7.0f)))
                BN_FAIL("q%d: element %d of a block holding a NaN: %.9g stored as %.9g", bits, i, (double)x[i],
                        (double)y[i]);
    }
}

BN_TEST(kernels_attention_q_ref)
{
    /* the reference itself against f32 attention over the widened rows */
    rng_state = bn_test_seed();
    const int d = 64, n_pos = 50;
    const size_t rb = bn_kvq_row_bytes(8, d);
    uint8_t *k = malloc(n_pos * rb), *v = malloc(n_pos * rb);
    float *kf = malloc(n_pos * d * sizeof(float)), *vf = malloc(n_pos * d * sizeof(float)), q[64], a[64], b[64];
    for (int bits = 4; bits <= 8; bits += 4) {
        const size_t rbb = bn_kvq_row_bytes(bits, d);
        fill_att_q(0, bits, k, v, rbb, n_pos, d, q, 1, d);
        for (int t = 0; t < n_pos; t++) {
            bn_ref_kvq_dequant(k + t * rbb, d, bits, kf + t * d);
            bn_ref_kvq_dequant(v + t * rbb, d, bits, vf + t * d);
        }
        bn_ref_attention(q, kf, vf, (size_t)d, n_pos, d, a);
        bn_ref_attention_heads_q(q, 1, 0, k, v, rbb, bits, n_pos, d, b, 0, NULL);
        CHECK(memcmp(a, b, sizeof a) == 0);
    }
    free(k); free(v); free(kf); free(vf);
}
