/* repack.c - see repack.h. Decoders follow formats.md; the written layout is I2_S's. */
#include "worker/repack.h"

#include "base/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Trit n (0..4) of a TQ1_0 base-3 byte (formats.md); the product wraps mod 256. */
static inline int tq1_trit(uint8_t b, int n)
{
    static const uint8_t pow3[5] = { 1, 3, 9, 27, 81 };
    return ((uint16_t)(uint8_t)(b * pow3[n]) * 3) >> 8;
}

/* One TQ2_0 block into the kernels' layout at o (64 bytes). Both keep the u = w + 1
 * of weights 128h + 32n + m in byte 32h + m, TQ2_0 at bits 2n, ours at bits 6 - 2n:
 * each byte's four fields are reversed. Returns -1 if a field is 3 (not a trit),
 * else whether a weight is nonzero. */
static int tq2_convert(const bn_block_tq2_0 *blk, uint8_t *o)
{
    unsigned bad = 0, nonzero = 0;
    for (int i = 0; i < 64; i++) {
        const unsigned x = blk->qs[i];
        bad |= x & (x >> 1) & 0x55;
        nonzero |= x ^ 0x55;
        o[i] = (uint8_t)((x >> 6) | ((x >> 2) & 0x0c) | ((x << 2) & 0x30) | ((x << 6) & 0xc0));
    }
    return bad ? -1 : nonzero != 0;
}

/* u[256] of one TQ1_0 block */
static void tq1_decode(const bn_block_tq1_0 *blk, uint8_t *u)
{
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 32; m++)
            u[32 * n + m] = (uint8_t)tq1_trit(blk->qs[m], n);
    for (int n = 0; n < 5; n++)
        for (int m = 0; m < 16; m++)
            u[160 + 16 * n + m] = (uint8_t)tq1_trit(blk->qs[32 + m], n);
    for (int n = 0; n < 4; n++)
        for (int j = 0; j < 4; j++)
            u[240 + 4 * n + j] = (uint8_t)tq1_trit(blk->qh[j], n);
}

/* u values of elements [i0, i0 + n) of a row, written into an output row of the
 * kernels' layout starting at element o0 (a multiple of 128 apart from i0). */
static void put_u(uint8_t *orow, int o0, const uint8_t *u, int n)
{
    for (int i = 0; i < n; i++) {
        int e = o0 + i, b = e >> 7, g = (e >> 5) & 3, j = e & 31;
        orow[32 * b + j] |= (uint8_t)((u[i] & 3) << (6 - 2 * g));
    }
}

static int is_ternary_type(uint32_t t)
{
    return t == BN_TYPE_I2_S || t == BN_TYPE_TQ2_0 || t == BN_TYPE_TQ1_0 || t == BN_TYPE_F16 || t == BN_TYPE_F32;
}

/* Columns [c0, c1) not on the type's block boundaries (a tensor-parallel slice
 * of o or down whose heads or FFN rows do not fill whole blocks): the aligned
 * blocks around the slice are repacked, then the slice's u values are moved to
 * the start of new rows padded to a multiple of 128. The padding holds u = 0;
 * the caller feeds zeros there, so it adds nothing. Per-block TQ scales cannot
 * follow such a shift, so they must be uniform here. */
static int repack_columns(const char *name, uint32_t type, const void *src, uint32_t n_in, uint32_t n_out,
                          uint32_t r0, uint32_t r1, uint32_t c0, uint32_t c1, bn_tmat_t *out, void **owned,
                          char *err, size_t errlen)
{
    const uint32_t align = (type == BN_TYPE_TQ2_0 || type == BN_TYPE_TQ1_0) ? 256 : 128;
    const uint32_t a0 = c0 / align * align, a1 = (c1 + align - 1) / align * align;
    bn_tmat_t wide;
    void *wide_buf = NULL;
    int rc = bn_repack_ternary(name, type, src, n_in, n_out, r0, r1, a0, a1, &wide, &wide_buf, err, errlen);
    if (rc)
        return rc;
    if (wide.bscale) {
        free(wide_buf);
        return bn_err(err, errlen, BN_EUNSUPPORTED, "tensor '%s': its blocks have different scales, so it can only "
                      "be split at multiples of %u columns (columns [%u, %u) asked); choose another --tp",
                      name, align, c0, c1);
    }
    const uint32_t rows = r1 - r0, cols = c1 - c0, padded = (cols + 127) / 128 * 128;
    uint8_t *buf = calloc((size_t)rows, padded / 4);
    if (!buf) {
        free(wide_buf);
        return bn_err(err, errlen, BN_ENOMEM, "out of memory repacking tensor '%s'", name);
    }
    uint8_t u[128];
    for (uint32_t r = 0; r < rows; r++) {
        const uint8_t *wrow = wide.data + (size_t)r * wide.row_bytes;
        for (uint32_t c = 0; c < cols; c += 128) {
            int n = cols - c < 128 ? (int)(cols - c) : 128;
            for (int k = 0; k < n; k++) {
                uint32_t e = c0 - a0 + c + (uint32_t)k, b = e >> 7, g = (e >> 5) & 3, j = e & 31;
                u[k] = (wrow[32 * b + j] >> (6 - 2 * g)) & 3;
            }
            put_u(buf + (size_t)r * (padded / 4), (int)c, u, n);
        }
    }
    memset(out, 0, sizeof *out);
    out->n_in = padded;
    out->n_out = rows;
    out->row_bytes = padded / 4;
    out->scale = wide.scale;
    out->data = buf;
    *owned = buf;
    free(wide_buf);
    return BN_OK;
}

int bn_repack_ternary(const char *name, uint32_t type, const void *src, uint32_t n_in, uint32_t n_out,
                      uint32_t r0, uint32_t r1, uint32_t c0, uint32_t c1, bn_tmat_t *out, void **owned,
                      char *err, size_t errlen)
{
    *owned = NULL;
    if (!is_ternary_type(type))
        return bn_err(err, errlen, BN_EUNSUPPORTED, "tensor '%s' has a type that is not ternary", name);
    uint32_t align = (type == BN_TYPE_TQ2_0 || type == BN_TYPE_TQ1_0) ? 256 : 128;
    if (n_in % align || r0 >= r1 || r1 > n_out || c0 >= c1 || c1 > n_in)
        return bn_err(err, errlen, BN_EINVAL, "tensor '%s': rows [%u, %u) and columns [%u, %u) of %u x %u "
                      "are not a valid slice", name, r0, r1, c0, c1, n_out, n_in);
    if (c0 % align || c1 % align)
        return repack_columns(name, type, src, n_in, n_out, r0, r1, c0, c1, out, owned, err, errlen);
    const uint32_t rows = r1 - r0, cols = c1 - c0;
    memset(out, 0, sizeof *out);
    out->n_in = cols;
    out->n_out = rows;
    out->row_bytes = cols / 4;
    if (type == BN_TYPE_I2_S) {
        const uint8_t *s = src;
        memcpy(&out->scale, s + (size_t)n_in * n_out / 4, 4);
        if (c0 == 0 && c1 == n_in) { /* whole rows: in place */
            out->data = s + (size_t)r0 * (n_in / 4);
            return BN_OK;
        }
    }
    size_t nb = (size_t)rows * (cols / 256);
    uint8_t *buf = calloc(1, (size_t)rows * out->row_bytes + (align == 256 ? nb * sizeof(float) + 16 : 0));
    if (!buf)
        return bn_err(err, errlen, BN_ENOMEM, "out of memory repacking tensor '%s'", name);
    uint8_t u[256];
    if (type == BN_TYPE_I2_S) {
        /* a column slice is copied: rows read in place with the file's stride
         * would leave the hardware prefetcher fetching the other ranks' halves
         * (measured: a tensor rank of 2 read at half the speed) */
        for (uint32_t r = 0; r < rows; r++)
            memcpy(buf + (size_t)r * out->row_bytes, (const uint8_t *)src + (size_t)(r0 + r) * (n_in / 4) + c0 / 4,
                   out->row_bytes);
    } else if (type == BN_TYPE_F16 || type == BN_TYPE_F32) {
        /* values must be {-a, 0, a} for one a: then w = v / a and scale = a */
        float a = 0.0f;
        for (uint32_t r = r0; r < r1; r++)
            for (uint32_t c = c0; c < c1; c++) {
                size_t i = (size_t)r * n_in + c;
                float v = type == BN_TYPE_F16 ? bn_fp16_to_f32(((const bn_fp16_t *)src)[i]) : ((const float *)src)[i];
                a = fmaxf(a, fabsf(v));
            }
        for (uint32_t r = 0; r < rows; r++)
            for (uint32_t c = 0; c < cols; c += 128) {
                for (int k = 0; k < 128; k++) {
                    size_t i = (size_t)(r0 + r) * n_in + c0 + c + k;
                    float v = type == BN_TYPE_F16 ? bn_fp16_to_f32(((const bn_fp16_t *)src)[i]) : ((const float *)src)[i];
                    if (v == 0.0f) u[k] = 1;
                    else if (v == a) u[k] = 2;
                    else if (v == -a) u[k] = 0;
                    else {
                        free(buf);
                        return bn_err(err, errlen, BN_EUNSUPPORTED,
                                      "tensor '%s' is %s but not ternary (value %g at row %u, column %u; the "
                                      "largest magnitude is %g): BitNet linear weights must be w * scale",
                                      name, type == BN_TYPE_F16 ? "F16" : "F32", (double)v, r0 + r, c0 + c + k, (double)a);
                    }
                }
                put_u(buf + (size_t)r * out->row_bytes, (int)c, u, 128);
            }
        out->scale = a;
    } else {
        /* TQ2_0 / TQ1_0: decode each block; the scale is the d shared by every block
         * holding a nonzero weight, or per-block factors when they differ */
        size_t bsz = type == BN_TYPE_TQ2_0 ? sizeof(bn_block_tq2_0) : sizeof(bn_block_tq1_0);
        size_t src_row = (size_t)(n_in / 256) * bsz;
        float *bs = (float *)(buf + (size_t)rows * out->row_bytes + 16 - ((size_t)rows * out->row_bytes) % 16);
        float common = NAN;
        int uniform = 1;
        for (uint32_t r = 0; r < rows; r++)
            for (uint32_t b = 0; b < cols / 256; b++) {
                const uint8_t *blk = (const uint8_t *)src + (size_t)(r0 + r) * src_row + (size_t)(c0 / 256 + b) * bsz;
                float d;
                int nonzero = 0;
                if (type == BN_TYPE_TQ2_0) {
                    nonzero = tq2_convert((const bn_block_tq2_0 *)blk, buf + (size_t)r * out->row_bytes + 64 * b);
                    d = bn_fp16_to_f32(((const bn_block_tq2_0 *)blk)->d);
                } else {
                    tq1_decode((const bn_block_tq1_0 *)blk, u);
                    d = bn_fp16_to_f32(((const bn_block_tq1_0 *)blk)->d);
                    for (int k = 0; k < 256 && nonzero >= 0; k++)
                        nonzero = u[k] > 2 ? -1 : nonzero | (u[k] != 1);
                    if (nonzero >= 0)
                        put_u(buf + (size_t)r * out->row_bytes, (int)(256 * b), u, 256);
                }
                if (nonzero < 0) {
                    free(buf);
                    return bn_err(err, errlen, BN_EFORMAT, "tensor '%s': block %u of row %u holds a value that "
                                  "is not a trit", name, c0 / 256 + b, r0 + r);
                }
                if (!isfinite(d)) {
                    free(buf);
                    return bn_err(err, errlen, BN_EFORMAT, "tensor '%s': block %u of row %u has a non-finite scale",
                                  name, c0 / 256 + b, r0 + r);
                }
                bs[(size_t)r * (cols / 256) + b] = d;
                if (nonzero) {
                    if (isnan(common))
                        common = d;
                    else if (d != common)
                        uniform = 0;
                }
            }
        if (uniform) {
            out->scale = isnan(common) ? 0.0f : common;
        } else {
            out->scale = 1.0f;
            out->bscale = bs;
        }
    }
    out->data = buf;
    *owned = buf;
    return BN_OK;
}
