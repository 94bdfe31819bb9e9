/* test_mkmodel.c - the packers (kernels/ref/pack.h), the GGUF writer
 * (tools/gguf_write.h) and bitnet-mkmodel.
 *
 * The decoders here are written again from reference/formats.md and the layout
 * comment of kernels/quants.h, element by element, deliberately unlike the
 * packers' loops, so that a packer and its decoder cannot share a mistake. GGUF
 * files are read back with worker/gguf.h. */
#include "test.h"

#include "kernels/quants.h"
#include "kernels/ref/pack.h"
#include "base/status.h"
#include "tools/gguf_write.h"
#include "worker/gguf.h"

#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FIX "tests/fixtures/"

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

/* A scratch folder for the files of one test, removed by rm_tmp, or at exit when
 * a check fails (BN_FAIL exits; a passing test ends with _exit, after rm_tmp). */
static char cur_tmp[256];

static void rm_tmp(const char *dir)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    bn_test_run(cmd, NULL, NULL);
    if (strcmp(dir, cur_tmp) == 0)
        cur_tmp[0] = 0;
}

static void rm_tmp_at_exit(void)
{
    if (cur_tmp[0])
        rm_tmp(cur_tmp);
}

static void make_tmp(char *dir, size_t len)
{
    static int registered;
    snprintf(dir, len, "/tmp/bn-mkmodel-%d-XXXXXX", (int)getpid());
    if (!mkdtemp(dir))
        BN_FAIL("mkdtemp %s failed", dir);
    snprintf(cur_tmp, sizeof cur_tmp, "%s", dir);
    if (!registered++)
        atexit(rm_tmp_at_exit);
}

/* Run bitnet-mkmodel with args; exit status, stderr in *err when asked. */
static int mkmodel(const char *args, char **err)
{
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "%s/bitnet-mkmodel %s", bin_dir(), args);
    return bn_test_run(cmd, NULL, err);
}

static uint64_t rng_state;

static uint64_t rnd(void)
{
    /* splitmix64: the test's own generator, seeded from bn_test_seed(). */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double unif(void) { return (double)(rnd() >> 11) * 0x1.0p-53; }

static double gauss(void)
{
    double u = 1.0 - unif(), v = unif();
    return sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v);
}

/* ---------------------------------------------------------------- decoders */

/* I2_S: element i of the tensor; block b = i/128, group g = (i%128)/32, j = i%32. */
static int dec_i2_s(const uint8_t *d, size_t i)
{
    size_t b = i / 128, g = (i % 128) / 32, j = i % 32;
    return ((d[32 * b + j] >> (6 - 2 * g)) & 3) - 1;
}

static float dec_i2_s_scale(const uint8_t *d, size_t n)
{
    float s;
    memcpy(&s, d + n / 4, 4);
    return s;
}

/* TQ2_0 element i: block i/256; within it e = 128h + 32n + m in qs[32h+m], bits 2n. */
static int dec_tq2_0(const uint8_t *d, size_t i)
{
    const uint8_t *blk = d + (i / 256) * 66;
    size_t e = i % 256, h = e / 128, n = (e % 128) / 32, m = e % 32;
    return ((blk[32 * h + m] >> (2 * n)) & 3) - 1;
}

static uint16_t block_half(const uint8_t *d, size_t i, size_t bsize, size_t at)
{
    uint16_t v;
    memcpy(&v, d + (i / 256) * bsize + at, 2);
    return v;
}

/* Trit k of a TQ1_0 byte: ((uint8_t)(b * 3^k) * 3) >> 8. */
static int tq1_digit(uint8_t b, int k)
{
    static const uint8_t pow3[5] = { 1, 3, 9, 27, 81 };
    uint8_t x = (uint8_t)(b * pow3[k]);
    return ((x * 3) >> 8) - 1;
}

/* TQ1_0 element i: qs[0..31] hold 32k + m, qs[32..47] 160 + 16k + m, qh 240 + 4k + j. */
static int dec_tq1_0(const uint8_t *d, size_t i)
{
    const uint8_t *blk = d + (i / 256) * 54;
    size_t e = i % 256;
    if (e < 160)
        return tq1_digit(blk[e % 32], (int)(e / 32));
    if (e < 240)
        return tq1_digit(blk[32 + (e - 160) % 16], (int)((e - 160) / 16));
    return tq1_digit(blk[48 + (e - 240) % 4], (int)((e - 240) / 4));
}

static float dec_q8_0(const uint8_t *d, size_t i)
{
    const uint8_t *blk = d + (i / 32) * 34;
    uint16_t h;
    memcpy(&h, blk, 2);
    return bn_fp16_to_f32(h) * (float)(int8_t)blk[2 + i % 32];
}

static float dec_q4_0(const uint8_t *d, size_t i)
{
    const uint8_t *blk = d + (i / 32) * 18;
    uint16_t h;
    memcpy(&h, blk, 2);
    size_t j = i % 32;
    int nib = j < 16 ? blk[2 + j] & 15 : blk[2 + j - 16] >> 4;
    return bn_fp16_to_f32(h) * (float)(nib - 8);
}

/* Q6_K element i: e = 128h + 32k + l; low nibble from ql[64h + l + 32(k&1)] (low
 * half for k < 2), top bits from qh[32h + l] >> 2k; scale scales[e/16]. */
static float dec_q6_k(const uint8_t *d, size_t i)
{
    const uint8_t *blk = d + (i / 256) * 210;
    size_t e = i % 256, h = e / 128, k = (e % 128) / 32, l = e % 32;
    uint8_t qlb = blk[64 * h + l + 32 * (k & 1)];
    int q = (k < 2 ? qlb & 15 : qlb >> 4) | (((blk[128 + 32 * h + l] >> (2 * k)) & 3) << 4);
    uint16_t hd;
    memcpy(&hd, blk + 208, 2);
    return bn_fp16_to_f32(hd) * (float)(int8_t)blk[192 + e / 16] * (float)(q - 32);
}

/* Trit i of a ternary tensor of type t with n elements (F16: value / scale). */
static int dec_trit(uint32_t t, const uint8_t *d, size_t i, float scale)
{
    switch (t) {
    case BN_TYPE_I2_S: return dec_i2_s(d, i);
    case BN_TYPE_TQ2_0: return dec_tq2_0(d, i);
    case BN_TYPE_TQ1_0: return dec_tq1_0(d, i);
    case BN_TYPE_F16: {
        uint16_t h;
        memcpy(&h, d + 2 * i, 2);
        float v = bn_fp16_to_f32(h);
        return v == scale ? 1 : v == -scale ? -1 : v == 0.0f ? 0 : 99;
    }
    }
    return 99;
}

/* The one scale of a ternary tensor: I2_S tail, TQ block 0's d, F16 max |value|. */
static float dec_scale(uint32_t t, const uint8_t *d, size_t n)
{
    switch (t) {
    case BN_TYPE_I2_S: return dec_i2_s_scale(d, n);
    case BN_TYPE_TQ2_0: return bn_fp16_to_f32(block_half(d, 0, 66, 64));
    case BN_TYPE_TQ1_0: return bn_fp16_to_f32(block_half(d, 0, 54, 52));
    case BN_TYPE_F16: {
        float m = 0;
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, d + 2 * i, 2);
            m = fmaxf(m, fabsf(bn_fp16_to_f32(h)));
        }
        return m;
    }
    }
    return NAN;
}

/* ---------------------------------------------------------------- pack_roundtrip */

static void check_ternary(const int8_t *w, size_t n, float scale, const char *what)
{
    uint8_t *i2 = malloc(n / 4 + 32);
    bn_block_tq2_0 *t2 = malloc(n / 256 * sizeof *t2 + 1);
    bn_block_tq1_0 *t1 = malloc(n / 256 * sizeof *t1 + 1);
    CHECK_EQ_INT(bn_pack_i2_s(w, n, scale, i2), BN_OK);
    for (size_t i = 0; i < n; i++)
        if (dec_i2_s(i2, i) != w[i])
            BN_FAIL("%s: I2_S n=%zu element %zu: %d vs %d", what, n, i, dec_i2_s(i2, i), w[i]);
    CHECK(dec_i2_s_scale(i2, n) == scale);
    for (int k = 4; k < 32; k++)
        CHECK_EQ_INT(i2[n / 4 + k], 0);
    if (n % 256 == 0) {
        CHECK_EQ_INT(bn_pack_tq2_0(w, n, scale, t2), BN_OK);
        CHECK_EQ_INT(bn_pack_tq1_0(w, n, scale, t1), BN_OK);
        for (size_t i = 0; i < n; i++) {
            if (dec_tq2_0((const uint8_t *)t2, i) != w[i])
                BN_FAIL("%s: TQ2_0 n=%zu element %zu: %d vs %d", what, n, i, dec_tq2_0((const uint8_t *)t2, i), w[i]);
            if (dec_tq1_0((const uint8_t *)t1, i) != w[i])
                BN_FAIL("%s: TQ1_0 n=%zu element %zu: %d vs %d", what, n, i, dec_tq1_0((const uint8_t *)t1, i), w[i]);
        }
        for (size_t b = 0; b < n / 256; b++) {
            CHECK_EQ_INT(t2[b].d, bn_f32_to_fp16(scale));
            CHECK_EQ_INT(t1[b].d, bn_f32_to_fp16(scale));
        }
    }
    free(i2);
    free(t2);
    free(t1);
}

/* Largest rounding error of a positive value v stored as fp16: half an ulp, and
 * half the subnormal step below the normal range. */
static double fp16_err(double v)
{
    return fmax(v * 0x1p-11, 0x1p-25);
}

/* Quantize x (n) as `type` and check every element against its bound. */
static void check_float(uint32_t type, const float *x, size_t n, const char *what)
{
    uint8_t *q = malloc(n * 4 + 256);
    double worst = 0; /* largest error / bound seen */
    switch (type) {
    case BN_TYPE_F16: CHECK_EQ_INT(bn_pack_f16(x, n, (bn_fp16_t *)q), BN_OK); break;
    case BN_TYPE_Q8_0: CHECK_EQ_INT(bn_pack_q8_0(x, n, (bn_block_q8_0 *)q), BN_OK); break;
    case BN_TYPE_Q4_0: CHECK_EQ_INT(bn_pack_q4_0(x, n, (bn_block_q4_0 *)q), BN_OK); break;
    case BN_TYPE_Q6_K: CHECK_EQ_INT(bn_pack_q6_k(x, n, (bn_block_q6_k *)q), BN_OK); break;
    }
    uint32_t blk = bn_type_block(type);
    for (size_t b0 = 0; b0 < n; b0 += blk) {
        float amax = 0;
        for (size_t i = b0; i < b0 + blk; i++)
            amax = fmaxf(amax, fabsf(x[i]));
        for (size_t i = b0; i < b0 + blk; i++) {
            double y = 0, bound = 0;
            switch (type) {
            case BN_TYPE_F16: {
                uint16_t h;
                memcpy(&h, q + 2 * i, 2);
                y = bn_fp16_to_f32(h);
                bound = fabs(x[i]) * 0x1p-11 + 0x1p-25; /* half an ulp; subnormal floor */
                break;
            }
            case BN_TYPE_Q8_0: /* half a step of d = amax/127, plus 127 times d's fp16 rounding */
                y = dec_q8_0(q, i);
                bound = 0.5 * amax / 127.0 + 127 * fp16_err(amax / 127.0);
                break;
            case BN_TYPE_Q4_0: /* a step of amax/8: the side opposite the extreme clamps at +7 */
                y = dec_q4_0(q, i);
                bound = amax / 8.0 + 8 * fp16_err(amax / 8.0);
                break;
            case BN_TYPE_Q6_K:
                /* One step of the largest sub-scale (amax/32): half a step of
                 * rounding, plus up to 16 d when the int8 rounding of a sub-scale
                 * makes the largest element clamp at -32. d = amax/4096 is below
                 * fp16's smallest subnormal (2^-24) for |x| < 7e-5: that floor
                 * (16 * 2^-24) is the format's, not the packer's. */
                y = dec_q6_k(q, i);
                bound = amax / 32.0 + 17 * 0x1p-24;
                break;
            }
            bound *= 1 + 1e-6; /* the decoders' own float rounding */
            double e = fabs(y - x[i]);
            if (!(e <= bound))
                BN_FAIL("%s: %s element %zu: %.9g decodes to %.9g (error %.3g > bound %.3g, block amax %.3g)",
                        what, bn_type_name(type), i, (double)x[i], y, e, bound, (double)amax);
            worst = fmax(worst, e / bound);
        }
    }
    fprintf(stderr, "  %-6s %-10s worst error %.2f of the bound\n", bn_type_name(type), what, worst);
    free(q);
}

BN_TEST(pack_roundtrip)
{
    rng_state = bn_test_seed();
    enum { N = 4096 };
    int8_t *w = malloc(N);
    float *x = malloc(N * sizeof *x);

    /* Ternary: random and the edge cases, at several lengths (I2_S alone at 128, 384). */
    static const size_t lens[] = { 128, 256, 384, 768, N };
    for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
        size_t n = lens[li];
        for (size_t i = 0; i < n; i++)
            w[i] = (int8_t)(rnd() % 3) - 1;
        check_ternary(w, n, 0.0712890625f, "random");
        for (int v = -1; v <= 1; v++) {
            memset(w, v, n);
            check_ternary(w, n, 1.5f, v < 0 ? "all -1" : v == 0 ? "all 0" : "all +1");
        }
        for (size_t i = 0; i < n; i++)
            w[i] = (int8_t)(i % 2 ? 1 : -1);
        check_ternary(w, n, 0.25f, "alternate");
    }
    /* Every 5-trit pattern of a TQ1_0 byte, in each position of a block. */
    for (size_t i = 0; i < 256; i++)
        w[i] = (int8_t)((i / 3) % 3) - 1;
    for (int p = 0; p < 243; p++) {
        int v = p;
        for (int k = 4; k >= 0; k--, v /= 3)
            w[32 * k] = w[160 + 16 * k] = (int8_t)(v % 3 - 1);
        for (int k = 0; k < 4; k++)
            w[240 + 4 * k + 3] = w[32 * k];
        check_ternary(w, 256, 1.0f, "tq1 byte");
    }

    /* Bad input: a value that is not a trit, a length that is not whole blocks. */
    uint8_t out[N];
    memset(w, 0, N);
    w[77] = 2;
    CHECK_EQ_INT(bn_pack_i2_s(w, 128, 1.0f, out), BN_EINVAL);
    CHECK_EQ_INT(bn_pack_tq2_0(w, 256, 1.0f, (bn_block_tq2_0 *)out), BN_EINVAL);
    CHECK_EQ_INT(bn_pack_tq1_0(w, 256, 1.0f, (bn_block_tq1_0 *)out), BN_EINVAL);
    w[77] = 0;
    CHECK_EQ_INT(bn_pack_i2_s(w, 100, 1.0f, out), BN_EINVAL);
    CHECK_EQ_INT(bn_pack_tq2_0(w, 128, 1.0f, (bn_block_tq2_0 *)out), BN_EINVAL);
    CHECK_EQ_INT(bn_pack_q6_k(x, 128, (bn_block_q6_k *)out), BN_EINVAL);
    CHECK_EQ_INT(bn_pack_q8_0(x, 33, (bn_block_q8_0 *)out), BN_EINVAL);

    /* Floats: Gaussian rows at two magnitudes, outliers, zeros, constants, tiny values. */
    static const uint32_t types[] = { BN_TYPE_F16, BN_TYPE_Q8_0, BN_TYPE_Q4_0, BN_TYPE_Q6_K };
    for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        uint32_t t = types[ti];
        for (size_t i = 0; i < N; i++)
            x[i] = (float)(gauss() * 0.0625);
        check_float(t, x, N, "gauss");
        for (size_t i = 0; i < N; i++)
            x[i] = (float)(gauss() * 30.0);
        check_float(t, x, N, "gauss*30");
        for (size_t i = 0; i < N; i++)
            x[i] = (float)(gauss() * (rnd() % 50 == 0 ? 40.0 : 1.0));
        check_float(t, x, N, "outliers");
        for (size_t i = 0; i < N; i++)
            x[i] = (float)(unif() - 0.5) * (i / 256 % 2 ? 1e-3f : 1.0f); /* blocks of different scales */
        check_float(t, x, N, "uniform");
        memset(x, 0, N * sizeof *x);
        check_float(t, x, N, "zeros");
        for (size_t i = 0; i < N; i++)
            x[i] = i % 512 < 256 ? -0.75f : 0.5f;
        check_float(t, x, N, "constant");
        for (size_t i = 0; i < N; i++)
            x[i] = (float)(gauss() * 1e-6);
        check_float(t, x, N, "tiny");
    }
    free(w);
    free(x);
}

/* ---------------------------------------------------------------- gguf writer */

static int fill_count(bn_gguf_sink_t *sink, void *user, char *err, size_t errlen)
{
    /* Streams 0, 1, 2, ... as bytes, in uneven pieces; `user` holds the count. */
    size_t n = *(size_t *)user;
    uint8_t buf[7];
    for (size_t i = 0; i < n;) {
        size_t k = 0;
        for (; k < sizeof buf && i < n; k++, i++)
            buf[k] = (uint8_t)i;
        int rc = bn_gguf_sink_write(sink, buf, k, err, errlen);
        if (rc != BN_OK)
            return rc;
    }
    return BN_OK;
}

/* Every value type, tensors from a buffer and from a callback, read back with the
 * reader; and the errors: duplicates, a short callback, a full disk, no folder. */
BN_TEST(gguf_writer_roundtrip)
{
    char dir[256], path[512], err[512];
    make_tmp(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/w.gguf", dir);
    bn_gguf_writer_t *w = bn_gguf_writer_new();
    CHECK(w != NULL);
    uint8_t u8 = 200; int8_t i8 = -100; uint16_t u16 = 60000; int16_t i16 = -30000;
    int32_t i32 = -2000000000; uint64_t u64 = 1ull << 40; int64_t i64 = -(1ll << 40);
    double f64 = 3.25;
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.u8", BN_GGUF_UINT8, &u8, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.i8", BN_GGUF_INT8, &i8, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.u16", BN_GGUF_UINT16, &u16, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.i16", BN_GGUF_INT16, &i16, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_u32(w, "t.u32", 4000000000u, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.i32", BN_GGUF_INT32, &i32, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_f32(w, "t.f32", 1e-5f, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_bool(w, "t.bool", 1, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_str(w, "t.str", "héllo", err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.u64", BN_GGUF_UINT64, &u64, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.i64", BN_GGUF_INT64, &i64, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.f64", BN_GGUF_FLOAT64, &f64, err, sizeof err), BN_OK);
    int32_t ints[5] = { 1, -2, 3, -4, 5 };
    const char *strs[3] = { "a", "", "Ġthe" };
    CHECK_EQ_INT(bn_gguf_writer_add_arr(w, "t.ints", BN_GGUF_INT32, ints, 5, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_arr_str(w, "t.strs", strs, 3, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_arr(w, "t.empty", BN_GGUF_UINT8, NULL, 0, err, sizeof err), BN_OK);
    /* Errors leave the writer as it was. */
    CHECK_EQ_INT(bn_gguf_writer_add_u32(w, "t.u32", 1, err, sizeof err), BN_EINVAL);
    CHECK(strstr(err, "t.u32") != NULL);
    CHECK_EQ_INT(bn_gguf_writer_add_kv(w, "t.bad", BN_GGUF_ARRAY, &u8, err, sizeof err), BN_EINVAL);
    CHECK_EQ_INT(bn_gguf_writer_add_str(w, "", "x", err, sizeof err), BN_EINVAL);

    float f[40];
    for (int i = 0; i < 40; i++)
        f[i] = (float)i * 0.5f;
    uint64_t ne_a[2] = { 8, 5 }, ne_b[1] = { 100 }, ne_c[3] = { 2, 3, 4 };
    size_t nb = 400, nc = 24 * 2; /* bytes the callbacks stream */
    CHECK_EQ_INT(bn_gguf_writer_add_tensor(w, "a", BN_TYPE_F32, 2, ne_a, sizeof f, f, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_tensor_fn(w, "b", BN_TYPE_F32, 1, ne_b, 4 * 100, fill_count, &nb, err, sizeof err),
                 BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_tensor_fn(w, "c", BN_TYPE_F16, 3, ne_c, nc, fill_count, &nc, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_add_tensor(w, "a", BN_TYPE_F32, 2, ne_a, sizeof f, f, err, sizeof err), BN_EINVAL);
    CHECK_EQ_INT(bn_gguf_writer_add_tensor(w, "z", BN_TYPE_F32, 5, ne_a, sizeof f, f, err, sizeof err), BN_EINVAL);
    CHECK_EQ_INT(bn_gguf_writer_write(w, path, err, sizeof err), BN_OK);

    bn_gguf_t *g = NULL;
    if (bn_gguf_open(path, &g, err, sizeof err) != BN_OK)
        BN_FAIL("%s", err);
    CHECK_EQ_INT(g->version, 3);
    CHECK_EQ_INT(g->alignment, 32);
    CHECK_EQ_INT(g->n_kv, 15);
    CHECK(bn_gguf_find(g, "general.alignment") == NULL);
    const bn_gguf_kv_t *kv;
    CHECK((kv = bn_gguf_find(g, "t.u8")) && kv->type == BN_GGUF_UINT8 && bn_gguf_arr_int(kv, 0) == 200);
    CHECK((kv = bn_gguf_find(g, "t.i8")) && kv->type == BN_GGUF_INT8 && bn_gguf_arr_int(kv, 0) == -100);
    CHECK((kv = bn_gguf_find(g, "t.u16")) && kv->type == BN_GGUF_UINT16 && bn_gguf_arr_int(kv, 0) == 60000);
    CHECK((kv = bn_gguf_find(g, "t.i16")) && kv->type == BN_GGUF_INT16 && bn_gguf_arr_int(kv, 0) == -30000);
    CHECK((kv = bn_gguf_find(g, "t.u32")) && kv->type == BN_GGUF_UINT32 && bn_gguf_arr_int(kv, 0) == 4000000000ll);
    CHECK((kv = bn_gguf_find(g, "t.i32")) && kv->type == BN_GGUF_INT32 && bn_gguf_arr_int(kv, 0) == -2000000000ll);
    CHECK((kv = bn_gguf_find(g, "t.u64")) && kv->type == BN_GGUF_UINT64 && bn_gguf_arr_int(kv, 0) == (1ll << 40));
    CHECK((kv = bn_gguf_find(g, "t.i64")) && kv->type == BN_GGUF_INT64 && bn_gguf_arr_int(kv, 0) == -(1ll << 40));
    CHECK((kv = bn_gguf_find(g, "t.bool")) && kv->type == BN_GGUF_BOOL && bn_gguf_arr_int(kv, 0) == 1);
    float fv;
    CHECK_EQ_INT(bn_gguf_get_f32(g, "t.f32", &fv, err, sizeof err), BN_OK);
    CHECK(fv == 1e-5f);
    CHECK_EQ_INT(bn_gguf_get_f32(g, "t.f64", &fv, err, sizeof err), BN_OK);
    CHECK(fv == 3.25f);
    CHECK(bn_gguf_find(g, "t.f64")->type == BN_GGUF_FLOAT64);
    bn_str_t s;
    CHECK_EQ_INT(bn_gguf_get_str(g, "t.str", &s, err, sizeof err), BN_OK);
    CHECK(s.len == strlen("héllo") && memcmp(s.ptr, "héllo", s.len) == 0);
    CHECK((kv = bn_gguf_find(g, "t.ints")) && kv->type == BN_GGUF_ARRAY && kv->arr_type == BN_GGUF_INT32 && kv->n == 5);
    for (int i = 0; i < 5; i++)
        CHECK_EQ_INT(bn_gguf_arr_int(kv, (uint64_t)i), ints[i]);
    CHECK((kv = bn_gguf_find(g, "t.strs")) && kv->arr_type == BN_GGUF_STRING && kv->n == 3);
    for (int i = 0; i < 3; i++)
        CHECK(kv->strs[i].len == strlen(strs[i]) && memcmp(kv->strs[i].ptr, strs[i], kv->strs[i].len) == 0);
    CHECK((kv = bn_gguf_find(g, "t.empty")) && kv->n == 0 && kv->arr_type == BN_GGUF_UINT8);
    CHECK_EQ_INT(g->n_tensors, 3);
    const bn_gguf_tensor_t *t = bn_gguf_tensor(g, "a");
    CHECK(t && t->n_dims == 2 && t->ne[0] == 8 && t->ne[1] == 5 && t->offset == 0);
    CHECK(memcmp(t->data, f, sizeof f) == 0);
    t = bn_gguf_tensor(g, "b");
    CHECK(t && t->n_dims == 1 && t->ne[0] == 100 && t->offset == 160);
    for (int i = 0; i < 400; i++)
        CHECK_EQ_INT(((const uint8_t *)t->data)[i], (uint8_t)i);
    t = bn_gguf_tensor(g, "c");
    CHECK(t && t->n_dims == 3 && t->ne[2] == 4 && t->type == BN_TYPE_F16);
    CHECK_EQ_INT(t->offset, 576); /* 160 + 400 rounded up to 32 */
    CHECK_EQ_INT(g->size, g->data_offset + 576 + 64); /* the last tensor is padded too */
    bn_gguf_close(&g);

    /* A full disk: the OS reason in the message, and /dev/full is left alone. */
    int rc = bn_gguf_writer_write(w, "/dev/full", err, sizeof err);
    CHECK_EQ_INT(rc, BN_EIO);
    fprintf(stderr, "  /dev/full: %s\n", err);
    CHECK(strstr(err, "/dev/full") && strstr(err, "No space left"));
    struct stat st;
    CHECK(stat("/dev/full", &st) == 0);
    char nodir[600];
    snprintf(nodir, sizeof nodir, "%s/no/such/dir.gguf", dir);
    CHECK_EQ_INT(bn_gguf_writer_write(w, nodir, err, sizeof err), BN_EIO);
    CHECK(strstr(err, "no/such/dir.gguf") != NULL);
    bn_gguf_writer_destroy(&w);
    CHECK(w == NULL);
    bn_gguf_writer_destroy(&w);

    /* A callback that writes fewer bytes than declared: an error, no file left. */
    w = bn_gguf_writer_new();
    size_t short_n = 10;
    CHECK_EQ_INT(bn_gguf_writer_add_tensor_fn(w, "short", BN_TYPE_F32, 1, ne_b, 400, fill_count, &short_n,
                                              err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_writer_write(w, path, err, sizeof err), BN_EINVAL);
    fprintf(stderr, "  short: %s\n", err);
    CHECK(strstr(err, "short") != NULL);
    CHECK(access(path, F_OK) != 0);
    bn_gguf_writer_destroy(&w);
    rm_tmp(dir);
}

/* ---------------------------------------------------------------- mkmodel */

static bn_gguf_t *open_or_fail(const char *path)
{
    bn_gguf_t *g = NULL;
    char err[512];
    if (bn_gguf_open(path, &g, err, sizeof err) != BN_OK)
        BN_FAIL("%s", err);
    return g;
}

static int str_eq(bn_str_t a, bn_str_t b)
{
    return a.len == b.len && memcmp(a.ptr, b.ptr, a.len) == 0;
}

/* Same keys (names, types, lengths), same hyper-parameters and token-id layout,
 * same tensors (names, order, shapes, types, offsets). Our vocabulary is learned
 * from our own text, so the merged tokens themselves differ. */
static void compare_layout(const char *fixture, const char *flags)
{
    char dir[256], path[512], args[1024];
    make_tmp(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/m.gguf", dir);
    snprintf(args, sizeof args, "%s --seed 7 -o %s", flags, path);
    CHECK_EQ_INT(mkmodel(args, NULL), 0);
    bn_gguf_t *a = open_or_fail(fixture), *b = open_or_fail(path);
    fprintf(stderr, "  %s: %llu keys, %llu tensors\n", fixture, (unsigned long long)a->n_kv,
            (unsigned long long)a->n_tensors);
    CHECK_EQ_INT(b->n_kv, a->n_kv);
    for (uint64_t i = 0; i < a->n_kv; i++) {
        const bn_gguf_kv_t *ka = &a->kv[i], *kb = bn_gguf_find(b, ka->key);
        if (!kb)
            BN_FAIL("key '%s' of %s is missing", ka->key, fixture);
        if (ka->type != kb->type || ka->arr_type != kb->arr_type || ka->n != kb->n)
            BN_FAIL("key '%s': type %u/%u n %llu in the fixture, %u/%u n %llu made", ka->key, ka->type,
                    ka->arr_type, (unsigned long long)ka->n, kb->type, kb->arr_type, (unsigned long long)kb->n);
        if (strcmp(ka->key, "general.name") == 0 || strcmp(ka->key, "tokenizer.chat_template") == 0 ||
            strcmp(ka->key, "tokenizer.ggml.merges") == 0)
            continue;
        if (strcmp(ka->key, "tokenizer.ggml.tokens") == 0) {
            /* The 256 byte tokens and the specials at the top are the same. */
            for (uint64_t j = 0; j < ka->n; j++)
                if ((j < 256 || j >= ka->n - 16) && !str_eq(ka->strs[j], kb->strs[j]))
                    BN_FAIL("token %llu: '%.*s' vs '%.*s'", (unsigned long long)j, (int)ka->strs[j].len,
                            ka->strs[j].ptr, (int)kb->strs[j].len, kb->strs[j].ptr);
        } else if (ka->type == BN_GGUF_STRING) {
            if (!str_eq(ka->strs[0], kb->strs[0]))
                BN_FAIL("key '%s' differs", ka->key);
        } else {
            size_t es = ka->type == BN_GGUF_ARRAY ? 4 : (ka->type == BN_GGUF_BOOL ? 1 : 4);
            if (memcmp(ka->data, kb->data, es * ka->n) != 0)
                BN_FAIL("key '%s' has a different value", ka->key);
        }
    }
    CHECK_EQ_INT(b->n_tensors, a->n_tensors);
    for (uint64_t i = 0; i < a->n_tensors; i++) {
        const bn_gguf_tensor_t *ta = &a->tensors[i], *tb = &b->tensors[i];
        if (strcmp(ta->name, tb->name) != 0 || ta->type != tb->type || ta->n_dims != tb->n_dims ||
            memcmp(ta->ne, tb->ne, sizeof ta->ne) != 0 || ta->offset != tb->offset || ta->nbytes != tb->nbytes)
            BN_FAIL("tensor %llu: %s %s [%llu, %llu] at %llu in the fixture, %s %s [%llu, %llu] at %llu made",
                    (unsigned long long)i, ta->name, bn_type_name(ta->type), (unsigned long long)ta->ne[0],
                    (unsigned long long)ta->ne[1], (unsigned long long)ta->offset, tb->name, bn_type_name(tb->type),
                    (unsigned long long)tb->ne[0], (unsigned long long)tb->ne[1], (unsigned long long)tb->offset);
    }
    /* Headers differ in length (our tokens and merges); data sections do not. */
    CHECK_EQ_INT(b->size - b->data_offset, a->size - a->data_offset);
    bn_gguf_close(&a);
    bn_gguf_close(&b);
    rm_tmp(dir);
}

BN_TEST(mkmodel_tiny_matches_fixture_layout)
{
    compare_layout(FIX "tiny-b158-i2_s.gguf", "--preset tiny --wtype i2_s");
    compare_layout(FIX "tiny-b158-tq2_0.gguf", "--preset tiny --wtype tq2_0");
    compare_layout(FIX "tiny-b158-tq1_0.gguf", "--preset tiny --wtype tq1_0");
    compare_layout(FIX "tiny-bitnet-tq2_0.gguf", "--preset tiny --wtype tq2_0 --arch bitnet");
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int has_text(char **sorted, size_t n, const char *t)
{
    return bsearch(&t, sorted, n, sizeof *sorted, cmp_str) != NULL;
}

/* The LLaMA-3 layout at full vocabulary size (128000 regular tokens, most of them
 * synthetic merges, then 256 specials): texts are distinct, every merge joins two
 * tokens into a token, specials are CONTROL and in LLaMA-3's order. */
BN_TEST(mkmodel_vocab_valid)
{
    char dir[256], path[512], args[1024], err[256];
    make_tmp(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/v.gguf", dir);
    snprintf(args, sizeof args, "--preset 2b4t --n-layer 1 --n-embd 256 --n-ff 256 --n-head 2 --n-head-kv 1 "
             "--seed 1 -o %s", path);
    CHECK_EQ_INT(mkmodel(args, NULL), 0);
    bn_gguf_t *g = open_or_fail(path);
    const bn_gguf_kv_t *tok = bn_gguf_find(g, "tokenizer.ggml.tokens"), *mer = bn_gguf_find(g, "tokenizer.ggml.merges"),
                       *typ = bn_gguf_find(g, "tokenizer.ggml.token_type");
    CHECK(tok && mer && typ);
    CHECK_EQ_INT(tok->n, 128256);
    CHECK_EQ_INT(typ->n, 128256);
    CHECK(mer->n >= 128000 - 256);
    size_t n = tok->n;
    char **texts = malloc(n * sizeof *texts);
    for (size_t i = 0; i < n; i++) {
        texts[i] = malloc(tok->strs[i].len + 1);
        memcpy(texts[i], tok->strs[i].ptr, tok->strs[i].len);
        texts[i][tok->strs[i].len] = 0;
        CHECK_EQ_INT(bn_gguf_arr_int(typ, i), i < 128000 ? 1 : 3);
    }
    CHECK_STR_EQ(texts[0], "!");
    CHECK_STR_EQ(texts[188], "Ā");
    CHECK_STR_EQ(texts[220], "Ġ");
    CHECK_STR_EQ(texts[255], "Ń");
    static const char *const specials[] = {
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_3|>",
    };
    for (size_t k = 0; k < sizeof specials / sizeof specials[0]; k++)
        CHECK_STR_EQ(texts[128000 + k], specials[k]);
    CHECK_STR_EQ(texts[128255], "<|reserved_special_token_247|>");
    uint32_t bos, eos, pad;
    CHECK_EQ_INT(bn_gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &bos, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bn_gguf_get_u32(g, "tokenizer.ggml.padding_token_id", &pad, err, sizeof err), BN_OK);
    CHECK_EQ_INT(bos, 128000);
    CHECK_EQ_INT(eos, 128001);
    CHECK_EQ_INT(pad, 128001);
    CHECK(bn_gguf_find(g, "tokenizer.ggml.pre") == NULL);

    char **sorted = malloc(n * sizeof *sorted);
    memcpy(sorted, texts, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_str);
    for (size_t i = 1; i < n; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0)
            BN_FAIL("token text '%s' appears twice", sorted[i]);
    /* Regular tokens only from merges: every regular token past the bytes is the
     * result of some merge. */
    char **results = malloc(mer->n * sizeof *results);
    for (uint64_t m = 0; m < mer->n; m++) {
        char buf[512];
        if (mer->strs[m].len >= sizeof buf)
            BN_FAIL("merge %llu is too long", (unsigned long long)m);
        memcpy(buf, mer->strs[m].ptr, mer->strs[m].len);
        buf[mer->strs[m].len] = 0;
        char *sp = strchr(buf, ' ');
        if (!sp || strchr(sp + 1, ' ') || sp == buf || !sp[1])
            BN_FAIL("merge %llu '%s' is not 'left right'", (unsigned long long)m, buf);
        *sp = 0;
        if (!has_text(sorted, n, buf) || !has_text(sorted, n, sp + 1))
            BN_FAIL("merge %llu: a half of '%s %s' is not a token", (unsigned long long)m, buf, sp + 1);
        memmove(sp, sp + 1, strlen(sp + 1) + 1);
        if (!has_text(sorted, n, buf))
            BN_FAIL("merge %llu: '%s' is not a token", (unsigned long long)m, buf);
        results[m] = strdup(buf);
    }
    qsort(results, mer->n, sizeof *results, cmp_str);
    for (size_t i = 256; i < 128000; i++)
        if (!has_text(results, mer->n, texts[i]))
            BN_FAIL("token %zu '%s' is made by no merge", i, texts[i]);
    fprintf(stderr, "  %zu tokens, %llu merges: all valid\n", n, (unsigned long long)mer->n);
    for (uint64_t m = 0; m < mer->n; m++)
        free(results[m]);
    for (size_t i = 0; i < n; i++)
        free(texts[i]);
    free(results);
    free(texts);
    free(sorted);
    bn_gguf_close(&g);
    rm_tmp(dir);
}

/* Trit i and the scale of ternary tensor `name`, whatever its type. */
static void tensor_trits(const bn_gguf_t *g, const char *name, int8_t *w, float *scale)
{
    const bn_gguf_tensor_t *t = bn_gguf_tensor(g, name);
    if (!t)
        BN_FAIL("%s: no tensor %s", g->path, name);
    *scale = dec_scale(t->type, t->data, t->n_elements);
    for (uint64_t i = 0; i < t->n_elements; i++) {
        int v = dec_trit(t->type, t->data, i, *scale);
        if (v == 99)
            BN_FAIL("%s: %s element %llu is not a trit", g->path, name, (unsigned long long)i);
        w[i] = (int8_t)v;
    }
    /* TQ blocks all carry the same d. */
    uint32_t bs = t->type == BN_TYPE_TQ2_0 ? 66 : t->type == BN_TYPE_TQ1_0 ? 54 : 0;
    for (uint64_t b = 0; bs && b < t->n_elements / 256; b++)
        CHECK(bn_fp16_to_f32(block_half(t->data, b * 256, bs, bs - 2)) == *scale);
}

static int is_ternary_name(const char *name)
{
    static const char *const lin[] = { "attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down." };
    for (size_t k = 0; k < sizeof lin / sizeof lin[0]; k++)
        if (strstr(name, lin[k]))
            return 1;
    return 0;
}

/* Files of one seed in each ternary type: identical trits, scales, norms and
 * embedding; the same flags again (and another thread count): byte-identical;
 * another seed: different weights. */
static void same_weights(const char *shape)
{
    char dir[256], path[3][512], args[4096];
    static const char *const wt[3] = { "i2_s", "tq2_0", "tq1_0" };
    make_tmp(dir, sizeof dir);
    uint64_t seed = bn_test_seed() % 1000000;
    for (int k = 0; k < 3; k++) {
        snprintf(path[k], sizeof path[k], "%s/%s.gguf", dir, wt[k]);
        snprintf(args, sizeof args, "%s --wtype %s --seed %llu -o %s", shape, wt[k], (unsigned long long)seed, path[k]);
        CHECK_EQ_INT(mkmodel(args, NULL), 0);
    }
    bn_gguf_t *g[3];
    for (int k = 0; k < 3; k++)
        g[k] = open_or_fail(path[k]);
    CHECK_EQ_INT(g[1]->n_tensors, g[0]->n_tensors);
    CHECK_EQ_INT(g[2]->n_tensors, g[0]->n_tensors);
    int n_ternary = 0, n_f16 = 0;
    for (uint64_t i = 0; i < g[0]->n_tensors; i++) {
        const bn_gguf_tensor_t *t0 = &g[0]->tensors[i];
        const bn_gguf_tensor_t *t1 = bn_gguf_tensor(g[1], t0->name), *t2 = bn_gguf_tensor(g[2], t0->name);
        CHECK(t1 && t2);
        if (!is_ternary_name(t0->name)) {
            /* Norms and embedding: the same bytes in every file. */
            CHECK(t0->nbytes == t1->nbytes && memcmp(t0->data, t1->data, t0->nbytes) == 0);
            CHECK(t0->nbytes == t2->nbytes && memcmp(t0->data, t2->data, t0->nbytes) == 0);
            continue;
        }
        n_ternary++;
        n_f16 += t1->type == BN_TYPE_F16;
        size_t n = t0->n_elements;
        int8_t *w[3];
        float s[3];
        for (int k = 0; k < 3; k++) {
            w[k] = malloc(n);
            tensor_trits(g[k], t0->name, w[k], &s[k]);
        }
        if (s[0] != s[1] || s[0] != s[2])
            BN_FAIL("%s: scales %.9g %.9g %.9g differ", t0->name, (double)s[0], (double)s[1], (double)s[2]);
        /* The scale is an f16 value near 1/sqrt(2/3 n_in). */
        CHECK(bn_fp16_to_f32(bn_f32_to_fp16(s[0])) == s[0]);
        double ref = 1.0 / sqrt(2.0 / 3.0 * (double)t0->ne[0]);
        CHECK(s[0] >= 0.899 * ref && s[0] <= 1.101 * ref);
        if (memcmp(w[0], w[1], n) != 0 || memcmp(w[0], w[2], n) != 0)
            BN_FAIL("%s: trits differ between the types", t0->name);
        /* Roughly uniform over the three values. */
        size_t cnt[3] = { 0 };
        for (size_t j = 0; j < n; j++)
            cnt[w[0][j] + 1]++;
        for (int v = 0; v < 3; v++)
            CHECK(fabs((double)cnt[v] / (double)n - 1.0 / 3.0) < 0.02);
        for (int k = 0; k < 3; k++)
            free(w[k]);
    }
    fprintf(stderr, "  %s: %d ternary tensors equal in 3 types (%d of them F16 in TQ files)\n", shape, n_ternary, n_f16);
    CHECK(n_ternary > 0);

    /* The same flags again, with one thread: byte-identical. Another seed: different. */
    char again[512], other[512];
    snprintf(again, sizeof again, "%s/again.gguf", dir);
    snprintf(other, sizeof other, "%s/other.gguf", dir);
    snprintf(args, sizeof args, "%s --wtype i2_s --seed %llu --threads 1 -o %s", shape, (unsigned long long)seed, again);
    CHECK_EQ_INT(mkmodel(args, NULL), 0);
    snprintf(args, sizeof args, "%s --wtype i2_s --seed %llu -o %s", shape, (unsigned long long)seed + 1, other);
    CHECK_EQ_INT(mkmodel(args, NULL), 0);
    size_t la, lb, lc;
    char *a = bn_test_read_file(path[0], &la), *b = bn_test_read_file(again, &lb), *c = bn_test_read_file(other, &lc);
    CHECK(a && b && c);
    CHECK_EQ_INT(la, lb);
    CHECK(memcmp(a, b, la) == 0);
    free(a); free(b); free(c);
    bn_gguf_t *go = open_or_fail(other);
    for (uint64_t i = 0; i < g[0]->n_tensors; i++) {
        const bn_gguf_tensor_t *t0 = &g[0]->tensors[i], *to = bn_gguf_tensor(go, t0->name);
        CHECK(to && to->nbytes == t0->nbytes);
        if (memcmp(t0->data, to->data, t0->nbytes) == 0)
            BN_FAIL("%s: the same with seeds %llu and %llu", t0->name, (unsigned long long)seed,
                    (unsigned long long)seed + 1);
    }
    bn_gguf_close(&go);
    for (int k = 0; k < 3; k++)
        bn_gguf_close(&g[k]);
    rm_tmp(dir);
}

/* Embedding types of one seed: the same floats before quantization. */
static void same_embedding(void)
{
    char dir[256], path[512], args[1024];
    static const char *const et[] = { "f32", "f16", "q8_0", "q4_0", "q6_k" };
    make_tmp(dir, sizeof dir);
    bn_gguf_t *g[5];
    for (int k = 0; k < 5; k++) {
        snprintf(path, sizeof path, "%s/%s.gguf", dir, et[k]);
        snprintf(args, sizeof args, "--preset tiny --embd-type %s --seed 11 -o %s", et[k], path);
        CHECK_EQ_INT(mkmodel(args, NULL), 0);
        g[k] = open_or_fail(path);
    }
    const bn_gguf_tensor_t *t[5];
    for (int k = 0; k < 5; k++)
        CHECK((t[k] = bn_gguf_tensor(g[k], "token_embd.weight")) != NULL);
    CHECK_EQ_INT(t[0]->type, BN_TYPE_F32);
    CHECK_EQ_INT(t[2]->type, BN_TYPE_Q8_0);
    CHECK_EQ_INT(t[3]->type, BN_TYPE_Q4_0);
    CHECK_EQ_INT(t[4]->type, BN_TYPE_Q6_K);
    const float *x = t[0]->data;
    size_t n = t[0]->n_elements;
    double ss = 0, e8 = 0, e4 = 0, e6 = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, (const uint8_t *)t[1]->data + 2 * i, 2);
        if (h != bn_f32_to_fp16(x[i]))
            BN_FAIL("embedding element %zu: f16 file has %#x, f32 file %.9g", i, h, (double)x[i]);
        ss += (double)x[i] * x[i];
        e8 += pow(dec_q8_0(t[2]->data, i) - x[i], 2);
        e4 += pow(dec_q4_0(t[3]->data, i) - x[i], 2);
        e6 += pow(dec_q6_k(t[4]->data, i) - x[i], 2);
    }
    double rms = sqrt(ss / n);
    e8 = sqrt(e8 / n) / rms; e4 = sqrt(e4 / n) / rms; e6 = sqrt(e6 / n) / rms;
    fprintf(stderr, "  embedding rms %.4f (want %.4f); relative rms error q8_0 %.4f q6_k %.4f q4_0 %.4f\n",
            rms, 1.0 / 16, e8, e6, e4);
    CHECK(fabs(rms - 1.0 / 16) < 0.002);
    CHECK(e8 < 0.01 && e6 < 0.03 && e4 < 0.15);
    for (int k = 0; k < 5; k++)
        bn_gguf_close(&g[k]);
    rm_tmp(dir);
}

BN_TEST(mkmodel_same_seed_same_weights)
{
    same_weights("--preset tiny");
    /* n_ff a multiple of 256: the TQ files hold every linear tensor as TQ. */
    same_weights("--preset tiny --n-embd 512 --n-ff 768 --n-layer 1 --n-head 4 --n-head-kv 1 --n-vocab 300");
    same_embedding();
}

/* Each bad value: exit 2 and one line on stderr naming the flag; no file made. */
BN_TEST(mkmodel_bad_flags)
{
    char dir[256], path[512], args[1024];
    make_tmp(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/bad.gguf", dir);
    static const struct { const char *args, *flag; } cases[] = {
        { "--n-embd abc", "--n-embd" },
        { "--n-embd 256x", "--n-embd" },
        { "--n-embd 0", "--n-embd" },
        { "--n-embd -256", "--n-embd" },
        { "--n-layer 0", "--n-layer" },
        { "--n-layer", "--n-layer" },                    /* no value: -o is taken as it, then fails */
        { "--n-ff 0", "--n-ff" },
        { "--n-ff 200", "--n-ff" },                      /* i2_s rows need multiples of 128 */
        { "--n-head 7", "--n-head" },                    /* 256 % 7 */
        { "--n-head 0", "--n-head" },
        { "--n-head 128 --n-head-kv 2", "--n-head" },    /* head_dim 2 is fine ... */
        { "--n-head 256 --n-head-kv 2", "--n-head" },    /* ... head_dim 1 is odd */
        { "--n-head-kv 3", "--n-head-kv" },              /* 8 % 3 */
        { "--n-head-kv 0", "--n-head-kv" },
        { "--n-vocab 100", "--n-vocab" },
        { "--n-vocab 1e5", "--n-vocab" },
        { "--n-ctx 0", "--n-ctx" },
        { "--n-ctx 99999999999", "--n-ctx" },
        { "--rope-base -5", "--rope-base" },
        { "--rope-base nan", "--rope-base" },
        { "--rope-base 0", "--rope-base" },
        { "--rms-eps 0", "--rms-eps" },
        { "--rms-eps x", "--rms-eps" },
        { "--rms-eps inf", "--rms-eps" },
        { "--seed -1", "--seed" },
        { "--seed abc", "--seed" },
        { "--threads 0", "--threads" },
        { "--preset huge", "--preset" },
        { "--arch llama", "--arch" },
        { "--wtype q4_0", "--wtype" },
        { "--embd-type bf16", "--embd-type" },
        { "--n-embd 384 --n-head 6 --wtype i2_s", "--n-embd" },          /* 384 % 128 = 0: fine ... */
        { "--n-embd 320 --n-head 10 --n-head-kv 2", "--n-embd" },        /* ... 320 % 128 != 0 */
        { "--n-embd 384 --n-head 6 --wtype tq2_0", "--n-embd" },         /* TQ rows: multiples of 256 */
        { "--n-embd 384 --n-head 6 --wtype tq1_0", "--n-embd" },
        { "--n-embd 128 --n-head 4 --embd-type q6_k", "--n-embd" },      /* Q6_K rows: multiples of 256 */
        { "--bogus 3", "--bogus" },
    };
    int n_ok = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *err = NULL;
        /* The case's flags last, so a flag with no value sees the end of the line. */
        snprintf(args, sizeof args, "-o %s %s", path, cases[i].args);
        int rc = mkmodel(args, &err);
        int good_shape = strstr(cases[i].args, "--n-head 128") || strstr(cases[i].args, "--n-embd 384 --n-head 6 --wtype i2_s");
        if (good_shape) {
            /* The two valid neighbours of bad cases: they must work. */
            if (rc != 0)
                BN_FAIL("'%s' should work, exited %d: %s", cases[i].args, rc, err ? err : "");
            unlink(path);
            n_ok++;
            free(err);
            continue;
        }
        if (rc != 2)
            BN_FAIL("'%s': exit %d, want 2 (stderr: %s)", cases[i].args, rc, err ? err : "");
        if (!err || !strstr(err, cases[i].flag))
            BN_FAIL("'%s': stderr does not name %s: %s", cases[i].args, cases[i].flag, err ? err : "");
        size_t lines = 0;
        for (const char *p = err; *p; p++)
            lines += *p == '\n';
        if (lines != 1)
            BN_FAIL("'%s': %zu lines on stderr, want 1: %s", cases[i].args, lines, err);
        if (access(path, F_OK) == 0)
            BN_FAIL("'%s': a file was written", cases[i].args);
        fprintf(stderr, "  %-44s %s", cases[i].args, err);
        free(err);
    }
    CHECK_EQ_INT(n_ok, 2);
    /* No output file given. */
    char *err = NULL;
    CHECK_EQ_INT(mkmodel("--preset tiny", &err), 2);
    CHECK(err && strstr(err, "-o"));
    free(err);
    /* --help: exit 0, every flag listed. */
    char cmd[512], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s/bitnet-mkmodel --help", bin_dir());
    CHECK_EQ_INT(bn_test_run(cmd, &out, NULL), 0);
    static const char *const flags[] = { "--preset", "--arch", "--wtype", "--embd-type", "--seed", "-o", "--n-embd",
                                         "--n-layer", "--n-ff", "--n-head", "--n-head-kv", "--n-vocab", "--n-ctx",
                                         "--rope-base", "--rms-eps", "--threads", "--help" };
    for (size_t k = 0; k < sizeof flags / sizeof flags[0]; k++)
        if (!out || !strstr(out, flags[k]))
            BN_FAIL("--help does not list %s", flags[k]);
    free(out);
    rm_tmp(dir);
}
