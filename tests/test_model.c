/* test_model.c - GGUF reading, the BitLinear golden, and whole-model logits against
 * the golden outputs of tests/fixtures (tolerances from their README). */
#include "test.h"

#include "golden.h"
#include "kernels/kernels.h"
#include "kernels/quants.h"
#include "tools/gguf_write.h"
#include "base/status.h"
#include "worker/forward.h"
#include "worker/gguf.h"
#include "worker/model.h"
#include "worker/repack.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

#define FIX "tests/fixtures/"

/* golden comparisons use the exact (f16) LM head; the default trades a little
 * accuracy for speed and is measured by lm_head_formats */
static const bn_model_opts_t exact_head = { .head_type = BN_HEAD_F16 };

static const char *const valid_models[] = {
    FIX "tiny-b158-i2_s.gguf", FIX "tiny-b158-tq2_0.gguf", FIX "tiny-b158-tq1_0.gguf", FIX "tiny-bitnet-tq2_0.gguf",
};

BN_TEST(gguf_fixtures_open)
{
    for (size_t i = 0; i < 4; i++) {
        bn_gguf_t *g = NULL;
        char err[512] = "";
        int rc = bn_gguf_open(valid_models[i], &g, err, sizeof err);
        if (rc)
            BN_FAIL("%s: %s", valid_models[i], err);
        CHECK_EQ_INT(g->version, 3);
        CHECK(g->n_tensors == 46 || g->n_tensors == 46);
        CHECK(bn_gguf_tensor(g, "token_embd.weight") != NULL);
        uint32_t n_embd = 0;
        CHECK_EQ_INT(bn_gguf_get_u32(g, "bitnet-b1.58.embedding_length", &n_embd, err, sizeof err) == BN_OK ||
                         bn_gguf_get_u32(g, "bitnet.embedding_length", &n_embd, err, sizeof err) == BN_OK, 1);
        CHECK_EQ_INT(n_embd, 256);
        bn_gguf_close(&g);
        CHECK(g == NULL);
        bn_gguf_close(&g); /* NULL is fine */
    }
}

/* Every malformed fixture is refused with the right status and a message naming the
 * file and the culprit. */
BN_TEST(gguf_bad_fixtures)
{
    static const struct { const char *file, *want1, *want2; } cases[] = {
        { "bad-magic.gguf", "bad magic", NULL },
        { "bad-truncated-header.gguf", "truncated header", NULL },
        { "bad-truncated-data.gguf", "blk.1.ffn_up.weight", "beyond the end" },
        { "bad-unknown-type.gguf", "unknown tensor type 77", "blk.0.attn_q.weight" },
        { "bad-offset-out-of-range.gguf", "offset out of range", "blk.3.ffn_down.weight" },
        { "bad-missing-key.gguf", "missing required key", "embedding_length" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[256], err[512] = "";
        snprintf(path, sizeof path, FIX "%s", cases[i].file);
        bn_model_t *m = NULL;
        int rc = bn_model_load(path, NULL, &m, err, sizeof err);
        fprintf(stderr, "  %s -> %s: %s\n", cases[i].file, bn_status_name(rc), err);
        CHECK(rc != BN_OK);
        CHECK(m == NULL);
        CHECK(strstr(err, cases[i].file) != NULL);
        CHECK(strstr(err, cases[i].want1) != NULL);
        CHECK(!cases[i].want2 || strstr(err, cases[i].want2) != NULL);
        CHECK(strchr(err, '\n') == NULL);
    }
}

/* Write a copy of the i2_s fixture with bytes patched, for hand-made defects. */
static void write_patched(const char *out, size_t off, const void *bytes, size_t n, size_t truncate_to)
{
    size_t len;
    char *buf = bn_test_read_file(FIX "tiny-b158-i2_s.gguf", &len);
    CHECK(buf != NULL);
    if (bytes)
        memcpy(buf + off, bytes, n);
    FILE *f = fopen(out, "wb");
    CHECK(f != NULL);
    fwrite(buf, 1, truncate_to ? truncate_to : len, f);
    fclose(f);
    free(buf);
}

BN_TEST(gguf_hostile_headers)
{
    char err[512];
    bn_gguf_t *g = NULL;
    const char *p = "/tmp/bn-test-hostile.gguf";
    /* n_tensors / n_kv that would overflow an allocation */
    uint64_t huge = 0x2000000000000000ull;
    write_patched(p, 8, &huge, 8, 0);
    CHECK(bn_gguf_open(p, &g, err, sizeof err) == BN_EFORMAT);
    fprintf(stderr, "  huge n_tensors: %s\n", err);
    write_patched(p, 16, &huge, 8, 0);
    CHECK(bn_gguf_open(p, &g, err, sizeof err) == BN_EFORMAT);
    fprintf(stderr, "  huge n_kv: %s\n", err);
    /* the first key's length longer than the file */
    uint64_t big = 1ull << 40;
    write_patched(p, 24, &big, 8, 0);
    CHECK(bn_gguf_open(p, &g, err, sizeof err) == BN_EFORMAT);
    fprintf(stderr, "  long key: %s\n", err);
    /* every truncation of the header is an error, never a crash */
    bn_gguf_t *full = NULL;
    CHECK(bn_gguf_open(FIX "tiny-b158-i2_s.gguf", &full, err, sizeof err) == BN_OK);
    size_t hdr = full->data_offset;
    bn_gguf_close(&full);
    for (size_t cut = 0; cut < hdr; cut += (cut < 64 ? 1 : 97)) {
        write_patched(p, 0, NULL, 0, cut ? cut : 1);
        int rc = bn_gguf_open(p, &g, err, sizeof err);
        if (rc == BN_OK)
            BN_FAIL("cut at %zu of %zu header bytes was accepted", cut, hdr);
    }
    /* misaligned tensor offset: the first tensor's offset field + 1 */
    CHECK(bn_gguf_open(FIX "tiny-b158-i2_s.gguf", &full, err, sizeof err) == BN_OK);
    const uint8_t *map = full->map;
    size_t name_len = strlen(full->tensors[0].name);
    /* locate the tensor descriptor by its name in the header */
    const uint8_t *at = memmem(map, hdr, full->tensors[0].name, name_len);
    CHECK(at != NULL);
    size_t off_field = (size_t)(at - map) + name_len + 4 + 8 * full->tensors[0].n_dims + 4;
    uint64_t off;
    memcpy(&off, map + off_field, 8);
    CHECK_EQ_INT(off, full->tensors[0].offset);
    bn_gguf_close(&full);
    off += 1;
    write_patched(p, off_field, &off, 8, 0);
    CHECK(bn_gguf_open(p, &g, err, sizeof err) == BN_EFORMAT);
    fprintf(stderr, "  misaligned: %s\n", err);
    CHECK(strstr(err, "not aligned") != NULL);
    unlink(p);
}

/* tiny.bitlinear.txt: q exact, y within 1e-5 relative + 1e-6 absolute. */
static void check_bitlinear(const char *model_path)
{
    char err[512];
    bn_model_t *m = NULL;
    if (bn_model_load(model_path, NULL, &m, err, sizeof err))
        BN_FAIL("%s", err);
    FILE *f = fopen(FIX "tiny.bitlinear.txt", "r");
    CHECK(f != NULL);
    char line[1 << 16];
    char tensor[128] = "", kind[32] = "";
    int n_in = 0, n_out = 0, cases = 0;
    float *x = NULL;
    int8_t q[4096];
    double s_want = 0;
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#')
            continue;
        if (!strncmp(line, "case ", 5)) {
            CHECK(sscanf(line, "case %127s %d %d %31s", tensor, &n_in, &n_out, kind) == 4);
            free(x);
            x = calloc(n_in, sizeof(float));
        } else if (!strncmp(line, "x ", 2)) {
            char *p = line + 2;
            for (int i = 0; i < n_in; i++)
                x[i] = strtof(p, &p);
        } else if (!strncmp(line, "s ", 2)) {
            s_want = strtod(line + 2, NULL);
        } else if (!strncmp(line, "q ", 2)) {
            int8_t qg[4096];
            float s;
            int32_t qsum;
            bn_ref_quantize_act(x, n_in, qg, &s, &qsum);
            CHECK_NEAR(s, s_want, fabs(s_want) * 1e-6);
            char *p = line + 2;
            for (int i = 0; i < n_in; i++) {
                q[i] = (int8_t)strtol(p, &p, 10);
                if (q[i] != qg[i])
                    BN_FAIL("%s %s case: q[%d] = %d, golden %d", tensor, kind, i, qg[i], q[i]);
            }
        } else if (!strncmp(line, "y ", 2)) {
            const bn_layer_t *L = &m->w.layers[0];
            const bn_tmat_t *w = strstr(tensor, "attn_q") ? &L->wq : &L->w_down;
            CHECK_EQ_INT(w->n_in, n_in);
            CHECK_EQ_INT(w->n_out, n_out);
            float s;
            int32_t qsum;
            int8_t qg[4096];
            float *y = calloc(n_out, sizeof(float));
            bn_ref_quantize_act(x, n_in, qg, &s, &qsum);
            bn_ref_tgemm(w, qg, &s, &qsum, 1, y, (size_t)n_out, 0, n_out);
            char *p = line + 2;
            for (int i = 0; i < n_out; i++) {
                double want = strtod(p, &p);
                CHECK_NEAR(y[i], want, 1e-5 * fabs(want) + 1e-6);
            }
            free(y);
            cases++;
        }
    }
    fclose(f);
    free(x);
    fprintf(stderr, "  %s: %d bitlinear cases exact\n", model_path, cases);
    CHECK(cases >= 10);
    bn_model_destroy(&m);
}

BN_TEST(bitlinear_golden)
{
    for (size_t i = 0; i < 3; i++)
        check_bitlinear(valid_models[i]);
}

/* Whole-model logits, in process, against <model>.logits.txt. */
BN_TEST(logits_golden)
{
    static const char *const golden[] = {
        FIX "tiny-b158-i2_s.logits.txt", FIX "tiny-b158-tq2_0.logits.txt",
        FIX "tiny-b158-tq1_0.logits.txt", FIX "tiny-bitnet-tq2_0.logits.txt",
    };
    for (size_t i = 0; i < 4; i++) {
        char err[512];
        bn_model_t *m = NULL;
        if (bn_model_load(valid_models[i], &exact_head, &m, err, sizeof err))
            BN_FAIL("%s", err);
        int V = (int)m->cfg.n_vocab;
        golden_seq_t seqs[4];
        int ns = golden_logits_read(golden[i], V, seqs, 4);
        CHECK_EQ_INT(ns, 3);
        for (int k = 0; k < ns; k++) {
            bn_state_t *st = NULL;
            CHECK(bn_state_new(m, 256, 1, BN_KV_DEFAULT, NULL, &st, err, sizeof err) == BN_OK);
            bn_batch_entry_t b[128];
            for (int p = 0; p < seqs[k].n; p++)
                b[p] = (bn_batch_entry_t){ 0, p, seqs[k].ids[p], 1 };
            float *logits = malloc((size_t)seqs[k].n * V * sizeof(float));
            CHECK(bn_forward(m, st, b, seqs[k].n, logits, err, sizeof err) == BN_OK);
            double md;
            int bad = golden_compare(logits, seqs[k].logits, seqs[k].n, V, 0.2, &md);
            fprintf(stderr, "  %s seq %d (%d positions): max |diff| %.3g\n", valid_models[i], k, seqs[k].n, md);
            CHECK(md <= 0.2);
            CHECK_EQ_INT(bad, 0);
            free(logits);
            bn_state_destroy(&st);
            golden_seq_free(&seqs[k]);
        }
        bn_model_destroy(&m);
    }
}

/* Copy of `src` where tensor `halve` has every TQ2_0 block scale d halved (exact in
 * fp16) and a `<name>.scale` tensor of 2.0 is added: the same model, so the same
 * logits, if and only if the optional scale tensor is applied. */
static void write_scaled_copy(const char *src, const char *dst, const char *halve, const char *scale_name)
{
    char err[512];
    bn_gguf_t *g = NULL;
    if (bn_gguf_open(src, &g, err, sizeof err))
        BN_FAIL("%s", err);
    bn_gguf_writer_t *w = bn_gguf_writer_new();
    CHECK(w != NULL);
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const bn_gguf_kv_t *kv = &g->kv[i];
        int rc;
        if (kv->type == BN_GGUF_STRING || (kv->type == BN_GGUF_ARRAY && kv->arr_type == BN_GGUF_STRING)) {
            char **s = calloc(kv->n, sizeof *s);
            for (uint64_t j = 0; j < kv->n; j++)
                s[j] = strndup(kv->strs[j].ptr, kv->strs[j].len);
            rc = kv->type == BN_GGUF_STRING ? bn_gguf_writer_add_str(w, kv->key, s[0], err, sizeof err)
                                            : bn_gguf_writer_add_arr_str(w, kv->key, (const char *const *)s, kv->n, err, sizeof err);
            for (uint64_t j = 0; j < kv->n; j++)
                free(s[j]);
            free(s);
        } else if (kv->type == BN_GGUF_ARRAY) {
            rc = bn_gguf_writer_add_arr(w, kv->key, kv->arr_type, kv->data, kv->n, err, sizeof err);
        } else {
            rc = bn_gguf_writer_add_kv(w, kv->key, kv->type, kv->data, err, sizeof err);
        }
        if (rc)
            BN_FAIL("%s", err);
    }
    uint8_t *copy = NULL;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const bn_gguf_tensor_t *t = &g->tensors[i];
        const void *data = t->data;
        if (strcmp(t->name, halve) == 0) {
            CHECK_EQ_INT(t->type, BN_TYPE_TQ2_0);
            copy = malloc(t->nbytes);
            memcpy(copy, t->data, t->nbytes);
            bn_block_tq2_0 *b = (bn_block_tq2_0 *)copy;
            for (uint64_t k = 0; k < t->nbytes / sizeof *b; k++)
                b[k].d = bn_f32_to_fp16(bn_fp16_to_f32(b[k].d) * 0.5f);
            data = copy;
        }
        if (bn_gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, t->nbytes, data, err, sizeof err))
            BN_FAIL("%s", err);
    }
    static const float two = 2.0f;
    uint64_t one = 1;
    if (bn_gguf_writer_add_tensor(w, scale_name, BN_TYPE_F32, 1, &one, 4, &two, err, sizeof err) ||
        bn_gguf_writer_write(w, dst, err, sizeof err))
        BN_FAIL("%s", err);
    bn_gguf_writer_destroy(&w);
    free(copy);
    bn_gguf_close(&g);
}

BN_TEST(scale_tensor_applied)
{
    const char *p = "/tmp/bn-test-scaled.gguf";
    write_scaled_copy(FIX "tiny-b158-tq2_0.gguf", p, "blk.1.attn_output.weight", "blk.1.attn_output.scale");
    char err[512];
    bn_model_t *a = NULL, *b = NULL;
    CHECK(bn_model_load(FIX "tiny-b158-tq2_0.gguf", NULL, &a, err, sizeof err) == BN_OK);
    if (bn_model_load(p, NULL, &b, err, sizeof err))
        BN_FAIL("%s", err);
    /* the repacked scale is the blocks' d times the scale tensor: d/2 * 2 = d */
    CHECK_NEAR(b->w.layers[1].wo.scale, a->w.layers[1].wo.scale, 0);
    bn_batch_entry_t e[8];
    for (int i = 0; i < 8; i++)
        e[i] = (bn_batch_entry_t){ 0, i, (i * 37 + 5) % 496, 1 };
    float *la = malloc(8 * 512 * sizeof(float)), *lb = malloc(8 * 512 * sizeof(float));
    bn_state_t *st = NULL;
    CHECK(bn_state_new(a, 8, 1, BN_KV_DEFAULT, NULL, &st, err, sizeof err) == BN_OK);
    CHECK(bn_forward(a, st, e, 8, la, err, sizeof err) == BN_OK);
    bn_state_destroy(&st);
    CHECK(bn_state_new(b, 8, 1, BN_KV_DEFAULT, NULL, &st, err, sizeof err) == BN_OK);
    CHECK(bn_forward(b, st, e, 8, lb, err, sizeof err) == BN_OK);
    bn_state_destroy(&st);
    double md = 0;
    for (int i = 0; i < 8 * 512; i++)
        if (fabs(la[i] - lb[i]) > md)
            md = fabs(la[i] - lb[i]);
    fprintf(stderr, "  halved d with .scale = 2: max |diff| %.3g\n", md);
    CHECK(md < 1e-4);
    /* and without the scale tensor the model is different: the check above can fail */
    b->w.layers[1].wo.scale *= 0.5f;
    CHECK(bn_state_new(b, 8, 1, BN_KV_DEFAULT, NULL, &st, err, sizeof err) == BN_OK);
    CHECK(bn_forward(b, st, e, 8, lb, err, sizeof err) == BN_OK);
    bn_state_destroy(&st);
    md = 0;
    for (int i = 0; i < 8 * 512; i++)
        if (fabs(la[i] - lb[i]) > md)
            md = fabs(la[i] - lb[i]);
    fprintf(stderr, "  halved d without it: max |diff| %.3g\n", md);
    CHECK(md > 1e-2);
    free(la);
    free(lb);
    bn_model_destroy(&a);
    bn_model_destroy(&b);
    unlink(p);
}

/* TQ2_0 into the kernels' layout against the formats.md definition, element by
 * element, for whole rows and for a column slice; and a field holding 3 (not a
 * trit) rejected with the tensor named. */
BN_TEST(repack_tq2_vs_naive)
{
    enum { R = 5, N = 768, NB = N / 256 };
    static bn_block_tq2_0 src[R * NB];
    static uint8_t u[R][N];
    uint32_t seed = (uint32_t)bn_test_seed();
    for (int r = 0; r < R; r++)
        for (int i = 0; i < N; i++) {
            seed = seed * 1664525u + 1013904223u;
            u[r][i] = (uint8_t)((seed >> 16) % 3);
        }
    /* formats.md: value 128h + 32n + m of a block is (qs[32h + m] >> 2n) & 3 */
    memset(src, 0, sizeof src);
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            bn_block_tq2_0 *blk = &src[r * NB + b];
            blk->d = bn_f32_to_fp16(0.5f);
            for (int k = 0; k < 256; k++) {
                int h = k / 128, n = k % 128 / 32, m = k % 32;
                blk->qs[32 * h + m] |= (uint8_t)(u[r][256 * b + k] << (2 * n));
            }
        }
    static const uint32_t cols[2][2] = { { 0, N }, { 256, 768 } };
    for (int c = 0; c < 2; c++) {
        bn_tmat_t w;
        void *owned = NULL;
        char err[256];
        const uint32_t c0 = cols[c][0], c1 = cols[c][1];
        CHECK_EQ_INT(bn_repack_ternary("t", BN_TYPE_TQ2_0, src, N, R, 1, R, c0, c1, &w, &owned, err, sizeof err), BN_OK);
        CHECK(owned != NULL && w.n_out == R - 1 && w.n_in == c1 - c0 && w.scale == 0.5f && !w.bscale);
        for (int r = 1; r < R; r++)
            for (uint32_t e = 0; e < c1 - c0; e++) {
                /* repack.h: row-major I2_S rows, weight 128b + 32g + j in byte 32b + j, bits 6-2g..7-2g */
                uint32_t b = e / 128, g = e % 128 / 32, j = e % 32;
                int got = (w.data[(size_t)(r - 1) * w.row_bytes + 32 * b + j] >> (6 - 2 * g)) & 3;
                if (got != u[r][c0 + e])
                    BN_FAIL("row %d column %u: %d, want %d", r, c0 + e, got, u[r][c0 + e]);
            }
        free(owned);
    }
    src[2 * NB + 1].qs[17] |= 3 << 4; /* row 2, block 1: a field of 3 */
    bn_tmat_t w;
    void *owned = NULL;
    char err[256] = "";
    CHECK_EQ_INT(bn_repack_ternary("blk.0.ffn_up.weight", BN_TYPE_TQ2_0, src, N, R, 0, R, 0, N, &w, &owned, err,
                                   sizeof err), BN_EFORMAT);
    CHECK(owned == NULL);
    CHECK(strstr(err, "blk.0.ffn_up.weight") && strstr(err, "block 1 of row 2") && strstr(err, "not a trit"));
}
