/* test_sampler.c - the sampler's filters on hand-made logits, and determinism. */
#include "test.h"

#include "coordinator/sampler.h"
#include "proto/status.h"

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
