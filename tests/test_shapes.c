/* test_shapes.c - shapes beyond the fixtures' (no GQA, one KV head, head_dim 128,
 * widths that are multiples of 128 but not 256, every embedding type, eps and RoPE
 * base from metadata, all three architectures): models made by bitnet-mkmodel are
 * run through bn_forward and through a naive reference written here in double
 * precision. The reference shares only the BitLinear kernel with the engine (that
 * kernel is pinned by the golden bitlinear test), so it checks how the forward pass
 * assembles heads, GQA groups, RoPE, norms and the head for each shape. */
#include "test.h"

#include "kernels/kernels.h"
#include "base/status.h"
#include "worker/forward.h"
#include "worker/model.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

/* golden comparisons use the exact (f16) LM head; the default trades a little
 * accuracy for speed and is measured by lm_head_formats */
static const bn_model_opts_t exact_head = { .head_type = BN_HEAD_F16 };

static const char *bin_dir(void)
{
    const char *b = getenv("BN_BIN");
    return b ? b : "bin";
}

static void rmsnorm_d(const double *x, const float *w, int n, double eps, double *out)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        out[i] = x[i] * r * w[i];
}

/* BitLinear through the reference kernel, from double input. */
static void bitlinear_d(const bn_tmat_t *w, const double *x, double *y)
{
    float *xf = malloc(w->n_in * sizeof(float)), *yf = malloc(w->n_out * sizeof(float));
    int8_t *q = malloc(w->n_in);
    for (uint32_t i = 0; i < w->n_in; i++)
        xf[i] = (float)x[i];
    float s;
    int32_t qs;
    bn_ref_quantize_act(xf, (int)w->n_in, q, &s, &qs);
    bn_ref_tgemm(w, q, &s, &qs, 1, yf, w->n_out, 0, (int)w->n_out);
    for (uint32_t i = 0; i < w->n_out; i++)
        y[i] = yf[i];
    free(xf);
    free(yf);
    free(q);
}

/* Rotate head vector v (head_dim) at pos: pairs (i, i + rope_dim/2). */
static void rope_d(double *v, int rope_dim, int pos, double base)
{
    int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        double th = pos / pow(base, (2.0 * i) / rope_dim);
        double a = v[i], b = v[i + half];
        v[i] = a * cos(th) - b * sin(th);
        v[i + half] = a * sin(th) + b * cos(th);
    }
}

/* Logits of every position of ids (n), recomputing the whole prefix per layer;
 * window > 0: each position attends to the last `window` positions only. */
static void naive_forward(const bn_model_t *m, const int32_t *ids, int n, int window, double *logits)
{
    const bn_config_t *c = &m->cfg;
    int D = (int)c->n_embd, F = (int)c->n_ff, HD = (int)c->head_dim, H = (int)c->n_head, KVH = (int)c->n_head_kv;
    double *x = calloc((size_t)n * D, sizeof(double));
    double *K = calloc((size_t)n * KVH * HD, sizeof(double)), *V = calloc((size_t)n * KVH * HD, sizeof(double));
    double *Q = calloc((size_t)n * H * HD, sizeof(double));
    double *t1 = calloc(F > D ? F : D, sizeof(double)), *t2 = calloc(F > D ? F : D, sizeof(double));
    double *t3 = calloc(F > D ? F : D, sizeof(double));
    float *row = malloc(D * sizeof(float));
    for (int p = 0; p < n; p++) {
        bn_ref_dequant_row(m->w.embd_type, m->w.token_embd + (size_t)ids[p] * m->w.embd_row_bytes, row, D);
        for (int i = 0; i < D; i++)
            x[(size_t)p * D + i] = row[i];
    }
    for (uint32_t l = 0; l < c->n_layer; l++) {
        const bn_layer_t *L = &m->w.layers[l];
        for (int p = 0; p < n; p++) {
            rmsnorm_d(x + (size_t)p * D, L->attn_norm, D, c->norm_eps, t1);
            bitlinear_d(&L->wq, t1, Q + (size_t)p * H * HD);
            bitlinear_d(&L->wk, t1, K + (size_t)p * KVH * HD);
            bitlinear_d(&L->wv, t1, V + (size_t)p * KVH * HD);
            for (int h = 0; h < H; h++)
                rope_d(Q + ((size_t)p * H + h) * HD, (int)c->rope_dim, p, c->rope_base);
            for (int h = 0; h < KVH; h++)
                rope_d(K + ((size_t)p * KVH + h) * HD, (int)c->rope_dim, p, c->rope_base);
        }
        for (int p = 0; p < n; p++) {
            double *att = t2;
            for (int h = 0; h < H; h++) {
                int kh = h * KVH / H; /* the group of query head h */
                const double *q = Q + ((size_t)p * H + h) * HD;
                double *sc = malloc((p + 1) * sizeof(double)), mx = -INFINITY, sum = 0;
                const int t0 = window && p + 1 > window ? p + 1 - window : 0;
                for (int t = 0; t < t0; t++)
                    sc[t] = 0; /* (weight 0 below) */
                for (int t = t0; t <= p; t++) {
                    const double *k = K + ((size_t)t * KVH + kh) * HD;
                    double d = 0;
                    for (int i = 0; i < HD; i++)
                        d += q[i] * k[i];
                    sc[t] = d / sqrt((double)HD);
                    mx = fmax(mx, sc[t]);
                }
                for (int t = t0; t <= p; t++)
                    sum += (sc[t] = exp(sc[t] - mx));
                for (int i = 0; i < HD; i++) {
                    double a = 0;
                    for (int t = t0; t <= p; t++)
                        a += sc[t] / sum * V[((size_t)t * KVH + kh) * HD + i];
                    att[h * HD + i] = a;
                }
                free(sc);
            }
            rmsnorm_d(att, L->attn_sub_norm, H * HD, c->norm_eps, t1);
            bitlinear_d(&L->wo, t1, t3);
            for (int i = 0; i < D; i++)
                x[(size_t)p * D + i] += t3[i];
            rmsnorm_d(x + (size_t)p * D, L->ffn_norm, D, c->norm_eps, t1);
            double *g = malloc(F * sizeof(double)), *u = malloc(F * sizeof(double));
            bitlinear_d(&L->w_gate, t1, g);
            bitlinear_d(&L->w_up, t1, u);
            for (int i = 0; i < F; i++) {
                double a = c->ffn_act == BN_FFN_RELU2 ? (g[i] > 0 ? g[i] * g[i] : 0) : g[i] / (1 + exp(-g[i]));
                g[i] = a * u[i];
            }
            rmsnorm_d(g, L->ffn_sub_norm, F, c->norm_eps, t1);
            bitlinear_d(&L->w_down, t1, t3);
            for (int i = 0; i < D; i++)
                x[(size_t)p * D + i] += t3[i];
            free(g);
            free(u);
        }
    }
    for (int p = 0; p < n; p++) {
        rmsnorm_d(x + (size_t)p * D, m->w.output_norm, D, c->norm_eps, t1);
        for (uint32_t v = 0; v < c->n_vocab; v++) {
            bn_ref_dequant_row(m->w.embd_type, m->w.token_embd + (size_t)v * m->w.embd_row_bytes, row, D);
            double a = 0;
            for (int i = 0; i < D; i++)
                a += row[i] * t1[i];
            logits[(size_t)p * c->n_vocab + v] = a;
        }
    }
    free(x); free(K); free(V); free(Q); free(t1); free(t2); free(t3); free(row);
}

static void check_shape(const char *name, const char *flags, const char *expect_cfg)
{
    char path[128], cmd[1024];
    snprintf(path, sizeof path, "/tmp/bn-shape-%d-%s.gguf", (int)getpid(), name);
    snprintf(cmd, sizeof cmd, "%s/bitnet-mkmodel %s --seed 5 -o %s", bin_dir(), flags, path);
    int rc = bn_test_run(cmd, NULL, NULL);
    if (rc != 0)
        BN_FAIL("%s: '%s' exited %d", name, cmd, rc);
    char err[512];
    bn_model_t *m = NULL;
    if (bn_model_load(path, &exact_head, &m, err, sizeof err))
        BN_FAIL("%s: %s", name, err);
    const bn_config_t *c = &m->cfg;
    char got[256];
    snprintf(got, sizeof got, "%s embd=%u ff=%u heads=%u/%u hd=%u rope=%u eps=%g base=%g wq=%s embd=%s",
             c->arch, c->n_embd, c->n_ff, c->n_head, c->n_head_kv, c->head_dim, c->rope_dim, (double)c->norm_eps,
             (double)c->rope_base, bn_type_name(m->w.wtype), bn_type_name(m->w.embd_type));
    fprintf(stderr, "  %-8s %s\n", name, got);
    CHECK_STR_EQ(got, expect_cfg);
    enum { N = 12 };
    int32_t ids[N];
    uint64_t r = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((r >> 33) % c->n_vocab);
    }
    uint32_t V = c->n_vocab;
    float *got_l = malloc((size_t)N * V * sizeof(float));
    double *want = malloc((size_t)N * V * sizeof(double));
    bn_state_t *st = NULL;
    CHECK(bn_state_new(m, 64, 1, BN_KV_DEFAULT, NULL, &st, err, sizeof err) == BN_OK);
    bn_batch_entry_t b[N];
    for (int i = 0; i < N; i++)
        b[i] = (bn_batch_entry_t){ 0, i, ids[i], 1 };
    CHECK(bn_forward(m, st, b, N, got_l, err, sizeof err) == BN_OK);
    naive_forward(m, ids, N, 0, want);
    double md = 0, scale = 0;
    for (size_t i = 0; i < (size_t)N * V; i++) {
        md = fmax(md, fabs(got_l[i] - want[i]));
        scale = fmax(scale, fabs(want[i]));
    }
    fprintf(stderr, "  %-8s max |diff| %.3g (max |logit| %.3g)\n", name, md, scale);
    CHECK(isfinite(md));
    CHECK(md < 0.2); /* the fixtures' tolerance: int8 rounding flips stay below it */
    bn_state_destroy(&st);
    bn_model_destroy(&m);
    free(got_l);
    free(want);
    unlink(path);
}

#define SMALL "--n-vocab 512 --n-layer 2 --n-ctx 256 "

BN_TEST(shapes_vs_naive)
{
    check_shape("fixture", "--preset tiny --wtype i2_s",
                "bitnet-b1.58 embd=256 ff=640 heads=8/2 hd=32 rope=32 eps=1e-05 base=500000 wq=I2_S embd=F16");
    check_shape("nogqa", SMALL "--n-embd 256 --n-ff 512 --n-head 4 --n-head-kv 4 --wtype tq2_0",
                "bitnet-b1.58 embd=256 ff=512 heads=4/4 hd=64 rope=64 eps=1e-05 base=500000 wq=TQ2_0 embd=F16");
    check_shape("kv1", SMALL "--n-embd 256 --n-ff 512 --n-head 8 --n-head-kv 1 --wtype tq1_0 --embd-type q8_0",
                "bitnet-b1.58 embd=256 ff=512 heads=8/1 hd=32 rope=32 eps=1e-05 base=500000 wq=TQ1_0 embd=Q8_0");
    check_shape("hd128", SMALL "--n-embd 256 --n-ff 768 --n-head 2 --n-head-kv 1 --wtype i2_s --embd-type q6_k",
                "bitnet-b1.58 embd=256 ff=768 heads=2/1 hd=128 rope=128 eps=1e-05 base=500000 wq=I2_S embd=Q6_K");
    check_shape("w384", SMALL "--n-embd 384 --n-ff 640 --n-head 6 --n-head-kv 3 --wtype i2_s --embd-type f32",
                "bitnet-b1.58 embd=384 ff=640 heads=6/3 hd=64 rope=64 eps=1e-05 base=500000 wq=I2_S embd=F32");
    check_shape("eps", SMALL "--n-embd 128 --n-ff 384 --n-head 4 --n-head-kv 2 --rms-eps 1e-6 --rope-base 10000 --embd-type q4_0",
                "bitnet-b1.58 embd=128 ff=384 heads=4/2 hd=32 rope=32 eps=1e-06 base=10000 wq=I2_S embd=Q4_0");
    check_shape("silu", SMALL "--arch bitnet --n-embd 256 --n-ff 512 --n-head 4 --n-head-kv 2 --wtype tq2_0",
                "bitnet embd=256 ff=512 heads=4/2 hd=64 rope=64 eps=1e-05 base=500000 wq=TQ2_0 embd=F16");
    check_shape("b25", SMALL "--arch bitnet-25 --n-embd 256 --n-ff 512 --n-head 4 --n-head-kv 1",
                "bitnet-25 embd=256 ff=512 heads=4/1 hd=64 rope=64 eps=1e-05 base=500000 wq=I2_S embd=F16");
}

/* --window N against the naive forward pass with the same window (f32 cache:
 * only int8 flips differ), unlike the one without it; and a long run with a
 * window keeps only about a window's worth of KV pages in memory. */
BN_TEST(window_vs_naive)
{
    char err[512];
    bn_model_t *m = NULL;
    CHECK(bn_model_load("tests/fixtures/tiny-b158-i2_s.gguf", &exact_head, &m, err, sizeof err) == BN_OK);
    enum { N = 40, W = 8 };
    const uint32_t V = m->cfg.n_vocab;
    int32_t ids[N];
    for (int i = 0; i < N; i++)
        ids[i] = (int32_t)((i * 37 + 11) % V);
    float *got = malloc((size_t)N * V * sizeof(float));
    double *want = malloc((size_t)N * V * sizeof(double)), *full = malloc((size_t)N * V * sizeof(double));
    bn_state_t *st = NULL;
    CHECK(bn_state_new(m, 64, 1, BN_KV_F32, NULL, &st, err, sizeof err) == BN_OK);
    st->window = W;
    bn_batch_entry_t b[N];
    for (int i = 0; i < N; i++)
        b[i] = (bn_batch_entry_t){ 0, i, ids[i], 1 };
    CHECK(bn_forward(m, st, b, 20, got, err, sizeof err) == BN_OK); /* in two steps: the window spans them */
    CHECK(bn_forward(m, st, b + 20, N - 20, got + (size_t)20 * V, err, sizeof err) == BN_OK);
    bn_state_destroy(&st);
    naive_forward(m, ids, N, W, want);
    naive_forward(m, ids, N, 0, full);
    double md = 0, mfull = 0;
    for (size_t i = 0; i < (size_t)N * V; i++)
        md = fmax(md, fabs(got[i] - want[i]));
    for (size_t i = (size_t)W * V; i < (size_t)N * V; i++)
        mfull = fmax(mfull, fabs(want[i] - full[i]));
    fprintf(stderr, "  window %d, %d positions: max |diff| %.3g against the naive windowed pass, %.3g between "
            "windowed and full attention\n", W, N, md, mfull);
    CHECK(md < 0.2);
    CHECK(mfull > 1.0); /* the window changes the output */
    free(got); free(want); free(full);

    /* memory: 3000 positions, window 64, f16 rows of 64 bytes (64 per page) */
    const uint32_t n_ctx = 4096, w = 64;
    CHECK(bn_state_new(m, n_ctx, 1, BN_KV_F16, NULL, &st, err, sizeof err) == BN_OK);
    st->window = w;
    float *l = malloc((size_t)V * sizeof(float));
    for (int p = 0; p < 3000; p++) {
        bn_batch_entry_t e = { 0, p, (int32_t)((p * 7) % V), p == 2999 };
        CHECK(bn_forward(m, st, &e, 1, l, err, sizeof err) == BN_OK);
    }
    const size_t runs = (size_t)st->kv->n_layer * st->kv->n_kv * 2, pg = (size_t)sysconf(_SC_PAGESIZE);
    const size_t res = bn_kvcache_resident(st->kv), bound = runs * ((size_t)w * st->kv->row_bytes + 4 * pg);
    fprintf(stderr, "  window %u after 3000 positions: %zu KV bytes resident (bound %zu; %zu without a window)\n", w,
            res, bound, runs * 3000 * st->kv->row_bytes);
    CHECK(res > 0 && res <= bound);
    bn_kvcache_release(st->kv, 0);
    CHECK(bn_kvcache_resident(st->kv) == 0);
    bn_state_destroy(&st);
    free(l);
    bn_model_destroy(&m);
}
