/* test_sampler.c - the sampler's filters on hand-made logits, and determinism. */
#include "test.h"

#include "coordinator/sampler.h"
#include "base/status.h"

#include <math.h>
#include <string.h>

enum { V = 8, DRAWS = 4000 };
/* probabilities at temp 1 ~ 0.46 0.17 0.17 0.06 0.06 0.02 0.02 0.002 */
static const float logits[V] = { 3.0f, 2.0f, 2.0f, 1.0f, 1.0f, 0.0f, 0.0f, -2.0f };

static void histogram(bn_sampler_params_t p, int *count)
{
    bn_sampler_t *s = NULL;
    char err[128];
    CHECK(bn_sampler_new(&p, V, &s, err, sizeof err) == BN_OK);
    memset(count, 0, V * sizeof(int));
    for (int i = 0; i < DRAWS; i++) {
        int32_t t = bn_sampler_sample(s, logits);
        CHECK(t >= 0 && t < V);
        count[t]++;
    }
    bn_sampler_destroy(&s);
    CHECK(s == NULL);
}

BN_TEST(sampler_filters)
{
    uint64_t seed = bn_test_seed();
    int c[V];
    bn_sampler_params_t base = { .temp = 1.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f, .seed = seed };
    /* greedy: always the argmax */
    bn_sampler_params_t p = base;
    p.temp = 0.0f;
    histogram(p, c);
    CHECK_EQ_INT(c[0], DRAWS);
    /* no filter: frequencies follow softmax within 4 standard deviations */
    histogram(base, c);
    double z = 0;
    for (int i = 0; i < V; i++)
        z += exp(logits[i] - 3.0);
    for (int i = 0; i < V; i++) {
        double pr = exp(logits[i] - 3.0) / z, sd = sqrt(DRAWS * pr * (1 - pr));
        CHECK_NEAR(c[i], DRAWS * pr, 4 * sd + 1);
    }
    /* top-k 3: ids 0, 1, 2 only (the tie at 2.0 goes to the lower id) */
    p = base;
    p.top_k = 3;
    histogram(p, c);
    CHECK(c[0] > 0 && c[1] > 0 && c[2] > 0);
    CHECK_EQ_INT(c[0] + c[1] + c[2], DRAWS);
    /* top-p 0.5: the smallest prefix reaching 0.5 is {0, 1} */
    p = base;
    p.top_p = 0.5f;
    histogram(p, c);
    CHECK_EQ_INT(c[0] + c[1], DRAWS);
    CHECK(c[1] > 0);
    /* min-p 0.3: keep tokens with p >= 0.3 * p_max: e^-1 = 0.37 passes, e^-2 = 0.14 not */
    p = base;
    p.min_p = 0.3f;
    histogram(p, c);
    CHECK_EQ_INT(c[0] + c[1] + c[2], DRAWS);
    /* low temperature sharpens: argmax share rises */
    p = base;
    p.temp = 0.25f;
    histogram(p, c);
    CHECK(c[0] > DRAWS * 0.9);
    /* same seed, same sequence */
    int d[V];
    histogram(base, c);
    histogram(base, d);
    CHECK(memcmp(c, d, sizeof c) == 0);
}

BN_TEST(sampler_bad_params)
{
    char err[128];
    bn_sampler_t *s = NULL;
    bn_sampler_params_t bad[] = {
        { .temp = -1.0f, .top_p = 1.0f }, { .temp = NAN, .top_p = 1.0f }, { .temp = 1.0f, .top_p = 0.0f },
        { .temp = 1.0f, .top_p = 1.5f }, { .temp = 1.0f, .top_p = 1.0f, .min_p = 1.0f },
        { .temp = 1.0f, .top_p = 1.0f, .top_k = -1 },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_EQ_INT(bn_sampler_new(&bad[i], V, &s, err, sizeof err), BN_EINVAL);
        CHECK(s == NULL);
        fprintf(stderr, "  %s\n", err);
    }
}

/* one draw the way a sliced vocabulary makes it: each slice's candidates and
 * statistics, the pick, and the owning slice's tail walk when asked */
static int32_t sliced_draw(bn_sampler_t *s, const float *lg, uint32_t n, const uint32_t *cut, int k,
                           bn_cand_t *cand, bn_slice_stats_t *st)
{
    const bn_sampler_params_t *p = bn_sampler_params(s);
    size_t used = 0;
    for (int i = 0; i < k; i++) {
        bn_sample_slice(p, lg + cut[i], cut[i + 1] - cut[i], (int32_t)cut[i], cand + used, &st[i]);
        used += st[i].n_cand;
    }
    (void)n;
    bn_pick_t pk = bn_sampler_pick(s, st, k, cand);
    if (pk.token >= 0)
        return pk.token;
    CHECK(pk.slice >= 0 && pk.slice < k);
    int i = pk.slice;
    return bn_sample_tail(p, lg + cut[i], cut[i + 1] - cut[i], (int32_t)cut[i], &st[i], pk.last, pk.target);
}

/* Any split of the vocabulary into contiguous slices draws the same tokens as
 * one slice, for top-k, top-p, min-p and plain temperature (whose draws reach
 * past the candidates into the slices' tails). */
BN_TEST(sampler_slices)
{
    enum { N = 3000, K = 7, D = 400 };
    uint64_t seed = bn_test_seed();
    static float lg[N];
    uint64_t x = seed;
    for (int i = 0; i < N; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        lg[i] = (float)((x >> 40) % 1000) / 250.0f; /* 0..4, with ties */
    }
    const bn_sampler_params_t ps[] = {
        { .temp = 0.0f, .top_p = 1.0f, .seed = seed },
        { .temp = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f, .seed = seed },
        { .temp = 1.0f, .top_k = 0, .top_p = 0.2f, .seed = seed },
        { .temp = 0.7f, .top_k = 0, .top_p = 1.0f, .min_p = 0.5f, .seed = seed },
        { .temp = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = seed },
        { .temp = 3.0f, .top_k = 1000, .top_p = 1.0f, .seed = seed },
    };
    const uint32_t cuts[][K + 1] = {
        { 0, N }, { 0, 1500, N }, { 0, 1, 2, N }, { 0, 10, 700, 701, 2000, 2999, N },
    };
    const int nk[] = { 1, 2, 3, 6 };
    static bn_cand_t cand[K * BN_SAMPLER_CAP];
    bn_slice_stats_t st[K];
    char err[128];
    for (size_t pi = 0; pi < sizeof ps / sizeof ps[0]; pi++) {
        bn_sampler_t *one = NULL;
        CHECK(bn_sampler_new(&ps[pi], N, &one, err, sizeof err) == BN_OK);
        int32_t want[D];
        int in_tail = 0;
        for (int d = 0; d < D; d++) {
            want[d] = bn_sampler_sample(one, lg);
            CHECK(want[d] >= 0 && want[d] < N);
            in_tail += lg[want[d]] < 3.5f;
        }
        bn_sampler_destroy(&one);
        if (pi == 4) /* plain sampling at temp 1: most of the mass is below the candidates */
            CHECK(in_tail > D / 2);
        for (size_t c = 0; c < sizeof nk / sizeof nk[0]; c++) {
            bn_sampler_t *s = NULL;
            CHECK(bn_sampler_new(&ps[pi], N, &s, err, sizeof err) == BN_OK);
            int same = 0;
            for (int d = 0; d < D; d++)
                same += sliced_draw(s, lg, N, cuts[c], nk[c], cand, st) == want[d];
            bn_sampler_destroy(&s);
            if (same != D)
                fprintf(stderr, "  params %zu, %d slices: %d of %d draws the same\n", pi, nk[c], same, D);
            CHECK_EQ_INT(same, D);
        }
    }
}

/* Plain temperature sampling over equal logits is uniform over all tokens,
 * the ones past the candidate cap included. */
BN_TEST(sampler_tail_uniform)
{
    enum { N = 1000, D = 20000 };
    static float lg[N];
    bn_sampler_params_t p = { .temp = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = bn_test_seed() };
    bn_sampler_t *s = NULL;
    char err[128];
    CHECK(bn_sampler_new(&p, N, &s, err, sizeof err) == BN_OK);
    int tail = 0;
    double sum = 0;
    for (int d = 0; d < D; d++) {
        int32_t t = bn_sampler_sample(s, lg);
        CHECK(t >= 0 && t < N);
        tail += t >= BN_SAMPLER_CAP;
        sum += t;
    }
    bn_sampler_destroy(&s);
    double pr = (double)(N - BN_SAMPLER_CAP) / N, sd = sqrt(D * pr * (1 - pr));
    CHECK_NEAR(tail, D * pr, 4 * sd);
    CHECK_NEAR(sum / D, (N - 1) / 2.0, 4 * sqrt((N * N - 1) / 12.0 / D));
}
