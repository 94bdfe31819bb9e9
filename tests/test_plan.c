/* test_plan.c - the sharding planner: invariants over many worlds and pins, the
 * pin and memory errors, and uneven splits checked by hand. */
#include "test.h"

#include "coordinator/plan.h"
#include "base/status.h"

#include <string.h>

/* the tiny fixture model and the BitNet b1.58 2B4T shape; KV in f16 */
static bn_plan_model_t fixture_shape(void)
{
    return (bn_plan_model_t){ .n_layer = 4, .n_embd = 256, .n_ff = 640, .n_head = 8, .n_head_kv = 2,
                              .head_dim = 32, .n_vocab = 512, .head_row_bytes = 256 * 26 / 32,
                              .kv_bytes_per_pos = 2 * 2 * 32 * 2 };
}

static bn_plan_model_t b2b4t_shape(void)
{
    return (bn_plan_model_t){ .n_layer = 30, .n_embd = 2560, .n_ff = 6912, .n_head = 20, .n_head_kv = 5,
                              .head_dim = 128, .n_vocab = 128256, .head_row_bytes = 2560 * 26 / 32,
                              .kv_bytes_per_pos = 2 * 5 * 128 * 2 };
}

static bn_plan_in_t base_in(int world, int rpn)
{
    return (bn_plan_in_t){ .world = world, .ranks_per_node = rpn, .n_ctx = 256, .n_seq = 2 };
}

/* plan.h's weight_bytes, written out again */
static uint64_t expect_weight(const bn_plan_model_t *m, const bn_shard_t *s)
{
    uint64_t q = (uint64_t)(s->head1 - s->head0) * m->head_dim, kv = (uint64_t)(s->kv1 - s->kv0) * m->head_dim;
    uint64_t ff = s->ff1 - s->ff0, row = m->n_embd / 4;
    uint64_t layer = q * row + 2 * kv * row + m->n_embd * ((q + 127) / 128 * 32) + 2 * ff * row +
                     m->n_embd * ((ff + 127) / 128 * 32);
    return layer * (s->layer1 - s->layer0) + (uint64_t)(s->vocab1 - s->vocab0) * m->head_row_bytes;
}

static uint64_t expect_kv(const bn_plan_model_t *m, const bn_plan_in_t *in, const bn_shard_t *s)
{
    return (uint64_t)(s->layer1 - s->layer0) * in->n_seq * in->n_ctx * (s->kv1 - s->kv0) * m->kv_bytes_per_pos /
           m->n_head_kv;
}

static void check_plan(const bn_plan_model_t *m, const bn_plan_in_t *in, const bn_plan_t *p)
{
    const int R = p->R, P = p->P, T = p->T;
    const uint32_t g = m->n_head / m->n_head_kv;
    CHECK_EQ_INT(p->world, in->world);
    CHECK_EQ_INT(R * P * T, in->world);
    if (in->tp) CHECK_EQ_INT(T, in->tp);
    if (in->pp) CHECK_EQ_INT(P, in->pp);
    if (in->replicas) CHECK_EQ_INT(R, in->replicas);
    CHECK(P >= 1 && (uint32_t)P <= m->n_layer);
    CHECK_EQ_INT(bn_plan_rank(p, R, 0, 0), -1);
    for (int r = 0; r < R; r++)
        for (int s = 0; s < P; s++) {
            const int last = s == P - 1;
            uint32_t h = 0, kv = 0, ff = 0, v = 0;
            for (int t = 0; t < T; t++) {
                const int i = bn_plan_rank(p, r, s, t);
                CHECK_EQ_INT(i, (r * P + s) * T + t);
                const bn_shard_t *x = &p->rank[i], *first = &p->rank[s * T]; /* replica 0, tp 0 */
                CHECK_EQ_INT(x->replica, r);
                CHECK_EQ_INT(x->stage, s);
                CHECK_EQ_INT(x->tp, t);
                /* layers: the same on every tensor rank and replica, stages contiguous and non-empty */
                CHECK_EQ_INT(x->layer0, first->layer0);
                CHECK_EQ_INT(x->layer1, first->layer1);
                CHECK(x->layer0 < x->layer1);
                CHECK_EQ_INT(x->layer0, s == 0 ? 0 : p->rank[(s - 1) * T].layer1);
                if (last)
                    CHECK_EQ_INT(x->layer1, m->n_layer);
                /* heads, FFN rows and vocabulary rows partition their ranges in tp order */
                CHECK_EQ_INT(x->head0, h);
                CHECK(x->head1 >= x->head0);
                h = x->head1;
                CHECK_EQ_INT(x->ff0, ff);
                CHECK(x->ff1 >= x->ff0);
                ff = x->ff1;
                if (last) {
                    CHECK_EQ_INT(x->vocab0, v);
                    CHECK(x->vocab1 >= x->vocab0);
                    v = x->vocab1;
                } else {
                    CHECK_EQ_INT(x->vocab1 - x->vocab0, 0);
                }
                if (m->n_head_kv % (uint32_t)T == 0) {
                    CHECK_EQ_INT(x->kv0, kv);
                    CHECK(x->kv1 > x->kv0);
                    kv = x->kv1;
                    CHECK_EQ_INT(x->head0, x->kv0 * g);
                    CHECK_EQ_INT(x->head1, x->kv1 * g);
                } else if (x->head1 > x->head0) {
                    CHECK_EQ_INT(x->kv0, x->head0 / g);
                    CHECK_EQ_INT(x->kv1, (x->head1 + g - 1) / g);
                } else {
                    CHECK_EQ_INT(x->kv1 - x->kv0, 0);
                }
                CHECK_EQ_INT(x->weight_bytes, expect_weight(m, x));
                CHECK_EQ_INT(x->kv_bytes, expect_kv(m, in, x));
                if (in->mem_per_rank)
                    CHECK(x->weight_bytes + x->kv_bytes <= in->mem_per_rank);
            }
            CHECK_EQ_INT(h, m->n_head);
            CHECK_EQ_INT(ff, m->n_ff);
            if (m->n_head_kv % (uint32_t)T == 0)
                CHECK_EQ_INT(kv, m->n_head_kv);
            if (last)
                CHECK_EQ_INT(v, m->n_vocab);
        }
}

/* the largest weights + KV of any rank */
static uint64_t max_need(const bn_plan_t *p)
{
    uint64_t worst = 0;
    for (int i = 0; i < p->world; i++)
        if (p->rank[i].weight_bytes + p->rank[i].kv_bytes > worst)
            worst = p->rank[i].weight_bytes + p->rank[i].kv_bytes;
    return worst;
}

BN_TEST(plan_every_world)
{
    const bn_plan_model_t shapes[2] = { fixture_shape(), b2b4t_shape() };
    char err[512];
    int n_plans = 0;
    for (int sh = 0; sh < 2; sh++) {
        const bn_plan_model_t *m = &shapes[sh];
        for (int world = 1; world <= 16; world++) {
            const int rpns[3] = { 1, 2, world };
            for (int ri = 0; ri < 3; ri++)
                for (int mode = 0; mode < 5; mode++) {
                    bn_plan_in_t in = base_in(world, rpns[ri]);
                    if (mode == 1) in.tp = world;
                    if (mode == 2) {
                        if ((uint32_t)world > m->n_layer)
                            continue;
                        in.pp = world;
                    }
                    if (mode == 3) in.replicas = world;
                    bn_plan_t p;
                    if (mode == 4) {
                        /* auto with memory: half of what the one-stage plan needs */
                        CHECK_EQ_INT(bn_plan_make(m, &in, &p, err, sizeof err), BN_OK);
                        in.mem_per_rank = max_need(&p) / 2;
                        bn_plan_free(&p);
                        int rc = bn_plan_make(m, &in, &p, err, sizeof err);
                        if (rc) {
                            CHECK_EQ_INT(rc, BN_EINVAL);
                            CHECK(strstr(err, "bytes"));
                            continue;
                        }
                        CHECK(p.P > 1);
                    } else {
                        int rc = bn_plan_make(m, &in, &p, err, sizeof err);
                        if (rc)
                            BN_FAIL("shape %d world %d rpn %d mode %d: %s", sh, world, rpns[ri], mode, err);
                    }
                    if (mode == 0) {
                        /* the rule: T the largest divisor of the world within a node, P = 1 */
                        int T = 1;
                        for (int d = 1; d <= world && d <= rpns[ri]; d++)
                            if (world % d == 0)
                                T = d;
                        CHECK_EQ_INT(p.T, T);
                        CHECK_EQ_INT(p.P, 1);
                    }
                    check_plan(m, &in, &p);
                    bn_plan_free(&p);
                    CHECK(p.rank == NULL);
                    n_plans++;
                }
        }
    }
    fprintf(stderr, "  %d plans checked\n", n_plans);
}

static void expect_error(const bn_plan_model_t *m, bn_plan_in_t in, const char *word, const char *word2)
{
    bn_plan_t p;
    char err[512];
    int rc = bn_plan_make(m, &in, &p, err, sizeof err);
    if (rc != BN_EINVAL)
        BN_FAIL("world %d tp %d pp %d replicas %d: expected BN_EINVAL, got %d", in.world, in.tp, in.pp,
                in.replicas, rc);
    CHECK(p.rank == NULL);
    if (!strstr(err, word) || (word2 && !strstr(err, word2)))
        BN_FAIL("message \"%s\" lacks \"%s\"%s%s", err, word, word2 ? " or " : "", word2 ? word2 : "");
    fprintf(stderr, "  %s\n", err);
    bn_plan_free(&p);
}

BN_TEST(plan_pins_errors)
{
    const bn_plan_model_t fx = fixture_shape(), big = b2b4t_shape();
    bn_plan_in_t in = base_in(8, 8);
    in.tp = 3;
    expect_error(&fx, in, "--tp 3 does not divide", "8 ranks");
    in.pp = 2;
    expect_error(&fx, in, "--tp 3 x --pp 2 = 6 does not divide the world size of 8 ranks", NULL);
    in = base_in(8, 8);
    in.pp = 5;
    expect_error(&fx, in, "4 layers", "--pp 5");
    in = base_in(4, 4);
    in.replicas = 3;
    expect_error(&fx, in, "divide", "--replicas 3");
    in = base_in(4, 4);
    in.tp = -1;
    expect_error(&fx, in, "--tp -1", ">= 0");
    in = base_in(4, 4);
    in.pp = -2;
    expect_error(&fx, in, "--pp -2", ">= 0");
    in = base_in(8, 8);
    in.tp = 2, in.pp = 2, in.replicas = 1;
    expect_error(&fx, in, "world", "= 4");
    in = base_in(8, 8);
    in.tp = 16;
    expect_error(&fx, in, "divide", NULL);
    in = base_in(0, 1);
    expect_error(&fx, in, "ranks", NULL);
    bn_plan_model_t odd = fx;
    odd.n_head_kv = 3;
    expect_error(&odd, base_in(2, 2), "n_head_kv", NULL);

    /* everything pinned and a rank does not fit */
    in = base_in(2, 2);
    in.tp = 1, in.pp = 2, in.replicas = 1, in.mem_per_rank = 1000;
    expect_error(&fx, in, "bytes", "MB");
    expect_error(&fx, in, "rank 1 (replica 0 stage 1", "2 stages");

    /* auto with too little memory for any P */
    in = base_in(4, 1);
    in.mem_per_rank = 1000;
    expect_error(&big, in, "no plan fits", "bytes");

    /* auto: P = 1 would not fit by one byte, so more stages */
    bn_plan_t p;
    char err[512];
    in = base_in(4, 1);
    in.n_ctx = 4096;
    CHECK_EQ_INT(bn_plan_make(&big, &in, &p, err, sizeof err), BN_OK);
    CHECK_EQ_INT(p.P, 1);
    CHECK_EQ_INT(p.T, 1);
    in.mem_per_rank = max_need(&p) - 1;
    bn_plan_free(&p);
    CHECK_EQ_INT(bn_plan_make(&big, &in, &p, err, sizeof err), BN_OK);
    CHECK(p.P > 1);
    CHECK_EQ_INT(p.R * p.P * p.T, 4);
    check_plan(&big, &in, &p);
    bn_plan_free(&p);

    /* the same memory with everything pinned to one stage: the error names the rank */
    in.tp = 1, in.pp = 1, in.replicas = 4;
    expect_error(&big, in, "rank 0", "the plan does not fit");

    /* --replicas 1 with one rank per node and more ranks than layers: more tensor ranks */
    in = base_in(16, 1);
    in.replicas = 1;
    CHECK_EQ_INT(bn_plan_make(&fx, &in, &p, err, sizeof err), BN_OK);
    CHECK_EQ_INT(p.R, 1);
    CHECK_EQ_INT(p.P, 4);
    CHECK_EQ_INT(p.T, 4);
    check_plan(&fx, &in, &p);
    bn_plan_free(&p);
    bn_plan_free(NULL);
}

BN_TEST(plan_uneven)
{
    const bn_plan_model_t fx = fixture_shape();
    bn_plan_t p;
    char err[512];
    bn_plan_in_t in = base_in(3, 3);
    in.tp = 3;
    CHECK_EQ_INT(bn_plan_make(&fx, &in, &p, err, sizeof err), BN_OK);
    CHECK_EQ_INT(p.T, 3);
    check_plan(&fx, &in, &p);
    const uint32_t heads[4] = { 0, 2, 5, 8 }, ffn[4] = { 0, 128, 384, 640 };
    const uint32_t kv[3][2] = { { 0, 1 }, { 0, 2 }, { 1, 2 } };
    for (int t = 0; t < 3; t++) {
        const bn_shard_t *x = &p.rank[t];
        CHECK_EQ_INT(x->head0, heads[t]);
        CHECK_EQ_INT(x->head1, heads[t + 1]);
        CHECK_EQ_INT(x->kv0, kv[t][0]);
        CHECK_EQ_INT(x->kv1, kv[t][1]);
        CHECK_EQ_INT(x->ff0, ffn[t]);
        CHECK_EQ_INT(x->ff1, ffn[t + 1]);
        CHECK(x->vocab1 > x->vocab0);
        CHECK_EQ_INT(x->vocab0 % BN_PLAN_VOCAB_BLOCK, 0);
    }
    bn_plan_print(&p, stderr, "  ");
    bn_plan_free(&p);

    /* 7 tensor ranks: 5 FFN blocks leave two ranks without FFN rows; 64 vocab blocks reach every rank */
    in = base_in(7, 7);
    in.tp = 7;
    CHECK_EQ_INT(bn_plan_make(&fx, &in, &p, err, sizeof err), BN_OK);
    check_plan(&fx, &in, &p);
    int no_ffn = 0;
    for (int t = 0; t < 7; t++) {
        no_ffn += p.rank[t].ff1 == p.rank[t].ff0;
        CHECK(p.rank[t].vocab1 > p.rank[t].vocab0);
        CHECK(p.rank[t].head1 > p.rank[t].head0);
    }
    CHECK_EQ_INT(no_ffn, 2);
    bn_plan_free(&p);

    /* more tensor ranks than query heads: some hold no heads and no KV */
    in = base_in(12, 12);
    in.tp = 12;
    CHECK_EQ_INT(bn_plan_make(&fx, &in, &p, err, sizeof err), BN_OK);
    check_plan(&fx, &in, &p);
    int no_heads = 0;
    for (int t = 0; t < 12; t++)
        no_heads += p.rank[t].head1 == p.rank[t].head0 && p.rank[t].kv1 == p.rank[t].kv0;
    CHECK_EQ_INT(no_heads, 4);
    bn_plan_free(&p);

    /* 2B4T over 2 stages x 4 tensor ranks: the LM head (~15 layers' worth at T = 1)
     * leaves the last stage fewer layers */
    const bn_plan_model_t big = b2b4t_shape();
    in = base_in(8, 4);
    in.pp = 2;
    CHECK_EQ_INT(bn_plan_make(&big, &in, &p, err, sizeof err), BN_OK);
    check_plan(&big, &in, &p);
    CHECK(p.rank[4].layer1 - p.rank[4].layer0 < p.rank[0].layer1 - p.rank[0].layer0);
    bn_plan_print(&p, stderr, "  ");
    bn_plan_free(&p);
}
